"""The demo's model slot: a slow load runs in the background and never holds up another visitor's request."""

from __future__ import annotations

import threading
import time

import pytest

from vtprune.core.errors import VTPruneError
from vtprune.demo.backend import Demo, ModelLoading, Request
from vtprune.loading import load

QUICK = dict(max_new_tokens=2, repeats=1, methods=["random"], budget="4")


class GatedLoader:
    """Loads the tiny saved model; the name "slow" loads it only once `gate` is opened, "broken" fails after 1 s."""

    def __init__(self, folder) -> None:
        self.folder = str(folder)
        self.gate = threading.Event()
        self.calls: list[str] = []

    def __call__(self, name: str, device=None):
        self.calls.append(name)
        if name == "broken":
            time.sleep(1.0)  # longer than the request waits
            raise OSError("no weights in this folder\nsecond line")
        if name == "slow":
            assert self.gate.wait(60), "the test never opened the gate"
        return load(self.folder, device=device)


@pytest.fixture
def slot(saved_model):
    loader = GatedLoader(saved_model)
    demo = Demo(model=str(saved_model), loader=loader, allow_hub=True, load_wait_s=0.2)
    demo.models.wait_s = None
    demo.models.get(str(saved_model))  # the preselected model is in the slot
    demo.models.wait_s = 0.2
    yield demo, loader
    loader.gate.set()


def test_a_request_for_a_loading_model_returns_at_once_and_others_are_answered_meanwhile(slot, saved_model, screenshots):
    demo, loader = slot
    ask = dict(files=screenshots.files[:1], question="w1", **QUICK)

    started = time.monotonic()
    with pytest.raises(ModelLoading, match="loading model 'slow' in the background"):
        demo.run(Request(model="slow", **ask))
    assert time.monotonic() - started < 5  # not the load's time: the gate is still closed

    report = demo.run(Request(model=str(saved_model), **ask))  # another visitor, on the model in the slot
    assert report.dense.answer and report.runs[0].visual == (16, 4)
    assert not loader.gate.is_set() and demo.models.job is not None and demo.models.job.name == "slow"
    assert "model: " + str(saved_model) in demo.models.status() and "loading slow" in demo.models.status()

    with pytest.raises(ModelLoading, match="loads one model at a time"):  # a third model waits for the slot
        demo.run(Request(model="other", **ask))
    with pytest.raises(ModelLoading, match="loading model 'slow'"):  # asking again does not start a second load
        demo.run(Request(model="slow", **ask))
    assert loader.calls.count("slow") == 1

    loader.gate.set()
    demo.models.wait_s = 30
    report = demo.run(Request(model="slow", **ask))
    assert report.runs[0].visual == (16, 4)
    assert demo.models.name == "slow" and demo.models.job is None
    assert loader.calls.count("slow") == 1


def test_a_failed_background_load_is_reported_to_the_next_request(slot, screenshots):
    demo, loader = slot
    ask = dict(files=screenshots.files[:1], question="w1", **QUICK)
    with pytest.raises(ModelLoading, match="loading model 'broken'"):
        demo.run(Request(model="broken", **ask))
    deadline = time.monotonic() + 30
    while demo.models.job is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(VTPruneError, match="cannot load model 'broken': no weights in this folder$"):
        demo.run(Request(model="broken", **ask))
    assert demo.models.name is not None and demo.models.name != "broken"  # the old model still serves
    with pytest.raises(ModelLoading):  # reported once: the next request tries again
        demo.run(Request(model="broken", **ask))
    assert loader.calls.count("broken") == 2


def test_a_refused_model_fails_at_once_without_a_load(saved_model, screenshots):
    loader = GatedLoader(saved_model)
    demo = Demo(model=str(saved_model), loader=loader, load_wait_s=0.2)
    with pytest.raises(VTPruneError, match="only when started with --allow-hub"):
        demo.run(Request(files=screenshots.files[:1], question="w1", model="someone/some-model", **QUICK))
    with pytest.raises(VTPruneError, match="does not exist"):
        demo.run(Request(files=screenshots.files[:1], question="w1", model="/no/such/model", **QUICK))
    assert loader.calls == [] and demo.models.job is None
