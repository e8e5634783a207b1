"""Layouts: turning what frameworks hand us into the unified kernel's packed, paged form.

Foundation floor (imported by the ops; imports neither the ops nor the integrations).
torch and jax.numpy twins sit side by side. Nothing here reads a device tensor on the host.
"""

from __future__ import annotations

# ---------------------------------------------------------------- padded [B, S, H, D] <-> packed [T, H, D]
# (section owned by the padded-attention work: torch_ops.attention / jax_ops.attention)


# ---------------------------------------------------------------- padding masks / HF caches -> paged metadata
# (section owned by the HF / Flax work)
