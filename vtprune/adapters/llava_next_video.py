"""Adapter for transformers' `LlavaNextVideoForConditionalGeneration`: anyres images as in LLaVA-NeXT, and videos.

Video: every frame's encoder features are pooled by the model's `vision_resampler` (2×2 average pooling by default)
before the projector; a video has no newline token.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..core.adapter import register_adapter
from .llava_next import LlavaNextAdapter


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_class = "LlavaNextVideoForConditionalGeneration"

    def pool_tokens(self, x: Tensor) -> Tensor:
        """The resampler itself for average/max pooling; a learned conv pool is followed geometrically (averages)."""
        resampler = self.inner.vision_resampler
        if isinstance(resampler.pool, (nn.AvgPool2d, nn.MaxPool2d)):
            return resampler(x)
        stride = self.model.config.spatial_pool_stride
        grid = x.view(x.shape[0], self.side, self.side, -1).permute(0, 3, 1, 2)
        return nn.functional.avg_pool2d(grid, stride, stride).flatten(2).transpose(1, 2)

    def pool_features(self, x: Tensor) -> Tensor:
        """The resampler itself (a conv pool included): what the projector receives for every frame."""
        return self.inner.vision_resampler(x)
