"""sparse24.jax_ops: the same Triton kernels as JAX primitives (jax-triton).

Not built yet: see the JAX issue. Importing this package works on any install.
"""

__all__: list[str] = []
