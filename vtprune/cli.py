"""The `vtprune` command line: `run` (one question, dense vs pruned), and the subcommands other modules add."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from .core.budget import budget_argument


def answer(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def run(args: argparse.Namespace) -> int:
    import vtprune
    from PIL import Image

    from .eval.speed import prefill_seconds
    from .loading import load, prepare
    from .viz import heatmap

    options = vtprune.core.parse_options(vtprune.core.method_class(args.method), args.option, args.method)
    if args.keep is not None:
        options = {"keep": args.keep, **options}
    method = vtprune.make(args.method, preset=args.preset, **options)
    model, processor = load(args.model, device=args.device)
    images = [Image.open(path) for path in args.image]
    inputs = prepare(processor, images, args.prompt, device=model.device)

    dense_answer = answer(model, processor, inputs, args.max_new_tokens)
    with method(model) as trace:
        pruned_answer = answer(model, processor, inputs, args.max_new_tokens)
    dense_time = prefill_seconds(model, inputs, repeats=args.repeats)
    pruned_time = prefill_seconds(model, inputs, method, repeats=args.repeats)
    before, after = trace.visual_tokens(0)[0]

    print(f"method        {method!r}")
    print(f"visual tokens {before} -> {after}")
    print(f"dense answer  {dense_answer}")
    print(f"pruned answer {pruned_answer}")
    print(f"prefill time  {pruned_time / dense_time:.2f}x of dense (median of {args.repeats}, same run)")
    if args.heatmap:
        out = Path(args.heatmap)
        out.parent.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            scores, kept = trace.image_map(index, forward=0)
            target = out if len(images) == 1 else out.with_name(f"{out.stem}_{index}{out.suffix}")
            heatmap(image, scores, kept, side=model.config.vision_config.image_size).save(target)
            print(f"heatmap       {target}")
    return 0


def add_run(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="answer one question with and without pruning")
    p.add_argument("--model", default="toy", help="hub id or local path; 'toy' is the embedded default model")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--method", default="vtc-cls")
    p.add_argument("--keep", type=budget_argument, help="the budget: tokens per image (int) or a ratio; default: the method's")
    p.add_argument("--preset", help="a preset of the method (e.g. transprune: high, low) or a JSON file from `tune`")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option, repeatable")
    p.add_argument("--heatmap", help="write the image, the method's scores and the kept tokens to this PNG")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="prefill timing repeats")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    import vtprune

    from .convert import add_convert
    from .demo import add_demo
    from .eval.bench import add_bench
    from .eval.grid import add_eval
    from .example import add_example
    from .tune import add_tune

    parser = argparse.ArgumentParser(prog="vtprune", description="Visual-token pruning for vision-language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_run(subparsers)
    add_example(subparsers)
    add_tune(subparsers)
    add_convert(subparsers)
    add_bench(subparsers)
    add_eval(subparsers)
    add_demo(subparsers)
    subparsers.add_parser("methods", help="list the available methods").set_defaults(
        func=lambda args: print("\n".join(vtprune.available())) or 0
    )
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except vtprune.VTPruneError as error:
        print(f"vtprune: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
