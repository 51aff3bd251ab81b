"""Loading a model and processor by hub id or local path, and turning (images, question) into model inputs.

Every check a user's input can fail (the model name, the device, an image file) raises one VTPruneError line that
names the problem and the fix, before anything slow runs: a local path is checked on disk before any hub call, and a
hub id that is neither a local folder nor in the Hugging Face cache is looked up only when the hub answers within a
few seconds (never with retries), so a typo or an offline machine fails at once.
"""

from __future__ import annotations

import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from PIL import Image, ImageFile, UnidentifiedImageError

from .core.errors import VTPruneError

EMBEDDED = "toy"  # the small trained LLaVA shipped inside the package
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
HUB_TIMEOUT_S = 3.0


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face endpoint accepts a TCP connection within `timeout` seconds (one try, no retries)."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str) -> bool:
    """Whether the Hugging Face cache holds this repository's config.json (so it loads without the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError):  # no huggingface_hub, or an id it refuses: not in the cache
        return False


def check_model(name: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether to load from local files only), or one clear error."""
    if name == EMBEDDED:
        return name, True
    hint = f" (the embedded model is {EMBEDDED!r}, lower case)" if name.strip().lower() == EMBEDDED else ""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise VTPruneError(f"model {name!r} is a file; give a folder written by save_pretrained, or a hub id")
        if not (path / "config.json").is_file():
            raise VTPruneError(f"model folder {name!r} has no config.json; give a folder written by save_pretrained")
        return str(path), True
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or not HUB_ID.match(name):
        raise VTPruneError(f"model path {name!r} does not exist; give an existing folder, a hub id or {EMBEDDED!r}{hint}")
    if in_hub_cache(name):
        return name, hub_offline()
    if hub_offline():
        raise VTPruneError(
            f"model {name!r} is no local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            f"give a local folder or {EMBEDDED!r}{hint}, or download it first"
        )
    if not hub_reachable():
        raise VTPruneError(
            f"model {name!r} is no local folder and not in the Hugging Face cache, and the hub cannot be reached: "
            f"give a local folder or {EMBEDDED!r}{hint}, or connect to the internet"
        )
    return name, False


def check_device(device: str | None) -> str | None:
    """`device` if torch can use it here; a CUDA device without a GPU is one clear error, not a traceback later."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise VTPruneError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise VTPruneError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu or leave it out")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise VTPruneError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise VTPruneError(f"--device {device}: MPS is not available here; use --device cpu")
    return device


def load(name_or_path: str, device: str | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """(model, processor) in eval mode. `"toy"` is the embedded default; anything else goes to `from_pretrained`
    (after `check_model`: no hub call for a path that does not exist, none at all when offline)."""
    import torch

    device = check_device(device)
    source, local_only = check_model(name_or_path)
    if source == EMBEDDED:
        from . import toy

        model, processor = toy.load()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_available() and device != "cpu" else torch.float32
        try:
            processor = AutoProcessor.from_pretrained(source, local_files_only=local_only)
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, local_files_only=local_only).eval()
        except (OSError, ValueError, KeyError) as error:  # no such repository, no weights, an unknown architecture
            first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
            raise VTPruneError(f"cannot load model {name_or_path!r}: {first.strip()}") from error
    if device is not None:
        model = model.to(device)
    return model, processor


def read_image(path: str | Path) -> Image.Image:
    """The image file at `path`, fully decoded, or one clear error: missing, a folder, empty, not an image, truncated,
    or more pixels than pillow's decompression-bomb limit."""
    path = Path(path)
    if not path.exists():
        raise VTPruneError(f"image {str(path)!r} does not exist; check the path")
    if path.is_dir():
        raise VTPruneError(f"image {str(path)!r} is a folder; give an image file")
    if path.stat().st_size == 0:
        raise VTPruneError(f"image {str(path)!r} is an empty file; give an image file")
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES  # lmms-eval sets it globally; a truncated file is still an error here
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VTPruneError(
            f"image {str(path)!r} has more pixels than pillow's safety limit ({Image.MAX_IMAGE_PIXELS}); "
            "downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise VTPruneError(f"{str(path)!r} is not an image pillow can read; give a PNG, JPEG, WebP, ... file") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise VTPruneError(f"image {str(path)!r} is truncated or corrupt ({error}); give a complete image file") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


TEMPLATE_PARTS = re.compile(r"^\s*USER:\s*|\s*ASSISTANT:\s*$|<image>\s*")


def question_text(prompt: str) -> tuple[str, bool]:
    """(the question, whether chat-template parts were removed): `prepare` adds the model's own chat template and one
    image token per image, so a prompt written in the API's LLaVA format (`USER: <image>\\n... ASSISTANT:`) is
    reduced to its question; an empty question is an error."""
    question = TEMPLATE_PARTS.sub(" ", prompt).strip()
    if not question:
        raise VTPruneError("the prompt is empty; ask a question, e.g. --prompt 'What is shown?'")
    return question, question != prompt.strip()


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
