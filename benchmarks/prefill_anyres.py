"""Prefill of a LLaVA-NeXT-shaped model (random weights) on one anyres image: dense vs pruned at the LLM input.

    python benchmarks/prefill_anyres.py                                  # CLIP-L/336 24x1024, Vicuna-7B 32x4096
    python benchmarks/prefill_anyres.py --llm-layers 8 --llm-hidden 2048 --repeats 2     # quicker
    python benchmarks/prefill_anyres.py --vision-layers 2 --vision-hidden 64 --llm-layers 2 --llm-hidden 128 \\
        --repeats 1 --budgets 160                                        # smoke test (seconds)

The image is 672 x 672 on the pinpoint grid (672, 672): base view + 2 x 2 tiles of 336 px, 5 x 576 = 2880 patch
tokens (VisionZip's LLaVA-NeXT setting) plus 48 row ends in transformers' packing, 2928 visual tokens in all.
Rows (each a ratio to dense, fastest of `--repeats` interleaved runs; prefill = one forward, vision encoder included):
- vflowopt at N: stage V only (vit_keep = N / 2928, llm_keep1 = llm_keep2 = 1: the LLM sees about N tokens from its
  first layer, plus the recycled ones);
- visionzip at N: VisionZip's own anyres rule (every view compressed on its own: 5 views x N / 5, no row ends);
- bound: the vision encoder plus the dense language model fed the pruned length (no scoring, no hooks).
"""

from __future__ import annotations

import argparse

import torch

import vtprune
from vtprune.eval.speed import median_seconds

TEXT_TOKENS = 60
IMAGE_TOKEN = 32000


def llava_next_shaped(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden, num_hidden_layers=args.vision_layers,
        num_attention_heads=max(1, args.vision_hidden // 64), image_size=336, patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=IMAGE_TOKEN + 8, hidden_size=args.llm_hidden, intermediate_size=int(2.6875 * args.llm_hidden),
        num_hidden_layers=args.llm_layers, num_attention_heads=max(1, args.llm_hidden // 128),
        max_position_embeddings=4096,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]], attn_implementation=args.attn,
    )
    return LlavaNextForConditionalGeneration(config).eval().to(args.device, args.dtype)


def inputs_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    pixel_values = torch.randn(1, 5, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.to(model.device, model.dtype)
    image_sizes = torch.tensor([[672, 672]], device=model.device)
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output[0]
    half = TEXT_TOKENS // 2
    ids = [1] + list(range(2, 2 + half)) + [IMAGE_TOKEN] * tokens.shape[0] + list(range(2, 2 + TEXT_TOKENS - half))
    input_ids = torch.tensor([ids], device=model.device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values, "image_sizes": image_sizes}


def seconds(fn) -> float:
    return median_seconds(fn, repeats=1, warmup=0)  # synchronises CUDA around the call


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budgets", nargs="+", type=int, default=[160, 320, 640], help="visual tokens at the LLM input")
    p.add_argument("--methods", nargs="+", default=["vflowopt", "visionzip"])
    p.add_argument("--llm-layers", type=int, default=32)
    p.add_argument("--llm-hidden", type=int, default=4096)
    p.add_argument("--vision-layers", type=int, default=24)
    p.add_argument("--vision-hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"],
                   help="the model's attention implementation")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = llava_next_shaped(args)
    inputs = inputs_for(model)
    prompt, visual = inputs["input_ids"].shape[1], int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    configs: dict[str, tuple[object, int | None]] = {"dense": (None, visual)}
    refused: dict[str, str] = {}
    for name in args.methods:
        for budget in args.budgets:
            label = f"{name} {budget}"
            if name == "vflowopt":
                method = vtprune.make(name, vit_keep=budget / visual, llm_keep1=1.0, llm_keep2=1.0)
            else:
                method = vtprune.make(name, keep=budget // 5)  # per view, as VisionZip's anyres rule counts
            try:
                with torch.no_grad(), method(model) as trace:
                    model(**inputs, logits_to_keep=1)
                configs[label] = (method, trace.visual_tokens(0)[0][1])
            except vtprune.VTPruneError as error:
                refused[label] = str(error).split(";")[0]

    def prefill(method):
        def run():
            with torch.no_grad():
                if method is None:
                    model(**inputs, logits_to_keep=1)
                else:
                    with method(model):
                        model(**inputs, logits_to_keep=1)
        return run

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    width = model.config.get_text_config().hidden_size

    def bound(length: int):
        embeds = torch.randn(1, length, width, dtype=model.dtype, device=model.device)

        def run():
            with torch.no_grad():
                model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
                head(decoder(inputs_embeds=embeds).last_hidden_state[:, -1:])
        return run

    times: dict[str, list[float]] = {label: [] for label in configs}
    bounds: dict[str, list[float]] = {label: [] for label in configs if label != "dense"}
    for _ in range(args.repeats):  # interleaved: drift on a busy machine hits every configuration alike
        for label, (method, kept) in configs.items():
            times[label].append(seconds(prefill(method)))
            if label != "dense":
                bounds[label].append(seconds(bound(prompt - visual + kept)))
    dense = min(times["dense"])
    print(f"prompt {prompt} tokens, {visual} visual; dense prefill {dense:.3f} s")
    print("| config | visual tokens at the LLM input | prefill / dense | bound / dense | speedup | bound speedup |")
    print("|---|---|---|---|---|---|")
    for label, (_, kept) in configs.items():
        if label == "dense":
            continue
        ratio, free = min(times[label]) / dense, min(bounds[label]) / dense
        print(f"| {label} | {kept} | {ratio:.3f} | {free:.3f} | {1 / ratio:.2f}x | {1 / free:.2f}x |")
    for label, reason in refused.items():
        print(f"| {label} | refused: {reason} | | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
