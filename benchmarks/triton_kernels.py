"""Compaction kernels on a CUDA GPU: Triton against a plain device copy and against the chained torch path.

    python benchmarks/triton_kernels.py           # LLaVA-7B-sized KV cache and hidden states: a markdown table
    python benchmarks/triton_kernels.py --e2e     # also a pruned prefill of a LLaVA-1.5-7B-shaped model (random weights)

Cache rows gather K and V of every layer ([B, H, L, d] each) to the kept tokens; hidden rows gather hidden states
[B, L, D] with positions and mask. "moved" counts bytes read plus bytes written (2 x the output); the copy_ reference
copies the same number of bytes in one `Tensor.copy_`. Times are medians of CUDA-event timings after warm-up, with the
L2 cache flushed before each run. Every Triton result is first checked bitwise against the torch path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import Tensor

from vtprune import kernels

MiB = 1 << 20
DEVICE = "cuda"


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn() on the current CUDA stream, L2 flushed before each timed run."""
    flush = torch.empty(256 * MiB, dtype=torch.uint8, device=DEVICE)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def keep_lists(batch: int, tokens: int, keep: float) -> tuple[Tensor, Tensor]:
    """index, valid [B, L'] for random sorted keep lists of about keep * tokens (ragged: sample b keeps 8b fewer)."""
    keep_counts = [max(0, round(keep * tokens) - 8 * b) for b in range(batch)]
    lists = [torch.randperm(tokens)[:n].sort().values for n in keep_counts]
    return kernels.left_padded_index(lists, DEVICE)


