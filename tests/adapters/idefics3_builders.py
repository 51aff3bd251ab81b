"""Builders for the Idefics3 / SmolVLM tests: tiny models from configs (random weights: a 2-layer SigLIP tower of
32 px crops in 8 px patches, pixel shuffle 2×2 -> 2×2 tokens per crop, a 4-layer Llama language model) and offline
processors (byte-level tokenizer with the Idefics3 special tokens, images split into 32 px crops plus the global
image)."""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn

ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
SPECIALS = ["<|endoftext|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + ROW_COL
PAD, FAKE, IMAGE, _, GLOBAL = range(256, 261)  # the byte tokens take 0..255, the specials follow in order
VOCAB = 320
SIDE = 2  # tokens per side of a crop
PER_CROP = SIDE * SIDE
KINDS = ("idefics3", "smolvlm")


def build_tiny_idefics3(kind: str = "idefics3", seed: int = 0, layers: int = 4) -> nn.Module:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=2, num_key_value_heads=1, pad_token_id=PAD, bos_token_id=None, eos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config_class, model_class = {"idefics3": (Idefics3Config, Idefics3ForConditionalGeneration),
                                 "smolvlm": (SmolVLMConfig, SmolVLMForConditionalGeneration)}[kind]
    model = model_class(config_class(text_config=text, vision_config=vision, scale_factor=2, image_token_id=IMAGE))
    model.eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    return model


def build_idefics3_processor():
    """Images resized to at most 64 px (longest edge) and split into 32 px crops, then the global image. SmolVLM's
    own processor lays images out the same way but needs the `num2words` package; SmolVLM is tested with this one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Idefics3ImageProcessor, Idefics3Processor, PreTrainedTokenizerFast

    vocab = {byte: i for i, byte in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>",
                                        eos_token="<end_of_utterance>", padding_side="left")
    sizes = dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True)
    return Idefics3Processor(image_processor=Idefics3ImageProcessor(**sizes), tokenizer=tokenizer,
                             image_seq_len=PER_CROP)


def pictures() -> list[Image.Image]:
    """A 60×40 image (2×2 crops), a 30×30 one, a 50×50 one: random pixels."""
    generator = torch.Generator().manual_seed(0)
    sizes = [(60, 40), (30, 30), (50, 50)]
    arrays = [torch.randint(0, 256, (h, w, 3), generator=generator, dtype=torch.uint8).numpy() for w, h in sizes]
    return [Image.fromarray(a) for a in arrays]


def image_batch(processor) -> dict[str, torch.Tensor]:
    """Batch of 2, left padded: sample 0 one image, sample 1 two images with text between them."""
    first, second, third = pictures()
    return dict(processor(text=["hi <image> what?", "a <image> then <image> c"], images=[[first], [second, third]],
                          return_tensors="pt", padding=True))
