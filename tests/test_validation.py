"""Input validation of the public torch ops: every error path names the argument.

Each case builds small, otherwise-valid inputs, breaks exactly one thing and checks the
exception type and that the message starts with the argument's name (and, where the code
gives one, the shape template). Validation runs before any backend, so most cases use
``backend="reference"``; a few check that the kernel backend raises the same errors.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.backends import kernels_interpreted
from sparse24.testing import make_paged_inputs
from sparse24.torch_ops import attention, unified_attention, write_kv_cache

# Shape templates as regexes (literal here, so a change of wording is noticed).
Q_T = r"\[num_tokens, num_q_heads, head_dim\]"
CACHE_T = r"\[num_blocks, block_size, num_kv_heads, head_dim\]"
BT_T = r"\[num_seqs, max_blocks_per_seq\]"
CU_T = r"\[num_seqs \+ 1\]"
SL_T = r"\[num_seqs\]"
KV_T = r"\[num_tokens, num_kv_heads, head_dim\]"
SLOT_T = r"\[num_tokens\]"
PQ_T = r"\[batch, seqlen_q, num_q_heads, head_dim\]"
PKV_T = r"\[batch, seqlen_k, num_kv_heads, head_dim\]"
FLOATS = r"\['float32', 'float16', 'bfloat16'\]"

NUM_BLOCKS = 6  # 2 + 1 pages used + 3 extra (make_paged_inputs' default)


# --------------------------------------------------------------------------------------
# unified_attention
# --------------------------------------------------------------------------------------


def unified_args(device="cpu"):
    """Valid inputs: 2 sequences, q_lens (3, 1), kv_lens (20, 9), 4 q heads / 2 kv heads,
    head_dim 64, block_size 16 -> q [4, 4, 64], caches [6, 16, 2, 64], block_table [2, 3]."""
    inp = make_paged_inputs(
        (3, 1), (20, 9), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16, seed=1, device=device
    )
    return dict(inp._asdict()), {}


def _set(name, fn):
    """A mutation replacing array ``name`` by ``fn(old)``."""

    def mutate(a, kw):
        a[name] = fn(a[name])

    return mutate


def _set_both_caches(fn):
    def mutate(a, kw):
        a["k_cache"] = fn(a["k_cache"])
        a["v_cache"] = fn(a["v_cache"])

    return mutate


def _kw(**values):
    def mutate(a, kw):
        kw.update(values)

    return mutate


def _out(fn):
    def mutate(a, kw):
        kw["out"] = fn(a["q"])

    return mutate


def _int32(values):
    return lambda old: torch.tensor(values, dtype=torch.int32, device=old.device)


def _poke_block_table(b, i, value):
    def fn(old):
        new = old.clone()
        new[b, i] = value
        return new

    return fn


# (id, mutation, exception type, regex searched in the message)
UNIFIED_CASES = [
    # ---- rank of each array ----
    ("q-rank2", _set("q", lambda t: t[0]), ValueError, rf"^q must have shape {Q_T} \(rank 3\), got shape \[4, 64\]"),
    ("q-rank4", _set("q", lambda t: t[None]), ValueError, rf"^q must have shape {Q_T} \(rank 3\)"),
    ("k_cache-rank3", _set("k_cache", lambda t: t[0]), ValueError, rf"^k_cache must have shape {CACHE_T} \(rank 4\)"),
    ("v_cache-rank5", _set("v_cache", lambda t: t[None]), ValueError,
     rf"^v_cache must have shape {CACHE_T} \(rank 4\)"),
    ("block_table-rank1", _set("block_table", lambda t: t[0]), ValueError,
     rf"^block_table must have shape {BT_T} \(rank 2\)"),
    ("cu_seqlens_q-rank2", _set("cu_seqlens_q", lambda t: t[None]), ValueError,
     rf"^cu_seqlens_q must have shape {CU_T} \(rank 1\)"),
    ("seq_lens-rank0", _set("seq_lens", lambda t: t[0]), ValueError,
     rf"^seq_lens must have shape {SL_T} \(rank 1\), got shape \[\]"),
    ("seq_lens-rank2", _set("seq_lens", lambda t: t[None]), ValueError,
     rf"^seq_lens must have shape {SL_T} \(rank 1\)"),
    # ---- dtypes ----
    ("q-int", _set("q", lambda t: t.to(torch.int32)), TypeError, rf"^q must have dtype in {FLOATS}, got int32"),
    ("k_cache-dtype-differs", _set("k_cache", lambda t: t.to(torch.bfloat16)), TypeError,
     r"^k_cache must have the dtype of q \(float32\), got bfloat16"),
    ("v_cache-dtype-differs", _set("v_cache", lambda t: t.to(torch.float16)), TypeError,
     r"^v_cache must have the dtype of q \(float32\), got float16"),
    ("k_cache-int", _set("k_cache", lambda t: t.to(torch.int32)), TypeError,
     rf"^k_cache must have dtype in {FLOATS}, got int32"),
    ("block_table-int64", _set("block_table", lambda t: t.long()), TypeError,
     r"^block_table must have dtype in \['int32'\], got int64"),
    ("cu_seqlens_q-int64", _set("cu_seqlens_q", lambda t: t.long()), TypeError,
     r"^cu_seqlens_q must have dtype in \['int32'\], got int64"),
    ("seq_lens-int64", _set("seq_lens", lambda t: t.long()), TypeError,
     r"^seq_lens must have dtype in \['int32'\], got int64"),
    ("seq_lens-float", _set("seq_lens", lambda t: t.float()), TypeError,
     r"^seq_lens must have dtype in \['int32'\], got float32"),
    # ---- shapes that must agree ----
    ("head_dim-mismatch", _set_both_caches(lambda t: t[..., :32].contiguous()), ValueError,
     rf"^k_cache must have shape {CACHE_T} with head_dim \(from q\) = 64, got shape \[6, 16, 2, 32\]"),
    ("head_dim-too-large",
     lambda a, kw: a.update(q=torch.zeros(4, 4, 512), k_cache=torch.zeros(6, 16, 2, 512),
                            v_cache=torch.zeros(6, 16, 2, 512)),
     ValueError, rf"^q must have shape {Q_T} with 1 <= head_dim <= 256, got shape \[4, 4, 512\]"),
    ("heads-not-divisible", _set_both_caches(lambda t: torch.cat([t, t[:, :, :1]], dim=2)), ValueError,
     rf"^k_cache must have shape {CACHE_T} with num_kv_heads dividing num_q_heads = 4, got shape \[6, 16, 3, 64\]"),
    ("v_cache-shape", _set("v_cache", lambda t: t[:, :8].contiguous()), ValueError,
     rf"^v_cache must have the shape of k_cache \[6, 16, 2, 64\] \({CACHE_T}\), got shape \[6, 8, 2, 64\]"),
    ("no-sequences", lambda a, kw: a.update(seq_lens=a["seq_lens"][:0], cu_seqlens_q=a["cu_seqlens_q"][:1],
                                            block_table=a["block_table"][:0]),
     ValueError, rf"^seq_lens must have shape {SL_T} with num_seqs >= 1"),
    ("cu_seqlens_q-length", _set("cu_seqlens_q", lambda t: t[:2]), ValueError,
     rf"^cu_seqlens_q must have shape {CU_T} with num_seqs \+ 1 \(from seq_lens\) = 3, got shape \[2\]"),
    ("block_table-rows", _set("block_table", lambda t: t[:1]), ValueError,
     rf"^block_table must have shape {BT_T} with num_seqs \(from seq_lens\) = 2, got shape \[1, 3\]"),
    ("block_table-no-columns", _set("block_table", lambda t: t[:, :0]), ValueError,
     rf"^block_table must have shape {BT_T} with max_blocks_per_seq >= 1"),
    ("out-shape", _out(lambda q: torch.zeros(4, 4, 32)), ValueError,
     rf"^out must have the shape of q \[4, 4, 64\] \({Q_T}\), got shape \[4, 4, 32\]"),
    ("out-rank", _out(lambda q: torch.zeros(4, 4)), ValueError, rf"^out must have shape {Q_T} \(rank 3\)"),
    ("out-dtype", _out(lambda q: torch.zeros(q.shape, dtype=torch.bfloat16, device=q.device)), TypeError,
     r"^out must have the dtype of q \(float32\), got bfloat16"),
    # ---- metadata values ----
    ("cu_seqlens_q-start", _set("cu_seqlens_q", _int32([1, 3, 4])), ValueError,
     rf"^cu_seqlens_q {CU_T} must start at 0, got cu_seqlens_q\[0\] = 1"),
    ("cu_seqlens_q-decreasing", _set("cu_seqlens_q", _int32([0, 5, 4])), ValueError,
     rf"^cu_seqlens_q {CU_T} must be non-decreasing, got cu_seqlens_q\[1\] = 5 > cu_seqlens_q\[2\] = 4"),
    ("cu_seqlens_q-end", _set("cu_seqlens_q", _int32([0, 3, 3])), ValueError,
     rf"^cu_seqlens_q {CU_T} must end at num_tokens = 4 \(q.shape\[0\]\), got cu_seqlens_q\[-1\] = 3"),
    ("seq_lens-negative", _set("seq_lens", _int32([20, -1])), ValueError,
     rf"^seq_lens {SL_T} must be >= 0, got seq_lens\[1\] = -1"),
    ("q_len>kv_len", _set("seq_lens", _int32([2, 9])), ValueError,
     rf"^seq_lens {SL_T} .*sequence 0 has q_len = 3 > seq_lens\[0\] = 2"),
    ("block_table-too-small", _set("block_table", lambda t: t[:, :1].contiguous()), ValueError,
     rf"^block_table {BT_T} is too small: sequence 0 has seq_lens\[0\] = 20 keys = 2 pages of block_size 16, "
     r"got max_blocks_per_seq = 1"),
    ("seq_lens-beyond-block_table", _set("seq_lens", _int32([49, 9])), ValueError,
     rf"^block_table {BT_T} is too small: sequence 0"),
    ("block_table-entry-too-large", _set("block_table", _poke_block_table(1, 0, NUM_BLOCKS)), ValueError,
     rf"^block_table {BT_T} must hold page indices in \[0, num_blocks = 6\) for the pages sequence 1 uses"),
    ("block_table-entry-negative", _set("block_table", _poke_block_table(0, 1, -1)), ValueError,
     rf"^block_table {BT_T} must hold page indices in \[0, num_blocks = 6\) for the pages sequence 0 uses"),
    # ---- scalar options ----
    ("softmax_scale-zero", _kw(softmax_scale=0.0), ValueError, r"^softmax_scale must be a finite float > 0, got 0.0"),
    ("softmax_scale-negative", _kw(softmax_scale=-0.125), ValueError, r"^softmax_scale must be a finite float > 0"),
    ("softmax_scale-nan", _kw(softmax_scale=float("nan")), ValueError, r"^softmax_scale must be a finite float > 0"),
    ("softmax_scale-inf", _kw(softmax_scale=float("inf")), ValueError, r"^softmax_scale must be a finite float > 0"),
    ("softmax_scale-str", _kw(softmax_scale="0.125"), TypeError, r"^softmax_scale must be a float or None, got str"),
    ("softmax_scale-bool", _kw(softmax_scale=True), TypeError, r"^softmax_scale must be a float or None, got bool"),
    ("softmax_scale-tensor", _kw(softmax_scale=torch.tensor(0.1)), TypeError,
     r"^softmax_scale must be a float or None, got Tensor"),
    ("window-zero", _kw(window=0), ValueError, r"^window must be an int >= 1 .*got 0"),
    ("window-negative", _kw(window=-4), ValueError, r"^window must be an int >= 1 .*got -4"),
    ("window-float", _kw(window=4.0), TypeError, r"^window must be an int >= 1 or None, got float"),
    ("window-bool", _kw(window=True), TypeError, r"^window must be an int >= 1 or None, got bool"),
    ("softcap-negative", _kw(softcap=-1.0), ValueError, r"^softcap must be a finite float .*got -1.0"),
    ("softcap-inf", _kw(softcap=float("inf")), ValueError, r"^softcap must be a finite float"),
    ("softcap-str", _kw(softcap="30"), TypeError, r"^softcap must be a float >= 0 or None \(0 and None mean off\), got str"),
    ("causal-str", _kw(causal="yes"), TypeError, r"^causal must be a bool, got str"),
    ("causal-int", _kw(causal=1), TypeError, r"^causal must be a bool, got int"),
    ("causal-none", _kw(causal=None), TypeError, r"^causal must be a bool, got NoneType"),
    ("return_lse-int", _kw(return_lse=1), TypeError, r"^return_lse must be a bool, got int"),
    ("config-str", _kw(config="2:4"), TypeError,
     r"^config must be a sparse24\.SparsityConfig or None, got str .*SparsityConfig\.parse"),
    ("config-dict", _kw(config={"n": 2, "m": 4}), TypeError,
     r"^config must be a sparse24\.SparsityConfig or None, got dict"),
    ("backend-unknown", _kw(backend="cuda"), ValueError,
     r"^backend must be one of \['auto', 'triton', 'interpret', 'reference'\], got 'cuda'"),
    ("backend-none", _kw(backend=None), ValueError, r"^backend must be one of .*got None"),
    ("backend-case", _kw(backend="Reference"), ValueError, r"^backend must be one of .*got 'Reference'"),
    ("max_seqlen_q-alone", _kw(max_seqlen_q=3), ValueError,
     r"^max_seqlen_q and max_seqlen_k must be given together .*max_seqlen_q=3, max_seqlen_k=None"),
    ("max_seqlen_k-alone", _kw(max_seqlen_k=20), ValueError,
     r"^max_seqlen_q and max_seqlen_k must be given together .*max_seqlen_q=None, max_seqlen_k=20"),
    ("max_seqlen_q-negative", _kw(max_seqlen_q=-1, max_seqlen_k=20), ValueError,
     r"^max_seqlen_q must be an int >= 0 or None, got -1"),
    ("max_seqlen_k-float", _kw(max_seqlen_q=3, max_seqlen_k=20.0), TypeError,
     r"^max_seqlen_k must be an int >= 0 or None, got float"),
    # ---- not tensors ----
    ("q-numpy", _set("q", lambda t: t.cpu().numpy()), TypeError, r"^q must be a torch\.Tensor, got ndarray"),
    ("k_cache-numpy", _set("k_cache", lambda t: t.cpu().numpy()), TypeError,
     r"^k_cache must be a torch\.Tensor, got ndarray"),
    ("seq_lens-list", _set("seq_lens", lambda t: t.tolist()), TypeError,
     r"^seq_lens must be a torch\.Tensor, got list"),
    ("block_table-none", _set("block_table", lambda t: None), TypeError,
     r"^block_table must be a torch\.Tensor, got NoneType"),
    # ---- devices (the meta device stands in for a second device on a CPU-only machine) ----
    ("k_cache-device", _set("k_cache", lambda t: t.to("meta")), ValueError,
     r"^k_cache must be on the device of q \(cpu\), got meta"),
    ("out-device", _out(lambda q: torch.zeros(q.shape, device="meta")), ValueError,
     r"^out must be on the device of q \(cpu\), got meta"),
    ("out-numpy", _out(lambda q: np.zeros(q.shape, dtype=np.float32)), TypeError,
     r"^out must be a torch\.Tensor, got ndarray"),
]


def _call_unified(a, kw, backend="reference"):
    kw = {"backend": backend, **kw}
    return unified_attention(
        a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["cu_seqlens_q"], a["seq_lens"], **kw
    )


def test_unified_valid_baseline():
    """The unbroken inputs pass (so each case below fails for the one thing it breaks)."""
    a, kw = unified_args()
    out = _call_unified(a, kw)
    assert out.shape == (4, 4, 64)
    assert torch.isfinite(out).all()
    # Block-table entries past the pages a sequence uses are never read, so any value is fine.
    a["block_table"][1, 2] = 10_000
    a["block_table"][0, 2] = -7
    _call_unified(a, kw)
    # Every option at a valid value.
    _call_unified(a, dict(softmax_scale=0.1, window=4, softcap=30.0, causal=False, config=SparsityConfig.dense(),
                          out=torch.zeros(4, 4, 64), max_seqlen_q=3, max_seqlen_k=20))


@pytest.mark.parametrize("mutate, exc, match", [c[1:] for c in UNIFIED_CASES], ids=[c[0] for c in UNIFIED_CASES])
def test_unified_attention_rejects(mutate, exc, match):
    a, kw = unified_args()
    mutate(a, kw)
    with pytest.raises(exc, match=match) as info:
        _call_unified(a, kw)
    assert type(info.value) is exc  # not a subclass from somewhere deeper


def test_backend_triton_unavailable_here():
    """backend='triton' off a compiled-kernel GPU process is a ValueError that says why."""
    a, kw = unified_args()
    if kernels_interpreted():
        match = r"^backend='triton' needs compiled kernels, .*TRITON_INTERPRET=1.*use backend='interpret'"
    else:
        match = r"^backend='triton' needs CUDA inputs"  # CPU tensors in a compiling process
    with pytest.raises(ValueError, match=match):
        _call_unified(a, kw, backend="triton")


def test_backend_interpret_unavailable_in_compiled_process():
    if kernels_interpreted():
        pytest.skip("this process interprets Triton kernels, so backend='interpret' is valid here")
    a, kw = unified_args()
    with pytest.raises(ValueError, match=r"^backend='interpret' .*TRITON_INTERPRET=1"):
        _call_unified(a, kw, backend="interpret")


@pytest.mark.parametrize("splits", [3, 128, 6, -1, 0])
@pytest.mark.parametrize("which", ["kernel", "reference"])
def test_num_kv_splits_invalid(kernel_backend, splits, which):
    """Not a power of two in [1, 64]: rejected at the boundary, whatever the backend."""
    backend, device = kernel_backend
    a, kw = unified_args(device)
    with pytest.raises(ValueError, match=rf"^num_kv_splits must be a power of two in \[1, 64\] or None, got {splits}"):
        _call_unified(a, dict(num_kv_splits=splits), backend=backend if which == "kernel" else "reference")


@pytest.mark.parametrize("splits", [2.5, "4", True])
def test_num_kv_splits_wrong_type(splits):
    a, kw = unified_args()
    with pytest.raises(TypeError, match=r"^num_kv_splits must be a power of two in \[1, 64\] or None, got "):
        _call_unified(a, dict(num_kv_splits=splits), backend="reference")


@pytest.mark.parametrize("hq, head_dim", [(256, 256), (512, 64)])
def test_gqa_group_larger_than_one_program(kernel_backend, hq, head_dim):
    """One program holds a whole GQA group: past 256 rows or 256 x 128 tile elements the kernel
    cannot compile, so the kernel backends refuse with the numbers (the reference has no limit)."""
    backend, device = kernel_backend
    inputs = make_paged_inputs((1,), (16,), num_q_heads=hq, num_kv_heads=1, head_dim=head_dim, block_size=16,
                               device=device)
    with pytest.raises(ValueError, match=rf"^num_q_heads / num_kv_heads = {hq} with head_dim {head_dim} needs a "):
        unified_attention(*inputs, backend=backend)
    assert unified_attention(*inputs, backend="reference").shape == inputs.q.shape


# A few cases through the kernel backend: validation must not depend on the backend.
SAME_CASES = ["q-rank2", "k_cache-dtype-differs", "heads-not-divisible", "cu_seqlens_q-end",
              "block_table-entry-too-large", "window-zero", "config-str", "q-numpy"]


@pytest.mark.parametrize("case", SAME_CASES)
def test_reference_and_kernel_backends_validate_identically(kernel_backend, case):
    backend, device = kernel_backend
    mutate = {c[0]: c[1] for c in UNIFIED_CASES}[case]
    errors = []
    for b in ("reference", backend, "auto"):
        a, kw = unified_args(device)
        mutate(a, kw)
        with pytest.raises((ValueError, TypeError)) as info:
            _call_unified(a, kw, backend=b)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] == errors[2]


def _snapshot(tensors):
    # (meta tensors hold no data to compare)
    return {k: v.clone() for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def _assert_unchanged(before, tensors):
    for name, old in before.items():
        new = tensors[name]
        assert new.dtype == old.dtype and new.shape == old.shape, name
        same = torch.equal(new, old) or (
            new.is_floating_point() and torch.allclose(new, old, rtol=0, atol=0, equal_nan=True)
        )
        assert same, f"{name} was modified by a call that raised"


@pytest.mark.parametrize("case", ["block_table-entry-too-large", "q_len>kv_len", "softmax_scale-zero",
                                  "out-dtype", "max_seqlen_q-alone"])
@pytest.mark.parametrize("use_kernel", [False, True], ids=["reference", "kernel"])
def test_inputs_unchanged_when_raising(kernel_backend, case, use_kernel):
    backend, device = kernel_backend
    a, kw = unified_args(device)
    mutate = {c[0]: c[1] for c in UNIFIED_CASES}[case]
    mutate(a, kw)
    kw.setdefault("out", torch.full(a["q"].shape, 7.0, dtype=a["q"].dtype, device=device))
    tensors = {**a, "out": kw["out"]}
    before = _snapshot(tensors)
    with pytest.raises((ValueError, TypeError)):
        _call_unified(a, kw, backend=backend if use_kernel else "reference")
    _assert_unchanged(before, tensors)


# --------------------------------------------------------------------------------------
# attention (padded layout)
# --------------------------------------------------------------------------------------


def padded_args():
    """q [2, 5, 4, 64], k/v [2, 8, 2, 64]."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 64, generator=gen)
    k = torch.randn(2, 8, 2, 64, generator=gen)
    v = torch.randn(2, 8, 2, 64, generator=gen)
    return dict(q=q, k=k, v=v), {}


