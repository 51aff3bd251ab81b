"""The embedded default model: a small LLaVA-1.5 trained on a synthetic visual QA world.

No VLM weights can be downloaded on a fresh machine, so vtprune ships its own: a real
`transformers.LlavaForConditionalGeneration` (CLIP vision tower, 576 visual tokens, Llama
language model) trained from scratch by `python -m vtprune.toy.train` on the scenes of
`vtprune.toy.world`, where some questions are about objects only a few patches wide.

    from vtprune import toy
    model, processor = toy.load()
    items = toy.make_dataset("test", 8, seed=0)
    toy.answer(model, processor, [i.image for i in items], [i.question for i in items])
"""

from vtprune.toy.modeling import (
    EXAMPLES_DIR,
    MODEL_DIR,
    NUM_IMAGE_TOKENS,
    answer,
    is_correct,
    load,
    normalize_answer,
    prompt,
)
from vtprune.toy.world import QTYPES, VQAItem, make_dataset

__all__ = [
    "EXAMPLES_DIR",
    "MODEL_DIR",
    "NUM_IMAGE_TOKENS",
    "QTYPES",
    "VQAItem",
    "answer",
    "is_correct",
    "load",
    "load_example",
    "make_dataset",
    "normalize_answer",
    "prompt",
]


def load_example() -> dict:
    """The bundled example: {"image": PIL image, "question": str, "answer": str, ...}."""
    import json

    from PIL import Image

    record = json.loads((EXAMPLES_DIR / "small_object.json").read_text())
    with Image.open(EXAMPLES_DIR / record["image"]) as image:
        record["image"] = image.convert("RGB")
    return record
