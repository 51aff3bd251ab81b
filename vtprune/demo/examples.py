"""Bundled examples, generated on first use (deterministic, offline) instead of shipped as binaries.

- scenes of the toy world (`vtprune.toy.make_dataset`);
- a GUI screenshot sequence (`vtprune.agents.screens`);
- a short video of moving shapes, written with PyAV (H.264 in MP4) and read back with `vtprune.video.load`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..agents.screens import synthetic_episode
from ..toy import make_dataset

EXAMPLES_DIR = Path(tempfile.gettempdir()) / "vtprune-demo-examples"


@dataclass(frozen=True)
class Example:
    label: str
    files: list[str]
    question: str
    budget: str  # a ratio, so that it fits any model's token count
    answer: str | None = None  # the expected answer, when known


def written(path: Path, write: Callable[[Path], object]) -> str:
    """`path`, written by `write` unless it exists (through a temporary name, so that concurrent demos never read a
    half-written file)."""
    if not path.exists():
        temporary = path.with_name(f".{os.getpid()}-{path.name}")
        write(temporary)
        temporary.replace(path)
    return str(path)


def scene_examples(folder: Path) -> list[Example]:
    """Two test scenes of the toy world: one about a small object, one of another question type."""
    items = make_dataset("test", 8, seed=0)
    small = next((item for item in items if item.target_size == "small"), items[0])
    other = next(item for item in items if item.qtype != small.qtype)
    out = []
    for item in (small, other):
        path = written(folder / f"scene_{item.index}.png", item.image.save)
        label = f"Toy scene {item.index}: {item.qtype} question" + (" about a small object" if item is small else "")
        out.append(Example(label, [path], item.question, "0.25", item.answer))
    return out


def screenshot_example(folder: Path, steps: int = 3) -> Example:
    task, screenshots, _ = synthetic_episode(steps=steps, size=(336, 210))
    paths = [written(folder / f"screen_{i + 1}.png", shot.save) for i, shot in enumerate(screenshots)]
    return Example(f"GUI screenshots ({steps})", paths, f"Task: {task}. What should be clicked next?", "0.25")


def moving_shapes(frames: int = 16, side: int = 224) -> list[Image.Image]:
    """A red circle crossing a grey, noisy background from left to right, a fixed blue square in a corner."""
    noise = np.random.default_rng(0).normal(0, 6, (side, side, 3))
    background = np.clip(128 + noise, 0, 255).astype(np.uint8)
    out = []
    for index in range(frames):
        image = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(image)
        draw.rectangle((side - 60, 20, side - 20, 60), fill=(45, 90, 225))
        x = 20 + (side - 80) * index // max(1, frames - 1)
        draw.ellipse((x, side // 2 - 20, x + 40, side // 2 + 20), fill=(220, 45, 45))
        out.append(image)
    return out


def write_video(path: Path, images: list[Image.Image], fps: int = 8) -> Path:
    """H.264 in MP4 (plays in browsers), yuv420p."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height = images[0].size
        stream.pix_fmt = "yuv420p"
        for image in images:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_example(folder: Path) -> Example:
    path = written(folder / "moving_circle.mp4", lambda target: write_video(target, moving_shapes()))
    return Example("Video: a moving circle (2 s)", [path], "What color is the circle?", "0.25", "red")


def bundled_examples(folder: str | Path) -> list[Example]:
    """Every bundled example, writing its files into `folder` when they are not there yet."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return scene_examples(folder) + [screenshot_example(folder), video_example(folder)]
