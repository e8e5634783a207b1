"""The Triton kernel through the JAX door, on the shared edge grid, decision for decision.

The same grid (``sparse24.testing.EDGE_CASES``) and the same two checks as the torch kernel
suite (tests/test_kernel.py): output and LSE against the float64 oracle with a tolerance from
the dtype, and the kept mask itself, read through one-hot values, against
``keep_mask_reference`` exactly. On a CPU the kernel runs in Triton's interpreter behind the
JAX callback; on a GPU through jax-triton.
"""

from __future__ import annotations

import pytest
import torch

jax = pytest.importorskip("jax")

from sparse24 import SparsityConfig  # noqa: E402
from sparse24.reference import keep_mask_reference, unified_attention_reference  # noqa: E402
from sparse24.testing import (  # noqa: E402
    EDGE_CASE_BASE,
    EDGE_CASES,
    TOLERANCE,
    assert_close_report,
    jax_unified_attention,
    kernel_keep_mask,
    make_paged_inputs,
)


def check_jax_case(backend, *, q_lens, kv_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                   config="2:4,recent=0", causal=True, window=None, softcap=None, num_kv_splits=None,
                   dtype=torch.float32):
    cfg = SparsityConfig.parse(config)
    inputs = make_paged_inputs(q_lens, kv_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, block_size=block_size, dtype=dtype, integer=True, int_range=1)
    options = dict(config=cfg, causal=causal, window=window, softcap=softcap)
    out, lse = jax_unified_attention(*inputs, num_kv_splits=num_kv_splits, return_lse=True, backend=backend,
                                     **options)
    ref, ref_lse = unified_attention_reference(*inputs, return_lse=True, **options)
    assert_close_report(out, ref, name="out", **TOLERANCE[str(dtype).rsplit(".", 1)[-1]])
    assert_close_report(lse, ref_lse, atol=1e-4, rtol=1e-5, name="lse")

    got = kernel_keep_mask(inputs, op=jax_unified_attention, num_kv_splits=num_kv_splits, backend=backend, **options)
    want = keep_mask_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens,
                               **options)
    for b, (g, w) in enumerate(zip(got, want)):
        if not torch.equal(g, w):
            h, i, j = (g != w).nonzero()[0].tolist()
            raise AssertionError(f"sequence {b}: kept mask differs at head {h}, query {i}, key {j}: JAX kernel "
                                 f"{bool(g[h, i, j])}, reference {bool(w[h, i, j])} ({int((g != w).sum())} differences)")


@pytest.mark.parametrize("case", list(EDGE_CASES), ids=list(EDGE_CASES))
def test_jax_kernel_edge_grid(jax_backend, case):
    check_jax_case(jax_backend, **{**EDGE_CASE_BASE, **EDGE_CASES[case]})


@pytest.mark.parametrize("case", ["mixed", "split-2", "sink-recent"])
def test_jax_kernel_edge_grid_bf16(jax_backend, case):
    check_jax_case(jax_backend, **{**EDGE_CASE_BASE, **EDGE_CASES[case]}, dtype=torch.bfloat16)


def test_decision_check_can_fail(jax_backend):
    """The probe sees a wrong decision: 2:4 kept masks differ from 3:4's."""
    inputs = make_paged_inputs((5,), (9,), num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=16,
                               integer=True, int_range=1)
    got = kernel_keep_mask(inputs, op=jax_unified_attention, config=SparsityConfig.parse("3:4,recent=0"),
                           backend=jax_backend)
    want = keep_mask_reference(inputs.q, inputs.k_cache, inputs.block_table, inputs.cu_seqlens_q, inputs.seq_lens,
                               config=SparsityConfig.parse("2:4,recent=0"))
    assert not torch.equal(got[0], want[0])
