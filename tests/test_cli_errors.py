"""Every bad input to the command line: a non-zero exit, one line on stderr naming the problem, no traceback, within
10 s (no hub retries), and nothing on disk changed (the model folder, the inputs)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import vtprune
import vtprune.loading
from vtprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL = Path(vtprune.__file__).resolve().parent / "toy" / "model"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (40, 40), "red").save(folder / "good.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("not a picture\n")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bad.json").write_text("{not json")
    (folder / "full").mkdir()
    (folder / "full" / "keep.txt").write_text("mine")
    return folder


def digest(*folders: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def call(argv: list[str], entry=main) -> int:
    try:
        return entry(argv)
    except SystemExit as exit_:  # argparse's usage errors
        return exit_.code


def run_cmd(*extra: str, files: Path) -> list[str]:
    return ["run", "--image", str(files / "good.png"), "--prompt", "what color?", *extra]


# (id, argv given `files`, what the line must say)
CASES = [
    ("image-missing", lambda f: ["run", "--image", str(f / "nope.png"), "--prompt", "q"], "does not exist"),
    ("image-empty", lambda f: ["run", "--image", str(f / "empty.png"), "--prompt", "q"], "is an empty file"),
    ("image-text", lambda f: ["run", "--image", str(f / "text.png"), "--prompt", "q"], "not an image pillow can read"),
    ("image-truncated", lambda f: ["run", "--image", str(f / "truncated.png"), "--prompt", "q"], "truncated or corrupt"),
    ("image-folder", lambda f: ["run", "--image", str(f), "--prompt", "q"], "is a folder"),
    ("max-new-tokens-0", lambda f: run_cmd("--max-new-tokens", "0", files=f), "--max-new-tokens: 0 must be at least 1"),
    ("repeats-0", lambda f: run_cmd("--repeats", "0", files=f), "--repeats: 0 must be at least 1"),
    ("prompt-empty", lambda f: ["run", "--image", str(f / "good.png"), "--prompt", " "], "the prompt is empty"),
    ("prompt-template-only", lambda f: ["run", "--image", str(f / "good.png"), "--prompt", "USER: <image>\n ASSISTANT:"],
     "the prompt is empty"),
    ("keep-word", lambda f: run_cmd("--keep", "abc", files=f), "'abc' is neither a preset of 'vtc-cls'"),
    ("keep-zero", lambda f: run_cmd("--keep", "0", files=f), "keep at least one visual token"),
    ("keep-ratio", lambda f: run_cmd("--keep", "1.5", files=f), "a ratio must lie in (0, 1]"),
    ("option-type", lambda f: run_cmd("--option", "start_layer=abc", files=f), "start_layer='abc': expected int"),
    ("option-unknown", lambda f: run_cmd("--option", "nope=1", files=f), "has no option nope"),
    ("option-form", lambda f: run_cmd("--option", "start_layer", files=f), "write NAME=VALUE"),
    ("option-range", lambda f: run_cmd("--method", "vflowopt", "--option", "budget=5", files=f),
     "must lie in (0, 1]"),
    ("method-unknown", lambda f: run_cmd("--method", "nope", files=f), "unknown method 'nope'"),
    ("preset-bad-json", lambda f: run_cmd("--preset", str(f / "bad.json"), files=f), "is not valid JSON"),
    ("model-upper-toy", lambda f: run_cmd("--model", "TOY", files=f), "the embedded model is 'toy'"),
    ("model-no-path", lambda f: run_cmd("--model", "/no/such/dir", files=f), "model path '/no/such/dir' does not exist"),
    ("model-hub-offline", lambda f: run_cmd("--model", "someone/not-a-model", files=f), "HF_HUB_OFFLINE is set"),
    ("model-folder-empty", lambda f: run_cmd("--model", str(f / "full"), files=f), "has no config.json"),
    ("model-file", lambda f: run_cmd("--model", str(f / "good.png"), files=f), "is a file"),
    ("device-word", lambda f: run_cmd("--device", "gpu0", files=f), "is not a device"),
    ("example-no-question", lambda f: ["example", "--image", str(f / "good.png")], "--image needs --question"),
    ("example-keep-0", lambda f: ["example", "--keep", "0"], "--keep: 0 must be at least 1"),
    ("bench-budget", lambda f: ["bench", "--budgets", "abc!"], "budget 'abc!'"),
    ("bench-method", lambda f: ["bench", "--methods", "nope"], "unknown method 'nope'"),
    ("eval-budget", lambda f: ["eval", "--budgets", "0"], "keep at least one visual token"),
    ("tune-trials-0", lambda f: ["tune", "--trials", "0"], "--trials: 0 must be at least 1"),
    ("no-command", lambda f: [], "the following arguments are required: command"),
    ("unknown-flag", lambda f: run_cmd("--nope", files=f), "unrecognized arguments: --nope"),
]
if not __import__("torch").cuda.is_available():
    CASES.append(("device-cuda", lambda f: run_cmd("--device", "cuda", files=f), "no CUDA GPU is visible"))


@pytest.mark.parametrize("argv, message", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(argv, message, files, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = digest(files, EMBEDDED_MODEL)
    start = time.perf_counter()
    code = call(argv(files))
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert code == 2, err
    assert len(lines) == 1, err
    assert message in lines[0] and "Traceback" not in err
    assert seconds < 10
    assert digest(files, EMBEDDED_MODEL) == before


def test_an_unreachable_hub_fails_at_once_without_retries(files, capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(vtprune.loading, "hub_reachable", lambda *a, **k: calls.append(1) or False)
    assert call(run_cmd("--model", "someone/not-a-model", files=files)) == 2
    assert "the hub cannot be reached" in capsys.readouterr().err and calls == [1]


def test_a_decompression_bomb_is_refused(files, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x40 image is a "bomb" at this limit
    assert call(run_cmd(files=files)) == 2
    assert "more pixels than pillow's safety limit" in capsys.readouterr().err


@pytest.mark.parametrize("argv, module, extra", [
    (["demo"], "gradio", "demo"), (["eval", "--limit", "1"], "lmms_eval", "eval"), (["tune"], "optuna", "tune"),
])
def test_a_missing_extra_names_the_pip_install(argv, module, extra, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")] or [module]:
        monkeypatch.setitem(sys.modules, name, None)  # `import module(.sub)` now raises ModuleNotFoundError
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert call(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"vtprune: `vtprune {argv[0]}` needs {module}, which is not installed: pip install 'vtprune[{extra}]'"


def test_debug_shows_the_traceback(files):
    with pytest.raises(vtprune.VTPruneError, match="does not exist"):
        main(["--debug", "run", "--image", str(files / "nope.png"), "--prompt", "q"])


def test_toy_train_refuses_a_full_folder_without_force(files, capsys):
    from vtprune.toy.train import main as train_main

    before = digest(files, EMBEDDED_MODEL)
    assert call(["--out", str(files / "full")], train_main) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err
    assert digest(files, EMBEDDED_MODEL) == before


def test_a_closed_pipe_is_not_an_error():
    command = f"{sys.executable} -m vtprune methods | head -1"
    done = subprocess.run(command, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == vtprune.available()[0]
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


def test_methods_lists_sites_budget_and_options(capsys):
    assert main(["methods"]) == 0
    blocks: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            name = line
        blocks[name] = blocks.get(name, "") + line + "\n"
    assert list(blocks) == vtprune.available()
    for name, block in blocks.items():
        cls = vtprune.core.method_class(name)
        assert f"sites: {', '.join(cls.sites)}" in block and cls.budget_kind.meaning in block
    assert "start_layer=None" in blocks["vtc-cls"] and "layer=" in blocks["fastv"]


def test_run_accepts_a_prompt_in_the_api_format(saved_model, files, capsys):
    code = main(["run", "--model", str(saved_model), "--image", str(files / "good.png"), "--prompt",
                 "USER: <image>\nw1 w2 ASSISTANT:", "--keep", "4", "--option", "start_layer=0", "--max-new-tokens", "1",
                 "--repeats", "1"])
    captured = capsys.readouterr()
    assert code == 0 and "visual tokens 16 -> 4" in captured.out
    assert "the chat template was taken off the prompt" in captured.err
