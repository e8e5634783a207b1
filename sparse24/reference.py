"""The N:M attention spec (docs/SPEC.md §2) in plain torch code.

For sequence ``b`` with ``q_len`` new queries and ``kv_len`` keys, query ``i`` sits at absolute
position ``p = kv_len - q_len + i``. Per query row and head:

1. score ``s_j = scale * <q, k_j>``; with a softcap ``c > 0``, ``s_j = c * tanh(s_j / c)``;
2. visible: ``j < kv_len``, causal ``j <= p``, window ``p - j < w``; invisible scores are -inf;
3. N:M: in each group ``[M*g, M*g + M)`` of absolute key indices keep the N largest scores
   (invisible ones take part as -inf; equal scores: the lower key index wins, so exactly N
   per group);
4. dense (never sparsified): ``j < dense_sink_tokens`` or ``0 <= p - j < dense_recent_tokens``;
   with ``sparse_decode=False`` every row of a ``q_len == 1`` sequence is dense;
5. kept = visible AND (dense OR selected); ``o = softmax(s[kept]) @ v[kept]``; a row with no
   kept key (or only -inf scores) gives zeros and LSE -inf;
6. GQA: query head ``h`` reads KV head ``h // (H_q // H_kv)``;
7. NaN (docs/SPEC.md §2, "NaN"): a NaN score of a *visible* key (a NaN in the query row, or in
   a visible key's ``k``) makes the row's whole output and its LSE NaN, whatever the N:M
   selection; in the selection a NaN ranks as +inf. Invisible keys (``j >= kv_len``, causal
   ``j > p``, outside the window) never poison a row. A NaN in ``v`` reaches the output
   through the softmax weights: a kept key's NaN ``v`` makes the output features it feeds NaN
   (a NaN ``v`` of a key the row does not keep may too: ``0 * NaN``; keys at or past
   ``kv_len`` are never read).

Three entry points share two helpers (:func:`_region_masks` for steps 2 and 4 and
:func:`_nm_select` for step 3):

- :func:`unified_attention_reference`: the float64 CPU oracle;
- :func:`keep_mask_reference`: the kept-key masks (step 5), to compare decisions exactly;
- :func:`unified_attention_chunked`: the same spec on the inputs' device, chunked over keys
  and queries with an online softmax (``backend="reference"``).

Inputs use the vLLM unified-attention layout: packed queries ``q [T, H_q, D]``, paged caches
``k_cache/v_cache [num_blocks, block_size, H_kv, D]`` (any strides), ``block_table
[B, max_blocks]`` (key ``j`` of sequence ``b`` is ``cache[block_table[b, j // block_size],
j % block_size]``), ``cu_seqlens_q [B + 1]`` and ``seq_lens [B]`` (= ``kv_len``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from sparse24.config import SparsityConfig
from sparse24.validation import AttentionOptions, prepare_unified_attention

__all__ = [
    "unified_attention_reference",
    "keep_mask_reference",
    "unified_attention_chunked",
]

# Upper bound on score elements (H_q * query rows * keys) held at once by the chunked path.
_CHUNK_SCORE_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------------------------
# the contract (sparse24.validation) and small helpers


def _prepare(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, config, causal, softmax_scale,
             window, softcap, return_lse=False, out=None):
    """The one input contract (:func:`sparse24.validation.prepare_unified_attention`, float64
    accepted), metadata read and checked on the host. Returns ``(prepared, cu, kv)`` with
    ``cu`` / ``kv`` the host lists of ``cu_seqlens_q`` [B + 1] and ``seq_lens`` [B]."""
    prepared = prepare_unified_attention(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, framework="torch", config=config,
        causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
        out=out, allow_float64=True,
        read_metadata=lambda: (cu_seqlens_q.cpu().numpy(), seq_lens.cpu().numpy(), block_table.cpu().numpy()),
    )
    cu_host, kv_host, _ = prepared.metadata
    return prepared, [int(x) for x in cu_host.tolist()], [int(x) for x in kv_host.tolist()]


def _gather(cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Keys ``start:end`` of one sequence from a paged cache: ``[end - start, H_kv, D]``."""
    j = torch.arange(start, end, device=cache.device)
    pages = block_row.to(device=cache.device, dtype=torch.long)[j // cache.shape[1]]
    return cache[pages, j % cache.shape[1]]


def _scores(q_rows: torch.Tensor, keys: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Step 1. ``q_rows [R, H_q, D]``, ``keys [L, H_kv, D]`` (same dtype) -> ``[H_q, R, L]``."""
    rows, num_q_heads, head_dim = q_rows.shape
    num_kv_heads = keys.shape[1]
    grouped = q_rows.reshape(rows, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    # head h = kv_head * group + g, so h // group = kv_head (GQA, step 7)
    s = torch.einsum("rkgd,lkd->kgrl", grouped, keys).reshape(num_q_heads, rows, keys.shape[0])
    s = s * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    return s


def _weighted_values(p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``p [H_q, R, L]`` (softmax weights), ``values [L, H_kv, Dv]`` -> ``[H_q, R, Dv]``."""
    num_q_heads, rows, length = p.shape
    num_kv_heads = values.shape[1]
    grouped = p.reshape(num_kv_heads, num_q_heads // num_kv_heads, rows, length)
    out = torch.einsum("kgrl,lkd->kgrd", grouped, values)
    return out.reshape(num_q_heads, rows, values.shape[2])


def _region_masks(q_pos, k_idx, kv_len, *, config, causal, window, decode_row):
    """Steps 2 and 4. ``q_pos [R]`` absolute query positions, ``k_idx [L]`` absolute key
    indices (int64, same device). Returns ``(visible, dense)``, bool ``[R, L]``.
    ``decode_row``: the rows belong to a ``q_len == 1`` sequence."""
    p = q_pos[:, None]
    j = k_idx[None, :]
    visible = j < kv_len
    if causal:
        visible = visible & (j <= p)
    if window > 0:
        visible = visible & (p - j < window)
    if decode_row and not config.sparse_decode:
        dense = torch.ones_like(visible)
    else:
        dense = (j < config.dense_sink_tokens) | ((p - j >= 0) & (p - j < config.dense_recent_tokens))
    return visible, dense


def _nm_select(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Step 3. ``scores [..., L]`` whose first column is an absolute key index that is a
    multiple of ``m``, invisible entries already -inf. Returns bool ``[..., L]``: the ``n``
    largest of each group of ``m`` (a group cut by ``L`` is padded with -inf).

    Key ``j`` is kept iff ``rank_j = #{j' in group: s_j' > s_j or (s_j' == s_j and j' < j)}
    < n``: larger score first, equal scores to the lower index, exactly ``n`` per group. A NaN
    ranks as +inf (step 7: a visible NaN score is kept, so its row comes out NaN).
    """
    length = scores.shape[-1]
    if n >= m:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    scores = torch.where(torch.isnan(scores), math.inf, scores)
    pad = -length % m
    if pad:
        scores = torch.nn.functional.pad(scores, (0, pad), value=-math.inf)
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    member = torch.arange(m, device=scores.device)
    rank = torch.zeros(groups.shape, dtype=torch.int8, device=scores.device)
    for other in range(m):
        s_other = groups[..., other : other + 1]
        rank += (s_other > groups) | ((s_other == groups) & (member > other))
    selected = (rank < n).reshape(*scores.shape[:-1], length + pad)
    return selected[..., :length]


def _kept(scores, q_pos, k_idx, kv_len, *, config, causal, window, decode_row):
    """Step 5 for one block of rows and keys (``k_idx[0] % m == 0``).
    ``scores [H_q, R, L]``. Returns ``(kept [H_q, R, L] bool, scores with invisible -inf)``."""
    visible, dense = _region_masks(
        q_pos, k_idx, kv_len, config=config, causal=causal, window=window, decode_row=decode_row
    )
    masked = scores.masked_fill(~visible, -math.inf)
    if config.is_dense or bool(dense.all()):
        kept = visible.expand_as(scores)
    else:
        kept = visible & (dense | _nm_select(masked, config.n, config.m))
    return kept, masked


# --------------------------------------------------------------------------------------------
# float64 oracle


def _reference_sequences(q, k_cache, block_table, cu, kv, *, config, causal, scale, window, softcap):
    """Yield ``(b, row_start, kept [H_q, q_len, kv_len], scores [H_q, q_len, kv_len])`` in
    float64 on the CPU for every sequence with ``q_len > 0``; invisible scores are -inf."""
    cpu64 = dict(device="cpu", dtype=torch.float64)
    for b in range(len(kv)):
        q_len, kv_len = cu[b + 1] - cu[b], kv[b]
        if q_len == 0:
            continue
        q_rows = q[cu[b] : cu[b + 1]].to(**cpu64)
        keys = _gather(k_cache, block_table[b], 0, kv_len).to(**cpu64)
        scores = _scores(q_rows, keys, scale, softcap)
        q_pos = torch.arange(kv_len - q_len, kv_len, dtype=torch.long)
        k_idx = torch.arange(kv_len, dtype=torch.long)
        kept, masked = _kept(scores, q_pos, k_idx, kv_len, config=config, causal=causal,
                             window=window, decode_row=q_len == 1)
        yield b, cu[b], kept, masked


def unified_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    config: Optional[SparsityConfig] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
):
    """N:M sparse unified attention, computed in float64 on the CPU (the test oracle).

    The input contract is the ops' (:func:`sparse24.validation.prepare_unified_attention`), with
    float64 inputs accepted too; the metadata is always read and checked on the host.

    Args:
        q: ``[T, H_q, D]`` float32, float16, bfloat16 or float64, any device; sequence ``b``
            owns rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k_cache, v_cache: ``[num_blocks, block_size, H_kv, D]``, q's dtype and device, any
            strides; ``H_q % H_kv == 0``.
        block_table: ``[B, max_blocks]`` int32: page of key ``j`` of sequence ``b`` is
            ``block_table[b, j // block_size]``. Entries past a sequence's pages are unread.
        cu_seqlens_q: ``[B + 1]`` int32, starts at 0, non-decreasing, ends at ``T``.
        seq_lens: ``[B]`` int32, ``kv_len`` of each sequence (new tokens included, so
            ``>= q_len``).
        config: a :class:`SparsityConfig` or None (= ``SparsityConfig()``, 2:4);
            ``SparsityConfig.dense()`` = plain attention. A string is a TypeError (use
            :meth:`SparsityConfig.parse`).
        causal: mask keys after the query's position ``p = kv_len - q_len + i``.
        softmax_scale: None = ``1 / sqrt(D)``; else a finite float > 0.
        window: sliding window ``w >= 1`` (visible iff ``p - j < w``); None = none.
        softcap: ``c`` in ``s = c * tanh(s / c)``; None or 0 = none.
        return_lse: also return the log-sum-exp.

    Returns:
        ``out`` float64 ``[T, H_q, D]`` on the CPU, and with ``return_lse`` also ``lse``
        float64 ``[T, H_q]`` (natural log, -inf where nothing is kept). Rows with nothing
        kept are zeros. A row with a NaN score of a visible key (a NaN in its query or in a
        visible key) is NaN, out and LSE (module docstring, step 7).
    """
    prepared, cu, kv = _prepare(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
    )
    opts = prepared.options
    num_q_heads = q.shape[1]
    out = torch.zeros(q.shape[0], num_q_heads, v_cache.shape[3], dtype=torch.float64)
    lse = torch.full((q.shape[0], num_q_heads), -math.inf, dtype=torch.float64)
    for b, row0, kept, scores in _reference_sequences(
        q, k_cache, block_table, cu, kv, config=prepared.config, causal=opts.causal, scale=opts.softmax_scale,
        window=opts.window, softcap=opts.softcap,
    ):
        values = _gather(v_cache, block_table[b], 0, kv[b]).to("cpu", torch.float64)
        s = scores.masked_fill(~kept, -math.inf)
        row_max = s.amax(dim=-1, keepdim=True) if s.shape[-1] else s.new_full(s.shape[:2] + (1,), -math.inf)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        p = torch.exp(s - row_max)
        total = p.sum(dim=-1)  # [H_q, q_len]
        o = _weighted_values(p, values) / total.clamp_min(torch.finfo(torch.float64).tiny)[..., None]
        o = torch.where((total > 0)[..., None], o, torch.zeros_like(o))
        row_lse = row_max[..., 0] + torch.log(total)
        poisoned = torch.isnan(scores).any(dim=-1)  # step 7: a visible NaN score  [H_q, q_len]
        o = o.masked_fill(poisoned[..., None], math.nan)
        row_lse = row_lse.masked_fill(poisoned, math.nan)
        rows = slice(row0, row0 + s.shape[1])
        out[rows] = o.transpose(0, 1)
        lse[rows] = row_lse.transpose(0, 1)
    return (out, lse) if prepared.return_lse else out


def keep_mask_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    config: Optional[SparsityConfig] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> list:
    """The kept-key masks (spec step 5), scores computed in float64 on the CPU.

    Arguments and contract as :func:`unified_attention_reference` (no ``v_cache``).

    Returns:
        A list of ``B`` CPU bool tensors, entry ``b`` of shape ``[H_q, q_len_b, kv_len_b]``:
        ``True`` where query ``i`` (head ``h``) keeps key ``j``. A NaN score ranks as +inf in
        the selection, so a visible key with a NaN score is kept (its row's output is NaN).
    """
    prepared, cu, kv = _prepare(
        q, k_cache, None, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap,
    )
    opts = prepared.options
    masks = [
        torch.zeros(q.shape[1], cu[b + 1] - cu[b], kv[b], dtype=torch.bool) for b in range(len(kv))
    ]
    for b, _, kept, _ in _reference_sequences(
        q, k_cache, block_table, cu, kv, config=prepared.config, causal=opts.causal, scale=opts.softmax_scale,
        window=opts.window, softcap=opts.softcap,
    ):
        masks[b] = kept.contiguous()
    return masks


class KeptStats(NamedTuple):
    """What N:M selection keeps of each row's dense softmax (per query row and head).

    kept_mass: ``[T, H_q]`` the fraction of the dense softmax probability over the row's
      *visible* keys that its *kept* keys carry, ``exp(lse_kept - lse_visible)``: 1 where
      every visible key is kept (dense, dense regions), NaN where no key is visible (0 / 0;
      not reachable through the ops' contract, where a row always sees its own key).
    kept_keys: ``[T, H_q]`` the number of kept keys (an integer value).
    lse: ``[T, H_q]`` the log-sum-exp over the kept keys (natural log; -inf: nothing kept).
    """

    kept_mass: Any
    kept_keys: Any
    lse: Any


def kept_stats_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    config: Optional[SparsityConfig] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
) -> KeptStats:
    """The kept softmax mass and kept key count of every row, in float64 on the CPU.

    Arguments and contract as :func:`unified_attention_reference` (no ``v_cache``).

    Returns:
        a :class:`KeptStats` of float64 CPU tensors ``[T, H_q]``.
    """
    prepared, cu, kv = _prepare(
        q, k_cache, None, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap,
    )
    opts = prepared.options
    shape = (q.shape[0], q.shape[1])
    mass = torch.full(shape, math.nan, dtype=torch.float64)
    count = torch.zeros(shape, dtype=torch.float64)
    lse = torch.full(shape, -math.inf, dtype=torch.float64)
    for _, row0, kept, scores in _reference_sequences(
        q, k_cache, block_table, cu, kv, config=prepared.config, causal=opts.causal, scale=opts.softmax_scale,
        window=opts.window, softcap=opts.softcap,
    ):
        if scores.shape[-1] == 0:
            continue
        lse_visible = torch.logsumexp(scores, dim=-1)  # invisible scores are -inf  [H_q, q_len]
        lse_kept = torch.logsumexp(scores.masked_fill(~kept, -math.inf), dim=-1)
        row_mass = torch.where(torch.isfinite(lse_visible), torch.exp(lse_kept - lse_visible), math.nan)
        row_mass = torch.where(torch.isneginf(lse_kept) & torch.isfinite(lse_visible), 0.0, row_mass)
        rows = slice(row0, row0 + scores.shape[1])
        mass[rows] = row_mass.transpose(0, 1)
        count[rows] = kept.sum(dim=-1).transpose(0, 1).double()
        lse[rows] = lse_kept.transpose(0, 1)
    return KeptStats(mass, count, lse)


# --------------------------------------------------------------------------------------------
# chunked fast path


def unified_attention_chunked(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    config: Optional[SparsityConfig] = None,
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
):
    """N:M sparse unified attention on the inputs' device (``backend="reference"``).

    The same spec as :func:`unified_attention_reference`, chunked over keys (``chunk_size``
    keys at a time, a multiple of ``m`` so no group straddles chunks) and over queries, with
    an online softmax: memory stays ``O(H_q * rows * chunk_size)`` for any context length.
    Key chunks no query of a chunk can see (causal, window) are skipped.

    Args:
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config, causal,
        softmax_scale, window, softcap: as :func:`unified_attention_reference` (the same
            contract, float64 accepted); all on one device.
        return_lse: also return the log-sum-exp.
        out: optional ``[T, H_q, D]`` tensor of ``q.dtype`` on q's device, written in place
            and returned.
        chunk_size: keys per chunk, a positive multiple of ``config.m``.
        compute_dtype: ``torch.float32`` (default) or ``torch.float64``: scores, softmax and
            accumulators use it (float64 agrees with the oracle to ~1e-12).

    Returns:
        ``out`` ``[T, H_q, D]`` in ``q.dtype`` on ``q.device`` (rows with nothing kept are
        zeros; rows with a NaN score of a visible key are NaN, out and LSE: module docstring,
        step 7), and with ``return_lse`` also ``lse`` ``[T, H_q]`` in ``compute_dtype``
        (float32 by default; natural log, -inf where nothing is kept).
    """
    prepared, cu, kv = _prepare(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse, out=out,
    )
    return _chunked(
        q, k_cache, v_cache, block_table, cu, kv, config=prepared.config, options=prepared.options,
        return_lse=prepared.return_lse, out=out, chunk_size=chunk_size, compute_dtype=compute_dtype,
    )


def _chunked(q, k_cache, v_cache, block_table, cu, kv, *, config: SparsityConfig, options: AttentionOptions,
             return_lse: bool, out=None, chunk_size: int = 1024, compute_dtype: torch.dtype = torch.float32):
    """The chunked computation on checked inputs (the torch ops' ``backend="reference"`` calls
    it directly, after their own contract check). ``cu`` / ``kv``: host lists of
    ``cu_seqlens_q`` [B + 1] and ``seq_lens`` [B]; ``cu[-1] <= T``: rows from ``cu[-1]`` on
    belong to no sequence and come out as zeros (the padded ``attention()`` packs that way).
    ``out``: None or ``[T, H_q, D]`` (checked by the caller)."""
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0 \
            or chunk_size % config.m:
        raise ValueError(
            f"chunk_size must be a positive multiple of m = {config.m}, got {chunk_size!r}"
        )
    causal, window, softcap = options.causal, options.window, options.softcap
    device = q.device
    num_tokens, num_q_heads, head_dim = q.shape
    head_dim_v = v_cache.shape[3]
    if out is None:
        out = torch.zeros(num_tokens, num_q_heads, head_dim_v, dtype=q.dtype, device=device)
    else:
        out[cu[-1]:].zero_()
    lse = torch.full((num_tokens, num_q_heads), -math.inf, dtype=compute_dtype, device=device)
    scale = options.softmax_scale
    m = config.m
    rows_per_chunk = max(1, _CHUNK_SCORE_ELEMENTS // (num_q_heads * chunk_size))
    block_table = block_table.to(device)

    for b in range(len(kv)):
        q_len, kv_len = cu[b + 1] - cu[b], kv[b]
        for r0 in range(0, q_len, rows_per_chunk):
            r1 = min(q_len, r0 + rows_per_chunk)
            q_rows = q[cu[b] + r0 : cu[b] + r1].to(compute_dtype)
            q_pos = torch.arange(kv_len - q_len + r0, kv_len - q_len + r1, device=device)
            p_lo, p_hi = kv_len - q_len + r0, kv_len - q_len + r1 - 1
            # keys any row of this block can see; start at a group boundary
            k_end = min(kv_len, p_hi + 1) if causal else kv_len
            k_start = max(0, p_lo - window + 1) if window > 0 else 0
            k_start -= k_start % m
            row_max = torch.full((num_q_heads, r1 - r0), -math.inf, dtype=compute_dtype, device=device)
            total = torch.zeros_like(row_max)
            acc = torch.zeros(num_q_heads, r1 - r0, head_dim_v, dtype=compute_dtype, device=device)
            poisoned = torch.zeros(num_q_heads, r1 - r0, dtype=torch.bool, device=device)  # step 7
            for c0 in range(k_start, k_end, chunk_size):
                c1 = min(k_end, c0 + chunk_size)
                keys = _gather(k_cache, block_table[b], c0, c1).to(compute_dtype)
                scores = _scores(q_rows, keys, scale, softcap)
                k_idx = torch.arange(c0, c1, device=device)
                kept, masked = _kept(scores, q_pos, k_idx, kv_len, config=config, causal=causal,
                                     window=window, decode_row=q_len == 1)
                poisoned |= torch.isnan(masked).any(dim=-1)
                s = scores.masked_fill(~kept, -math.inf)
                new_max = torch.maximum(row_max, s.amax(dim=-1))
                safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
                alpha = torch.exp(row_max - safe_max)
                p = torch.exp(s - safe_max[..., None])
                values = _gather(v_cache, block_table[b], c0, c1).to(compute_dtype)
                total = total * alpha + p.sum(dim=-1)
                acc = acc * alpha[..., None] + _weighted_values(p, values)
                row_max = new_max
            safe_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
            o = acc / total.clamp_min(torch.finfo(compute_dtype).tiny)[..., None]
            o = torch.where((total > 0)[..., None], o, torch.zeros_like(o))
            o = o.masked_fill(poisoned[..., None], math.nan)
            rows = slice(cu[b] + r0, cu[b] + r1)
            out[rows] = o.transpose(0, 1).to(out.dtype)
            lse[rows] = (safe_max + torch.log(total)).masked_fill(poisoned, math.nan).transpose(0, 1)
    return (out, lse) if return_lse else out
