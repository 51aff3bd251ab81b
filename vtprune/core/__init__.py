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
    FinalNormHidden,
    KeyStates,
    LayerKeys,
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
from .trace import ForwardRecord, SiteRecord, Trace

__all__ = [
    "Adapter", "adapter_for", "ATTENTION_MASS", "attention_rows", "available", "budget_argument", "budget_groups",
    "BUDGET_KINDS", "BudgetKind", "CACHE_ENTRIES", "check_keep", "check_options", "check_scope", "Choice",
    "ClsAttention", "compile_cut", "Cut", "FinalNormHidden", "ForwardRecord", "IntRange", "keep_all", "keep_count",
    "keep_heads", "keep_top", "KeepPlan", "KeyStates", "LayerKeys", "LayerKV", "load_preset", "make", "make_at",
    "Merge", "Method", "method_class", "ModelInfo", "Param", "parse_budget", "parse_method_spec", "parse_options",
    "parse_pairs", "PixelValues", "PrefillKV", "ProjectorInput", "QueryAttention", "ReceivedAttention", "register",
    "register_adapter", "scaled_schedule", "SCOPES", "Session", "SiteContext", "SiteRecord", "top_k", "Trace",
    "Transitions", "TransitionStats", "Uniform", "UnsupportedModelError", "UnsupportedSignalError", "VisionAttention",
    "VisionKeys", "VISUAL_TOKENS", "VisualLayout", "VisualSpan", "VTPruneError",
]
