"""sparse24.flax: N:M-sparse attention for Flax models.

* ``attention_fn(config)`` -- a drop-in ``attention_fn`` for ``flax.nnx.MultiHeadAttention``
  and ``flax.linen.MultiHeadDotProductAttention``: swap a model's attention for 2:4
  without rewriting it::

      attn = nnx.MultiHeadAttention(num_heads=8, in_features=512, decode=False, rngs=rngs,
                                    attention_fn=sparse24.flax.attention_fn(SparsityConfig()))

  Causal masks (``nnx.make_causal_mask``), padding masks (``nnx.make_attention_mask``), their
  combination, and NNX decode-mode masks over the whole cache are read as per-row lengths
  and a causal flag. A mask that is none of these cannot be expressed: eagerly it raises;
  under ``jax.jit`` (where the mask's values are unknown) the output is NaN so it cannot
  pass unnoticed. Under jit the kernel runs once: with ``is_causal=True`` causally; without
  it ``lax.switch`` picks on the device the reading every row's mask is (causal or plain),
  and only a batch mixing causal and plain rows runs both (the kernel's causal flag is one
  per launch).
* ``PagedAttention`` -- an ``nnx.Module`` holding a paged KV cache, running prefill,
  decode and mixed batches through ``sparse24.jax_ops.unified_attention``; with
  ``PageAllocator``, a small host-side page manager.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse24 import layouts as _layouts
from sparse24.config import SparsityConfig
from sparse24.jax_ops import attention as _padded_attention
from sparse24.jax_ops import unified_attention, write_kv_cache
from sparse24.validation import resolve_config

__all__ = ["attention_fn", "PagedAttention", "PageAllocator"]


def _check_extra_keywords(kwargs: dict) -> None:
    """Keywords newer Flax versions pass beyond the named ones: accepted when they are None
    (the feature is off); ``input_positions`` (the positions a RoPE-applying attention_fn,
    e.g. ``nnx.dot_product_attention_with_rope``, rotates query/key by) and anything else
    with a value raise, since dropping them would silently change the result."""
    if kwargs.get("input_positions") is not None:
        raise ValueError(
            "sparse24 attention_fn applies no rotary embedding: input_positions must be None (got an array of shape "
            f"{list(jnp.shape(kwargs['input_positions']))}); rotate query/key before attention instead"
        )
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k != "input_positions")
    if unknown:
        raise TypeError(
            f"sparse24 attention_fn got unexpected keyword arguments {unknown} (only None is accepted for them)"
        )


def attention_fn(config: SparsityConfig | None = None, *, backend: str = "auto"):
    """A ``flax.nnx.dot_product_attention``-compatible function running N:M-sparse attention.

    Args:
      config: the sparsity (None = ``SparsityConfig()``, 2:4 with 64 dense recent keys).
      backend: as in ``sparse24.jax_ops`` ("auto": the Triton kernel on a GPU, else the
        jax.numpy reference).

    The returned function takes query/key/value ``[batch..., length, heads, head_dim]`` and
    the keywords nnx/linen pass (``bias``, ``mask``, ``broadcast_dropout``,
    ``dropout_rng``, ``dropout_rate``, ``deterministic``, ``dtype``, ``precision``,
    ``module``, ``promote_dtype``, ``is_causal``), as named parameters so Linen's
    signature filtering passes the mask, and ``**kwargs`` for keywords newer Flax passes:
    those must be None (``input_positions``, for an attention_fn that applies RoPE, raises a
    ValueError when given: this one applies no rotary embedding; any other keyword with a
    value is a TypeError). Inference only: dropout in training mode, a bias, or weight
    sowing (``module``) raise.

    ``mask``: None or boolean ``[batch..., 1 | heads, q_len, kv_len]`` (broadcastable over
    the batch dims); the output is ``[batch..., q_len, heads, head_dim]`` (``dtype`` if given).
    """
    cfg = resolve_config(config)

    def sparse24_attention(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout: bool = True,
        dropout_rng=None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype=None,
        precision=None,
        module=None,
        promote_dtype=None,
        is_causal: bool = False,
        **kwargs,
    ):
        _check_extra_keywords(kwargs)
        if bias is not None:
            raise ValueError("sparse24 attention_fn cannot add an attention bias (bias must be None)")
        if dropout_rate > 0.0 and not deterministic:
            raise ValueError("sparse24 attention_fn is inference-only: dropout_rate > 0 needs deterministic=True")
        if module is not None:
            raise ValueError("sparse24 attention_fn cannot sow attention weights (sow_weights / module must be unset)")
        if query.ndim < 3 or key.ndim != query.ndim or value.shape != key.shape:
            raise ValueError(
                "query/key/value must have shape [batch..., length, heads, head_dim] with key and value alike, got "
                f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
            )
        batch_dims = query.shape[:-3]
        q_len, kv_len = query.shape[-3], key.shape[-3]
        flat = int(np.prod(batch_dims)) if batch_dims else 1
        q = query.reshape((flat,) + query.shape[-3:])
        k = key.reshape((flat,) + key.shape[-3:])
        v = value.reshape((flat,) + value.shape[-3:])
        run = lambda causal, seq_lens: _padded_attention(  # noqa: E731
            q, k, v, causal=causal, config=cfg, seq_lens=seq_lens, backend=backend)
        if mask is None:
            out = run(bool(is_causal), None)
        else:
            mask = jnp.asarray(mask)
            if mask.ndim < 2 or mask.shape[-2:] != (q_len, kv_len):
                raise ValueError(
                    f"mask must have shape [batch..., 1 | heads, q_len, kv_len] ending with [{q_len}, {kv_len}], "
                    f"got {list(mask.shape)}"
                )
            if mask.ndim == 2:
                mask = mask[None]
            mask = jnp.broadcast_to(mask, batch_dims + mask.shape[-3:]).reshape((flat,) + mask.shape[-3:])
            seq_lens, ok_plain, ok_causal = _layouts.attention_mask_layout_jnp(mask, q_len, kv_len)
            traced = isinstance(mask, jax.core.Tracer)
            if is_causal or q_len == 1:  # one query row: the causal and plain readings coincide
                ok = ok_causal
                out = run(True, seq_lens)
            else:
                # Which reading the mask is, per row; the kernel's causal flag is per launch. All rows
                # causal (a causal mask passed without is_causal) or all plain: one launch; a batch
                # mixing both: both launches, each row keeps its own (a per-row causal flag would need
                # the kernel to take one per sequence).
                ok = ok_causal | ok_plain
                branches = (
                    lambda: run(True, seq_lens),
                    lambda: run(False, seq_lens),
                    lambda: jnp.where(ok_causal[:, None, None, None], run(True, seq_lens), run(False, seq_lens)),
                )
                reading = jnp.where(jnp.all(ok_causal), 0, jnp.where(jnp.all(ok_plain), 1, 2))
                if traced:  # values unknown under jit: lax.switch runs only the branch the mask picks
                    out = jax.lax.switch(reading, branches)
                else:
                    out = branches[int(reading)]()
            if not traced and not bool(jnp.all(ok)):
                raise ValueError(
                    "sparse24 attention_fn understands causal masks, padding masks (valid keys a prefix of each row) "
                    "and their combination; this mask is none of these and cannot be expressed"
                )
            out = jnp.where(ok[:, None, None, None], out, jnp.nan)  # under jit: never silently wrong
        out = out.reshape(query.shape[:-1] + (value.shape[-1],))
        return out.astype(dtype) if dtype is not None else out

    return sparse24_attention


class PageAllocator:
    """Host-side page manager for ``PagedAttention``: pages of ``block_size`` slots handed out
    per sequence; slots are ``page * block_size + offset``."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = int(block_size)
        self.free_pages = list(range(int(num_blocks)))[::-1]
        self.pages: dict = {}
        self.lengths: dict = {}

    def allocate(self, seq_id, num_tokens: int) -> list[int]:
        """Slots for the next ``num_tokens`` tokens of ``seq_id`` (pages taken as needed)."""
        pages = self.pages.setdefault(seq_id, [])
        length = self.lengths.get(seq_id, 0)
        slots = []
        for t in range(length, length + int(num_tokens)):
            if t // self.block_size >= len(pages):
                if not self.free_pages:
                    raise RuntimeError(f"PageAllocator: out of pages (num_blocks exhausted) for sequence {seq_id!r}")
                pages.append(self.free_pages.pop())
            slots.append(pages[t // self.block_size] * self.block_size + t % self.block_size)
        self.lengths[seq_id] = length + int(num_tokens)
        return slots

    def block_table(self, seq_ids, width: int | None = None) -> np.ndarray:
        """i32[len(seq_ids), width]: each sequence's pages, padded with 0."""
        width = width or max((len(self.pages.get(s, [])) for s in seq_ids), default=1) or 1
        table = np.zeros((len(seq_ids), width), np.int32)
        for row, s in enumerate(seq_ids):
            pages = self.pages.get(s, [])
            table[row, : len(pages)] = pages
        return table

    def free(self, seq_id) -> None:
        self.free_pages.extend(self.pages.pop(seq_id, []))
        self.lengths.pop(seq_id, None)


class PagedAttention(nnx.Module):
    """Attention over a paged KV cache held as module state (``nnx.Cache``).

    Each call writes the new tokens' keys/values into the cache (``write_kv_cache``) and runs
    ``unified_attention`` over it: prefill, decode and mixed batches in one launch, GQA.

    State: ``k_cache``, ``v_cache`` [num_blocks, block_size, num_kv_heads, head_dim].
    """

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype=jnp.float32, config: SparsityConfig | None = None, backend: str = "auto",
                 softmax_scale: float | None = None, window: int | None = None, softcap: float | None = None):
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.config = resolve_config(config)
        self.backend = backend
        self.softmax_scale, self.window, self.softcap = softmax_scale, window, softcap
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = nnx.Cache(jnp.zeros(shape, dtype))
        self.v_cache = nnx.Cache(jnp.zeros(shape, dtype))

    def __call__(self, q, k, v, *, slot_mapping, block_table, cu_seqlens_q, seq_lens,
                 max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
        """q [T, H_q, D], k/v [T, H_kv, D] (the new tokens), slot_mapping i32[T] (their cache slots),
        block_table i32[B, max_blocks], cu_seqlens_q i32[B+1], seq_lens i32[B] -> out [T, H_q, D]."""
        out, self.k_cache[...], self.v_cache[...] = self.apply(
            q, k, v, self.k_cache[...], self.v_cache[...], slot_mapping=slot_mapping, block_table=block_table,
            cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        return out

    def apply(self, q, k, v, k_cache, v_cache, *, slot_mapping, block_table, cu_seqlens_q, seq_lens,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None):
        """The call on explicit caches, without touching the module's state (for ``jax.shard_map``,
        where each device holds a slice of the heads): the arrays as in ``__call__``, k_cache /
        v_cache [num_blocks, block_size, H_kv, D] -> (out [T, H_q, D], k_cache, v_cache) with the
        new tokens written."""
        k_cache, v_cache = write_kv_cache(k, v, k_cache, v_cache, slot_mapping, backend=self.backend)
        out = unified_attention(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=self.config,
            softmax_scale=self.softmax_scale, window=self.window, softcap=self.softcap,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, backend=self.backend,
        )
        return out, k_cache, v_cache
