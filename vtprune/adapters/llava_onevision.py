"""Adapter for transformers' `LlavaOnevisionForConditionalGeneration` (LLaVA-OneVision; also LongVA converted with
`vtprune convert longva`): anyres images as in LLaVA-NeXT (plus the model's downsizing of large tile mosaics; images
of multi-image prompts are encoded as one view each) and videos.

Video: every frame's features are pooled to ceil(side/2)² tokens by the model's bilinear `apply_pooling` (2×2 means for
an even grid), and one newline token ends every video (it closes the last frame's span). The SigLIP tower of the
released checkpoints has no [CLS]: methods that need one (vtc-cls) are refused with a clear error.
Not offered: `ProjectorInput`: the model pools frames and downsizes large mosaics after its projector, so a merge of
encoder features would not give the tokens it replaces.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..core.adapter import register_adapter
from ..core.signals import ProjectorInput
from .llava_next import Encoded, LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    video_newline = True
    signals = LlavaNextAdapter.signals - {ProjectorInput}

    def views_per_image(self, image_sizes: Tensor, batch_num_images: Any) -> list[int]:
        """One view per image in prompts with several images (the model skips the tiles there), else base + tiles."""
        views = super().views_per_image(image_sizes, None)
        if batch_num_images is None:
            return views
        single = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        return [v if keep_tiles else 1 for v, keep_tiles in zip(views, single)]

    def pack(self, features: list[Tensor], image_sizes: Tensor, encoded: Encoded) -> list[Tensor]:
        packed, _ = self.inner.pack_image_features(
            features,
            image_sizes,
            image_newline=features[0].new_full((features[0].shape[-1],), -1.0),
            vision_aspect_ratio=encoded.aspect or self.model.config.vision_aspect_ratio,
        )
        return packed

    def pool_tokens(self, x: Tensor) -> Tensor:
        return self.inner.apply_pooling(x)
