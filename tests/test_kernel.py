"""The Triton kernel against the float64 reference, decision for decision.

Runs the real kernel source: in Triton's interpreter on a CPU (``backend="interpret"``,
CI) or compiled on a GPU (``backend="triton"``). Two kinds of check per case:

* output (and LSE) against ``unified_attention_reference`` with a tolerance from the dtype;
* the kept mask itself: with integer-valued q and k (exact scores, exact ties on purpose)
  we read the kernel's decisions through one-hot values -- V row of key j = e_(j mod D),
  one pass per D keys -- so ``out[t, h, j] > 0`` iff the kernel kept key j, and compare
  with ``keep_mask_reference`` exactly.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.reference import keep_mask_reference, unified_attention_reference
from sparse24.testing import EDGE_CASE_BASE, EDGE_CASES, PagedInputs, assert_close_report, kernel_keep_mask, make_paged_inputs
from sparse24.torch_ops import attention, unified_attention, write_kv_cache

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"

# Tolerances from the dtype: fp32 accumulates like the float64 oracle up to rounding;
# bf16/fp16 round q, k, v (exact here for integers), P and the output.
TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2),
}


def _run(inputs: PagedInputs, backend: str, **kwargs):
    return unified_attention(*inputs, backend=backend, **kwargs)


def check_case(
    backend: str,
    device: str,
    *,
    q_lens,
    kv_lens,
    num_q_heads=4,
    num_kv_heads=2,
    head_dim=64,
    block_size=16,
    config="2:4,recent=0",
    causal=True,
    window=None,
    softcap=None,
    num_kv_splits=None,
    dtype=torch.float32,
    decisions=True,
    seed=0,
):
    cfg = SparsityConfig.parse(config)
    inputs = make_paged_inputs(
        q_lens, kv_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, integer=True, int_range=1, seed=seed, device=device,
    )
    kwargs = dict(config=cfg, causal=causal, window=window, softcap=softcap, num_kv_splits=num_kv_splits)
    before = [t.clone() for t in inputs]
    out, lse = _run(inputs, backend, return_lse=True, **kwargs)
    for name, t, b in zip(PagedInputs._fields, inputs, before):
        assert torch.equal(t, b), f"{name} was modified"
    assert out.dtype == dtype and out.shape == inputs.q.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()

    ref_inputs = PagedInputs(*[t.cpu() for t in inputs])
    ref_out, ref_lse = unified_attention_reference(*ref_inputs, return_lse=True, **{k: v for k, v in kwargs.items() if k != "num_kv_splits"})
    assert_close_report(out, ref_out, name="out", **TOLERANCE[dtype])
    assert_close_report(lse, ref_lse, atol=1e-4, rtol=1e-5, name="lse")

    if decisions:
        got = kernel_keep_mask(inputs, backend=backend, **kwargs)
        want = keep_mask_reference(*[t for i, t in enumerate(ref_inputs) if i != 2], **{k: v for k, v in kwargs.items() if k != "num_kv_splits"})
        for b, (g, w) in enumerate(zip(got, want)):
            if not torch.equal(g, w.cpu()):
                h, i, j = (g != w.cpu()).nonzero()[0].tolist()
                raise AssertionError(
                    f"sequence {b}: kept mask differs at head {h}, query {i}, key {j}: "
                    f"kernel {bool(g[h, i, j])}, reference {bool(w[h, i, j])} "
                    f"({int((g != w.cpu()).sum())} differences)"
                )


BASE, GRID = EDGE_CASE_BASE, EDGE_CASES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(GRID), ids=list(GRID))
def test_kernel_matches_reference(kernel_backend, case, dtype):
    backend, device = kernel_backend
    check_case(backend, device, **{**BASE, **GRID[case]}, dtype=dtype)


@pytest.mark.parametrize(
    "case",
    [
        dict(config="2:4,recent=0"),
        dict(config="2:4,sink=4,recent=16", window=100),
        dict(config="4:8,recent=0", num_kv_splits=4),
        dict(config="dense", num_kv_splits=2),
    ],
    ids=["2:4", "2:4-sink-recent-window", "4:8-split", "dense-split"],
)
def test_kernel_long_context(kernel_backend, case):
    """Several key tiles and pages per sequence; decisions through the (integer) outputs."""
    backend, device = kernel_backend
    check_case(
        backend, device, q_lens=(1, 40, 1), kv_lens=(333, 301, 170), block_size=16,
        decisions=False, **case,
    )


@pytest.mark.parametrize(
    "config",
    ["2:4,recent=0", "2:4", "2:4,recent=0,sparse_decode=true", "2:4,recent=0,sparse_decode=false", "1:4,recent=0",
     "2:8,recent=0"],
)
def test_kernel_long_context_decisions(kernel_backend, config):
    """Kept masks with several key tiles per q-block, so the unmasked middle loop (selection
    with no masks at all) runs next to the masked diagonal/recent tiles; integer scores
    make ties exact."""
    backend, device = kernel_backend
    check_case(backend, device, q_lens=(1, 40, 3), kv_lens=(333, 301, 170), block_size=16, config=config)


@pytest.mark.parametrize(
    "tune",
    [dict(block_m=64, tile_n=64), dict(block_m=128, tile_n=64), dict(block_m=128, tile_n=128),
     dict(block_m=32, tile_n=256), dict(tile_n=32, num_warps=2), dict(tile_n=128, member_stride=32),
     dict(block_m=16, tile_n=64, member_stride=16),],
    ids=lambda t: ",".join(f"{k}={v}" for k, v in t.items()),
)
def test_launch_parameters_do_not_change_results(kernel_backend, tune):
    """Tile sizes move the masked/unmasked boundaries and the group order within a tile;
    results must not move (integer inputs: the same decisions, fp32 sums within rounding)."""
    from sparse24.kernels import planner

    backend, device = kernel_backend
    inputs = make_paged_inputs((1, 40, 3), (333, 301, 170), num_q_heads=4, num_kv_heads=2, head_dim=64,
                               block_size=16, integer=True, int_range=1, seed=5, device=device)
    for config, kwargs in (("2:4,recent=0", {}), ("2:4", {}), ("2:4,sink=4,recent=16", dict(window=120)),
                           ("2:8,recent=0", {}), ("dense", {})):
        cfg = SparsityConfig.parse(config)
        if cfg.m == 8 and tune.get("tile_n", 128) < 32:
            continue
        want = unified_attention(*inputs, config=cfg, backend=backend, **kwargs)
        with planner.tuning(**tune):
            got = unified_attention(*inputs, config=cfg, backend=backend, **kwargs)
        assert_close_report(got, want, atol=1e-6, rtol=1e-6, name=f"{config} {tune}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", ["4:8,recent=0", "1:8,sink=4,recent=16"])
def test_kernel_head_dim_256_groups_of_8(kernel_backend, config, dtype):
    """The largest K/V tiles the planner makes (M=8, D=256; 64-key tiles so they fit sm_90's
    shared memory): a prefill chunk, decodes and several key tiles, decisions exact."""
    backend, device = kernel_backend
    check_case(backend, device, q_lens=(1, 70, 1), kv_lens=(200, 130, 65), num_q_heads=4, num_kv_heads=2,
               head_dim=256, config=config, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_largest_gqa_group(kernel_backend, dtype):
    """128 query heads per KV head at head_dim 256: one 128 x 256 tile per program, the
    planner's ceiling (32-key tiles in fp32), prefill rows and a decode, decisions exact."""
    backend, device = kernel_backend
    check_case(backend, device, q_lens=(1, 2), kv_lens=(100, 40), num_q_heads=128, num_kv_heads=1,
               head_dim=256, config="2:8,recent=0", dtype=dtype)


