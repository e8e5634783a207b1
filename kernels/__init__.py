"""sparse24.kernels: the Triton sources (imports triton only, never torch or jax).

- ``unified_attention_kernel`` / ``reduce_segments_kernel``: N:M-sparse paged attention
  (prefill, decode and mixed batches; split-KV).
- ``write_kv_cache_kernel``: scatter new keys/values into the paged cache.
- ``decode_mask_layout_kernel``: a decode step's paged metadata from a transformers slot mask.
- ``planner``: the pure-Python launch planner both launchers use.
"""

from .kv_cache import write_kv_cache_kernel
from .mask_layout import decode_mask_layout_kernel
from .planner import (
    AttentionPlan,
    KVWritePlan,
    MaskLayoutPlan,
    plan_decode_mask_layout,
    plan_unified_attention,
    plan_write_kv_cache,
)
from .unified_attention import reduce_segments_kernel, unified_attention_kernel

__all__ = [
    "AttentionPlan",
    "KVWritePlan",
    "MaskLayoutPlan",
    "decode_mask_layout_kernel",
    "plan_decode_mask_layout",
    "plan_unified_attention",
    "plan_write_kv_cache",
    "reduce_segments_kernel",
    "unified_attention_kernel",
    "write_kv_cache_kernel",
]
