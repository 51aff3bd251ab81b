"""Heatmap figures: panels follow the patch grid (square grids center-crop as CLIP does, rectangular ones keep the whole
image), under a title and panel captions, with a colour bar under the scores and a legend under the kept tokens."""

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from vtprune.viz import BOTTOM, COLOUR_MAP, DROPPED, GAP, KEPT_OUTLINE, TITLE_HEIGHT, TOP, UNSCORED, heatmap


def test_square_grid_gives_square_panels_with_kept_tokens_undimmed():
    image = Image.new("RGB", (400, 300), (200, 200, 200))
    kept = torch.zeros(4, 4, dtype=torch.bool)
    kept[0, 0] = True
    canvas = heatmap(image, torch.rand(4, 4), kept, side=80)
    assert canvas.size == (3 * 80 + 2 * GAP, TOP + 80 + BOTTOM)
    kept_panel = canvas.crop((2 * 90, TOP, 2 * 90 + 80, TOP + 80))
    assert kept_panel.getpixel((10, 10)) == (200, 200, 200)  # inside the kept patch
    assert kept_panel.getpixel((70, 70))[0] < 100  # a dropped patch, darkened


def test_rectangular_grid_keeps_the_grid_aspect():
    image = Image.new("RGB", (300, 100), (10, 120, 240))
    scores = torch.full((2, 6), float("nan"))
    canvas = heatmap(image, scores, torch.ones(2, 6, dtype=torch.bool), side=120)
    assert canvas.size == (3 * 120 + 2 * GAP, TOP + 40 + BOTTOM)
    assert canvas.getpixel((130 + 5, TOP + 5)) != (10, 120, 240)  # unscored patches are greyed


def dark_pixels(region: Image.Image) -> int:
    return int((np.asarray(region.convert("L")) < 100).sum())


def test_the_figure_has_a_title_captions_a_colour_bar_and_a_legend():
    side = 240
    image = Image.new("RGB", (side, side), (250, 250, 250))
    kept = torch.zeros(6, 6, dtype=torch.bool)
    kept[:2] = True
    canvas = heatmap(image, torch.arange(36.0).reshape(6, 6), kept, side=side, title="fastv: 12 of 36 kept")
    untitled = heatmap(image, torch.arange(36.0).reshape(6, 6), kept, side=side, title="x")

    title = canvas.crop((0, 0, canvas.width, TITLE_HEIGHT))
    assert dark_pixels(title) > dark_pixels(untitled.crop((0, 0, canvas.width, TITLE_HEIGHT))) > 0  # longer text
    for i in range(3):  # a caption over each panel
        assert dark_pixels(canvas.crop((i * (side + GAP), TITLE_HEIGHT, i * (side + GAP) + side, TOP))) > 0

    bar_row = TOP + side + 6  # the colour bar runs the colour map from the lowest to the highest score
    left, right = canvas.getpixel((side + GAP + 1, bar_row)), canvas.getpixel((2 * side + GAP - 2, bar_row))
    low, high = (tuple(int(v * 255) for v in colormaps[COLOUR_MAP](x)[:3]) for x in (0.0, 1.0))
    assert np.abs(np.subtract(left, low)).max() <= 8 and np.abs(np.subtract(right, high)).max() <= 8
    labels = canvas.crop((side + GAP, bar_row + 6, 2 * side + GAP, canvas.height))
    assert dark_pixels(labels.crop((0, 0, side // 3, labels.height))) > 0  # the lowest score, under the left end
    assert dark_pixels(labels.crop((2 * side // 3, 0, side, labels.height))) > 0  # the highest, under the right end

    legend = np.asarray(canvas.crop((2 * (side + GAP), TOP + side, canvas.width, canvas.height)))
    colours = {tuple(pixel) for pixel in legend.reshape(-1, 3)}
    assert {KEPT_OUTLINE, DROPPED, UNSCORED} <= colours
