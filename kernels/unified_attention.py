"""Unified N:M-sparse attention over a paged KV cache (prefill, decode and mixed batches).

What it computes (DESIGN.md §2, the spec; ``sparse24.reference`` is its float64 oracle):
for sequence ``b`` with ``q_len`` new tokens and ``kv_len`` keys, query ``i`` sits at
absolute position ``p = kv_len - q_len + i``. Scores ``s = scale * <q, k>`` (then
``softcap * tanh(s / softcap)``); invisible keys (``j >= kv_len``, causal ``j > p``,
window ``p - j >= window``) are -inf. In every group of ``M`` consecutive absolute key
indices, per query row and head, the ``N`` largest scores are selected (ties: lower key
index wins). Kept = visible AND (dense region OR selected), where the dense region is
``j < dense_sink_tokens`` or ``0 <= p - j < dense_recent_tokens`` (and whole rows of
decode sequences when ``SPARSE_DECODE`` is off). Softmax over kept keys in fp32; rows
with nothing kept give zeros and LSE = -inf.

How (differences from its ancestor, vLLM's ``triton_unified_attention``):

* One program = one KV head x one tile of ``BLOCK_M`` rows, a row being a (query token,
  query head of this KV head's GQA group) pair, so decode still fills the MMA's M side.
  Programs find their sequence by a binary search over ``cu_seqlens_q`` in "q-block"
  units (``cu_seqlens_q[b] // BLOCK_Q + b``); surplus programs exit at once.
* The key tile (``TILE_N`` keys) is loaded as ``NUM_SUBTILES`` strided sub-tiles
  (sub-tile ``r`` = keys ``tile_start + NUM_SUBTILES * g + r``). With
  ``NUM_SUBTILES == M`` the N:M selection is elementwise across the sub-tiles
  (``kernels/selection.py``); the dense configuration uses one sub-tile. Tiles start at
  multiples of ``TILE_N`` (a multiple of M), so a group never straddles a tile, a page
  or a split-KV segment.
* Page size is a runtime value: any page size from 1 up to a whole sequence works
  (every key is translated through the block table).
* Split-KV ("3D"): with ``NUM_SEGMENTS > 1`` the key range of a sequence is cut into
  segments of whole tiles; each program writes an unnormalised fp32 partial and its
  running max / sum, and ``reduce_segments_kernel`` merges them.
* Parameter order suits jax-triton (which binds by position): input arrays, then
  output arrays, then runtime scalars and strides, then constexprs.

``UPCAST_OPERANDS`` exists for Triton's CPU interpreter, whose bf16 arithmetic is
wrong: operands are converted to fp32 after loading and P is rounded through the
input dtype, so numerics follow the GPU path.

Imports triton only.
"""

import triton
import triton.language as tl

from .selection import select_of_4, select_of_8


