"""sparse24.jax_ops: the Triton kernel through the JAX launch contract, against the float64 oracle.

On a CPU the kernel runs in Triton's interpreter behind a ``jax.pure_callback`` with the very
argument list the GPU path hands to ``jax_triton.triton_call``; on a GPU through jax-triton.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from sparse24 import SparsityConfig  # noqa: E402
from sparse24.jax_ops import attention, unified_attention, write_kv_cache  # noqa: E402
from sparse24.reference import unified_attention_reference  # noqa: E402
from sparse24.testing import (  # noqa: E402
    EDGE_CASE_BASE,
    TOLERANCE,
    assert_close_report,
    make_paged_inputs,
    to_jax,
    to_torch,
)

BASE = EDGE_CASE_BASE  # the shared edge grid runs, decisions exact, in tests/test_jax_kernel.py


def run_case(backend, *, q_lens, kv_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
             config="2:4,recent=0", causal=True, window=None, softcap=None, num_kv_splits=None,
             dtype=torch.float32):
    cfg = SparsityConfig.parse(config)
    inputs = make_paged_inputs(q_lens, kv_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, block_size=block_size, dtype=dtype, integer=True, int_range=1)
    out, lse = unified_attention(*to_jax(inputs), config=cfg, causal=causal, window=window, softcap=softcap,
                                 num_kv_splits=num_kv_splits, return_lse=True, backend=backend)
    assert out.dtype == jnp.dtype(str(dtype).rsplit(".", 1)[-1]) and out.shape == tuple(inputs.q.shape)
    ref, ref_lse = unified_attention_reference(*inputs, config=cfg, causal=causal, window=window, softcap=softcap,
                                               return_lse=True)
    assert_close_report(to_torch(out), ref, name="out", **TOLERANCE[jnp.dtype(out.dtype).name])
    assert_close_report(to_torch(lse), ref_lse, atol=1e-4, rtol=1e-5, name="lse")


def test_jax_reference_backend_matches_oracle():
    run_case("reference", **BASE)


@pytest.mark.parametrize("backend", ["kernel", "reference"])
def test_jit_decode_loop_does_not_retrace(jax_backend, backend):
    """20 decode steps with growing lengths and changing block tables: one trace."""
    backend = jax_backend if backend == "kernel" else "reference"
    inputs = make_paged_inputs((1, 1), (60, 60), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                               integer=True, int_range=1)
    q, k_cache, v_cache, block_table, cu, _ = to_jax(inputs)
    traces = []

    @jax.jit
    def step(q, block_table, seq_lens):
        traces.append(1)
        return unified_attention(q, k_cache, v_cache, block_table, cu, seq_lens, backend=backend)

    for t in range(20):
        lens = jnp.asarray([30 + t, 10 + 2 * t], jnp.int32)
        out = step(q, jnp.roll(block_table, t % 2, axis=0), lens)
    assert len(traces) == 1
    host = make_paged_inputs((1, 1), (60, 60), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                             integer=True, int_range=1)
    host = host._replace(block_table=torch.roll(host.block_table, 1, 0), seq_lens=torch.tensor([49, 48], dtype=torch.int32))
    assert_close_report(to_torch(out), unified_attention_reference(*host), name="last step", **TOLERANCE["float32"])


@pytest.mark.parametrize("shared_cache", [False, True], ids=["per-member-cache", "shared-cache"])
def test_vmap_folds_into_sequences(jax_backend, shared_cache):
    members = [make_paged_inputs((3, 1), (20 + 5 * i, 9 + i), num_q_heads=4, num_kv_heads=2, head_dim=64,
                                 block_size=16, integer=True, int_range=1, seed=i) for i in range(3)]
    if shared_cache:
        members = [m._replace(k_cache=members[0].k_cache, v_cache=members[0].v_cache,
                              block_table=members[0].block_table) for m in members]
    stacked = [jnp.stack(x) for x in zip(*[to_jax(m) for m in members])]
    in_axes = (0, None, None, None, 0, 0) if shared_cache else 0
    if shared_cache:
        stacked[1], stacked[2], stacked[3] = stacked[1][0], stacked[2][0], stacked[3][0]
    cfg = SparsityConfig(dense_recent_tokens=0)
    out = jax.vmap(lambda *a: unified_attention(*a, config=cfg, backend=jax_backend), in_axes=in_axes)(*stacked)
    for i, m in enumerate(members):
        assert_close_report(to_torch(out[i]), unified_attention_reference(*m, config=cfg), name=f"member {i}",
                            **TOLERANCE["float32"])


def test_write_kv_cache_matches_reference_and_jits(jax_backend):
    gen = np.random.default_rng(0)
    k = jnp.asarray(gen.standard_normal((5, 2, 80)), jnp.float32)
    v = jnp.asarray(gen.standard_normal((5, 2, 80)), jnp.float32)
    cache = jnp.zeros((3, 4, 2, 80), jnp.float32)
    slots = jnp.asarray([0, 5, -1, 11, 6], jnp.int32)
    want_k, want_v = write_kv_cache(k, v, cache, cache, slots, backend="reference")
    got_k, got_v = jax.jit(lambda *a: write_kv_cache(*a, backend=jax_backend))(k, v, cache, cache, slots)
    assert np.array_equal(got_k, want_k) and np.array_equal(got_v, want_v)
    assert np.array_equal(want_k[1, 1], k[1]) and np.array_equal(want_v[2, 3], v[3])
    assert int(jnp.count_nonzero(jnp.abs(want_k).sum(axis=(-1, -2)))) == 4  # slot -1 skipped
    assert not np.asarray(cache).any()  # functional: the input is unchanged


@pytest.mark.parametrize("seq_lens", [None, (5, 3)])
def test_padded_attention_matches_torch_semantics(jax_backend, seq_lens):
    from sparse24.torch_ops import attention as torch_attention

    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-1, 2, (2, 5, 4, 64), generator=gen).float()
    k = torch.randint(-1, 2, (2, 5, 2, 64), generator=gen).float()
    v = torch.randn(2, 5, 2, 64, generator=gen)
    cfg = SparsityConfig(dense_recent_tokens=0)
    lens_t = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32)
    lens_j = None if seq_lens is None else jnp.asarray(seq_lens, jnp.int32)
    want = torch_attention(q, k, v, config=cfg, seq_lens=lens_t, backend="reference")
    for backend in (jax_backend, "reference"):
        got = jax.jit(lambda q, k, v, s: attention(q, k, v, config=cfg, seq_lens=s, backend=backend))(
            jnp.asarray(q.numpy()), jnp.asarray(k.numpy()), jnp.asarray(v.numpy()), lens_j)
        assert_close_report(to_torch(got), want, name=backend, **TOLERANCE["float32"])


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"^q must have shape \[num_tokens, num_q_heads, head_dim\]"),
        (lambda a: a.__setitem__(1, a[1].astype(jnp.float16)), TypeError, r"^k_cache must have the dtype of q"),
        (lambda a: a.__setitem__(4, a[4].astype(jnp.float32)), TypeError, r"^cu_seqlens_q must have dtype in \['int32'\]"),
        (lambda a: a.__setitem__(5, a[5] + 100), ValueError, r"^block_table \[num_seqs, max_blocks_per_seq\] is too small"),
        (lambda a: a.__setitem__(0, torch.zeros(3)), TypeError, r"^q must be a jax\.Array, got Tensor"),
    ],
    ids=["q-rank", "cache-dtype", "cu-dtype", "block-table-small", "torch-tensor"],
)
def test_validation_shares_torch_messages(mutate, error, match):
    inputs = make_paged_inputs((3, 1), (20, 9), num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16)
    args = to_jax(inputs)
    mutate(args)
    with pytest.raises(error, match=match):
        unified_attention(*args, backend="reference")


def test_backend_errors():
    args = to_jax(make_paged_inputs((3,), (20,), num_q_heads=2, num_kv_heads=1, head_dim=64, block_size=16))
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        unified_attention(*args, backend="cuda")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"^backend='triton' needs"):
            unified_attention(*args, backend="triton")
    with pytest.raises(TypeError, match=r"^config must be a sparse24\.SparsityConfig"):
        unified_attention(*args, config="2:4", backend="reference")


SHARDING_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from sparse24 import SparsityConfig
from sparse24.jax_ops import unified_attention
from sparse24.testing import make_paged_inputs
assert len(jax.devices()) == 4, jax.devices()
inp = make_paged_inputs((7, 1), (40, 25), num_q_heads=8, num_kv_heads=4, head_dim=64, block_size=16,
                        integer=True, int_range=1)
q, kc, vc, bt, cu, sl = (jnp.asarray(t.numpy()) for t in inp)
cfg = SparsityConfig(dense_recent_tokens=0)
mesh = Mesh(np.array(jax.devices()), ("heads",))
for backend in ("interpret", "reference"):
    def per_device(q, kc, vc, bt, cu, sl):
        return unified_attention(q, kc, vc, bt, cu, sl, config=cfg, backend=backend,
                                 max_seqlen_q=7, max_seqlen_k=40)
    sharded = jax.jit(jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(P(None, "heads", None), P(None, None, "heads", None), P(None, None, "heads", None), P(), P(), P()),
        out_specs=P(None, "heads", None)))
    out = sharded(q, kc, vc, bt, cu, sl)
    full = per_device(q, kc, vc, bt, cu, sl)
    assert len(out.sharding.device_set) == 4
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), atol=1e-6, rtol=1e-6)
    print("ok", backend)
"""


