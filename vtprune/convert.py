"""`vtprune convert longva SRC DST`: a LongVA checkpoint (original LLaVA-Qwen layout) as a transformers
`LlavaOnevisionForConditionalGeneration`, which the `llava_onevision` adapter prunes.

LongVA (Zhang et al., 2024) has no transformers class. Its checkpoints (e.g. lmms-lab/LongVA-7B) are saved by the
LLaVA-NeXT code base (`LlavaQwenForCausalLM`): a Qwen2 language model, a CLIP-L/336 tower, a 2-layer GELU projector
(`mlp2x_gelu`), an `image_newline` vector, and video frames average-pooled 2×2 after the projector (24×24 -> 12×12 =
144 tokens per frame). Key names (from the public LLaVA-NeXT / LongVA code and transformers' own LLaVA conversion
scripts, which map the same prefixes):

    model.embed_tokens / model.layers.* / model.norm            -> model.language_model.*
    lm_head.weight                                              -> lm_head.weight
    model.vision_tower.vision_tower.vision_model.*              -> model.vision_tower.*
    model.mm_projector.0 / model.mm_projector.2                 -> model.multi_modal_projector.linear_1 / linear_2
    model.image_newline                                         -> model.image_newline

Config fields read: the Qwen2 fields (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
intermediate_size, rms_norm_eps, rope_theta, max_position_embeddings, vocab_size, ...), `mm_vision_tower` (a local
CLIP folder, or the name of CLIP-L/336, whose shape is built in), `mm_vision_select_layer` (-2),
`mm_vision_select_feature` ("patch": [CLS] dropped), `mm_projector_type` (must be mlp2x_gelu),
`mm_spatial_pool_stride` / `mm_spatial_pool_mode` (must be 2 / average: OneVision's bilinear halving equals 2×2
averaging on an even grid) and `image_grid_pinpoints`.

Differences of the OneVision layout from LongVA's own code, by construction (stated, not hidden):
- OneVision appends one `image_newline` token after every video; LongVA (UniRes) feeds frames only. A checkpoint
  without `model.image_newline` gets a zero vector.
- Images go through OneVision's anyres path (base view + unpadded tiles + row ends, not pooled), not LongVA's UniRes
  (every grid pooled to 144 tokens). Give images to the converted model as one-frame videos to stay close to LongVA.
- `<image>` / `<video>` get the ids 151646 / 151647 (OneVision's; unused rows of Qwen2's 152064-row embedding); the
  tokenizer, when SRC has one, gets them as special tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from .core.errors import VTPruneError

LM_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
    "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id",
    "initializer_range",
)
CLIP_L_336 = dict(  # openai/clip-vit-large-patch14-336, vision part
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
PREFIXES = (  # LongVA prefix -> OneVision prefix, first match wins
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_tower.", "model.vision_tower."),  # saved by transformers >= 5 (no vision_model.)
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.image_newline", "model.image_newline"),
    ("lm_head.", "lm_head."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
)
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


def onevision_key(key: str) -> str | None:
    """The OneVision name of a LongVA weight; None for buffers that are not weights (position_ids)."""
    if key.endswith("position_ids"):
        return None
    for old, new in PREFIXES:
        if key.startswith(old):
            return new + key[len(old) :]
    raise VTPruneError(f"unexpected weight {key!r} in the LongVA checkpoint (no OneVision counterpart)")


def vision_config(source: dict, vision_tower: Path | None) -> Any:
    from transformers import CLIPVisionConfig

    tower = vision_tower or source.get("mm_vision_tower")
    if tower is not None and (Path(tower) / "config.json").is_file():
        return CLIPVisionConfig.from_pretrained(str(tower))
    if isinstance(tower, str) and tower.rstrip("/").endswith("clip-vit-large-patch14-336"):
        return CLIPVisionConfig(**CLIP_L_336)
    raise VTPruneError(
        f"cannot tell the vision tower's shape from mm_vision_tower={tower!r}; pass --vision-tower with a local "
        "CLIP folder (config.json, and weights if the checkpoint lacks them)"
    )


def onevision_config(source: dict, vision_tower: Path | None) -> Any:
    """A LlavaOnevisionConfig for a LongVA config.json."""
    from transformers import LlavaOnevisionConfig, Qwen2Config

    if source.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise VTPruneError(f"mm_projector_type={source['mm_projector_type']!r}: only mlp2x_gelu maps to OneVision")
    stride, mode = source.get("mm_spatial_pool_stride", 2), source.get("mm_spatial_pool_mode", "average")
    if stride != 2 or mode != "average":
        raise VTPruneError(
            f"mm_spatial_pool_stride={stride}, mm_spatial_pool_mode={mode!r}: OneVision pools frames 2×2 by "
            "averaging only"
        )
    feature = source.get("mm_vision_select_feature", "patch")
    if feature not in ("patch", "cls_patch"):
        raise VTPruneError(f"mm_vision_select_feature={feature!r}: use 'patch' or 'cls_patch'")
    vision = vision_config(source, vision_tower)
    side = vision.image_size // vision.patch_size
    if side % 2:
        raise VTPruneError(f"a {side}×{side} patch grid is odd: OneVision's bilinear pooling is no 2×2 average there")
    text = Qwen2Config(**{k: source[k] for k in LM_FIELDS if k in source}, tie_word_embeddings=False)
    vocab = text.vocab_size
    image_id, video_id = 151646, 151647
    if video_id >= vocab:  # a small vocabulary (tests): the last two rows
        image_id, video_id = vocab - 1, vocab - 2
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=image_id, video_token_index=video_id,
        projector_hidden_act="gelu", vision_feature_layer=source.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if feature == "patch" else "full",
        image_grid_pinpoints=source.get("image_grid_pinpoints"), tie_word_embeddings=False,
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return config


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise VTPruneError(f"{folder} holds no model.safetensors or model.safetensors.index.json")


def _tower_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Vision weights of a separate CLIP checkpoint, named as in the LongVA checkpoint."""
    from safetensors.torch import load_file

    out = {}
    for shard in _shards(folder):
        for key, tensor in load_file(str(shard)).items():
            if key.startswith("vision_model."):  # a CLIPModel / CLIPVisionModel checkpoint of transformers 4
                out["model.vision_tower.vision_tower." + key] = tensor
            elif not key.startswith(("text_model.", "logit_scale", "text_projection", "visual_projection")):
                out["model.vision_tower.vision_tower." + key] = tensor  # transformers 5 names
    return out


