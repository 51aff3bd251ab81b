"""Shared fixtures: tiny LLaVA models built from configs once per session, and a padded multi-image batch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import IMAGE_TOKEN, build_tiny_llava, build_tiny_processor, padded_batch


@pytest.fixture(scope="session")
def tiny_llava():
    """LLaVA-1.5 layout in miniature: CLIP tower (4x4 patch grid + [CLS]), Llama LM with GQA, SDPA attention."""
    return build_tiny_llava(seed=0)


@pytest.fixture(scope="session")
def batch():
    """Batch of 2 with left padding: sample 0 holds one image, sample 1 holds two images (3 images in all)."""
    return padded_batch()


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory):
    """The tiny LLaVA and its offline processor saved with `save_pretrained`, for the command line."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    build_tiny_llava(seed=0).save_pretrained(folder)
    build_tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


__all__ = ["IMAGE_TOKEN"]
