"""The core: layout, budgets, keep plans, signals, sessions. It knows no model family and no method by name."""

from .adapter import Adapter, adapter_for, register_adapter
from .attention import attention_rows, received_attention
from .budget import check_keep, keep_count
from .errors import UnsupportedModelError, UnsupportedSignalError, VTPruneError
from .layout import VisualLayout, VisualSpan
from .method import Method, SiteContext, available, load_preset, make, method_class, register
from .plan import KeepPlan, Merge, keep_all, keep_heads, per_image, top_k
from .scope import SCOPES, budget_groups, check_scope, keep_top
from .session import ForwardRecord, Session, SiteRecord, Trace
from .search import Choice, IntRange, Param, Uniform
from .signals import (
    ClsAttention,
    LayerKV,
    ModelInfo,
    PixelValues,
    PrefillKV,
    ProjectorInput,
    QueryAttention,
    ReceivedAttention,
    Transitions,
    TransitionStats,
    VisionAttention,
    VisionKeys,
)

__all__ = [
    "Adapter", "Choice", "ClsAttention", "ForwardRecord", "IntRange", "KeepPlan", "LayerKV", "Merge", "Method",
    "ModelInfo", "Param", "PixelValues", "PrefillKV", "ProjectorInput", "QueryAttention", "ReceivedAttention",
    "SCOPES", "Session", "SiteContext", "SiteRecord", "Trace", "TransitionStats", "Transitions", "Uniform",
    "UnsupportedModelError", "UnsupportedSignalError", "VTPruneError", "VisionAttention", "VisionKeys",
    "VisualLayout", "VisualSpan", "adapter_for", "attention_rows", "available", "budget_groups", "check_keep",
    "check_scope", "keep_all", "keep_count", "keep_heads", "keep_top", "load_preset", "make", "method_class",
    "per_image", "received_attention", "register", "register_adapter", "top_k",
]
