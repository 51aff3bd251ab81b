"""Dense accuracy of the embedded toy model on held-out questions, per question type.

    python -m vtprune.toy.evaluate --n 500
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import torch
from tqdm import tqdm

from vtprune.toy import world
from vtprune.toy.modeling import answer, is_correct, load


def groups_of(item: world.VQAItem) -> list[str]:
    """The groups an item counts in: "all", its question type, and "small object" / "large object" if it has one."""
    return ["all", item.qtype] + ([f"{item.target_size} object"] if item.target_size else [])


def score(items: list[world.VQAItem], predictions: list[str]) -> dict[str, float]:
    """Share of correct predictions per group (see `groups_of`), groups sorted by name."""
    correct: dict[str, list[bool]] = defaultdict(list)
    for item, prediction in zip(items, predictions):
        for group in groups_of(item):
            correct[group].append(is_correct(prediction, item.answer))
    return {group: sum(v) / len(v) for group, v in sorted(correct.items())}


def evaluate(n: int = 500, seed: int = 0, batch_size: int = 32, split: str = "test") -> dict[str, float]:
    """Dense accuracy of the packaged model per group on `make_dataset(split, n, seed)`."""
    model, processor = load()
    items = world.make_dataset(split, n, seed)
    predictions: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc=f"dense accuracy on {split}", unit="batch"):
        chunk = items[start : start + batch_size]
        predictions += answer(model, processor, [i.image for i in chunk], [i.question for i in chunk])
    return score(items, predictions)


def format_table(accuracy: dict[str, float], items: list[world.VQAItem]) -> str:
    sizes = Counter(group for item in items for group in groups_of(item))
    rows = [f"{'group':<14}{'n':>6}{'accuracy':>10}", "-" * 30]
    for group in ["all", *world.QTYPES, "small object", "large object"]:
        if group in accuracy:
            rows.append(f"{group:<14}{sizes[group]:>6}{accuracy[group]:>10.1%}")
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
    accuracy = evaluate(args.n, args.seed, args.batch_size, args.split)
    print(f"\nvtprune toy model, dense, {args.split} split, seed {args.seed} ({time.time() - started:.0f} s)")
    print(format_table(accuracy, world.make_dataset(args.split, args.n, args.seed)))


if __name__ == "__main__":
    main()
