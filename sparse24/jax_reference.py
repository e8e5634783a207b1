"""The N:M attention spec (DESIGN.md §2) in jax.numpy: ``backend="reference"`` of the JAX ops.

The JAX twin of :func:`sparse24.reference.unified_attention_chunked`, written for ``jax.jit``
with *dynamic* lengths: ``block_table``, ``cu_seqlens_q`` and ``seq_lens`` (and q and the
caches) may be traced arrays; only shapes and the keyword options are static, so a decode loop
whose lengths grow step by step traces once.

How it works (no Python loop over sequences, no data-dependent shape):

- every packed query token ``t`` finds its sequence ``b`` (``searchsorted`` on
  ``cu_seqlens_q``), its ``q_len``, ``kv_len`` and position ``p = kv_len - q_len + (t - cu[b])``;
  tokens at or beyond ``cu_seqlens_q[-1]`` get ``kv_len = 0`` (they see nothing: zeros);
- queries are processed ``query_chunk`` tokens at a time (``lax.map`` over padded chunks), keys
  ``chunk_size`` at a time (``lax.scan`` over the static bound ``max_blocks * block_size``),
  with an fp32 online softmax (running max, sum and accumulator, as in flash attention);
  a key chunk that no row of the query chunk can see is skipped (``lax.cond``), so the work
  follows the real lengths, not the static bound;
- each chunk's keys and values are gathered per token through the block table
  (``cache[block_table[b, j // block_size], j % block_size]``); ``chunk_size`` is a multiple
  of ``m`` so groups of ``m`` absolute key indices never straddle chunks.

Memory per step is ``O(query_chunk * chunk_size * H_kv * D)`` (the gathered keys and values)
plus ``O(query_chunk * chunk_size * H_q)`` scores. Everything is built from differentiable
primitives (``scan``, ``cond``, gathers): ``jax.grad`` works through it (the selection itself
is piecewise constant).

This module imports jax at the top; ``import sparse24`` never imports it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparse24.config import SparsityConfig
from sparse24.validation import resolve_config

__all__ = ["unified_attention_jax_reference"]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# validation (static always; values only when the metadata is concrete)


def _positive_int(name: str, value, multiple_of: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 \
            or value % multiple_of:
        what = f"a positive multiple of m = {multiple_of}" if multiple_of > 1 else "a positive int"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _check_options(head_dim, causal, softmax_scale, window, softcap):
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    if window is None:
        window = 0
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be None or an int >= 0 (0 = no window), got {window!r}")
    if softcap is None:
        softcap = 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
        raise TypeError(f"softcap must be a float >= 0 or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"softcap must be None or a finite float >= 0 (0 = none), got {softcap!r}")
    return bool(causal), scale, int(window), softcap


def _check_shapes(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                  cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.ndim != 4:
        raise ValueError(
            f"k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}"
        )
    if v_cache.ndim != 4 or tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(
            f"v_cache must be [num_blocks, block_size, num_kv_heads, head_dim_v] matching k_cache "
            f"{tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    if k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"head_dim of q ({q.shape[2]}) and k_cache ({k_cache.shape[3]}) differ")
    for name in ("q", "k_cache", "v_cache"):
        dtype = jnp.dtype(arrays[name].dtype)
        if dtype.name not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a float array (float32, bfloat16, float16), got {dtype}")
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for name in ("block_table", "cu_seqlens_q", "seq_lens"):
        if not jnp.issubdtype(arrays[name].dtype, jnp.integer):
            raise TypeError(f"{name} must be an integer array (int32), got {jnp.dtype(arrays[name].dtype)}")
    if block_table.ndim != 2 or cu_seqlens_q.ndim != 1 or seq_lens.ndim != 1:
        raise ValueError("block_table must be 2-D, cu_seqlens_q and seq_lens 1-D")
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1 or block_table.shape[0] != num_seqs:
        raise ValueError(
            f"batch sizes disagree: seq_lens has {num_seqs} entries, cu_seqlens_q "
            f"{cu_seqlens_q.shape[0]} (want B + 1), block_table {block_table.shape[0]} rows"
        )


def _concrete(x) -> Optional[np.ndarray]:
    """A host copy of ``x``, or None when ``x`` is traced (values unknown until run time)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_values(q, k_cache, block_table, cu_seqlens_q, seq_lens) -> None:
    """The torch reference's value checks, run only when the metadata is concrete."""
    cu, kv, bt = _concrete(cu_seqlens_q), _concrete(seq_lens), _concrete(block_table)
    if cu is not None:
        cu = cu.astype(np.int64)
        if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] > q.shape[0]:
            raise ValueError(
                f"cu_seqlens_q must start at 0, be non-decreasing and end <= num_tokens "
                f"({q.shape[0]}), got {cu.tolist()}"
            )
    if kv is None:
        return
    kv = kv.astype(np.int64)
    block_size = k_cache.shape[1]
    capacity = block_table.shape[1] * block_size
    for b, kv_len in enumerate(kv.tolist()):
        if not 0 <= kv_len <= capacity:
            raise ValueError(
                f"seq_lens[{b}] = {kv_len} must be in [0, max_blocks * block_size = {capacity}]"
            )
    if bt is None or not kv.size:
        return
    pages = -(-kv // block_size)
    used = np.arange(bt.shape[1])[None, :] < pages[:, None]
    bad = used & ((bt < 0) | (bt >= k_cache.shape[0]))
    if bad.any():
        b, col = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table[{b}, {col}] = {int(bt[b, col])} is not a page of the cache "
            f"(num_blocks = {k_cache.shape[0]})"
        )


