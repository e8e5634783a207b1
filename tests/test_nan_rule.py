"""One NaN rule for every backend and both frameworks (docs/SPEC.md §2, "NaN").

The rule: a NaN score of a *visible* key (a NaN in the query row, or in a visible key's k)
makes that row's whole output and its LSE NaN, whatever the N:M selection; invisible keys
(past kv_len, causally masked, outside the window) never poison a row, and keys at or past
kv_len are never read (k or v). A NaN in v of a key the row keeps makes the row's output NaN
in the features it feeds. Rows the NaN does not reach are what they are without the NaN.

Checked on one small batch (a 3-token chunked prefill after 9 cached keys, and a decode step
with 9 keys; GQA 4/2; pages of 8 keys) against: the torch float64 oracle, the torch chunked
reference, the torch op's reference backend and the kernel, the JAX reference, and the JAX
op's reference backend and the kernel. The expected rows come from the positions alone
(written here, not taken from the library).

The kernel ranks scores by plain comparisons (``s_a >= s_b`` is False both ways for a NaN),
so its selection may drop a NaN key; it then fills the dropped score with ``score - inf``
(NaN stays NaN), which is what makes it follow the rule ("k_sparse_first_member" and
"q_row_window" are the cases a plain ``-inf`` fill got wrong). The kernel kinds run the
interpreter on the CPU and the compiled kernel on a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.backends import kernels_interpreted
from sparse24.reference import unified_attention_chunked, unified_attention_reference
from sparse24.torch_ops import attention as torch_padded_attention
from sparse24.torch_ops import unified_attention as torch_unified_attention

H_Q, H_KV, D, PAGE = 4, 2, 16, 8
Q_LENS, KV_LENS = (3, 1), (12, 9)  # sequence 0: positions 9..11; sequence 1: decode at position 8
CU = (0, 3, 4)
SPARSE = SparsityConfig.parse("2:4,recent=0")  # nothing dense: every key goes through the selection
RECENT = SparsityConfig.parse("2:4,recent=4")
DENSE = SparsityConfig.dense()


def _visible(b: int, i: int, j: int, causal: bool, window) -> bool:
    kv_len = KV_LENS[b]
    p = kv_len - Q_LENS[b] + i
    return j < kv_len and (not causal or j <= p) and (window is None or p - j < window)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(Q_LENS), H_Q, D, generator=g)
    k_cache = torch.randn(4, PAGE, H_KV, D, generator=g)
    v_cache = torch.randn(4, PAGE, H_KV, D, generator=g)
    block_table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    return q, k_cache, v_cache, block_table


def _slot(b: int, j: int) -> tuple[int, int]:
    return 2 * b + j // PAGE, j % PAGE


# name -> (config, causal, window, where, b, index, head): the NaN goes to q[CU[b] + index, head]
# ("q"), or to k / v of key `index` of sequence b, KV head `head` ("k" / "v").
CASES = {
    "q_row": (SPARSE, True, None, "q", 0, 1, 2),
    "q_row_decode": (SPARSE, True, None, "q", 1, 0, 1),
    "q_row_window": (SPARSE, True, 2, "q", 0, 0, 0),  # row p=9 sees keys 8, 9 only
    "q_row_dense": (DENSE, True, None, "q", 0, 1, 2),
    "k_dense_region": (RECENT, True, None, "k", 0, 9, 0),  # recent keys of rows 9..11
    "k_sparse_last_member": (SPARSE, True, None, "k", 0, 7, 1),  # 4g+3: the kernel keeps it
    "k_sparse_first_member": (SPARSE, True, None, "k", 0, 4, 1),  # 4g+0: the kernel drops it
    "k_dense_config": (DENSE, True, None, "k", 0, 4, 1),
    "k_causally_masked": (RECENT, True, None, "k", 0, 10, 0),  # row 0 (p=9) cannot see key 10
    "k_past_kv_len": (SPARSE, True, None, "k", 1, 11, 0),  # sequence 1 has 9 keys
    "k_outside_window": (DENSE, True, 3, "k", 0, 7, 0),  # window 3: only row p=9 sees key 7
    "k_noncausal_visible": (SPARSE, False, None, "k", 0, 11, 1),
    "v_kept_key": (RECENT, True, None, "v", 0, 9, 1),
    "v_past_kv_len": (SPARSE, True, None, "v", 1, 12, 1),
}



def _case(name):
    config, causal, window, where, b, index, head = CASES[name]
    q, k_cache, v_cache, block_table = _inputs()
    clean = (q.clone(), k_cache.clone(), v_cache.clone(), block_table)
    expected = torch.zeros(sum(Q_LENS), H_Q, dtype=torch.bool)
    group = H_Q // H_KV
    if where == "q":
        q[CU[b] + index, head, 3] = math.nan
        expected[CU[b] + index, head] = any(_visible(b, index, j, causal, window) for j in range(KV_LENS[b]))
    else:
        cache = k_cache if where == "k" else v_cache
        cache[_slot(b, index)][head, 5] = math.nan
        for i in range(Q_LENS[b]):
            # k: every row that sees the key; v: every row that keeps it (the cases put v's NaN
            # on a key that is dense for every row that sees it, or on a key no row can read)
            expected[CU[b] + i, head * group : (head + 1) * group] = _visible(b, i, index, causal, window)
    kwargs = dict(config=config, causal=causal, window=window)
    return (q, k_cache, v_cache, block_table), clean, expected, kwargs, where


def _metadata():
    return torch.tensor(CU, dtype=torch.int32), torch.tensor(KV_LENS, dtype=torch.int32)


def _kernel_backend() -> str:
    """The kernel kinds: the interpreter in an interpreting process, else the compiled kernel."""
    if kernels_interpreted():
        return "interpret"
    if not torch.cuda.is_available():
        pytest.skip("the kernel needs a CUDA GPU or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    return "triton"


def _run_torch(kind, arrays, kwargs):
    cu, kv = _metadata()
    args = (*arrays, cu, kv)
    if kind == "torch-kernel" and _kernel_backend() == "triton":
        args = tuple(a.cuda() for a in args)
    if kind == "torch-oracle":
        out, lse = unified_attention_reference(*args, return_lse=True, **kwargs)
    elif kind == "torch-chunked":
        out, lse = unified_attention_chunked(*args, return_lse=True, chunk_size=4, **kwargs)
    else:
        backend = _kernel_backend() if kind == "torch-kernel" else kind.split("-")[1]
        out, lse = torch_unified_attention(*args, return_lse=True, backend=backend, **kwargs)
    return out.double().cpu(), lse.double().cpu()


def _run_jax(kind, arrays, kwargs):
    jnp = pytest.importorskip("jax.numpy", reason="the JAX backends need jax: pip install 'sparse24[jax]'")

    from sparse24.jax_ops import unified_attention as jax_unified_attention
    from sparse24.jax_reference import unified_attention_jax_reference

    cu, kv = _metadata()
    args = [jnp.asarray(x.numpy()) for x in (*arrays, cu, kv)]
    if kind == "jax-jaxref":
        out, lse = unified_attention_jax_reference(*args, return_lse=True, chunk_size=4, **kwargs)
    else:
        backend = _kernel_backend() if kind == "jax-kernel" else kind.split("-")[1]
        out, lse = jax_unified_attention(*args, return_lse=True, backend=backend, **kwargs)
    return (torch.from_numpy(np.asarray(out, dtype=np.float64)), torch.from_numpy(np.asarray(lse, dtype=np.float64)))


BACKENDS = ["torch-oracle", "torch-chunked", "torch-reference", "torch-kernel",
            "jax-jaxref", "jax-reference", "jax-kernel"]


def _run(kind, arrays, kwargs):
    return (_run_jax if kind.startswith("jax") else _run_torch)(kind, arrays, kwargs)


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_nan_rule(name, kind):
    arrays, clean, expected, kwargs, where = _case(name)
    out, lse = _run(kind, arrays, kwargs)
    ref_out, ref_lse = _run(kind, clean, kwargs)
    assert torch.isfinite(ref_out).all() and not torch.isnan(ref_lse).any()

    nan_rows = torch.isnan(out).any(dim=-1)
    assert torch.equal(nan_rows, expected), (
        f"rows with NaN {nan_rows.nonzero().tolist()}, the rule says {expected.nonzero().tolist()}")
    if where != "v":  # a NaN score poisons the whole row, LSE included
        assert torch.isnan(out[expected]).all()
        assert torch.equal(torch.isnan(lse), expected)
    # rows the NaN does not reach are exactly what they are without it
    torch.testing.assert_close(out[~expected], ref_out[~expected], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse[~expected], ref_lse[~expected], rtol=1e-5, atol=1e-6)


def test_nan_rule_through_padded_attention_torch():
    """The padded door reaches the same rule (a NaN query row of row 0; a NaN key past row 1's
    length is never read)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, 2, 16, generator=g)
    k, v = torch.randn(2, 8, 2, 16, generator=g), torch.randn(2, 8, 2, 16, generator=g)
    q[0, 2, 1, 0] = math.nan
    k[1, 6, 0, 0] = math.nan  # row 1 has 6 keys
    seq_lens = torch.tensor([8, 6], dtype=torch.int32)
    for backend in ("reference", "interpret") if kernels_interpreted() else ("reference",):
        out = torch_padded_attention(q, k, v, config=SPARSE, seq_lens=seq_lens, backend=backend)
        nan_rows = torch.isnan(out).any(dim=-1)
        expected = torch.zeros_like(nan_rows)
        expected[0, 2, 1] = True
        assert torch.equal(nan_rows, expected), backend


