"""The N:M attention spec (docs/SPEC.md §2) in jax.numpy: ``backend="reference"`` of the JAX ops.

The JAX twin of :func:`sparse24.reference.unified_attention_chunked`, written for ``jax.jit``
with *dynamic* lengths: ``block_table``, ``cu_seqlens_q`` and ``seq_lens`` (and q and the
caches) may be traced arrays; only shapes and the keyword options are static, so a decode loop
whose lengths grow step by step traces once.

How it works (no Python loop over sequences, no data-dependent shape):

- every packed query token ``t`` finds its sequence ``b`` (``searchsorted`` on
  ``cu_seqlens_q``), its ``q_len``, ``kv_len`` and position ``p = kv_len - q_len + (t - cu[b])``;
  tokens at or beyond ``cu_seqlens_q[-1]`` get ``kv_len = 0`` (they see nothing: zeros; the
  contract has ``cu_seqlens_q[-1] == T``, but the padded ``jax_ops.attention`` packs its
  batch into ``B * S_q`` rows and calls :func:`_forward` with fewer real ones);
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
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from sparse24.config import SparsityConfig
from sparse24.validation import prepare_unified_attention

__all__ = ["unified_attention_jax_reference"]

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# the contract (sparse24.validation): shapes and options always, values when concrete


def _positive_int(name: str, value, multiple_of: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 \
            or value % multiple_of:
        what = f"a positive multiple of m = {multiple_of}" if multiple_of > 1 else "a positive int"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def _concrete(x) -> Optional[np.ndarray]:
    """A host copy of ``x``, or None when ``x`` is traced (values unknown until run time)."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _read_metadata(cu_seqlens_q, seq_lens, block_table):
    """``read_metadata`` for :func:`sparse24.validation.prepare_unified_attention`: host copies
    of the three, or None when any of them is traced."""
    host = tuple(_concrete(x) for x in (cu_seqlens_q, seq_lens, block_table))
    return None if any(h is None for h in host) else host


# --------------------------------------------------------------------------------------------
# the computation


