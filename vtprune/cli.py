"""The `vtprune` command line: `run` (one question, dense vs pruned), and the subcommands other modules add.

One error style for every command: a bad input exits with status 2 and one line on stderr naming the problem and the
fix (argparse's usage errors included); `--debug` shows the traceback instead. A missing optional dependency names
the extra to install. Heavy modules (torch, transformers) are imported by the command that runs, not here: the
parser (`vtprune.commands`) imports none of them, so every `--help` answers at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .commands import COMMANDS

EXTRAS = {  # module a command needs -> the extra of pyproject.toml that installs it
    "gradio": "demo", "lmms_eval": "eval", "accelerate": "eval", "optuna": "tune", "open_clip": "clip",
    "decord": "video", "av": "video", "triton": "triton",
}


class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: `vtprune run: --image is required (see vtprune run --help)`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def answer(model: Any, processor: Any, inputs: dict, max_new_tokens: int) -> str:
    import torch

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()


def run(args: argparse.Namespace) -> int:
    import vtprune

    from .eval.speed import prefill_seconds
    from .loading import (
        check_device,
        check_model,
        load,
        prepare,
        question_text,
        read_image,
    )
    from .viz import heatmap

    # every check a user's input can fail runs before the model loads
    question, stripped = question_text(args.prompt)
    options = vtprune.core.parse_options(vtprune.core.method_class(args.method), args.option, args.method)
    preset = args.preset
    if isinstance(args.keep, str):  # a budget that is a name is a preset of the method (e.g. --keep high)
        if preset is not None:
            raise vtprune.VTPruneError(f"--keep {args.keep} names a preset and --preset {preset} another; give one")
        preset = args.keep
    elif args.keep is not None:
        options = {"keep": args.keep, **options}
    method = vtprune.make(args.method, preset=preset, **options)
    images = [read_image(path) for path in args.image]
    check_device(args.device)
    check_model(args.model)
    if stripped:
        print("note: the chat template was taken off the prompt; vtprune run adds the model's own, one image token "
              "per --image", file=sys.stderr)
    model, processor = load(args.model, device=args.device)
    inputs = prepare(processor, images, question, device=model.device)

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
            title = f"{method.name}: {int(kept.sum())} of {kept.numel()} visual tokens kept"
            heatmap(image, scores, kept, side=model.config.vision_config.image_size, title=title).save(target)
            print(f"heatmap       {target}")
    return 0


def list_methods(args: argparse.Namespace) -> int:
    """Per method: name, site(s), budget kind, options with defaults, and the first line of its docstring."""
    import dataclasses

    import vtprune

    for name in vtprune.available():
        cls = vtprune.core.method_class(name)
        doc = next((line.strip() for line in (cls.__doc__ or "").splitlines() if line.strip()), "")
        options = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
            for f in dataclasses.fields(cls) if f.name != "keep"
        )
        keep = next((f.default for f in dataclasses.fields(cls) if f.name == "keep"), None)
        print(f"{name}")
        print(f"  {doc}")
        print(f"  sites: {', '.join(cls.sites)}; positions: {getattr(cls, 'positions', '?')}")
        print(f"  budget: keep={keep!r}, {cls.budget_kind.meaning}")
        if cls.presets:
            print(f"  presets: {', '.join(cls.presets)}")
        print(f"  options: {options or 'none'}")
    return 0


def build_parser() -> Parser:
    parser = Parser(prog="vtprune", description="Visual-token pruning for vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in COMMANDS:
        add(subparsers)
    for sub in subparsers.choices.values():  # --debug after the command works too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def explain(error: BaseException, command: str | None) -> tuple[str, int]:
    """(the line to print, exit status) for an error that ended a command."""
    errors = sys.modules.get("vtprune.core.errors")  # not imported yet: the error cannot be a VTPruneError
    if errors is not None and isinstance(error, errors.VTPruneError):
        return one_line(error), 2
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in EXTRAS:
        module = error.name.split(".")[0]
        return (f"`vtprune {command}` needs {module}, which is not installed: "
                f"pip install 'vtprune[{EXTRAS[module]}]'"), 2
    if isinstance(error, MemoryError):
        return "out of memory: try a smaller model, fewer tokens or --device cuda", 2
    return f"unexpected error {type(error).__name__}: {one_line(error)} (rerun with --debug for the traceback)", 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("vtprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `vtprune methods | head`: the reader left, nothing is wrong
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as error:
        if debug:
            raise
        line, status = explain(error, next((a for a in argv if not a.startswith("-")), None))
        print(f"vtprune: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
