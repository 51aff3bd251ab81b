"""Prefill of a 64-frame video on a LLaVA-OneVision-shaped model: pruned vs dense time and memory, as ratios.

    python benchmarks/video.py                  # 64 frames of 8×8 tokens, thin SigLIP-shaped tower, Qwen2-shaped LM
    python benchmarks/video.py --sharpen 64     # LM attention logits x64: peaked attention (~50 % important at τ=0.975)
    python benchmarks/video.py --frames 16 --repeats 1      # quicker

The video (moving squares) is written to a temporary file, read back with `vtprune.video.load` (decord, frames
sampled uniformly) and normalised as SigLIP expects. The model is LLaVA-OneVision in structure (SigLIP tower without
[CLS], 2-layer projector, frames pooled bilinearly to half size, one newline per video, Qwen2 LM with GQA), sized for
a CPU: the tower is thin (it costs the same with and without pruning) and the language model sees 4097 visual tokens. For each method: prefill time / dense (median over --repeats of the ratio of a pruned and a dense prefill run back to
back, so the drifting load of a shared machine weighs on both alike), the peak memory the prefill adds /
dense's (each measured in a fresh process), the KV cache / dense's, and the visual tokens kept (ZipVL: the mean share
of important tokens over layers and the share of attention FLOPs it skips, 1 - mean(p/n)^2).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import vtprune
from vtprune.eval.measure import cache_bytes
from vtprune.eval.memory import peak_memory_bytes
from vtprune.eval.speed import paired_ratio, prefill, prefill_seconds

METHODS = [  # (name, options)
    ("random", dict(keep=0.25)),
    ("pool", dict(keep=0.25)),
    ("fastv", dict(keep=0.25, layer=2)),
    ("zipvl", dict(keep=0.975, kv_mode="drop")),
    ("zipvl", dict(keep=0.975, kv_mode="quant")),
    ("zipvl", dict(keep=0.96, kv_mode="drop")),
]
VIDEO_TOKEN, VOCAB, TEXT = 31999, 32000, 16


def onevision_shaped(args: argparse.Namespace):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        image_size=args.image_size, patch_size=14, hidden_size=192, intermediate_size=768, num_hidden_layers=2,
        num_attention_heads=3,
    )
    text = Qwen2Config(
        vocab_size=VOCAB, hidden_size=args.llm_hidden, intermediate_size=3 * args.llm_hidden,
        num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_hidden // 64, num_key_value_heads=2,
        max_position_embeddings=32768, tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=VIDEO_TOKEN - 1, video_token_index=VIDEO_TOKEN,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    if args.sharpen != 1.0:
        with torch.no_grad():
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(args.sharpen**0.5)
                    proj.bias.mul_(args.sharpen**0.5)
    return model


def write_video(path: Path, frames: int, side: int = 240) -> Path:
    """Moving squares on a gradient, lossless (FFV1)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        grid = np.linspace(0, 255, side, dtype=np.float32)
        for index in range(frames):
            image = np.stack([np.add.outer(grid, grid) / 2, np.outer(grid, np.ones(side)), np.full((side, side), 90.0)], -1)
            x, y = (7 * index) % (side - 60), (11 * index) % (side - 60)
            image[y : y + 60, x : x + 60] = (255, 40, 40)
            frame = av.VideoFrame.from_ndarray(image.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_inputs(model, path: Path, frames: int) -> dict:
    side = model.config.vision_config.image_size
    video = vtprune.video.load(path, num_frames=frames, as_array=True)
    pixels = torch.from_numpy(video.frames).permute(0, 3, 1, 2).float() / 255
    pixels = torch.nn.functional.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True)
    pixels = (pixels - 0.5) / 0.5  # SigLIP normalisation
    pooled = math.ceil(side // 14 / 2) ** 2  # frames are pooled to half size, rounded up
    ids = [1] + [500] * (TEXT - 1) + [VIDEO_TOKEN] * (frames * pooled + 1) + [600] * TEXT
    return {"input_ids": torch.tensor([ids]), "pixel_values_videos": pixels[None]}


def method_of(index: int):
    if index < 0:
        return None
    name, options = METHODS[index]
    return vtprune.make(name, **options)


def label(index: int) -> str:
    name, options = METHODS[index]
    return f"{name} " + ", ".join(f"{k}={v}" for k, v in options.items())


def measure_memory(args: argparse.Namespace) -> None:
    """In a fresh process: the peak memory one prefill adds (printed as JSON)."""
    torch.set_grad_enabled(False)
    model = onevision_shaped(args)
    inputs = video_inputs(model, Path(args.video), args.frames)
    method = method_of(args.memory_of)

    def run() -> None:
        with method(model) if method is not None else torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)

    print(json.dumps({"peak": peak_memory_bytes(run)}))


