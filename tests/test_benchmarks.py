"""Every benchmark script starts: `python benchmarks/<name>.py --help` runs from the repository root as the README
shows it (a script named like an installed package once shadowed that package and failed on import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
