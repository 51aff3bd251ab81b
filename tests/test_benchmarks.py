"""Every benchmark script starts: `python benchmarks/<name>.py --help` runs from the repository root as the README
shows it (a script named like an installed package once shadowed that package and failed on import)."""

from __future__ import annotations

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
