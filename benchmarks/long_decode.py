"""Long generation with the decode-time KV-cache policies and GUI-KV: cache bytes and decoding time vs dense.

    python benchmarks/long_decode.py --threads 1                       # both parts, default shapes: README's tables
    python benchmarks/long_decode.py --part a --new-tokens 128 --repeats 1          # quicker
    python benchmarks/long_decode.py --budgets 64 256 --methods a2sf:alpha=0.5 ems  # other budgets / options
    python benchmarks/long_decode.py --llm-layers 32 --llm-hidden 4096 --vision-layers 24 --vision-hidden 1024 \
        --device cuda --dtype bfloat16                                 # LLaVA-1.5-7B's full shape on a GPU
    python benchmarks/long_decode.py --out out/long_decode             # also writes long_decode.md/.csv/.json

Part A: a LLaVA-1.5-shaped model with random weights (`vtprune.eval.shapes.llava15_shaped`, the shape of `vtprune
bench`: CLIP-L/336 tower, 576 visual tokens, Llama LM, scaled by --llm-layers/--llm-hidden/--vision-layers/
--vision-hidden), one image and a short question, `generate(max_new_tokens=--new-tokens)` with eos disabled (always
that many tokens), for the dense model and for every method of --methods at every --budgets value (cache entries per
head and layer; a ratio is of the prompt). StreamingLLM, Scissorhands, A2SF and EMS keep their budget while decoding;
GUI-KV compresses the prompt once after prefill and the cache then grows by one entry per token.
Part B: a 5-step GUI episode on the Qwen2.5-VL-shaped model of benchmarks/gui_kv.py (its builder and prompt: step t
sees the first t synthetic screenshots and the actions taken, a fresh prefill every step as vtprune.agents.run_step
does), --gui-new-tokens tokens per step. A method the model refuses gets its one-line reason in the table.

Per row, each a ratio to dense measured in the same run (repeats interleaved, the fastest run of each row):
- peak KV cache: the largest cache (keys + values of every layer, the tensors' bytes) read after any forward of the
  generate (a forward hook on the model: the prefill and every decode step). The evicting policies append the new
  token before evicting, so inside a step a layer briefly holds one entry more than what is read here;
- decode time per token: (generate time - TTFT) / (new tokens - 1), TTFT being the time to the end of the first
  forward (vision encoder and prefill, the method's prefill scoring included); the hook's own time is subtracted;
- final cache length per layer (entries per head after the last forward; the last token generated is never fed, so
  dense holds prompt + new tokens - 1).
The dense row shows absolute values. On a loaded CPU prefer --threads 1: decoding runs many tiny ops, and with two
threads on two busy cores a default-shape Part A had not finished its first repeat after 10 minutes (one thread: both parts in
208 s).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune.core import make_at, parse_budget, parse_method_spec
from vtprune.eval.shapes import llava15_inputs, llava15_shaped
from vtprune.eval.speed import synchronize

KV_METHODS = ["streamingllm", "scissorhands", "a2sf", "ems", "gui-kv"]
GUI_METHODS = [*KV_METHODS, "streamingllm:key_positions=original"]  # M-RoPE: the pos-shift default is refused


def gui_kv_benchmark() -> Any:
    """benchmarks/gui_kv.py as a module (its Qwen2.5-VL-shaped builder and GUI-history prompt)."""
    spec = importlib.util.spec_from_file_location("gui_kv_benchmark", Path(__file__).with_name("gui_kv.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_state(cache: Any) -> tuple[int, list[int]]:
    """(bytes of every layer's keys and values, entries per head of each layer)."""
    layers = cache.layers
    size = sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))
    return size, [int(layer.keys.shape[-2]) for layer in layers]


@dataclass
class Run:
    ttft: float  # seconds to the end of the first forward
    decode_per_token: float  # seconds per token after the first
    peak_bytes: int
    peak_lengths: list[int]  # per layer, the largest length read after any forward
    final_lengths: list[int]
    forwards: int


def measured_generate(model: torch.nn.Module, inputs: dict, new_tokens: int, method: Any = None) -> Run:
    """One greedy generate of exactly `new_tokens` tokens, reading the cache after every forward of the model."""
    device = next(model.parameters()).device
    ends: list[float] = []
    peak = [0, []]
    lengths: list[list[int]] = []
    spent = [0.0]  # seconds spent inside the hook, taken out of the timings

    def after_forward(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        synchronize(device)
        now = time.perf_counter()
        cache = getattr(output, "cache", None) or kwargs.get("cache") or kwargs.get("past_key_values")
        size, layer_lengths = cache_state(cache)
        lengths.append(layer_lengths)
        if size > peak[0]:
            peak[0] = size
        ends.append(now - spent[0])
        spent[0] += time.perf_counter() - now

    handle = model.register_forward_hook(after_forward, with_kwargs=True)
    try:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), (method(model) if method is not None else nullcontext()):
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        handle.remove()
    ttft = ends[0] - start
    per_token = (ends[-1] - ends[0]) / max(1, new_tokens - 1)
    peak_lengths = [max(column) for column in zip(*lengths)]
    return Run(ttft, per_token, peak[0], peak_lengths, lengths[-1], len(ends))


