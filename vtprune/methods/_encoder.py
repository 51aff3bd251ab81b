"""Shared by one-cut methods that can make their cut inside the vision encoder instead of before the language model."""

from __future__ import annotations

from ..core import ModelInfo, VTPruneError


class EncoderCut:
    """Mixin for a method dataclass with the option `encoder_block: int | None`.

    The method's one cut moves into the vision encoder, right after block `encoder_block` (0-based; negative counts from
    the end), when that option is set or when the model has no language model (a bare vision tower such as an open_clip
    ViT); there `encoder_block=None` cuts after the middle block, n // 2 - 1. Otherwise the method cuts at its `sites`.
    """

    encoder_block: int | None

    def cut_sites(self, info: ModelInfo) -> tuple[str, ...]:
        return ("encoder",) if self.encoder_block is not None or info.llm_layers == 0 else self.sites

    def encoder_blocks(self, info: ModelInfo) -> list[int]:
        if "encoder" not in self.cut_sites(info):
            return []
        n = info.vision_layers
        block = n // 2 - 1 if self.encoder_block is None else self.encoder_block
        if not -n <= block < n - 1 or block % n == n - 1:
            raise VTPruneError(
                f"encoder_block={block}: the cut must sit between two of the vision encoder's {n} blocks; "
                f"use a block in 0..{n - 2} (or -{n}..-2)"
            )
        return [block % n]
