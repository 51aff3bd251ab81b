"""Prefill time of dense vs pruned LLaVA-1.5-shaped models, as ratios measured in the same run.

    python benchmarks/prefill.py                      # CLIP-L/336 tower, 576 visual tokens, Llama LM (random weights)
    python benchmarks/prefill.py --llm-layers 4 --repeats 2   # quicker

For each method and budget: pruned prefill / dense prefill, and the overhead-free bound: the vision tower plus the dense
language model fed a sequence of the pruned length (no scoring, no hooks) / dense prefill. Progressive methods (budgets
given by presets) cut at several layers, so they have no single pruned length: their rows show the visual tokens at
the LLM input and after the last cut, and the language model's FLOPs (all tokens, per-layer counts) against dense.
"""

from __future__ import annotations

import argparse

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vtprune
from vtprune.eval.flops import llm_flops, visual_tokens_per_layer
from vtprune.eval.speed import median_seconds, prefill_seconds

METHODS = {  # name -> options besides keep
    "vtc-cls": {},
    "fastv": {"layer": 2},
    "random": {},
    "pool": {},
    "visionzip": {},
}
PRESETS = {  # methods budgeted by presets (progressive, per-layer counts): name -> presets
    "transprune": ["high", "low"],
    "vflowopt": ["keep10", "keep25", "keep50"],
}


def llava15_shaped(llm_hidden: int, llm_layers: int) -> LlavaForConditionalGeneration:
    """CLIP-L/336 tower (24 layers, 1024 wide, 577 tokens) and a Llama LM, random weights, SDPA."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
        patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=llm_hidden, intermediate_size=int(llm_hidden * 2.6875) // 64 * 64,
        num_hidden_layers=llm_layers, num_attention_heads=llm_hidden // 128, num_key_value_heads=llm_hidden // 128,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm-hidden", type=int, default=2048)
    parser.add_argument("--llm-layers", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, default=60, help="prompt text around the image")
    parser.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *PRESETS])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = llava15_shaped(args.llm_hidden, args.llm_layers)
    before = args.text_tokens // 2
    ids = [1] + [500] * (before - 1) + [32000] * 576 + [600] * (args.text_tokens - before)
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, 336, 336)}
    lm, head = model.model.language_model, model.lm_head

    dense = prefill_seconds(model, inputs, repeats=args.repeats)
    vision = median_seconds(lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"]), args.repeats)

    def short_llm(length: int) -> float:
        embeds = torch.randn(1, length, args.llm_hidden)
        return median_seconds(lambda: head(lm(inputs_embeds=embeds).last_hidden_state[:, -1:]), args.repeats)

    params = sum(p.numel() for p in lm.parameters()) / 1e6
    print(f"LLaVA-1.5-shaped: CLIP-L/336 tower, Llama {args.llm_layers}x{args.llm_hidden} ({params:.0f}M params), "
          f"{len(ids)} prompt tokens (576 visual), random weights, CPU threads: {torch.get_num_threads()}")
    print(f"dense prefill {dense:.3f} s (vision tower {vision / dense:.0%} of it); ratios below are to dense\n")
    hidden, intermediate = lm.config.hidden_size, lm.config.intermediate_size
    dense_flops = llm_flops([len(ids)] * args.llm_layers, hidden, intermediate)

    def traced(method: vtprune.Method) -> vtprune.Trace:
        with method(model) as trace:
            model(**inputs, use_cache=True, logits_to_keep=1)
        return trace

    def flops_ratio(trace: vtprune.Trace) -> float:
        visual = visual_tokens_per_layer(trace, args.llm_layers)
        return llm_flops([len(ids) - 576 + n for n in visual], hidden, intermediate) / dense_flops

    print("| method | budget | visual tokens | prefill / dense | bound / dense | overhead (prefill / bound) "
          "| LLM FLOPs / dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for keep in args.budgets:
        bound = vision + short_llm(args.text_tokens + keep)
        for name in [n for n in args.methods if n in METHODS]:
            method = vtprune.make(name, keep=keep, **METHODS[name])
            pruned = prefill_seconds(model, inputs, method, repeats=args.repeats)
            print(f"| {name} | keep={keep} | {keep} | {pruned / dense:.3f} | {bound / dense:.3f} "
                  f"| {pruned / bound:.3f} | {flops_ratio(traced(method)):.3f} |", flush=True)
    for name in [n for n in args.methods if n in PRESETS]:
        for preset in PRESETS[name]:
            method = vtprune.make(name, preset=preset)
            trace = traced(method)
            tokens = " -> ".join(str(n) for n in trace.visual_tokens()[0])
            pruned = prefill_seconds(model, inputs, method, repeats=args.repeats)
            print(f"| {name} | {preset} | {tokens} | {pruned / dense:.3f} | – | – | {flops_ratio(trace):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
