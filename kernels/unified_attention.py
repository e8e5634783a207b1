"""Unified N:M-sparse attention over a paged KV cache (prefill, decode and mixed batches).

What it computes (docs/SPEC.md §2, the spec; ``sparse24.reference`` is its float64 oracle):
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
* One MMA per key tile (``TILE_N`` keys) for QK^T and one for PV, dense or sparse. For
  N:M the key tile is loaded in a member-interleaved column order
  (``selection.tile_key_offsets``, its member stride from the planner to match the MMA
  layout) so the M members of each group sit in one thread's registers; the selection
  is then elementwise after register-only reshapes (``selection.select_tile``). Tiles
  start at multiples of ``TILE_N`` (a multiple of M), so a group never straddles a
  tile, a page or a split-KV segment.
* Selection runs on the raw dot product (or on the soft-capped score): the positive scale
  cannot change the order, and one rounding less keeps fp32 decisions closest to the
  float64 spec. The softmax runs in log2 units (``exp2``, scale folded into one multiply).
* The key range of a q-block is walked in up to three loops: masked edge tiles (window
  start, sink), then tiles that are fully visible to every row and outside the dense
  regions (no masks, no bounds checks), then the masked tiles at the causal diagonal
  and the dense recent band.
* Any page size works (every key is translated through the block table); the page size
  is a compile-time constant (``PAGE_SIZE``) so the key -> page mapping is a shift for
  powers of two.
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

from .selection import select_tile, tile_key_offsets


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
def _max_propagating_nan(a, b):
    """Combine of a max reduction that returns NaN if any element is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def _interpreter_reduces_max_propagating_nan_in_numpy() -> bool:
    """Triton's interpreter runs a reduction with a user combine element by element in Python
    (thousands of times slower than its numpy paths for ``tl.max``); give it ``ndarray.max`` for
    ``_max_propagating_nan``, which propagates NaN the same way (compiled kernels are not
    touched). Returns whether the interpreter was taught; an interpreter without the expected
    internals keeps its slow, equally exact path."""
    from triton.runtime.jit import JITFunction

    if isinstance(_max_propagating_nan, JITFunction):  # compiled: nothing to do
        return False
    try:
        from triton.runtime.interpreter import ReduceOps
    except ImportError:
        return False
    if getattr(ReduceOps, "_sparse24_max_propagating_nan", False):  # taught already (a second import)
        return True
    if not hasattr(ReduceOps, "min_max"):
        return False
    generic = ReduceOps.apply_impl

    def apply_impl(self, input):
        if self.combine_fn is _max_propagating_nan:
            # the interpreter's arrays are numpy's: ndarray.max propagates NaN
            return self.min_max(input[0], val_reduce_op=lambda data, axis, keepdims: data.max(axis=axis,
                                                                                           keepdims=keepdims))
        return generic(self, input)

    ReduceOps.apply_impl = apply_impl
    ReduceOps._sparse24_max_propagating_nan = True
    return True


_interpreter_reduces_max_propagating_nan_in_numpy()


