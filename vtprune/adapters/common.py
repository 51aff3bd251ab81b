"""Small helpers every adapter hook uses: reading a call's arguments."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..core.errors import VTPruneError

CACHE_KEYS = ("past_key_values", "cache")  # transformers names the cache argument one of these


def kwarg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """The argument `name` of a hooked call: a keyword, else positional argument `index`, else None."""
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)


def cache_argument(kwargs: dict) -> Any:
    """The cache passed to a transformers module call (under either name), or None."""
    for key in CACHE_KEYS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    return None


def call_arguments(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a call of `fn` by parameter name (defaults left out)."""
    return inspect.signature(fn).bind_partial(*args, **kwargs).arguments


def media_in_call(arguments: dict) -> set[str]:
    """The modalities ("image", "video") a multimodal model call merges into its sequence: raw pixels, or encoder
    outputs that generate() computed beforehand (`mm_encoder_outputs`)."""
    media = {m for m, out in (arguments.get("mm_encoder_outputs") or {}).items() if out is not None}
    if arguments.get("pixel_values") is not None:
        media.add("image")
    if arguments.get("pixel_values_videos") is not None:
        media.add("video")
    return media


def placeholder_mask(model: Any, arguments: dict, token_id: int, present: bool = True) -> Any:
    """[B, L] bool (CPU): where the call's sequence holds the placeholder token `token_id` — read from `input_ids`, or
    from `inputs_embeds` equal to that token's embedding (as transformers finds it). All False when not `present`
    (the call merges no such media: its placeholder ids are text to the model)."""
    input_ids = arguments.get("input_ids")
    if not present:
        sequence = input_ids if input_ids is not None else arguments.get("inputs_embeds")
        return torch.zeros(sequence.shape[:2], dtype=torch.bool)
    if input_ids is not None:
        return (input_ids == token_id).cpu()
    embeds = arguments.get("inputs_embeds")
    if embeds is None:
        raise VTPruneError("the model was called with neither input_ids nor inputs_embeds")
    token = model.get_input_embeddings()(torch.tensor(token_id, device=embeds.device))
    return (embeds == token).all(-1).cpu()


def continues_cache(arguments: dict) -> bool:
    """Whether the call continues a filled cache (a decode step, or more tokens after a prefill). Images in such a call
    (a chunked prefill) are refused: vtprune cuts a prompt prefilled in one call."""
    cache = cache_argument(arguments)
    if cache is None or cache.get_seq_length() == 0:
        return False
    if media_in_call(arguments):
        raise VTPruneError(
            "images or videos in a call that continues a cache (chunked prefill) are not supported; "
            "prefill the whole prompt in one call"
        )
    return True


def token_runs(row: Any) -> list[tuple[int, int]]:
    """(start, end) of every run of consecutive True entries of a 1-D bool tensor."""
    positions = row.nonzero().squeeze(1)
    if not positions.numel():
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in torch.tensor_split(positions, breaks)]


def reconstruct(constructor: Callable[..., Any], *args: Any) -> Any:
    """`constructor(*args)`, for a `__reduce_ex__` that must hand pickle copyreg.__newobj__ of a class other than the
    object's own (pickle refuses that when __newobj__ is named directly)."""
    return constructor(*args)


def swap_class(obj: Any, overrides: dict[str, Any], adapter: Any) -> type:
    """Give `obj` a subclass of its class with `overrides` (methods, properties) until the adapter detaches.

    The overrides should act only while `adapter.active()`. A copy (`copy.deepcopy`) or pickle of `obj` is made of its
    original class, so it carries nothing of the session. Returns the original class.
    """
    original = type(obj)

    def __reduce_ex__(self: Any, protocol: int) -> Any:
        reduced = object.__reduce_ex__(self, protocol)
        if isinstance(reduced, tuple) and len(reduced) > 1 and reduced[1] and reduced[1][0] is type(self):
            # pickle insists that copyreg.__newobj__'s class be the object's own: call it through `reconstruct`
            return (reconstruct, (reduced[0], original, *reduced[1][1:]), *reduced[2:])
        return reduced

    namespace = {**overrides, "__reduce_ex__": __reduce_ex__, "__module__": original.__module__}
    obj.__class__ = type(original.__name__, (original,), namespace)

    def restore() -> None:
        obj.__class__ = original

    adapter.on_detach(restore)
    return original


def expanded_items(row_tokens: list[int], item_tokens: list[int], what: str = "image") -> list[int] | None:
    """Which encoded item (image, video) stands behind each item of the prompt, in prompt order, when generate()
    encoded a batch's media once and then repeated every sample k times (beam search, num_return_sequences): the
    samples' rows come k at a time, each with the whole media group of its sample. None when nothing was repeated.

    row_tokens: placeholder tokens of each row of the prompt; item_tokens: tokens of each encoded item, in order.
    """
    total_rows, total_items = sum(row_tokens), sum(item_tokens)
    if total_rows == total_items:
        return None
    repeats = total_rows // total_items if total_items else 0
    if not repeats or total_rows % total_items or len(row_tokens) % repeats:
        raise VTPruneError(
            f"the prompt holds {total_rows} {what} tokens but the encoded {what}s need {total_items}; "
            f"run the model (or generate) inside the `with` block"
        )
    out, item = [], 0
    for start in range(0, len(row_tokens), repeats):
        group = row_tokens[start : start + repeats]
        if len(set(group)) != 1:
            raise VTPruneError(f"rows {start}..{start + repeats - 1} should repeat one sample's {what}s but differ")
        items, need = [], group[0]
        while need > 0 and item < len(item_tokens):
            items.append(item)
            need -= item_tokens[item]
            item += 1
        if need != 0:
            raise VTPruneError(f"the {what} tokens of rows {start}.. do not match whole encoded {what}s")
        out += items * repeats
    return out


def transformers_classes(*names: str) -> tuple[type, ...]:
    """The installed transformers' classes of these names (a version may lack some)."""
    import transformers

    return tuple(getattr(transformers, name) for name in names if hasattr(transformers, name))


def qwen_model_info(family: str, language_model: Any, visual: Any, vision_config: Any) -> Any:
    """ModelInfo of a Qwen-VL model: a merged-patch tower without [CLS] whose last block feeds the merger."""
    from ..core.signals import ModelInfo

    depth = len(visual.blocks)
    return ModelInfo(
        family=family,
        llm_layers=len(language_model.layers),
        vision_layers=depth,
        vision_feature_layer=depth - 1,
        vision_has_cls=False,
        patch_size=vision_config.patch_size * vision_config.spatial_merge_size,  # pixels per side of one token
    )
