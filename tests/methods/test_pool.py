"""Spatial pooling: each pooled token is exactly adaptive average pooling of the language-model inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune.methods.pool import pool_cells, pool_shape


@pytest.mark.parametrize(
    "rows, cols, budget, shape",
    [(24, 24, 64, (8, 8)), (24, 24, 144, (12, 12)), (24, 24, 192, (12, 16)), (24, 24, 576, (24, 24)), (4, 4, 5, (2, 2))],
)
def test_pool_shape_uses_the_budget(rows, cols, budget, shape):
    h, w = pool_shape(rows, cols, budget)
    assert (h, w) == shape
    assert h * w <= budget


def test_cells_match_adaptive_average_pooling():
    grid = torch.rand(1, 1, 7, 5)
    h, w = 3, 2
    cells = pool_cells(7, 5, h, w)
    flat = grid.flatten()
    means = torch.stack([flat[c].mean() for c in cells])
    torch.testing.assert_close(means, F.adaptive_avg_pool2d(grid, (h, w)).flatten())


def test_pooled_tokens_enter_the_language_model(tiny_llava, batch):
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()
        seen["mask"] = kwargs["attention_mask"].clone()

    with torch.no_grad():
        inner = tiny_llava.model
        features = torch.stack(list(inner.get_image_features(pixel_values=batch["pixel_values"]).pooler_output))
        with vtprune.make("pool", keep=4)(tiny_llava):
            handle = inner.language_model.register_forward_pre_hook(capture, with_kwargs=True)
            tiny_llava(**batch)
            handle.remove()
    grids = features.view(3, 4, 4, -1).permute(0, 3, 1, 2)  # [images, D, 4, 4]
    pooled = F.adaptive_avg_pool2d(grids, (2, 2)).flatten(2).transpose(1, 2)  # [images, 4, D]
    # sample 1's real tokens: [BOS, 5, image 1 (4 pooled), 10, image 2 (4 pooled), 7, 11]
    second = seen["embeds"][1, seen["mask"][1].bool()]
    torch.testing.assert_close(second[2:6], pooled[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(second[7:11], pooled[2], atol=1e-6, rtol=0)
    real = seen["mask"][0].bool()
    torch.testing.assert_close(seen["embeds"][0, real][3:7], pooled[0], atol=1e-6, rtol=0)
