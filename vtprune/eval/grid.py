"""`vtprune eval`: a grid of methods × budgets run through lmms-eval in this process, written as one table.

    vtprune eval --pretrained toy --methods vtc-cls fastv:layer=2 --budgets 64 128 --tasks vtprune_toy_vqa --limit 200

The model is loaded once as lmms-eval's model `vtprune` (see `vtprune.eval.lmms`); every cell (dense first, then each
method at each budget) is one `lmms_eval.evaluator.simple_evaluate` with that method swapped in. Columns: each task
metric, the mean visual tokens before -> after, and the medians over samples of prefill time, request time and peak
memory (see `vtprune.eval.lmms`), each divided by dense's. `--include-path` defaults to vtprune's own tasks
(vtprune_toy_vqa). Without CUDA it runs on the CPU in float32 (no --model-arg needed). A configuration that fails
is reported and skipped; the exit status is then 1. Writes eval.md, eval.csv and eval.json (rows and each cell's lmms-eval results, samples left out)
to `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from ..core import VTPruneError, parse_pairs
from .bench import method_grid
from .toy_vqa import TASK_DIR

MEASURES = ("prefill_seconds", "seconds", "peak_memory_bytes")


def cell_row(label: str, keep: Any, results: dict) -> dict[str, Any]:
    """One table row from a simple_evaluate result: task metrics, mean visual tokens, median per-sample measures."""
    row: dict[str, Any] = {"method": label, "keep": keep}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and "stderr" not in name:
                row[f"{task}/{name}"] = value
    counts = [s["token_counts"][0] for samples in results["samples"].values() for s in samples if s["token_counts"]]
    for name, summary in (("visual_tokens_before", statistics.fmean), ("visual_tokens_after", statistics.fmean),
                          *((measure, statistics.median) for measure in MEASURES)):
        values = [c[name] for c in counts if c.get(name) is not None]
        row[name] = summary(values) if values else None
    return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measures divided by the dense row's (rows[0]); dense's visual tokens are the pruned rows' before."""
    dense = rows[0]
    if dense["visual_tokens_before"] is None and len(rows) > 1:
        dense["visual_tokens_before"] = dense["visual_tokens_after"] = rows[1]["visual_tokens_before"]
    for row in rows:
        for measure in MEASURES:
            base = dense[measure]
            row[f"{measure}_ratio"] = row[measure] / base if row[measure] is not None and base else None
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    metrics = [k for k in rows[0] if "/" in k]
    header = ["method", "keep", "visual tokens", *metrics, "prefill / dense", "request / dense", "peak memory / dense"]

    def num(value: Any) -> str:
        return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    def tokens(row: dict) -> str:
        before, after = row["visual_tokens_before"], row["visual_tokens_after"]
        return "—" if before is None else f"{before:g}" if before == after else f"{before:g} → {after:g}"

    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["method"], num(row["keep"]), tokens(row), *(num(row.get(m)) for m in metrics),
                 num(row["prefill_seconds_ratio"]), num(row["seconds_ratio"]), num(row["peak_memory_bytes_ratio"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> int:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms import VTPrune, VTPruneChat

    grid = method_grid(args.methods, args.budgets)  # a bad method or option fails before the model loads
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_class = VTPrune if args.force_simple else VTPruneChat
    lm = model_class(base=args.base, pretrained=args.pretrained, device=args.device, **parse_pairs(args.model_arg, "--model-arg"))
    lm.release_after_run = False  # every cell reuses the loaded model
    tasks = TaskManager(include_path=args.include_path or str(TASK_DIR), include_defaults=False)
    if not set(args.tasks) <= set(tasks.all_tasks):  # indexing lmms-eval's own tasks takes a while: only if needed
        tasks = TaskManager(include_path=args.include_path or str(TASK_DIR))
    rows, cells, failed = [], {}, []
    for name, keep, method in [("dense", None, None), *grid]:
        try:
            lm.use(method)
            results = simple_evaluate(
                model=lm, tasks=args.tasks, limit=args.limit, task_manager=tasks, device=args.device,
                gen_kwargs=args.gen_kwargs, log_samples=True, bootstrap_iters=0,
            )
        except VTPruneError as error:  # one configuration the model refuses: the others still run
            failed.append(f"{name} keep={keep}: {' '.join(str(error).split())}")
            print(f"vtprune eval: {failed[-1]}", file=sys.stderr)
            continue
        if results is None:  # not the main process of a distributed run
            continue
        rows.append(cell_row(name, keep, results))
        cells[f"{name} keep={keep}"] = {k: v for k, v in results.items() if k != "samples"}
    if failed and not rows:
        raise VTPruneError(f"every configuration failed ({'; '.join(failed)})")
    if not rows:
        return 0
    rows = with_ratios(rows)
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.md").write_text(table + "\n")
        (out / "eval.json").write_text(json.dumps({"rows": rows, "cells": cells}, indent=1, default=str))
        with open(out / "eval.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {out}/eval.md, eval.csv, eval.json")
    if failed:
        print(f"vtprune eval: {len(failed)} configuration(s) failed (above); exit status 1", file=sys.stderr)
        return 1
    return 0