ATTENTION_CASES = [
    ("q-rank3", _set("q", lambda t: t[0]), ValueError,
     rf"^q must have shape {PQ_T} \(rank 4\), got shape \[5, 4, 64\]"),
    ("k-rank3", _set("k", lambda t: t[0]), ValueError, rf"^k must have shape {PKV_T} \(rank 4\)"),
    ("v-rank5", _set("v", lambda t: t[None]), ValueError, rf"^v must have shape {PKV_T} \(rank 4\)"),
    ("v-shape", _set("v", lambda t: t[:, :4]), ValueError,
     rf"^v must have the shape of k \[2, 8, 2, 64\] \({PKV_T}\), got shape \[2, 4, 2, 64\]"),
    ("batch-mismatch", lambda a, kw: a.update(k=torch.zeros(3, 8, 2, 64), v=torch.zeros(3, 8, 2, 64)), ValueError,
     rf"^k must have shape {PKV_T} with batch = 2 \(from q\), got shape \[3, 8, 2, 64\]"),
    ("head_dim-mismatch", lambda a, kw: a.update(k=a["k"][..., :32], v=a["v"][..., :32]), ValueError,
     rf"^k must have shape {PKV_T} with head_dim = 64 \(from q\), got shape \[2, 8, 2, 32\]"),
    ("seqlen_k-zero", lambda a, kw: a.update(k=a["k"][:, :0], v=a["v"][:, :0]), ValueError,
     rf"^k must have shape {PKV_T} with seqlen_k >= 1"),
    ("seq_lens-rank2", _kw(seq_lens=torch.tensor([[8, 3]], dtype=torch.int32)), ValueError,
     rf"^seq_lens must have shape {SL_T} \(rank 1\)"),
    ("seq_lens-length", _kw(seq_lens=torch.tensor([8, 3, 2], dtype=torch.int32)), ValueError,
     rf"^seq_lens must have shape {SL_T} with num_seqs = batch = 2, got \[3\]"),
    ("seq_lens-int64", _kw(seq_lens=torch.tensor([8, 3])), TypeError,
     r"^seq_lens must have dtype in \['int32'\], got int64"),
    ("seq_lens-too-large", _kw(seq_lens=torch.tensor([9, 3], dtype=torch.int32)), ValueError,
     r"^seq_lens must hold values in \[0, seqlen_k = 8\]"),
    ("seq_lens-negative", _kw(seq_lens=torch.tensor([8, -1], dtype=torch.int32)), ValueError,
     r"^seq_lens must hold values in \[0, seqlen_k = 8\]"),
    ("seq_lens-list", _kw(seq_lens=[8, 3]), TypeError, r"^seq_lens must be a torch\.Tensor, got list"),
    ("q-numpy", _set("q", lambda t: t.numpy()), TypeError, r"^q must be a torch\.Tensor, got ndarray"),
    ("q-int", _set("q", lambda t: t.to(torch.int32)), TypeError, rf"^q must have dtype in {FLOATS}, got int32"),
    ("window-zero", _kw(window=0), ValueError, r"^window must be an int >= 1"),
    ("causal-str", _kw(causal="no"), TypeError, r"^causal must be a bool, got str"),
    ("config-str", _kw(config="2:4"), TypeError, r"^config must be a sparse24\.SparsityConfig or None, got str"),
    ("backend-unknown", _kw(backend="gpu"), ValueError, r"^backend must be one of .*got 'gpu'"),
]


