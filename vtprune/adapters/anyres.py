"""The layout of LLaVA-NeXT-style anyres images and pooled video frames in the language model's sequence.

An anyres image is its base view (the whole image resized to one encoder input; span kind "base", the view's patch
grid), then its tile mosaic (span kind "tiles": the tiles' patches as one grid, unpadded, with a row-end
`image_newline` token after every row; row ends have patch_index -1). Both spans carry the image's index and, per
token, the encoder input it comes from (`view`) and its patch there (`view_patch`). An image encoded as a single view
(OneVision's multi-image prompts) is one span of kind "image": its patches and one newline. Which token sits where is
read off the model's own packing code, run on patch coordinates instead of features, so unpadding (and OneVision's
downsizing of large mosaics: a token then maps to its nearest source patch) is followed exactly.
A video is one span per frame (kind "frame", `video` set), on the grid the model pools frames to. Encoder inputs are
numbered as the encoder sees them: every image's views (base first, then tiles in row-major order), then every
video's frames. Images are numbered 0..I-1 and frames I, I+1, ... (the spans' `image`).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.errors import VTPruneError
from ..core.layout import VisualLayout, VisualSpan
from .common import expanded_items


@dataclass
class Encoded:
    """One call of the model's image or video encoder in the current forward."""

    modality: str  # "image" | "video"
    views: list[int]  # images: encoder inputs per image; videos: frames per video
    image_sizes: Tensor | None = None  # images: [n, 2] (height, width)
    aspect: str | None = None  # images (OneVision): the vision_aspect_ratio the call used


@dataclass
class SpanTemplate:
    """A span before its start in the sequence is known."""

    kind: str
    grid: tuple[int, int]
    patch_index: Tensor
    view: Tensor
    view_patch: Tensor

    @property
    def length(self) -> int:
        return int(self.patch_index.numel())


