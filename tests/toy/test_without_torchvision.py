"""A plain `pip install vtprune` has no torchvision: loading a model and preparing an image must then say nothing
about it (transformers warns once per run when a `<Model>ImageProcessor` name falls back to its PIL twin)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TORCHVISION = """
import importlib.abc, importlib.util, sys

class NoTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTorchvision())
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if name.split(".")[0] == "torchvision" else find_spec(
    name, package)
"""


def run_without_torchvision(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCHVISION + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_toy_and_a_saved_model_load_and_run_without_a_torchvision_warning(saved_model):
    result = run_without_torchvision(f"""
from PIL import Image
from vtprune.loading import load, prepare

for name in ("toy", {str(saved_model)!r}):
    model, processor = load(name, device="cpu")
    inputs = prepare(processor, [Image.new("RGB", (40, 30), "red")], "what colour?", device=model.device)
    print(type(processor.image_processor).__name__, tuple(inputs["pixel_values"].shape))
print("torchvision" in sys.modules)
""")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-3].startswith("CLIPImageProcessorPil (1, 3, 336, 336)")
    assert lines[-2].startswith("CLIPImageProcessorPil (1, 3, 32, 32)")
    assert lines[-1] == "False"
    assert "torchvision" not in result.stderr, result.stderr[-3000:]
