"""`vtprune tune`: a method's hyperparameters for a model and a budget, by VFlowOpt's flow-guided objective.

Objective (maximised): the mean, over a calibration set, of cos(h_dense, h_pruned), where h is the language model's
final hidden state (after its last norm) at the last prompt token — the state the LM head turns into the first answer
token. A NaN similarity counts as 0, as in the official optimiser; so does a trial whose options the method refuses
(those are counted and reported). Any method that declares `search_space(info, budget)` (see `vtprune.core.search`)
can be tuned. Search: Optuna (seeded TPE by default). The untuned defaults are scored first and, when they lie inside
the box, enqueued as the first trial. The result is a JSON preset for `vtprune.make(name, preset=path)`.

Calibration: images with a question each, read from a folder (image files; the question of `x.png` is `x.txt`, else a
line of `questions.txt`, else a default) or generated (shapes on textured backgrounds, template questions).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .core import (
    Choice,
    IntRange,
    Method,
    Uniform,
    VTPruneError,
    adapter_for,
    method_class,
    parse_budget,
    parse_options,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_QUESTION = "Describe the image."
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "black": (20, 20, 20), "white": (240, 240, 240), "purple": (140, 60, 180), "orange": (240, 140, 30)}
QUESTIONS = ("What color is the {shape}?", "How many shapes are in the image?", "Where is the {color} {shape}?",
             "Is there a {color} {shape} in the image?", "Describe the image.", "What shape is {color}?")


def synthetic_calibration(samples: int, seed: int = 0, size: int = 336) -> list[tuple[Image.Image, str]]:
    """`samples` generated scenes: a few coloured shapes on a noisy, striped background, and a question about them."""
    rng = random.Random(seed)
    out = []
    for _ in range(samples):
        background = tuple(rng.randrange(256) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        stripe = max(2, size // rng.randint(6, 24))
        for x in range(0, size, 2 * stripe):
            draw.rectangle([x, 0, x + stripe - 1, size], fill=tuple(min(255, c + rng.randint(0, 40)) for c in background))
        names = []
        for _ in range(rng.randint(1, 4)):
            color, shape = rng.choice(list(COLORS)), rng.choice(["square", "circle"])
            x0, y0 = rng.randrange(size * 3 // 4), rng.randrange(size * 3 // 4)
            extent = rng.randint(size // 10, size // 3)
            box = [x0, y0, min(size - 1, x0 + extent), min(size - 1, y0 + extent)]
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
            names.append((color, shape))
        color, shape = rng.choice(names)
        out.append((image, rng.choice(QUESTIONS).format(color=color, shape=shape)))
    return out


def folder_calibration(folder: Path, samples: int | None = None) -> list[tuple[Image.Image, str]]:
    """Images of `folder` (sorted) with their questions: `<stem>.txt`, else lines of `questions.txt` in turn."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise VTPruneError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the calibration folder {folder}")
    shared = folder / "questions.txt"
    lines = [l.strip() for l in shared.read_text().splitlines() if l.strip()] if shared.is_file() else []
    out = []
    for i, path in enumerate(images[:samples]):
        own = path.with_suffix(".txt")
        question = own.read_text().strip() if own.is_file() else (lines[i % len(lines)] if lines else DEFAULT_QUESTION)
        out.append((Image.open(path).convert("RGB"), question))
    return out


