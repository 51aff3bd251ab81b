"""What the decoder sites share while one forward runs: the prefill's state, and a continuation call's inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...core.layout import VisualLayout
from ...core.trace import ForwardRecord
from .cache import Segment


@dataclass
class Prefill:
    """One prefill forward of the language model inside the session."""

    prompt_length: int  # the prompt's length as the caller sees it (before any cut)
    layout: VisualLayout  # visual tokens of the current sequence
    record: ForwardRecord
    segments: list[Segment]
    signals: dict[Any, Any] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    layer_input: Tensor | None = None  # the input of the decoder layer running now (kv_cache site)
    attention_transition: tuple[Tensor, Tensor] | None = None  # (ratio, cosine) of the attention module just run
    prepared: dict[tuple, tuple[Any, Any]] = field(default_factory=dict)  # (segment start, layer kind) -> (mask, RoPE)
    source: Tensor | None = None  # [B, L'] caller's position behind every slot after the cuts (labels.follow_cut)
    candidates: int = 0  # tokens after the prompt in this call (assisted decoding's candidates), last in every row

    def prompt_mask(self, mask2d: Tensor) -> Tensor:
        """mask2d [B, L_s] with the candidates (its last `candidates` columns: cuts keep text in order) masked out:
        what signals and methods see, so that they read the prompt alone."""
        if not self.candidates:
            return mask2d
        mask2d = mask2d.clone()
        mask2d[:, -self.candidates :] = 0
        return mask2d

    def segment_at(self, layer: int) -> Segment:
        """The segment decoder layer `layer` belongs to."""
        return next(s for s in reversed(self.segments) if s.start <= layer)


@dataclass
class Continuation:
    """One call that continues a pruned cache (decoding, or verifying assisted candidates)."""

    mask: Tensor  # [B, past + q] the caller's 2-D mask over the whole sequence
    positions: Tensor  # [B, q] or [P, B, q] the caller's positions of the new tokens
    per_segment: dict[tuple, tuple[Any, Any]] = field(default_factory=dict)  # (id(segment), layer kind) -> (mask, RoPE)