def test_reference_selection_keeps_a_nan_key():
    """keep_mask_reference: a NaN score ranks as +inf, so the NaN key is kept in its group
    (and exactly N per group stay kept)."""
    from sparse24.reference import keep_mask_reference

    arrays, _, _, kwargs, _ = _case("k_sparse_first_member")
    q, k_cache, _, block_table = arrays
    cu, kv = _metadata()
    masks = keep_mask_reference(q, k_cache, block_table, cu, kv, config=SPARSE, causal=True)
    rows = masks[0][0:2]  # q heads 0, 1 read KV head 0: NaN-free; heads 2, 3 read KV head 1
    nan_rows = masks[0][2:4]
    assert nan_rows[:, :, 4].all()  # the NaN key (member 0 of group 1) is kept by every row
    assert (nan_rows[:, :, 4:8].sum(-1) == 2).all() and (rows[:, :, 4:8].sum(-1) == 2).all()


@pytest.mark.skipif(not kernels_interpreted(), reason="only the interpreter reduces a user combine element by element")
def test_interpreter_reduces_the_nan_propagating_max_in_numpy():
    """The M=4 kernel's running max (``_max_propagating_nan``) reaches the interpreter's numpy
    path (a user combine would run element by element in Python and slow every interpreted
    M=4 test by orders of magnitude), and that path propagates NaN like the compiled max."""
    from triton.runtime.interpreter import ReduceOps

    from sparse24.kernels import unified_attention as kernel_module

    assert kernel_module._interpreter_reduces_max_propagating_nan_in_numpy()
    calls = []
    generic = ReduceOps.generic_reduce
    ReduceOps.generic_reduce = lambda self, input: calls.append(self.combine_fn) or generic(self, input)
    try:
        q = torch.randn(1, 64, 2, 16, generator=torch.Generator().manual_seed(0))
        k, v = torch.randn_like(q), torch.randn_like(q)
        q[0, 5, 1, 3] = float("nan")
        out = torch_padded_attention(q, k, v, config=SparsityConfig(dense_recent_tokens=0), backend="interpret")
    finally:
        ReduceOps.generic_reduce = generic
    assert kernel_module._max_propagating_nan not in calls
    nan_rows = torch.isnan(out).any(-1)[0]  # [S, H]
    assert nan_rows[5, 1] and nan_rows.sum() == 1  # query 5 of head 1, no other row
