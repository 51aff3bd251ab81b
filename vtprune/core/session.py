"""`with method(model) as trace:` — attach, record what was kept, and always restore the model.

Sessions are context-scoped: the hooks a session installs act only inside the context (thread, asyncio task) that
entered it; every other caller of the same model meanwhile runs the dense model. A model holds at most one session at
a time: entering a second one (nested, or from another thread) is refused with an error naming the open one.
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from .adapter import adapter_for
from .errors import VTPruneError
from .trace import Trace

if TYPE_CHECKING:
    from .method import Method

_ACTIVE: ContextVar[tuple["Session", ...]] = ContextVar("vtprune_active_sessions", default=())
_OPEN: "weakref.WeakKeyDictionary[Any, Session]" = weakref.WeakKeyDictionary()  # model -> its open session
_OPEN_LOCK = threading.Lock()  # two threads entering sessions on one model at once: exactly one wins


class Session:
    """Context manager returned by `method(model)`."""

    def __init__(self, method: "Method", model: Any) -> None:
        self.method = method
        self.model = model
        self.adapter = adapter_for(model)(model)
        self.adapter.check(method)
        self.adapter.active = self.active
        self.trace = Trace(method)
        self._token: Token | None = None

    def active(self) -> bool:
        """True in the context that entered this session (and in asyncio tasks it starts), while it is open."""
        return self in _ACTIVE.get()

    def __enter__(self) -> Trace:
        with _OPEN_LOCK:
            holder = _OPEN.get(self.model)
            if holder is not None:
                raise VTPruneError(
                    f"this {type(self.model).__name__} already has a vtprune session open ({holder.method!r}); close "
                    "it before opening another (one session per model; other threads meanwhile see the dense model)"
                )
            _OPEN[self.model] = self
        try:
            self.adapter.attach(self.method, self.trace)
        except BaseException:
            self.adapter.detach()
            with _OPEN_LOCK:
                del _OPEN[self.model]
            raise
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self.trace

    def __exit__(self, *exc: Any) -> bool:
        try:
            if self._token is not None:
                _ACTIVE.reset(self._token)
                self._token = None
        finally:
            try:
                self.adapter.detach()
            finally:
                with _OPEN_LOCK:
                    _OPEN.pop(self.model, None)
        return False
