"""The one launch planner: block sizes, warps, stages, split-KV count and grids.

Pure Python: this module imports no triton, torch or jax itself (its package,
``sparse24.kernels``, imports triton for the kernels). The one launch description
(``sparse24.kernels.launch``) turns its plans into the launches both the torch and the JAX
launchers run, so they share every launch decision and cannot drift apart. Decisions depend only on shapes, dtypes, the
sparsity pattern and the device's SM count, never on data, so a plan is deterministic;
and the kernel's results do not depend on the plan (tiles are multiples of M, the
selection is per group), which the tests check by forcing different plans.
"""

from __future__ import annotations

import contextlib
import dataclasses

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
MAX_KV_SPLITS = 64
MAX_BLOCK_M = 256  # rows (query tokens x GQA heads) of one program
MAX_TILE_ELEMENTS = 256 * 128  # block_m x head_dim_pad of one program (see plan_unified_attention)
RAGGED_BLOCK_M = 64  # rows of one program in a ragged batch (decodes beside prefill chunks)


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Launch parameters of ``unified_attention_kernel`` (+ ``reduce_segments_kernel``)."""

    block_m: int  # rows (query token x GQA head) per program
    block_q: int  # query tokens per program
    tile_n: int  # keys per loop iteration
    group_m: int  # M for N:M configs, 1 for dense
    n_keep: int
    member_stride: int  # column distance of a group's member halves (selection.tile_key_offsets)
    head_dim: int
    head_dim_pad: int
    num_queries_per_kv: int
    num_segments: int  # split-KV segments; 1 = no split, no reduce kernel
    num_warps: int
    num_stages: int
    upcast_operands: bool
    dot_precision: str
    grid: tuple[int, int, int]
    reduce_grid: tuple[int, int]

    @property
    def is_split(self) -> bool:
        return self.num_segments > 1

    def kernel_constexprs(
        self,
        *,
        page_size: int,
        causal: bool,
        use_window: bool,
        use_softcap: bool,
        use_sink: bool,
        use_recent: bool,
        sparse_decode: bool,
        store_lse: bool,
        store_stats: bool = False,
    ) -> dict:
        """Keyword constexprs of ``unified_attention_kernel`` (plus num_warps/num_stages).

        ``store_stats`` (kept mass and kept keys per row, in the LSE buffer) needs an unsplit
        plan (``num_kv_splits=1``).

        ``page_size`` is the caches' block_size (slots per page), a compile-time constant of
        the kernel: mapping a key to its page is then a shift (or a cheap division), not a
        run-time integer division per key.
        """
        sparse = self.group_m > 1
        if int(page_size) < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size!r}")
        if store_stats and self.is_split:
            raise ValueError("store_stats needs an unsplit plan (num_kv_splits=1): the reduce does not merge statistics")
        return dict(
            NUM_QUERIES_PER_KV=self.num_queries_per_kv,
            HEAD_DIM=self.head_dim,
            HEAD_DIM_PAD=self.head_dim_pad,
            PAGE_SIZE=int(page_size),
            BLOCK_M=self.block_m,
            BLOCK_Q=self.block_q,
            TILE_N=self.tile_n,
            GROUP_M=self.group_m,
            N_KEEP=self.n_keep,
            MEMBER_STRIDE=self.member_stride,
            IS_CAUSAL=bool(causal),
            USE_WINDOW=bool(use_window),
            USE_SOFTCAP=bool(use_softcap),
            USE_SINK=bool(use_sink and sparse),
            USE_RECENT=bool(use_recent and sparse),
            SPARSE_DECODE=bool(sparse_decode or not sparse),
            NUM_SEGMENTS=self.num_segments,
            STORE_LSE=bool(store_lse or store_stats),
            STORE_STATS=bool(store_stats),
            UPCAST_OPERANDS=self.upcast_operands,
            DOT_PRECISION=self.dot_precision,
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )

    def reduce_constexprs(self, *, store_lse: bool, row_fixup: bool = False) -> dict:
        """Keyword constexprs of ``reduce_segments_kernel`` (plus num_warps and num_stages)."""
        return dict(
            HEAD_DIM=self.head_dim,
            HEAD_DIM_PAD=self.head_dim_pad,
            NUM_SEGMENTS=self.num_segments,
            STORE_LSE=bool(store_lse),
            USE_ROW_FIXUP=bool(row_fixup),
            num_warps=4,
            num_stages=1,  # no loop to pipeline
        )


_TUNING: dict = {}
TUNABLE = ("block_m", "tile_n", "num_warps", "num_stages", "member_stride")


@contextlib.contextmanager
def tuning(**overrides):
    """Override launch parameters of every plan made inside the block (benchmarks, tuning).

    Keys: ``block_m``, ``tile_n``, ``num_warps``, ``num_stages``, ``member_stride``; a process-wide setting
    (not thread-safe), read when a plan is made, so it reaches the torch and JAX launchers
    alike. Results do not depend on these (tiles stay multiples of M); speed does.
    """
    unknown = set(overrides) - set(TUNABLE)
    if unknown:
        raise ValueError(f"tuning() takes {TUNABLE}, got {sorted(unknown)}")
    saved = dict(_TUNING)
    _TUNING.update({k: int(v) for k, v in overrides.items() if v is not None})
    try:
        yield
    finally:
        _TUNING.clear()
        _TUNING.update(saved)


def member_stride_for(*, block_m: int, tile_n: int, num_warps: int, m: int) -> int:
    """Column stride of a group's member halves that keeps the N:M selection in registers.

    The selection needs column bit 0 and the member bits in one thread's registers of the
    QK^T accumulator. Hopper's wgmma (>= 64 rows) and mma.sync with the warps along the
    rows hold column bits 0, 3, 4, ... per thread: stride 8. For a chained dot with fewer
    rows than keys (decode's 16-row tiles) Triton puts all warps side by side along the
    columns, each taking interleaved 8-column slices, so the register bits start at
    ``8 * num_warps``. Checked on the sm_90 TTGIR (no ``convert_layout`` in the loop); a
    wrong guess costs shared-memory round trips, never correctness.
    """
    if m == 1:
        return 8
    stride = 8 if (block_m >= 64 or block_m >= tile_n) else 8 * num_warps
    while stride > 8 and tile_n < stride * (m // 2):
        stride //= 2
    return stride


def plan_unified_attention(
    *,
    num_tokens: int,
    num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    n: int,
    m: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_sms: int | None = None,
    interpret: bool = False,
    num_kv_splits: int | None = None,
) -> AttentionPlan:
    """Choose the launch of one unified-attention call.

    Args:
      num_tokens: rows of the packed query ``q`` [num_tokens, num_q_heads, head_dim].
      num_seqs: sequences in the batch (len(seq_lens)).
      dtype: "float32" | "float16" | "bfloat16" (the q / cache dtype).
      n, m: the N:M pattern; n == m means dense.
      max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence query / key lengths.
      num_sms: streaming multiprocessors of the GPU (None off-GPU: no automatic split).
      interpret: the kernel runs in Triton's CPU interpreter.
      num_kv_splits: force this many split-KV segments (a power of two <= 64; 1 = none).
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    qpk = num_q_heads // num_kv_heads
    sparse = n < m
    group_m = m if sparse else 1
    head_dim_pad = max(16, next_power_of_2(head_dim))
    is_fp32 = dtype == "float32"

    # Rows per program: the GQA group fills the M side, so decode (1 token) still feeds
    # a 16-row MMA; prefill takes larger tiles. Measured on an H200 (benchmarks/NOTES.md):
    # 256 rows x 64 keys is best for dense and 2:4 at D=128; at D=64, 128 rows x 128 keys /
    # 4 warps for dense and 2:4 alike (2:4: 192 against 152 TFLOP/s with 256 x 64 / 8 warps).
    # M=8 at D=64 takes the 256-row, 64-key, 16-warp tile (H100, 4:8 at B=4 S=4k H 16/16:
    # 147 TFLOP/s against 92 with 128 x 128 / 4 warps, which spills; benchmarks/NOTES.md, Session 14).
    m8_wide = sparse and m == 8 and head_dim_pad == 64 and not is_fp32
    if head_dim_pad > 128 or is_fp32:
        block_m = 64
    elif head_dim_pad == 128 or m8_wide:
        block_m = 256
    else:
        block_m = 128
    block_m = min(block_m, max(16, next_power_of_2(max(max_seqlen_q, 1) * qpk)))
    block_m = max(block_m, next_power_of_2(qpk), 16)
    # A ragged batch: sequences much shorter than the longest, such as decodes beside prefill
    # chunks (a serving engine's mixed step). Each sequence starts its own q-block, so with
    # 256-row tiles a decode row fills one row group of a 16-warp program that walks its whole
    # context, latency-bound, holding an SM. When those padding rows could exceed half the
    # tokens (num_seqs * (block_q - 1) > num_tokens / 2), take 64 rows x 32 keys / 4 warps.
    # H200, 4 chunks of 512..2048 + 60 decodes at 4k, one launch against the two parts
    # launched with their own plans: dense 1.50 -> 1.16, 2:4 1.56 -> 1.14 (a lone prefill at
    # these tiles is ~17% slower; benchmarks/NOTES.md, Session 11). A batch of equal lengths
    # (an HF prefill) meets the rule only below 126 queries per sequence, where the large
    # tile is mostly padding anyway. Measured at D=128 only (the 256-row plans), for GQA
    # groups that fit a 64-row program.
    ragged = (block_m == 256 and head_dim_pad == 128 and next_power_of_2(qpk) <= RAGGED_BLOCK_M
              and 2 * num_seqs * (block_m // qpk - 1) > num_tokens)
    if ragged:
        block_m = RAGGED_BLOCK_M
    block_q = block_m // qpk
    # A program holds a whole GQA group (each K/V byte is read once), so H_q/H_kv sets a floor
    # on block_m. Its fp32 output accumulator [block_m, head_dim_pad] takes 64 registers per
    # thread at 16 warps for 256 x 128; 256 x 256 does not compile (ptxas: insufficient
    # registers), so 256 x 128 elements is the ceiling (benchmarks/NOTES.md).
    if block_m > MAX_BLOCK_M or block_m * head_dim_pad > MAX_TILE_ELEMENTS:
        raise ValueError(
            f"num_q_heads / num_kv_heads = {qpk} with head_dim {head_dim} needs a {block_m} x {head_dim_pad} "
            f"tile per program (one program holds a whole GQA group); the kernel supports at most "
            f"{MAX_BLOCK_M} rows and rows x head_dim <= {MAX_TILE_ELEMENTS} (up to 128 query heads per KV head "
            f"at head_dim 256, 256 at head_dim <= 128)"
        )

    # Keys per iteration (a multiple of M so groups never straddle a tile). Measured on an
    # H200 (benchmarks/NOTES.md): 64 with 256-row tiles, 128 with 128-row tiles; decode
    # (fewer than 64 rows: the GQA group x a few tokens) reads K/V at memory speed with
    # 128-key tiles, 4 warps, 2 stages, dense and 2:4 alike. fp32 and D > 128 keep 64: K/V
    # tiles of 128 keys there need more shared memory than sm_90 has (4:8 at D=256: 288 KiB
    # in bf16, 352 KiB in fp32; the limit is 227 KiB) and fp32 4:8 took a minute to compile.
    # An fp32 Q tile at that ceiling (128 KiB) leaves shared memory for 32-key K/V tiles only.
    small_elements = not is_fp32 and head_dim_pad <= 128
    if is_fp32 and block_m * head_dim_pad >= MAX_TILE_ELEMENTS:
        tile_n = 32
    elif ragged:
        tile_n = 32
    elif block_m >= 256:
        # M=8 too since its ranks are packed (H100, 4:8 at S=16k: 299 TFLOP/s against 268 with
        # the 32-key tile that session 10 chose for the old selection; benchmarks/NOTES.md, Session 14)
        tile_n = 64
    elif small_elements and (block_m >= 128 or block_m < 64):
        tile_n = 128
    elif sparse and small_elements:
        tile_n = 16 * m
    else:
        tile_n = 64

    # 16 warps for every 256-row tile (four warpgroups of 64 rows; M=8 at D=64 measured with 16)
    # and for the 256 x 128-element ceiling; 8 from 128 x 128 elements; else 4
    if block_m >= 256 or block_m * head_dim_pad >= 256 * 128:
        num_warps = 16
    elif block_m * head_dim_pad >= 128 * 128:
        num_warps = 8
    else:
        num_warps = 4
    num_stages = 2
    member_stride = None
    if _TUNING:
        block_m = _TUNING.get("block_m", block_m)
        tile_n = _TUNING.get("tile_n", tile_n)
        num_warps = _TUNING.get("num_warps", num_warps)
        num_stages = _TUNING.get("num_stages", num_stages)
        member_stride = _TUNING.get("member_stride")
        if block_m < max(16, qpk) or block_m & (block_m - 1):
            raise ValueError(f"tuning block_m must be a power of two >= max(16, H_q/H_kv), got {block_m}")
        if tile_n < (32 if group_m == 8 else 16) or tile_n & (tile_n - 1):
            raise ValueError(f"tuning tile_n must be a power of two >= 16 (>= 32 for M=8), got {tile_n}")
        block_q = block_m // qpk
        if member_stride is not None and (
            member_stride < 8
            or member_stride & (member_stride - 1)
            or tile_n < member_stride * max(1, group_m // 2)
        ):
            raise ValueError(
                f"tuning member_stride must be a power of two >= 8 with tile_n >= member_stride * M / 2, "
                f"got {member_stride} (tile_n {tile_n}, M {group_m})"
            )
    if member_stride is None:
        member_stride = member_stride_for(block_m=block_m, tile_n=tile_n, num_warps=num_warps, m=group_m)

    num_q_blocks = num_tokens // block_q + num_seqs
    num_tiles_k = max(1, cdiv(max(max_seqlen_k, 1), tile_n))
    if num_kv_splits is not None:
        num_segments = int(num_kv_splits)
        if num_segments < 1 or num_segments > MAX_KV_SPLITS or num_segments & (num_segments - 1):
            raise ValueError(
                f"num_kv_splits must be a power of two in [1, {MAX_KV_SPLITS}], got {num_kv_splits!r}"
            )
    elif num_sms and max_seqlen_q <= 1:
        # Decode: split the key range until the grid covers the SMs about twice.
        programs = num_seqs * num_kv_heads
        num_segments = 1
        while programs * num_segments < 2 * num_sms and 2 * num_segments <= min(MAX_KV_SPLITS, num_tiles_k):
            num_segments *= 2
    else:
        num_segments = 1

    return AttentionPlan(
        block_m=block_m,
        block_q=block_q,
        tile_n=tile_n,
        group_m=group_m,
        n_keep=n if sparse else group_m,
        member_stride=member_stride if sparse else 8,
        head_dim=head_dim,
        head_dim_pad=head_dim_pad,
        num_queries_per_kv=qpk,
        num_segments=num_segments,
        num_warps=num_warps,
        num_stages=num_stages,
        upcast_operands=bool(interpret and dtype != "float32"),
        dot_precision="ieee" if is_fp32 else "tf32",
        grid=(num_q_blocks, num_kv_heads, num_segments),
        reduce_grid=(num_tokens, num_q_heads),
    )


@dataclasses.dataclass(frozen=True)
class KVWritePlan:
    head_dim_pad: int
    grid: tuple[int, int]
    num_warps: int = 1
    num_stages: int = 1  # no loop to pipeline


def plan_write_kv_cache(*, num_tokens: int, num_kv_heads: int, head_dim: int) -> KVWritePlan:
    """Launch of ``write_kv_cache_kernel``: one program per (token, KV head)."""
    return KVWritePlan(head_dim_pad=max(16, next_power_of_2(head_dim)), grid=(num_tokens, num_kv_heads))


@dataclasses.dataclass(frozen=True)
class MaskLayoutPlan:
    """Launch of ``decode_mask_layout_kernel``: one program per batch row, walking the mask
    and the block table in chunks of ``block_l`` slots."""

    block_l: int
    grid: tuple[int]
    num_warps: int = 4
    num_stages: int = 1


def plan_decode_mask_layout(*, batch: int, mask_len: int, width: int) -> MaskLayoutPlan:
    """One program per row (a decode batch is small; each program reads L <= width slots and
    writes width pages), chunks of up to 1024 slots."""
    return MaskLayoutPlan(block_l=min(1024, max(16, next_power_of_2(max(mask_len, width)))), grid=(batch,))