@pytest.mark.parametrize("config", ["2:4,recent=0", "4:8,sink=4,recent=0", "dense"])
def test_ragged_batch_plan_matches_reference(kernel_backend, config):
    """Decodes beside a prefill chunk (a ragged batch) at D=128 in bf16: the planner's 64 x 32
    programs (instead of 256-row ones) keep exactly the reference's keys and match its output."""
    from sparse24.kernels import plan_unified_attention as plan

    q_lens, kv_lens = (70, 1, 1, 1, 1, 1), (90, 40, 33, 17, 64, 1)
    cfg = SparsityConfig.parse(config)
    p = plan(num_tokens=sum(q_lens), num_seqs=len(q_lens), num_q_heads=8, num_kv_heads=2, head_dim=128,
             dtype="bfloat16", n=cfg.n, m=cfg.m, max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens))
    assert (p.block_m, p.tile_n, p.num_warps) == (64, 32, 4)
    backend, device = kernel_backend
    check_case(backend, device, q_lens=q_lens, kv_lens=kv_lens, num_q_heads=8, num_kv_heads=2, head_dim=128,
               config=config, dtype=torch.bfloat16)


def test_kernel_fp16(kernel_backend):
    backend, device = kernel_backend
    check_case(backend, device, **BASE, dtype=torch.float16, decisions=False)