def _call_attention(a, kw, backend="reference"):
    return attention(a["q"], a["k"], a["v"], **{"backend": backend, **kw})


def test_attention_valid_baseline():
    a, kw = padded_args()
    assert _call_attention(a, kw).shape == (2, 5, 4, 64)
    out = _call_attention(a, dict(seq_lens=torch.tensor([8, 3], dtype=torch.int32)))
    assert out.shape == (2, 5, 4, 64)
    assert torch.all(out[1, 3:] == 0)  # rows past q_len = min(5, 3) are zeros


@pytest.mark.parametrize("mutate, exc, match", [c[1:] for c in ATTENTION_CASES], ids=[c[0] for c in ATTENTION_CASES])
def test_attention_rejects(mutate, exc, match):
    a, kw = padded_args()
    mutate(a, kw)
    before = _snapshot({**a, **kw})
    with pytest.raises(exc, match=match) as info:
        _call_attention(a, kw)
    assert type(info.value) is exc
    _assert_unchanged(before, {**a, **kw})


# --------------------------------------------------------------------------------------
# write_kv_cache
# --------------------------------------------------------------------------------------


def kv_write_args(device="cpu"):
    """k/v [5, 2, 64] into caches [4, 16, 2, 64] (64 slots); slot -1 skips a token."""
    gen = torch.Generator().manual_seed(5)
    k = torch.randn(5, 2, 64, generator=gen)
    v = torch.randn(5, 2, 64, generator=gen)
    k_cache = torch.zeros(4, 16, 2, 64)
    v_cache = torch.zeros(4, 16, 2, 64)
    slot_mapping = torch.tensor([0, 17, 63, 2, -1], dtype=torch.int32)
    args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    return {n: t.to(device) for n, t in args.items()}, {}


