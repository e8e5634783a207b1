"""The jax.numpy reference (``sparse24.jax_reference``) against the torch float64 oracle.

Inputs come from ``make_paged_inputs(integer=True, int_range=1)``: small-integer q and k, so
scores are exact in float32 and exact ties are common; a wrong decision (tie rule, region
boundary, group alignment) moves the output by ~1e-1, far beyond the tolerances used here.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.jax_reference import unified_attention_jax_reference
from sparse24.reference import unified_attention_reference
from sparse24.testing import EDGE_CASE_BASE, EDGE_CASES, PagedInputs, assert_close_report, make_paged_inputs

GOLDEN = pathlib.Path(__file__).parent / "data" / "golden"
ARRAYS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")

TOLERANCE = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=2.5e-2, rtol=2e-2),
}
JAX_DTYPE = {torch.float32: jnp.float32, torch.float16: jnp.float16, torch.bfloat16: jnp.bfloat16}


def to_jax(inputs: PagedInputs):
    """torch inputs -> jax arrays of the same dtypes (low precision through float32 numpy)."""
    out = []
    for t in inputs:
        if t.dtype.is_floating_point:
            out.append(jnp.asarray(t.float().numpy()).astype(JAX_DTYPE[t.dtype]))
        else:
            out.append(jnp.asarray(t.numpy()))
    return out


def to_torch(x) -> torch.Tensor:
    """jax array -> torch float64 (a writable copy)."""
    return torch.from_numpy(np.array(jnp.asarray(x, jnp.float32), dtype=np.float64))


# The shared edge-case grid without the split-KV entries (the reference has no split).
BASE = EDGE_CASE_BASE
GRID = {name: case for name, case in EDGE_CASES.items() if "num_kv_splits" not in case}
BF16_CASES = ["mixed", "gqa5", "head-dim-80", "softcap", "dense-decode", "1:8-window"]


def make_case(*, q_lens, kv_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
              config="2:4,recent=0", causal=True, window=None, softcap=None,
              dtype=torch.float32, seed=0):
    inputs = make_paged_inputs(
        q_lens, kv_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        block_size=block_size, dtype=dtype, integer=True, int_range=1, seed=seed,
    )
    kwargs = dict(config=SparsityConfig.parse(config), causal=causal, window=window, softcap=softcap)
    return inputs, kwargs


def check_against_oracle(inputs: PagedInputs, kwargs: dict, dtype=torch.float32, **extra):
    out, lse = unified_attention_jax_reference(*to_jax(inputs), return_lse=True, **kwargs, **extra)
    assert out.dtype == JAX_DTYPE[dtype] and out.shape == inputs.q.shape
    assert lse.dtype == jnp.float32 and lse.shape == inputs.q.shape[:2]
    assert not np.isnan(np.asarray(out, np.float32)).any() and not np.isnan(np.asarray(lse)).any()
    ref_out, ref_lse = unified_attention_reference(*inputs, return_lse=True, **kwargs)
    assert_close_report(to_torch(out), ref_out, name="out", **TOLERANCE[dtype])
    assert_close_report(to_torch(lse), ref_lse, atol=1e-4, rtol=1e-5, name="lse")
    return out, lse


@pytest.mark.parametrize("case", list(GRID), ids=list(GRID))
def test_matches_oracle_fp32(case):
    inputs, kwargs = make_case(**{**BASE, **GRID[case]})
    check_against_oracle(inputs, kwargs)


@pytest.mark.parametrize("case", BF16_CASES, ids=BF16_CASES)
def test_matches_oracle_bf16(case):
    inputs, kwargs = make_case(**{**BASE, **GRID[case]}, dtype=torch.bfloat16)
    check_against_oracle(inputs, kwargs, dtype=torch.bfloat16)


def test_matches_oracle_fp16():
    inputs, kwargs = make_case(**BASE, config="2:4,sink=3,recent=6", dtype=torch.float16)
    check_against_oracle(inputs, kwargs, dtype=torch.float16)


def test_long_context_chunk_sizes_agree():
    """Several key chunks and pages per sequence, a window that makes whole chunks skippable:
    chunk_size 8 and 256 (and small query chunks) agree to 1e-6 and with the oracle."""
    inputs, kwargs = make_case(q_lens=(1, 40, 1), kv_lens=(333, 301, 170),
                               config="2:4,sink=4,recent=16", window=100)
    big, big_lse = check_against_oracle(inputs, kwargs, chunk_size=256)
    small, small_lse = check_against_oracle(inputs, kwargs, chunk_size=8, query_chunk=7)
    np.testing.assert_allclose(np.asarray(small), np.asarray(big), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(small_lse), np.asarray(big_lse), atol=1e-6, rtol=0)


def test_empty_rows_and_padding_tokens():
    """Rows that keep nothing (every score -inf) give zeros and lse -inf (no NaN); an empty
    sequence in the middle of the batch changes nothing. Tokens past cu_seqlens_q[-1] (the
    contract rejects them; only the padded attention() packs its batch so, through the
    computation itself) are zeros."""
    from sparse24.jax_reference import _forward

    inputs, kwargs = make_case(q_lens=(6, 0, 3), kv_lens=(20, 5, 9), config="2:4,recent=0", window=3)
    q = inputs.q.clone()
    q[:4] = -float("inf")  # against k > 0: -inf scores everywhere
    inputs = inputs._replace(q=q, k_cache=inputs.k_cache.abs() + 1.0)
    out, lse = check_against_oracle(inputs, kwargs)
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isneginf(lse[:4]).all() and (out[:4] == 0).all()
    assert np.isfinite(lse[4:9]).all()

    padded = to_jax(inputs._replace(q=torch.cat([q, torch.ones(4, *q.shape[1:])])))  # 4 tokens of no sequence
    core_out, core_lse = _forward(*padded, config=kwargs["config"], causal=True, scale=1 / 8, window=3, softcap=0.0,
                                  chunk_size=256, query_chunk=128)
    core_out, core_lse = np.asarray(core_out), np.asarray(core_lse)
    np.testing.assert_array_equal(core_out[:9], out)
    assert np.isneginf(core_lse[9:]).all() and (core_out[9:] == 0).all()


def test_unused_slots_and_pages_are_never_read():
    """NaN in every cache slot that holds no key of its sequence (unused pages, among them the
    first and the last page, and the tail of a last page) and out-of-range unused block-table
    entries change nothing, bit for bit."""
    inputs, kwargs = make_case(**BASE, config="2:4,sink=3,recent=6", window=30)
    arrays = to_jax(inputs)
    clean = unified_attention_jax_reference(*arrays, **kwargs)
    block_size = inputs.k_cache.shape[1]
    # one page in front and one behind: pages 0 and num_blocks - 1 hold no key
    table = inputs.block_table + 1
    shape = (inputs.k_cache.shape[0] + 2,) + inputs.k_cache.shape[1:]
    real = torch.zeros(shape[:2], dtype=torch.bool)
    for b, kv_len in enumerate(inputs.seq_lens.tolist()):
        pages = -(-kv_len // block_size)
        for j in range(kv_len):
            real[table[b, j // block_size], j % block_size] = True
        table[b, pages:] = torch.tensor([-1, 10**6]).repeat(table.shape[1])[: table.shape[1] - pages]
    assert not real[0].any() and not real[-1].any() and not real.all(dim=1).all()

    def poison(cache):
        padded = torch.cat([cache[:1], cache, cache[:1]])
        return torch.where(real[..., None, None], padded, torch.tensor(float("nan")))

    poisoned = inputs._replace(k_cache=poison(inputs.k_cache), v_cache=poison(inputs.v_cache),
                               block_table=table)
    dirty = unified_attention_jax_reference(*to_jax(poisoned), **kwargs)
    np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_jit_with_traced_metadata_equals_eager():
    inputs, kwargs = make_case(**BASE, config="2:4,sink=3,recent=6", window=30)
    arrays = to_jax(inputs)
    eager_out, eager_lse = unified_attention_jax_reference(*arrays, return_lse=True, **kwargs)
    traced = []

    @jax.jit
    def fn(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        traced.append(isinstance(seq_lens, jax.core.Tracer) and isinstance(block_table, jax.core.Tracer))
        return unified_attention_jax_reference(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                               seq_lens, return_lse=True, **kwargs)

    out, lse = fn(*arrays)
    assert traced == [True]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(eager_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(eager_lse))
    ref_out = unified_attention_reference(*inputs, **kwargs)
    assert_close_report(to_torch(out), ref_out, name="jit out", **TOLERANCE[torch.float32])


def test_jit_decode_loop_traces_once():
    """20 decode steps with growing seq_lens and fixed shapes: one trace, every step right."""
    steps = 20
    final = (29, 51, 24)
    inputs, kwargs = make_case(q_lens=(1, 1, 1), kv_lens=final, config="2:4,sink=1,recent=5")
    arrays = to_jax(inputs)
    traces = [0]

    @jax.jit
    def step_fn(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        traces[0] += 1
        return unified_attention_jax_reference(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                               seq_lens, **kwargs)

    for i in range(steps):
        seq_lens = inputs.seq_lens - (steps - 1 - i)
        out = step_fn(*arrays[:5], jnp.asarray(seq_lens.numpy()))
        ref = unified_attention_reference(*inputs._replace(seq_lens=seq_lens), **kwargs)
        assert_close_report(to_torch(out), ref, name=f"decode step {i}", **TOLERANCE[torch.float32])
    assert traces[0] == 1


def test_grad_matches_torch_autograd():
    """The selection is piecewise constant; gradients flow through the kept scores and values."""
    inputs = make_paged_inputs((5, 1), (14, 9), num_q_heads=4, num_kv_heads=2, head_dim=16,
                               block_size=4, seed=3)
    kwargs = dict(config=SparsityConfig(dense_recent_tokens=2), window=12, softcap=4.0)
    weight = torch.randn(inputs.q.shape, generator=torch.Generator().manual_seed(1))
    q64 = inputs.q.double().requires_grad_()
    v64 = inputs.v_cache.double().requires_grad_()
    ref = unified_attention_reference(q64, inputs.k_cache.double(), v64, *inputs[3:], **kwargs)
    (ref * weight.double()).sum().backward()

    arrays = to_jax(inputs)

    def loss(q, v):
        out = unified_attention_jax_reference(q, arrays[1], v, *arrays[3:], chunk_size=8, **kwargs)
        return (out * jnp.asarray(weight.numpy())).sum()

    dq, dv = jax.grad(loss, argnums=(0, 1))(arrays[0], arrays[2])
    assert_close_report(to_torch(dq), q64.grad, atol=1e-4, rtol=1e-4, name="dq")
    assert_close_report(to_torch(dv), v64.grad, atol=1e-4, rtol=1e-4, name="dv")


def test_options_are_validated():
    inputs, kwargs = make_case(**BASE)
    arrays = to_jax(inputs)
    with pytest.raises(TypeError, match=r"^config must be a sparse24\.SparsityConfig or None, got str"):
        unified_attention_jax_reference(*arrays, config="2:4")
    with pytest.raises(ValueError, match="chunk_size"):
        unified_attention_jax_reference(*arrays, config=SparsityConfig(n=2, m=8), chunk_size=12)
    with pytest.raises(ValueError, match="num_q_heads"):
        unified_attention_jax_reference(arrays[0][:, :3], *arrays[1:])
    with pytest.raises(ValueError, match="seq_lens"):
        unified_attention_jax_reference(*arrays[:5], arrays[5].at[0].set(10_000))
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        unified_attention_jax_reference(*arrays[:4], arrays[4].at[1].set(100), arrays[5])
    # None -> SparsityConfig() (2:4, recent 64)
    default = unified_attention_jax_reference(*arrays)
    explicit = unified_attention_jax_reference(*arrays, config=SparsityConfig())
    other = unified_attention_jax_reference(*arrays, config=SparsityConfig(dense_recent_tokens=0))
    np.testing.assert_array_equal(np.asarray(default), np.asarray(explicit))
    assert not np.array_equal(np.asarray(default), np.asarray(other))


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "nm_attention_cases.npz") as data:
        return {key: data[key] for key in data.files}


GOLDEN_CASES = json.loads((GOLDEN / "nm_attention_cases.json").read_text())
_SETTINGS = ("n", "m", "causal", "window", "softcap", "sink", "recent", "sparse_decode")
# The golden cases come in pairs with the same settings and head shapes: each pair runs as
# one batch (pages of the second case renumbered), which halves the compilations and checks
# that batching cases together changes nothing.
GOLDEN_PAIRS = [(a, b) for a, b in zip(GOLDEN_CASES[::2], GOLDEN_CASES[1::2])]


def merge_cases(golden, ids):
    """One batch from several golden cases: (arrays, [(first row, last row) per case])."""
    parts = {name: [golden[f"case{i}_{name}"] for i in ids] for name in ARRAYS}
    width = max(bt.shape[1] for bt in parts["block_table"])
    page0 = np.cumsum([0] + [k.shape[0] for k in parts["k_cache"]])
    row0 = np.cumsum([0] + [q.shape[0] for q in parts["q"]])
    tables = [np.pad(bt + page0[c], ((0, 0), (0, width - bt.shape[1])))
              for c, bt in enumerate(parts["block_table"])]
    cu = np.concatenate([[0]] + [cu[1:] + row0[c] for c, cu in enumerate(parts["cu_seqlens_q"])])
    merged = dict(
        q=np.concatenate(parts["q"]), k_cache=np.concatenate(parts["k_cache"]),
        v_cache=np.concatenate(parts["v_cache"]), block_table=np.concatenate(tables),
        cu_seqlens_q=cu.astype(np.int32), seq_lens=np.concatenate(parts["seq_lens"]),
    )
    return [jnp.asarray(merged[name]) for name in ARRAYS], list(zip(row0[:-1], row0[1:]))


@pytest.mark.parametrize("pair", GOLDEN_PAIRS, ids=lambda p: f"case{p[0]['case']}+{p[1]['case']}")
def test_golden(golden, pair):
    first, second = pair
    assert [first[k] for k in _SETTINGS] == [second[k] for k in _SETTINGS]
    arrays, rows = merge_cases(golden, [first["case"], second["case"]])
    config = SparsityConfig(n=first["n"], m=first["m"], dense_sink_tokens=first["sink"],
                            dense_recent_tokens=first["recent"], sparse_decode=first["sparse_decode"])
    out = unified_attention_jax_reference(*arrays, config=config, causal=first["causal"],
                                          window=first["window"], softcap=first["softcap"],
                                          chunk_size=2 * first["m"])
    assert out.dtype == jnp.float32
    for case, (r0, r1) in zip(pair, rows):
        i = case["case"]
        assert_close_report(to_torch(out[r0:r1]), torch.from_numpy(golden[f"case{i}_out"]), 1e-5, 0.0,
                            f"golden case {i}")


def test_golden_set_is_complete():
    assert [c["case"] for c in GOLDEN_CASES] == list(range(40))


# --------------------------------------------------------------------------------------------
# The one input contract (sparse24.validation.prepare_unified_attention), JAX side: each rule
# settled where the entry points used to disagree, through the JAX ops and the JAX reference
# alike. (The torch side: tests/test_validation.py, "contract rules".)


def _jax_entry_points():
    from sparse24.jax_ops import unified_attention

    return {
        "jax_reference": lambda *a, **kw: unified_attention_jax_reference(*a, **kw),
        "jax_ops-reference": lambda *a, **kw: unified_attention(*a, backend="reference", **kw),
        "jax_ops-auto": lambda *a, **kw: unified_attention(*a, backend="auto", **kw),
    }


RULES = [
    # (id, kwargs, mutate the arrays, error, message)
    ("window-0", dict(window=0), None, ValueError, r"^window must be an int >= 1 .*got 0"),
    ("softmax_scale-0", dict(softmax_scale=0.0), None, ValueError, r"^softmax_scale must be a finite float > 0, got 0.0"),
    ("softmax_scale-negative", dict(softmax_scale=-0.5), None, ValueError,
     r"^softmax_scale must be a finite float > 0, got -0.5"),
    ("config-str", dict(config="2:4,recent=64"), None, TypeError,
     r"^config must be a sparse24\.SparsityConfig or None, got str .*SparsityConfig\.parse"),
    ("cu_seqlens_q-end-short", {}, lambda a: a.__setitem__(4, a[4].at[-1].add(-1)), ValueError,
     r"^cu_seqlens_q \[num_seqs \+ 1\] must end at num_tokens = \d+ \(q.shape\[0\]\), got cu_seqlens_q\[-1\] = "),
    ("q_len>kv_len", {}, lambda a: a.__setitem__(5, a[5].at[0].set(1)), ValueError,
     r"^seq_lens \[num_seqs\] counts every key .*sequence 0 has q_len = 9 > seq_lens\[0\] = 1"),
    ("v_cache-head_dim", {}, lambda a: a.__setitem__(2, a[2][..., :32]), ValueError,
     r"^v_cache must have the shape of k_cache"),
]


@pytest.mark.parametrize("entry", ["jax_reference", "jax_ops-reference", "jax_ops-auto"])
@pytest.mark.parametrize("rule", RULES, ids=[r[0] for r in RULES])
def test_contract_rules_jax(rule, entry):
    _, kwargs, mutate, error, match = rule
    inputs, _ = make_case(**BASE)
    arrays = to_jax(inputs)
    if mutate is not None:
        mutate(arrays)
    with pytest.raises(error, match=match) as info:
        _jax_entry_points()[entry](*arrays, **kwargs)
    assert type(info.value) is error


def test_contract_float64_jax():
    """float64: accepted by the JAX reference (an oracle), a TypeError naming float64 in the ops
    (every backend); the torch side is tested in tests/test_validation.py."""
    from sparse24.jax_ops import attention, unified_attention

    inputs, kwargs = make_case(**BASE)
    with jax.enable_x64(True):
        arrays = [jnp.asarray(t.double().numpy()) if t.dtype.is_floating_point else jnp.asarray(t.numpy())
                  for t in inputs]
        assert arrays[0].dtype == jnp.float64
        out = unified_attention_jax_reference(*arrays, **kwargs)
        assert out.dtype == jnp.float64
        ref = unified_attention_reference(*inputs, **kwargs)
        assert_close_report(torch.from_numpy(np.array(out)), ref, atol=1e-5, rtol=1e-5, name="float64")
        match = r"^q must have dtype in \['float32', 'float16', 'bfloat16'\], got float64 \(float64 is accepted by the references only"
        for backend in ("reference", "auto"):
            with pytest.raises(TypeError, match=match):
                unified_attention(*arrays, backend=backend, **kwargs)
        q = jnp.zeros((1, 4, 2, 8), jnp.float64)
        with pytest.raises(TypeError, match=match):
            attention(q, q[:, :, :1], q[:, :, :1], backend="reference")


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(window=0), ValueError, r"^window must be an int >= 1"),
    (dict(softmax_scale=-1.0), ValueError, r"^softmax_scale must be a finite float > 0"),
    (dict(config="2:4"), TypeError, r"^config must be a sparse24\.SparsityConfig or None, got str"),
], ids=["window-0", "softmax_scale-negative", "config-str"])
def test_contract_rules_jax_padded_attention(kwargs, error, match):
    from sparse24.jax_ops import attention

    q = jnp.zeros((2, 5, 4, 8), jnp.float32)
    k = jnp.zeros((2, 6, 2, 8), jnp.float32)
    with pytest.raises(error, match=match):
        attention(q, k, k, backend="reference", **kwargs)


def test_jax_auto_means_what_torch_auto_means():
    """backend="auto" for JAX: the kernel on a GPU, the interpreter in an interpreting process,
    else the reference: the same resolver as torch (sparse24.backends.resolve_backend)."""
    from sparse24.backends import kernels_interpreted, resolve_backend
    from sparse24.jax_ops.api import resolve_backend as jax_resolve

    want = resolve_backend("auto", "torch", on_gpu=jax.default_backend() == "gpu")
    assert jax_resolve("auto") == want
    if kernels_interpreted():
        assert want == "interpret"
