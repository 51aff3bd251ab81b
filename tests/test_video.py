"""vtprune.video: decord reads a video the test writes; uniform and rate sampling pick exact frames and timestamps."""

from __future__ import annotations

import numpy as np
import pytest

import vtprune
from tests.helpers_video import frame_colour, write_video
from vtprune.video import load, sample_indices

FRAMES, FPS = 30, 10


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "counting.mkv", FRAMES, FPS)


def frame_numbers(frames) -> list[int]:
    """Which frame each decoded image is, read from its grey level."""
    return [int(round((np.asarray(frame).mean() - frame_colour(0)) / (frame_colour(1) - frame_colour(0)))) for frame in frames]


@pytest.mark.parametrize(
    "options, indices",
    [
        (dict(num_frames=4), [0, 9, 19, 29]),  # linspace(0, 29, 4) truncated
        (dict(num_frames=7), [0, 4, 9, 14, 19, 24, 29]),
        (dict(fps=3), [0, 3, 7, 10, 13, 17, 20, 23, 27]),  # every 10/3 frames, rounded
        (dict(fps=2.5), [0, 4, 8, 12, 16, 20, 24, 28]),
        (dict(fps=3, num_frames=5), [0, 7, 13, 20, 27]),  # rate sampling, then at most 5 spread uniformly
    ],
)
def test_sampling_reads_the_exact_frames_and_timestamps(video_file, options, indices):
    video = load(video_file, **options)
    assert video.indices == indices
    assert video.total_frames == FRAMES and video.fps == pytest.approx(FPS)
    assert frame_numbers(video.frames) == indices
    np.testing.assert_allclose(video.timestamps, np.array(indices) / FPS, atol=1e-6)
    assert video.frames[0].size == (64, 48)


def test_frames_as_an_array(video_file):
    video = load(video_file, num_frames=3, as_array=True)
    assert video.frames.shape == (3, 48, 64, 3) and video.frames.dtype == np.uint8
    assert frame_numbers(video.frames) == [0, 14, 29]


def test_more_frames_than_the_video_repeats_frames():
    assert sample_indices(3, 10.0, num_frames=5) == [0, 0, 1, 1, 2]


def test_missing_or_corrupt_file_gives_a_clear_error(tmp_path, video_file):
    with pytest.raises(vtprune.VTPruneError, match="does not exist"):
        load(tmp_path / "nowhere.mp4", num_frames=4)
    corrupt = tmp_path / "corrupt.mkv"
    corrupt.write_bytes(b"this is not a video" * 50)
    with pytest.raises(vtprune.VTPruneError, match="cannot read video file .*corrupt"):
        load(corrupt, num_frames=4)
    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(video_file.read_bytes()[:300])
    with pytest.raises(vtprune.VTPruneError, match="cannot read video file"):
        load(truncated, num_frames=4)


@pytest.mark.parametrize(
    "options, match",
    [(dict(), "give num_frames"), (dict(num_frames=0), "at least one"), (dict(fps=-1.0), "positive frame rate")],
)
def test_bad_sampling_options_are_refused(video_file, options, match):
    with pytest.raises(vtprune.VTPruneError, match=match):
        load(video_file, **options)