WRITE_CASES = [
    ("k-rank2", _set("k", lambda t: t[0]), ValueError, rf"^k must have shape {KV_T} \(rank 3\)"),
    ("v-rank4", _set("v", lambda t: t[None]), ValueError, rf"^v must have shape {KV_T} \(rank 3\)"),
    ("k_cache-rank3", _set("k_cache", lambda t: t[0]), ValueError, rf"^k_cache must have shape {CACHE_T} \(rank 4\)"),
    ("v_cache-rank3", _set("v_cache", lambda t: t[0]), ValueError, rf"^v_cache must have shape {CACHE_T} \(rank 4\)"),
    ("slot_mapping-rank2", _set("slot_mapping", lambda t: t[None]), ValueError,
     rf"^slot_mapping must have shape {SLOT_T} \(rank 1\)"),
    ("heads-mismatch", lambda a, kw: a.update(k=a["k"].new_zeros(5, 3, 64), v=a["v"].new_zeros(5, 3, 64)), ValueError,
     rf"^k_cache must have shape {CACHE_T} with num_kv_heads, head_dim = \[3, 64\] \(from k\), "
     r"got shape \[4, 16, 2, 64\]"),
    ("head_dim-mismatch", lambda a, kw: a.update(k=a["k"][..., :32], v=a["v"][..., :32]),
     ValueError, rf"^k_cache must have shape {CACHE_T} with num_kv_heads, head_dim = \[2, 32\] \(from k\)"),
    ("v-shape", _set("v", lambda t: t[:4]), ValueError,
     rf"^v must have the shape of k \[5, 2, 64\] \({KV_T}\), got shape \[4, 2, 64\]"),
    ("v_cache-shape", _set("v_cache", lambda t: t[:3]), ValueError,
     rf"^v_cache must have the shape of k_cache \[4, 16, 2, 64\] \({CACHE_T}\), got shape \[3, 16, 2, 64\]"),
    ("slot_mapping-length", _set("slot_mapping", lambda t: t[:4]), ValueError,
     rf"^slot_mapping must have shape {SLOT_T} with num_tokens \(from k\) = 5, got shape \[4\]"),
    ("slot_mapping-float", _set("slot_mapping", lambda t: t.float()), TypeError,
     r"^slot_mapping must have dtype in \['int32', 'int64'\], got float32"),
    ("slot-out-of-range", _set("slot_mapping", _int32([0, 17, 64, 2, -1])), ValueError,
     r"^slot_mapping must hold slots < num_blocks \* block_size = 64"),
    ("k-dtype", _set("k", lambda t: t.to(torch.bfloat16)), TypeError,
     r"^k must have the dtype of k_cache \(float32\), got bfloat16"),
    ("v_cache-dtype", _set("v_cache", lambda t: t.half()), TypeError,
     r"^v_cache must have the dtype of k_cache \(float32\), got float16"),
    ("k_cache-int", _set("k_cache", lambda t: t.int()), TypeError, rf"^k_cache must have dtype in {FLOATS}, got int32"),
    ("v-device", _set("v", lambda t: t.to("meta")), ValueError, r"^v must be on the device of .*\(cpu\), got meta"),
    ("slot_mapping-device", _set("slot_mapping", lambda t: t.to("meta")), ValueError,
     r"^slot_mapping must be on the device of .*\(cpu\), got meta"),
    ("k-numpy", _set("k", lambda t: t.numpy()), TypeError, r"^k must be a torch\.Tensor, got ndarray"),
    ("backend-unknown", _kw(backend="fast"), ValueError, r"^backend must be one of .*got 'fast'"),
]


