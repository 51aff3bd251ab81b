"""The core: layout, budgets, keep plans, signals, sessions. It knows no model family and no method by name."""

from .adapter import Adapter, adapter_for, register_adapter
from .attention import attention_rows
from .budget import check_keep, keep_count
from .errors import UnsupportedModelError, UnsupportedSignalError, VTPruneError
from .layout import VisualLayout, VisualSpan
from .method import Method, SiteContext, available, make, method_class, register
from .plan import KeepPlan, Merge, keep_all, keep_heads, per_image, top_k
from .session import ForwardRecord, Session, SiteRecord, Trace
from .signals import ClsAttention, LayerKV, ModelInfo, PixelValues, PrefillKV, QueryAttention

__all__ = [
    "Adapter", "ClsAttention", "ForwardRecord", "KeepPlan", "LayerKV", "Merge", "Method", "ModelInfo", "PixelValues",
    "PrefillKV", "QueryAttention", "Session", "SiteContext", "SiteRecord", "Trace", "UnsupportedModelError",
    "UnsupportedSignalError", "VTPruneError", "VisualLayout", "VisualSpan", "adapter_for", "attention_rows",
    "available", "check_keep", "keep_all", "keep_count", "keep_heads", "make", "method_class", "per_image", "register",
    "register_adapter", "top_k",
]
