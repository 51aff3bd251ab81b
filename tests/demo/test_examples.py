"""The bundled examples are generated, not shipped: the same files every time, readable by the demo."""

from __future__ import annotations

import numpy as np

import vtprune
from vtprune.demo.examples import bundled_examples
from vtprune.demo.media import read_media


def test_examples_are_the_same_files_every_time(tmp_path, examples):
    again = {example.label: example for example in bundled_examples(tmp_path)}
    assert again.keys() == examples.keys()
    for label, example in examples.items():
        if example.files[0].endswith(".png"):
            assert [open(f, "rb").read() for f in again[label].files] == [open(f, "rb").read() for f in example.files]
    assert sum(label.startswith("Toy scene") for label in examples) == 2


def test_screenshots_are_a_sequence_of_images(screenshots):
    media = read_media(screenshots.files, num_frames=4)
    assert not media.is_video and len(media.images) == 3
    assert media.names == ["screen_1.png", "screen_2.png", "screen_3.png"]


def test_the_video_shows_a_red_circle_moving_right(video):
    clip = vtprune.video.load(video.files[0], num_frames=16)
    assert clip.total_frames == 16 and clip.fps == 8
    centres = []
    for frame in clip.frames:
        pixels = np.asarray(frame).astype(int)
        red = (pixels[..., 0] > 180) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
        centres.append(np.nonzero(red)[1].mean())
    assert all(b > a for a, b in zip(centres, centres[1:]))
    assert read_media(video.files, num_frames=4).is_video
