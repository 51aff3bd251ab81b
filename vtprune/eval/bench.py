"""`vtprune bench`: what each method saves, as ratios to the dense model measured in the same run.

    vtprune bench --model llava-1.5-7b --llm-layers 4 --llm-hidden 1024 --budgets 64 128 192 --out out/bench

For every model shape, method and budget (rows), each a ratio to the dense model on the same prompt:
- prefill: one forward over the prompt, vision encoder included (fastest of `--repeats` interleaved runs: on a busy
  machine interference only ever adds time);
- bound: the vision encoder plus the dense language model fed the pruned length (no scoring, no hooks): what a
  free cut at the LLM input would cost; overhead = prefill / bound;
- schedule: the method's own cuts with nothing decided (`vtprune.eval.schedule`: each decoder layer run at the
  length the method left there, indices fixed in advance, no signals, scoring or hooks); prefill / schedule is what
  choosing the tokens and vtprune's compaction cost beyond the cuts themselves;
- TTFT: `generate(max_new_tokens=1)`; end-to-end: `generate` of `--new-tokens` tokens (always that many);
- peak memory during that `generate`, above the memory in use before it (CUDA: `torch.cuda.max_memory_allocated`;
  CPU: peak resident set size, see `vtprune.eval.memory`; measured after all timings, one run each);
- KV cache bytes after the prefill (layers cut at different depths hold different lengths);
- analytic LLM prefill FLOPs (`vtprune.eval.flops`: 4·n·d² + 2·n²·d + 3·n·d·m per decoder layer, each layer's n).
`--profile` adds a second table (profile.md): one prefill per row under the torch profiler, the share of its time in
vtprune's stages (signals, score, compact, cache; `vtprune.core.profile`), and the calls that would wait on the host on
CUDA (`vtprune.eval.profile.host_syncs`: vtprune's own, and transformers' as in the dense row), with vtprune's call
sites in bench.json.
`--batch N` runs N prompts per call: on `llava-1.5-7b` sample b holds 1 + b % 2 images, so the batch is ragged
(left padding, different kept counts per sample; the bound and the schedule run at the longest sample's lengths, as a
padded batch does); a loaded model repeats its prompt. Visual tokens and FLOPs are then batch totals.
Methods with a `keep` run at every `--budgets` value; presets (`transprune:preset=high`) are budgets of their own.
Model shapes (random weights; `--llm-layers`, `--llm-hidden`, `--vision-layers`, `--vision-hidden` scale them down;
`vtprune.eval.shapes`): `llava-1.5-7b` (CLIP-L/336 tower, 576 visual tokens, Llama LM), `qwen3-vl-image` (Qwen3-VL-8B
proportions, one image of 2,024 visual tokens), `qwen3-vl-video` (the same, a 32-frame video of 3,136 visual tokens);
`toy` (the embedded model), or a local path / hub id (`from_pretrained`).
Writes bench.md, bench.csv, bench.json and bench.png (prefill speedup vs kept visual tokens) to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

import vtprune
from vtprune.core import VISUAL_TOKENS, make_at, method_class, parse_method_spec

from .flops import llm_flops, visual_tokens_per_layer
from .measure import cache_bytes
from .memory import peak_memory_bytes
from .profile import host_syncs, stage_times
from .schedule import encode_media, layer_lengths, media_inputs, schedule_forward
from .shapes import SHAPES, shaped
from .speed import median_seconds

SPEC_OVERRIDES = {"fastv": "fastv:layer=2"}  # FastV's K=2 of the paper fits the toy's 4 layers


def default_methods() -> list[str]:
    """Every registered method: those whose keep counts visual tokens at every budget, the others (KV-cache entries,
    attention mass) once at their default keep."""
    return [SPEC_OVERRIDES.get(name, name) for name in vtprune.available()]


def repeated(inputs: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
    """One prompt's inputs as a batch of `batch` identical samples (every tensor is per sample along dim 0)."""
    return {k: v.repeat(batch, *[1] * (v.dim() - 1)) for k, v in inputs.items()}


