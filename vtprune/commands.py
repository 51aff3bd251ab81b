"""The arguments of every `vtprune` subcommand, built without importing torch, transformers or any method, so that
`vtprune --help` and each `vtprune <command> --help` answer at once.

Each subcommand's function is named by its module (`command("vtprune.tune:run_tune")`) and imported only when the
command runs. Defaults that need torch (the device) are resolved by the command: the help says what they become.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

PACKAGE = Path(__file__).resolve().parent
EMBEDDED = "toy"  # the small trained LLaVA shipped inside the package (vtprune.loading.EMBEDDED)
LLAVA_15_7B = "llava-1.5-7b"  # bench's random-weight shapes (vtprune.eval.shapes.SHAPES)
SHAPES = (LLAVA_15_7B, "qwen3-vl-image", "qwen3-vl-video")
DTYPES = ("float32", "bfloat16", "float16", "float64")
AUTO_DEVICE = "default: cuda when available, else cpu"


def command(target: str, needs: tuple[str, ...] = ()) -> Callable[[argparse.Namespace], int]:
    """The function `module:name`, imported when the command runs (not when the parser is built). `needs`: modules
    of an optional extra, looked up first so that a missing one is named at once (see `vtprune.cli.EXTRAS`), not
    after torch and transformers have loaded."""
    module, name = target.split(":")

    def run(args: argparse.Namespace) -> int:
        for needed in needs:
            if importlib.util.find_spec(needed) is None:
                raise ModuleNotFoundError(f"No module named {needed!r}", name=needed)
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = f"command({target!r})"
    return run


def module_doc(relative_path: str) -> str:
    """The docstring of a module of the package, read from its source without importing it."""
    source = (PACKAGE / relative_path).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source), clean=False) or ""


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of tokens, repeats, trials)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def budget(text: str) -> Any:
    """argparse type: a budget (tokens per image, a ratio, or a preset name), see `vtprune.core.budget`."""
    from .core.budget import budget_argument

    return budget_argument(text)


def add_run(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="answer one question with and without pruning",
        description="Answer one question about one or more images with the dense model and with a method. Give only "
        "the question as --prompt: the command adds the model's chat template and one image token per --image "
        "(a prompt written as 'USER: <image>\\n... ASSISTANT:' is reduced to its question).",
    )
    p.add_argument("--model", default=EMBEDDED, help="hub id or local path; 'toy' is the embedded default model")
    p.add_argument("--image", action="append", required=True, help="image file (repeat for several images)")
    p.add_argument("--prompt", required=True, help="the question (the chat template is added for you)")
    p.add_argument("--method", default="vtc-cls", help="a method of `vtprune methods` (default: %(default)s)")
    p.add_argument("--keep", type=budget, help="the budget: tokens per image (int) or a ratio; default: the method's")
    p.add_argument("--preset", help="a preset of the method (e.g. transprune: high, low) or a JSON file from `tune`")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="method option, repeatable")
    p.add_argument("--heatmap", help="write the image, the method's scores and the kept tokens to this PNG")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="(default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="prefill timing repeats (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the model's)")
    p.set_defaults(func=command("vtprune.cli:run"))


def add_example(subparsers: Any) -> None:
    p = subparsers.add_parser("example", help="every method on one image and question (default: the bundled example)")
    p.add_argument("--model", default=EMBEDDED, help="hub id or local path; 'toy' is the embedded default model")
    p.add_argument("--image", help="image file (default: the bundled example)")
    p.add_argument("--question", help="the question about --image (required with --image)")
    p.add_argument("--answer", help="expected answer, for the 'correct' column")
    p.add_argument("--keep", type=positive_int, default=64, help="visual tokens kept per image (default: %(default)s)")
    p.add_argument("--methods", nargs="+", help="default: every available method")
    p.add_argument("--out", default="out/example", help="folder for the heatmaps")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="(default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=3, help="prefill timing repeats (default: %(default)s)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=command("vtprune.example:run_example"))


def add_tune(subparsers: Any) -> None:
    p = subparsers.add_parser("tune", help="tune a method's hyperparameters for a model and a budget")
    p.add_argument("--model", default=EMBEDDED, help="hub id or local path; 'toy' is the embedded default model")
    p.add_argument("--method", default="vflowopt")
    p.add_argument("--budget", help="the method's budget (vflowopt: average kept share, e.g. 0.25; visionzip: tokens)")
    p.add_argument("--trials", type=positive_int, default=50)
    p.add_argument("--samples", type=positive_int, default=30, help="calibration samples")
    p.add_argument("--calibration", help="folder of images (+ x.txt or questions.txt); default: generated scenes")
    p.add_argument("--image-size", type=int, default=336, help="side of generated calibration images")
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE", help="fixed method option")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "gp", "random"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="preset JSON to write (default: <method>-tuned.json)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=command("vtprune.tune:run_tune", needs=("optuna",)))


def add_convert(subparsers: Any) -> None:
    """`vtprune convert longva SRC DST`."""
    convert = subparsers.add_parser("convert", help="convert a checkpoint into a layout vtprune supports")
    kinds = convert.add_subparsers(dest="kind", required=True)
    longva = kinds.add_parser("longva", help="LongVA (LLaVA-Qwen layout) -> LlavaOnevisionForConditionalGeneration")
    longva.add_argument("source", help="LongVA checkpoint folder (config.json + safetensors)")
    longva.add_argument("target", help="output folder")
    longva.add_argument(
        "--vision-tower", help="local CLIP folder: its config, and weights if the checkpoint lacks them"
    )
    longva.set_defaults(func=command("vtprune.convert:run_convert"))


def add_bench(subparsers: Any) -> None:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = subparsers.add_parser("bench", help="speed, memory, KV cache and FLOPs of methods vs dense, as ratios",
                              description=module_doc("eval/bench.py"), formatter_class=Formatter)
    p.add_argument("--models", "--model", nargs="+", default=[EMBEDDED],
                   help=f"toy (the embedded model), {', '.join(SHAPES)} (random weights, sized by the four options "
                   "below; see vtprune/eval/shapes.py), "
                   "or a local path / hub id")
    p.add_argument("--methods", nargs="+", default=None,
                   help="NAME or NAME:opt=value,opt=value; default: every method (fastv at layer=2). vflowopt runs at "
                   "keep=N like the others; its presets keep10/25/50 fix the average share kept over the LM's layers, "
                   "not the final count, so keep50 can end with fewer tokens than keep25")
    p.add_argument("--budgets", nargs="+", type=budget, default=[64, 128], help="keep values (int or ratio)")
    p.add_argument("--llm-layers", type=int, default=4, help="shapes: decoder layers (LLaVA-1.5-7B: 32, Qwen3-VL-8B: 36)")
    p.add_argument("--llm-hidden", type=int, default=512, help="shapes: LM width, heads of 128 (real: 4096)")
    p.add_argument("--vision-layers", type=int, default=2, help="shapes: vision encoder layers (real: 24, 27)")
    p.add_argument("--vision-hidden", type=int, default=256,
                   help="shapes: vision encoder width (real: 1024, 1152)")
    p.add_argument("--text-tokens", type=int, default=60, help="shapes: prompt text around the image or video")
    p.add_argument("--question", default="what is in the picture?", help="prompt for loaded models")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated for the end-to-end time")
    p.add_argument("--batch", type=positive_int, default=1,
                   help=f"prompts per call ({LLAVA_15_7B}: sample b holds 1 + b %% 2 images, a ragged batch; "
                   "a loaded model repeats its prompt)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:N ({AUTO_DEVICE})")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"],
                   help="the model's attention implementation (flash_attention_2 needs the flash-attn package)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one prefill per row: time in vtprune's stages and host syncs (profile.md)")
    p.add_argument("--out", help="folder for bench.md / .csv / .json / .png")
    p.set_defaults(func=command("vtprune.eval.bench:run_bench"))


def add_eval(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="accuracy and cost of methods x budgets through lmms-eval, one table",
                              description=module_doc("eval/grid.py"),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="llava_hf", help="lmms-eval model family (see vtprune.eval.lmms.BASES)")
    p.add_argument("--pretrained", default=EMBEDDED, help="hub id or local path; 'toy' is the embedded model")
    p.add_argument("--methods", nargs="+", default=["vtc-cls", "fastv:layer=2"],
                   help="NAME or NAME:opt=value,...; a method with a preset (NAME:preset=P) runs once")
    p.add_argument("--budgets", nargs="+", type=budget, default=[64, 128])
    p.add_argument("--tasks", nargs="+", default=["vtprune_toy_vqa"])
    p.add_argument("--include-path", help="lmms-eval task folder (default: vtprune's tasks)")
    p.add_argument("--limit", type=float, help="documents per task (lmms-eval --limit)")
    p.add_argument("--gen-kwargs", help="lmms-eval --gen_kwargs, e.g. max_new_tokens=8")
    p.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                   help="argument of the base class, e.g. device_map=cpu, dtype=bfloat16 (repeatable)")
    p.add_argument("--device", default=None, help=f"cpu, cuda, cuda:N ({AUTO_DEVICE})")
    p.add_argument("--force-simple", action="store_true", help="lmms-eval's simple model class instead of chat")
    p.add_argument("--out", help="folder for eval.md / .csv / .json")
    p.set_defaults(func=command("vtprune.eval.grid:run_eval", needs=("lmms_eval",)))


def add_demo(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="a web page: what each method keeps, the answers, and what it costs")
    p.add_argument("--model", default=EMBEDDED, help="preselected model: 'toy' (embedded), a local path or a hub id")
    p.add_argument("--device", default=None, help=AUTO_DEVICE)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too (see --allow-hub)")
    p.add_argument("--allow-hub", action="store_true",
                   help="let visitors load any hub model by name (a download on this server); by default only 'toy', "
                   "local folders and --model")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--examples-dir", default=None,
                   help="where the bundled examples are generated (default: vtprune-demo-examples in the temp folder)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="paired prefill timings per method")
    p.add_argument("--frames", type=int, default=4, help="frames sampled from a video")
    p.set_defaults(func=command("vtprune.demo:serve", needs=("gradio",)))


def add_methods(subparsers: Any) -> None:
    subparsers.add_parser(
        "methods", help="the available methods: sites, budget, options with defaults",
    ).set_defaults(func=command("vtprune.cli:list_methods"))


COMMANDS = (add_run, add_example, add_tune, add_convert, add_bench, add_eval, add_demo, add_methods)
