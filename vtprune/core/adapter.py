"""Adapters hook methods into one model family. This base class owns hook bookkeeping and restoring the model.

Every hook an adapter installs runs only while its session is active in the calling context (see
`vtprune.core.session`): other threads calling the model meanwhile run it dense. A model copied (`copy.deepcopy`) or
pickled while a session is open is copied without the session: its copies of the hooks do nothing.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from .errors import UnsupportedModelError, UnsupportedSignalError
from .signals import ModelInfo

if TYPE_CHECKING:
    from .method import Method
    from .trace import Trace


def _inert(*args: Any, **kwargs: Any) -> None:
    return None


class SessionHook:
    """A forward (pre-)hook that runs `fn` only while `active()`; copies and pickles of it are inert."""

    def __init__(self, fn: Callable, active: Callable[[], bool]) -> None:
        self.fn, self.active = fn, active

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run_hook(self, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Callable:
        return _inert

    def __reduce__(self) -> tuple:
        return (_inert_hook, ())


def _inert_hook() -> Callable:
    return _inert


@torch.compiler.disable(reason=(
    "vtprune: a session's hooks (data-dependent cuts) cannot be traced into one graph, so torch.compile(fullgraph=True)"
    " of a model inside a session is refused; compile without fullgraph, or compile the language model alone"
))
def _run_hook(hook: SessionHook, args: tuple, kwargs: dict) -> Any:
    """A session hook's body, never traced by torch.compile: a compiled model runs it eagerly (a graph break), and
    fullgraph=True stops at it with the reason above."""
    return hook.fn(*args, **kwargs) if hook.active() else None


class Adapter(ABC):
    family: ClassVar[str] = ""
    sites: ClassVar[frozenset[str]] = frozenset()
    signals: ClassVar[frozenset[type]] = frozenset()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active: Callable[[], bool] = lambda: True  # set by the session: is it active in the calling context?
        self._handles: list[Any] = []
        self._restores: list[Callable[[], None]] = []

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True if this adapter handles `model`."""

    @property
    @abstractmethod
    def info(self) -> ModelInfo:
        """What methods may know about the model."""

    @abstractmethod
    def attach(self, method: "Method", trace: "Trace") -> None:
        """Install the hooks that apply `method`, recording into `trace`."""

    def check(self, method: "Method") -> None:
        """Refuse, before anything is attached, a method whose sites or signals this adapter lacks."""
        for site in method.cut_sites(self.info):
            if site not in self.sites:
                raise UnsupportedSignalError(
                    f"method {method.name!r} cuts at site {site!r}, which the {self.family} adapter does not offer "
                    f"(it offers: {', '.join(sorted(self.sites))})"
                )
        for request in method.requests(self.info):
            if type(request) not in self.signals:
                raise UnsupportedSignalError(
                    f"method {method.name!r} needs the signal {type(request).__name__}, which the {self.family} "
                    f"adapter cannot provide (it provides: {', '.join(sorted(s.__name__ for s in self.signals))})"
                )

    def hook(self, module: nn.Module, fn: Callable, *, pre: bool = True) -> None:
        """Register a forward (pre-)hook with kwargs, active only in the session's context, removed by `detach`."""
        hook = SessionHook(fn, lambda: self.active())
        if pre:
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        self._handles.append(handle)

    def on_detach(self, restore: Callable[[], None]) -> None:
        self._restores.append(restore)

    def detach(self) -> None:
        """Remove every hook and undo every change, leaving the model as it was."""
        while self._handles:
            self._handles.pop().remove()
        while self._restores:
            self._restores.pop()()


_ADAPTERS: list[type[Adapter]] = []


def load_builtins() -> None:
    """Let the package root register its built-in adapters and methods before a registry lookup.

    `import vtprune` is lazy (a fast `vtprune --help`), so they register on first use; the core names none of them:
    it calls the root package's hook, `vtprune.register_builtins` (the root is imported before any of its modules).
    """
    hook = getattr(sys.modules.get(__name__.partition(".")[0]), "register_builtins", None)
    if hook is not None:
        hook()


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    if any(existing.family == cls.family for existing in _ADAPTERS):
        raise UnsupportedModelError(f"an adapter for the family {cls.family!r} is already registered")
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: Any) -> type[Adapter]:
    load_builtins()
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls
    families = ", ".join(sorted({c.family for c in _ADAPTERS}))
    raise UnsupportedModelError(
        f"vtprune has no adapter for {type(model).__name__}; supported families: {families}"
    )
