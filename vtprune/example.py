"""`vtprune example`: every method on one image and question, at one budget, against the dense model.

Prints one progress line per method on stderr as it goes, then a table (method, visual tokens kept, answer, correct, prefill time ratio vs dense measured in the same run) and
writes one heatmap per method into the output folder. Defaults to the embedded model and its bundled example.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

import vtprune

from .core import VISUAL_TOKENS
from .eval.speed import prefill_seconds
from .loading import load, prepare, question_text, read_image
from .toy import is_correct
from .viz import heatmap


def bundled_example() -> tuple[Path, str, str]:
    from . import toy

    meta = json.loads((toy.EXAMPLES_DIR / "small_object.json").read_text())
    return toy.EXAMPLES_DIR / meta["image"], meta["question"], meta["answer"]


def generate_answer(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def methods_with_budget(names: list[str], keep: int) -> list[vtprune.Method]:
    """Each method at `keep` visual tokens per image if its budget counts visual tokens, else at its own default."""
    kinds = {name: vtprune.core.method_class(name).budget_kind for name in names}
    return [vtprune.make(name, **({"keep": keep} if kinds[name] is VISUAL_TOKENS else {})) for name in names]


def run_example(args: argparse.Namespace) -> int:
    if args.image:
        if not args.question:
            raise vtprune.VTPruneError("--image needs --question (and --answer for the 'correct' column)")
        image_path, question, expected = Path(args.image), args.question, args.answer
    elif args.question or args.answer:
        raise vtprune.VTPruneError("--question / --answer go with --image; without --image the bundled example runs")
    else:
        image_path, question, expected = bundled_example()
    question, _ = question_text(question)
    image = read_image(image_path)
    methods = methods_with_budget(args.methods or vtprune.available(), args.keep)  # a bad name fails before loading
    model, processor = load(args.model, device=args.device)
    inputs = prepare(processor, [image], question, device=model.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    dense_time = prefill_seconds(model, inputs, repeats=args.repeats)
    dense_answer = generate_answer(model, processor, inputs, args.max_new_tokens)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    rows = [("dense", n_visual, dense_answer, 1.0)]
    skipped = []
    print(f"dense: {dense_answer!r} ({n_visual} visual tokens)", file=sys.stderr, flush=True)
    for index, method in enumerate(methods, 1):
        print(f"[{index}/{len(methods)}] {method.name} ...", file=sys.stderr, flush=True)
        try:
            with method(model) as trace:
                answer = generate_answer(model, processor, inputs, args.max_new_tokens)
        except vtprune.VTPruneError as error:  # e.g. a method for another model family
            skipped.append(f"{method.name}: {error}")
            continue
        ratio = prefill_seconds(model, inputs, method, repeats=args.repeats) / dense_time
        rows.append((method.name, trace.visual_tokens(0)[0][1], answer, ratio))
        scores, kept = trace.image_map(0, forward=0)
        title = f"{method.name}: {int(kept.sum())} of {kept.numel()} visual tokens kept"
        heatmap(image, scores, kept, side=model.config.vision_config.image_size, title=title).save(
            out_dir / f"{method.name}.png")

    scored = expected is not None
    print(f"image: {image_path}\nquestion: {question}\nexpected answer: {expected if scored else '(not given)'}\n")
    print("| method | visual tokens | answer |" + (" correct |" if scored else "") + " prefill / dense |")
    print("| --- | --- | --- |" + (" --- |" if scored else "") + " --- |")
    for name, tokens, answer, ratio in rows:
        correct = (" yes |" if is_correct(answer, expected) else " no |") if scored else ""
        print(f"| {name} | {tokens} | {answer} |{correct} {ratio:.2f} |")
    for line in skipped:
        print(f"skipped {line}")
    print(f"\nprefill ratios: median of {args.repeats} runs each, same process; heatmaps in {out_dir}/")
    return 0
