"""Kept softmax mass and kept keys from the kernel (``return_stats=True``, issue 17 part 1),
torch and JAX, against the float64 reference ``sparse24.reference.kept_stats_reference``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.reference import KeptStats, kept_stats_reference, unified_attention_reference
from sparse24.testing import make_paged_inputs
from sparse24.torch_ops import unified_attention

# (q_lens, kv_lens, H_q, H_kv, block_size, config, options): odd lengths, page boundaries,
# GQA, prefill + decode mixed, every dense region and option
CASES = {
    "2:4 mixed": ([5, 1, 3], [9, 20, 33], 4, 2, 8, "2:4,recent=0", {}),
    "2:4 sink recent": ([7, 1], [7, 40], 4, 1, 16, "2:4,sink=2,recent=5", {}),
    "4:8 window softcap": ([6, 2], [30, 17], 2, 2, 8, "4:8,recent=0", dict(window=11, softcap=2.0)),
    "1:4 non-causal": ([4, 3], [12, 9], 4, 4, 4, "1:4,recent=0", dict(causal=False)),
    "dense decode rows": ([1, 1, 4], [13, 40, 8], 4, 2, 8, "2:4,recent=0,sparse_decode=false", {}),
    "dense": ([3, 1], [10, 25], 4, 2, 8, "dense", {}),
}


def _inputs(case, dtype, device, integer=False, seed=0):
    q_lens, kv_lens, hq, hkv, bs, config, options = CASES[case]
    inputs = make_paged_inputs(q_lens, kv_lens, num_q_heads=hq, num_kv_heads=hkv, head_dim=16, block_size=bs,
                               dtype=dtype, integer=integer, seed=seed, device=device)
    return inputs, SparsityConfig.parse(config), options


def _reference(inputs, config, options) -> KeptStats:
    return kept_stats_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cu_seqlens_q,
                                inputs.seq_lens, config=config, **options)


def _check(stats, ref: KeptStats, *, mass_atol: float, lse_atol: float):
    got = [t.double().cpu() if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t)).double() for t in stats]
    assert torch.equal(got[1], ref.kept_keys), "kept key counts differ"
    torch.testing.assert_close(got[0], ref.kept_mass, atol=mass_atol, rtol=0, equal_nan=True)
    torch.testing.assert_close(got[2], ref.lse, atol=lse_atol, rtol=lse_atol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_torch_kernel_stats_match_the_reference(kernel_backend, case, dtype):
    """Integer-valued q/k (exact scores, ties on purpose): the kept counts are exact in every
    dtype; the mass to fp32 rounding; the output is the default launch's, bit for bit."""
    backend, device = kernel_backend
    inputs, config, options = _inputs(case, dtype, device, integer=True)
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens)
    out, stats = unified_attention(*args, config=config, return_stats=True, backend=backend, **options)
    assert isinstance(stats, KeptStats) and all(t.dtype == torch.float32 for t in stats)
    _check(stats, _reference(inputs, config, options), mass_atol=2e-6, lse_atol=2e-5)
    plain = unified_attention(*args, config=config, backend=backend, num_kv_splits=1, **options)
    assert torch.equal(out, plain)


def test_dense_rows_keep_all_the_mass_exactly(kernel_backend):
    """Where every visible key is kept (dense config, dense decode rows) the mass is exactly 1
    and the count is the visible count."""
    backend, device = kernel_backend
    for case in ("dense", "dense decode rows"):
        inputs, config, options = _inputs(case, torch.float32, device)
        _, stats = unified_attention(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table,
                                     inputs.cu_seqlens_q, inputs.seq_lens, config=config, return_stats=True,
                                     backend=backend, **options)
        cu = inputs.cu_seqlens_q.tolist()
        dense_rows = slice(0, cu[-1]) if case == "dense" else slice(0, cu[2])  # the two decode rows
        assert (stats.kept_mass[dense_rows] == 1.0).all(), case
    sparse, config, _ = _inputs("2:4 mixed", torch.float32, device)
    _, stats = unified_attention(sparse.q, sparse.k_cache, sparse.v_cache, sparse.block_table, sparse.cu_seqlens_q,
                                 sparse.seq_lens, config=config, return_stats=True, backend=backend)
    assert (stats.kept_mass < 1.0).any() and (stats.kept_mass > 0.0).all()  # 2:4 loses some, never all


def test_reference_stats_agree_with_the_reference_lse():
    """The float64 reference's kept-key LSE is the attention reference's LSE, and the mass is
    exp(lse_kept - lse_visible) with lse_visible from the dense config."""
    inputs, config, options = _inputs("2:4 sink recent", torch.float32, "cpu")
    ref = _reference(inputs, config, options)
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens)
    _, lse = unified_attention_reference(*args, config=config, return_lse=True, **options)
    _, lse_dense = unified_attention_reference(*args, config=SparsityConfig.dense(), return_lse=True, **options)
    torch.testing.assert_close(ref.lse, lse)
    torch.testing.assert_close(ref.kept_mass, torch.exp(lse - lse_dense))
    dense = _reference(inputs, SparsityConfig.dense(), options)
    assert (dense.kept_mass == 1.0).all()
    assert math.isclose(float(dense.kept_keys.sum()), float(sum(
        sum(min(i + kv - q + 1, kv) for i in range(q))
        for q, kv in zip(CASES["2:4 sink recent"][0], CASES["2:4 sink recent"][1]))) * 4)


def test_torch_reference_backend_stats(kernel_backend):
    inputs, config, options = _inputs("4:8 window softcap", torch.float32, "cpu")
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens)
    _, stats = unified_attention(*args, config=config, return_stats=True, backend="reference", **options)
    _check(stats, _reference(inputs, config, options), mass_atol=1e-6, lse_atol=1e-5)


def test_stats_refuse_a_split():
    inputs, config, _ = _inputs("dense", torch.float32, "cpu")
    args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens)
    with pytest.raises(ValueError, match="return_stats=True needs num_kv_splits None or 1"):
        unified_attention(*args, return_stats=True, num_kv_splits=4, backend="reference")
    with pytest.raises(TypeError, match="return_stats must be a bool"):
        unified_attention(*args, return_stats="yes", backend="reference")


@pytest.mark.parametrize("case", ["2:4 mixed", "4:8 window softcap", "dense decode rows"])
def test_jax_stats_match_the_reference(jax_backend, case):
    """JAX: the kernel (jax-triton or the interpreter callback, the same launch description)
    and the jax.numpy reference backend, eager and under jit."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from sparse24.jax_ops import unified_attention as jax_unified

    inputs, config, options = _inputs(case, torch.float32, "cpu", integer=True)
    ref = _reference(inputs, config, options)
    arrays = tuple(jnp.asarray(t.numpy()) for t in (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table,
                                                     inputs.cu_seqlens_q, inputs.seq_lens))
    for backend in (jax_backend, "reference"):
        _, stats = jax_unified(*arrays, config=config, return_stats=True, backend=backend, **options)
        _check(stats, ref, mass_atol=2e-6, lse_atol=2e-5)
    jitted = jax.jit(lambda *a: jax_unified(*a, config=config, return_stats=True, backend=jax_backend,
                                            max_seqlen_q=max(CASES[case][0]), max_seqlen_k=max(CASES[case][1]),
                                            **options))
    _check(jitted(*arrays)[1], ref, mass_atol=2e-6, lse_atol=2e-5)
