"""pytest plugin of the peer suite: runs transformers' own model tests with a keep-all vtprune session attached.

Loaded as `-p vtprune_peer_plugin` in a pytest process whose root is the laid-out transformers test tree (see
`source.py`); `run.py` starts those processes. Environment:

- VTPRUNE_PEER_METHOD: "dense" (attach nothing) or a registered method name;
- VTPRUNE_PEER_REPORT: a JSON-lines file; one line per test: outcome, the sessions attached, refusals, the error.

Every model the tests build (`ModelClass(config)`, `from_config`, `from_pretrained`) whose class a vtprune adapter
handles gets `vtprune.make(method, **KEEP_ALL)(model).__enter__()` right after it is built (for `from_pretrained`:
after loading), and the session is exited when the test that built it ends (an error on exit fails that test).
A `VTPruneError` raised while attaching is a refusal: the model then runs dense and the refusal is recorded.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from pathlib import Path
from typing import Any

import pytest

METHOD = os.environ.get("VTPRUNE_PEER_METHOD", "dense")
REPORT = os.environ.get("VTPRUNE_PEER_REPORT")

# Keep-all options: `keep=1.0` keeps everything for every method (whatever its budget counts).
# transformers' test models have 2 decoder layers. Default cut layers that do not fit them are refused, which
# would leave the method untested: the in-LLM methods cut before layer 1 instead. vflowopt needs two cuts in
# 1..n-1 and stays refused.
FIT_TO_TWO_LAYERS: dict[str, dict[str, Any]] = {
    "fastv": dict(layer=1),
    "dart": dict(layer=1),
    "transprune": dict(keep_ratios=(0.5,), prune_layers=(1,)),
    "pyramiddrop": dict(layer_list=(1,)),
    "spatten": dict(layers=(1,)),
    "hiprune": dict(object_layer=0),  # the test vision towers are shallower than its object layer (8)
}


def keep_all_options(method: str) -> dict[str, Any]:
    return {"keep": 1.0, **FIT_TO_TWO_LAYERS.get(method, {})}


class _Sessions:
    """Sessions attached while one test runs, and what was refused or not supported."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.open: list[tuple[str, Any]] = []  # (model class, session)
        self.attached: list[str] = []
        self.refused: list[str] = []  # "Class: message"
        self.unsupported: set[str] = set()
        self.loading = 0  # depth of from_pretrained calls under way


SESSIONS = _Sessions()
FRAME = re.compile(r"^\S+\.py:\d+: in \S+")
RESULTS: dict[str, dict[str, Any]] = {}


def _attach(model: Any) -> None:
    import vtprune
    from vtprune.core.adapter import adapter_for

    name = type(model).__name__
    if any(session.adapter.model is model for _, session in SESSIONS.open):
        return  # post_init called again on a built model (test_resize_embeddings_untied_no_reinit_on_post_init)
    try:
        adapter_for(model)
    except vtprune.UnsupportedModelError:
        SESSIONS.unsupported.add(name)
        return
    try:
        session = vtprune.make(METHOD, **keep_all_options(METHOD))(model)
        session.__enter__()
    except vtprune.VTPruneError as err:
        SESSIONS.refused.append(f"{name}: {str(err).splitlines()[0]}")
        return
    SESSIONS.open.append((name, session))
    SESSIONS.attached.append(name)


def _patch_models() -> None:
    from transformers import PreTrainedModel

    post_init = PreTrainedModel.post_init
    from_pretrained = PreTrainedModel.from_pretrained.__func__

    def post_init_with_session(self, *args, **kwargs):
        out = post_init(self, *args, **kwargs)
        if SESSIONS.loading == 0:
            _attach(self)
        return out

    def from_pretrained_with_session(cls, *args, **kwargs):
        SESSIONS.loading += 1
        try:
            out = from_pretrained(cls, *args, **kwargs)
        finally:
            SESSIONS.loading -= 1
        if SESSIONS.loading == 0:
            _attach(out[0] if isinstance(out, tuple) else out)
        return out

    PreTrainedModel.post_init = post_init_with_session
    PreTrainedModel.from_pretrained = classmethod(from_pretrained_with_session)


def _apply_compat(rootdir: Path) -> None:
    """Constants the laid-out test files import from transformers.testing_utils that this version lacks."""
    path = rootdir / "compat.json"
    if path.is_file():
        import transformers.testing_utils as testing_utils

        for name, entry in json.loads(path.read_text()).items():
            if not hasattr(testing_utils, name):
                setattr(testing_utils, name, entry["value"])


