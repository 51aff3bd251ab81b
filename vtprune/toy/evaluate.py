"""Dense accuracy of the embedded toy model on held-out questions, per question type.

    python -m vtprune.toy.evaluate --n 500
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from tqdm import tqdm

from vtprune.toy import world
from vtprune.toy.modeling import answer, is_correct, load


def evaluate(n: int = 500, seed: int = 0, batch_size: int = 32, split: str = "test") -> dict[str, tuple[int, int]]:
    """(correct, total) per group: "all", each question type, and small/large target objects."""
    model, processor = load()
    items = world.make_dataset(split, n, seed)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for start in tqdm(range(0, n, batch_size), desc=f"dense accuracy on {split}", unit="batch"):
        chunk = items[start : start + batch_size]
        predictions = answer(model, processor, [i.image for i in chunk], [i.question for i in chunk])
        for item, prediction in zip(chunk, predictions):
            groups = ["all", item.qtype] + ([f"{item.target_size} object"] if item.target_size else [])
            for group in groups:
                counts[group][0] += is_correct(prediction, item.answer)
                counts[group][1] += 1
    return {group: (c, t) for group, (c, t) in counts.items()}


def format_table(counts: dict[str, tuple[int, int]]) -> str:
    order = ["all", *world.QTYPES, "small object", "large object"]
    rows = [f"{'group':<14}{'n':>6}{'accuracy':>10}", "-" * 30]
    for group in order:
        if group in counts:
            correct, total = counts[group]
            rows.append(f"{group:<14}{total:>6}{correct / total:>10.1%}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Dense accuracy of the toy LLaVA on held-out questions.")
    parser.add_argument("--n", type=int, default=500, help="number of held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--split", default="test", choices=sorted(world.SPLITS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    counts = evaluate(args.n, args.seed, args.batch_size, args.split)
    print(f"\nvtprune toy model, dense, {args.split} split, seed {args.seed} ({time.time() - started:.0f} s)")
    print(format_table(counts))


if __name__ == "__main__":
    main()
