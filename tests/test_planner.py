"""The pure-Python launch planner (``sparse24.kernels.planner``) and the kernels' parameter order."""

from __future__ import annotations

import inspect
import itertools

import pytest
import triton.language as tl

from sparse24.kernels import (
    plan_unified_attention,
    plan_write_kv_cache,
    reduce_segments_kernel,
    unified_attention_kernel,
    write_kv_cache_kernel,
)
from sparse24.kernels.planner import MAX_KV_SPLITS, next_power_of_2, tuning


def plan(**overrides):
    """Defaults: a bf16 2:4 prefill of one 512-token sequence, GQA 32/8, head_dim 128."""
    args = dict(
        num_tokens=512, num_seqs=1, num_q_heads=32, num_kv_heads=8, head_dim=128, dtype="bfloat16",
        n=2, m=4, max_seqlen_q=512, max_seqlen_k=512,
    )
    args.update(overrides)
    return plan_unified_attention(**args)


def decode(**overrides):
    """Decode defaults: 8 sequences with one new token each."""
    args = dict(num_tokens=8, num_seqs=8, max_seqlen_q=1, max_seqlen_k=4096)
    args.update(overrides)
    return plan(**args)


def is_pow2(x: int) -> bool:
    return x >= 1 and x & (x - 1) == 0


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, block_m, block_q",
    [
        (dict(num_q_heads=32, num_kv_heads=8), 16, 4),  # decode GQA 4: 4 tokens x 4 heads
        (dict(num_q_heads=5, num_kv_heads=1), 16, 3),  # GQA 5: 16 rows hold 3 whole tokens
        (dict(num_q_heads=8, num_kv_heads=8), 16, 16),  # MHA decode
        (dict(num_q_heads=32, num_kv_heads=1), 32, 1),  # MQA 32: one token fills 32 rows
        (dict(num_q_heads=64, num_kv_heads=1), 64, 1),
        (dict(num_q_heads=32, num_kv_heads=8, dtype="float32"), 16, 4),
    ],
    ids=["gqa4", "gqa5", "mha", "mqa32", "mqa64", "gqa4-fp32"],
)
def test_decode_block_sizes(kwargs, block_m, block_q):
    p = decode(**kwargs)
    assert (p.block_m, p.block_q) == (block_m, block_q)
    assert p.num_queries_per_kv == kwargs["num_q_heads"] // kwargs["num_kv_heads"]


@pytest.mark.parametrize(
    "dtype, head_dim, block_m",
    [
        ("bfloat16", 128, 256),
        ("float16", 128, 256),
        ("bfloat16", 64, 128),  # D <= 64: 128 rows for every N:M (benchmarks/NOTES.md, session 8)
        ("bfloat16", 256, 64),  # head_dim_pad > 128
        ("bfloat16", 192, 64),  # pads to 256
        ("float32", 128, 64),
        ("float32", 64, 64),
    ],
)
def test_prefill_block_m(dtype, head_dim, block_m):
    p = plan(dtype=dtype, head_dim=head_dim)
    assert p.block_m == block_m
    assert p.block_q == block_m // 4


def test_prefill_tiles_measured_table():
    """The measurements behind the defaults (H200; the M=8 tiles on an H100; benchmarks/NOTES.md)."""
    d128 = plan(dtype="bfloat16", head_dim=128)
    assert (d128.block_m, d128.tile_n, d128.num_warps) == (256, 64, 16)
    for n, head_dim in itertools.product((2, 4), (128, 64)):
        # M=8 prefill, packed ranks (H100, 4:8): 64-key tiles at 256 rows, 299 against 268 TFLOP/s
        # at 16k; at D=64 the same tile, 147 against 92 with 128 x 128 / 4 warps
        m8 = plan(dtype="bfloat16", head_dim=head_dim, n=n, m=8)
        assert (m8.block_m, m8.tile_n, m8.num_warps) == (256, 64, 16)
    assert plan(dtype="bfloat16", head_dim=128, n=4, m=8, num_q_heads=256, num_kv_heads=1, max_seqlen_q=1,
                num_tokens=2, num_seqs=2).tile_n == 64  # a 256-head GQA decode group keeps 64
    sparse64 = plan(dtype="bfloat16", head_dim=64)  # 2:4 192 TFLOP/s against 152 with 256 x 64 / 8 warps
    assert (sparse64.block_m, sparse64.tile_n, sparse64.num_warps) == (128, 128, 4)
    dense64 = plan(dtype="bfloat16", head_dim=64, n=4, m=4)
    assert (dense64.block_m, dense64.tile_n, dense64.num_warps) == (128, 128, 4)