def load_shape(name: str, args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """(model, prompt inputs) of a model shape, on `args.device`."""
    if name in SHAPES:
        model, inputs = shaped(name, args.llm_hidden, args.llm_layers, args.vision_hidden, args.vision_layers,
                               args.text_tokens, args.batch)
    else:
        from PIL import Image

        from ..loading import load, prepare

        model, processor = load(name)
        ramp = Image.linear_gradient("L").resize((336, 336))
        image = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), Image.new("L", ramp.size, 90)))
        inputs = repeated(prepare(processor, [image], args.question), args.batch)
        model.generation_config.eos_token_id = None  # always decode the requested number of tokens
    model.set_attn_implementation(args.attn)
    model = model.to(args.device, args.dtype)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    return model, {k: v.to(args.dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def method_grid(specs: list[str], budgets: list[int | float | str]) -> list[tuple[str, Any, Any]]:
    """(name, budget, method) per grid cell: a method whose budget counts visual tokens runs at every budget, unless
    its spec fixes one (`keep=` or `preset=`); any other method (its budget counts cache entries or attention mass)
    runs once, its budget column its `keep` (or the preset)."""
    grid = []
    for name, options in map(parse_method_spec, specs):
        cls = method_class(name)
        if "preset" in options or "keep" in options or cls.budget_kind is not VISUAL_TOKENS:
            method = vtprune.make(name, **options)
            grid.append((name, options.get("preset", method.keep), method))
        else:
            grid += [(name, keep, make_at(name, keep, **options)) for keep in budgets]
    return grid


@dataclass
class Row:
    model: str
    method: str
    keep: int | float | str | None  # the budget: keep, or a preset's name
    visual_before: int | None
    visual_after: int | None
    prefill: float  # seconds for dense; ratio to dense otherwise (as every field below)
    bound: float | None
    overhead: float | None
    schedule: float | None
    over_schedule: float | None
    ttft: float
    end_to_end: float
    peak_memory: float | None
    kv_cache: float
    flops: float
    stages: dict | None = None  # --profile: seconds per vtprune stage in one prefill, and its total
    syncs: dict | None = None  # --profile: host syncs in one prefill (vtprune's, other, vtprune's sites)


class Config:
    """One column of the grid on one model: a method at a budget, or dense (method None)."""

    def __init__(self, model: torch.nn.Module, inputs: dict, method: Any, new_tokens: int) -> None:
        self.model, self.inputs, self.method, self.new_tokens = model, inputs, method, new_tokens
        self.times: dict[str, list[float]] = {"prefill": [], "ttft": [], "end_to_end": []}
        self.memory: int | None = None  # peak bytes of one `generate(new_tokens)`

    def session(self) -> Any:
        return self.method(self.model) if self.method is not None else nullcontext()

    def prefill(self) -> Any:
        with torch.no_grad(), self.session() as trace:
            out = self.model(**self.inputs, use_cache=True, logits_to_keep=1)
        return out, trace

    def generate(self, new_tokens: int) -> None:
        with torch.no_grad(), self.session():
            self.model.generate(**self.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    def steps(self) -> dict[str, Callable[[], Any]]:
        return {"prefill": self.prefill, "ttft": lambda: self.generate(1),
                "end_to_end": lambda: self.generate(self.new_tokens)}

    def best(self, key: str) -> float:
        return min(self.times[key])


def time_once(fn: Callable[[], Any]) -> float:
    return median_seconds(fn, repeats=1, warmup=0)


def bench_model(name: str, args: argparse.Namespace, bar: tqdm) -> list[Row]:
    model, inputs = load_shape(name, args)
    text = model.config.get_text_config()
    dims, layers = (text.hidden_size, text.intermediate_size), text.num_hidden_layers
    prompts = inputs["attention_mask"].sum(1).tolist()  # each sample's prompt without its padding
    dense = Config(model, inputs, None, args.new_tokens)
    rows = [Row(name, "dense", None, None, None, 0.0, None, None, None, None, 0.0, 0.0, None,
                cache_bytes(dense.prefill()[0].cache), sum(llm_flops([p] * layers, *dims) for p in prompts))]
    grid = []
    for method_name, keep, method in args.grid:  # warm up, skip what this model refuses, count what is kept
        config = Config(model, inputs, method, args.new_tokens)
        try:
            out, trace = config.prefill()
        except vtprune.VTPruneError as error:
            tqdm.write(f"skipped {name} {method_name} keep={keep}: {' '.join(str(error).split())}")
            args.skipped.append(f"{name} {method_name} keep={keep}")
            bar.update(3 * args.repeats + 1)
            continue
        visual = trace.visual_tokens(0)  # per sample: (at the LLM input, after the last cut)
        if set(method.sites) & {"pre_llm", "llm_layer"}:
            per_sample = [layer_lengths(p, before, visual_tokens_per_layer(trace, layers, forward=0, sample=b))
                          for b, (p, (before, _)) in enumerate(zip(prompts, visual))]
        else:  # a cache or attention site leaves the prefill's sequence whole
            per_sample = [[p] * layers for p in prompts]
        padded = tuple(map(max, zip(*per_sample)))  # what the batch runs: the longest sample at every layer
        bound = max(p - before + after for p, (before, after) in zip(prompts, visual))
        grid.append((method_name, keep, config, padded, bound))
        flops = sum(llm_flops(lengths, *dims) for lengths in per_sample)
        before, after = (sum(counts) for counts in zip(*visual))
        rows.append(Row(name, method_name, keep, before, after, 0.0, None, None, None, None, 0.0, 0.0, None,
                        cache_bytes(out.cache) / rows[0].kv_cache, flops / rows[0].flops))
    rows[0].visual_before = rows[0].visual_after = rows[1].visual_before if len(rows) > 1 else None
    configs = [dense] + [config for _, _, config, *_ in grid]
    for config in configs:
        config.generate(1)

    # the bound: the vision encoder, then the dense language model on the pruned length (no scoring, no hooks)
    vision_inputs = media_inputs(inputs)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    lengths = sorted({bound for *_, bound in grid})
    batch = inputs["input_ids"].shape[0]
    embeds = {n: torch.randn(batch, n, text.hidden_size, device=args.device, dtype=args.dtype) for n in lengths}

    def free_cut(length: int) -> None:
        with torch.no_grad():
            encode_media(model, vision_inputs)
            head(decoder(inputs_embeds=embeds[length]).last_hidden_state[:, -1:])

    bound_times: dict[int, list[float]] = {n: [] for n in lengths}
    schedules = {padded: schedule_forward(model, vision_inputs, list(padded), batch) for *_, padded, _ in grid}
    schedule_times: dict[tuple[int, ...], list[float]] = {lengths: [] for lengths in schedules}
    for _ in range(args.repeats):  # interleaved: drift on a busy machine hits every configuration alike
        for config in configs:
            for key, step in config.steps().items():
                config.times[key].append(time_once(step))
                bar.update(1)
        for length in lengths:
            bound_times[length].append(time_once(lambda: free_cut(length)))
        for key, run in schedules.items():
            schedule_times[key].append(time_once(run))
    for config in configs:  # after all timings: a peak-memory run each
        config.memory = peak_memory_bytes(lambda: config.generate(args.new_tokens), model.device)
        bar.update(1)
    if args.profile:
        for row, config in zip(rows, configs):
            row.stages, row.syncs = stage_times(config.prefill), host_syncs(config.prefill)

    dense_row = rows[0]
    dense_row.prefill, dense_row.ttft = dense.best("prefill"), dense.best("ttft")
    dense_row.end_to_end, dense_row.peak_memory = dense.best("end_to_end"), dense.memory
    for row, (_, _, config, schedule, bound) in zip(rows[1:], grid):
        row.prefill = config.best("prefill") / dense_row.prefill
        row.bound = min(bound_times[bound]) / dense_row.prefill
        row.overhead = row.prefill / row.bound
        row.schedule = min(schedule_times[schedule]) / dense_row.prefill
        row.over_schedule = row.prefill / row.schedule
        row.ttft = config.best("ttft") / dense_row.ttft
        row.end_to_end = config.best("end_to_end") / dense_row.end_to_end
        row.peak_memory = config.memory / dense.memory if config.memory is not None and dense.memory else None
    return rows


def markdown(rows: list[Row], new_tokens: int) -> str:
    def num(value: Any, digits: int = 3) -> str:
        return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = [
        (f"| model | method | keep | visual tokens | prefill | bound | overhead | schedule | prefill / schedule | TTFT "
         f"| end-to-end ({new_tokens} tok) | peak memory | KV cache | FLOPs |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.method == "dense":
            memory = "—" if r.peak_memory is None else f"{r.peak_memory / 2**20:.4g} MiB"
            cells = [r.model, "dense", "—", num(r.visual_before), f"{r.prefill:.3f} s", "—", "—", "—", "—",
                     f"{r.ttft:.3f} s",
                     f"{r.end_to_end:.3f} s", memory, f"{r.kv_cache / 2**20:.4g} MiB", f"{r.flops / 1e9:.4g} GFLOPs"]
        else:
            cells = [r.model, r.method, num(r.keep), f"{r.visual_before} → {r.visual_after}", num(r.prefill),
                     num(r.bound), num(r.overhead), num(r.schedule), num(r.over_schedule), num(r.ttft),
                     num(r.end_to_end), num(r.peak_memory),
                     num(r.kv_cache), num(r.flops)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile_markdown(rows: list[Row]) -> str:
    lines = ["| model | method | keep | prefill (profiled) | signals | score | compact | cache | host syncs: vtprune "
             "| host syncs: other |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        total = r.stages["total"]
        shares = [f"{r.stages[s] / total:.1%}" for s in ("signals", "score", "compact", "cache")]
        lines.append(f"| {r.model} | {r.method} | {'—' if r.keep is None else r.keep} | {total * 1e3:.1f} ms | "
                     + " | ".join(shares) + f" | {r.syncs['vtprune']} | {r.syncs['other']} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        pruned = [r for r in rows if r.model == model and r.method != "dense"]
        for method in dict.fromkeys(r.method for r in pruned):
            points = sorted((r.visual_after, 1 / r.prefill, r.keep) for r in pruned if r.method == method)
            budgets = all(isinstance(keep, (int, float)) for *_, keep in points)  # presets: points, not a line
            x, y, _ = zip(*points)
            ax.plot(x, y, marker="o" if budgets else "x", linestyle="-" if budgets else "none", label=method)
        bound = sorted({(r.visual_after, 1 / r.bound) for r in pruned})
        ax.plot(*zip(*bound), linestyle="--", color="gray", label="bound (free cut)")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set(title=model, xlabel="visual tokens kept (after the last cut)", ylabel="prefill speedup vs dense")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> int:
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = getattr(torch, args.dtype) if isinstance(args.dtype, str) else args.dtype
    args.methods = args.methods or default_methods()
    args.skipped = []
    args.grid = method_grid(args.methods, args.budgets)  # unknown method or option: fails before building any model
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = len(args.models) * (1 + len(args.grid)) * (3 * args.repeats + 1)  # timings, memory
    rows = []
    with tqdm(total=steps, desc="vtprune bench") as bar:
        for name in args.models:
            rows += bench_model(name, args, bar)
    table = markdown(rows, args.new_tokens)
    print(f"\nCPU threads: {torch.get_num_threads()}, device: {args.device}, dtype: {str(args.dtype)[6:]}, "
          f"batch {args.batch} (visual tokens: batch totals), fastest of {args.repeats}; "
          "dense row: absolute values, other rows: ratios to dense\n")
    print(table)
    if args.profile:
        print("\nShare of one profiled prefill in vtprune's stages, and calls that wait on the host on CUDA:\n")
        print(profile_markdown(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.md").write_text(table + "\n")
        (out / "bench.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        with open(out / "bench.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        plot(rows, out / "bench.png")
        if args.profile:
            (out / "profile.md").write_text(profile_markdown(rows) + "\n")
        print(f"\nwrote {out}/bench.md, bench.csv, bench.json, bench.png" + (", profile.md" if args.profile else ""))
    if args.skipped:
        print(f"\nskipped (refused by the method or model, reason above): {', '.join(args.skipped)}")
    return 0
