"""GUI-KV on a 5-screenshot GUI history: cache bytes and decoding time per token vs the full cache, as ratios.

    python benchmarks/gui_kv.py                       # Qwen2.5-VL-shaped model (random weights), 5 synthetic screenshots
    python benchmarks/gui_kv.py --layers 2 --steps 8  # quicker
    python benchmarks/gui_kv.py --device cuda --dtype bfloat16 --layers 28 --hidden 3584 --heads 28 --kv-heads 4 \
        --intermediate 18944 --width 1932 --height 1092   # UI-TARS-1.5-7B shape on a GPU

The prompt is a UI-TARS-style history: instructions, then per step a screenshot and the action taken, the last
screenshot being the current one (synthetic GUI screenshots, Qwen2-VL preprocessing, 14 px patches merged 2×2). For
every budget: the prompt's cache bytes after prefill, the median time per decoded token and the prefill time (GUI-KV's
scoring included), each divided by the full-cache run measured in the same process; and the analytic decoding FLOPs
ratio (2·parameters per token for the matmuls, 4·H·d·T per layer for attention over T cached tokens) for this model
and for UI-TARS-1.5-7B (Qwen2.5-VL-7B shape) at the same prompt length. Anchor: the GUI-KV paper reports 38.9 % fewer
decoding FLOPs in its 5-screenshot AgentNetBench setting (budget and prompt length not stated in the abstract).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

import vtprune
from vtprune.agents import synthetic_episode
from vtprune.eval.speed import synchronize

VOCAB = 16384  # a small vocabulary keeps the LM head from dominating decoding time (7B: 7 % of the weights)
IMAGE, VISION_START, VISION_END, IM_START, IM_END = 16000, 16001, 16002, 16003, 16004
UI_TARS_7B = dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)


def qwen25_vl_shaped(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int) -> torch.nn.Module:
    """Qwen2.5-VL proportions (head_dim 128, M-RoPE sections 16/24/24, GQA), a small vision tower, random weights."""
    text = dict(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, attn_implementation="sdpa", tie_word_embeddings=True,
                              image_token_id=IMAGE, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None  # random weights: always decode the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def history_inputs(screens: int, size: tuple[int, int], text_tokens: int) -> dict:
    """Token ids of a UI-TARS-style history (random text ids) and the processor's pixels of synthetic screenshots."""
    _, screenshots, _ = synthetic_episode(steps=screens, size=size)
    pixels = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)(images=screenshots, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(100, IMAGE, (n,), generator=g).tolist()  # noqa: E731
    ids = [IM_START] + words(text_tokens)
    for grid in pixels["image_grid_thw"]:
        ids += [VISION_START] + [IMAGE] * int(grid.prod() // 4) + [VISION_END] + words(12)  # screenshot, then action
    ids += [IM_END, IM_START] + words(2)
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == IMAGE).long(),
        "pixel_values": pixels["pixel_values"],
        "image_grid_thw": pixels["image_grid_thw"],
    }


def timed_generate(model, inputs: dict, steps: int, method=None) -> tuple[float, float]:
    """(prefill seconds, median seconds per decoded token) of one greedy generate, timing each language-model call."""
    times, starts = [], []
    lm = model.model.language_model

    def start(*args: object) -> None:
        synchronize(model.device)
        starts.append(time.perf_counter())

    def stop(*args: object) -> None:
        synchronize(model.device)
        times.append(time.perf_counter() - starts[-1])

    pre = lm.register_forward_pre_hook(start)
    post = lm.register_forward_hook(stop)
    try:
        with torch.no_grad(), (method(model) if method is not None else torch.no_grad()):
            model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    finally:
        pre.remove()
        post.remove()
    return times[0], statistics.median(times[1:])


