"""open_clip image embeddings with patch tokens pruned inside the encoder: time and fidelity, as ratios to dense.

    python benchmarks/open_clip.py                                   # ViT-B/16, weights if they load, else random
    python benchmarks/open_clip.py --pretrained none --blocks 5 --budgets 98 --repeats 1   # quick, random weights
    python benchmarks/open_clip.py --model ViT-B-32 --pretrained laion2b_s34b_b79k

For each method, cut block k (the cut sits after block k, 0-based) and budget K (patches kept per image); ToMe merges
after every block but the last instead (an even schedule down to K), one row per budget:
- time / dense: `encode_image` with the method attached (attaching included) / dense on the same batch, timed in
  alternating pairs after one warm-up pair; the median of the per-pair ratios (robust to a shared, drifting CPU);
- FLOPs / dense: the encoder's matmul FLOPs for the tokens entering each block (blocks k+1.. on 1 + K tokens after a
  single cut) / dense: what the time could reach, its bound;
- cosine: cosine similarity of each pruned image embedding to its dense one (mean and minimum over the images);
- zero-shot agreement: share of images whose zero-shot class ("a photo of a red circle", ...) is the same pruned
  and dense; only with real weights (`--pretrained`, loaded as open_clip documents it).
Images are generated: gradient backgrounds, small distractor blobs and one coloured shape (its class), mild noise.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

# This file shares its name with the package it benchmarks: keep `import open_clip` from finding this file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

COLORS = {"red": (0.9, 0.12, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.15, 0.3, 0.9), "yellow": (0.95, 0.85, 0.1)}
SHAPES = ("circle", "square", "triangle")
METHODS = ("vtc-cls", "random", "pool", "tome")
EVERY_BLOCK = {"tome"}  # merge after every block but the last: no --blocks


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def structured_images(count: int, side: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """[count, 3, side, side] pixels in [0, 1] and each image's class ("red circle", ...)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    images, labels = [], []
    for _ in range(count):
        angle = float(rand(1)) * 2 * math.pi
        t = math.cos(angle) * x + math.sin(angle) * y
        t = (t - t.min()) / (t.max() - t.min())
        image = (0.3 + 0.5 * rand(3, 1, 1)) * (1 - t) + (0.3 + 0.5 * rand(3, 1, 1)) * t  # gradient background
        for _ in range(int(rand(1) * 4) + 2):  # distractor blobs
            cx, cy, r = float(rand(1)), float(rand(1)), 0.03 + 0.05 * float(rand(1))
            image = torch.where((x - cx) ** 2 + (y - cy) ** 2 < r * r, rand(3, 1, 1), image)
        color = list(COLORS)[int(rand(1) * len(COLORS))]
        shape = SHAPES[int(rand(1) * len(SHAPES))]
        cx, cy, r = 0.3 + 0.4 * float(rand(1)), 0.3 + 0.4 * float(rand(1)), 0.16 + 0.12 * float(rand(1))
        if shape == "circle":
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        elif shape == "square":
            mask = ((x - cx).abs() < r) & ((y - cy).abs() < r)
        else:  # apex at (cx, cy - r), base of width 2r at cy + r
            mask = (y > cy - r) & (y < cy + r) & ((x - cx).abs() < (y - cy + r) / 2)
        image = torch.where(mask, torch.tensor(COLORS[color])[:, None, None], image)
        image = (image + 0.02 * torch.randn(3, side, side, generator=g)).clamp(0, 1)
        images.append(image)
        labels.append(f"{color} {shape}")
    return torch.stack(images), labels


def load(name: str, pretrained: str, online: bool) -> tuple[torch.nn.Module, str | None]:
    """(model in eval mode, why no real weights or None). Real weights load as open_clip documents it."""
    import open_clip

    if pretrained.lower() != "none":
        try:
            model, _, _ = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            return model.eval(), None
        except Exception as error:  # noqa: BLE001 (any failure to load: say why, measure with random weights)
            why = str(error) if online else "huggingface.co is unreachable and they are not in the local cache"
            reason = f"weights {name}/{pretrained} could not be loaded: {why[:200]}"
    else:
        reason = "--pretrained none"
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval(), reason


def paired_ratio(dense: Callable[[], Any], pruned: Callable[[], Any], repeats: int) -> float:
    """Median over `repeats` alternating (dense, pruned) pairs of pruned time / dense time, after a warm-up pair."""
    from vtprune.eval.speed import median_seconds

    ratios = []
    for index in range(repeats + 1):
        dense_seconds, pruned_seconds = median_seconds(dense, 1, warmup=0), median_seconds(pruned, 1, warmup=0)
        if index:
            ratios.append(pruned_seconds / dense_seconds)
    return statistics.median(ratios)


