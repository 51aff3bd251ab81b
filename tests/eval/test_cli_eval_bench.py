"""`vtprune bench` and `vtprune eval` on the tiny saved model: tables, files, and ratios that follow from the counts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.eval.lmms_setup import save_tiny_model
from tests.helpers import GRID
from vtprune.cli import main
from vtprune.eval.flops import layer_flops


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llava"))


def test_bench_writes_tables_and_plot_with_ratios_to_dense(tiny, tmp_path, capsys):
    from transformers import AutoConfig, AutoProcessor

    from vtprune.loading import prepare

    question = "what color is the circle ?"
    code = main([
        "bench", "--model", str(tiny), "--methods", "random", "fastv:layer=2", "transprune:preset=low",
        "--budgets", "4", "0.5",
        "--repeats", "1", "--new-tokens", "2", "--question", question, "--out", str(tmp_path), "--device", "cpu",
    ])
    assert code == 0
    assert "| dense | — | 16 |" in capsys.readouterr().out
    rows = {(r["method"], r["keep"]): r for r in json.loads((tmp_path / "bench.json").read_text())}
    assert set(rows) == {
        ("dense", None), ("random", 4), ("fastv", 4), ("random", 0.5), ("fastv", 0.5), ("transprune", "low")
    }
    assert (tmp_path / "bench.png").stat().st_size > 0 and (tmp_path / "bench.csv").read_text().count("\n") == 7
    preset = rows.pop(("transprune", "low"))  # a preset is a budget of its own, run once
    assert preset["visual_after"] < GRID * GRID and preset["kv_cache"] < 1 and preset["flops"] < 1
    # the prompt's length and the model's widths give the KV-cache and FLOPs ratios exactly
    image = Image.linear_gradient("L").resize((336, 336))
    length = prepare(AutoProcessor.from_pretrained(tiny), [image.convert("RGB")], question)["input_ids"].shape[1]
    text = AutoConfig.from_pretrained(tiny).text_config
    dims, layers = (text.hidden_size, text.intermediate_size), text.num_hidden_layers
    for (method, keep), row in rows.items():
        if method == "dense":
            continue
        kept = keep if isinstance(keep, int) else round(keep * GRID * GRID)
        assert (row["visual_before"], row["visual_after"]) == (GRID * GRID, kept)
        first = 2 if method == "fastv" else 0  # fastv cuts before decoder layer 2
        counts = [length] * first + [length - (GRID * GRID - kept)] * (layers - first)
        assert row["kv_cache"] == pytest.approx(sum(counts) / (length * layers))
        dense_flops = layers * layer_flops(length, *dims)
        assert row["flops"] == pytest.approx(sum(layer_flops(n, *dims) for n in counts) / dense_flops)
        assert row["prefill"] > 0 and row["ttft"] > 0 and row["end_to_end"] > 0 and row["bound"] > 0
        assert row["overhead"] == pytest.approx(row["prefill"] / row["bound"])
        assert row["schedule"] > 0 and row["over_schedule"] == pytest.approx(row["prefill"] / row["schedule"])


def test_bench_batch_is_ragged_and_a_cut_shrinks_it_to_its_longest_sample(tmp_path):
    """--batch 2 on the LLaVA-1.5 shape: sample 0 has one image, sample 1 two (left padding). Keeping 64 per image
    leaves 60 + 64 and 60 + 128 tokens: the batch's cache is as long as the longer one, not padded to the prompt."""
    code = main([
        "bench", "--model", "llava-1.5-7b", "--llm-layers", "2", "--llm-hidden", "128", "--vision-layers", "1",
        "--vision-hidden", "64", "--methods", "random", "--budgets", "64", "--repeats", "1", "--new-tokens", "1",
        "--batch", "2", "--out", str(tmp_path), "--device", "cpu", "--profile",
    ])
    assert code == 0
    dense, pruned = json.loads((tmp_path / "bench.json").read_text())
    assert dense["syncs"]["vtprune"] == 0 < pruned["syncs"]["vtprune"] and pruned["stages"]["compact"] > 0
    assert (tmp_path / "profile.md").read_text().count("| llava-1.5-7b |") == 2
    assert (pruned["visual_before"], pruned["visual_after"]) == (3 * 576, 3 * 64)  # batch totals
    prompts, kept = (60 + 576, 60 + 2 * 576), (60 + 64, 60 + 128)
    assert pruned["kv_cache"] == pytest.approx(max(kept) / max(prompts))  # padded lengths, same layers and widths
    assert pruned["flops"] == pytest.approx(
        sum(layer_flops(n, 128, 320) for n in kept) / sum(layer_flops(n, 128, 320) for n in prompts)
    )


def test_eval_runs_a_grid_through_lmms_eval_and_writes_one_table(tiny, tmp_path, capsys):
    code = main([
        "eval", "--pretrained", str(tiny), "--methods", "vtc-cls:start_layer=0", "random", "--budgets", "4",
        "--limit", "8", "--gen-kwargs", "max_new_tokens=1", "--model-arg", "device_map=cpu", "--model-arg",
        "dtype=float32", "--device", "cpu", "--out", str(tmp_path),
    ])
    assert code == 0
    table = capsys.readouterr().out
    for row in ("| dense | — | 16 |", "| vtc-cls | 4 | 16 → 4 |", "| random | 4 | 16 → 4 |"):
        assert row in table
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [(r["method"], r["keep"]) for r in rows] == [("dense", None), ("vtc-cls", 4), ("random", 4)]
    for row in rows:
        assert 0 <= row["vtprune_toy_vqa/exact_match"] <= 1
        assert row["prefill_seconds_ratio"] > 0 and row["peak_memory_bytes"] is not None
    assert rows[0]["prefill_seconds_ratio"] == 1.0
    assert (tmp_path / "eval.md").read_text().startswith("| method | keep | visual tokens | vtprune_toy_vqa/exact_match")
