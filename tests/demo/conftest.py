"""Fixtures for the demo: saved tiny models of five families (with offline processors) and the bundled examples."""

from __future__ import annotations

import pytest

from vtprune.demo.examples import bundled_examples


@pytest.fixture(scope="session")
def examples(tmp_path_factory):
    """{label: Example}, generated into a fresh folder."""
    return {example.label: example for example in bundled_examples(tmp_path_factory.mktemp("demo-examples"))}


@pytest.fixture(scope="session")
def screenshots(examples):
    return next(e for label, e in examples.items() if label.startswith("GUI screenshots"))


@pytest.fixture(scope="session")
def video(examples):
    return next(e for label, e in examples.items() if label.startswith("Video"))


@pytest.fixture(scope="session")
def saved_qwen(tmp_path_factory):
    from tests.adapters.qwen_builders import build_qwen_processor, build_tiny_qwen

    folder = tmp_path_factory.mktemp("tiny-qwen2-vl")
    build_tiny_qwen().save_pretrained(folder)
    build_qwen_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def saved_onevision(tmp_path_factory):
    from tests.demo.builders import build_onevision_processor
    from tests.helpers_video import build_tiny_onevision

    folder = tmp_path_factory.mktemp("tiny-onevision")
    build_tiny_onevision().save_pretrained(folder)
    build_onevision_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def saved_qwen3(tmp_path_factory):
    from tests.adapters.qwen3_builders import build_qwen3_processor, build_tiny_qwen3

    folder = tmp_path_factory.mktemp("tiny-qwen3-vl")
    build_tiny_qwen3().save_pretrained(folder)
    build_qwen3_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def saved_internvl(tmp_path_factory):
    from tests.adapters.internvl_builders import build_internvl_processor, build_tiny_internvl

    folder = tmp_path_factory.mktemp("tiny-internvl")
    build_tiny_internvl().save_pretrained(folder)
    build_internvl_processor().save_pretrained(folder)
    return folder
