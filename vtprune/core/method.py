"""Methods (scorers): small classes that decide which visual tokens to keep. They know tensors, not models."""

from __future__ import annotations

import dataclasses
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from .adapter import load_builtins
from .budget import VISUAL_TOKENS, BudgetKind
from .errors import VTPruneError
from .layout import VisualLayout
from .options import check_options
from .plan import KeepPlan
from .session import Session
from .signals import ModelInfo


@dataclass
class SiteContext:
    """Everything a method sees at one cut."""

    site: str  # "pre_llm" | "llm_layer" | "kv_cache" | "encoder"
    layout: VisualLayout  # visual tokens of the current sequence
    signals: dict[Any, Any]  # request -> value, for the requests the method made
    info: ModelInfo
    hidden_states: Tensor | None = None  # [B, L, D] the sequence at the site (LLM input or hidden states)
    layer: int | None = None  # llm_layer: the cut sits right before this decoder layer; encoder: right after this block
    stage: int = 0  # index of this cut among the method's cuts in this forward
    state: dict[str, Any] = field(default_factory=dict)  # scratch space shared by the cuts of one forward
    attention_mask: Tensor | None = None  # [B, L] 1 at real tokens, 0 at padding (language-model sites)


class Method(ABC):
    """Base class. Subclasses are dataclasses whose fields are the method's options; one of them is `keep`, the budget,
    whose meaning the class declares by `budget_kind` (see `vtprune.core.budget`).

    `with method(model) as trace:` attaches the method to a supported model through its adapter.
    """

    name: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ("pre_llm",)  # the sites the method cuts at (see `cut_sites`)
    positions: ClassVar[str] = "renumber"  # "renumber": kept tokens get contiguous positions; "original": keep theirs
    presets: ClassVar[dict[str, dict[str, Any]]] = {}  # named option sets, `make(name, preset=...)`
    budget_kind: ClassVar[BudgetKind] = VISUAL_TOKENS  # what `keep` counts
    keep: Any = None  # the budget: a dataclass field of every registered method (None: the method documents it)

    def __post_init__(self) -> None:
        if self.keep is not None:
            self.keep = self.budget_kind.check(self.keep, self.name)

    def requests(self, info: ModelInfo) -> list[Any]:
        """Signals this method needs (see `vtprune.core.signals`)."""
        return []

    def cut_sites(self, info: ModelInfo) -> tuple[str, ...]:
        """The sites this method cuts at on the model described by `info`; adapters use this, not `sites`.

        Default: `sites`. A method may move its cut, e.g. into the vision encoder of a model with no language model.
        """
        return self.sites

    def cut_layers(self, info: ModelInfo) -> list[int]:
        """For the llm_layer site: the decoder layers (0-based) before which a cut happens, ascending."""
        return []

    def encoder_blocks(self, info: ModelInfo) -> list[int]:
        """For the encoder site: the vision-encoder blocks (0-based) after which a cut happens, ascending."""
        return []

    def position_mode(self, ctx: SiteContext) -> str:
        return self.positions

    @abstractmethod
    def plan(self, ctx: SiteContext) -> KeepPlan:
        """Decide what to keep at this cut."""

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def __call__(self, model: Any) -> Session:
        return Session(self, model)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"vtprune.make({self.name!r}{', ' if opts else ''}{opts})"


_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available to `vtprune.make(cls.name)`. A name is registered once."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise VTPruneError(
            f"a method named {cls.name!r} is already registered ({_METHODS[cls.name].__module__}."
            f"{_METHODS[cls.name].__qualname__}); give {cls.__qualname__} another name"
        )
    if not dataclasses.is_dataclass(cls) or "keep" not in {f.name for f in dataclasses.fields(cls)}:
        raise TypeError(f"{cls.__name__} must be a dataclass with a `keep` option (its budget, see budget_kind)")
    _METHODS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of the registered methods."""
    load_builtins()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    load_builtins()
    if name not in _METHODS:
        raise VTPruneError(f"unknown method {name!r}; available: {', '.join(available())}")
    return _METHODS[name]


def make(name: str, preset: str | os.PathLike | None = None, **options: Any) -> Method:
    """Build a registered method with its options, e.g. `make("vtc-cls", keep=64, start_layer=16)`.

    `preset`: one of the method's named presets (`method_class(name).presets`) or the path of a JSON preset written
    by `vtprune tune`; options given here override the preset's. Option names and types are checked against the
    method's declared fields; ranges by the method itself.
    """
    cls = method_class(name)
    if preset is not None:
        options = {**load_preset(cls, preset), **options}
    return cls(**check_options(cls, options, name))


def make_at(name: str, budget: Any, **options: Any) -> Method:
    """The method `name` at a budget as parsed by `parse_budget`: a preset name, or `keep` (checked against the
    method's `budget_kind`). Options given explicitly win over the budget's."""
    if isinstance(budget, str):
        return make(name, preset=budget, **options)
    return make(name, **{"keep": budget, **options})


def load_preset(cls: type[Method], preset: str | os.PathLike) -> dict[str, Any]:
    """The options of a named preset of `cls`, or of a JSON preset file {"method": name, "options": {...}}."""
    if isinstance(preset, str) and preset in cls.presets:
        return dict(cls.presets[preset])
    path = Path(preset)
    names = ", ".join(sorted(cls.presets)) or "none"
    if not path.is_file():
        raise VTPruneError(f"{str(preset)!r} is neither a preset of {cls.name!r} (its presets: {names}) nor a JSON file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise VTPruneError(f"preset {str(path)!r} is not valid JSON ({error}); write it with `vtprune tune`") from None
    if not isinstance(data, dict) or not isinstance(data.get("options"), dict):
        raise VTPruneError(f"preset {str(path)!r} must be a JSON object with \"method\" and an \"options\" object")
    if data.get("method") != cls.name:
        raise VTPruneError(f"preset {str(path)!r} is for method {data.get('method')!r}, not {cls.name!r}")
    return check_options(cls, data["options"], cls.name)
