"""lmms-eval's `--batch_size 8` through the plugin: one padded, pruned generate() per 8 requests gives every document
the answer and the visual-token counts it gets at batch size 1."""

from __future__ import annotations

import sys

import pytest

from tests.eval.lmms_setup import (
    lmms_eval_command,
    plugin_env,
    results_of,
    run,
    save_tiny_model,
)

LIMIT = 16
METHOD = "method=vtc-cls,keep=4,start_layer=0"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


def answers(tiny, tmp_path, batch: int) -> dict[int, tuple]:
    command = lmms_eval_command(tiny, tmp_path, METHOD, limit=LIMIT)
    command[command.index("--batch_size") + 1] = str(batch)
    command[command.index("--gen_kwargs") + 1] = "max_new_tokens=3"
    done = run([sys.executable, *command], plugin_env(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    _, samples = results_of(tmp_path)
    out = {}
    for s in samples:
        resps = s["filtered_resps"]
        counts = s["token_counts"][0]
        out[s["doc_id"]] = (resps[0] if isinstance(resps, list) else resps, counts["visual_tokens_before"],
                            counts["visual_tokens_after"])
    return out


def test_batch_of_8_gives_the_answers_of_batch_1(tiny, tmp_path):
    one, eight = answers(tiny, tmp_path / "b1", 1), answers(tiny, tmp_path / "b8", 8)
    assert sorted(one) == list(range(LIMIT))
    assert eight == one
    assert len({answer for answer, *_ in one.values()}) > 1  # the answers depend on the document
    assert {tuple(counts) for _, *counts in one.values()} == {(16, 4)}


def test_a_document_without_images_is_answered_unpruned(tiny):
    from types import SimpleNamespace

    import torch

    from vtprune.eval.lmms import VTPruneChat

    lm = VTPruneChat(pretrained=str(tiny), method="vtc-cls", keep=4, start_layer=0, device="cpu", device_map="cpu",
                     dtype="float32")
    lm.task_dict = {"t": {"test": {0: {"q": "what color"}}}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what color"}]}]
    request = SimpleNamespace(args=("what color", lambda doc: messages, {"max_new_tokens": 3}, 0, "t", "test"),
                              metadata=None, task_name="t", doc_id=0)
    (result,) = lm.generate_until([request])
    tokenizer = lm.processor.tokenizer
    ids = tokenizer(lm.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                    return_tensors="pt")
    with torch.no_grad():  # the dense model on the same text prompt
        dense = lm.model.generate(**ids, do_sample=False, max_new_tokens=3, pad_token_id=tokenizer.eos_token_id)
    assert result.text == tokenizer.decode(dense[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert result.token_counts.visual_tokens_after is None  # nothing was pruned
