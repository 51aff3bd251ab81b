"""Heatmap panels follow the patch grid: square grids center-crop (CLIP), rectangular ones keep the whole image."""

import torch
from PIL import Image

from vtprune.viz import heatmap


def test_square_grid_gives_square_panels_with_kept_tokens_undimmed():
    image = Image.new("RGB", (400, 300), (200, 200, 200))
    kept = torch.zeros(4, 4, dtype=torch.bool)
    kept[0, 0] = True
    canvas = heatmap(image, torch.rand(4, 4), kept, side=80)
    assert canvas.size == (3 * 80 + 20, 80)
    kept_panel = canvas.crop((2 * 90, 0, 2 * 90 + 80, 80))
    assert kept_panel.getpixel((10, 10)) == (200, 200, 200)  # inside the kept patch
    assert kept_panel.getpixel((70, 70))[0] < 100  # a dropped patch, darkened


def test_rectangular_grid_keeps_the_grid_aspect():
    image = Image.new("RGB", (300, 100), (10, 120, 240))
    scores = torch.full((2, 6), float("nan"))
    canvas = heatmap(image, scores, torch.ones(2, 6, dtype=torch.bool), side=120)
    assert canvas.size == (3 * 120 + 20, 40)
    assert canvas.getpixel((130 + 5, 5)) != (10, 120, 240)  # unscored patches are greyed
