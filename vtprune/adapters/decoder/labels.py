"""`labels=` in a forward inside a session (training or fine-tuning on pruned tokens): the loss is computed over the
kept sequence, with the labels compacted exactly as the sequence was.

The model's own loss would compare the shortened logits with full-length labels. So the labels are taken out of the
call before it runs and, once it has run, the model's own `loss_function` is applied to its logits and the labels
gathered like the hidden states: -100 at the padding slots a cut adds, a merged token keeps the label of its slot
(LLaVA-style training data puts -100 at every visual position, so nothing a cut drops carries a target).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ...core.cut import Cut

if TYPE_CHECKING:
    from .cutter import DecoderCutter

IGNORE = -100  # transformers' ignore_index


def follow_cut(source: Tensor | None, cut: Cut, length: int) -> Tensor:
    """source [B, L]: the caller's sequence position behind every slot (-1: a padding slot a cut added; None: the
    identity over `length` positions). Returns the same after `cut`: [B, L']."""
    if source is None:
        source = torch.arange(length).expand(cut.index.shape[0], length)
    source = source.gather(1, cut.index).masked_fill(~cut.valid, -1)
    if cut.reorder is not None:
        source = source.gather(1, cut.reorder)
    return source


class LabelLoss:
    """Hooks on the whole model (the one that takes `labels`) that move the loss onto the kept sequence."""

    def __init__(self, cutter: "DecoderCutter") -> None:
        self.cutter = cutter
        self.model: nn.Module = cutter.adapter.model
        self.labels: Tensor | None = None
        self.loss_kwargs: dict[str, Any] = {}

    def attach(self) -> None:
        self.cutter.adapter.hook(self.model, self._take_labels)
        self.cutter.adapter.hook(self.model, self._loss, pre=False)

    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self.labels = kwargs.get("labels")
        if self.labels is None:
            return None
        kwargs = dict(kwargs, labels=None)
        # pre-shifted targets (`shift_labels`: the target of each position) follow their positions through the cut
        self.loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "shift_labels") if k in kwargs}
        return args, kwargs

    def _loss(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self.labels = self.labels, None
        if labels is None:
            return None
        loss_kwargs = dict(self.loss_kwargs)
        source = getattr(self.cutter.prefill, "source", None)
        if source is not None:  # this forward's prefill was cut: gather the labels like the sequence
            source = source.to(labels.device)
            labels = labels.gather(1, source.clamp(min=0)).masked_fill(source < 0, IGNORE)
            if loss_kwargs.get("shift_labels") is not None:
                shifted = loss_kwargs["shift_labels"]
                loss_kwargs["shift_labels"] = shifted.gather(1, source.clamp(min=0)).masked_fill(source < 0, IGNORE)
        logits = output["logits"] if isinstance(output, dict) else output[0]
        vocab = self.model.config.get_text_config().vocab_size
        loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab, **loss_kwargs)
        if isinstance(output, dict):  # a ModelOutput: rebuilt so that the loss comes first, as the model puts it
            return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        return (loss, *output)