def encoder_flops(tokens_per_block: list[int], width: int, mlp_ratio: float) -> float:
    """Matmul FLOPs of the transformer blocks for the given tokens entering each block (per image)."""
    total = 0.0
    for t in tokens_per_block:
        total += 2 * t * width * width * (4 + 2 * mlp_ratio) + 4 * t * t * width  # qkv+out, mlp; scores and mix
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name")
    parser.add_argument("--pretrained", default="openai", help="open_clip weights tag or file; 'none': random weights")
    parser.add_argument("--images", type=int, default=4, help="generated images per batch")
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 5, 8], help="cut after these blocks (0-based)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[49, 98, 147], help="patches kept per image")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    online = hub_reachable()
    if not online:  # cached weights still load; missing ones fail at once instead of after retries
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    import vtprune
    from vtprune.eval.speed import median_seconds

    torch.set_grad_enabled(False)
    model, no_weights = load(args.model, args.pretrained, online)
    tower = model.visual
    if not isinstance(tower, open_clip.transformer.VisionTransformer):
        raise SystemExit(f"{args.model} has a {type(tower).__name__} tower; this benchmark needs a ViT")
    side = tower.image_size[0]
    rows, cols = tower.grid_size
    patches, n_blocks = rows * cols, len(tower.transformer.resblocks)
    width = tower.transformer.width
    mlp_ratio = tower.transformer.resblocks[0].mlp.c_fc.out_features / width
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean = torch.tensor(preprocess["mean"])[:, None, None]
    std = torch.tensor(preprocess["std"])[:, None, None]
    raw, labels = structured_images(args.images, side)
    pixels = (raw - mean) / std

    text_features = None
    if no_weights is None:
        prompts = [f"a photo of a {color} {shape}" for color in COLORS for shape in SHAPES]
        text_features = F.normalize(model.encode_text(open_clip.get_tokenizer(args.model)(prompts)), dim=-1)
        classes = [p.removeprefix("a photo of a ") for p in prompts]

    def zero_shot(embedding: torch.Tensor) -> torch.Tensor:
        return (F.normalize(embedding, dim=-1) @ text_features.T).argmax(-1)

    dense_embedding = model.encode_image(pixels)
    dense = median_seconds(lambda: model.encode_image(pixels), args.repeats)

    def run_dense() -> torch.Tensor:
        return model.encode_image(pixels)
    weights = "random weights" if no_weights else f"weights {args.pretrained}"
    print(f"open_clip {args.model} ({weights}), {args.images} generated {side} px images, {patches} patches + [CLS], "
          f"{n_blocks} blocks, CPU threads: {torch.get_num_threads()}")
    if no_weights:
        print(f"zero-shot agreement: n/a, no real weights ({no_weights}); cosines with random weights say how much "
              "the embedding moves, not which tokens matter")
    else:
        accuracy = sum(classes[int(i)] == label for i, label in zip(zero_shot(dense_embedding), labels)) / len(labels)
        print(f"dense zero-shot accuracy on the generated images: {accuracy:.0%} ({len(classes)} classes)")
    print(f"dense encode_image {dense:.3f} s per batch (median of {args.repeats}); time ratios below pair each pruned "
          "run with a dense run next to it\n")
    print("| method | cut after block | kept | time / dense | FLOPs / dense | cosine mean | cosine min | zero-shot agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    dense_flops = encoder_flops([1 + patches] * n_blocks, width, mlp_ratio)

    def row(name: str, where: str, method: Any) -> None:
        def run_pruned() -> torch.Tensor:
            with method(model):
                return model.encode_image(pixels)

        entering: list[int] = []  # tokens per image entering each block

        def count(module: torch.nn.Module, inputs: tuple) -> None:
            entering.append(inputs[0].shape[1 if tower.transformer.batch_first else 0])

        handles = [block.register_forward_pre_hook(count) for block in tower.transformer.resblocks]
        with method(model) as trace:
            embedding = model.encode_image(pixels)
        for handle in handles:
            handle.remove()
        kept = trace.visual_tokens()[0][1]
        ratio = paired_ratio(run_dense, run_pruned, args.repeats)
        flops = encoder_flops(entering, width, mlp_ratio)
        cosine = F.cosine_similarity(embedding, dense_embedding, dim=-1)
        agreement = "n/a"
        if text_features is not None:
            agreement = f"{(zero_shot(embedding) == zero_shot(dense_embedding)).float().mean():.0%}"
        print(f"| {name} | {where} | {kept} | {ratio:.3f} | {flops / dense_flops:.3f} | "
              f"{cosine.mean():.4f} | {cosine.min():.4f} | {agreement} |", flush=True)

    for block in args.blocks:
        for keep in args.budgets:
            for name in args.methods:
                if name not in EVERY_BLOCK:
                    row(name, str(block), vtprune.make(name, keep=keep, encoder_block=block))
    for name in [n for n in args.methods if n in EVERY_BLOCK]:
        for keep in args.budgets:
            row(name, f"every, 0..{n_blocks - 2}", vtprune.make(name, keep=keep))


if __name__ == "__main__":
    main()