@triton.jit
def _find_seq_idx(cu_seqlens_q_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    """Sequence owning q-block ``q_block_global``: the largest b with
    ``cu_seqlens_q[b] // BLOCK_Q + b <= q_block_global``."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh without libdevice (which the interpreter lacks); exact at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _page_lookup(block_table_row_ptr, key_idx, kv_len, block_size, stride_bt_page):
    """Physical page and slot of each key.

    key_idx: [G] int32 absolute key indices of one sub-tile.
    Returns (page [G] int64, slot [G] int64, key_valid [G] bool).
    """
    key_valid = key_idx < kv_len
    logical_page = key_idx // block_size
    slot = key_idx - logical_page * block_size
    page = tl.load(
        block_table_row_ptr + logical_page.to(tl.int64) * stride_bt_page, mask=key_valid, other=0
    ).to(tl.int64)
    return page, slot.to(tl.int64), key_valid


@triton.jit
def _load_kv_subtile(
    cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    page,  # [G] int64
    slot,  # [G] int64
    key_valid,  # [G] bool
    kv_head,
    stride_block,
    stride_slot,
    stride_head,
    stride_dim,
    offs_d,  # [HEAD_DIM_PAD]
    dim_valid,  # [HEAD_DIM_PAD] bool
    UPCAST_OPERANDS: tl.constexpr,
):
    """One K or V sub-tile, [G, HEAD_DIM_PAD]; zeros where the key or dim is invalid."""
    row = page * stride_block + slot * stride_slot + kv_head * stride_head  # [G]
    tile = tl.load(
        cache_ptr + row[:, None] + offs_d[None, :].to(tl.int64) * stride_dim,
        mask=key_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST_OPERANDS:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _subtile_scores(
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_row_ptr,  # [max_blocks_per_seq]
    key_idx,  # [G] int32
    query_pos,  # [BLOCK_M] int32 absolute position p of each row
    row_valid,  # [BLOCK_M] bool
    kv_len,
    kv_head,
    block_size,
    softmax_scale,
    softcap,
    window,
    stride_bt_page,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_kc_dim,
    offs_d,
    dim_valid,
    IS_CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of one sub-tile with invisible entries at -inf.

    Returns (s [BLOCK_M, G] fp32, page [G], slot [G], key_valid [G]).
    """
    page, slot, key_valid = _page_lookup(block_table_row_ptr, key_idx, kv_len, block_size, stride_bt_page)
    k = _load_kv_subtile(
        k_cache_ptr, page, slot, key_valid, kv_head,
        stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim,
        offs_d, dim_valid, UPCAST_OPERANDS,
    )  # [G, HEAD_DIM_PAD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * softmax_scale  # [BLOCK_M, G]
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    visible = row_valid[:, None] & key_valid[None, :]
    if IS_CAUSAL:
        visible = visible & (key_idx[None, :] <= query_pos[:, None])
    if USE_WINDOW:
        visible = visible & (query_pos[:, None] - key_idx[None, :] < window)
    s = tl.where(visible, s, float("-inf"))
    return s, page, slot, key_valid


@triton.jit
def _keep(s, selected, key_idx, query_pos, row_dense, dense_sink_tokens, dense_recent_tokens,
          USE_SINK: tl.constexpr, USE_RECENT: tl.constexpr):
    """Scores with unkept entries at -inf: kept = visible AND (dense OR selected).

    s: [BLOCK_M, G] (invisible already -inf); selected: [BLOCK_M, G] bool.
    """
    keep = selected | row_dense
    if USE_SINK:
        keep = keep | (key_idx < dense_sink_tokens)[None, :]
    if USE_RECENT:
        distance = query_pos[:, None] - key_idx[None, :]
        keep = keep | ((distance >= 0) & (distance < dense_recent_tokens))
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _subtile_pv(
    p,  # [BLOCK_M, G] fp32 probabilities (unnormalised)
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    page,
    slot,
    key_valid,
    kv_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_vc_dim,
    offs_d,
    dim_valid,
    UPCAST_OPERANDS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """P @ V for one sub-tile, [BLOCK_M, HEAD_DIM_PAD] fp32. P is rounded to V's dtype
    (as the tensor cores see it)."""
    v = _load_kv_subtile(
        v_cache_ptr, page, slot, key_valid, kv_head,
        stride_vc_block, stride_vc_slot, stride_vc_head, stride_vc_dim,
        offs_d, dim_valid, UPCAST_OPERANDS,
    )  # [G, HEAD_DIM_PAD]
    p_in = p.to(v_cache_ptr.dtype.element_ty)
    if UPCAST_OPERANDS:
        p_in = p_in.to(tl.float32)
    return tl.dot(p_in, v, input_precision=DOT_PRECISION)


@triton.jit
def unified_attention_kernel(
    # ---- input arrays ----
    q_ptr,  # [num_tokens, num_q_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_table_ptr,  # [num_seqs, max_blocks_per_seq] int32
    cu_seqlens_q_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32, keys per sequence (kv_len)
    # ---- output arrays ----
    out_ptr,  # [num_tokens, num_q_heads, head_dim], q's dtype (NUM_SEGMENTS == 1)
    lse_ptr,  # [num_tokens, num_q_heads] fp32 (NUM_SEGMENTS == 1 and STORE_LSE)
    segm_acc_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS, HEAD_DIM_PAD] fp32 (NUM_SEGMENTS > 1)
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32 (NUM_SEGMENTS > 1)
    segm_sum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32 (NUM_SEGMENTS > 1)
    # ---- runtime scalars ----
    softmax_scale,  # fp32
    softcap,  # fp32, used when USE_SOFTCAP
    window,  # int, used when USE_WINDOW: keys with p - j < window are visible
    dense_sink_tokens,  # int, used when USE_SINK
    dense_recent_tokens,  # int, used when USE_RECENT
    num_seqs,
    block_size,  # slots per page
    stride_q_token,
    stride_q_head,
    stride_q_dim,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_kc_dim,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_vc_dim,
    stride_bt_seq,
    stride_bt_page,
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    stride_lse_token,
    stride_lse_head,
    # ---- constexprs ----
    NUM_QUERIES_PER_KV: tl.constexpr,  # H_q // H_kv
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # next power of two >= HEAD_DIM
    BLOCK_M: tl.constexpr,  # rows per program (power of two >= 16)
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // NUM_QUERIES_PER_KV
    TILE_N: tl.constexpr,  # keys per loop iteration
    NUM_SUBTILES: tl.constexpr,  # M for N:M configs, 1 for dense
    N_KEEP: tl.constexpr,  # N (== NUM_SUBTILES: no selection)
    IS_CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINK: tl.constexpr,
    USE_RECENT: tl.constexpr,
    SPARSE_DECODE: tl.constexpr,  # False: rows of q_len == 1 sequences are dense
    NUM_SEGMENTS: tl.constexpr,  # split-KV segments per sequence (1 = write out directly)
    STORE_LSE: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: compute bf16/fp16 operands in fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact decisions), else "tf32"
):
    """Grid: (num_q_blocks upper bound = num_tokens // BLOCK_Q + num_seqs, num_kv_heads, NUM_SEGMENTS)."""
    # Float scalars arrive as fp32 from a torch launch but as fp64 from torch.compile
    # (Inductor) and Python floats under jax-triton: fix the compute type here.
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)

    seq_idx = _find_seq_idx(cu_seqlens_q_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_block_local = q_block_global - (q_start // BLOCK_Q + seq_idx)
    if q_block_local * BLOCK_Q >= q_len:
        return
    kv_len = tl.load(seq_lens_ptr + seq_idx)
    context_len = kv_len - q_len

    GROUPS: tl.constexpr = TILE_N // NUM_SUBTILES  # columns of one sub-tile
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_g = tl.arange(0, GROUPS)
    dim_valid = offs_d < HEAD_DIM

    query_local = q_block_local * BLOCK_Q + offs_m // NUM_QUERIES_PER_KV  # [BLOCK_M]
    q_head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV  # [BLOCK_M]
    row_valid = (offs_m < BLOCK_Q * NUM_QUERIES_PER_KV) & (query_local < q_len)  # [BLOCK_M]
    query_pos = context_len + query_local  # [BLOCK_M]
    token = (q_start + query_local).to(tl.int64)  # [BLOCK_M]

    q = tl.load(
        q_ptr + token[:, None] * stride_q_token + q_head[:, None].to(tl.int64) * stride_q_head
        + offs_d[None, :].to(tl.int64) * stride_q_dim,
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM_PAD]
    if UPCAST_OPERANDS:
        q = q.to(tl.float32)

    # Key range of this q-block: [key_lo, key_hi), pruned by causality and the window.
    if IS_CAUSAL:
        last_query = tl.minimum(q_block_local * BLOCK_Q + BLOCK_Q, q_len) - 1
        key_hi = tl.minimum(context_len + last_query + 1, kv_len)
    else:
        key_hi = kv_len
    tile_lo = 0
    if USE_WINDOW:
        first_pos = context_len + q_block_local * BLOCK_Q
        tile_lo = tl.maximum(first_pos - window + 1, 0) // TILE_N
    tile_hi = tl.cdiv(key_hi, TILE_N)
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(tl.cdiv(kv_len, TILE_N), NUM_SEGMENTS)
        tile_lo = tl.maximum(tile_lo, segment * tiles_per_segment)
        tile_hi = tl.minimum(tile_hi, (segment + 1) * tiles_per_segment)

    row_dense = False
    if not SPARSE_DECODE:
        row_dense = q_len == 1
    block_table_row_ptr = block_table_ptr + seq_idx.to(tl.int64) * stride_bt_seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    for tile in range(tile_lo, tile_hi):
        key_base = tile * TILE_N + offs_g * NUM_SUBTILES  # [GROUPS] first key of each group
        if NUM_SUBTILES == 1:
            s0, pg0, sl0, kv0 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(s0, 1))
        elif NUM_SUBTILES == 4:
            s0, pg0, sl0, kv0 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 0, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s1, pg1, sl1, kv1 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 1, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s2, pg2, sl2, kv2 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 2, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s3, pg3, sl3, kv3 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 3, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            if N_KEEP < NUM_SUBTILES:
                sel0, sel1, sel2, sel3 = select_of_4(s0, s1, s2, s3, N_KEEP)
                s0 = _keep(s0, sel0, key_base + 0, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s1 = _keep(s1, sel1, key_base + 1, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s2 = _keep(s2, sel2, key_base + 2, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s3 = _keep(s3, sel3, key_base + 3, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
            m_new = tl.maximum(
                tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1))),
                tl.maximum(tl.max(s2, 1), tl.max(s3, 1)),
            )
        else:
            tl.static_assert(NUM_SUBTILES == 8, "NUM_SUBTILES must be 1, 4 or 8")
            s0, pg0, sl0, kv0 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 0, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s1, pg1, sl1, kv1 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 1, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s2, pg2, sl2, kv2 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 2, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s3, pg3, sl3, kv3 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 3, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s4, pg4, sl4, kv4 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 4, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s5, pg5, sl5, kv5 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 5, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s6, pg6, sl6, kv6 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 6, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            s7, pg7, sl7, kv7 = _subtile_scores(
                q, k_cache_ptr, block_table_row_ptr, key_base + 7, query_pos, row_valid, kv_len, kv_head,
                block_size, softmax_scale, softcap, window, stride_bt_page,
                stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim, offs_d, dim_valid,
                IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, UPCAST_OPERANDS, DOT_PRECISION)
            if N_KEEP < NUM_SUBTILES:
                sel0, sel1, sel2, sel3, sel4, sel5, sel6, sel7 = select_of_8(
                    s0, s1, s2, s3, s4, s5, s6, s7, N_KEEP)
                s0 = _keep(s0, sel0, key_base + 0, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s1 = _keep(s1, sel1, key_base + 1, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s2 = _keep(s2, sel2, key_base + 2, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s3 = _keep(s3, sel3, key_base + 3, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s4 = _keep(s4, sel4, key_base + 4, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s5 = _keep(s5, sel5, key_base + 5, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s6 = _keep(s6, sel6, key_base + 6, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
                s7 = _keep(s7, sel7, key_base + 7, query_pos, row_dense, dense_sink_tokens,
                           dense_recent_tokens, USE_SINK, USE_RECENT)
            m_new = tl.maximum(
                tl.maximum(
                    tl.maximum(m_i, tl.maximum(tl.max(s0, 1), tl.max(s1, 1))),
                    tl.maximum(tl.max(s2, 1), tl.max(s3, 1)),
                ),
                tl.maximum(
                    tl.maximum(tl.max(s4, 1), tl.max(s5, 1)),
                    tl.maximum(tl.max(s6, 1), tl.max(s7, 1)),
                ),
            )

        # Online softmax step. A row with nothing kept so far keeps m = -inf; use 0 as the
        # shift there so exp(-inf - shift) = 0 instead of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M]
        alpha = tl.exp(m_i - m_shift)  # [BLOCK_M]
        acc = acc * alpha[:, None]
        p0 = tl.exp(s0 - m_shift[:, None])
        l_new = tl.sum(p0, 1)
        acc += _subtile_pv(p0, v_cache_ptr, pg0, sl0, kv0, kv_head, stride_vc_block, stride_vc_slot,
                           stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
        if NUM_SUBTILES >= 4:
            p1 = tl.exp(s1 - m_shift[:, None])
            p2 = tl.exp(s2 - m_shift[:, None])
            p3 = tl.exp(s3 - m_shift[:, None])
            l_new += tl.sum(p1, 1) + tl.sum(p2, 1) + tl.sum(p3, 1)
            acc += _subtile_pv(p1, v_cache_ptr, pg1, sl1, kv1, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
            acc += _subtile_pv(p2, v_cache_ptr, pg2, sl2, kv2, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
            acc += _subtile_pv(p3, v_cache_ptr, pg3, sl3, kv3, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
        if NUM_SUBTILES == 8:
            p4 = tl.exp(s4 - m_shift[:, None])
            p5 = tl.exp(s5 - m_shift[:, None])
            p6 = tl.exp(s6 - m_shift[:, None])
            p7 = tl.exp(s7 - m_shift[:, None])
            l_new += tl.sum(p4, 1) + tl.sum(p5, 1) + tl.sum(p6, 1) + tl.sum(p7, 1)
            acc += _subtile_pv(p4, v_cache_ptr, pg4, sl4, kv4, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
            acc += _subtile_pv(p5, v_cache_ptr, pg5, sl5, kv5, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
            acc += _subtile_pv(p6, v_cache_ptr, pg6, sl6, kv6, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
            acc += _subtile_pv(p7, v_cache_ptr, pg7, sl7, kv7, kv_head, stride_vc_block, stride_vc_slot,
                               stride_vc_head, stride_vc_dim, offs_d, dim_valid, UPCAST_OPERANDS, DOT_PRECISION)
        l_i = l_i * alpha + l_new
        m_i = m_new

    if NUM_SEGMENTS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]  # rows with nothing kept: acc == 0 -> 0
        tl.store(
            out_ptr + token[:, None] * stride_out_token + q_head[:, None].to(tl.int64) * stride_out_head
            + offs_d[None, :].to(tl.int64) * stride_out_dim,
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
        if STORE_LSE:
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))
            tl.store(
                lse_ptr + token * stride_lse_token + q_head.to(tl.int64) * stride_lse_head,
                lse,
                mask=row_valid,
            )
    else:
        # Partials are contiguous [num_tokens, num_q_heads, NUM_SEGMENTS, (HEAD_DIM_PAD)].
        row = (token * (num_kv_heads * NUM_QUERIES_PER_KV) + q_head) * NUM_SEGMENTS + segment  # [BLOCK_M]
        tl.store(segm_max_ptr + row, m_i, mask=row_valid)
        tl.store(segm_sum_ptr + row, l_i, mask=row_valid)
        tl.store(
            segm_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )


@triton.jit
def reduce_segments_kernel(
    # ---- input arrays ----
    segm_acc_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS, HEAD_DIM_PAD] fp32
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32
    segm_sum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32
    # ---- output arrays ----
    out_ptr,  # [num_tokens, num_q_heads, head_dim]
    lse_ptr,  # [num_tokens, num_q_heads] fp32 (STORE_LSE)
    # ---- runtime scalars ----
    stride_out_token,
    stride_out_head,
    stride_out_dim,
    stride_lse_token,
    stride_lse_head,
    # ---- constexprs ----
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    """Merge split-KV partials. Grid: (num_tokens, num_q_heads)."""
    token = tl.program_id(0).to(tl.int64)
    q_head = tl.program_id(1).to(tl.int64)
    num_q_heads = tl.num_programs(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row = (token * num_q_heads + q_head) * NUM_SEGMENTS + offs_s  # [NUM_SEGMENTS]

    seg_max = tl.load(segm_max_ptr + row)  # [NUM_SEGMENTS]
    seg_sum = tl.load(segm_sum_ptr + row)  # [NUM_SEGMENTS]
    m = tl.max(seg_max, 0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp(seg_max - m_shift)  # [NUM_SEGMENTS], 0 for empty segments
    total = tl.sum(seg_sum * weight, 0)
    seg_acc = tl.load(segm_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :])  # [NUM_SEGMENTS, HEAD_DIM_PAD]
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(seg_acc * weight[:, None], 0) / total_safe  # [HEAD_DIM_PAD]
    tl.store(
        out_ptr + token * stride_out_token + q_head * stride_out_head + offs_d.to(tl.int64) * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    if STORE_LSE:
        lse = tl.where(total == 0.0, float("-inf"), m_shift + tl.log(total_safe))
        tl.store(lse_ptr + token * stride_lse_token + q_head * stride_lse_head, lse)
