"""`vtprune.commands`: every `--help` is answered without importing torch, transformers or a method, and the lazy
`import vtprune` still registers every method and adapter before any lookup."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune import commands
from vtprune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "PIL", "gradio", "vtprune.core", "vtprune.methods", "vtprune.adapters")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_help_imports_no_heavy_module():
    names = list(subcommands())
    assert {"run", "bench", "eval", "demo", "tune", "example", "convert", "methods"} <= set(names)
    code = f"""
import contextlib, io, json, sys
from vtprune.cli import main
for argv in [["--help"]] + [[name, "--help"] for name in {names!r}] + [["convert", "longva", "--help"]]:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(argv)
        except SystemExit as done:
            assert done.code == 0, (argv, done.code)
    assert "usage: vtprune" in out.getvalue(), argv
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {{"torch", "transformers", "numpy", "PIL",
      "gradio"}} or m.startswith(("vtprune.core", "vtprune.methods", "vtprune.adapters")))))
"""
    result = python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_python_dash_m_help_imports_no_torch():
    code = """
import runpy, sys
sys.argv = ["vtprune", "--help"]
try:
    runpy.run_module("vtprune", run_name="__main__")
except SystemExit as done:
    assert done.code == 0
print("torch" in sys.modules, "transformers" in sys.modules)
"""
    result = python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "False False"


@pytest.mark.parametrize(("lookup", "expected"), [
    ("from vtprune.core import method_class; print(method_class('fastv').__name__)", "FastV"),
    ("from vtprune.core import available; print('vtc-cls' in available())", "True"),
    ("import vtprune; print(vtprune.make('vtc-cls', keep=4).name)", "vtc-cls"),
    ("from vtprune import make; print(make('fastv', keep=4).name)", "fastv"),
])
def test_the_lazy_package_registers_methods_before_any_lookup(lookup, expected):
    result = python(lookup)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected


def test_the_lazy_package_finds_the_adapter_of_a_model_without_vtprune_make():
    code = """
from tests.helpers import build_tiny_llava
from vtprune.core import adapter_for
print(adapter_for(build_tiny_llava()).family)
"""
    result = python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "llava"


def test_the_lazy_package_names_its_api_and_refuses_other_names():
    import vtprune

    assert {"make", "available", "VTPruneError", "core", "methods"} <= set(dir(vtprune))
    assert vtprune.VTPruneError is importlib.import_module("vtprune.core.errors").VTPruneError
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vtprune.nope  # noqa: B018


def test_each_command_names_a_function_that_exists():
    parsers = subcommands()
    parsers["convert-longva"] = next(
        a for a in parsers.pop("convert")._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["longva"]
    for name, parser in parsers.items():
        func = parser.get_default("func")
        module, attribute = func.__name__.split("'")[1].split(":")
        assert callable(getattr(importlib.import_module(module), attribute)), name


def test_the_light_copies_of_constants_match_their_modules():
    from vtprune.eval import bench, shapes
    from vtprune.loading import EMBEDDED

    assert commands.EMBEDDED == EMBEDDED
    assert commands.SHAPES == shapes.SHAPES and commands.LLAVA_15_7B == shapes.LLAVA_15_7B
    assert bench.__doc__.strip() in subcommands()["bench"].format_help()


@pytest.mark.parametrize(("command", "module", "extra"), [("demo", "gradio", "demo"), ("eval", "lmms_eval", "eval"),
                                                          ("tune", "optuna", "tune")])
def test_a_missing_extra_is_named_before_torch_loads(command, module, extra):
    result = python(f"""
import sys
sys.modules[{module!r}] = None  # as if the extra were not installed
from vtprune.cli import main
print(main([{command!r}]), "torch" in sys.modules)
""")
    assert result.stdout.splitlines()[-1] == "2 False", result.stderr[-3000:]
    assert f"pip install 'vtprune[{extra}]'" in result.stderr
