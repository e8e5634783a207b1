"""GPU only: a decode step under CUDA-graph capture, and random mixed batches under load.

These need compiled kernels on a CUDA device; on the CPU they skip with the reason (see
conftest.py). ``tests/gpu_sanitize_case.py`` is the small batch run under
``compute-sanitizer`` (benchmarks/NOTES.md says when it last ran and where).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.reference import unified_attention_reference
from sparse24.testing import assert_close_report, make_paged_inputs
from sparse24.torch_ops import unified_attention, write_kv_cache

pytestmark = pytest.mark.gpu

TOL_BF16 = dict(atol=2.5e-2, rtol=2.5e-2)


@pytest.mark.parametrize("config", ["dense", "2:4,recent=0,sparse_decode=true"])
def test_gpu_cuda_graph_decode_step(config):
    """write_kv_cache + unified_attention captured once, replayed with new lengths, block
    tables, slots and values; every replay equals the same step run eagerly."""
    cfg = SparsityConfig.parse(config)
    batch, hq, hkv, d, page, max_pages = 6, 16, 4, 128, 16, 40
    max_k = page * max_pages
    dev, dt = "cuda", torch.bfloat16
    num_blocks = batch * max_pages + 5
    k_cache = torch.randn(num_blocks, page, hkv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    q = torch.zeros(batch, hq, d, device=dev, dtype=dt)
    k_new = torch.zeros(batch, hkv, d, device=dev, dtype=dt)
    v_new = torch.zeros_like(k_new)
    block_table = torch.zeros(batch, max_pages, dtype=torch.int32, device=dev)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    seq_lens = torch.ones(batch, dtype=torch.int32, device=dev)
    slots = torch.zeros(batch, dtype=torch.int64, device=dev)
    out = torch.empty_like(q)

    def step():
        write_kv_cache(k_new, v_new, k_cache, v_cache, slots, backend="triton")
        unified_attention(q, k_cache, v_cache, block_table, cu, seq_lens, config=cfg, out=out, max_seqlen_q=1,
                          max_seqlen_k=max_k, backend="triton")

    def fill(seed):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, max_k + 1, (batch,), generator=g)
        perm = torch.randperm(num_blocks, generator=g)[: batch * max_pages].view(batch, max_pages)
        block_table.copy_(perm.to(torch.int32))
        seq_lens.copy_(lens.to(torch.int32))
        last = lens - 1
        slots.copy_(perm.gather(1, (last // page).view(-1, 1)).view(-1) * page + last % page)
        q.copy_(torch.randn(q.shape, generator=g).to(dt))
        k_new.copy_(torch.randn(k_new.shape, generator=g).to(dt))
        v_new.copy_(torch.randn(v_new.shape, generator=g).to(dt))

    fill(0)
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (1, 2, 3):
        fill(seed)
        graph.replay()
        got = out.clone()
        step()  # eager, same inputs (the cache write is idempotent)
        assert torch.equal(got, out), f"replay {seed} differs from eager"
        ref = unified_attention_reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), block_table.cpu(), cu.cpu(),
                                          seq_lens.cpu(), config=cfg)
        assert_close_report(got, ref, name=f"replay {seed} vs reference", **TOL_BF16)


# A few specializations only (each is a compile): the randomness is in the batches.
CONFIGS = ["dense", "2:4", "4:8,sink=4,recent=32,sparse_decode=true"]
HEADS = [(8, 2, 128), (4, 4, 64)]
MAX_LEN = 700


def test_gpu_random_mixed_batches():
    """1,000 random mixed batches (lengths, pages, GQA, configs, windows): every output
    finite; every 25th batch against the float64 reference."""
    rng = random.Random(0)
    checked = 0
    for i in range(1000):
        num_seqs = rng.randint(1, 6)
        q_lens, kv_lens = [], []
        for _ in range(num_seqs):
            kv = rng.randint(1, MAX_LEN)
            q_lens.append(1 if rng.random() < 0.5 else rng.randint(1, kv))
            kv_lens.append(kv)
        hq, hkv, d = rng.choice(HEADS)
        config = SparsityConfig.parse(rng.choice(CONFIGS))
        window = rng.choice([None, None, None, rng.randint(1, 300)])
        inputs = make_paged_inputs(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=d,
                                   block_size=16, dtype=torch.bfloat16, integer=True, int_range=1,
                                   seed=i, device="cuda")
        out = unified_attention(*inputs, config=config, window=window, max_seqlen_q=MAX_LEN, max_seqlen_k=MAX_LEN,
                                backend="triton")
        assert torch.isfinite(out).all(), (i, q_lens, kv_lens, config, window)
        if i % 25 == 0:
            ref = unified_attention_reference(*[t.cpu() for t in inputs], config=config, window=window)
            assert_close_report(out, ref, name=f"batch {i} {config} window={window}", **TOL_BF16)
            checked += 1
    torch.cuda.synchronize()
    assert checked == 40 and not math.isnan(float(out.float().sum()))


@pytest.mark.parametrize("config", ["dense", "2:4,recent=0,sparse_decode=true"])
def test_gpu_fast_launch_equals_the_jit_launch(config):
    """Direct launches through the kept compiled kernel are bit-identical to launches through
    ``JITFunction.run``, for aligned and misaligned (a 16-byte-unaligned q, a new key)
    arrays, and for int32 / int64 slot mappings of write_kv_cache."""
    from sparse24.torch_ops import _launch

    cfg = SparsityConfig.parse(config)
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    batch, hq, hkv, d, page, pages = 5, 8, 2, 64, 16, 9
    k_cache = torch.randn(batch * pages, page, hkv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    block_table = torch.arange(batch * pages, dtype=torch.int32, device=dev).view(batch, pages)
    seq_lens = torch.tensor([1, 17, 64, 100, 144], dtype=torch.int32, device=dev)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    flat = torch.randn(batch * hq * d + 1, device=dev, dtype=dt)
    aligned = flat[: batch * hq * d].view(batch, hq, d)
    misaligned = flat[1:].view(batch, hq, d)  # data_ptr 2 bytes past a 16-byte boundary
    assert misaligned.data_ptr() % 16 != 0

    def run(q, fast):
        _launch.FAST_LAUNCH = fast
        try:
            return [unified_attention(q, k_cache, v_cache, block_table, cu, seq_lens, config=cfg,
                                      max_seqlen_q=1, max_seqlen_k=int(page * pages), backend="triton")
                    for _ in range(2)]  # the second call of a key runs the kept kernel
        finally:
            _launch.FAST_LAUNCH = True

    for q in (aligned, misaligned, aligned):
        want, fast = run(q, False)[0], run(q, True)
        for got in fast:
            assert torch.equal(got, want)
    for slot_dtype in (torch.int32, torch.int64):
        slots = torch.tensor([3, -1, 70, 200, 5], dtype=slot_dtype, device=dev)
        k_new = torch.randn(batch, hkv, d, device=dev, dtype=dt)
        v_new = torch.randn_like(k_new)
        results = []
        for fast in (False, True, True):
            _launch.FAST_LAUNCH = fast
            try:
                kc, vc = k_cache.clone(), v_cache.clone()
                write_kv_cache(k_new, v_new, kc, vc, slots, backend="triton")
                results.append((kc, vc))
            finally:
                _launch.FAST_LAUNCH = True
        for kc, vc in results[1:]:
            assert torch.equal(kc, results[0][0]) and torch.equal(vc, results[0][1])
