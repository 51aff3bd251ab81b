"""The Gradio page: one method (dense vs pruned answers, costs, heatmaps) or several compared on the same input.

Every handler turns errors into a readable message in the status box and returns; the server keeps serving.
Requests that run a model are queued one at a time (the model is patched while a method runs). A model loads in a
background thread, never on the queue's time: a request for a model still loading waits LOAD_WAIT_S at most and is
told to run again, while other visitors' requests keep being answered; a status line shows the load.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

import vtprune

from ..core.errors import VTPruneError
from ..core.method import method_class
from ..loading import EMBEDDED
from .backend import Demo, Measured, ModelLoading, Report, Request, option_fields
from .examples import EXAMPLES_DIR, bundled_examples

log = logging.getLogger(__name__)
LOAD_WAIT_S = 3.0  # how long a request waits for a model that is loading before it is told to run again
NO_PRESET = "none"
INTRO = """# vtprune: what each method keeps, and what it costs
Upload an image, several images (a screenshot sequence) or a video, ask a question, choose a method and a budget
(visual tokens kept per image, e.g. `64`, or a ratio such as `0.25`). The dense model and the pruned one answer the
same prompt; prefill time and peak memory are measured for both in the same request and shown as ratios."""


def size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}×" if numerator is not None and denominator else "–"


def metrics_table(report: Report, run: Measured, repeats: int) -> str:
    """Markdown: visual tokens, prefill time, peak memory; dense, pruned and their ratio."""
    dense = report.dense
    ms = lambda s: f"{1000 * s:.1f} ms" if s is not None else "–"  # noqa: E731
    rows = [
        f"| | dense | {run.name} | {run.name} / dense |",
        "| --- | --- | --- | --- |",
        f"| visual tokens | {dense.visual[0]} | {run.visual[1]} | {ratio(run.visual[1], dense.visual[0])} |",
        f"| prefill time (median of {repeats}) | {ms(dense.seconds)} | {ms(run.seconds)} | {run.time_ratio:.2f}× |",
        f"| peak memory of a prefill | {size(dense.peak_bytes)} | {size(run.peak_bytes)} | "
        f"{ratio(run.peak_bytes, dense.peak_bytes)} |",
    ]
    return "\n".join(rows)


def status(report: Report, done: str) -> str:
    notes = "".join(f"\n- {note}" for note in report.notes)
    return f"{done} in {report.seconds:.1f} s.{notes}"


def error_status(error: BaseException | str) -> str:
    return f"**Error:** {error}"


def compare_rows(report: Report) -> list[list[Any]]:
    """One row per configuration: method, visual tokens, kept share, answer, same answer as dense, time and memory
    ratios to dense, and the error of a method that gave no result."""
    dense = report.dense
    rows = [["dense", dense.visual[0], "1.00", dense.answer, "–", "1.00", "1.00", ""]]
    for run in report.runs:
        if run.error:
            rows.append([run.name, "–", "–", "–", "–", "–", "–", run.error])
            continue
        same = "yes" if run.answer == dense.answer else "no"
        rows.append([
            run.name, run.visual[1], ratio(run.visual[1], dense.visual[0]).rstrip("×"), run.answer, same,
            f"{run.time_ratio:.2f}", ratio(run.peak_bytes, dense.peak_bytes).rstrip("×"), "",
        ])
    return rows


COMPARE_HEADERS = ["method", "visual tokens", "kept", "answer", "same answer", "prefill", "memory", "error"]
COMPARE_WIDTHS = ["10%", "9%", "7%", "22%", "9%", "8%", "8%", "27%"]


def method_help(name: str) -> str:
    fields = ", ".join(f"`{k}={v!r}`" for k, v in option_fields(name).items())
    presets = ", ".join(f"`{p}`" for p in method_class(name).presets) or "none"
    return f"Options of `{name}`: {fields}. Presets: {presets}."


THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
# heatmaps are three square panels side by side: show each whole, one under the other, captions below
CSS = """
#heatmaps .grid-wrap, #compare-heatmaps .grid-wrap { height: auto; max-height: none; }
#heatmaps .thumbnail-item, #compare-heatmaps .thumbnail-item { aspect-ratio: 2.6 / 1; height: auto; }
#status strong { color: #b91c1c; }
"""


def build_demo(
    model: str = EMBEDDED,
    device: str | None = None,
    examples_dir: str | Path = EXAMPLES_DIR,
    max_new_tokens: int = 16,
    repeats: int = 3,
    frames: int = 4,
    allow_hub: bool = False,
    preload: bool = False,
    load_wait_s: float = LOAD_WAIT_S,
) -> gr.Blocks:
    """The page, on a model slot that loads `model` (or what the user types) on first use, or at once with
    `preload` (in the background)."""
    demo = Demo(model=model, device=device, allow_hub=allow_hub, load_wait_s=load_wait_s)
    if preload:
        demo.models.start_quietly(model)
    methods = vtprune.available()
    default_method = "vtc-cls" if "vtc-cls" in methods else methods[0]
    examples = bundled_examples(examples_dir)

    def request(files, question, model_name, budget, frame_count, new_tokens, timing_repeats, **rest) -> Request:
        return Request(
            files=[str(f) for f in (files or [])], question=question or "", model=model_name or "", budget=budget or "",
            frames=int(frame_count), max_new_tokens=int(new_tokens), repeats=int(timing_repeats), **rest,
        )

    def execute(req: Request, progress: gr.Progress) -> tuple[Report | None, str | None]:
        """(report, None), or (None, the error message for the status box)."""
        try:
            return demo.run(req, lambda fraction, text: progress(fraction, desc=text)), None
        except ModelLoading as loading:
            return None, f"{str(loading)[0].upper()}{str(loading)[1:]}."
        except VTPruneError as error:
            return None, error_status(error)
        except Exception as error:  # never let one request take the page down
            log.exception("demo request failed")
            return None, error_status(f"{type(error).__name__}: {error}")

    def on_run(files, question, model_name, budget, frame_count, new_tokens, timing_repeats, method, preset, options,
               progress=gr.Progress()):
        req = request(files, question, model_name, budget, frame_count, new_tokens, timing_repeats, methods=[method],
                      options=options or "", preset=None if preset in (None, NO_PRESET) else preset)
        report, failure = execute(req, progress)
        if failure:
            return "", "", "", [], failure
        run = report.runs[0]
        if run.error:
            return report.dense.answer, "", "", [], error_status(f"{run.name}: {run.error}")
        table = metrics_table(report, run, req.repeats)
        return report.dense.answer, run.answer, table, run.heatmaps, status(report, f"Done: {run.name}")

    def on_compare(files, question, model_name, budget, frame_count, new_tokens, timing_repeats, chosen,
                   progress=gr.Progress()):
        req = request(files, question, model_name, budget, frame_count, new_tokens, timing_repeats,
                      methods=list(chosen or []))
        report, failure = execute(req, progress)
        if failure:
            return [], [], failure
        gallery = [(image, f"{run.name} · {caption}") for run in report.runs for image, caption in run.heatmaps]
        failed = sum(run.error is not None for run in report.runs)
        done = f"Compared {len(report.runs)} methods" + (f" ({failed} gave no result: see the error column)" if failed else "")
        return compare_rows(report), gallery, status(report, done)

    def on_method(name):
        presets = [NO_PRESET] + list(method_class(name).presets)
        return gr.update(choices=presets, value=NO_PRESET), method_help(name)

    with gr.Blocks(title="vtprune demo", analytics_enabled=False) as page:  # offline: no telemetry
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=2):
                files = gr.File(label="Images, a screenshot sequence, or one video", file_count="multiple",
                                type="filepath", elem_id="files")
                question = gr.Textbox(label="Question", lines=2, elem_id="question")
                with gr.Row():
                    model_box = gr.Dropdown(
                        choices=list(dict.fromkeys([model, EMBEDDED])), value=model, allow_custom_value=True,
                        label="Model: 'toy', a local folder or a hub id", elem_id="model",
                    )
                    budget = gr.Textbox(value="64", label="Budget: visual tokens per image, or a ratio", elem_id="budget")
                with gr.Accordion("Settings", open=False):
                    frame_count = gr.Slider(1, 32, value=frames, step=1, label="Frames sampled from a video")
                    new_tokens = gr.Slider(1, 64, value=max_new_tokens, step=1, label="Answer length (new tokens)")
                    timing_repeats = gr.Slider(1, 10, value=repeats, step=1, label="Paired prefill timings")
                gr.Examples(
                    examples=[[e.files, e.question, e.budget] for e in examples], inputs=[files, question, budget],
                    example_labels=[e.label for e in examples], label="Bundled examples (generated offline)",
                )
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("One method"):
                        with gr.Row():
                            method = gr.Dropdown(choices=methods, value=default_method, label="Method", elem_id="method")
                            preset = gr.Dropdown(choices=[NO_PRESET] + list(method_class(default_method).presets),
                                                 value=NO_PRESET, label="Preset")
                        options = gr.Textbox(label="Options (name=value, ...)", placeholder="e.g. start_layer=2 scope=sample")
                        help_box = gr.Markdown(method_help(default_method))
                        run_button = gr.Button("Run", variant="primary", elem_id="run")
                        with gr.Row():
                            dense_answer = gr.Textbox(label="Dense answer", interactive=False, elem_id="dense-answer")
                            pruned_answer = gr.Textbox(label="Pruned answer", interactive=False, elem_id="pruned-answer")
                        metrics = gr.Markdown(elem_id="metrics")
                        maps = gr.Gallery(label="Image · scores · kept tokens", columns=1, height="auto",
                                          object_fit="contain", format="png", elem_id="heatmaps")
                    with gr.Tab("Compare methods"):
                        chosen = gr.CheckboxGroup(choices=methods, value=methods, label="Methods", elem_id="chosen")
                        compare_button = gr.Button("Compare", variant="primary", elem_id="compare")
                        table = gr.Dataframe(
                            headers=COMPARE_HEADERS, column_widths=COMPARE_WIDTHS, interactive=False, wrap=True,
                            label="kept, prefill, memory: ratios to the dense model, measured in the same request",
                            show_label=True, elem_id="table",
                        )
                        compare_maps = gr.Gallery(label="Heatmaps per method", columns=2, height="auto", object_fit="contain",
                                                  format="png", elem_id="compare-heatmaps")
                status_box = gr.Markdown(elem_id="status")
                model_status = gr.Markdown(demo.models.status(), elem_id="model-status")

        shared = [files, question, model_box, budget, frame_count, new_tokens, timing_repeats]
        method.change(on_method, method, [preset, help_box], queue=False)
        run_button.click(on_run, shared + [method, preset, options],
                         [dense_answer, pruned_answer, metrics, maps, status_box], concurrency_id="model")
        compare_button.click(on_compare, shared + [chosen], [table, compare_maps, status_box], concurrency_id="model")
        gr.Timer(2.0).tick(demo.models.status, None, model_status, queue=False)  # off the queue: never waits
    page.queue(default_concurrency_limit=1)
    return page
