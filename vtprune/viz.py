"""Heatmaps: the image as the model saw it, the method's scores per patch, and the tokens it kept."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw
from torch import Tensor


def model_view(image: Image.Image, side: int, grid: tuple[int, int] = (1, 1)) -> Image.Image:
    """The image as the model saw it, at most `side` pixels wide or high.

    A square patch grid: the shortest side resized to `side` and a square center-cropped, as CLIP-style processors
    do. A rectangular grid (rows, cols) (Qwen2-VL's dynamic resolution): the whole image resized to the grid's shape.
    """
    image = image.convert("RGB")
    rows, cols = grid
    if rows != cols:
        return image.resize((round(side * cols / max(grid)), round(side * rows / max(grid))), Image.BICUBIC)
    scale = side / min(image.size)
    resized = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - side) // 2, (resized.height - side) // 2
    return resized.crop((left, top, left + side, top + side))


def heatmap(image: Image.Image, scores: Tensor, kept: Tensor, side: int = 336) -> Image.Image:
    """Three panels side by side: the model's view, scores as a colour map (grey: unscored), kept tokens outlined.

    scores: float [rows, cols] (NaN where the method gave no score); kept: bool [rows, cols].
    """
    rows, cols = kept.shape
    view = model_view(image, side, (rows, cols))
    width, height = view.size
    cell_h, cell_w = height / rows, width / cols
    values = scores.float().numpy()
    finite = np.isfinite(values)
    low, high = (values[finite].min(), values[finite].max()) if finite.any() else (0.0, 1.0)
    normed = np.where(finite, (values - low) / (high - low + 1e-12), 0.0)
    colours = (colormaps["inferno"](normed)[..., :3] * 255).astype(np.uint8)
    colours[~finite] = 128
    score_panel = Image.blend(view, Image.fromarray(colours).resize(view.size, Image.NEAREST), alpha=0.65)

    kept_panel = Image.blend(view, Image.new("RGB", view.size), alpha=0.7)  # dropped tokens darkened
    draw = ImageDraw.Draw(kept_panel)
    for r in range(rows):
        for c in range(cols):
            if bool(kept[r, c]):
                box = (math.floor(c * cell_w), math.floor(r * cell_h), math.ceil((c + 1) * cell_w) - 1,
                       math.ceil((r + 1) * cell_h) - 1)
                kept_panel.paste(view.crop((box[0], box[1], box[2] + 1, box[3] + 1)), box[:2])
                draw.rectangle(box, outline=(0, 255, 120))
    canvas = Image.new("RGB", (3 * width + 20, height), "white")
    for i, panel in enumerate((view, score_panel, kept_panel)):
        canvas.paste(panel, (i * (width + 10), 0))
    return canvas