@dataclass
class Row:
    part: str  # "A" or "B step t"
    method: str
    keep: Any
    prompt: int
    refused: str | None = None
    peak_bytes: float | None = None  # bytes for dense, ratio to dense otherwise (as the two times)
    decode_per_token: float | None = None
    ttft: float | None = None
    peak_lengths: list[int] = field(default_factory=list)
    final_lengths: list[int] = field(default_factory=list)


def method_grid(specs: list[str], budgets: list[Any]) -> list[tuple[str, Any, Any]]:
    """(label, keep, method or the refusal text) per method spec and budget."""
    grid = []
    for spec in specs:
        name, options = parse_method_spec(spec)
        label = spec if options else name
        for keep in [options.pop("keep")] if "keep" in options else budgets:
            grid.append((label, keep, make_at(name, keep, **options)))
    return grid


def bench_prompt(model, inputs: dict, grid: list, args: argparse.Namespace, part: str, new_tokens: int) -> list[Row]:
    """Dense and every grid cell on one prompt, `args.repeats` interleaved runs each; the fastest run per row."""
    prompt = int(inputs["input_ids"].shape[1])
    rows, configs = [Row(part, "dense", None, prompt)], [None]
    for label, keep, method in grid:
        row = Row(part, label, keep, prompt)
        try:  # a short generate: warm-up, and what the model refuses
            measured_generate(model, inputs, 2, method)
        except vtprune.VTPruneError as error:
            row.refused = " ".join(str(error).split())
            method = None
        rows.append(row)
        configs.append(method)
    measured_generate(model, inputs, 2)  # dense warm-up
    runs: list[list[Run]] = [[] for _ in rows]
    for repeat in range(args.repeats):  # interleaved: load changes on a shared machine hit every row alike
        for i, (row, method) in enumerate(zip(rows, configs)):
            if row.refused is None:
                runs[i].append(measured_generate(model, inputs, new_tokens, method))
        print(f"part {part}: repeat {repeat + 1} of {args.repeats} done", file=sys.stderr, flush=True)
    dense = min(runs[0], key=lambda r: r.decode_per_token)
    for row, row_runs in zip(rows, runs):
        if not row_runs:
            continue
        best = min(row_runs, key=lambda r: r.decode_per_token)
        row.peak_lengths, row.final_lengths = best.peak_lengths, best.final_lengths
        if row.method == "dense":
            row.peak_bytes, row.decode_per_token, row.ttft = best.peak_bytes, best.decode_per_token, best.ttft
        else:
            row.peak_bytes = best.peak_bytes / dense.peak_bytes
            row.decode_per_token = best.decode_per_token / dense.decode_per_token
            row.ttft = min(r.ttft for r in row_runs) / min(r.ttft for r in runs[0])
    return rows


def lengths_text(lengths: list[int]) -> str:
    return "—" if not lengths else str(lengths[0]) if len(set(lengths)) == 1 else "/".join(map(str, lengths))