def test_kernel_ties_exact(kernel_backend):
    """All keys equal: every group keeps exactly its first N keys (lower index wins)."""
    backend, device = kernel_backend
    inputs = make_paged_inputs((5, 1), (22, 13), num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=16, device=device)
    inputs = inputs._replace(
        q=torch.ones_like(inputs.q), k_cache=torch.ones_like(inputs.k_cache)
    )
    for config, kept_in_group in (("2:4,recent=0", [1, 1, 0, 0]), ("3:8,recent=0", [1, 1, 1, 0, 0, 0, 0, 0])):
        cfg = SparsityConfig.parse(config)
        masks = kernel_keep_mask(inputs, backend=backend, config=cfg)
        for b, mask in enumerate(masks):
            kv_len = mask.shape[-1]
            q_len = mask.shape[1]
            for i in range(q_len):
                p = kv_len - q_len + i
                expected = torch.tensor([bool(kept_in_group[j % cfg.m]) for j in range(kv_len)])
                expected[p + 1 :] = False
                assert torch.equal(mask[0, i], expected), (config, b, i)


def test_split_count_does_not_change_results(kernel_backend):
    backend, device = kernel_backend
    inputs = make_paged_inputs((1, 1, 3), (200, 77, 130), num_q_heads=4, num_kv_heads=1, head_dim=64,
                               block_size=16, integer=True, int_range=1, seed=3, device=device)
    outs = [unified_attention(*inputs, num_kv_splits=s, backend=backend) for s in (1, 2, 4, 16)]
    for s, o in zip((2, 4, 16), outs[1:]):
        assert_close_report(o, outs[0], atol=1e-6, rtol=1e-6, name=f"splits={s} vs 1")


@pytest.mark.parametrize("splits", [1, 4])
def test_row_fixup_writes_the_fill_over_dropped_rows_only(kernel_backend, splits):
    """A plan's ``row_fixup`` (``sparse24.hf``'s decode fix-up): rows whose keep is False come
    out as their fill (NaN or 0) in every element, the other rows as without it; with a split
    the reduce launch writes it (``USE_ROW_FIXUP``), without one a ``where`` after the kernel."""
    from sparse24.torch_ops import plan_unified_attention

    backend, device = kernel_backend
    inputs = make_paged_inputs((1, 1, 1, 1), (40, 77, 1, 130), num_q_heads=4, num_kv_heads=2, head_dim=32,
                               block_size=16, seed=5, device=device)
    plan = plan_unified_attention(*inputs, max_seqlen_q=1, max_seqlen_k=130, num_kv_splits=splits, backend=backend)
    plain = plan(*inputs)
    keep = torch.tensor([True, False, True, False], device=device)
    fill = torch.tensor([0.0, float("nan"), 5.0, 0.0], device=device)
    fixed = plan(*inputs, row_fixup=(keep, fill))
    assert torch.equal(fixed[keep], plain[keep])
    assert torch.isnan(fixed[1]).all() and torch.equal(fixed[3], torch.zeros_like(fixed[3]))
    assert not torch.isnan(plain).any()
    reference = plan_unified_attention(*inputs, max_seqlen_q=1, max_seqlen_k=130, backend="reference")
    torch.testing.assert_close(fixed, reference(*inputs, row_fixup=(keep, fill)), atol=1e-5, rtol=1e-5,
                               equal_nan=True)


def test_golden_cases_kernel(kernel_backend):
    """The 40 independent float64 cases of the spec (../shared/golden) through the kernel."""
    backend, device = kernel_backend
    cases = json.loads((GOLDEN / "nm_attention_cases.json").read_text())
    data = np.load(GOLDEN / "nm_attention_cases.npz")
    for case in cases:
        i = case["case"]
        arrays = [torch.from_numpy(data[f"case{i}_{name}"]).to(device) for name in PagedInputs._fields]
        cfg = SparsityConfig(
            n=case["n"], m=case["m"], dense_sink_tokens=case["sink"], dense_recent_tokens=case["recent"],
            sparse_decode=case["sparse_decode"],
        )
        out = unified_attention(
            *arrays, config=cfg, causal=case["causal"], window=case["window"], softcap=case["softcap"], backend=backend
        )
        assert_close_report(out, torch.from_numpy(data[f"case{i}_out"]), atol=1e-5, rtol=1e-5, name=f"golden case {i}")


def test_no_nan_when_segments_or_tiles_are_empty(kernel_backend):
    """Empty split-KV segments and key tiles that are fully masked for some rows."""
    backend, device = kernel_backend
    inputs = make_paged_inputs((1, 2), (3, 150), num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=16, device=device)
    for kwargs in (dict(num_kv_splits=16), dict(window=2), dict(window=1, num_kv_splits=4)):
        out, lse = unified_attention(*inputs, return_lse=True, backend=backend, **kwargs)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), kwargs
        ref = unified_attention_reference(*[t.cpu() for t in inputs], window=kwargs.get("window"))
        assert_close_report(out, ref, name=str(kwargs), **TOLERANCE[torch.float32])