def test_shard_map_over_heads_on_four_cpu_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    assert "ok interpret" in proc.stdout and "ok reference" in proc.stdout


BIT_IDENTITY_CASES = [
    dict(q_lens=(300,), kv_lens=(300,)),  # prefill
    dict(q_lens=(1,) * 16, kv_lens=tuple(range(500, 4500, 250))),  # decode
    dict(q_lens=(1, 64, 1, 200), kv_lens=(4000, 64, 129, 1000)),  # mixed
]
BIT_IDENTITY_CONFIGS = ("2:4", "dense", "4:8,sink=4,recent=0")
BIT_IDENTITY_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Each combination is two compiles (torch and jax-triton), so the full product (54) took over ten
# minutes on an H200. A Latin square instead: every dtype meets every case and every config once,
# and every config runs with and without split-KV (splits=8 for fp16).
@pytest.mark.gpu
@pytest.mark.parametrize("dtype_index", range(3), ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case_index", range(3), ids=["prefill", "decode", "mixed"])
def test_gpu_jax_and_torch_kernels_are_bit_identical(dtype_index, case_index):
    """Same kernel, same launch plan: jax-triton and torch give the same bits."""
    from sparse24.torch_ops import unified_attention as torch_unified_attention

    dtype, case = BIT_IDENTITY_DTYPES[dtype_index], BIT_IDENTITY_CASES[case_index]
    config = BIT_IDENTITY_CONFIGS[(dtype_index + case_index) % 3]
    splits = 8 if dtype_index == 1 else None
    inputs = make_paged_inputs(**case, num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                               dtype=dtype, device="cuda")
    max_q, max_k = max(case["q_lens"]), max(case["kv_lens"])
    kwargs = dict(config=SparsityConfig.parse(config), num_kv_splits=splits, max_seqlen_q=max_q,
                  max_seqlen_k=max_k)
    want = torch_unified_attention(*inputs, backend="triton", **kwargs)
    got = unified_attention(*to_jax(inputs), backend="triton", **kwargs)
    assert torch.equal(to_torch(got).to(dtype), want.cpu()), (dtype, case, splits, config)


def test_write_kv_cache_check_slots_false_skips_slots_outside(jax_backend):
    """The torch door's slot rule (sparse24.validation.check_slots_in_range): a concrete slot
    past the cache is a ValueError by default; ``check_slots=False`` reads nothing and skips it
    (reference and kernel alike, jitted or not); a non-bool is a TypeError."""
    gen = np.random.default_rng(1)
    k = jnp.asarray(gen.standard_normal((5, 2, 80)), jnp.float32)
    cache = jnp.zeros((3, 4, 2, 80), jnp.float32)
    slots = jnp.asarray([0, 5, 12, 11, 1000], jnp.int32)  # 12 and 1000: past 3 x 4 slots
    with pytest.raises(ValueError, match=r"^slot_mapping must hold slots < num_blocks \* block_size = 12"):
        write_kv_cache(k, k, cache, cache, slots, backend=jax_backend)
    with pytest.raises(TypeError, match=r"^check_slots must be a bool, got str"):
        write_kv_cache(k, k, cache, cache, slots, backend=jax_backend, check_slots="no")
    for backend in ("reference", jax_backend):
        eager, _ = write_kv_cache(k, k, cache, cache, slots, backend=backend, check_slots=False)
        jitted, _ = jax.jit(lambda *a: write_kv_cache(*a, backend=backend, check_slots=False))(k, k, cache, cache, slots)
        for got in (eager, jitted):
            assert int(jnp.count_nonzero(jnp.abs(got).sum(axis=(-1, -2)))) == 3, backend
            assert np.array_equal(got[1, 1], k[1]) and np.array_equal(got[2, 3], k[3])