def markdown(rows: list[Row]) -> str:
    lines = ["| part | method | keep | prompt | peak KV cache | decode time / token | TTFT | peak entries per layer "
             "| final entries per layer |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r.refused is not None:
            cells = [r.part, r.method, str(r.keep), str(r.prompt), f"refused: {r.refused}", "", "", "", ""]
        elif r.method == "dense":
            cells = [r.part, "dense", "—", str(r.prompt), f"{r.peak_bytes / 2**20:.2f} MiB",
                     f"{r.decode_per_token * 1e3:.1f} ms", f"{r.ttft:.3f} s", lengths_text(r.peak_lengths),
                     lengths_text(r.final_lengths)]
        else:
            cells = [r.part, r.method, str(r.keep), str(r.prompt), f"{r.peak_bytes:.3f}", f"{r.decode_per_token:.3f}",
                     f"{r.ttft:.3f}", lengths_text(r.peak_lengths), lengths_text(r.final_lengths)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def part_a(args: argparse.Namespace) -> tuple[list[Row], str]:
    model = llava15_shaped(args.llm_hidden, args.llm_layers, args.vision_hidden, args.vision_layers)
    model = model.to(args.device, args.dtype)
    inputs = {k: v.to(args.device) for k, v in llava15_inputs(args.text_tokens).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(args.dtype)
    rows = bench_prompt(model, inputs, method_grid(args.methods, args.budgets), args, "A", args.new_tokens)
    text = model.config.text_config
    about = (f"Part A: LLaVA-1.5-shaped, CLIP tower {args.vision_layers}x{args.vision_hidden}, Llama LM "
             f"{text.num_hidden_layers}x{text.hidden_size} ({text.num_attention_heads} heads), random weights; 576 "
             f"visual of {rows[0].prompt} prompt tokens; {args.new_tokens} new tokens")
    return rows, about


def part_b(args: argparse.Namespace) -> tuple[list[Row], str]:
    gui = gui_kv_benchmark()
    model = gui.qwen25_vl_shaped(args.gui_layers, args.gui_hidden, args.gui_heads, args.gui_kv_heads,
                                 args.gui_intermediate).to(args.device, args.dtype)
    grid = method_grid(args.gui_methods, args.budgets)
    rows = []
    for step in range(1, args.gui_steps + 1):  # step t: the first t screenshots, a fresh prefill
        inputs = {k: v.to(args.device) for k, v in gui.history_inputs(step, (args.width, args.height),
                                                                       args.gui_text_tokens).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(args.dtype)
        rows += bench_prompt(model, inputs, grid, args, f"B step {step}", args.gui_new_tokens)
    about = (f"Part B: Qwen2.5-VL-shaped LM {args.gui_layers}x{args.gui_hidden} ({args.gui_heads} heads, "
             f"{args.gui_kv_heads} KV heads), random weights; step t: t synthetic screenshots of {args.width}x"
             f"{args.height} px + {args.gui_text_tokens} instruction tokens; {args.gui_new_tokens} new tokens per step")
    return rows, about


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["a", "b", "both"], default="both")
    p.add_argument("--methods", nargs="+", default=KV_METHODS, help="part A: method specs (name:option=value,...)")
    p.add_argument("--gui-methods", nargs="+", default=GUI_METHODS, help="part B: method specs")
    p.add_argument("--budgets", nargs="+", type=parse_budget, default=[128],
                   help="cache entries per head and layer (an int) or a ratio of the prompt")
    p.add_argument("--new-tokens", type=int, default=512, help="part A: tokens generated")
    p.add_argument("--text-tokens", type=int, default=32, help="part A: text tokens around the image")
    p.add_argument("--llm-layers", type=int, default=4)
    p.add_argument("--llm-hidden", type=int, default=512)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--gui-steps", type=int, default=5)
    p.add_argument("--gui-new-tokens", type=int, default=64, help="part B: tokens generated per step")
    p.add_argument("--gui-text-tokens", type=int, default=64, help="part B: instruction tokens before the history")
    p.add_argument("--width", type=int, default=308, help="part B screenshot width (default: 11x7 visual tokens)")
    p.add_argument("--height", type=int, default=196)
    p.add_argument("--gui-layers", type=int, default=2)
    p.add_argument("--gui-hidden", type=int, default=512)
    p.add_argument("--gui-heads", type=int, default=4)
    p.add_argument("--gui-kv-heads", type=int, default=2)
    p.add_argument("--gui-intermediate", type=int, default=1408)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per row; the fastest is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None, help="directory for long_decode.md/.csv/.json (must be empty, or --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    return p


def run(args: argparse.Namespace) -> list[Row]:
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} is not empty: choose another --out or add --force to overwrite")
    args.dtype = getattr(torch, args.dtype) if isinstance(args.dtype, str) else args.dtype
    method_grid(args.methods, args.budgets), method_grid(args.gui_methods, args.budgets)  # bad specs: fail first
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, about = [], []
    started = time.perf_counter()
    for name, part in (("a", part_a), ("b", part_b)):
        if args.part in (name, "both"):
            part_rows, part_about = part(args)
            print(f"\n{part_about}\n\n{markdown(part_rows)}", file=sys.stderr, flush=True)  # before the next part
            rows += part_rows
            about.append(part_about)
    header = "\n".join(about) + (
        f"\n{args.device} {str(args.dtype)[6:]}, CPU threads {torch.get_num_threads()}, fastest of {args.repeats} "
        f"interleaved runs; dense rows: absolute values, other rows: ratios to dense on the same prompt; wall time "
        f"{time.perf_counter() - started:.0f} s")
    table = markdown(rows)
    print(f"\n{header}\n\n{table}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "long_decode.md").write_text(f"{header}\n\n{table}\n")
        records = [asdict(r) for r in rows]
        (out / "long_decode.json").write_text(json.dumps({"about": header, "rows": records}, indent=1, default=str))
        with open(out / "long_decode.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows({k: "/".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()}
                             for r in records)
        print(f"\nwrote {out}/long_decode.md, long_decode.csv, long_decode.json")
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