def prompt_cache_bytes(model, inputs: dict, method=None) -> int:
    with torch.no_grad(), (method(model) if method is not None else torch.no_grad()):
        cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def decode_flops(shape: dict, prompt: int, kept: int, steps: int) -> float:
    """Analytic FLOPs of decoding `steps` tokens from a cache of `kept` prompt entries."""
    hidden, heads, d = shape["hidden"], shape["heads"], shape["head_dim"]
    kv = shape["kv_heads"] * d
    per_layer = 2 * (hidden * heads * d + 2 * hidden * kv + heads * d * hidden + 3 * hidden * shape["intermediate"])
    linear = shape["layers"] * per_layer + 2 * hidden * shape["vocab"]
    attention = sum(4 * shape["layers"] * heads * d * (kept + t) for t in range(steps))
    return steps * linear + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--screens", type=int, default=5)
    parser.add_argument("--width", type=int, default=644, help="screenshot width in pixels (default: 23x14 tokens)")
    parser.add_argument("--height", type=int, default=392)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--text-tokens", type=int, default=200, help="instruction tokens before the history")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()

    torch.set_grad_enabled(False)
    model = qwen25_vl_shaped(args.layers, args.hidden, args.heads, args.kv_heads, args.intermediate)
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))
    inputs = history_inputs(args.screens, (args.width, args.height), args.text_tokens)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    n = inputs["input_ids"].shape[1]
    visual = int((inputs["input_ids"] == IMAGE).sum())
    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=128,
                 intermediate=args.intermediate, vocab=VOCAB)
    configs = [(None, None)] + [(b, r) for b in args.budgets for r in ("first", "expand")]
    methods = {c: None if c[0] is None else vtprune.make("gui-kv", keep=c[0], gqa_reduce=c[1]) for c in configs}

    timed_generate(model, inputs, 2)  # warm-up
    runs = {c: [] for c in configs}
    for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit every config alike
        for config in configs:
            runs[config].append(timed_generate(model, inputs, args.steps, methods[config]))
    prefill = {c: statistics.median(r[0] for r in runs[c]) for c in configs}
    decode = {c: statistics.median(r[1] for r in runs[c]) for c in configs}
    dense_prefill, dense_decode = prefill[(None, None)], decode[(None, None)]
    dense_bytes = prompt_cache_bytes(model, inputs)
    print(f"Qwen2.5-VL-shaped LM {args.layers}x{args.hidden} ({args.heads} heads, {args.kv_heads} KV heads, head_dim 128), "
          f"random weights; {args.screens} screenshots of {args.width}x{args.height} px = {visual} visual of {n} prompt "
          f"tokens; {args.steps} decoded tokens, median of {args.repeats} runs; {args.device} {args.dtype}, "
          f"CPU threads {torch.get_num_threads()}")
    print(f"full cache: {dense_bytes / 2**20:.1f} MiB, {dense_decode * 1e3:.1f} ms per decoded token, prefill "
          f"{dense_prefill:.2f} s\n")
    print("| budget | gqa_reduce | C per layer | cache bytes / full | decode time per token / full | prefill time / full "
          "| decode FLOPs / full (this model) | decode FLOPs / full (UI-TARS-1.5-7B, same n) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for budget in args.budgets:
        kept = math.floor(n * budget + 1e-9)
        flops = decode_flops(shape, n, kept, args.steps) / decode_flops(shape, n, n, args.steps)
        flops_7b = decode_flops(UI_TARS_7B, n, kept, args.steps) / decode_flops(UI_TARS_7B, n, n, args.steps)
        for reduce in ("first", "expand"):
            config = (budget, reduce)
            ratio = prompt_cache_bytes(model, inputs, methods[config]) / dense_bytes
            print(f"| {budget:.0%} | {reduce} | {kept} | {ratio:.3f} | {decode[config] / dense_decode:.3f} | "
                  f"{prefill[config] / dense_prefill:.3f} | {flops:.3f} | {flops_7b:.3f} |", flush=True)
    # prompt length at which UI-TARS-1.5-7B's analytic decoding FLOPs fall by the paper's 38.9 %
    for budget in args.budgets:
        low, high = 1, 10**7
        while low < high:
            mid = (low + high) // 2
            ratio = decode_flops(UI_TARS_7B, mid, math.floor(mid * budget), args.steps) / decode_flops(UI_TARS_7B, mid, mid, args.steps)
            low, high = (mid + 1, high) if ratio > 0.611 else (low, mid)
        print(f"UI-TARS-1.5-7B, budget {budget:.0%}: decoding FLOPs fall by 38.9 % from a prompt of ~{low} tokens "
              f"(~{(low - 1000) // args.screens} visual tokens per screenshot with 1000 text tokens)")


if __name__ == "__main__":
    main()
