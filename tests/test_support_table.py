"""The table of docs/methods/README.md that says which model family runs which method is measured, not written: every
registered method at keep=0.5 (a real cut) runs one forward on a tiny model of each family, or is refused with a
VTPruneError. `python -m tests.test_support_table` prints the measured table."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch

import vtprune
from tests.adapters import idefics3_builders
from tests.adapters.gemma3_builders import build_gemma3_processor, build_tiny_gemma3
from tests.adapters.gemma3_builders import image_batch as gemma3_batch
from tests.adapters.internvl_builders import build_internvl_processor, build_tiny_internvl, image_batch
from tests.adapters.qwen3_builders import build_qwen3_processor, build_tiny_qwen3, video_batch
from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen, two_screenshot_batch
from tests.helpers import build_tiny_clip, build_tiny_llava, clip_images, padded_batch
from tests.helpers_video import build_tiny_llava_next, build_tiny_next_video, build_tiny_onevision, media_batch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods" / "README.md"
# the tiny models have 3-4 decoder layers and 2 vision blocks: layer options that fit them, nothing else changed
TINY = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "transprune": {"keep_ratios": (0.5,), "prune_layers": (1,)},
        "pyramiddrop": {"layer_list": (1, 2)}, "vflowopt": {"llm_layers": (1, 2)}, "spatten": {"layers": (1, 2)},
        "scissorhands": {"recent": 2}, "hiprune": {"object_layer": 0}}


def _next():
    model = build_tiny_llava_next()
    return model, media_batch(model, [[(40, 64)], [(32, 32)]])


def _onevision():
    model = build_tiny_onevision()
    return model, media_batch(model, [[(40, 64)], []], videos=[[], [4]])


def _next_video():
    model = build_tiny_next_video()
    return model, media_batch(model, [[(32, 32)], []], videos=[[], [4]])


def _qwen(kind):
    model = build_tiny_qwen(kind)
    return model, two_screenshot_batch(build_qwen_processor(kind))


FAMILIES = {  # column -> (model, inputs) builder
    "llava": lambda: (build_tiny_llava(), padded_batch()),
    "llava-next (anyres)": _next,
    "onevision (SigLIP; image + video)": _onevision,
    "next-video (image + video)": _next_video,
    "qwen2-vl": lambda: _qwen("qwen2-vl"),
    "qwen2.5-vl": lambda: _qwen("qwen2.5-vl"),
    "qwen3-vl (image + video)": lambda: (build_tiny_qwen3(), video_batch(build_qwen3_processor())),
    "internvl (tiles)": lambda: (build_tiny_internvl(), image_batch(build_internvl_processor())),
    "idefics3 (crops)": lambda: (idefics3_builders.build_tiny_idefics3(),
                                 idefics3_builders.image_batch(idefics3_builders.build_idefics3_processor())),
    "gemma3 (pan-and-scan crops)": lambda: (build_tiny_gemma3(), gemma3_batch(build_gemma3_processor())),
    "open_clip": lambda: (build_tiny_clip(), {"x": clip_images()}),
}


def outcome(model, inputs, name: str) -> str:
    """'yes', or 'refused: <the error>' for one forward of `model` under `name` at keep=0.5."""
    try:
        with vtprune.make(name, keep=0.5, **TINY.get(name, {}))(model), torch.no_grad():
            model(**inputs)
    except vtprune.VTPruneError as error:
        return "refused: " + " ".join(str(error).split())
    return "yes"


@cache
def measured() -> dict[str, dict[str, str]]:
    """method -> family -> outcome."""
    table: dict[str, dict[str, str]] = {name: {} for name in vtprune.available()}
    for family, build in FAMILIES.items():
        model, inputs = build()
        model = model.visual if family == "open_clip" else model.eval()
        for name in table:
            table[name][family] = outcome(model, inputs, name)
    return table


def documented() -> dict[str, dict[str, str]]:
    """The docs table, method -> family -> cell."""
    text = DOCS.read_text()
    header = "| method | " + " | ".join(f"`{f}`" for f in FAMILIES) + " |"
    assert header in text, f"docs/methods/README.md lacks the support table header {header}"
    rows = text.split(header, 1)[1].splitlines()[2:]
    table = {}
    for row in rows:
        if not row.startswith("|"):
            break
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(FAMILIES, cells[1:], strict=True))
    return table


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_support_table_says_what_runs(family):
    docs = documented()
    assert set(docs) == set(vtprune.available())
    for name, cells in measured().items():
        runs = cells[family] == "yes"
        assert docs[name][family].startswith("yes") == runs, (name, family, cells[family])


SHORT = [  # (pattern in the error, what the docs cell says)
    (r"which the open_clip adapter does not offer", "no (no language model)"),
    (r"\[CLS\] token", "refused: no [CLS] in the tower"),
    (r"signal ProjectorInput", "refused: no per-view projector input yet"),
    (r"signal VisionAttention", "refused: no vision attention rows"),
    (r"1-D RoPE.*M-RoPE", 'refused: M-RoPE; use `key_positions="original"`'),
    (r"1-D RoPE.*RoPE per layer kind", 'refused: a RoPE per layer kind; use `key_positions="original"`'),
    (r"site 'llm_attention', which the", "refused: no `llm_attention` site (causal sparse attention)"),
    (r"split into \d+ spans", "refused: an anyres image is several spans"),
    (r"runs on single-grid images", "refused: single-grid images only"),
]


def markdown() -> str:
    """The measured table with short reasons (the full error is what a user sees)."""
    lines = ["| method | " + " | ".join(f"`{f}`" for f in FAMILIES) + " |", "|" + " --- |" * (len(FAMILIES) + 1)]
    for name, cells in measured().items():
        shown = [c if c == "yes" else next((short for pattern, short in SHORT if re.search(pattern, c)), c[:80])
                 for c in cells.values()]
        lines.append(f"| `{name}` | " + " | ".join(shown) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