@triton.jit
def _tanh(x):
    """tanh without libdevice (which the interpreter lacks); exact at +-inf."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_rows(
    cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    row_offset,  # [TILE_N] int64: element offset of each key's (page, slot, kv_head) row
    key_valid,  # [TILE_N] bool (used when MASK_KEYS)
    stride_dim,
    offs_d,  # [HEAD_DIM_PAD]
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    """One K or V tile, [TILE_N, HEAD_DIM_PAD]; zeros where the key (MASK_KEYS) or the
    padded dim is invalid. Unmasked when every key is valid and the dim is not padded."""
    ptrs = cache_ptr + row_offset[:, None] + offs_d[None, :].to(tl.int64) * stride_dim
    if MASK_KEYS:
        tile = tl.load(ptrs, mask=key_valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    elif HEAD_DIM < HEAD_DIM_PAD:
        tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    if UPCAST_OPERANDS:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attend_tile(
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32 running unnormalised output
    m_i,  # [BLOCK_M] fp32 running max of the logits, log2 units
    l_i,  # [BLOCK_M] fp32 running sum of exp2(logit - m_i)
    stats,  # STORE_STATS: (m_vis, l_vis, kept, seen) [BLOCK_M] fp32: the same over every visible key, the kept
    #         count and the count of visible keys with a score above -inf
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    tile,  # index of the key tile (keys tile * TILE_N ...)
    seq,  # this sequence and KV head (see _attend_range)
    rows,  # the rows of this program (see _attend_range)
    scalars,  # the run-time options (see _attend_range)
    k_strides,  # (block, slot, head, dim) element strides of k_cache
    v_strides,  # (block, slot, head, dim) element strides of v_cache
    offs_d,  # [HEAD_DIM_PAD]
    TILES: tl.constexpr,  # (PAGE_SIZE, BLOCK_M, TILE_N, GROUP_M, N_KEEP, MEMBER_STRIDE, HEAD_DIM, HEAD_DIM_PAD)
    FLAGS: tl.constexpr,  # (IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_SINK, USE_RECENT, UPCAST_OPERANDS, DOT_PRECISION,
    #                      STORE_STATS)
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row, none is in a dense region
):
    """One online-softmax step over key tile ``tile``. Returns (acc, m_i, l_i, stats); ``stats``
    passes through untouched unless STORE_STATS."""
    k_cache_ptr, v_cache_ptr, block_table_row_ptr, key_offs, kv_len, kv_head, stride_bt_page = seq
    query_pos, row_valid, row_dense = rows
    softmax_scale, logit_scale, softcap, window, dense_sink_tokens, dense_recent_tokens = scalars
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim = k_strides
    stride_vc_block, stride_vc_slot, stride_vc_head, stride_vc_dim = v_strides
    PAGE_SIZE: tl.constexpr = TILES[0]
    BLOCK_M: tl.constexpr = TILES[1]
    TILE_N: tl.constexpr = TILES[2]
    GROUP_M: tl.constexpr = TILES[3]
    N_KEEP: tl.constexpr = TILES[4]
    MEMBER_STRIDE: tl.constexpr = TILES[5]
    HEAD_DIM: tl.constexpr = TILES[6]
    HEAD_DIM_PAD: tl.constexpr = TILES[7]
    IS_CAUSAL: tl.constexpr = FLAGS[0]
    USE_WINDOW: tl.constexpr = FLAGS[1]
    USE_SOFTCAP: tl.constexpr = FLAGS[2]
    USE_SINK: tl.constexpr = FLAGS[3]
    USE_RECENT: tl.constexpr = FLAGS[4]
    UPCAST_OPERANDS: tl.constexpr = FLAGS[5]
    DOT_PRECISION: tl.constexpr = FLAGS[6]
    STORE_STATS: tl.constexpr = FLAGS[7]
    key_idx = tile * TILE_N + key_offs  # [TILE_N] absolute key of each column
    key_valid = key_idx < kv_len  # [TILE_N]
    logical_page = key_idx // PAGE_SIZE
    slot = (key_idx - logical_page * PAGE_SIZE).to(tl.int64)
    if MASKED:
        page = tl.load(block_table_row_ptr + logical_page.to(tl.int64) * stride_bt_page, mask=key_valid, other=0)
    else:
        page = tl.load(block_table_row_ptr + logical_page.to(tl.int64) * stride_bt_page)
    page = page.to(tl.int64)
    k = _load_rows(
        k_cache_ptr, page * stride_kc_block + slot * stride_kc_slot + kv_head * stride_kc_head,
        key_valid, stride_kc_dim, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, UPCAST_OPERANDS,
    )  # [TILE_N, HEAD_DIM_PAD]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, TILE_N]

    # The selection score: the raw dot product (the scale is positive, so the order is the
    # spec's, with one rounding less), or the soft-capped score.
    if USE_SOFTCAP:
        score = softcap * _tanh((qk * softmax_scale) / softcap)
    else:
        score = qk
    if MASKED:
        visible = row_valid[:, None] & key_valid[None, :]
        if IS_CAUSAL:
            visible = visible & (key_idx[None, :] <= query_pos[:, None])
        if USE_WINDOW:
            visible = visible & (query_pos[:, None] - key_idx[None, :] < window)
        score = tl.where(visible, score, float("-inf"))
    if STORE_STATS:  # the dense softmax's running max / sum over every visible key, in log2 units
        m_vis, l_vis, kept, seen = stats
        seen = seen + tl.sum((score > float("-inf")).to(tl.float32), 1)
        m_vis_new = tl.maximum(m_vis, tl.max(score, 1) * logit_scale)
        m_vis_shift = tl.where(m_vis_new == float("-inf"), 0.0, m_vis_new)
        l_vis = l_vis * tl.exp2(m_vis - m_vis_shift) + tl.sum(tl.exp2(tl.fma(score, logit_scale, -m_vis_shift[:, None])), 1)
        m_vis = m_vis_new
    if N_KEEP < GROUP_M:
        keep = select_tile(score, N_KEEP, GROUP_M, BLOCK_M, TILE_N, MEMBER_STRIDE)
        if MASKED:  # dense regions only reach masked tiles (the caller routes them there)
            keep = keep | row_dense
            if USE_SINK:
                keep = keep | (key_idx < dense_sink_tokens)[None, :]
            if USE_RECENT:
                distance = query_pos[:, None] - key_idx[None, :]
                keep = keep | ((distance >= 0) & (distance < dense_recent_tokens))

    # Online softmax in log2 units (exp2). A row with nothing kept so far keeps m = -inf;
    # use 0 as the shift there so exp2(-inf - shift) = 0 instead of NaN. The NaN rule (docs/SPEC.md
    # §2, "NaN"): a NaN score of a visible key makes the row's output and LSE NaN, as in SDPA,
    # whatever the selection decided.
    if N_KEEP < GROUP_M:
        # The running max is taken over the visible scores before the selection (every group's
        # largest score is kept, N >= 1, so it is the max over the kept ones) and does not wait
        # for it; it propagates NaN, so a dropped score simply becomes -inf: one add per score
        # less than writing a dropped score as score - inf (H200, 2:4: +5% at B=8 S=2k, -1.4% at
        # D=64, equal elsewhere; benchmarks/NOTES.md, session 9; M=8 since session 14).
        m_new = tl.maximum(m_i, tl.reduce(score, 1, _max_propagating_nan) * logit_scale,
                           propagate_nan=tl.PropagateNan.ALL)  # [BLOCK_M]
        score = tl.where(keep, score, float("-inf"))
    else:
        m_new = tl.maximum(m_i, tl.max(score, 1) * logit_scale)  # [BLOCK_M]
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    # one fused multiply-add, written out: left to the compiler, a run-time logit_scale (torch)
    # contracts to an FMA and a compile-time one (jax-triton binds scalars as constexprs) stays a
    # multiply and a subtract, which rounds differently (torch and JAX must give the same bits)
    p = tl.exp2(tl.fma(score, logit_scale, -m_shift[:, None]))  # [BLOCK_M, TILE_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    if STORE_STATS:
        kept = kept + tl.sum((score > float("-inf")).to(tl.float32), 1)
        stats = (m_vis, l_vis, kept, seen)

    v = _load_rows(
        v_cache_ptr, page * stride_vc_block + slot * stride_vc_slot + kv_head * stride_vc_head,
        key_valid, stride_vc_dim, offs_d, HEAD_DIM, HEAD_DIM_PAD, MASKED, UPCAST_OPERANDS,
    )  # [TILE_N, HEAD_DIM_PAD]
    p_in = p.to(v_cache_ptr.dtype.element_ty)  # P as the tensor cores see it
    if UPCAST_OPERANDS:
        p_in = p_in.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i, stats


@triton.jit
def _attend_range(
    acc, m_i, l_i, stats,  # the running online-softmax state (see _attend_tile)
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    tile_lo,
    tile_hi,  # key tiles [tile_lo, tile_hi)
    seq,  # (k_cache_ptr, v_cache_ptr, block_table_row_ptr [max_blocks_per_seq], key_offs [TILE_N], kv_len, kv_head, stride_bt_page)
    rows,  # (query_pos [BLOCK_M] int32, row_valid [BLOCK_M] bool, row_dense scalar bool)
    scalars,  # (softmax_scale, logit_scale, softcap, window, dense_sink_tokens, dense_recent_tokens)
    k_strides,
    v_strides,
    offs_d,
    TILES: tl.constexpr,
    FLAGS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``_attend_tile`` over the key tiles [tile_lo, tile_hi). Returns (acc, m_i, l_i, stats)."""
    for tile in range(tile_lo, tile_hi):
        acc, m_i, l_i, stats = _attend_tile(acc, m_i, l_i, stats, q, tile, seq, rows, scalars, k_strides, v_strides,
                                            offs_d, TILES, FLAGS, MASKED)
    return acc, m_i, l_i, stats


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
    lse_ptr,  # [num_tokens, num_q_heads] fp32 (NUM_SEGMENTS == 1 and STORE_LSE); with STORE_STATS
    #           [num_tokens, num_q_heads, 3]: (lse, kept_mass, kept_keys), stride_lse_head = 3
    segm_acc_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS, HEAD_DIM_PAD] fp32 (NUM_SEGMENTS > 1)
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32, log2 units (NUM_SEGMENTS > 1)
    segm_sum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32 (NUM_SEGMENTS > 1)
    # ---- runtime scalars ----
    softmax_scale,  # fp32
    softcap,  # fp32, used when USE_SOFTCAP
    window,  # int, used when USE_WINDOW: keys with p - j < window are visible
    dense_sink_tokens,  # int, used when USE_SINK
    dense_recent_tokens,  # int, used when USE_RECENT
    num_seqs,
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
    PAGE_SIZE: tl.constexpr,  # slots per page (the caches' block_size); compile-time, so key -> page is cheap
    BLOCK_M: tl.constexpr,  # rows per program (power of two >= 16)
    BLOCK_Q: tl.constexpr,  # query tokens per program = BLOCK_M // NUM_QUERIES_PER_KV
    TILE_N: tl.constexpr,  # keys per loop iteration
    GROUP_M: tl.constexpr,  # M for N:M configs, 1 for dense
    N_KEEP: tl.constexpr,  # N (== GROUP_M: no selection)
    MEMBER_STRIDE: tl.constexpr,  # column distance of a group's member halves (selection.tile_key_offsets)
    IS_CAUSAL: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINK: tl.constexpr,
    USE_RECENT: tl.constexpr,
    SPARSE_DECODE: tl.constexpr,  # False: rows of q_len == 1 sequences are dense
    NUM_SEGMENTS: tl.constexpr,  # split-KV segments per sequence (1 = write out directly)
    STORE_LSE: tl.constexpr,
    STORE_STATS: tl.constexpr,  # also the kept softmax mass and kept key count per row (NUM_SEGMENTS == 1)
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: compute bf16/fp16 operands in fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact decisions), else "tf32"
):
    """Grid: (num_q_blocks upper bound = num_tokens // BLOCK_Q + num_seqs, num_kv_heads, NUM_SEGMENTS)."""
    # Float scalars arrive as fp32 from a torch launch but as fp64 from torch.compile
    # (Inductor) and Python floats under jax-triton: fix the compute type here.
    softmax_scale = tl.cast(softmax_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    LOG2E: tl.constexpr = 1.4426950408889634
    if USE_SOFTCAP:
        logit_scale = tl.cast(LOG2E, tl.float32)  # the score is already scaled and capped
    else:
        logit_scale = softmax_scale * LOG2E  # the score is the raw dot product
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

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = offs_d < HEAD_DIM
    key_offs = tile_key_offsets(TILE_N, GROUP_M, MEMBER_STRIDE)  # [TILE_N]

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

    # Key range of this q-block: tiles [tile_lo, tile_hi), pruned by causality and the window.
    first_pos = context_len + q_block_local * BLOCK_Q  # position of the block's first query
    last_pos = context_len + tl.minimum(q_block_local * BLOCK_Q + BLOCK_Q, q_len) - 1
    if IS_CAUSAL:
        key_hi = tl.minimum(last_pos + 1, kv_len)
    else:
        key_hi = kv_len
    tile_lo = 0
    if USE_WINDOW:
        tile_lo = tl.maximum(first_pos - window + 1, 0) // TILE_N
    tile_hi = tl.cdiv(key_hi, TILE_N)
    if NUM_SEGMENTS > 1:
        tiles_per_segment = tl.cdiv(tl.cdiv(kv_len, TILE_N), NUM_SEGMENTS)
        tile_lo = tl.maximum(tile_lo, segment * tiles_per_segment)
        tile_hi = tl.minimum(tile_hi, (segment + 1) * tiles_per_segment)

    # Tiles [mid_lo, mid_hi) need no masking at all: every key exists and is visible to
    # every row of the block, and none lies in a dense (sink / recent) region. Only the
    # tiles at the edges of the range (the causal diagonal, the window's far end, the sink)
    # go through the masked step.
    if IS_CAUSAL:
        unmasked_end = tl.minimum(first_pos + 1, kv_len)  # keys [0, unmasked_end) visible to all rows
    else:
        unmasked_end = kv_len
    if USE_RECENT:
        unmasked_end = tl.minimum(unmasked_end, tl.maximum(first_pos - dense_recent_tokens + 1, 0))
    mid_lo = tile_lo
    if USE_WINDOW:
        mid_lo = tl.maximum(mid_lo, tl.cdiv(tl.maximum(last_pos - window + 1, 0), TILE_N))
    if USE_SINK:
        mid_lo = tl.maximum(mid_lo, tl.cdiv(dense_sink_tokens, TILE_N))
    mid_lo = tl.minimum(mid_lo, tile_hi)
    mid_hi = tl.maximum(tl.minimum(unmasked_end // TILE_N, tile_hi), mid_lo)

    row_dense = False
    if not SPARSE_DECODE:
        row_dense = q_len == 1
        if row_dense:  # whole rows dense: the masked step handles them (it knows row_dense)
            mid_hi = mid_lo
    block_table_row_ptr = block_table_ptr + seq_idx.to(tl.int64) * stride_bt_seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    if STORE_STATS:
        stats = (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                 tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M], tl.float32))
    else:
        stats = (0.0, 0.0, 0.0, 0.0)  # unused; passes through the loops untouched

    seq = (k_cache_ptr, v_cache_ptr, block_table_row_ptr, key_offs, kv_len, kv_head, stride_bt_page)
    rows = (query_pos, row_valid, row_dense)
    scalars = (softmax_scale, logit_scale, softcap, window, dense_sink_tokens, dense_recent_tokens)
    k_strides = (stride_kc_block, stride_kc_slot, stride_kc_head, stride_kc_dim)
    v_strides = (stride_vc_block, stride_vc_slot, stride_vc_head, stride_vc_dim)
    TILES: tl.constexpr = (PAGE_SIZE, BLOCK_M, TILE_N, GROUP_M, N_KEEP, MEMBER_STRIDE, HEAD_DIM, HEAD_DIM_PAD)
    FLAGS: tl.constexpr = (IS_CAUSAL, USE_WINDOW, USE_SOFTCAP, USE_SINK, USE_RECENT, UPCAST_OPERANDS, DOT_PRECISION,
                           STORE_STATS)
    # Masked edge tiles (window start, sink), the unmasked middle, the masked diagonal / recent band.
    if USE_WINDOW or USE_SINK:
        acc, m_i, l_i, stats = _attend_range(acc, m_i, l_i, stats, q, tile_lo, mid_lo, seq, rows, scalars, k_strides,
                                             v_strides, offs_d, TILES, FLAGS, True)
    acc, m_i, l_i, stats = _attend_range(acc, m_i, l_i, stats, q, mid_lo, mid_hi, seq, rows, scalars, k_strides,
                                         v_strides, offs_d, TILES, FLAGS, False)
    acc, m_i, l_i, stats = _attend_range(acc, m_i, l_i, stats, q, mid_hi, tile_hi, seq, rows, scalars, k_strides,
                                         v_strides, offs_d, TILES, FLAGS, True)

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
            LN2: tl.constexpr = 0.6931471805599453
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
            tl.store(
                lse_ptr + token * stride_lse_token + q_head.to(tl.int64) * stride_lse_head,
                lse,
                mask=row_valid,
            )
        if STORE_STATS:  # kept mass = exp(lse_kept - lse_visible); NaN where nothing is visible (0 / 0)
            m_vis, l_vis, kept, seen = stats
            m_vis_safe = tl.where(l_vis == 0.0, 0.0, m_vis)
            m_kept_safe = tl.where(l_i == 0.0, m_vis_safe, m_i)  # kept keys are visible: m_i <= m_vis
            ratio = (l_i / tl.where(l_vis == 0.0, 1.0, l_vis)) * tl.exp2(m_kept_safe - m_vis_safe)
            # exactly 1 where nothing was dropped (compiled code may round the two sums differently);
            # a NaN score leaves the ratio NaN (counted in neither kept nor seen)
            exact = (kept == seen) & (ratio == ratio)
            mass = tl.where(l_vis == 0.0, float("nan"), tl.where(exact, 1.0, ratio))
            stats_row = lse_ptr + token * stride_lse_token + q_head.to(tl.int64) * stride_lse_head
            tl.store(stats_row + 1, mass, mask=row_valid)
            tl.store(stats_row + 2, kept, mask=row_valid)
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
    segm_max_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32, log2 units
    segm_sum_ptr,  # [num_tokens, num_q_heads, NUM_SEGMENTS] fp32
    row_keep_ptr,  # [num_tokens] bool (USE_ROW_FIXUP): False = write row_fill instead of the row
    row_fill_ptr,  # [num_tokens] out's dtype (USE_ROW_FIXUP); both are dummies otherwise
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
    USE_ROW_FIXUP: tl.constexpr,
):
    """Merge split-KV partials. Grid: (num_tokens, num_q_heads). With USE_ROW_FIXUP a token
    whose ``row_keep`` is False gets ``row_fill`` in every element of ``out`` (the LSE is
    unchanged): ``sparse24.hf``'s decode fix-up (rows with holes: NaN; rows without a real
    query: 0) without a separate ``where`` launch per layer."""
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
    weight = tl.exp2(seg_max - m_shift)  # [NUM_SEGMENTS], 0 for empty segments
    total = tl.sum(seg_sum * weight, 0)
    seg_acc = tl.load(segm_acc_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :])  # [NUM_SEGMENTS, HEAD_DIM_PAD]
    total_safe = tl.where(total == 0.0, 1.0, total)
    out = tl.sum(seg_acc * weight[:, None], 0) / total_safe  # [HEAD_DIM_PAD]
    if USE_ROW_FIXUP:
        keep = tl.load(row_keep_ptr + token) != 0
        out = tl.where(keep, out, tl.load(row_fill_ptr + token).to(tl.float32))
    tl.store(
        out_ptr + token * stride_out_token + q_head * stride_out_head + offs_d.to(tl.int64) * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )
    if STORE_LSE:
        lse = tl.where(total == 0.0, float("-inf"), (m_shift + tl.log2(total_safe)) * 0.6931471805599453)
        tl.store(lse_ptr + token * stride_lse_token + q_head * stride_lse_head, lse)