def test_non_contiguous_inputs_and_out_buffer(kernel_backend):
    backend, device = kernel_backend
    base = make_paged_inputs((6, 1), (40, 19), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                             integer=True, int_range=1, device=device)
    # Caches as views into wider buffers, q with heads interleaved, out as a strided view.
    wide_k = torch.zeros(*base.k_cache.shape[:-1], 96, device=device)
    wide_v = torch.zeros_like(wide_k)
    wide_k[..., 16:80] = base.k_cache
    wide_v[..., 16:80] = base.v_cache
    q_t = base.q.transpose(0, 1).contiguous().transpose(0, 1)
    out_buf = torch.full((base.q.shape[0], base.q.shape[1], 128), 7.0, device=device)
    out_view = out_buf[..., :64]
    inputs = base._replace(q=q_t, k_cache=wide_k[..., 16:80], v_cache=wide_v[..., 16:80])
    result = unified_attention(*inputs, out=out_view, backend=backend)
    assert result.data_ptr() == out_view.data_ptr()
    assert (out_buf[..., 64:] == 7.0).all()
    ref = unified_attention_reference(*[t.cpu() for t in base])
    assert_close_report(out_view, ref, name="strided", **TOLERANCE[torch.float32])


@pytest.mark.parametrize("seq_lens", [None, [5, 3]])
@pytest.mark.parametrize("seqlen_q", [5, 1])
def test_padded_attention_matches_reference(kernel_backend, seq_lens, seqlen_q):
    backend, device = kernel_backend
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (2, seqlen_q, 4, 64), generator=gen).float().to(device)
    k = torch.randint(-1, 2, (2, 5, 2, 64), generator=gen).float().to(device)
    v = torch.randn(2, 5, 2, 64, generator=gen).to(device)
    lens = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32, device=device)
    cfg = SparsityConfig(dense_recent_tokens=0)
    out = attention(q, k, v, config=cfg, seq_lens=lens, backend=backend)
    for b in range(2):
        kv_len = 5 if seq_lens is None else seq_lens[b]
        q_len = min(seqlen_q, kv_len)
        ref = unified_attention_reference(
            q[b, :q_len].cpu(), k[b : b + 1, :kv_len].cpu(), v[b : b + 1, :kv_len].cpu(),
            torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, q_len], dtype=torch.int32),
            torch.tensor([kv_len], dtype=torch.int32), config=cfg,
        )
        assert_close_report(out[b, :q_len], ref, name=f"row {b}", **TOLERANCE[torch.float32])
        assert (out[b, q_len:] == 0).all()


def test_write_kv_cache(kernel_backend):
    backend, device = kernel_backend
    gen = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(5, 2, 80, generator=gen).to(dtype).to(device)
        v = torch.randn(5, 2, 80, generator=gen).to(dtype).to(device)
        k_cache = torch.zeros(3, 4, 2, 80, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.tensor([0, 5, -1, 11, 6], dtype=torch.int32, device=device)
        write_kv_cache(k, v, k_cache, v_cache, slots, backend=backend)
        expect_k = torch.zeros_like(k_cache)
        expect_v = torch.zeros_like(v_cache)
        write_kv_cache(k, v, expect_k, expect_v, slots, backend="reference")
        assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)
        assert torch.equal(k_cache[1, 1], k[1]) and torch.equal(v_cache[2, 3], v[3])
        assert k_cache.abs().sum(dim=(-1, -2)).count_nonzero() == 4  # the -1 slot was skipped