def _call_write(a, kw, backend="reference"):
    return write_kv_cache(a["k"], a["v"], a["k_cache"], a["v_cache"], a["slot_mapping"], **{"backend": backend, **kw})


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_cache_valid_baseline(slot_dtype):
    a, kw = kv_write_args()
    a["slot_mapping"] = a["slot_mapping"].to(slot_dtype)
    k_cache, v_cache = _call_write(a, kw)
    assert k_cache is a["k_cache"] and v_cache is a["v_cache"]
    assert torch.equal(k_cache[1, 1], a["k"][1]) and torch.equal(v_cache[3, 15], a["v"][2])


@pytest.mark.parametrize("mutate, exc, match", [c[1:] for c in WRITE_CASES], ids=[c[0] for c in WRITE_CASES])
def test_write_kv_cache_rejects(mutate, exc, match):
    a, kw = kv_write_args()
    mutate(a, kw)
    before = _snapshot(a)
    with pytest.raises(exc, match=match) as info:
        _call_write(a, kw)
    assert type(info.value) is exc
    _assert_unchanged(before, a)  # the caches are not written when the call raises


@pytest.mark.parametrize("case", ["slot-out-of-range", "heads-mismatch", "slot_mapping-float"])
def test_write_kv_cache_backends_validate_identically(kernel_backend, case):
    backend, device = kernel_backend
    mutate = {c[0]: c[1] for c in WRITE_CASES}[case]
    errors = []
    for b in ("reference", backend):
        a, kw = kv_write_args(device)
        mutate(a, kw)
        before = _snapshot(a)
        with pytest.raises((ValueError, TypeError)) as info:
            _call_write(a, kw, backend=b)
        _assert_unchanged(before, a)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


