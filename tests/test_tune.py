"""`vtprune tune` end to end on a tiny saved model: improves the flow objective and writes a loadable preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import vtprune
from vtprune.cli import main
from vtprune.loading import load, prepare
from vtprune.tune import flow_similarity, folder_calibration, last_prompt_state, synthetic_calibration


def objective_of(line: str) -> float:
    return float(line.split("objective")[1].split()[0])


def test_tune_improves_the_objective_and_writes_a_preset(saved_model, tmp_path, capsys):
    out = tmp_path / "tuned.json"
    code = main(["tune", "--model", str(saved_model), "--method", "vflowopt", "--budget", "0.25", "--trials", "12",
                 "--samples", "3", "--image-size", "32", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    default, best = objective_of(lines[0]), objective_of(lines[1])
    print(f"vflowopt on the tiny model, budget 0.25: untuned {default:.6f} -> tuned {best:.6f}")
    assert best > default
    preset = json.loads(out.read_text())
    assert preset["objective"] == pytest.approx(best, abs=1e-6)
    assert preset["default_objective"] == pytest.approx(default, abs=1e-6)
    method = vtprune.make("vflowopt", preset=out)
    assert method.budget == 0.25 and 0.25 <= method.vit_keep <= 0.375
    # the saved options reproduce the reported objective on the same calibration set
    model, processor = load(str(saved_model))
    calibration = [prepare(processor, [im], q) for im, q in synthetic_calibration(3, seed=0, size=32)]
    references = [last_prompt_state(model, inputs) for inputs in calibration]
    assert flow_similarity(model, calibration, references, method) == pytest.approx(best, abs=1e-6)


def test_tune_reads_a_calibration_folder(saved_model, tmp_path, capsys):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("w1 w2")
    (folder / "questions.txt").write_text("w3 w4\n")
    pairs = folder_calibration(folder)
    assert [q for _, q in pairs] == ["w1 w2", "w3 w4"]
    code = main(["tune", "--model", str(saved_model), "--method", "visionzip", "--budget", "6", "--trials", "3",
                 "--calibration", str(folder), "--out", str(tmp_path / "vz.json")])
    assert code == 0
    options = json.loads((tmp_path / "vz.json").read_text())["options"]
    assert options["keep"] == 6 and 0 <= options["contextual"] <= 3


def test_untunable_method_is_refused(saved_model, capsys):
    code = main(["tune", "--model", str(saved_model), "--method", "random", "--trials", "1", "--samples", "1",
                 "--image-size", "32"])
    assert code == 2
    assert "declares no search space" in capsys.readouterr().err
