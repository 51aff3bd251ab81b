"""Loading a model and processor by hub id or local path, and turning (images, question) into model inputs."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

EMBEDDED = "toy"  # the small trained LLaVA shipped inside the package


def load(name_or_path: str, device: str | None = None, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, processor) in eval mode. `"toy"` is the embedded default; anything else goes to `from_pretrained`."""
    if name_or_path == EMBEDDED:
        from . import toy

        model, processor = toy.load()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() and device != "cpu" else torch.float32
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).eval()
    if device is not None:
        model = model.to(device)
    return model, processor


def prompt_text(processor: Any, question: str, num_images: int = 1) -> str:
    """The model's own chat template when it has one, else the LLaVA-1.5 format."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return "USER: " + "<image>\n" * num_images + question + " ASSISTANT:"


def prepare(processor: Any, images: list[Image.Image], question: str, device: Any = None) -> dict:
    """Processor outputs for one prompt with its images, on `device`."""
    text = prompt_text(processor, question, len(images))
    inputs = processor(images=[im.convert("RGB") for im in images], text=text, return_tensors="pt")
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()} if device else dict(inputs)
