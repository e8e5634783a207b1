"""sparse24: N:M (2:4) structured-sparse attention for LLM inference.

For every query and every group of M consecutive keys, only the N largest scores
survive (docs/SPEC.md §2). One Triton kernel source (``sparse24.kernels``) serves the
PyTorch ops (``sparse24.torch_ops``) and the JAX ops (``sparse24.jax_ops``, through
jax-triton); ``sparse24.reference`` (torch) and ``sparse24.jax_reference`` (jax.numpy) are
the spec in array code. ``sparse24.validation`` is the one input contract of all of them,
``sparse24.backends`` the one backend resolver.
Framework modules are imported lazily: ``import sparse24`` needs neither torch nor jax.
"""

from sparse24.config import SparsityConfig

__version__ = "0.1.0"
__all__ = ["SparsityConfig", "__version__"]
