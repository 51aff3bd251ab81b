"""An offline processor for the tiny LLaVA-OneVision of `tests/helpers_video.py` (SigLIP 40 px, 8 px patches: 5×5
tokens per image, frames pooled to 3×3), so that the demo's video path runs end to end."""

from __future__ import annotations

from tests.helpers_video import IMAGE, VIDEO

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image> {% elif p['type'] == 'video' %}<video> {% else %}{{ p['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_onevision_processor():
    """Word-level tokenizer (100 ids: `<video>` = 98, `<image>` = 99), OneVision image and video processors at 40 px."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(92)] + ["<video>", "<image>"]
    assert words.index("<image>") == IMAGE and words.index("<video>") == VIDEO
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    side = {"height": 40, "width": 40}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=[[40, 80], [80, 40], [80, 80]]),
        video_processor=LlavaOnevisionVideoProcessor(size=side), tokenizer=tokenizer, num_image_tokens=25,
        vision_feature_select_strategy="full", chat_template=TEMPLATE,
    )