# --------------------------------------------------------------------------------------------
# the computation


def _nm_select(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Spec step 3. ``scores [..., L]`` (``L % m == 0``, first column at an absolute key index
    that is a multiple of ``m``, invisible entries -inf) -> bool ``[..., L]``: key ``j`` is kept
    iff ``#{j' in group: s_j' > s_j or (s_j' == s_j and j' < j)} < n``."""
    groups = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    member = jnp.arange(m)
    rank = jnp.zeros(groups.shape, dtype=jnp.int32)
    for other in range(m):
        s_other = groups[..., other : other + 1]
        beats = (s_other > groups) | ((s_other == groups) & (member > other))
        rank = rank + beats.astype(jnp.int32)
    return (rank < n).reshape(scores.shape)


@functools.partial(
    jax.jit,
    static_argnames=("config", "causal", "scale", "window", "softcap", "chunk_size", "query_chunk"),
)
def _forward(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *,
             config, causal, scale, window, softcap, chunk_size, query_chunk):
    """Returns ``(out [T, H_q, D_v] in q.dtype, lse [T, H_q] float32)``."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.shape[3]
    num_seqs, max_blocks = block_table.shape
    group = num_q_heads // num_kv_heads
    f32 = jnp.float32

    capacity = max_blocks * block_size
    if num_tokens == 0 or num_seqs == 0 or capacity == 0 or num_blocks == 0:
        out = jnp.zeros((num_tokens, num_q_heads, head_dim_v), q.dtype)
        return out, jnp.full((num_tokens, num_q_heads), -jnp.inf, f32)

    m = config.m
    keys_per_chunk = min(chunk_size, -(-capacity // m) * m)  # still a multiple of m
    num_key_chunks = -(-capacity // keys_per_chunk)
    rows = min(query_chunk, num_tokens)
    num_query_chunks = -(-num_tokens // rows)

    block_table = block_table.astype(jnp.int32)
    cu = cu_seqlens_q.astype(jnp.int32)
    kv_lens = seq_lens.astype(jnp.int32)
    key_offsets = jnp.arange(keys_per_chunk, dtype=jnp.int32)

    def query_chunk_fn(t):  # t [rows] packed token indices (may run past num_tokens)
        b = jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1
        valid = (t < cu[num_seqs]) & (t < num_tokens) & (b >= 0)
        b = jnp.clip(b, 0, num_seqs - 1)
        start = cu[b]
        q_len = cu[b + 1] - start
        kv_len = jnp.where(valid, kv_lens[b], 0)
        pos = kv_len - q_len + (t - start)  # [rows]
        decode_row = q_len == 1
        q_rows = q[jnp.clip(t, 0, num_tokens - 1)].astype(f32)
        q_rows = q_rows.reshape(rows, num_kv_heads, group, head_dim)  # h = kv_head * group + g
        pages_of_rows = block_table[b]  # [rows, max_blocks]

        # keys [k_lo, k_hi) hold everything a row can see
        k_hi = jnp.minimum(kv_len, pos + 1) if causal else kv_len
        k_lo = jnp.maximum(0, pos - window + 1) if window > 0 else jnp.zeros_like(pos)
        sees = k_hi > k_lo

        def attend(carry, c0):
            row_max, total, acc = carry
            j = c0 + key_offsets  # [C] absolute key indices
            in_seq = j[None, :] < kv_len[:, None]  # [rows, C]
            page = jnp.take(pages_of_rows, jnp.minimum(j // block_size, max_blocks - 1), axis=1)
            page = jnp.clip(page, 0, num_blocks - 1)  # unused entries may hold anything
            slot = (j % block_size)[None, :]
            keys = k_cache[page, slot].astype(f32)  # [rows, C, H_kv, D]
            s = jnp.einsum("rkgd,rckd->rkgc", q_rows, keys, precision=_HIGHEST) * scale
            if softcap > 0.0:
                s = softcap * jnp.tanh(s / softcap)
            dist = pos[:, None] - j[None, :]  # p - j
            visible = in_seq
            if causal:
                visible = visible & (dist >= 0)
            if window > 0:
                visible = visible & (dist < window)
            visible = visible[:, None, None, :]
            s = jnp.where(visible, s, -jnp.inf)
            if config.is_dense:
                kept = visible
            else:
                dense = (j[None, :] < config.dense_sink_tokens) | (
                    (dist >= 0) & (dist < config.dense_recent_tokens))
                if not config.sparse_decode:
                    dense = dense | decode_row[:, None]
                kept = visible & (dense[:, None, None, :] | _nm_select(s, config.n, m))
            s = jnp.where(kept, s, -jnp.inf)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            alpha = jnp.exp(row_max - safe_max)
            p = jnp.exp(s - safe_max[..., None])
            values = v_cache[page, slot].astype(f32)  # [rows, C, H_kv, Dv]
            values = jnp.where(in_seq[:, :, None, None], values, 0.0)  # never read past kv_len
            total = total * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum(
                "rkgc,rckd->rkgd", p, values, precision=_HIGHEST)
            return new_max, total, acc

        def step(carry, chunk):
            c0 = chunk * keys_per_chunk
            needed = jnp.any(sees & (k_lo < c0 + keys_per_chunk) & (c0 < k_hi))
            carry = jax.lax.cond(needed, attend, lambda cr, _: cr, carry, c0)
            return carry, None

        # The carry starts from q (zeros of its shape), not from constants: under shard_map
        # q is device-varying and the skip branch of lax.cond must match attend's types.
        zeros = jnp.zeros_like(q_rows[..., 0])  # [rows, H_kv, group]
        init = (
            zeros - jnp.inf,
            zeros,
            zeros[..., None] + jnp.zeros((head_dim_v,), f32),
        )
        (row_max, total, acc), _ = jax.lax.scan(
            step, init, jnp.arange(num_key_chunks, dtype=jnp.int32))
        has = total > 0
        o = acc / jnp.where(has, total, 1.0)[..., None]
        o = jnp.where(has[..., None], o, 0.0)
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        lse = jnp.where(has, safe_max + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
        return (o.reshape(rows, num_q_heads, head_dim_v).astype(q.dtype),
                lse.reshape(rows, num_q_heads))

    tokens = jnp.arange(num_query_chunks * rows, dtype=jnp.int32).reshape(num_query_chunks, rows)
    out, lse = jax.lax.map(query_chunk_fn, tokens)
    out = out.reshape(num_query_chunks * rows, num_q_heads, head_dim_v)[:num_tokens]
    lse = lse.reshape(num_query_chunks * rows, num_q_heads)[:num_tokens]
    return out, lse


def unified_attention_jax_reference(
    q,
    k_cache,
    v_cache,
    block_table,
    cu_seqlens_q,
    seq_lens,
    *,
    config: Optional[SparsityConfig] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    chunk_size: int = 256,
    query_chunk: int = 128,
):
    """N:M sparse unified attention in jax.numpy (DESIGN.md §2), jit-able with dynamic lengths.

    Same semantics and layout as :func:`sparse24.reference.unified_attention_reference` (the
    float64 torch oracle) and :func:`sparse24.reference.unified_attention_chunked`; scores,
    softmax and accumulation in float32.

    Args:
        q: ``[T, H_q, D]`` float32, bfloat16 or float16; sequence ``b`` owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]`` (``D_v`` for ``v_cache``),
            float; ``H_q % H_kv == 0``; query head ``h`` reads kv head ``h // (H_q // H_kv)``.
        block_table: ``[B, max_blocks]`` integer (int32): page of key ``j`` of sequence ``b``
            is ``block_table[b, j // block_size]``. Entries past a sequence's pages are unread.
        cu_seqlens_q: ``[B + 1]`` integer, starts at 0, non-decreasing, ends ``<= T``; rows
            from ``cu_seqlens_q[-1]`` on belong to no sequence and come out as zeros.
        seq_lens: ``[B]`` integer, ``kv_len`` of each sequence (new tokens included),
            ``<= max_blocks * block_size``.
        config: a :class:`SparsityConfig`; None = ``SparsityConfig()`` (2:4, recent 64);
            ``SparsityConfig.dense()`` (or ``n == m``) = plain attention. Anything else
            (a string too) is a TypeError.
        causal: mask keys after the query's position ``p = kv_len - q_len + i``.
        softmax_scale: None = ``1 / sqrt(D)``.
        window: sliding window ``w`` (visible iff ``p - j < w``); None or 0 = none.
        softcap: ``c`` in ``s = c * tanh(s / c)``; None or 0 = none.
        return_lse: also return the log-sum-exp.
        chunk_size: keys per step, a positive multiple of ``config.m`` (the result does not
            depend on it beyond float32 rounding of the online softmax).
        query_chunk: query tokens per step (bounds memory together with ``chunk_size``).

    The arrays may be traced (``jax.jit``): only their shapes and the keyword options are
    static. The metadata's values are checked (as the torch reference does) only when they
    are concrete; under ``jit`` out-of-range metadata is not detected (pages are clamped).

    Returns:
        ``out`` ``[T, H_q, D_v]`` in ``q.dtype`` (rows with nothing kept and rows outside every
        sequence are zeros, never NaN), and with ``return_lse`` also ``lse`` ``[T, H_q]``
        float32 (natural log, -inf where nothing is kept).
    """
    config = resolve_config(config)
    chunk_size = _positive_int("chunk_size", chunk_size, config.m)
    query_chunk = _positive_int("query_chunk", query_chunk)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x)
              for x in (q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)]
    _check_shapes(*arrays)
    q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens = arrays
    causal, scale, window, softcap = _check_options(q.shape[2], causal, softmax_scale, window, softcap)
    _check_values(q, k_cache, block_table, cu_seqlens_q, seq_lens)
    out, lse = _forward(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        scale=scale, window=window, softcap=softcap, chunk_size=chunk_size,
        query_chunk=query_chunk,
    )
    return (out, lse) if return_lse else out
