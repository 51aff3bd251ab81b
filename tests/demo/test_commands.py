"""`vtprune demo` serves the page on the port it is given; `demos/app.py` builds the same page."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.demo.test_browser import free_port

ROOT = Path(__file__).resolve().parents[2]


def served_title(command: list[str], env: dict[str, str], port: int, timeout: float = 120.0) -> str:
    """Start the command, wait for the page's config on localhost, return the page title; always stop the server."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise AssertionError(f"the server exited: {server.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    return json.load(response)["title"]
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"nothing served on port {port} after {timeout} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_command_serves_the_page(saved_model, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "vtprune.cli", "demo", "--model", str(saved_model), "--port", str(port),
               "--examples-dir", str(tmp_path)]
    assert served_title(command, {}, port) == "vtprune demo"


def test_the_script_builds_the_same_page_on_the_model_it_is_given(saved_model, monkeypatch):
    import gradio as gr

    monkeypatch.setenv("VTPRUNE_MODEL", str(saved_model))
    page = runpy.run_path(str(ROOT / "demos" / "app.py"), run_name="app")["demo"]
    assert isinstance(page, gr.Blocks) and page.title == "vtprune demo"
    model_box = next(block for block in page.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert model_box.value == str(saved_model)