@pytest.mark.parametrize(
    "q_shape, k_shape, match",
    [
        ((2, 5, 4, 64), (2, 5, 3, 64), r"^k must have shape \[batch, seqlen_k, num_kv_heads, head_dim\] with num_kv_heads dividing"),
        ((2, 5, 4, 0), (2, 5, 2, 0), r"^q must have shape \[batch, seqlen_q, num_q_heads, head_dim\] with 1 <= head_dim"),
    ],
)
def test_attention_reports_callers_shapes(q_shape, k_shape, match):
    """attention() names its own arguments and layout, not the internal paged call's."""
    from sparse24.torch_ops import attention

    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    with pytest.raises(ValueError, match=match):
        attention(q, k, k.clone(), backend="reference")


# --------------------------------------------------------------------------------------
# The one input contract (sparse24.validation.prepare_unified_attention), torch side: each
# rule settled where the entry points used to disagree, through the torch ops (every backend)
# and the torch references alike. (The JAX side: tests/test_jax_reference.py.)
# --------------------------------------------------------------------------------------


def _torch_entry_points(kernel_backend_name):
    from sparse24.reference import keep_mask_reference, unified_attention_chunked, unified_attention_reference

    def keep_mask(q, k_cache, v_cache, *rest, **kw):
        return keep_mask_reference(q, k_cache, *rest, **kw)

    return {
        "ops-reference": lambda *a, **kw: unified_attention(*a, backend="reference", **kw),
        "ops-kernel": lambda *a, **kw: unified_attention(*a, backend=kernel_backend_name, **kw),
        "ops-auto": lambda *a, **kw: unified_attention(*a, backend="auto", **kw),
        "oracle": unified_attention_reference,
        "keep_mask": keep_mask,
        "chunked": unified_attention_chunked,
    }


