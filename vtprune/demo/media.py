"""What a user uploads (images, a screenshot sequence, or one video) and how it becomes model inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .. import video as video_io
from ..core.errors import VTPruneError
from ..loading import prepare, prompt_text


@dataclass
class Media:
    """The pictures of one request: images (several for a screenshot sequence) or the sampled frames of one video."""

    images: list[Image.Image]  # RGB; the frames when `is_video`
    is_video: bool = False
    names: list[str] = field(default_factory=list)  # one label per picture, e.g. "shot_1.png" or "frame 3 (1.5 s)"


def read_image(path: Path) -> Image.Image | None:
    """The image in `path`, or None when it is not an image file pillow can read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError):
        return None


def read_media(paths: list[str | Path], num_frames: int) -> Media:
    """Images (one or several, in upload order) or one video sampled to `num_frames` frames.

    Raises VTPruneError naming the file for anything else: no file, a file that is neither an image nor a video,
    several videos, or images and a video together.
    """
    if not paths:
        raise VTPruneError("upload an image, several images (e.g. screenshots) or one video")
    images, videos, names = [], [], []
    for path in map(Path, paths):
        image = read_image(path)
        if image is not None:
            images.append(image)
            names.append(path.name)
            continue
        try:
            videos.append((path, video_io.load(path, num_frames=num_frames)))
        except VTPruneError as error:
            reason = str(error).replace(str(path), path.name)
            raise VTPruneError(f"{path.name} is neither an image nor a video that can be read ({reason})") from None
    if videos and (images or len(videos) > 1):
        raise VTPruneError("upload either images or one video, not both or several videos")
    if videos:
        path, clip = videos[0]
        labels = [f"{path.name} frame {i} ({t:.1f} s)" for i, t in zip(clip.indices, clip.timestamps)]
        return Media(images=[frame.convert("RGB") for frame in clip.frames], is_video=True, names=labels)
    return Media(images=images, names=names)


def takes_videos(processor: Any) -> bool:
    """Whether the processor has a video path (LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2-VL)."""
    return getattr(processor, "video_processor", None) is not None


def model_inputs(processor: Any, media: Media, question: str, device: Any = None) -> tuple[dict, list[str]]:
    """(processor outputs, notes for the user). A video goes to the processor's video path when it has one; otherwise
    its frames go in as images, and a note says so. The processor's own errors become VTPruneErrors."""
    try:
        return processor_inputs(processor, media, question, device)
    except (ValueError, TypeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VTPruneError(f"the model's processor cannot take this input: {first}") from error


def processor_inputs(processor: Any, media: Media, question: str, device: Any) -> tuple[dict, list[str]]:
    if not media.is_video:
        return prepare(processor, media.images, question, device=device), []
    if not takes_videos(processor):
        note = f"this model takes no videos: its {len(media.images)} frames go in as {len(media.images)} images"
        return prepare(processor, media.images, question, device=device), [note]
    content = [{"type": "video"}, {"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        text = prompt_text(processor, question, 0).replace("USER: ", "USER: <video>\n", 1)
    inputs = dict(processor(videos=[media.images], text=text, return_tensors="pt"))
    return ({k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()} if device else inputs), []
