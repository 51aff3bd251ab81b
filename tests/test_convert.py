"""`vtprune convert longva`: a synthetic checkpoint with LongVA's key names and config fields converts, loads as
LlavaOnevisionForConditionalGeneration and gives the logits of the same weights placed by hand."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import vtprune
from tests.helpers import PAD
from tests.helpers_video import media_batch
from vtprune.cli import main

LM = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=1024)
CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def longva_config(tower: str, **changes) -> dict:
    """The fields of a LongVA config.json (LlavaQwenForCausalLM), tiny."""
    return {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", **LM, "hidden_act": "silu",
        "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "float32",
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]],
        "mm_hidden_size": CLIP["hidden_size"], "mm_patch_merge_type": "unires", "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": "average", "mm_spatial_pool_stride": 2, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": tower, "tokenizer_model_max_length": 224000, **changes,
    }


def longva_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LongVA's names: Qwen2ForCausalLM keys, the CLIP tower under
    model.vision_tower.vision_tower.vision_model., model.mm_projector.{0,2}, model.image_newline."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    weights = dict(Qwen2ForCausalLM(Qwen2Config(**LM)).state_dict())
    tower = CLIPVisionModel(CLIPVisionConfig(**CLIP)).state_dict()
    weights.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower.items()})
    weights["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    hidden, width = LM["hidden_size"], CLIP["hidden_size"]
    weights["model.mm_projector.0.weight"] = torch.randn(hidden, width) * 0.1
    weights["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
    weights["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * 0.1
    weights["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    weights["model.image_newline"] = torch.randn(hidden)
    return {k: v.contiguous() for k, v in weights.items()}


def write_checkpoint(folder, weights, config):
    """Two safetensors shards and an index, as the LongVA release ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: weights[k] for k in names}, str(folder / name))
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from transformers import CLIPVisionConfig

    folder = tmp_path_factory.mktemp("clip")
    CLIPVisionConfig(**CLIP).save_pretrained(folder)
    return folder


def by_hand(weights):
    """A OneVision model with LongVA's weights assigned module by module."""
    from transformers import CLIPVisionConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config

    config = LlavaOnevisionConfig(
        vision_config=CLIPVisionConfig(**CLIP), text_config=Qwen2Config(**LM, tie_word_embeddings=False),
        image_token_index=99, video_token_index=98, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]], tie_word_embeddings=False,
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    inner = model.model
    tower = "model.vision_tower.vision_tower.vision_model."
    inner.language_model.load_state_dict({k[len("model.") :]: v for k, v in weights.items()
                                          if k.startswith(("model.layers", "model.embed_tokens", "model.norm"))})
    inner.vision_tower.load_state_dict({k[len(tower) :]: v for k, v in weights.items()
                                        if k.startswith(tower) and not k.endswith("position_ids")})
    with torch.no_grad():
        model.lm_head.weight.copy_(weights["lm_head.weight"])
        for index, linear in ((0, inner.multi_modal_projector.linear_1), (2, inner.multi_modal_projector.linear_2)):
            linear.weight.copy_(weights[f"model.mm_projector.{index}.weight"])
            linear.bias.copy_(weights[f"model.mm_projector.{index}.bias"])
        inner.image_newline.copy_(weights["model.image_newline"])
    return model


def test_converted_checkpoint_loads_and_matches_hand_placed_weights(tmp_path, clip_folder, capsys):
    from transformers import LlavaOnevisionForConditionalGeneration

    weights = longva_weights()
    source = write_checkpoint(tmp_path / "longva", weights, longva_config(str(clip_folder)))
    assert main(["convert", "longva", str(source), str(tmp_path / "ov")]) == 0
    assert "LlavaOnevisionForConditionalGeneration" in capsys.readouterr().out
    converted = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ov").eval()
    converted.generation_config.pad_token_id = PAD
    reference = by_hand(weights)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name
    for images, videos in (([[], []], [[3], [3]]), ([[(32, 48)], [(64, 64)]], None)):
        batch = media_batch(reference, images, videos)
        with torch.no_grad():
            torch.testing.assert_close(converted(**batch).logits, reference(**batch).logits, atol=1e-6, rtol=0)
    # the converted model is pruned by the OneVision adapter; its CLIP tower has a [CLS]: vtc-cls per frame works
    batch = media_batch(converted, [[], []], [[3], [3]])
    with torch.no_grad(), vtprune.make("vtc-cls", keep=2, start_layer=0)(converted) as trace:
        converted(**batch)
    frames = [s for s in trace.forwards[0].layout.spans[0] if s.kind == "frame"]
    assert [s.length for s in frames] == [4, 4, 5]  # 2×2 pooled frames (LongVA's 12×12 in miniature), one newline
    assert [after for _, after in trace.visual_tokens()] == [2 * 3 + 1] * 2


def test_tower_weights_from_a_separate_clip_checkpoint(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlavaOnevisionForConditionalGeneration

    weights = longva_weights()
    tower = {k: v for k, v in weights.items() if k.startswith("model.vision_tower.")}
    without = {k: v for k, v in weights.items() if k not in tower}
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP))
    clip.load_state_dict({k.split("vision_model.", 1)[1]: v for k, v in tower.items() if not k.endswith("position_ids")})
    clip.save_pretrained(tmp_path / "clip")
    source = write_checkpoint(tmp_path / "longva", without, longva_config("openai/clip-vit-large-patch14-336"))
    with pytest.raises(vtprune.VTPruneError, match="missing.*vision_tower"):
        main_convert(source, tmp_path / "no-tower")
    main_convert(source, tmp_path / "ov", "--vision-tower", str(tmp_path / "clip"))
    converted = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "ov")
    assert torch.equal(converted.model.vision_tower.embeddings.patch_embedding.weight,
                       tower["model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"])


def main_convert(source, target, *extra):
    from vtprune.commands import add_convert
    import argparse

    parser = argparse.ArgumentParser()
    add_convert(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "longva", str(source), str(target), *extra])
    return args.func(args)


def test_tokenizer_gets_image_and_video_tokens(tmp_path, clip_folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, LlavaOnevisionConfig, PreTrainedTokenizerFast

    source = write_checkpoint(tmp_path / "longva", longva_weights(), longva_config(str(clip_folder)))
    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(90)} | {"<unk>": 90}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(source)
    main_convert(source, tmp_path / "ov")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ov")
    config = LlavaOnevisionConfig.from_pretrained(tmp_path / "ov")
    assert tokenizer.convert_tokens_to_ids(["<image>", "<video>"]) == [config.image_token_id, config.video_token_id] == [91, 92]


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(mm_spatial_pool_stride=4), "pool"),
        (dict(mm_projector_type="linear"), "mlp2x_gelu"),
        (dict(mm_vision_tower="some/unknown-tower"), "vision tower"),
    ],
)
def test_unsupported_longva_configs_are_refused(tmp_path, clip_folder, changes, match):
    config = longva_config(str(clip_folder), **changes)
    source = write_checkpoint(tmp_path / "longva", {"model.norm.weight": torch.ones(64)}, config)
    with pytest.raises(vtprune.VTPruneError, match=match):
        main_convert(source, tmp_path / "ov")


def test_unknown_weight_is_refused(tmp_path, clip_folder):
    weights = longva_weights() | {"model.vision_resampler.mystery": torch.zeros(2)}
    source = write_checkpoint(tmp_path / "longva", weights, longva_config(str(clip_folder)))
    with pytest.raises(vtprune.VTPruneError, match="unexpected weight 'model.vision_resampler.mystery'"):
        main_convert(source, tmp_path / "ov")