# Helpers the installed version's mixins import that neither the sdist nor the git revision ships: module -> names.
# Only multi-process (distributed) tests call them; a stub that skips such a test lets the mixins import.
MISSING_HELPERS = {
    "distributed_testing_utils": ["_get_distributed_backend", "_get_distributed_device_type", "_get_rank_device",
                                  "_set_rank_device", "_start_rank_processes", "run_distributed"],
}


def _stub_missing_helpers(rootdir: Path) -> None:
    """`tests.<name>` stubs for the helpers of MISSING_HELPERS absent from the laid-out tree (see README.md)."""
    import sys
    import types

    for name, functions in MISSING_HELPERS.items():
        if (rootdir / "tests" / f"{name}.py").is_file():
            continue
        module = types.ModuleType(f"tests.{name}")

        def unavailable(*args: Any, _name: str = name, **kwargs: Any) -> None:
            pytest.skip(f"vtprune peer suite: tests/{_name}.py is not laid out (distributed tests only)")

        for function in functions:
            setattr(module, function, unavailable)
        sys.modules[module.__name__] = module


def pytest_configure(config: pytest.Config) -> None:
    _apply_compat(Path(str(config.rootpath)))
    _stub_missing_helpers(Path(str(config.rootpath)))
    if METHOD != "dense":
        import vtprune

        if METHOD not in vtprune.available():
            raise pytest.UsageError(f"VTPRUNE_PEER_METHOD={METHOD!r}: available: {', '.join(vtprune.available())}")
        vtprune.make(METHOD, **keep_all_options(METHOD))  # bad keep-all options fail here, once
        _patch_models()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    SESSIONS.reset()
    RESULTS[item.nodeid] = {"reports": []}
    try:
        return (yield)
    finally:
        _write(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        errors = []
        while SESSIONS.open:
            name, session = SESSIONS.open.pop()
            try:
                session.__exit__(None, None, None)
            except Exception:  # a session that cannot restore its model is a failure of the test that built it
                errors.append(f"{name}: {traceback.format_exc()}")
        if errors:
            raise RuntimeError("vtprune session exit failed:\n" + "\n".join(errors))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    entry = RESULTS.setdefault(report.nodeid, {"reports": []})
    outcome = report.outcome
    if hasattr(report, "wasxfail"):
        outcome = "skipped" if report.skipped else "passed"  # xfail counts as skipped, xpass as passed
    item = {"when": report.when, "outcome": outcome}
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        item["error"] = (message.strip().splitlines() or [""])[0][:400]
        item["crash"] = f"{crash.path}:{crash.lineno}" if crash else ""
        text = report.longreprtext
        frames = [ln.strip() for ln in text.splitlines() if FRAME.match(ln)]  # "path.py:123: in function"
        item["frames"] = [f for f in frames if "/torch/nn/modules/" not in f][-30:]
        item["vtprune_frames"] = [f for f in frames if "/vtprune/" in f][-6:]
        item["tail"] = "\n".join(text.splitlines()[-40:])[-4000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        item["reason"] = str(report.longrepr[2])[:300]
    entry["reports"].append(item)


def _write(nodeid: str) -> None:
    entry = RESULTS.pop(nodeid, {"reports": []})
    reports = entry["reports"]
    failed = [r for r in reports if r["outcome"] == "failed"]
    if failed:
        outcome = "failed"
    elif any(r["outcome"] == "skipped" for r in reports):
        outcome = "skipped"
    elif reports:
        outcome = "passed"
    else:
        outcome = "not run"
    row = {
        "nodeid": nodeid,
        "method": METHOD,
        "outcome": outcome,
        "attached": SESSIONS.attached,
        "refused": SESSIONS.refused,
        "unsupported": sorted(SESSIONS.unsupported),
    }
    if failed:
        first = failed[0]
        row.update({k: first.get(k) for k in ("when", "error", "crash", "frames", "vtprune_frames", "tail")})
    skipped = [r for r in reports if r["outcome"] == "skipped"]
    if skipped and not failed:
        row["reason"] = skipped[0].get("reason", "")
    if REPORT:
        with open(REPORT, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    while SESSIONS.open:  # models built outside any test (module level): close their sessions too
        SESSIONS.open.pop()[1].__exit__(None, None, None)

