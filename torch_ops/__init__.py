"""sparse24.torch_ops: PyTorch ops over the Triton kernels in ``sparse24.kernels``.

Inference only. Registered with ``torch.library`` as ``torch.ops.sparse24.unified_attention``
and ``torch.ops.sparse24.write_kv_cache`` (so ``torch.compile`` can trace them).
"""

from .api import (
    UnifiedAttentionPlan,
    attention,
    decode_mask_layout,
    plan_unified_attention,
    unified_attention,
    write_kv_cache,
)

__all__ = ["UnifiedAttentionPlan", "attention", "decode_mask_layout", "plan_unified_attention", "unified_attention",
           "write_kv_cache"]
