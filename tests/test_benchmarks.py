"""Every benchmark script starts: `python benchmarks/<name>.py --help` runs from the repository root as the README
shows it (a script named like an installed package once shadowed that package and failed on import)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_the_readme_names_only_scripts_that_exist():
    readme = (ROOT / "README.md").read_text()
    named = {part.split(".py")[0] + ".py" for part in readme.split("benchmarks/")[1:] if ".py" in part.split()[0]}
    assert named and named <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_runs(script):
    result = subprocess.run([sys.executable, str(script.relative_to(ROOT)), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_the_gpu_script_refuses_a_used_folder_and_a_missing_gpu(tmp_path):
    used = tmp_path / "used"
    used.mkdir()
    (used / "bench.md").write_text("earlier results")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    script = str(ROOT / "benchmarks" / "gpu.sh")
    refused = subprocess.run(["bash", script, str(used)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "already holds results" in refused.stderr
    assert (used / "bench.md").read_text() == "earlier results"
    if not torch.cuda.is_available():
        no_gpu = subprocess.run(["bash", script, str(tmp_path / "new")], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
        assert no_gpu.returncode != 0 and "no CUDA GPU" in no_gpu.stderr
        assert not (tmp_path / "new").exists()


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_long_decode_policies_stay_within_their_budget_and_dense_grows(tmp_path, capsys):
    """benchmarks/long_decode.py part A at a tiny shape: 16 new tokens, a budget of 24 entries per head and layer."""
    long_decode = load_script("long_decode")
    tiny = ["--part", "a", "--new-tokens", "16", "--budgets", "24", "--repeats", "1", "--llm-layers", "2",
            "--llm-hidden", "256", "--vision-layers", "1", "--vision-hidden", "64", "--text-tokens", "8"]
    rows = {r.method: r for r in long_decode.main([*tiny, "--out", str(tmp_path)])}
    prompt = rows["dense"].prompt
    assert prompt == 576 + 8
    assert rows["dense"].final_lengths == rows["dense"].peak_lengths == [prompt + 15] * 2  # the last token is not fed
    assert rows["dense"].peak_bytes == 2 * 2 * 2 * (prompt + 15) * 128 * 4  # layers, K+V, heads, entries, d, fp32
    for name in ("streamingllm", "scissorhands", "a2sf", "ems"):
        row = rows[name]
        assert row.refused is None and 0 < max(row.peak_lengths) <= 24, (name, row)
        assert row.peak_bytes == pytest.approx(max(row.peak_lengths) / (prompt + 15))  # every layer the same length here
    assert rows["streamingllm"].final_lengths == [24, 24]  # sinks + window fill the budget exactly
    assert rows["gui-kv"].final_lengths == [24 + 15] * 2  # compressed once, then grows by one entry per token
    assert (tmp_path / "long_decode.md").read_text().count("\n| A |") == 6
    assert len((tmp_path / "long_decode.csv").read_text().splitlines()) == 7
    with pytest.raises(SystemExit, match="not empty"):  # an existing non-empty --out without --force
        long_decode.main([*tiny, "--out", str(tmp_path)])
