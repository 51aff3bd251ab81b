"""What one demo request computes, without any Gradio: the dense and pruned answers, the visual tokens kept, prefill
time and peak memory as ratios to the dense model measured in the same request, and a heatmap per image or frame.

Errors a user can cause (no file, a file that is no image or video, an empty question, a bad budget or option, a
model path that does not exist, a method the model's adapter refuses) are VTPruneErrors with a readable message.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

import vtprune

from .. import core
from ..core.errors import VTPruneError
from ..core.method import Method, method_class
from ..eval.memory import peak_tensor_bytes
from ..eval.speed import median_seconds, prefill
from ..example import generate_answer
from ..loading import EMBEDDED, load
from ..viz import heatmap
from .media import Media, model_inputs, read_media

log = logging.getLogger(__name__)
PANEL_SIDE = 336  # pixels of each heatmap panel
Progress = Callable[[float, str], None]


@dataclass
class Request:
    """One click on Run or Compare."""

    files: list[str]
    question: str
    model: str
    methods: list[str]
    budget: str = ""  # visual tokens per image ("64"), a ratio ("0.25"), or "" for each method's default
    options: str = ""  # "name=value ..." passed to every method
    preset: str | None = None
    frames: int = 4  # frames sampled from a video
    max_new_tokens: int = 16
    repeats: int = 3  # paired prefill timings (dense, pruned) per method


@dataclass
class Measured:
    """The dense model or one method on one request."""

    name: str
    answer: str = ""
    visual: tuple[int, int] | None = None  # visual tokens at the language-model input, after the last cut
    seconds: float | None = None  # median prefill time
    time_ratio: float | None = None  # median over paired runs of (pruned / dense) prefill time
    peak_bytes: int | None = None  # peak memory of one prefill (see `peak_tensor_bytes`)
    heatmaps: list[tuple[Image.Image, str]] = field(default_factory=list)  # (panels, caption) per image or frame
    error: str | None = None  # why this method gave no result (e.g. refused by the model's adapter)


@dataclass
class Report:
    dense: Measured
    runs: list[Measured]
    notes: list[str]
    seconds: float  # wall time of the whole request


def parse_budget(text: str) -> int | float | None:
    """"64" -> 64 tokens per image, "0.25" -> a ratio, "" -> None (each method's default)."""
    text = (text or "").strip()
    if not text:
        return None
    budget = core.parse_budget(text)
    if isinstance(budget, str):
        raise VTPruneError(f"budget {text!r}: give visual tokens per image (e.g. 64) or a ratio (e.g. 0.25)")
    return budget


def parse_option_text(text: str) -> dict[str, Any]:
    """"start_layer=2, scope=sample keep_ratios=(0.5, 0.2)" -> {"start_layer": 2, "scope": "sample", ...}."""
    pairs = [p.strip() for p in re.split(r"[,\s]+(?=[A-Za-z_]\w*\s*=)", (text or "").strip().strip(",")) if p.strip()]
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise VTPruneError(f"options are name=value pairs, e.g. start_layer=2; cannot read {bad[0]!r}")
    return core.parse_pairs([re.sub(r"\s*=\s*", "=", p, count=1) for p in pairs])


def option_fields(name: str) -> dict[str, Any]:
    """The options of a method with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(method_class(name))}


def build_methods(
    names: list[str], budget: int | float | None, options: dict[str, Any], preset: str | None
) -> tuple[list[Method], list[str]]:
    """The methods to run and notes for the user. The budget (visual tokens per image) goes to every method whose budget
    counts visual tokens; the others run at their own budget, and a note says what it counts."""
    if not names:
        raise VTPruneError("choose at least one method")
    methods, notes = [], []
    for name in names:
        kind = core.method_class(name).budget_kind
        extra = {"keep": budget} if budget is not None and kind is core.VISUAL_TOKENS else {}
        method = vtprune.make(name, preset=preset or None, **{**options, **extra})
        if budget is not None and not extra:
            notes.append(f"{name}'s budget counts {kind.unit}; it runs at its own keep={method.keep}")
        methods.append(method)
    return methods, notes


class ModelLoading(VTPruneError):
    """The model a request names is still loading in the background: the request is answered at once with this
    message (the page shows it as a status, not an error) and other visitors' requests are served meanwhile."""


@dataclass
class LoadJob:
    name: str
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Models:
    """One model slot. A model is loaded in a background thread, never on a request's own time: while it loads, the
    model already in the slot keeps answering other requests, and a request for the loading model waits at most
    `wait_s` seconds (None: until it is loaded) and is then told to ask again. The new model replaces the old one
    when it is ready (both are in memory during the load). One load at a time."""

    def __init__(
        self,
        device: str | None = None,
        preselected: str = EMBEDDED,
        allow_hub: bool = False,
        loader: Callable[..., tuple[Any, Any]] = load,
        wait_s: float | None = None,
    ) -> None:
        self.device = device or ("cuda" if torch.cuda.is_available() else None)
        self.preselected = preselected  # named on the command line by whoever started the server: always allowed
        self.allow_hub = allow_hub  # whether a visitor may name any hub id (a download on the server)
        self.loader = loader  # (name, device=...) -> (model, processor)
        self.wait_s = wait_s
        self.name: str | None = None
        self.loaded: tuple[Any, Any] | None = None
        self.job: LoadJob | None = None  # the load in progress
        self.failed: dict[str, BaseException] = {}  # a background load's error, reported to the next request for it
        self.slot = threading.Lock()  # guards the fields above; never held while a model loads or runs

    def get(self, name: str) -> tuple[Any, Any]:
        """The model and processor named `name`, loaded in the background if needed (see the class)."""
        name = (name or "").strip()
        if not name:
            raise VTPruneError("choose a model: 'toy', a local folder saved with save_pretrained, or a hub id")
        job = self.start(name)
        if job is None:
            return self.loaded_as(name)
        if not job.done.wait(self.wait_s):
            raise ModelLoading(
                f"loading model {name!r} in the background ({time.monotonic() - job.started:.0f} s so far); other "
                "requests are answered meanwhile: run again in a moment"
            )
        with self.slot:
            self.failed.pop(name, None)
        if job.error is not None:
            raise job.error
        return self.loaded_as(name)

    def start(self, name: str) -> LoadJob | None:
        """Start loading `name` in the background unless it is loaded (None) or loading; its load job. A load that
        failed is reported once, to the next request for it."""
        with self.slot:
            if name == self.name:
                return None
            if name in self.failed:
                raise self.failed.pop(name)
            if self.job is not None:
                if self.job.name == name:
                    return self.job
                raise ModelLoading(
                    f"the server is loading model {self.job.name!r} ({time.monotonic() - self.job.started:.0f} s so "
                    f"far) and loads one model at a time: run again when it is ready, or use {self.name or 'it'}"
                )
            self.check(name)  # a name this server refuses fails at once, without a thread
            self.job = LoadJob(name)
        threading.Thread(target=self._load, args=(self.job,), name=f"vtprune-demo-load-{name}", daemon=True).start()
        return self.job

    def start_quietly(self, name: str) -> None:
        """Start loading `name` if it is neither loaded nor loading nor failed; errors wait for `get`."""
        name = (name or "").strip()
        with self.slot:
            if not name or name == self.name or name in self.failed or self.job is not None:
                return
        try:
            self.start(name)
        except VTPruneError:
            pass

    def loaded_as(self, name: str) -> tuple[Any, Any]:
        with self.slot:
            if name != self.name or self.loaded is None:  # another load replaced it meanwhile
                raise ModelLoading(f"model {name!r} was replaced by {self.name!r} meanwhile: run again")
            return self.loaded

    def status(self) -> str:
        """One line for the page: the model in the slot and the load in progress."""
        with self.slot:
            now = f"model: {self.name}" if self.name else "no model loaded yet"
            if self.job is not None:
                now += f"; loading {self.job.name} ({time.monotonic() - self.job.started:.0f} s)"
            return now

    def check(self, name: str) -> None:
        local = name == EMBEDDED or Path(name).expanduser().exists() or name.startswith(("/", ".", "~"))
        if not (local or name == self.preselected or self.allow_hub):
            raise VTPruneError(
                f"model {name!r} is not a local folder; this server loads hub models only when started with "
                "--allow-hub (or with --model naming it)"
            )
        if name != EMBEDDED and name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
            raise VTPruneError(f"model path {name!r} does not exist")

    def _load(self, job: LoadJob) -> None:
        """The background thread: load, then put the model in the slot (or keep the error for the next request)."""
        name = job.name
        try:
            loaded = self.loader(str(Path(name).expanduser()) if name.startswith("~") else name, device=self.device)
        except VTPruneError as error:
            job.error = error
        except Exception as error:  # transformers' errors for a folder without a model, an unknown hub id, ...
            log.exception("loading model %s failed", name)
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            job.error = VTPruneError(f"cannot load model {name!r}: {first}")
        with self.slot:
            if job.error is None:
                self.name, self.loaded = name, loaded
            else:
                self.failed[name] = job.error
            self.job = None
        job.done.set()
        gc.collect()  # the model this one replaced


def paired_seconds(baseline: Callable[[], Any], other: Callable[[], Any], repeats: int) -> tuple[list[float], list[float]]:
    """Times of `baseline` and `other` run back to back `repeats` times (after one warm-up each), so that the load of
    a shared machine weighs on both alike."""
    baseline(), other()
    pairs = [(median_seconds(baseline, 1, 0), median_seconds(other, 1, 0)) for _ in range(max(1, repeats))]
    return [b for b, _ in pairs], [o for _, o in pairs]


def center_crops(processor: Any, kind: str) -> bool:
    """Whether the model saw this image center-cropped to a square (LLaVA-1.5's CLIP processor) rather than resized
    whole (anyres base views, video frames, Qwen2-VL)."""
    return kind == "image" and bool(getattr(getattr(processor, "image_processor", None), "do_center_crop", False))


def heatmaps(trace: vtprune.Trace, processor: Any, media: Media) -> list[tuple[Image.Image, str]]:
    """Per image or frame: the model's view, the method's scores and the kept tokens (prefill of the answer)."""
    out = []
    for index, (image, name) in enumerate(zip(media.images, media.names)):
        scores, kept = trace.image_map(index, forward=0)
        kind = trace.image_view(index, forward=0)[1].kind
        view = image if center_crops(processor, kind) else image.resize((PANEL_SIDE, PANEL_SIDE))
        what = {"base": " (base view)", "thumbnail": " (thumbnail)"}.get(kind, "")
        caption = f"{name}{what}: {int(kept.sum())} of {kept.numel()} patches kept"
        out.append((heatmap(view, scores, kept, side=PANEL_SIDE, title=caption), caption))
    return out


def visual_token_count(model: Any, inputs: dict) -> int:
    """Image and video placeholder tokens in the prompt: the dense model's visual tokens."""
    config = model.config
    ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")}
    return sum(int((inputs["input_ids"] == i).sum()) for i in ids if isinstance(i, int))


def measure_method(
    model: Any, processor: Any, inputs: dict, media: Media, method: Method, request: Request
) -> tuple[Measured, list[float]]:
    """Answer with `method`, record what it kept, time its prefill against the dense one, measure its memory.

    Returns the result and the dense prefill times measured in pairs with it."""
    run, dense_times = Measured(name=method.name), []
    try:
        with method(model) as trace:
            run.answer = generate_answer(model, processor, inputs, request.max_new_tokens)
        run.visual = trace.visual_tokens(0)[0]
        dense_times, times = paired_seconds(prefill(model, inputs), prefill(model, inputs, method), request.repeats)
        run.seconds = statistics.median(times)
        run.time_ratio = statistics.median(t / d for t, d in zip(times, dense_times))
        run.peak_bytes = peak_tensor_bytes(prefill(model, inputs, method), model.device)
        run.heatmaps = heatmaps(trace, processor, media)
    except VTPruneError as error:  # a refused method, a budget larger than an image's tokens, ...
        run.error = str(error)
    except Exception as error:  # a bug must not take the page down: show it, log the traceback
        log.exception("method %s failed", method.name)
        run.error = f"{type(error).__name__}: {error}"
    return run, dense_times


def run(request: Request, models: Models, progress: Progress = lambda fraction, text: None) -> Report:
    """Check the request (cheap checks first), load the model, then measure the dense model and every method."""
    start = time.perf_counter()
    if not (request.question or "").strip():
        raise VTPruneError("ask a question: the question box is empty")
    budget = parse_budget(request.budget)
    methods, notes = build_methods(request.methods, budget, parse_option_text(request.options), request.preset)
    progress(0.02, "reading the upload")
    media = read_media(request.files, request.frames)
    progress(0.05, f"loading model {request.model}")
    model, processor = models.get(request.model)
    inputs, input_notes = model_inputs(processor, media, request.question.strip(), device=model.device)
    progress(0.15, "dense answer")
    dense = Measured(name="dense", answer=generate_answer(model, processor, inputs, request.max_new_tokens))
    count = visual_token_count(model, inputs)
    dense.visual = (count, count)
    dense.peak_bytes = peak_tensor_bytes(prefill(model, inputs), model.device)
    runs, dense_times = [], []
    for index, method in enumerate(methods):
        progress(0.2 + 0.8 * index / len(methods), f"{method.name}: answer, prefill timing, memory, heatmaps")
        result, times = measure_method(model, processor, inputs, media, method, request)
        runs.append(result)
        dense_times += times
    dense.seconds = statistics.median(dense_times) if dense_times else None
    return Report(dense=dense, runs=runs, notes=input_notes + notes, seconds=time.perf_counter() - start)


class Demo:
    """The state behind the page: the model slot, and a lock so that one request at a time patches the model.

    `load_wait_s`: how long a request waits for a model that is loading (None: until it is loaded, for scripts and
    tests; the page uses a few seconds so a slow load never holds the request queue)."""

    def __init__(
        self,
        model: str = EMBEDDED,
        device: str | None = None,
        allow_hub: bool = False,
        loader: Callable[..., tuple[Any, Any]] = load,
        load_wait_s: float | None = None,
    ) -> None:
        self.default_model = model
        self.models = Models(device, preselected=model, allow_hub=allow_hub, loader=loader, wait_s=load_wait_s)
        self.lock = threading.Lock()

    def run(self, request: Request, progress: Progress = lambda fraction, text: None) -> Report:
        self.models.start_quietly(request.model)  # a load starts at once, even while another request runs
        with self.lock:
            return run(request, self.models, progress)
