"""lmms-eval's `--batch_size 8` through the plugin: one padded, pruned generate() per 8 requests gives every document
the answer and the visual-token counts it gets at batch size 1."""

from __future__ import annotations

import sys

import pytest

from tests.eval.lmms_setup import lmms_eval_command, plugin_env, results_of, run, save_tiny_model

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