@pytest.mark.parametrize("config", [(2, 4), (4, 4), (4, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_ragged_batches_take_64_row_programs(config, head_dim):
    """Decodes beside prefill chunks (bench_decode.py's mixed batch: 4 chunks of 512..2048 and
    60 decodes) take 64-row programs at D=128; batches of equal or long lengths keep the large
    tiles."""
    n, m = config
    chunks = [1054, 1559, 1826, 513]
    mixed = plan(n=n, m=m, head_dim=head_dim, num_tokens=sum(chunks) + 60, num_seqs=64, max_seqlen_q=max(chunks),
                 max_seqlen_k=4096)
    if head_dim == 128:  # H200: dense 1.50 -> 1.16, 2:4 1.56 -> 1.14
        assert (mixed.block_m, mixed.block_q, mixed.tile_n, mixed.num_warps) == (64, 16, 32, 4)
    else:  # measured at D=128 only: D=64 keeps its plan (128 rows; 256 for M=8)
        assert mixed.block_m == (256 if m == 8 else 128)
    large = plan(n=n, m=m, head_dim=head_dim).block_m  # one 512-token sequence
    assert large > 64
    for tokens, seqs, longest in ((8 * 4096, 8, 4096), (16000 + 7 * 100, 8, 16000), (4 * 2048 + 4, 8, 2048),
                                  (8 * 126, 8, 126)):
        assert plan(n=n, m=m, head_dim=head_dim, num_tokens=tokens, num_seqs=seqs, max_seqlen_q=longest,
                    max_seqlen_k=longest).block_m == large, (tokens, seqs)
    # equal lengths below 2 * (block_q - 1) queries: the 256-row tile is mostly padding there
    assert plan(n=n, m=m, head_dim=head_dim, num_tokens=8 * 100, num_seqs=8, max_seqlen_q=100,
                max_seqlen_k=100).block_m == (64 if head_dim == 128 else large)
    # GQA groups larger than 64 rows keep their plans (one program holds the whole group)
    for qpk in (128, 256):
        kept = plan(n=n, m=m, head_dim=head_dim, num_q_heads=qpk, num_kv_heads=1, num_tokens=sum(chunks) + 60,
                    num_seqs=64, max_seqlen_q=max(chunks), max_seqlen_k=4096)
        assert kept.block_m == plan(n=n, m=m, head_dim=head_dim, num_q_heads=qpk, num_kv_heads=1).block_m >= qpk
    with tuning(block_m=256):  # an explicit tile wins
        assert plan(n=n, m=m, num_tokens=sum(chunks) + 60, num_seqs=64, max_seqlen_q=max(chunks)).block_m == 256


def test_short_prefill_shrinks_block_m():
    # 3 tokens x GQA 4 = 12 rows -> the 16-row minimum, not 256.
    assert plan(num_tokens=3, max_seqlen_q=3).block_m == 16
    assert plan(num_tokens=10, max_seqlen_q=10).block_m == 64  # 40 rows -> 64


@pytest.mark.parametrize("dtype, precision", [("float32", "ieee"), ("bfloat16", "tf32"), ("float16", "tf32")])
def test_dot_precision(dtype, precision):
    assert plan(dtype=dtype).dot_precision == precision
    assert decode(dtype=dtype).dot_precision == precision


@pytest.mark.parametrize(
    "dtype, interpret, upcast",
    [("bfloat16", True, True), ("float16", True, True), ("float32", True, False),
     ("bfloat16", False, False), ("float32", False, False)],
)
def test_upcast_operands(dtype, interpret, upcast):
    assert plan(dtype=dtype, interpret=interpret).upcast_operands is upcast


def test_unknown_dtype_rejected():
    with pytest.raises(ValueError, match=r"^dtype must be one of .*'int8'"):
        plan(dtype="int8")


@pytest.mark.parametrize(
    "head_dim, pad", [(8, 16), (16, 16), (64, 64), (80, 128), (96, 128), (128, 128), (200, 256), (256, 256)]
)
def test_head_dim_pad(head_dim, pad):
    assert plan(head_dim=head_dim).head_dim_pad == pad
    assert plan_write_kv_cache(num_tokens=3, num_kv_heads=2, head_dim=head_dim).head_dim_pad == pad


# --------------------------------------------------------------------------------------
# Invariants over a sweep
# --------------------------------------------------------------------------------------

SWEEP = list(
    itertools.product(
        [(2, 4), (1, 4), (3, 4), (4, 4), (4, 8), (2, 8), (8, 8)],  # (n, m)
        [(1, 1), (8, 1), (32, 8), (5, 1), (64, 1)],  # (H_q, H_kv)
        [32, 64, 128, 256],  # head_dim
        ["float32", "bfloat16"],
        [(1, 1), (1, 5000), (7, 7), (300, 1000), (2048, 2048)],  # (max_seqlen_q, max_seqlen_k)
    )
)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 4), (4, 4), (4, 8), (2, 8), (8, 8)], ids=lambda x: f"{x[0]}:{x[1]}")
def test_invariants(nm):
    n, m = nm
    count = 0
    for (_, _), (hq, hkv), d, dtype, (sq, sk) in (c for c in SWEEP if c[0] == nm):
        num_seqs = 3
        num_tokens = sq * num_seqs
        p = plan(n=n, m=m, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                 num_tokens=num_tokens, num_seqs=num_seqs, max_seqlen_q=sq, max_seqlen_k=sk)
        ctx = (n, m, hq, hkv, d, dtype, sq, sk, p)
        assert is_pow2(p.block_m) and p.block_m >= 16, ctx
        assert p.block_q == p.block_m // (hq // hkv) >= 1, ctx
        assert p.tile_n % m == 0, ctx  # groups never straddle a tile
        if n < m:
            assert p.group_m == m and p.n_keep == n, ctx
            # the member-interleaved column order needs 16 (M=4) / 32 (M=8) keys per tile
            assert p.tile_n >= (32 if m == 8 else 16), ctx
        else:
            assert p.group_m == 1 and p.n_keep == 1, ctx
            assert p.tile_n >= 16, ctx
        assert p.head_dim_pad >= max(16, d) and is_pow2(p.head_dim_pad), ctx
        assert p.num_warps in (4, 8, 16) and p.num_stages >= 1, ctx
        assert p.grid == (num_tokens // p.block_q + num_seqs, hkv, 1), ctx
        assert p.reduce_grid == (num_tokens, hq), ctx
        assert not p.is_split and p.num_segments == 1, ctx  # num_sms None: never splits
        count += 1
    assert count == len(SWEEP) // 7


@pytest.mark.parametrize("m", [4, 8])
@pytest.mark.parametrize("n_of", ["sparse", "dense"])
def test_tile_n_table(m, n_of):
    n = 2 if n_of == "sparse" else m
    big = plan(n=n, m=m)  # block_m 256
    small = decode(n=n, m=m)  # block_m 16
    for p in (big, small):
        if n_of == "dense":
            assert p.group_m == 1
        else:
            assert p.group_m == m
            assert p.tile_n >= (32 if m == 8 else 16)
        assert p.tile_n % m == 0


@pytest.mark.parametrize("dtype, head_dim", [("bfloat16", 256), ("float32", 128), ("float32", 256)])
@pytest.mark.parametrize("max_seqlen_q", [1, 512])
def test_large_elements_keep_64_key_tiles(dtype, head_dim, max_seqlen_q):
    """fp32 or D > 128: 64 keys per tile for every N:M, also M=8 (128 keys of K and V at
    D=256 need more than sm_90's 227 KiB of shared memory; tests/compile_sm90.py checks the
    compiled size)."""
    for n, m in ((4, 4), (2, 4), (4, 8), (1, 8)):
        p = plan(n=n, m=m, dtype=dtype, head_dim=head_dim, max_seqlen_q=max_seqlen_q,
                 num_tokens=max_seqlen_q * 8, num_seqs=8)
        assert p.tile_n == 64, (n, m, p)


@pytest.mark.parametrize("max_seqlen_q", [1, 512])
def test_largest_gqa_groups(max_seqlen_q):
    """A whole GQA group per program: block_m >= H_q/H_kv. The largest tiles that compile for
    sm_90 (tests/compile_sm90.py): 128 x 256 with 64 keys in bf16, 32 keys in fp32 (its Q tile
    is 128 KiB); 256 x 128 in fp32 with 32 keys; beyond that a ValueError."""
    common = dict(num_kv_heads=1, max_seqlen_q=max_seqlen_q, num_tokens=max_seqlen_q * 2, num_seqs=2)
    for dtype, hq, d, tile_n in (("bfloat16", 128, 256, 64), ("float32", 128, 256, 32), ("float32", 256, 128, 32),
                                 ("bfloat16", 256, 128, 64), ("float32", 128, 128, 64)):
        for n, m in ((2, 4), (4, 8), (4, 4)):
            p = plan(n=n, m=m, dtype=dtype, num_q_heads=hq, head_dim=d, **common)
            assert (p.block_m, p.tile_n) == (hq, tile_n), (dtype, hq, d, n, m, p)
    for hq, d in ((256, 256), (512, 64), (512, 16)):
        with pytest.raises(ValueError, match=rf"^num_q_heads / num_kv_heads = {hq} with head_dim {d} needs a"):
            plan(num_q_heads=hq, head_dim=d, **common)


@pytest.mark.parametrize("num_tokens, num_seqs, hq, hkv", [(512, 1, 32, 8), (37, 5, 5, 1), (0, 2, 8, 8), (1, 1, 64, 1)])
def test_grid_counts_q_blocks(num_tokens, num_seqs, hq, hkv):
    p = plan(num_tokens=num_tokens, num_seqs=num_seqs, num_q_heads=hq, num_kv_heads=hkv,
             max_seqlen_q=max(1, num_tokens), max_seqlen_k=max(1, num_tokens))
    assert p.grid[0] == num_tokens // p.block_q + num_seqs
    assert p.grid[1] == hkv


# --------------------------------------------------------------------------------------
# Split-KV
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("splits", [1, 2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_forced_splits_honoured(splits, phase):
    make = plan if phase == "prefill" else decode
    for num_sms in (None, 132):
        p = make(num_kv_splits=splits, num_sms=num_sms)
        assert p.num_segments == splits
        assert p.grid[2] == splits
        assert p.is_split is (splits > 1)


@pytest.mark.parametrize("splits", [0, 3, 5, 6, 48, 65, 128, -1, -4])
def test_forced_splits_invalid(splits):
    with pytest.raises(ValueError, match=rf"^num_kv_splits must be a power of two in \[1, 64\], got {splits}"):
        decode(num_kv_splits=splits, num_sms=132)


def test_no_split_without_sms():
    assert decode(num_sms=None, num_seqs=1, num_tokens=1, max_seqlen_k=100_000).num_segments == 1


def test_no_auto_split_for_prefill():
    for sq in (2, 16, 512):
        p = plan(num_sms=132, max_seqlen_q=sq, num_tokens=sq, max_seqlen_k=100_000)
        assert p.num_segments == 1 and p.grid[2] == 1


def test_auto_split_example():
    # 1 sequence x 8 KV heads = 8 programs on 132 SMs: split until >= 2 * 132 programs.
    p = decode(num_seqs=1, num_tokens=1, max_seqlen_k=32768, num_sms=132)
    assert p.num_segments == 64
    assert p.is_split and p.grid == (1 // p.block_q + 1, 8, 64)
    # enough programs already: no split
    assert decode(num_seqs=64, num_tokens=64, max_seqlen_k=32768, num_sms=132).num_segments == 1


@pytest.mark.parametrize("num_sms", [1, 16, 78, 132, 264])
@pytest.mark.parametrize("num_seqs", [1, 3, 16, 128])
@pytest.mark.parametrize("hkv", [1, 8])
def test_auto_split_properties(num_sms, num_seqs, hkv):
    for sk in (1, 15, 16, 64, 100, 1000, 5000, 100_000):
        for n, m in ((2, 4), (4, 8), (4, 4)):
            p = decode(num_seqs=num_seqs, num_tokens=num_seqs, num_q_heads=4 * hkv, num_kv_heads=hkv,
                       max_seqlen_k=sk, num_sms=num_sms, n=n, m=m)
            ctx = (num_sms, num_seqs, hkv, sk, n, m, p)
            num_tiles = -(-sk // p.tile_n)
            s = p.num_segments
            assert is_pow2(s) and s <= MAX_KV_SPLITS, ctx
            # Never a segment without a key tile: see test_split_count_at_most_key_tiles for the
            # exact bound (currently violated); here the bound the planner keeps today.
            assert s <= max(1, next_power_of_2(num_tiles)), ctx
            assert p.grid[2] == s, ctx
            programs = p.grid[0] * p.grid[1] * p.grid[2]
            if num_tiles >= MAX_KV_SPLITS and num_seqs * hkv * MAX_KV_SPLITS >= num_sms:
                assert programs >= num_sms, ctx  # enough tiles: the grid covers the SMs
            if s > 1:
                # splits only while the grid was short of the SMs (about twice over)
                assert num_seqs * hkv * (s // 2) < 2 * num_sms, ctx


def test_split_count_at_most_key_tiles():
    bad = []
    for num_sms in (16, 78, 132, 264):
        for sk in (100, 1000, 5000, 40 * 128, 100_000):
            for n, m in ((2, 4), (4, 8), (4, 4)):
                p = decode(num_seqs=1, num_tokens=1, num_q_heads=8, num_kv_heads=1, max_seqlen_k=sk,
                           num_sms=num_sms, n=n, m=m)
                num_tiles = -(-sk // p.tile_n)
                if p.num_segments > num_tiles:
                    bad.append((num_sms, sk, n, m, p.tile_n, num_tiles, p.num_segments))
    assert not bad, f"(num_sms, max_seqlen_k, n, m, tile_n, key tiles, segments): {bad}"


def test_split_never_exceeds_key_tiles():
    p = decode(num_seqs=1, num_tokens=1, max_seqlen_k=200, num_sms=132)  # 2:4, tile_n 128 -> 2 tiles
    assert p.tile_n == 128 and p.num_segments == 2
    assert decode(num_seqs=1, num_tokens=1, max_seqlen_k=1, num_sms=132).num_segments == 1


# --------------------------------------------------------------------------------------
# Constexprs and the write plan
# --------------------------------------------------------------------------------------

FLAGS = dict(page_size=16, causal=True, use_window=False, use_softcap=True, use_sink=True, use_recent=True,
             sparse_decode=False, store_lse=True)


def test_kernel_constexprs_values():
    p = decode(num_kv_splits=4)
    c = p.kernel_constexprs(**FLAGS)
    assert c["BLOCK_M"] == p.block_m and c["BLOCK_Q"] == p.block_q and c["TILE_N"] == p.tile_n
    assert c["NUM_SEGMENTS"] == 4 and c["GROUP_M"] == 4 and c["N_KEEP"] == 2
    assert c["HEAD_DIM"] == 128 and c["HEAD_DIM_PAD"] == 128 and c["NUM_QUERIES_PER_KV"] == 4
    assert c["PAGE_SIZE"] == 16
    assert c["IS_CAUSAL"] is True and c["USE_WINDOW"] is False and c["USE_SOFTCAP"] is True
    assert c["USE_SINK"] is True and c["USE_RECENT"] is True and c["SPARSE_DECODE"] is False
    assert c["STORE_LSE"] is True and c["DOT_PRECISION"] == "tf32"
    assert (c["num_warps"], c["num_stages"]) == (p.num_warps, p.num_stages)
    # dense: no dense regions, no decode special case (everything is dense anyway)
    d = decode(n=4, m=4).kernel_constexprs(**FLAGS)
    assert d["GROUP_M"] == 1 and d["USE_SINK"] is False and d["USE_RECENT"] is False
    assert d["SPARSE_DECODE"] is True
    r = p.reduce_constexprs(store_lse=False)
    assert r == dict(HEAD_DIM=128, HEAD_DIM_PAD=128, NUM_SEGMENTS=4, STORE_LSE=False, USE_ROW_FIXUP=False,
                     num_warps=r["num_warps"], num_stages=1)
    assert p.reduce_constexprs(store_lse=False, row_fixup=True)["USE_ROW_FIXUP"] is True


def test_plan_write_kv_cache():
    w = plan_write_kv_cache(num_tokens=7, num_kv_heads=3, head_dim=80)
    assert w.grid == (7, 3) and w.head_dim_pad == 128 and w.num_warps >= 1


# --------------------------------------------------------------------------------------
# Kernel parameter order (jax-triton: pointers first, inputs then outputs, constexprs last)
# --------------------------------------------------------------------------------------


def arg_names(kernel) -> list[str]:
    """Parameter names of a JITFunction or (under TRITON_INTERPRET=1) an InterpretedFunction."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        names = list(inspect.signature(kernel.fn).parameters)
    return list(names)


def annotated_constexprs(kernel) -> list[str]:
    params = inspect.signature(kernel.fn).parameters.values()
    return [p.name for p in params if p.annotation is tl.constexpr or p.annotation in ("tl.constexpr", "constexpr")]


def check_order(kernel, pointers: list[str], constexprs: set[str]):
    names = arg_names(kernel)
    assert names == list(inspect.signature(kernel.fn).parameters)
    assert len(names) == len(set(names))
    k = len(pointers)
    assert names[:k] == pointers, names
    assert not any(n.endswith("_ptr") for n in names[k:]), names
    tail = names[len(names) - len(constexprs):]
    assert set(tail) == constexprs, (tail, constexprs)
    assert set(annotated_constexprs(kernel)) == constexprs  # exactly the trailing ones are constexpr
    middle = names[k:len(names) - len(constexprs)]
    return middle


def test_unified_attention_kernel_arg_order():
    p = decode(num_kv_splits=2)
    constexprs = set(p.kernel_constexprs(**FLAGS)) - {"num_warps", "num_stages"}
    pointers = ["q_ptr", "k_cache_ptr", "v_cache_ptr", "block_table_ptr", "cu_seqlens_q_ptr", "seq_lens_ptr",
                "out_ptr", "lse_ptr", "segm_acc_ptr", "segm_max_ptr", "segm_sum_ptr"]
    middle = check_order(unified_attention_kernel, pointers, constexprs)
    assert middle[:5] == ["softmax_scale", "softcap", "window", "dense_sink_tokens", "dense_recent_tokens"]
    assert middle[5] == "num_seqs" and all(n.startswith("stride_") for n in middle[6:])


def test_reduce_segments_kernel_arg_order():
    constexprs = set(decode(num_kv_splits=2).reduce_constexprs(store_lse=True)) - {"num_warps", "num_stages"}
    pointers = ["segm_acc_ptr", "segm_max_ptr", "segm_sum_ptr", "row_keep_ptr", "row_fill_ptr", "out_ptr", "lse_ptr"]
    middle = check_order(reduce_segments_kernel, pointers, constexprs)
    assert middle and all(n.startswith("stride_") for n in middle)


def test_write_kv_cache_kernel_arg_order():
    pointers = ["key_ptr", "value_ptr", "slot_mapping_ptr", "k_cache_in_ptr", "v_cache_in_ptr",
                "k_cache_ptr", "v_cache_ptr"]
    middle = check_order(write_kv_cache_kernel, pointers, {"HEAD_DIM", "HEAD_DIM_PAD"})
    assert arg_names(write_kv_cache_kernel)[-2:] == ["HEAD_DIM", "HEAD_DIM_PAD"]
    assert middle[0] == "block_size"


def test_tuning_overrides_and_restores():
    from sparse24.kernels import planner

    default = plan()
    with planner.tuning(block_m=64, tile_n=32, num_warps=4, num_stages=3):
        p = plan()
        assert (p.block_m, p.block_q, p.tile_n, p.num_warps, p.num_stages) == (64, 16, 32, 4, 3)
        assert p.grid[0] == 512 // 16 + 1
        with planner.tuning(tile_n=128):
            assert plan().tile_n == 128 and plan().block_m == 64
        assert plan().tile_n == 32
    assert plan() == default


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_mm=64), "tuning\\(\\) takes"),
    (dict(block_m=48), "block_m must be a power of two"),
    (dict(block_m=2), "block_m must be a power of two"),  # below the GQA group (4)
    (dict(tile_n=8), "tile_n must be a power of two >= 16"),
    (dict(tile_n=96), "tile_n must be a power of two >= 16"),
])
def test_tuning_rejects_bad_values(kwargs, match):
    from sparse24.kernels import planner

    with pytest.raises(ValueError, match=match):
        with planner.tuning(**kwargs):
            plan()
    assert plan().block_m == 256  # nothing leaked


def test_tuning_tile_for_m8():
    from sparse24.kernels import planner

    with pytest.raises(ValueError, match=">= 32 for M=8"):
        with planner.tuning(tile_n=16):
            plan(n=2, m=8)


@pytest.mark.parametrize("block_m, tile_n, num_warps, m, stride", [
    (256, 64, 16, 4, 8),  # wgmma, warps along the rows
    (128, 128, 8, 8, 8),
    (16, 64, 4, 4, 32),  # decode: 4 warps side by side along the keys -> register bits from 32
    (16, 64, 2, 4, 16),
    (16, 128, 8, 4, 64),
    (16, 64, 8, 4, 32),  # capped: M=4 needs tile_n >= 2 * stride
    (16, 128, 4, 8, 32),
    (16, 64, 4, 8, 16),  # capped: M=8 needs tile_n >= 4 * stride
    (32, 32, 4, 4, 8),  # rows >= keys: warps along the rows
    (16, 64, 4, 1, 8),  # dense: unused, fixed
])
def test_member_stride_rule(block_m, tile_n, num_warps, m, stride):
    from sparse24.kernels.planner import member_stride_for

    got = member_stride_for(block_m=block_m, tile_n=tile_n, num_warps=num_warps, m=m)
    assert got == stride
    assert m == 1 or tile_n >= got * (m // 2)


def test_decode_plan_member_stride_and_tuning():
    from sparse24.kernels import planner

    p = plan(num_tokens=8, num_seqs=8, max_seqlen_q=1)
    assert (p.block_m, p.tile_n, p.num_warps, p.num_stages, p.member_stride) == (16, 128, 4, 2, 32)
    assert p.kernel_constexprs(**FLAGS)["MEMBER_STRIDE"] == 32
    assert plan(n=4, m=4, num_tokens=8, num_seqs=8, max_seqlen_q=1).member_stride == 8
    with planner.tuning(member_stride=16):
        assert plan(num_tokens=8, num_seqs=8, max_seqlen_q=1).member_stride == 16
    assert plan(num_tokens=8, num_seqs=8, max_seqlen_q=1, dtype="float32").tile_n == 64  # fp32 keeps 64
    for bad in (4, 24, 128):  # not a power of two >= 8, or tile_n 128 < 128 * 2
        with pytest.raises(ValueError, match="member_stride"):
            with planner.tuning(member_stride=bad):
                plan(num_tokens=8, num_seqs=8, max_seqlen_q=1)