def convert_longva(source: str | Path, target: str | Path, vision_tower: str | Path | None = None) -> Path:
    """Write a LlavaOnevisionForConditionalGeneration checkpoint for the LongVA checkpoint in `source`."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaOnevisionForConditionalGeneration

    source, target = Path(source), Path(target)
    tower = Path(vision_tower) if vision_tower is not None else None
    if not (source / "config.json").is_file():
        raise VTPruneError(f"{source} has no config.json: not a LongVA checkpoint folder")
    fields = json.loads((source / "config.json").read_text())
    config = onevision_config(fields, tower)
    with torch.device("meta"):
        expected = set(LlavaOnevisionForConditionalGeneration(config).state_dict())
    target.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}

    def write(tensors: dict[str, torch.Tensor], name: str) -> None:
        renamed = {new: t.contiguous() for key, t in tensors.items() if (new := onevision_key(key)) is not None}
        save_file(renamed, str(target / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in renamed})

    for shard in _shards(source):
        write(load_file(str(shard)), shard.name)
    added: dict[str, torch.Tensor] = {}
    if tower is not None and not any(k.startswith("model.vision_tower.") for k in weight_map):
        added.update(_tower_weights(tower))
    if "model.image_newline" not in weight_map:
        dtype = getattr(torch, str(fields.get("torch_dtype", "float32")).removeprefix("torch."))
        added["model.image_newline"] = torch.zeros(config.text_config.hidden_size, dtype=dtype)
        print("vtprune convert: the checkpoint has no model.image_newline; OneVision's video newline is zero")
    if added:
        write(added, "model-added.safetensors")
    written = set(weight_map)
    missing, unexpected = sorted(expected - written), sorted(written - expected)
    if missing or unexpected:
        raise VTPruneError(
            f"the converted weights do not fit LlavaOnevisionForConditionalGeneration: missing {missing[:8]} "
            f"(e.g. the vision tower: pass --vision-tower), unexpected {unexpected[:8]}"
        )
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    config.save_pretrained(target)
    if (source / "generation_config.json").is_file():
        shutil.copy(source / "generation_config.json", target / "generation_config.json")
    _convert_tokenizer(source, target, config)
    return target


def _convert_tokenizer(source: Path, target: Path, config: Any) -> None:
    """The source tokenizer with `<image>` and `<video>` as special tokens at the config's ids, if SRC has one."""
    if not any((source / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, VIDEO_TOKEN])
    if ids != [config.image_token_id, config.video_token_id]:
        config.image_token_id, config.video_token_id = ids
        if max(ids) >= config.text_config.vocab_size:
            raise VTPruneError(
                f"the tokenizer put <image>/<video> at {ids}, beyond the {config.text_config.vocab_size} embeddings"
            )
        config.save_pretrained(target)
    tokenizer.save_pretrained(str(target))


def run_convert(args: argparse.Namespace) -> int:
    target = convert_longva(args.source, args.target, vision_tower=args.vision_tower)
    print(f"wrote {target} (LlavaOnevisionForConditionalGeneration)")
    return 0
