"""GUI-agent steps: UI-TARS-style prompts, synthetic screenshots, episodes with a method re-applied at every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vtprune
from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen
from vtprune.agents import parse_action, run_episode, step_messages, synthetic_episode


def test_messages_keep_the_newest_screenshots_and_every_action():
    task, screenshots, actions = synthetic_episode(steps=6, size=(64, 40))
    messages, images = step_messages(task, screenshots, actions[:5], history_images=3)
    roles = [m["role"] for m in messages]
    kinds = [m["content"][0]["type"] for m in messages]
    assert roles[0] == "user" and task in messages[0]["content"][0]["text"]
    assert kinds.count("image") == 3 and images == screenshots[3:]
    assert [m["content"][0]["text"] for m in messages if m["role"] == "assistant"] == [f"Action: {a}" for a in actions[:5]]
    assert messages[-1] == {"role": "user", "content": [{"type": "image"}]}  # the current screenshot comes last
    # steps 0..2 lost their screenshots but keep their actions, in order
    assert roles[1:5] == ["assistant", "assistant", "assistant", "user"]
    with pytest.raises(ValueError, match="need 5 past actions"):
        step_messages(task, screenshots, actions[:2])


def test_parse_action_reads_the_last_action_line():
    assert parse_action("Thought: the OK button.\nAction: click(start_box='(3,4)')") == "click(start_box='(3,4)')"
    assert parse_action("no action here") is None


def test_synthetic_screenshots_change_little_from_step_to_step():
    _, screenshots, actions = synthetic_episode(steps=5, size=(128, 80))
    assert len(screenshots) == len(actions) == 5 and screenshots[0].size == (128, 80)
    frames = [np.asarray(s).astype(int) for s in screenshots]
    changed = [float((np.abs(b - a).sum(-1) > 0).mean()) for a, b in zip(frames, frames[1:])]
    assert all(c < 0.3 for c in changed) and sum(c > 0 for c in changed) >= 3
    assert np.array_equal(np.asarray(synthetic_episode(steps=5, size=(128, 80))[1][4]), frames[4])  # deterministic


@pytest.fixture(scope="module")
def agent():
    return build_tiny_qwen("qwen2.5-vl", layers=2), build_qwen_processor("qwen2.5-vl")


def test_episode_recompresses_the_cache_at_every_step(agent):
    model, processor = agent
    task, screenshots, actions = synthetic_episode(steps=3, size=(48, 32))
    options = dict(max_new_tokens=3, history_images=2, instructions="Task: {task}")
    with torch.no_grad():
        dense = run_episode(model, processor, task, screenshots, actions=actions, **options)
        pruned = run_episode(model, processor, task, screenshots, vtprune.make("gui-kv", keep=0.3), actions=actions, **options)
    assert [r.screenshots for r in pruned] == [1, 2, 2]
    for d, p in zip(dense, pruned):
        assert d.prompt_tokens == p.prompt_tokens and p.visual_tokens == 24 * p.screenshots
        budget = math.floor(p.prompt_tokens * 0.3)
        assert p.cache_entries == [budget + 2] * 2  # the step's kept prompt entries + decoded tokens (the last is not fed)
        assert d.cache_entries == [d.prompt_tokens + 2] * 2
        assert p.cache_bytes < d.cache_bytes
        records = p.trace.forwards[0].sites
        assert len(p.trace.forwards) == 1 and sorted(r.layer for r in records) == [0, 1]  # a fresh prefill per step
        assert all(r.cache_positions.shape == (1, budget) for r in records)


def test_without_recorded_actions_the_model_acts_on_its_own_output(agent):
    model, processor = agent
    task, screenshots, _ = synthetic_episode(steps=2, size=(48, 32))
    with torch.no_grad():
        first, second = run_episode(model, processor, task, screenshots, max_new_tokens=3, instructions="Task: {task}")
    taken = first.action or first.output.strip()
    assert f"Action: {taken}" in second.prompt and second.prompt.count("<|vision_start|>") == 2
