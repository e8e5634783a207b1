"""sparse24.jax_ops: the Triton kernels of ``sparse24.kernels`` as JAX ops (jax-triton).

Mirrors ``sparse24.torch_ops`` name for name and argument for argument. Inference only.
Importing works on a CPU-only install: jax-triton is imported on first GPU use.
"""

from .api import attention, unified_attention, write_kv_cache

__all__ = ["attention", "unified_attention", "write_kv_cache"]