class AnyresLayout:
    """Builds the layout of a LLaVA-NeXT-family prompt. The adapter provides `side` (patches per encoder input side),
    `modeling` (the model's modeling module), `model`, `family`, `pack` (the model's packing of view features) and
    `pool_tokens` (its pooling of video frames)."""

    side: int
    modeling: Any
    model: Any
    family: str

    @abstractmethod
    def pack(self, features: list[Tensor], image_sizes: Tensor, encoded: Encoded) -> list[Tensor]:
        """The model's own packing of per-view features [views, patches, C] into each image's token sequence."""

    @abstractmethod
    def pool_tokens(self, x: Tensor) -> Tensor:
        """[frames, patches, C] -> [frames, pooled, C]: the model's pooling of video frames."""

    def layout(self, is_image: Tensor, is_video: Tensor | None, encoded: list[Encoded]) -> VisualLayout:
        """Spans of every image and video frame of the prompt, from where its placeholder tokens sit ([B, L] bool) and
        what the encoder was given. When generate() encoded the media once and repeated every sample (beam search,
        num_return_sequences), the repeated rows reuse the encoded items (same encoder inputs, new image numbers)."""
        images = [e for e in encoded if e.modality == "image"]
        videos = [e for e in encoded if e.modality == "video"]
        image_items, view = [], 0
        for call in images:
            image_items += self.image_templates(call, view)
            view += sum(call.views)
        video_items = []
        for call in videos:
            for frames in call.views:
                video_items.append(self.video_templates(frames, view))
                view += frames
        image_items = self._expanded(is_image, image_items, "image")
        if is_video is not None:
            video_items = self._expanded(is_video, video_items, "video")
        elif video_items:
            raise VTPruneError(f"{self.family} has no video token")
        spans: list[list[VisualSpan]] = [[] for _ in range(is_image.shape[0])]
        self._place(spans, is_image, image_items, first_image=0, what="image")
        if is_video is not None:
            self._place(spans, is_video, video_items, first_image=len(image_items), what="video")
        for sample in spans:
            sample.sort(key=lambda s: s.start)
        self._views = view
        return VisualLayout(spans=spans, seq_len=is_image.shape[1])

    @staticmethod
    def _expanded(is_token: Tensor, items: list[list[SpanTemplate]], what: str) -> list[list[SpanTemplate]]:
        """The items in prompt order, repeated as generate() repeated the samples (see `common.expanded_items`)."""
        index = expanded_items(
            [int(n) for n in is_token.sum(dim=1)], [sum(t.length for t in item) for item in items], what
        )
        return items if index is None else [items[i] for i in index]

    @staticmethod
    def _place(
        spans: list[list[VisualSpan]], is_token: Tensor, items: list[list[SpanTemplate]], first_image: int, what: str
    ) -> None:
        """Give every item's spans their place: items take the placeholder tokens in order (row-major over samples).
        Images are numbered from `first_image` in prompt order (an image's views share its number); video items
        number each frame, and are videos 0, 1, ... in prompt order."""
        positions = is_token.cpu().nonzero()  # [N, 2] (sample, position), row-major
        needed = sum(t.length for item in items for t in item)
        if needed != positions.shape[0]:
            raise VTPruneError(
                f"the prompt holds {positions.shape[0]} {what} tokens but the encoded {what}s need {needed}; "
                f"run the model (or generate) inside the `with` block"
            )
        offset, image = 0, first_image
        for index, templates in enumerate(items):
            total = sum(t.length for t in templates)
            chunk = positions[offset : offset + total]
            sample, start = int(chunk[0, 0]), int(chunk[0, 1])
            if not (bool((chunk[:, 0] == sample).all()) and int(chunk[-1, 1]) - start == total - 1):
                raise VTPruneError(f"the tokens of {what} {index} are not one contiguous run in one sample")
            for template in templates:
                spans[sample].append(
                    VisualSpan(
                        image=image,
                        start=start,
                        patch_index=template.patch_index,
                        grid=template.grid,
                        kind=template.kind,
                        view=template.view,
                        view_patch=template.view_patch,
                        video=index if what == "video" else None,
                    )
                )
                start += template.length
                image += what == "video"  # every frame is an image; an anyres image's base and tiles are one
            image += what == "image"
            offset += total

    def image_templates(self, call: Encoded, first_view: int) -> list[list[SpanTemplate]]:
        """Per image of one encoder call: its spans, found by packing patch coordinates like features."""
        side, patches = self.side, self.side * self.side
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        features, shapes = [], []
        for size, views in zip(call.image_sizes, call.views):
            if views > 1:
                tiles_high, tiles_wide = self.modeling.get_anyres_image_grid_shape(
                    size.tolist(), self.model.config.image_grid_pinpoints, self.model.config.vision_config.image_size
                )
            else:
                tiles_high, tiles_wide = 1, 1
            coords = [torch.stack([torch.zeros(patches), rows.flatten(), cols.flatten()], dim=-1)]  # base: kind 0
            for tile in range(views - 1):
                r, c = divmod(tile, tiles_wide)
                tile_rows, tile_cols = (r * side + rows).flatten(), (c * side + cols).flatten()
                coords.append(torch.stack([torch.ones(patches), tile_rows, tile_cols], -1))
            features.append(torch.stack(coords).double())  # [views, patches, 3]
            shapes.append((tiles_high, tiles_wide))
        packed = self.pack(features, call.image_sizes, call) if features else []
        out, view = [], first_view
        for tokens, views, (tiles_high, tiles_wide) in zip(packed, call.views, shapes):
            base = torch.arange(patches)
            if views == 1:  # base view and one newline
                index = torch.cat([base, torch.tensor([-1])])
                view_of = torch.where(index >= 0, view, -1)
                out.append([SpanTemplate("image", (side, side), index, view_of, index.clone())])
            else:
                mosaic = tokens[patches:]
                newline = mosaic[:, 0] < -0.5
                height = int(newline.sum())
                width = (mosaic.shape[0] - height) // height
                r = mosaic[:, 1].round().long().clamp(0, tiles_high * side - 1)
                c = mosaic[:, 2].round().long().clamp(0, tiles_wide * side - 1)
                tile_view = view + 1 + (r // side) * tiles_wide + c // side
                patch_index = torch.full((mosaic.shape[0],), -1, dtype=torch.long)
                patch_index[~newline] = torch.arange(height * width)
                out.append([
                    SpanTemplate("base", (side, side), base, torch.full((patches,), view), base.clone()),
                    SpanTemplate(
                        "tiles", (height, width), patch_index,
                        torch.where(newline, -1, tile_view), torch.where(newline, -1, (r % side) * side + c % side),
                    ),
                ])
            view += views
        return out

    def pooled_grid(self) -> tuple[int, int]:
        pooled = self.pool_tokens(torch.zeros(1, self.side * self.side, 1)).shape[1]
        side = math.isqrt(pooled)
        return side, pooled // side

    def video_templates(self, frames: int, first_view: int) -> list[SpanTemplate]:
        """One span per frame on the pooled grid; with `video_newline`, the last frame's span ends with the newline."""
        grid = self.pooled_grid()
        index = torch.arange(grid[0] * grid[1])
        out = []
        for frame in range(frames):
            patch_index = index
            if self.video_newline and frame == frames - 1:
                patch_index = torch.cat([index, torch.tensor([-1])])
            view = torch.where(patch_index >= 0, first_view + frame, -1)
            out.append(SpanTemplate("frame", grid, patch_index, view, patch_index.clone()))
        return out
