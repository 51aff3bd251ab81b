"""Heatmaps: the image as the model saw it, the method's scores per patch (with a colour bar), and the tokens it kept
(with a legend), under a title."""

from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
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


TITLE_HEIGHT = 20  # the title line above the panels
CAPTION_HEIGHT = 16  # the panels' captions
TOP = TITLE_HEIGHT + CAPTION_HEIGHT  # pixels above the panels
BOTTOM = 26  # the colour bar (under the scores) and the legend (under the kept tokens)
GAP = 10  # between panels
KEPT_OUTLINE = (0, 255, 120)
UNSCORED = (128, 128, 128)
DROPPED = (40, 40, 40)
COLOUR_MAP = "inferno"


def font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def heatmap(image: Image.Image, scores: Tensor, kept: Tensor, side: int = 336, title: str | None = None) -> Image.Image:
    """A figure of three panels side by side: the model's view, scores as a colour map (grey: unscored), kept tokens
    outlined (dropped ones darkened); a title above (default: how many tokens were kept), a caption per panel, a
    colour bar with the lowest and highest score under the scores, and a legend under the kept tokens.

    scores: float [rows, cols] (NaN where the method gave no score); kept: bool [rows, cols].
    The panels are `side` pixels on their longer side; the figure adds TOP pixels above them and BOTTOM below.
    """
    rows, cols = kept.shape
    view = model_view(image, side, (rows, cols))
    width, height = view.size
    cell_h, cell_w = height / rows, width / cols
    values = scores.float().numpy()
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 1.0)
    normed = np.where(finite, (values - low) / (high - low + 1e-12), 0.0)
    colours = (colormaps[COLOUR_MAP](normed)[..., :3] * 255).astype(np.uint8)
    colours[~finite] = UNSCORED
    score_panel = Image.blend(view, Image.fromarray(colours).resize(view.size, Image.NEAREST), alpha=0.65)

    kept_panel = Image.blend(view, Image.new("RGB", view.size), alpha=0.7)  # dropped tokens darkened
    draw = ImageDraw.Draw(kept_panel)
    for r in range(rows):
        for c in range(cols):
            if bool(kept[r, c]):
                box = (math.floor(c * cell_w), math.floor(r * cell_h), math.ceil((c + 1) * cell_w) - 1,
                       math.ceil((r + 1) * cell_h) - 1)
                kept_panel.paste(view.crop((box[0], box[1], box[2] + 1, box[3] + 1)), box[:2])
                draw.rectangle(box, outline=KEPT_OUTLINE)

    canvas = Image.new("RGB", (3 * width + 2 * GAP, TOP + height + BOTTOM), "white")
    draw = ImageDraw.Draw(canvas)
    text = font(12)
    draw.text((2, 3), title or f"{int(kept.sum())} of {kept.numel()} visual tokens kept", fill="black", font=font(14))
    captions = ("model view", "scores (grey: none)" if not finite.all() else "scores", "kept tokens")
    for i, (panel, caption) in enumerate(zip((view, score_panel, kept_panel), captions)):
        left = i * (width + GAP)
        canvas.paste(panel, (left, TOP))
        draw.text((left + 2, TITLE_HEIGHT + 1), caption, fill="black", font=text)

    bar_top, bar = TOP + height + 3, 8  # colour bar: the colour map from the lowest score (left) to the highest
    ramp = (colormaps[COLOUR_MAP](np.linspace(0.0, 1.0, width))[:, :3] * 255).astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(ramp[None], bar, axis=0)), (width + GAP, bar_top))
    draw.text((width + GAP, bar_top + bar + 1), f"{low:.3g}", fill="black", font=text)
    high_text = f"{high:.3g}"
    draw.text((2 * width + GAP - draw.textlength(high_text, font=text), bar_top + bar + 1), high_text, fill="black",
              font=text)

    left = 2 * (width + GAP)  # legend: a swatch and a word per kind of token
    for swatch, word in (((KEPT_OUTLINE, None), "kept"), ((DROPPED, DROPPED), "dropped"), ((UNSCORED, UNSCORED), "no score")):
        outline, fill = swatch
        draw.rectangle((left, bar_top, left + 9, bar_top + 9), outline=outline, fill=fill, width=2)
        draw.text((left + 13, bar_top - 2), word, fill="black", font=text)
        left += 17 + round(draw.textlength(word, font=text)) + 8
    return canvas
