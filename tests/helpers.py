"""Builders used by the tests: tiny models from configs, batches, an offline tokenizer and processor."""

from __future__ import annotations

import torch
from torch import nn

IMAGE_TOKEN = 99
PAD, BOS, EOS = 0, 1, 2
GRID = 4  # 32 px images, 8 px patches -> 4x4 = 16 visual tokens per image


def build_tiny_llava(seed: int = 0, layers: int = 4, attn: str = "sdpa") -> nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2
    )
    text = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, max_position_embeddings=256,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default", attn_implementation=attn,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Sample 0: one image, left padded; sample 1: two images separated by text."""
    image = [IMAGE_TOKEN] * GRID * GRID
    sample0 = [BOS, 5, 6] + image + [7, 8, 9]
    sample1 = [BOS, 5] + image + [10] + image + [7, 11]
    length = max(len(sample0), len(sample1))
    input_ids = torch.full((2, length), PAD, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    for b, ids in enumerate((sample0, sample1)):
        input_ids[b, length - len(ids) :] = torch.tensor(ids)
        mask[b, length - len(ids) :] = 1
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(3, 3, 32, 32, generator=generator)
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values}


def hooks_of(model: nn.Module) -> int:
    """Number of forward hooks and pre-hooks installed anywhere in the model, except transformers' own (it installs
    output-capturing hooks lazily on the first forward)."""
    hooks = [
        fn
        for m in model.modules()
        for table in (m._forward_pre_hooks, m._forward_hooks)
        for fn in table.values()
    ]
    return sum(not getattr(fn, "__module__", "").startswith("transformers.") for fn in hooks)


def build_tiny_processor(backend=None, chat_template: str | None = None):
    """An offline LlavaProcessor for the tiny model: word-level tokenizer (100 ids, `<image>` = 99), 32 px images.

    `backend`: another `tokenizers.Tokenizer` with the same special tokens (default: words w0..w92)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    if backend is None:
        words = ["<pad>", "<s>", "</s>", "<unk>", "USER:", "ASSISTANT:"] + [f"w{i}" for i in range(93)] + ["<image>"]
        backend = Tokenizer(models.WordLevel(vocab={word: i for i, word in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=chat_template,
    )


def build_tiny_clip(seed: int = 0, **vision: object) -> nn.Module:
    """An open_clip CLIP in miniature: ViT tower with 4 blocks, 2 heads, 32 px images, 8 px patches (4x4 grid + [CLS]).

    `vision` overrides fields of the tower's `CLIPVisionCfg` (e.g. layers=(1, 1, 1, 1) for a ResNet tower).
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    config = dict(layers=4, width=32, head_width=16, image_size=32, patch_size=8) | vision
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=16, heads=2, layers=1)
    return CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(**config), text_cfg=text).eval()


def clip_images(count: int = 3, side: int = 32, seed: int = 2) -> torch.Tensor:
    """[count, 3, side, side] normalised-looking pixels."""
    return torch.randn(count, 3, side, side, generator=torch.Generator().manual_seed(seed))


def capture_llm_input(model: nn.Module, batch: dict, method) -> tuple[dict[str, torch.Tensor], object]:
    """Run one forward with `method` attached; returns what the language model received ("embeds", "mask") and the
    trace. The hook sits after vtprune's own, so it sees the pruned input."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"].clone(), mask=kwargs["attention_mask"].clone())

    with torch.no_grad(), method(model) as trace:
        handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(**batch)
        finally:
            handle.remove()
    return seen, trace
