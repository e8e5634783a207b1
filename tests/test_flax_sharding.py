"""sparse24.flax.llama under a JAX mesh that splits the attention heads (``Llama.shard``).

N:M attention is per head, so splitting the heads over devices must not change what any head
computes. One subprocess with four CPU devices (``--xla_force_host_platform_device_count=4``
must be set before jax is imported) builds a tiny random Llama (2 layers, 8 query heads, 4 KV
heads, GQA) and compares, jitted, with the same model on one device:

* full-sequence logits (a padded batch of two rows) and greedy ``generate`` tokens (a packed
  prefill of two prompts, then a scan of decode steps);
* dense on a 4-device head mesh and 2:4 (``dense_recent_tokens=0``, so the sparsity changes
  the logits) on a 2 x 2 ("batch", "model") mesh (heads over "model", replicated over
  "batch"), on the jax.numpy reference; 2:4 on the 4-device head mesh (one KV head per
  device) on the Triton kernel in the interpreter;
* that the mesh is really used: every KV cache (grown by ``reserve`` too) is split over its
  head axis, every layer's attention is a ``shard_map``, and a head axis that does not divide
  ``num_kv_heads`` is refused.

Each head's attention is the same computation on the same inputs, but XLA compiles the
elementwise code around it (RoPE) differently in the partitioned program, which moves some
keys by one float32 ulp: the logits agree to ~5e-7..9e-7 of their largest magnitude (the
size of jitted vs eager on one device), not bit for bit; the subprocess prints the errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sparse24.flax.llama import Llama, LlamaConfig  # noqa: E402

SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import jax, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from sparse24 import SparsityConfig
from sparse24.flax.llama import Llama, LlamaConfig

assert len(jax.devices()) == 4, jax.devices()
CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_q_heads=8,
                  num_kv_heads=4, head_dim=16)
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
LENGTHS = np.array([24, 17], np.int32)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8]]
DEVICES = np.array(jax.devices())
MESHES = {"heads=4": Mesh(DEVICES, ("model",)), "batch=2 x heads=2": Mesh(DEVICES.reshape(2, 2), ("batch", "model"))}
TWO_FOUR = SparsityConfig(dense_recent_tokens=0)
TOL = 1e-5  # max |sharded - one device| / max |one device|; measured <= 9e-7


def build(attention, backend, mesh=None):
    model = Llama(CFG, attention=attention, backend=backend, num_blocks=4, block_size=4, rngs=nnx.Rngs(0))
    if mesh is not None:
        model.shard(mesh, head_axis="model")
    model.reserve(12)  # 2 rows x 24 tokens in pages of 4, before jit; grown caches stay split
    return model


def check_caches_split(model, mesh):
    for layer in model.layers:
        for cache in (layer.self_attn.paged.k_cache.get_value(), layer.self_attn.paged.v_cache.get_value()):
            assert cache.sharding.is_equivalent_to(NamedSharding(mesh, P(None, None, "model", None)), 4), cache.sharding
            heads_per_device = CFG.num_kv_heads // mesh.shape["model"]
            assert {s.data.shape[2] for s in cache.addressable_shards} == {heads_per_device}


@nnx.jit
def logits(model, tokens, lengths):
    return model(tokens, lengths)


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def count_shard_maps(model):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, t, n: nnx.merge(graphdef, s)(t, n))(state, TOKENS, LENGTHS)
    return str(jaxpr).count("= shard_map[")


dense_logits = None
for backend, name, attention, mesh_name in [
    ("reference", "dense", "dense", "heads=4"),
    ("reference", "2:4", TWO_FOUR, "batch=2 x heads=2"),
    ("interpret", "2:4", TWO_FOUR, "heads=4"),
]:
    one = build(attention, backend)
    want = np.asarray(logits(one, TOKENS, LENGTHS))
    want_tokens = one.generate(PROMPTS, 4)
    if name == "dense":
        dense_logits = want
    else:  # the sparsity matters for these logits
        assert rel_err(want, dense_logits) > 1e-3, rel_err(want, dense_logits)
    mesh = MESHES[mesh_name]
    model = build(attention, backend, mesh)
    check_caches_split(model, mesh)
    assert count_shard_maps(model) == CFG.num_layers
    got = logits(model, TOKENS, LENGTHS)
    assert len(got.sharding.device_set) == 4
    err = rel_err(got, want)
    tokens = model.generate(PROMPTS, 4)
    check_caches_split(model, mesh)
    print(f"{backend} {name} {mesh_name}: logits rel err {err:.1e}, bit-identical "
          f"{np.array_equal(np.asarray(got), want)}, tokens equal {tokens == want_tokens}", flush=True)
    assert err <= TOL, (backend, name, mesh_name, err)
    assert tokens == want_tokens, (backend, name, mesh_name, tokens, want_tokens)

narrow = Llama(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_q_heads=2,
                           num_kv_heads=2, head_dim=4), backend="reference", num_blocks=1, block_size=4)
try:
    narrow.shard(MESHES["heads=4"], head_axis="model")
except ValueError as e:
    assert "has 4 devices, which must divide num_kv_heads (2)" in str(e), e
else:
    raise AssertionError("a 4-device head axis over 2 KV heads was accepted")
assert narrow.mesh is None
print("ok")
"""


def test_sharded_llama_equals_one_device_on_four_cpu_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout[-4000:] + proc.stderr[-8000:]


# ----------------------------------------------------------------------------- argument checks (one device)


def test_shard_checks_its_arguments():
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_layers=1, num_q_heads=2,
                      num_kv_heads=1, head_dim=8)
    model = Llama(cfg, backend="reference", num_blocks=1, block_size=4, rngs=nnx.Rngs(0))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    with pytest.raises(TypeError, match=r"^mesh must be a jax\.sharding\.Mesh, got list$"):
        model.shard(jax.devices()[:1])
    with pytest.raises(ValueError,
                       match=r"^head_axis must name an axis of the mesh \(one of \['data'\]\), got 'model'$"):
        model.shard(mesh)
    with pytest.raises(ValueError, match=r"^head_axis must name an axis .* got \('data',\)$"):
        model.shard(mesh, head_axis=("data",))
    assert model.mesh is None and model.layers[0].self_attn.mesh is None  # nothing was changed
