"""Where the visual tokens sit in each sample of the language-model sequence."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisualSpan:
    """The visual tokens of one image (or frame, tile, screenshot) in one sample.

    The span is contiguous in the sequence: tokens `start .. start + length - 1`.
    """

    image: int  # index of the image in the order the vision encoder saw the images
    start: int  # position of the first token in the current sequence
    patch_index: Tensor  # [length] long: patch number (row-major in `grid`) of each token; -1 for non-patch tokens
    grid: tuple[int, int] | None = None  # (rows, cols) of the image's full patch grid
    kind: str = "image"  # "image", "frame" (of a video), or an anyres image's "base" view / "tiles" mosaic
    # [length] long: the vision-encoder input (its batch index: an anyres tile, the base view, a frame) each token
    # comes from, and the token's patch there (-1 for non-patch tokens). None: input `image`, patch `patch_index`.
    view: Tensor | None = None
    view_patch: Tensor | None = None
    video: int | None = None  # frames: the index of their video (videos in the order the encoder saw them)

    @property
    def length(self) -> int:
        return int(self.patch_index.numel())

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass
class VisualLayout:
    """Per sample, the visual spans in sequence order, for a sequence of length `seq_len` (padding included).

    Visual tokens of a sample are numbered 0..n-1 in sequence order ("visual ordinals"); methods return kept ordinals.
    """

    spans: list[list[VisualSpan]]
    seq_len: int
    original_ordinal: list[Tensor] = field(default_factory=list)  # per sample: original ordinal of each current token

    def __post_init__(self) -> None:
        if not self.original_ordinal:
            self.original_ordinal = [torch.arange(self.num_visual(b)) for b in range(self.batch_size)]

    @property
    def batch_size(self) -> int:
        return len(self.spans)

    @property
    def num_images(self) -> int:
        return sum(len(s) for s in self.spans)

    def num_visual(self, sample: int) -> int:
        return sum(span.length for span in self.spans[sample])

    def visual_positions(self, sample: int) -> Tensor:
        """[n] positions in the sequence of the sample's visual tokens, in ordinal order."""
        ranges = [torch.arange(s.start, s.end) for s in self.spans[sample]]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)

    def ordinal_slices(self, sample: int) -> list[tuple[VisualSpan, slice]]:
        """Each span of the sample with the slice of visual ordinals it covers."""
        out, offset = [], 0
        for span in self.spans[sample]:
            out.append((span, slice(offset, offset + span.length)))
            offset += span.length
        return out

    def visual_mask(self, device: torch.device | None = None) -> Tensor:
        """[B, L] bool, True at visual tokens."""
        mask = torch.zeros(self.batch_size, self.seq_len, dtype=torch.bool, device=device)
        for b, spans in enumerate(self.spans):
            for s in spans:
                mask[b, s.start : s.end] = True
        return mask

    def after_keep(self, kept_ordinals: list[Tensor], new_position: list[Tensor], new_seq_len: int) -> "VisualLayout":
        """The layout after keeping `kept_ordinals[b]` of each sample, listed in the order they take in the new sequence
        (ascending, unless a plan reorders tokens within an image).

        `new_position[b][p]` is the new sequence position of old position p (only read at kept positions).
        """
        spans, originals = [], []
        for b in range(self.batch_size):
            kept = kept_ordinals[b].cpu()
            sample_spans = []
            for span, sl in self.ordinal_slices(b):
                inside = kept[(kept >= sl.start) & (kept < sl.stop)]
                local = inside - sl.start
                if inside.numel():
                    start = int(new_position[b][span.start + int(local.min())])
                else:  # every token of the span was dropped: an empty span where it would have been
                    start = int(new_position[b][: span.start + 1].max()) if span.start > 0 else 0
                view = span.view[local] if span.view is not None else None
                view_patch = span.view_patch[local] if span.view_patch is not None else None
                sample_spans.append(
                    replace(span, start=start, patch_index=span.patch_index[local], view=view, view_patch=view_patch)
                )
            spans.append(sample_spans)
            originals.append(self.original_ordinal[b][kept])
        return VisualLayout(spans=spans, seq_len=new_seq_len, original_ordinal=originals)