CONTRACT_RULES = [
    # (id, mutation, exception type, regex)
    ("window-0", _kw(window=0), ValueError, r"^window must be an int >= 1 .*got 0"),
    ("softmax_scale-0", _kw(softmax_scale=0.0), ValueError, r"^softmax_scale must be a finite float > 0, got 0.0"),
    ("softmax_scale-negative", _kw(softmax_scale=-0.5), ValueError,
     r"^softmax_scale must be a finite float > 0, got -0.5"),
    ("config-str", _kw(config="2:4,recent=64"), TypeError,
     r"^config must be a sparse24\.SparsityConfig or None, got str .*SparsityConfig\.parse"),
    ("cu_seqlens_q-end-short", _set("cu_seqlens_q", _int32([0, 3, 3])), ValueError,
     rf"^cu_seqlens_q {CU_T} must end at num_tokens = 4 \(q.shape\[0\]\), got cu_seqlens_q\[-1\] = 3"),
    ("cu_seqlens_q-end-long", _set("cu_seqlens_q", _int32([0, 3, 5])), ValueError,
     rf"^cu_seqlens_q {CU_T} must end at num_tokens = 4 \(q.shape\[0\]\), got cu_seqlens_q\[-1\] = 5"),
    ("q_len>kv_len", _set("seq_lens", _int32([2, 9])), ValueError,
     rf"^seq_lens {SL_T} .*sequence 0 has q_len = 3 > seq_lens\[0\] = 2"),
    ("metadata-int64", _set("seq_lens", lambda t: t.long()), TypeError,
     r"^seq_lens must have dtype in \['int32'\], got int64"),
    ("caches-dtype-mixed", _set("k_cache", lambda t: t.to(torch.bfloat16)), TypeError,
     r"^k_cache must have the dtype of q \(float32\), got bfloat16"),
    ("block_table-entry", _set("block_table", _poke_block_table(1, 0, NUM_BLOCKS)), ValueError,
     rf"^block_table {BT_T} must hold page indices in \[0, num_blocks = 6\) .*got block_table\[1, 0\] = 6"),
    ("q-numpy", _set("q", lambda t: t.cpu().numpy()), TypeError, r"^q must be a torch\.Tensor, got ndarray"),
    ("device", _set("k_cache", lambda t: t.to("meta")), ValueError,
     r"^k_cache must be on the device of q \(cpu\), got meta"),
]
ENTRY_POINTS = ["ops-reference", "ops-kernel", "ops-auto", "oracle", "keep_mask", "chunked"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("mutate, exc, match", [c[1:] for c in CONTRACT_RULES], ids=[c[0] for c in CONTRACT_RULES])
def test_contract_rules_torch(kernel_backend, entry, mutate, exc, match):
    """Every torch entry point raises the same error for each settled rule."""
    backend, device = kernel_backend
    a, kw = unified_args("cpu" if entry in ("oracle", "keep_mask", "chunked") else device)
    mutate(a, kw)
    fn = _torch_entry_points(backend)[entry]
    with pytest.raises(exc, match=match) as info:
        fn(a["q"], a["k_cache"], a["v_cache"], a["block_table"], a["cu_seqlens_q"], a["seq_lens"], **kw)
    assert type(info.value) is exc


def test_contract_float64_torch(kernel_backend):
    """float64: the references (float64 oracles) accept it; the ops raise a TypeError naming
    float64 and where it is accepted, on every backend, unified and padded alike."""
    from sparse24.reference import keep_mask_reference, unified_attention_chunked, unified_attention_reference

    backend, device = kernel_backend
    a, _ = unified_args()
    a64 = {n: (t.double() if t.is_floating_point() else t) for n, t in a.items()}
    args64 = [a64[n] for n in ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")]
    want = unified_attention_reference(*[a[n] for n in ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q",
                                                         "seq_lens")])
    assert torch.equal(unified_attention_reference(*args64), want)  # the oracle computes in float64 anyway
    got = unified_attention_chunked(*args64, compute_dtype=torch.float64)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert len(keep_mask_reference(*args64[:2], *args64[3:])) == 2
    match = r"^q must have dtype in \['float32', 'float16', 'bfloat16'\], got float64 \(float64 is accepted by the references only"
    for b in ("reference", backend, "auto"):
        with pytest.raises(TypeError, match=match):
            unified_attention(*[t.to(device) for t in args64], backend=b)
        q = torch.zeros(2, 5, 4, 64, dtype=torch.float64, device=device)
        k = torch.zeros(2, 8, 2, 64, dtype=torch.float64, device=device)
        with pytest.raises(TypeError, match=match):
            attention(q, k, k, backend=b)


@pytest.mark.parametrize("case", ["window-zero", "config-str", "softmax_scale-negative"])
def test_contract_rules_torch_padded_attention(case):
    """attention() applies the same rules, with the same words."""
    mutate, exc, match = {
        "window-zero": (_kw(window=0), ValueError, r"^window must be an int >= 1 .*got 0"),
        "config-str": (_kw(config="2:4"), TypeError, r"^config must be a sparse24\.SparsityConfig or None, got str"),
        "softmax_scale-negative": (_kw(softmax_scale=-1.0), ValueError, r"^softmax_scale must be a finite float > 0"),
    }[case]
    a, kw = padded_args()
    mutate(a, kw)
    with pytest.raises(exc, match=match):
        _call_attention(a, kw)


def test_constants_agree_with_the_planner():
    """validation.py keeps its own copies (importing the planner would import triton)."""
    from sparse24 import validation
    from sparse24.kernels import planner

    assert validation.FLOAT_DTYPES == planner.SUPPORTED_DTYPES
    assert validation.MAX_KV_SPLITS == planner.MAX_KV_SPLITS


# --------------------------------------------------------------------------------------
# backends: one resolver, one interpreter setup
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_auto_means_the_same_for_every_framework(framework):
    """docs/SPEC.md §4: triton on a GPU, interpret in an interpreting process, else reference."""
    from sparse24.backends import resolve_backend

    if kernels_interpreted():
        assert resolve_backend("auto", framework, on_gpu=False) == "interpret"
        assert resolve_backend("auto", framework, on_gpu=True) == "interpret"
    else:
        assert resolve_backend("auto", framework, on_gpu=False) == "reference"
        assert resolve_backend("auto", framework, on_gpu=True) == "triton"
    assert resolve_backend("reference", framework, on_gpu=True) == "reference"
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        resolve_backend("cuda", framework, on_gpu=False)


def test_resolver_rejects_an_unknown_framework():
    from sparse24.backends import resolve_backend

    with pytest.raises(ValueError, match=r"^framework must be one of \['torch', 'jax'\], got 'tf'"):
        resolve_backend("auto", "tf", on_gpu=False)


def test_use_interpreter_if_no_gpu(monkeypatch):
    from sparse24 import backends

    # An explicit TRITON_INTERPRET always wins and is left alone.
    for value, want in (("1", True), ("0", False), ("true", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert backends.use_interpreter_if_no_gpu() is want
        assert backends.use_interpreter_if_no_gpu(force=True) is want
        assert backends.os.environ["TRITON_INTERPRET"] == value
    # Unset, in this process (triton already imported): a GPU keeps compiling; no GPU (or
    # force) would need the interpreter, which is too late now: a clear error.
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(backends, "_cuda_gpu_present", lambda: True)
    assert backends.use_interpreter_if_no_gpu() is False
    assert "TRITON_INTERPRET" not in backends.os.environ
    with pytest.raises(RuntimeError, match=r"triton was already imported without TRITON_INTERPRET=1"):
        backends.use_interpreter_if_no_gpu(force=True)
    monkeypatch.setattr(backends, "_cuda_gpu_present", lambda: False)
    with pytest.raises(RuntimeError, match=r"call it before anything imports triton"):
        backends.use_interpreter_if_no_gpu()
    # Before triton is imported it sets the variable.
    monkeypatch.setattr(backends.sys, "modules", {k: v for k, v in sys.modules.items()
                                                  if k != "triton" and not k.startswith("sparse24.kernels")})
    assert backends.use_interpreter_if_no_gpu() is True
    assert backends.os.environ["TRITON_INTERPRET"] == "1"


# --------------------------------------------------------------------------------------
# attention(): validated once, no host round trip
# --------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_each_call_is_validated_once(monkeypatch):
    """unified_attention and attention check the contract once, whatever the backend (the
    reference backend does not check again inside the reference)."""
    from sparse24 import reference
    from sparse24.torch_ops import api

    op = _spy(monkeypatch, api, "prepare_unified_attention")
    padded = _spy(monkeypatch, api, "prepare_padded_attention")
    ref = _spy(monkeypatch, reference, "prepare_unified_attention")
    a, kw = unified_args()
    _call_unified(a, kw)
    assert (len(op), len(padded), len(ref)) == (1, 0, 0)
    p, pkw = padded_args()
    _call_attention(p, pkw)
    _call_attention(p, dict(seq_lens=torch.tensor([8, 3], dtype=torch.int32)))
    assert (len(op), len(padded), len(ref)) == (1, 2, 0)


class _HostTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that read device data on the host, copy host data to the device, or index
    with a boolean mask (a data-dependent shape: a sync)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "item"}

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if name in self.SYNCING:
            self.bad.append(name)
        if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
            self.bad.append(f"{name} on a host tensor")
        if name.startswith("index") and any(t.dtype == torch.bool for t in tensors):
            self.bad.append(f"{name} with a boolean mask")
        return func(*args, **kwargs)


@pytest.mark.parametrize("with_seq_lens", [False, True], ids=["no-seq_lens", "seq_lens"])
def test_padded_attention_makes_no_host_round_trip(monkeypatch, with_seq_lens):
    """On a device (the meta device stands in for a GPU: it has no data to read), attention()
    builds its layout and packs/unpacks without a host read, a host-to-device copy or boolean
    indexing; the maxima it passes are the static shapes."""
    from sparse24.torch_ops import api

    seen = {}

    def fake_dispatch(backend, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, out, **kwargs):
        seen.update(kwargs, q=q.shape, out=out.shape, block_table=block_table.shape, cu=cu_seqlens_q.shape)
        return out

    monkeypatch.setattr(api, "_dispatch", fake_dispatch)
    q = torch.zeros(3, 5, 4, 64, device="meta")
    k = torch.zeros(3, 7, 2, 64, device="meta")
    lens = torch.zeros(3, dtype=torch.int32, device="meta") if with_seq_lens else None
    mode = _HostTraffic()
    with mode:
        out = attention(q, k, k, seq_lens=lens, backend="reference")
    assert mode.bad == []
    assert out.shape == q.shape and out.device.type == "meta"
    assert seen["max_seqlen_q"] == 5 and seen["max_seqlen_k"] == 7
    assert seen["q"] == (15, 4, 64) and seen["out"] == (15, 4, 64) and seen["cu"] == (4,)


@pytest.mark.parametrize("seq_lens", [[8, 3], [0, 5], [2, 0], [8, 8]])
@pytest.mark.parametrize("seqlen_q", [5, 1, 8])
def test_padded_attention_layout_matches_per_row_calls(seq_lens, seqlen_q):
    """The gathers pack exactly the real rows (the first min(seqlen_q, seq_lens[b]) of row b) and
    padding rows come back as zeros."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, seqlen_q, 4, 64, generator=gen)
    k = torch.randn(2, 8, 2, 64, generator=gen)
    v = torch.randn(2, 8, 2, 64, generator=gen)
    cfg = SparsityConfig(dense_recent_tokens=0)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    out = attention(q, k, v, config=cfg, seq_lens=lens, backend="reference")
    for b in range(2):
        q_len = min(seqlen_q, seq_lens[b])
        if q_len:
            want = unified_attention(q[b, :q_len], k[b:b + 1, :seq_lens[b]], v[b:b + 1, :seq_lens[b]],
                                     torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, q_len], dtype=torch.int32),
                                     lens[b:b + 1], config=cfg, backend="reference")
            torch.testing.assert_close(out[b, :q_len], want, atol=1e-6, rtol=1e-6)
        assert (out[b, q_len:] == 0).all()


@pytest.mark.parametrize("with_seq_lens", [False, True], ids=["no-seq_lens", "seq_lens"])
def test_padded_attention_compiles_without_graph_breaks(kernel_backend, with_seq_lens):
    """No host read on the way to the kernel: attention() traces with fullgraph=True (on the
    CPU through aot_eager around the interpreted op, on the GPU through Inductor)."""
    backend, device = kernel_backend
    gen = torch.Generator().manual_seed(4)
    q = torch.randint(-1, 2, (2, 5, 4, 64), generator=gen).float().to(device)
    k = torch.randint(-1, 2, (2, 7, 2, 64), generator=gen).float().to(device)
    v = torch.randn(2, 7, 2, 64, generator=gen).to(device)
    lens = torch.tensor([7, 3], dtype=torch.int32, device=device) if with_seq_lens else None
    cfg = SparsityConfig(dense_recent_tokens=0)

    def step(q, k, v, lens):
        return attention(q, k, v, config=cfg, seq_lens=lens, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lens), step(q, k, v, lens), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "kernel"])
def test_write_kv_cache_check_slots_false_reads_nothing_and_skips_slots_outside(kernel_backend, monkeypatch, backend):
    """``check_slots=False``: no host read of slot_mapping (its ``cpu()`` is never called), and
    a slot past the cache is skipped like a negative one by the reference and the kernel alike
    (nothing is written outside the caches); the default still raises; a non-bool is a
    TypeError."""
    kernel, device = kernel_backend
    b = kernel if backend == "kernel" else "reference"
    a, kw = kv_write_args(device)
    a["slot_mapping"] = _int32([0, 17, 64, 2, 1000])(a["slot_mapping"])  # 64 and 1000: past 4 x 16 slots
    with pytest.raises(ValueError, match=r"^slot_mapping must hold slots < num_blocks \* block_size = 64"):
        _call_write(a, kw, backend=b)
    with pytest.raises(TypeError, match=r"^check_slots must be a bool, got int"):
        _call_write(a, dict(kw, check_slots=1), backend=b)
    read = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *x, **y: read.append(t) or real_cpu(t, *x, **y))
    k_cache, v_cache = _call_write(a, dict(kw, check_slots=False), backend=b)
    monkeypatch.undo()
    assert not any(t is a["slot_mapping"] for t in read)
    written = k_cache.abs().sum(dim=(-1, -2)).count_nonzero()
    assert written == 3 and torch.equal(k_cache[1, 1], a["k"][1]) and torch.equal(v_cache[0, 2], a["v"][3])
