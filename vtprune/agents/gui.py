"""GUI-agent steps in the UI-TARS style: screenshots and past actions -> a prompt -> one step with a method applied.

A step's conversation: the task with the output format and action space (one user turn), then for every earlier step
its screenshot (a user turn; only the newest `history_images` screenshots, the current one included, keep their image,
as UI-TARS does) and the action taken (an assistant turn "Action: ..."), then the current screenshot. Every step is a
fresh prefill, so a cache method such as gui-kv compresses again at every step.

The default instructions are vtprune's own wording of the UI-TARS format; pass the official text as `instructions`
for real UI-TARS checkpoints.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..core.method import Method
from ..core.trace import Trace

INSTRUCTIONS = """You operate a computer through its screen. Given the task, the actions taken so far and screenshots,
choose the next action.

Answer in this format:
Thought: what you see and plan
Action: one action

Actions:
click(start_box='(x,y)')
type(content='text')
scroll(start_box='(x,y)', direction='down|up|left|right')
hotkey(key='keys')
wait()
finished()

Task: {task}"""


@dataclass
class StepResult:
    """One agent step: what the model saw and answered, and what the method did."""

    step: int
    prompt: str  # the chat text given to the processor
    screenshots: int  # screenshots in the prompt
    prompt_tokens: int
    visual_tokens: int  # image tokens in the prompt
    output: str
    action: str | None  # the "Action: ..." of the output, if any
    cache_entries: list[int]  # per layer: entries in the cache after the step (prompt kept + decoded)
    cache_bytes: int  # keys + values of every layer after the step
    seconds: float  # wall time of the step (prefill + decoding)
    trace: Trace | None  # what the method kept (None for the dense model)


def step_messages(
    task: str, screenshots: list[Image.Image], actions: list[str], history_images: int = 5, instructions: str = INSTRUCTIONS
) -> tuple[list[dict], list[Image.Image]]:
    """The chat messages of a step and the images they refer to, in order.

    screenshots: every screenshot of the episode so far (the last is current); actions: the action taken on each
    earlier screenshot (len(screenshots) - 1 of them).
    """
    if len(actions) != len(screenshots) - 1:
        raise ValueError(f"{len(screenshots)} screenshots need {len(screenshots) - 1} past actions, got {len(actions)}")
    first_image = max(0, len(screenshots) - history_images)
    messages = [{"role": "user", "content": [{"type": "text", "text": instructions.format(task=task)}]}]
    images = []
    for step, screenshot in enumerate(screenshots):
        if step >= first_image:
            messages.append({"role": "user", "content": [{"type": "image"}]})
            images.append(screenshot)
        if step < len(actions):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": f"Action: {actions[step]}"}]})
    return messages, images


def parse_action(output: str) -> str | None:
    """The action after the last "Action:" of a model's answer."""
    found = re.findall(r"Action:\s*(.+)", output)
    return found[-1].strip() if found else None


def step_inputs(processor: Any, messages: list[dict], images: list[Image.Image], device: Any = None) -> tuple[str, dict]:
    """The chat text and the processor's tensors for one step."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[im.convert("RGB") for im in images], text=[text], return_tensors="pt")
    return text, {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in inputs.items()}


def run_step(
    model: Any,
    processor: Any,
    task: str,
    screenshots: list[Image.Image],
    actions: list[str],
    method: Method | None = None,
    *,
    step: int | None = None,
    max_new_tokens: int = 32,
    history_images: int = 5,
    instructions: str = INSTRUCTIONS,
) -> StepResult:
    """Run one step greedily, with `method` applied (None: the dense model)."""
    messages, images = step_messages(task, screenshots, actions, history_images, instructions)
    text, inputs = step_inputs(processor, messages, images, model.device)
    image_token = model.config.image_token_id
    session = method(model) if method is not None else nullcontext()
    start = time.perf_counter()
    with torch.no_grad(), session as trace:
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True)
    seconds = time.perf_counter() - start
    prompt = inputs["input_ids"].shape[1]
    output = processor.batch_decode(out.sequences[:, prompt:], skip_special_tokens=True)[0]
    layers = out.cache.layers
    return StepResult(
        step=len(screenshots) - 1 if step is None else step,
        prompt=text,
        screenshots=len(images),
        prompt_tokens=prompt,
        visual_tokens=int((inputs["input_ids"] == image_token).sum()),
        output=output,
        action=parse_action(output),
        cache_entries=[int(layer.keys.shape[-2]) for layer in layers],
        cache_bytes=sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values)),
        seconds=seconds,
        trace=trace,
    )


def run_episode(
    model: Any,
    processor: Any,
    task: str,
    screenshots: list[Image.Image],
    method: Method | None = None,
    actions: list[str] | None = None,
    **step_options: Any,
) -> list[StepResult]:
    """Run every step of a recorded episode: step t sees screenshots[: t + 1] and the actions of the earlier steps —
    the recorded `actions` if given (replay, as offline GUI benchmarks evaluate), else the model's own."""
    results: list[StepResult] = []
    taken: list[str] = []
    for t in range(len(screenshots)):
        result = run_step(model, processor, task, screenshots[: t + 1], taken, method, step=t, **step_options)
        results.append(result)
        taken.append(actions[t] if actions is not None else (result.action or result.output.strip()))
    return results