def memory_in_fresh_process(args: argparse.Namespace, index: int) -> int:
    command = [sys.executable, __file__, "--memory-of", str(index), "--video", args.video]
    for name in ("frames", "image_size", "llm_hidden", "llm_layers", "sharpen"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def kv_and_tokens(model, inputs, method) -> tuple[int, str]:
    if method is None:
        return cache_bytes(model(**inputs, use_cache=True, logits_to_keep=1).cache), ""
    with method(model) as trace:
        cache = model(**inputs, use_cache=True, logits_to_keep=1).cache
    record = trace.forwards[0]
    if method.name == "zipvl":
        shares = [site.notes["important"] / site.notes["tokens"] for site in record.sites]
        share = float(np.mean(shares))
        return cache_bytes(cache), f"important {share:.1%} of tokens (attn FLOPs -{1 - float(np.mean(np.square(shares))):.0%})"
    before, after = trace.visual_tokens(0)[0]
    return cache_bytes(cache), f"{after} of {before} visual"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="tower input side (14 px patches)")
    parser.add_argument("--llm-hidden", type=int, default=384, help="LM width (64-wide heads, 2 KV heads)")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--sharpen", type=float, default=1.0, help="scale of the LM's attention logits")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--video", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of is not None:
        measure_memory(args)
        return

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        args.video = str(write_video(Path(folder) / "moving.mkv", args.frames))
        model = onevision_shaped(args)
        inputs = video_inputs(model, Path(args.video), args.frames)
        tokens = inputs["input_ids"].shape[1]
        params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
        dense_time = prefill_seconds(model, inputs, repeats=args.repeats)
        dense_memory = memory_in_fresh_process(args, -1)
        dense_kv, _ = kv_and_tokens(model, inputs, None)
        print(f"LLaVA-OneVision-shaped, random weights: SigLIP-shaped tower {args.image_size} px, Qwen2 LM "
              f"{args.llm_layers}x{args.llm_hidden} ({params:.0f}M params), attention logits x{args.sharpen:g}; "
              f"{args.frames} frames read with decord -> {tokens} prompt tokens; CPU threads {torch.get_num_threads()}")
        print(f"dense prefill {dense_time:.2f} s, adds {dense_memory / 2**20:.0f} MiB peak, KV cache "
              f"{dense_kv / 2**20:.1f} MiB; ratios below are to dense\n")
        print("| method | prefill time | peak memory | KV cache | kept |")
        print("| --- | --- | --- | --- | --- |")
        for index in range(len(METHODS)):
            method = method_of(index)
            time_ratio = paired_ratio(prefill(model, inputs), prefill(model, inputs, method), args.repeats)
            memory = memory_in_fresh_process(args, index)
            kv, kept = kv_and_tokens(model, inputs, method)
            print(f"| {label(index)} | {time_ratio:.3f} | {memory / dense_memory:.3f} | "
                  f"{kv / dense_kv:.3f} | {kept} |", flush=True)


if __name__ == "__main__":
    main()
