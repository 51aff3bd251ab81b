"""Accuracy vs visual-token budget of every method on the embedded toy LLaVA (no downloads).

    python benchmarks/accuracy.py                     # 500 held-out questions, ~30 min on 2 CPU cores
    python benchmarks/accuracy.py --n 100 --methods vtc-cls random --budgets 64 32

Questions: `vtprune.toy.make_dataset("test", n, seed)` (colour, shape, position, count in turn; half of the
single-object questions about a small object), answered greedily in left-padded batches, scored by normalised exact
match. Each method runs at each budget of the 576 visual tokens:

- vtc-cls, fastv, random, pool, visionzip: `keep=N` visual tokens per image (FastV keeps all 576 up to its layer K);
- transprune: its released 3-stage schedule (0.875, 0.625, 0.125 of the image) scaled so that the last stage keeps N;
- vflowopt: `vit_keep = budget = N / 576` (the average share of visual tokens over the LLM's layers), `llm_keep1=1`;
- gui-kv: `keep = N / 576` of the prompt's KV-cache entries per head;
- zipvl has no token budget (its attention-mass threshold decides): one row at its defaults.

Writes accuracy.json (every cell, per question type and target size), accuracy.md (the table) and accuracy.png (the
plot) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import vtprune
from vtprune import toy
from vtprune.toy.evaluate import score

BUDGETS = (576, 192, 128, 64, 32)
FULL = toy.NUM_IMAGE_TOKENS
TRANSPRUNE_SCHEDULE = (0.875, 0.625, 0.125)


def method_at(name: str, keep: int) -> vtprune.Method:
    """`name` configured to leave `keep` of the 576 visual tokens (see the module docstring)."""
    share = keep / FULL
    if name == "transprune":
        scale = share / TRANSPRUNE_SCHEDULE[-1]
        return vtprune.make(name, keep_ratios=tuple(min(1.0, r * scale) for r in TRANSPRUNE_SCHEDULE))
    if name == "vflowopt":
        return vtprune.make(name, vit_keep=share, budget=share, llm_keep1=1.0)
    if name == "gui-kv":
        return vtprune.make(name, keep=share)
    return vtprune.make(name, keep=keep)


def accuracy(model: Any, processor: Any, items: list, method: vtprune.Method | None, batch: int) -> dict[str, Any]:
    """Per group ("all", each question type, small/large target): correct share; mean visual tokens kept; answers."""
    kept: list[int] = []
    answers: list[str] = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        images, questions = [i.image for i in chunk], [i.question for i in chunk]
        if method is None:
            answers += toy.answer(model, processor, images, questions)
            kept += [FULL] * len(chunk)
        else:
            with method(model) as trace:
                answers += toy.answer(model, processor, images, questions)
            kept += [after for _, after in trace.visual_tokens(0)]
    return {"accuracy": score(items, answers), "visual_tokens": sum(kept) / len(kept), "answers": answers}


def markdown(cells: dict[str, dict[int | str, dict]], budgets: list[int]) -> str:
    dense = cells["dense"]["—"]["accuracy"]["all"]
    lines = [
        "| method | " + " | ".join(f"{b}" for b in budgets) + " |",
        "| --- |" + " --- |" * len(budgets),
        f"| dense | {dense:.3f} |" + " |" * (len(budgets) - 1),
    ]
    for name, row in cells.items():
        if name == "dense":
            continue
        if "—" in row:
            text = f"{row['—']['accuracy']['all']:.3f} (mean {row['—']['visual_tokens']:.0f} tokens)"
            lines.append(f"| {name} | {text} |" + " |" * (len(budgets) - 1))
        else:
            lines.append(f"| {name} | " + " | ".join(f"{row[b]['accuracy']['all']:.3f}" for b in budgets) + " |")
    return "\n".join(lines)


def by_group(cells: dict[str, dict[int | str, dict]], keep: int) -> str:
    """Accuracy per question type and target size at one budget."""
    groups = list(cells["dense"]["—"]["accuracy"])
    lines = ["| method | " + " | ".join(groups) + " |", "| --- |" + " --- |" * len(groups)]
    for name, row in cells.items():
        cell = row.get("—") if name == "dense" else row.get(keep)
        if cell:
            lines.append(f"| {name} | " + " | ".join(f"{cell['accuracy'][g]:.3f}" for g in groups) + " |")
    return "\n".join(lines)


def plot(cells: dict[str, dict[int | str, dict]], budgets: list[int], path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(cells["dense"]["—"]["accuracy"]["all"], color="black", linestyle="--", label="dense (576)")
    for name, row in cells.items():
        if name == "dense":
            continue
        if "—" in row:
            ax.scatter([row["—"]["visual_tokens"]], [row["—"]["accuracy"]["all"]], marker="x", label=name)
        else:
            xs = sorted(b for b in budgets)
            ax.plot(xs, [row[b]["accuracy"]["all"] for b in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(budgets), [str(b) for b in sorted(budgets)])
    ax.set_xlabel("visual tokens kept (of 576)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Embedded toy LLaVA, {n} held-out questions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=vtprune.available())
    parser.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=toy.MODEL_DIR, help="a toy model (default: the packaged one)")
    parser.add_argument("--out", type=Path, default=Path("out/accuracy"))
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model, processor = toy.load(path=args.model_dir)
    items = toy.make_dataset("test", args.n, args.seed)
    started = time.time()
    cells: dict[str, dict[int | str, dict]] = {"dense": {"—": accuracy(model, processor, items, None, args.batch)}}
    print(f"dense: {cells['dense']['—']['accuracy']}", file=sys.stderr)
    for name in args.methods:
        budgets = ["—"] if name == "zipvl" else args.budgets
        cells[name] = {}
        for keep in budgets:
            method = vtprune.make(name) if keep == "—" else method_at(name, keep)
            cell = cells[name][keep] = accuracy(model, processor, items, method, args.batch)
            dense_answers = cells["dense"]["—"]["answers"]
            cell["same_answer_as_dense"] = sum(a == d for a, d in zip(cell["answers"], dense_answers)) / len(items)
            print(f"{name} @ {keep}: {cells[name][keep]['accuracy']['all']:.3f} "
                  f"({(time.time() - started) / 60:.1f} min)", file=sys.stderr)

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(cells, args.budgets)
    groups = by_group(cells, 64) if 64 in args.budgets else ""
    (args.out / "accuracy.md").write_text(table + "\n\nAt 64 visual tokens, per question type and target size:\n\n"
                                          + groups + "\n")
    (args.out / "accuracy.json").write_text(json.dumps(
        {"n": args.n, "seed": args.seed, "budgets": args.budgets,
         "cells": {m: {str(k): v for k, v in row.items()} for m, row in cells.items()}}, indent=1))
    plot(cells, args.budgets, args.out / "accuracy.png", args.n)
    print(table + "\n\n" + groups)
    print(f"\nwrote {args.out}/accuracy.md, accuracy.json, accuracy.png ({(time.time() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
