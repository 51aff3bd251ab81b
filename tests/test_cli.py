"""`vtprune run` on a tiny saved model: answers, token counts, time ratio and the heatmap file."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vtprune.cli import main
from vtprune.viz import BOTTOM, TOP


def test_run_prints_answers_counts_and_writes_heatmap(saved_model, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype("uint8")).save(image)
    heatmap = tmp_path / "maps" / "heat.png"
    code = main([
        "run", "--model", str(saved_model), "--image", str(image), "--prompt", "w1 w2 w3", "--method", "vtc-cls",
        "--keep", "4", "--option", "start_layer=0", "--heatmap", str(heatmap), "--max-new-tokens", "3", "--repeats", "1",
    ])
    out = capsys.readouterr().out
    assert code == 0
    assert "visual tokens 16 -> 4" in out
    assert "dense answer" in out and "pruned answer" in out
    ratio = float(out.split("prefill time")[1].split("x")[0])
    assert ratio > 0
    panels = Image.open(heatmap)
    assert panels.size == (3 * 32 + 20, TOP + 32 + BOTTOM)


def test_run_reports_bad_budget_clearly(saved_model, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), "red").save(image)
    code = main(["run", "--model", str(saved_model), "--image", str(image), "--prompt", "w1", "--keep", "17"])
    assert code == 2
    assert "keep=17 is more than the 16 visual tokens" in capsys.readouterr().err


def test_example_runs_every_method_and_writes_heatmaps(saved_model, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.new("RGB", (32, 32), "blue").save(image)
    out = tmp_path / "example"
    code = main([
        "example", "--model", str(saved_model), "--image", str(image), "--question", "w1 w2", "--answer", "w3",
        "--keep", "4", "--methods", "random", "pool", "fastv", "--out", str(out), "--repeats", "1", "--max-new-tokens", "2",
    ])
    table = capsys.readouterr().out
    assert code == 0
    assert "| dense | 16 |" in table
    for name in ("random", "pool", "fastv"):
        assert f"| {name} | 4 |" in table
        assert (out / f"{name}.png").exists()


def test_run_takes_a_preset_and_the_method_default_budget(saved_model, tmp_path, capsys):
    image = tmp_path / "scene.png"
    Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype("uint8")).save(image)
    code = main(["run", "--model", str(saved_model), "--image", str(image), "--prompt", "w1 w2", "--method",
                 "transprune", "--preset", "low", "--max-new-tokens", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "keep_ratios=(0.625, 0.1875, 0.0625)" in out
    assert "visual tokens 16 -> 1" in out  # floor(16 * 0.0625) after the last of three cuts
