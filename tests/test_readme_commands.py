"""Every command in the README's code blocks, run as written (on the embedded model where they name a hub checkpoint,
with tiny limits), must succeed. Marked `readme` (several minutes on 2 CPU cores): `pytest -m readme tests/test_readme_commands.py`.

Left out, each with its reason in SKIPPED; substitutions (to keep it short) in SHORTER."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.lmms_setup import plugin_env

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = {  # start of the command -> why it does not run here
    "make run": "sets up a virtualenv with pip (minutes, network); its command `vtprune example` runs below instead",
    "make test": "runs this test suite",
    "make demo": "serves forever; the page is tested by tests/demo/test_browser.py",
    "vtprune demo --model llava-hf": "needs a GPU and hub weights, and serves forever",
    "python -m lmms_eval --model vtprune --tasks textvqa_val": "needs hub weights and the textvqa dataset",
    "accelerate launch --num_processes 8": "needs 8 GPUs; '...' stands for the arguments above",
    "task, screenshots, actions": "needs a Qwen2.5-VL GUI-agent model (hub weights)",
}
SHORTER = [  # (pattern, replacement): tiny limits so that the whole file runs in a few minutes
    (r"--limit \d+", "--limit 4"), (r"--repeats \d+", "--repeats 1"), (r"--new-tokens \d+", "--new-tokens 1"),
    (r"--budgets 64 128 192", "--budgets 64"), (r"max_new_tokens=32", "max_new_tokens=2"),
]
EXTRA = ["vtprune example --methods vtc-cls fastv --repeats 1 --out out/example"]  # what `make run` runs, shortened


def readme_commands() -> list[tuple[str, str]]:
    """(language, command): each shell line of a bash block (continuations joined), each python block whole."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.DOTALL):
        if lang == "python":
            commands.append(("python", body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#[^\"']*$", "", line).strip()
                if line:
                    commands.append(("bash", " ".join(line.split())))
    return commands + [("bash", c) for c in EXTRA]


def skip_reason(command: str) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.lstrip().startswith(start) or start in command), None)


CASES = readme_commands()


@pytest.mark.readme
@pytest.mark.parametrize("lang, command", CASES, ids=[c[:60] for _, c in CASES])
def test_readme_command_succeeds(lang, command, tmp_path):
    reason = skip_reason(command)
    if reason:
        pytest.skip(reason)
    for pattern, replacement in SHORTER:
        command = re.sub(pattern, replacement, command)
    env = plugin_env(tmp_path)
    if lang == "python":
        toy = ROOT / "vtprune" / "toy" / "model"
        script = command.replace('"llava-hf/llava-1.5-7b-hf"', repr(str(toy)))
        script = "from PIL import Image\nimage = Image.new('RGB', (336, 336), 'orange')\n" + script
        done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
    else:
        command = re.sub(r"^vtprune ", f"{sys.executable} -m vtprune ", command)
        command = re.sub(r"(^|\$\()python ", rf"\g<1>{sys.executable} ", command)
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600, check=False)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
