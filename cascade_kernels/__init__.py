"""cascade_kernels: exact cascade attention over paged KV caches, in Triton.

Attention over a request's chunked, paged KV equals attention over its whole sequence at once:
positions are global, partial states merge exactly, and a chunk shared by many requests is read once.
"""

from ._triton import interpreter_problem, interpreting

if interpreting() and interpreter_problem():
    raise ImportError(f"cascade_kernels: {interpreter_problem()}")

from ._validation import set_validation, validation_enabled
from .attention import paged_decode, paged_prefill
from .cascade import CascadePlan, cascade_attention, plan_cascade
from .configs import set_tuned_configs, tuned_configs_enabled, use_tuned_configs
from .merge import merge_state, merge_states
from .rope import append_kv, apply_rope, paged_slots, rotate_keys
from .types import CascadeLevel, PagedKV

__all__ = [
    "append_kv",
    "apply_rope",
    "cascade_attention",
    "CascadeLevel",
    "CascadePlan",
    "merge_state",
    "merge_states",
    "paged_decode",
    "paged_prefill",
    "paged_slots",
    "PagedKV",
    "plan_cascade",
    "rotate_keys",
    "set_tuned_configs",
    "set_validation",
    "tuned_configs_enabled",
    "use_tuned_configs",
    "validation_enabled",
]