def same_bits(a: list[Tensor], b: list[Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def row(op: str, tokens: int, kept: int, moved: int, t_triton: float, t_copy: float, t_torch: float, same: bool) -> str:
    """One table row; moved: bytes read + written."""

    def gbs(ms: float) -> float:
        return moved / (ms * 1e-3) / 1e9

    return (
        f"| {op} | {tokens} | {kept} | {moved / MiB:.0f} | {t_triton:.3f} | {gbs(t_triton):.0f} | {gbs(t_copy):.0f} | "
        f"{100 * t_copy / t_triton:.0f} % | {t_torch:.3f} | {t_torch / t_triton:.1f}x | {'yes' if same else 'NO'} |"
    )


def copy_ms(moved: int, args: argparse.Namespace) -> float:
    """The plain device copy of moved / 2 bytes (moved counts the read and the write)."""
    src = torch.empty(moved // 2, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), args.warmup, args.iters)


def measure(label: str, tokens: int, kept: int, run: Callable[[str], list[Tensor]], args: argparse.Namespace) -> str:
    """run(backend) -> the op's outputs. Checks Triton bitwise against torch, then times Triton, torch and copy_."""
    triton = run("triton")
    same = same_bits(triton, run("torch"))
    moved = 2 * sum(x.numel() * x.element_size() for x in triton)
    del triton
    t_triton = median_ms(lambda: run("triton"), args.warmup, args.iters)
    t_torch = median_ms(lambda: run("torch"), args.warmup, args.iters)
    return row(label, tokens, kept, moved, t_triton, copy_ms(moved, args), t_torch, same)


def cache_row(tokens: int, args: argparse.Namespace) -> str:
    shape = (args.batch, args.heads, tokens, args.head_dim)
    layers = [(torch.randn(shape, device=DEVICE).bfloat16(), torch.randn(shape, device=DEVICE).bfloat16())
              for _ in range(args.layers)]
    index, valid = keep_lists(args.batch, tokens, args.keep)

    def run(backend: str) -> list[Tensor]:
        return [x for pair in kernels.compact_cache(layers, index, valid, backend=backend) for x in pair]

    return measure(f"KV cache, {args.layers} layers", tokens, index.shape[1], run, args)


def hidden_row(tokens: int, args: argparse.Namespace) -> str:
    hidden = torch.randn(args.batch, tokens, args.hidden, device=DEVICE).bfloat16()
    positions = torch.arange(tokens, device=DEVICE).expand(args.batch, tokens)  # as the adapter passes them
    mask = torch.ones(args.batch, tokens, dtype=torch.long, device=DEVICE)
    index, valid = keep_lists(args.batch, tokens, args.keep)

    def run(backend: str) -> list[Tensor]:
        return list(kernels.compact_sequence(hidden, positions, mask, index, valid, backend=backend))

    return measure("hidden + positions + mask", tokens, index.shape[1], run, args)


# ---------------------------------------------------------------------------------------------------- --e2e
def llava_7b_config(text_layers: int):
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 px (576 patches), a Llama-7B language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def llava_inputs(config, batch: int, text_tokens: int, device: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """One image per sample: up to 8 text tokens, the image tokens, then the rest of the text."""
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    ids = torch.randint(1, config.text_config.vocab_size - 64, (batch, text_tokens + patches), device=device)
    start = min(8, text_tokens)
    ids[:, start : start + patches] = config.image_token_id
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device, dtype=dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def prefill_table(
    model, inputs: dict[str, Tensor], keep: int, timer: Callable[[Callable[[], object]], float]
) -> list[str]:
    """Dense prefill, then FastV (cut before layer 2) with the torch kernels and with the Triton kernels."""
    import vtprune

    lines = ["| prefill | visual tokens after the cut | ms | vs dense |", "|---|---|---:|---:|"]
    with torch.inference_mode():
        dense = timer(lambda: model(**inputs, logits_to_keep=1))
        visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
        lines.append(f"| dense | {visual} | {dense:.1f} | 1.00 |")
        logits, before = {}, os.environ.get("VTPRUNE_KERNELS")
        for backend in ("torch", "triton"):
            os.environ["VTPRUNE_KERNELS"] = backend  # the adapter calls the kernels without a backend argument
            try:
                with vtprune.make("fastv", keep=keep)(model) as trace:
                    ms = timer(lambda: model(**inputs, logits_to_keep=1))
                    logits[backend] = model(**inputs, logits_to_keep=1).logits
            finally:
                os.environ.pop("VTPRUNE_KERNELS")
                if before is not None:
                    os.environ["VTPRUNE_KERNELS"] = before
            after = trace.visual_tokens()[0][1]
            lines.append(f"| fastv keep={keep}, {backend} kernels | {after} | {ms:.1f} | {ms / dense:.2f} |")
    same = torch.equal(logits["torch"], logits["triton"])
    lines.append(f"\nlogits of the two pruned runs bitwise equal: {'yes' if same else 'NO'}")
    return lines


def e2e(args: argparse.Namespace) -> list[str]:
    from transformers import LlavaForConditionalGeneration

    config = llava_7b_config(args.e2e_layers)
    with torch.device(DEVICE):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    inputs = llava_inputs(config, args.e2e_batch, args.e2e_text, DEVICE, torch.bfloat16)
    header = (f"\nPrefill of a LLaVA-1.5-7B-shaped model with random weights ({args.e2e_layers} decoder layers, bf16, "
              f"batch {args.e2e_batch}, {inputs['input_ids'].shape[1]} tokens per sample):\n")
    return [header, *prefill_table(model, inputs, args.e2e_keep, lambda fn: median_ms(fn, args.warmup, args.e2e_iters))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192], help="sequence lengths L")
    parser.add_argument("--keep", type=float, default=0.25, help="fraction of the tokens kept")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--e2e", action="store_true", help="also time a pruned prefill of a LLaVA-shaped model")
    parser.add_argument("--e2e-layers", type=int, default=32, help="decoder layers of the e2e model")
    parser.add_argument("--e2e-batch", type=int, default=4)
    parser.add_argument("--e2e-text", type=int, default=64, help="text tokens per sample besides the 576 image tokens")
    parser.add_argument("--e2e-keep", type=int, default=64, help="visual tokens FastV keeps per image")
    parser.add_argument("--e2e-iters", type=int, default=10)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        sys.exit("benchmarks/triton_kernels.py needs a CUDA GPU, and torch sees none: nothing was measured.")
    if "compact_cache" not in kernels._TRITON_OPS:
        sys.exit("benchmarks/triton_kernels.py needs triton (pip install 'vtprune[triton]'): nothing was measured.")
    if kernels.triton_ops.interpreting():
        sys.exit("TRITON_INTERPRET is set: unset it to benchmark the compiled kernels.")

    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, batch {args.batch}, keep {args.keep:.0%}; "
          f"cache {args.layers} layers x K,V x [{args.batch}, {args.heads}, L, {args.head_dim}], hidden {args.hidden}\n")
    print("| op | L | L' kept | MiB moved | Triton ms | Triton GB/s | copy_ GB/s | Triton / copy_ speed "
          "| torch ms | torch / Triton time | bitwise = torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|")
    for tokens in args.tokens:
        print(cache_row(tokens, args), flush=True)
        torch.cuda.empty_cache()
    for tokens in args.tokens:
        print(hidden_row(tokens, args), flush=True)
    if args.e2e:
        print("\n".join(e2e(args)))


if __name__ == "__main__":
    main()
