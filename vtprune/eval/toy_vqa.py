"""The offline lmms-eval task `vtprune_toy_vqa`: questions about the toy world's scenes, scored by exact match.

    python -m lmms_eval --model vtprune --model_args base=llava_hf,pretrained=toy,method=vtc-cls,keep=64 \
        --tasks vtprune_toy_vqa --include_path "$(python -m vtprune.eval.toy_vqa --task-dir)" --device cpu

The package ships only a jsonl of (split, seed, index, question, answer, qtype, target_size); each image is drawn again
from the toy world (`vtprune.toy.make_dataset`, deterministic) when lmms-eval first asks for it, and kept in memory.
`python -m vtprune.eval.toy_vqa` writes the jsonl again (after a change to the toy world).
Metrics: normalised exact match overall (`exact_match`) and per question type (`exact_match_<qtype>`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from PIL import Image

from ..core import VTPruneError
from ..toy import is_correct, make_dataset

TASK_DIR = Path(__file__).resolve().parent / "tasks"  # pass as lmms-eval's --include_path
DATA_FILE = TASK_DIR / "vtprune_toy_vqa" / "vtprune_toy_vqa.jsonl"
SPLIT, SEED, SIZE = "test", 0, 400
QTYPES = ("color", "shape", "position", "count")

_items: dict[tuple[str, int], list[Any]] = {}  # (split, seed) -> the first items of make_dataset(split, n, seed)


def rows(split: str = SPLIT, n: int = SIZE, seed: int = SEED) -> list[dict[str, Any]]:
    """The task's documents: everything but the image, which `doc_to_visual` draws again."""
    return [
        {"split": split, "seed": seed, "index": index, "question": item.question, "answer": item.answer,
         "qtype": item.qtype, "target_size": item.target_size}
        for index, item in enumerate(make_dataset(split, n, seed))
    ]


def write_rows(path: Path = DATA_FILE, split: str = SPLIT, n: int = SIZE, seed: int = SEED) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows(split, n, seed)))
    return path


def item(split: str, seed: int, index: int) -> Any:
    """Item `index` of make_dataset(split, ·, seed); items are drawn in growing prefixes and kept."""
    items = _items.get((split, seed), [])
    if index >= len(items):
        items = make_dataset(split, max(index + 1, 2 * len(items), 32), seed)
        _items[(split, seed)] = items
    return items[index]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    drawn = item(doc["split"], doc["seed"], doc["index"])
    if (drawn.question, drawn.answer) != (doc["question"], doc["answer"]):
        raise VTPruneError(
            f"the toy world no longer draws document {doc['index']} ({doc['question']!r} -> {drawn.question!r}); "
            "rewrite the task data with `python -m vtprune.eval.toy_vqa`"
        )
    return [drawn.image]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """exact_match, and exact_match_<qtype> for the document's question type."""
    score = float(is_correct(results[0], doc["answer"]))
    return {"exact_match": score, f"exact_match_{doc['qtype']}": score}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the vtprune_toy_vqa documents, or print the task folder.")
    parser.add_argument("--task-dir", action="store_true", help="print the folder to pass as --include_path")
    parser.add_argument("--n", type=int, default=SIZE)
    args = parser.parse_args()
    print(TASK_DIR if args.task_dir else write_rows(n=args.n))


if __name__ == "__main__":
    main()
