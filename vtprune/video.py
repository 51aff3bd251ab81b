"""Reading videos with decord: frames sampled uniformly or at a frame rate, with their timestamps.

    video = vtprune.video.load("clip.mp4", num_frames=64)      # 64 frames spread over the whole video
    video = vtprune.video.load("clip.mp4", fps=1)              # one frame per second
    video = vtprune.video.load("clip.mp4", fps=1, num_frames=64)   # one per second, at most 64 (spread uniformly)
    inputs = processor(videos=[video.frames], text=prompt, return_tensors="pt")

Uniform sampling follows LongVA / lmms-eval: `np.linspace(0, total - 1, num_frames)` truncated to integers (frames
repeat when a video has fewer than `num_frames`). Rate sampling takes frame round(k · file_fps / fps) for k = 0, 1, ...
while inside the video. Timestamps are the decoder's presentation times (start of each frame) in seconds.
In the language model every frame is one span of the visual layout (kind "frame"); budgets can be set per frame or
per video (see `vtprune.core.scope`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .core.errors import VTPruneError


@dataclass
class Video:
    frames: Any  # list of PIL images, or a uint8 array [frames, height, width, 3] with as_array=True
    timestamps: list[float]  # seconds: start of each sampled frame
    indices: list[int]  # frame numbers in the file
    fps: float  # the file's average frame rate
    total_frames: int  # frames in the file


def sample_indices(
    total: int, file_fps: float, num_frames: int | None = None, fps: float | None = None
) -> list[int]:
    """Frame numbers to read: uniform over the video (num_frames), at a rate (fps), or at a rate capped by
    num_frames."""
    if num_frames is None and fps is None:
        raise VTPruneError("give num_frames (uniform sampling), fps (frames per second), or both")
    if num_frames is not None and num_frames < 1:
        raise VTPruneError(f"num_frames={num_frames}: sample at least one frame")
    if fps is not None and not fps > 0:
        raise VTPruneError(f"fps={fps}: give a positive frame rate")
    if fps is None:
        return np.linspace(0, total - 1, num_frames, dtype=int).tolist()
    step = file_fps / fps
    indices = sorted({int(round(k * step)) for k in range(int(np.ceil(total / step)) + 1) if round(k * step) < total})
    if num_frames is not None and len(indices) > num_frames:
        indices = [indices[i] for i in np.linspace(0, len(indices) - 1, num_frames, dtype=int)]
    return indices


def load(
    path: str | Path, num_frames: int | None = None, fps: float | None = None, as_array: bool = False
) -> Video:
    """Decode the sampled frames of a video file (RGB)."""
    try:
        import decord
    except ImportError as error:
        raise VTPruneError("reading videos needs decord: pip install 'vtprune[video]'") from error
    path = Path(path)
    if not path.is_file():
        raise VTPruneError(f"video file {path} does not exist")
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        total = len(reader)
        if total == 0:
            raise VTPruneError(f"video file {path} holds no frames")
        file_fps = float(reader.get_avg_fps())
        indices = sample_indices(total, file_fps, num_frames, fps)
        frames = reader.get_batch(indices).asnumpy()
        timestamps = reader.get_frame_timestamp(indices)[:, 0].tolist()
    except decord.DECORDError as error:
        raise VTPruneError(f"cannot read video file {path}: {str(error).splitlines()[0]}") from error
    except RuntimeError as error:  # decord reports unreadable containers as RuntimeError
        reason = str(error).splitlines()[0]
        raise VTPruneError(f"cannot read video file {path} (corrupt or not a video): {reason}") from error
    if not as_array:
        from PIL import Image

        frames = [Image.fromarray(frame) for frame in frames]
    return Video(frames=frames, timestamps=timestamps, indices=indices, fps=file_fps, total_frames=total)