def last_prompt_state(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """[B, D] final hidden state at the last prompt token (the LM head's input), in float32."""
    seen = {}

    def capture(module: torch.nn.Module, args: tuple) -> None:
        seen["h"] = args[0][:, -1].detach().float()

    handle = model.get_output_embeddings().register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return seen["h"]


def flow_similarity(model: torch.nn.Module, calibration: list[dict], references: list[torch.Tensor], method: Method) -> float:
    """Mean cosine similarity of the pruned and dense last-prompt-token states (NaN counts as 0)."""
    total = 0.0
    with method(model):
        for inputs, reference in zip(calibration, references):
            cosine = float(F.cosine_similarity(last_prompt_state(model, inputs), reference, dim=-1).mean())
            total += 0.0 if math.isnan(cosine) else cosine
    return total / len(calibration)


@dataclass
class TuneResult:
    method: str
    options: dict[str, Any]  # the budget's fixed options and the best tuned values
    objective: float
    default_objective: float
    trials: int
    failed_trials: int
    extra: dict[str, Any] = field(default_factory=dict)
    tuned: tuple[str, ...] = ()  # the searched options (the others are fixed by the budget or --option)
    first_failure: str = ""

    def preset(self) -> dict[str, Any]:
        return {"method": self.method, "options": self.options, "objective": self.objective,
                "default_objective": self.default_objective, "trials": self.trials,
                "failed_trials": self.failed_trials, **self.extra}


def _suggest(trial: Any, name: str, param: Any) -> Any:
    if isinstance(param, Uniform):
        return trial.suggest_float(name, param.low, param.high)
    if isinstance(param, IntRange):
        return trial.suggest_int(name, param.low, param.high)
    if isinstance(param, Choice):
        return trial.suggest_categorical(name, list(param.values))
    raise VTPruneError(f"unknown search range {param!r} for option {name!r}")


def _inside(value: Any, param: Any) -> bool:
    if isinstance(param, Choice):
        return value in param.values
    return isinstance(value, (int, float)) and param.low <= value <= param.high


def tune(
    model: torch.nn.Module,
    calibration: list[dict],
    name: str,
    budget: Any = None,
    trials: int = 50,
    seed: int = 0,
    fixed: dict[str, Any] | None = None,
    sampler: str = "tpe",
    progress: bool = True,
) -> TuneResult:
    """Tune method `name` on prepared calibration inputs; returns the best options and both objectives."""
    import optuna
    from tqdm.auto import tqdm

    cls = method_class(name)
    if not hasattr(cls, "search_space"):
        raise VTPruneError(f"method {name!r} declares no search space, so it cannot be tuned")
    info = adapter_for(model)(model).info
    space, budget_options = cls.search_space(info, budget)
    fixed = {**budget_options, **(fixed or {})}
    space = {k: v for k, v in space.items() if k not in fixed}
    references = [last_prompt_state(model, inputs) for inputs in calibration]

    defaults = cls(**fixed)
    default_objective = flow_similarity(model, calibration, references, defaults)
    failures = []

    def objective(trial: Any) -> float:
        options = {**fixed, **{k: _suggest(trial, k, p) for k, p in space.items()}}
        try:
            return flow_similarity(model, calibration, references, cls(**options))
        except VTPruneError as error:  # options the method refuses score 0, like a NaN similarity
            failures.append(str(error))
            trial.set_user_attr("error", str(error))
            return 0.0

    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "gp": lambda: optuna.samplers.GPSampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed)}
    if sampler not in samplers:
        raise VTPruneError(f"sampler {sampler!r}: use one of {', '.join(samplers)}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=samplers[sampler]())
    start = {k: getattr(defaults, k) for k in space}
    if all(_inside(start[k], p) for k, p in space.items()):
        study.enqueue_trial(start)
    with tqdm(total=trials, desc=f"tune {name}", disable=not progress) as bar:
        def update(study: Any, trial: Any) -> None:
            bar.update(1)
            bar.set_postfix(best=f"{study.best_value:.5f}", default=f"{default_objective:.5f}")

        study.optimize(objective, n_trials=trials, callbacks=[update])
    best = {**fixed, **study.best_params}
    return TuneResult(name, best, study.best_value, default_objective, trials, len(failures), tuned=tuple(space),
                      first_failure=failures[0] if failures else "")


def run_tune(args: argparse.Namespace) -> int:
    import optuna  # noqa: F401  (a missing extra fails here, before the model loads)

    from .loading import load, prepare

    fixed = parse_options(method_class(args.method), args.option, args.method)
    model, processor = load(args.model, device=args.device)
    if args.calibration:
        pairs = folder_calibration(Path(args.calibration), args.samples)
    else:
        pairs = synthetic_calibration(args.samples, seed=args.seed, size=args.image_size)
    calibration = [prepare(processor, [image], question, device=model.device) for image, question in pairs]
    budget = None if args.budget is None else parse_budget(args.budget)
    result = tune(model, calibration, args.method, budget=budget, trials=args.trials, seed=args.seed,
                  fixed=fixed, sampler=args.sampler)
    result.extra = {"model": str(args.model), "budget": budget, "sampler": args.sampler, "seed": args.seed,
                    "calibration": {"samples": len(calibration), "source": args.calibration or "synthetic"}}
    out = Path(args.out or f"{args.method}-tuned.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.preset(), indent=2) + "\n")
    print(f"untuned defaults  objective {result.default_objective:.6f}")
    print(f"best of {result.trials:<8} objective {result.objective:.6f}"
          + (f"  ({result.failed_trials} trials refused by the method, scored 0)" if result.failed_trials else ""))
    print(f"options           {json.dumps(result.options)}")
    untuned = method_class(args.method)(**{k: v for k, v in result.options.items() if k not in result.tuned})
    if all(getattr(untuned, k) == v for k, v in result.options.items()) or result.objective <= result.default_objective:
        print("note              the tuned preset is no better than the untuned defaults (same options or objective): "
              "try more --trials, more --samples or another --budget")
    if result.failed_trials:
        print(f"note              {result.failed_trials} of {result.trials} trials had options the method refused "
              "(first: " + result.first_failure + ")")
    print(f"preset            {out}  (vtprune.make({args.method!r}, preset={str(out)!r}))")
    return 0