def test_prefill_then_decode_select_the_same_keys(kernel_backend):
    """Token-by-token decode of a prompt keeps what one prefill of it keeps."""
    backend, device = kernel_backend
    total, prompt = 45, 40
    inputs = make_paged_inputs((total,), (total,), num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=16,
                               integer=True, int_range=1, device=device)
    cfg = SparsityConfig(dense_recent_tokens=0)
    full = unified_attention(*inputs, config=cfg, backend=backend)
    for t in range(prompt, total):
        step = inputs._replace(
            q=inputs.q[t : t + 1],
            cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([t + 1], dtype=torch.int32, device=device),
        )
        out = unified_attention(*step, config=cfg, backend=backend)
        assert_close_report(out, full[t : t + 1], atol=1e-6, rtol=1e-6, name=f"decode step {t}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_large(dtype):
    """GPU only: head dim 128, a 16k context, GQA 32/8, mixed batch, against the chunked float64 reference."""
    from sparse24.reference import unified_attention_chunked

    inputs = make_paged_inputs((1, 300, 1, 1), (16384, 2000, 4097, 129), num_q_heads=32, num_kv_heads=8,
                               head_dim=128, block_size=16, dtype=dtype, integer=True,
                               int_range=1, device="cuda")
    for config in ("2:4", "2:4,recent=0", "dense", "4:8,sink=4,recent=64"):
        cfg = SparsityConfig.parse(config)
        out = unified_attention(*inputs, config=cfg, backend="triton")
        ref = unified_attention_chunked(*inputs, config=cfg, compute_dtype=torch.float64)
        assert_close_report(out, ref, name=f"{config} {dtype}", **TOLERANCE[dtype])


def test_scale_is_used(kernel_backend):
    backend, device = kernel_backend
    inputs = make_paged_inputs((3,), (20,), num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=16, device=device)
    out = unified_attention(*inputs, softmax_scale=0.3, backend=backend)
    ref = unified_attention_reference(*[t.cpu() for t in inputs], softmax_scale=0.3)
    assert_close_report(out, ref, name="scale 0.3", **TOLERANCE[torch.float32])
    assert not math.isclose(float((out.cpu() - unified_attention_reference(*[t.cpu() for t in inputs])).abs().max()), 0.0)


def test_torch_compile_fullgraph_matches_eager(kernel_backend):
    """The op traces without graph breaks; on the GPU through Inductor, on the CPU (opaque op
    around the interpreted kernel) through aot_eager."""
    backend, device = kernel_backend
    inputs = make_paged_inputs((1, 37, 1), (300, 37, 65), num_q_heads=8, num_kv_heads=2, head_dim=64,
                               block_size=16, dtype=torch.bfloat16, device=device)

    def step(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        out = unified_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                                max_seqlen_q=37, max_seqlen_k=300, backend=backend)
        return out * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    assert torch.equal(compiled(*inputs), step(*inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("config", ["4:8,recent=0", "2:8,sink=4,recent=0", "2:4,recent=0"])
def test_gpu_prefill_tiles_keep_the_reference_decisions(config, head_dim):
    """GPU only: the compiled prefill plans of bf16 (256 rows x 64 keys at D=128, and for M=8
    at D=64; 128 x 128 for 2:4 at D=64) keep exactly the keys of the float64 reference, on
    integer scores (ties on purpose), with GQA 32/8 and a chunk over a longer context."""
    inputs = make_paged_inputs((300, 1), (700, 77), num_q_heads=32, num_kv_heads=8, head_dim=head_dim,
                               block_size=16, dtype=torch.bfloat16, integer=True, int_range=1, seed=11, device="cuda")
    cfg = SparsityConfig.parse(config)
    from sparse24.kernels import plan_unified_attention as plan

    p = plan(num_tokens=301, num_seqs=2, num_q_heads=32, num_kv_heads=8, head_dim=head_dim, dtype="bfloat16",
             n=cfg.n, m=cfg.m, max_seqlen_q=300, max_seqlen_k=700)
    assert (p.block_m, p.tile_n) == ((256, 64) if head_dim == 128 or cfg.m == 8 else (128, 128))
    got = kernel_keep_mask(inputs, config=cfg, backend="triton")
    ref_inputs = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]
    want = keep_mask_reference(*[t for i, t in enumerate(ref_inputs) if i != 2], config=cfg)
    for b, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w.cpu()), (config, b, int((g != w.cpu()).sum()))


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """Pages past 2**31 elements of the cache: offsets must be computed in int64."""
    num_kv_heads, head_dim, block_size = 8, 128, 16
    elems_per_page = block_size * num_kv_heads * head_dim
    num_blocks = 2**31 // elems_per_page + 8
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.zeros_like(k_cache)
    small = make_paged_inputs((5, 1), (64, 40), num_q_heads=16, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              block_size=block_size, dtype=torch.bfloat16, integer=True, int_range=1, device="cuda")
    last = num_blocks - small.k_cache.shape[0]  # put the small cache's pages at the very end
    k_cache[last:] = small.k_cache
    v_cache[last:] = small.v_cache
    big = small._replace(k_cache=k_cache, v_cache=v_cache, block_table=small.block_table + last)
    out = unified_attention(*big, backend="triton")
    ref = unified_attention_reference(*[t.cpu() for t in small])
    assert_close_report(out, ref, name="int64 offsets", **TOLERANCE[torch.bfloat16])
