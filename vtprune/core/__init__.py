"""The core: layout, budgets, keep plans and cuts, signals, sessions and traces. It knows no model family and no method
by name, and imports nothing else of vtprune."""

from .adapter import Adapter, adapter_for, register_adapter
from .attention import attention_rows
from .budget import (
    ATTENTION_MASS,
    BUDGET_KINDS,
    CACHE_ENTRIES,
    VISUAL_TOKENS,
    BudgetKind,
    budget_argument,
    check_keep,
    keep_count,
    parse_budget,
    scaled_schedule,
)
from .cut import Cut, compile_cut
from .errors import UnsupportedModelError, UnsupportedSignalError, VTPruneError
from .layout import VisualLayout, VisualSpan
from .method import Method, SiteContext, available, load_preset, make, make_at, method_class, register
from .options import check_options, parse_method_spec, parse_options, parse_pairs
from .plan import KeepPlan, Merge, keep_all, keep_heads, top_k
from .scope import SCOPES, budget_groups, check_scope, keep_top
from .search import Choice, IntRange, Param, Uniform
from .session import Session
from .signals import (
    ClsAttention,
    LayerKV,
    ModelInfo,
    PixelValues,
    PrefillKV,
    ProjectorInput,
    QueryAttention,
    Transitions,
    TransitionStats,
    VisionAttention,
    VisionKeys,
)
from .trace import ForwardRecord, SiteRecord, Trace

__all__ = [
    "ATTENTION_MASS", "Adapter", "BUDGET_KINDS", "BudgetKind", "CACHE_ENTRIES", "Choice", "ClsAttention", "Cut",
    "ForwardRecord", "IntRange", "KeepPlan", "LayerKV", "Merge", "Method", "ModelInfo", "Param", "PixelValues",
    "PrefillKV", "ProjectorInput", "QueryAttention", "SCOPES", "Session", "SiteContext", "SiteRecord", "Trace",
    "TransitionStats", "Transitions", "Uniform", "UnsupportedModelError", "UnsupportedSignalError", "VISUAL_TOKENS",
    "VTPruneError", "VisionAttention", "VisionKeys", "VisualLayout", "VisualSpan", "adapter_for", "attention_rows",
    "available", "budget_argument", "budget_groups", "check_keep", "check_options", "check_scope", "compile_cut", "keep_all",
    "keep_count", "keep_heads", "keep_top", "load_preset", "make", "make_at", "method_class", "parse_budget", "parse_method_spec",
    "parse_options", "parse_pairs", "register", "register_adapter", "scaled_schedule", "top_k",
]