def _nm_select(scores: jax.Array, n: int, m: int) -> jax.Array:
    """Spec step 3. ``scores [..., L]`` (``L % m == 0``, first column at an absolute key index
    that is a multiple of ``m``, invisible entries -inf) -> bool ``[..., L]``: key ``j`` is kept
    iff ``#{j' in group: s_j' > s_j or (s_j' == s_j and j' < j)} < n``. A NaN ranks as +inf
    (the NaN rule: a visible NaN score is kept, so its row comes out NaN)."""
    scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
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
    static_argnames=("config", "causal", "scale", "window", "softcap", "chunk_size", "query_chunk", "stats"),
)
def _forward(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *,
             config, causal, scale, window, softcap, chunk_size, query_chunk, stats: bool = False):
    """Returns ``(out [T, H_q, D_v] in q.dtype, lse [T, H_q] float32)``; with ``stats`` also
    ``kept_mass`` and ``kept_keys`` (float32 [T, H_q]; see ``sparse24.reference.KeptStats``)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    head_dim_v = v_cache.shape[3]
    num_seqs, max_blocks = block_table.shape
    group = num_q_heads // num_kv_heads
    f32 = jnp.float32

    capacity = max_blocks * block_size
    if num_tokens == 0 or num_seqs == 0 or capacity == 0 or num_blocks == 0:
        out = jnp.zeros((num_tokens, num_q_heads, head_dim_v), q.dtype)
        lse = jnp.full((num_tokens, num_q_heads), -jnp.inf, f32)
        if stats:
            return out, lse, jnp.full_like(lse, jnp.nan), jnp.zeros_like(lse)
        return out, lse

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
            row_max, total, acc, poisoned, vis_max, vis_total, kept_keys = carry
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
            poisoned = poisoned | jnp.isnan(s).any(axis=-1)  # the NaN rule: a visible NaN score
            if stats:  # the dense softmax over every visible key (kept mass = its kept share)
                new_vis = jnp.maximum(vis_max, s.max(axis=-1))
                safe_vis = jnp.where(jnp.isfinite(new_vis), new_vis, 0.0)
                vis_total = vis_total * jnp.exp(vis_max - safe_vis) + jnp.exp(s - safe_vis[..., None]).sum(axis=-1)
                vis_max = new_vis
            if config.is_dense:
                kept = visible
            else:
                dense = (j[None, :] < config.dense_sink_tokens) | (
                    (dist >= 0) & (dist < config.dense_recent_tokens))
                if not config.sparse_decode:
                    dense = dense | decode_row[:, None]
                kept = visible & (dense[:, None, None, :] | _nm_select(s, config.n, m))
            s = jnp.where(kept, s, -jnp.inf)
            if stats:
                kept_keys = kept_keys + (s > -jnp.inf).sum(axis=-1).astype(f32)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
            alpha = jnp.exp(row_max - safe_max)
            p = jnp.exp(s - safe_max[..., None])
            values = v_cache[page, slot].astype(f32)  # [rows, C, H_kv, Dv]
            values = jnp.where(in_seq[:, :, None, None], values, 0.0)  # never read past kv_len
            total = total * alpha + p.sum(axis=-1)
            acc = acc * alpha[..., None] + jnp.einsum(
                "rkgc,rckd->rkgd", p, values, precision=_HIGHEST)
            return new_max, total, acc, poisoned, vis_max, vis_total, kept_keys

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
            zeros != zeros,  # no NaN seen yet (bool, derived from q for shard_map)
            zeros - jnp.inf,
            zeros,
            zeros,
        )
        (row_max, total, acc, poisoned, vis_max, vis_total, kept_keys), _ = jax.lax.scan(
            step, init, jnp.arange(num_key_chunks, dtype=jnp.int32))
        has = total > 0
        o = acc / jnp.where(has, total, 1.0)[..., None]
        o = jnp.where(has[..., None], o, 0.0)
        safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
        lse = jnp.where(has, safe_max + jnp.log(jnp.where(has, total, 1.0)), -jnp.inf)
        o = jnp.where(poisoned[..., None], jnp.nan, o)
        lse = jnp.where(poisoned, jnp.nan, lse)
        results = (o.reshape(rows, num_q_heads, head_dim_v).astype(q.dtype), lse.reshape(rows, num_q_heads))
        if stats:
            seen = vis_total > 0
            safe_vis = jnp.where(seen, vis_max, 0.0)
            mass = jnp.where(has, total / jnp.where(seen, vis_total, 1.0) * jnp.exp(safe_max - safe_vis), 0.0)
            mass = jnp.where(seen, mass, jnp.nan)
            results += (mass.reshape(rows, num_q_heads), kept_keys.reshape(rows, num_q_heads))
        return results

    tokens = jnp.arange(num_query_chunks * rows, dtype=jnp.int32).reshape(num_query_chunks, rows)
    results = jax.lax.map(query_chunk_fn, tokens)
    out = results[0].reshape(num_query_chunks * rows, num_q_heads, head_dim_v)[:num_tokens]
    rest = tuple(r.reshape(num_query_chunks * rows, num_q_heads)[:num_tokens] for r in results[1:])
    return (out, *rest)


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
    """N:M sparse unified attention in jax.numpy (docs/SPEC.md §2), jit-able with dynamic lengths.

    Same semantics, layout and input contract as :func:`sparse24.reference.unified_attention_reference`
    (the float64 torch oracle) and the ops (:func:`sparse24.validation.prepare_unified_attention`,
    float64 accepted); scores, softmax and accumulation in float32.

    Args:
        q: ``[T, H_q, D]`` float32, bfloat16, float16 (or float64 with ``jax_enable_x64``), a
            ``jax.Array`` or a ``numpy.ndarray``; sequence ``b`` owns rows
            ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]``, q's dtype;
            ``H_q % H_kv == 0``; query head ``h`` reads kv head ``h // (H_q // H_kv)``.
        block_table: ``[B, max_blocks]`` int32: page of key ``j`` of sequence ``b`` is
            ``block_table[b, j // block_size]``. Entries past a sequence's pages are unread.
        cu_seqlens_q: ``[B + 1]`` int32, starts at 0, non-decreasing, ends at ``T``.
        seq_lens: ``[B]`` int32, ``kv_len`` of each sequence (new tokens included, so
            ``>= q_len``), ``<= max_blocks * block_size``.
        config: a :class:`SparsityConfig`; None = ``SparsityConfig()`` (2:4, recent 64);
            ``SparsityConfig.dense()`` (or ``n == m``) = plain attention. Anything else
            (a string too) is a TypeError.
        causal: mask keys after the query's position ``p = kv_len - q_len + i``.
        softmax_scale: None = ``1 / sqrt(D)``; else a finite float > 0.
        window: sliding window ``w >= 1`` (visible iff ``p - j < w``); None = none.
        softcap: ``c`` in ``s = c * tanh(s / c)``; None or 0 = none.
        return_lse: also return the log-sum-exp.
        chunk_size: keys per step, a positive multiple of ``config.m`` (the result does not
            depend on it beyond float32 rounding of the online softmax).
        query_chunk: query tokens per step (bounds memory together with ``chunk_size``).

    The arrays may be traced (``jax.jit``): only their shapes and the keyword options are
    static. The metadata's values are checked (as the ops and the torch reference do) only
    when all three are concrete; under ``jit`` invalid metadata is not detected (pages are
    clamped, tokens past ``cu_seqlens_q[-1]`` come out as zeros).

    NaN (docs/SPEC.md §2, "NaN"): a NaN score of a visible key (a NaN in the query row, or in
    a visible key's ``k``) makes that row's whole output and its LSE NaN, whatever the N:M
    selection (a NaN ranks as +inf there); invisible keys (past ``kv_len``, causally masked,
    outside the window) never poison a row. A NaN in ``v`` reaches the output through the
    softmax weights (a kept key's NaN ``v`` makes the features it feeds NaN).

    Returns:
        ``out`` ``[T, H_q, D]`` in ``q.dtype`` (rows with nothing kept are zeros, never NaN;
        rows with a visible NaN score are NaN), and with ``return_lse`` also ``lse``
        ``[T, H_q]`` float32 (natural log, -inf where nothing is kept, NaN where the row is).
    """
    prepared = prepare_unified_attention(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, framework="jax", config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse, allow_float64=True,
        read_metadata=lambda: _read_metadata(cu_seqlens_q, seq_lens, block_table),
    )
    config, opts = prepared.config, prepared.options
    chunk_size = _positive_int("chunk_size", chunk_size, config.m)
    query_chunk = _positive_int("query_chunk", query_chunk)
    q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens = (
        jnp.asarray(x) for x in (q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens))
    out, lse = _forward(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=opts.causal,
        scale=opts.softmax_scale, window=opts.window, softcap=opts.softcap, chunk_size=chunk_size,
        query_chunk=query_chunk,
    )
    return (out, lse) if prepared.return_lse else out
