"""Heads sharded over 1, 2, 4, ... devices with JAX: the kernel and the Flax Llama (issue 18's scaling run).

N:M attention is per head, so a mesh that splits the heads must give each head the result it
has on one device. Two parts, one process, the devices of one host:

``kernel``  prefill, B=1, ``--seq`` tokens, H 32/8, D=128, causal, bf16 (fp32 with ``--tiny``),
            page 16: ``jax_ops.unified_attention`` under ``jax.shard_map`` over a one-axis mesh
            of n devices (q split on its query heads, the paged caches on their KV heads, the
            metadata replicated), jitted, for every n in ``--devices``: the median time of
            ``--reps`` calls (``block_until_ready``), dense-equivalent TFLOP/s in all and per
            device (``4 S^2 H D / 2`` flops), and the largest |difference| from n = 1 (the same
            heads through the same kernel, so 0 is expected). Dense and 2:4.
``model``   the Flax Llama (random weights; Llama-3.2-1B's shape, or a tiny one with ``--tiny``)
            with ``Llama.shard(mesh, head_axis="model")``: greedy ``generate`` tokens equal to
            one device's, and the decode step, ``(t(generate new) - t(generate 1)) / (new - 1)``
            with both generates compiled before they are timed (the decode steps are one
            jitted ``lax.scan``). Dense and 2:4.

On GPUs (through jax-triton; ``--backend triton``, the default there):

    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/bench_multi_gpu.py --devices 1,2,4

On a CPU, as a smoke run (4 host devices; the jax.numpy reference; tests/test_multi_device.py):

    python benchmarks/bench_multi_gpu.py --cpu-devices 4 --tiny --backend reference --devices 1,2,4

Writes ``results/multi-gpu-<card>-x<max n>.json`` (``--out``): the card, the device count and
every figure. Exits 1 if a sharded result differs from one device's beyond ``--atol`` or a
token differs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4", help="mesh sizes to run (each <= the devices present)")
    p.add_argument("--parts", default="kernel,model")
    p.add_argument("--seq", type=int, default=32768, help="kernel: prefill tokens")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--new", type=int, default=32, help="model: new tokens per generate")
    p.add_argument("--batch", type=int, default=8, help="model: prompts per generate")
    p.add_argument("--prompt", type=int, default=1024, help="model: prompt length")
    p.add_argument("--backend", default="auto", help="sparse24 backend (auto: triton on a GPU, reference on a CPU)")
    p.add_argument("--tiny", action="store_true", help="small shapes in fp32 (a CPU smoke run)")
    p.add_argument("--cpu-devices", type=int, default=0, help="run on this many CPU host devices (sets XLA_FLAGS)")
    p.add_argument("--atol", type=float, default=1e-5, help="largest |sharded - one device| allowed, relative to "
                                                            "the largest |one device|")
    p.add_argument("--out", default=None, help="output JSON (default results/multi-gpu-<card>-x<n>.json)")
    args = p.parse_args(argv)
    if args.cpu_devices:  # XLA reads the flag once: before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ["JAX_PLATFORMS"] = "cpu"
    if args.backend == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"

    import jax
    import jax.numpy as jnp
    import numpy as np

    import sparse24
    from sparse24 import SparsityConfig

    sizes = [int(n) for n in args.devices.split(",")]
    devices = jax.devices()
    if max(sizes) > len(devices):
        raise SystemExit(f"--devices asks for {max(sizes)} devices; this host has {len(devices)}: {devices}")
    backend = args.backend
    if backend == "auto":
        backend = "triton" if devices[0].platform == "gpu" else "reference"
    card = getattr(devices[0], "device_kind", devices[0].platform)
    env = dict(card=card, platform=devices[0].platform, devices_present=len(devices), date=datetime.date.today().isoformat(),
               sparse24=sparse24.__version__, jax=jax.__version__, backend=backend, tiny=args.tiny)
    # tiny prompts sit inside the default 64 dense recent keys: keep nothing dense there
    configs = {"dense": SparsityConfig.dense(), "2:4": SparsityConfig(dense_recent_tokens=0) if args.tiny
               else SparsityConfig()}
    records, failures = [], []
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel_part(args, sizes, devices, backend, configs, records, failures, jax, jnp, np)
    if "model" in parts:
        model_part(args, sizes, devices, backend, configs, records, failures, jax, jnp, np)
    out = pathlib.Path(args.out) if args.out else (
        pathlib.Path(__file__).parent / "results" / f"multi-gpu-{str(card).replace(' ', '-')}-x{max(sizes)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, method=__doc__, records=records, failures=failures), indent=1) + "\n")
    for f in failures:
        print("FAIL", f, flush=True)
    return 1 if failures else 0


def _median_s(fn, reps: int) -> float:
    fn()  # compiled and warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernel_part(args, sizes, devices, backend, configs, records, failures, jax, jnp, np) -> None:
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from sparse24.jax_ops import unified_attention
    from sparse24.testing import make_paged_inputs

    import torch

    seq, hq, hkv, d = (256, 8, 4, 64) if args.tiny else (args.seq, 32, 8, 128)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    inputs = make_paged_inputs((seq,), (seq,), num_q_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=16,
                               dtype=dtype, seed=0)
    arrays = [jnp.asarray(t.float().numpy()).astype(jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
              if t.is_floating_point() else jnp.asarray(t.numpy()) for t in inputs]
    flops = 4 * seq * seq * hq * d / 2
    specs = (P(None, "heads", None), P(None, None, "heads", None), P(None, None, "heads", None), P(), P(), P())
    for name, cfg in configs.items():
        def call(q, kc, vc, bt, cu, sl, cfg=cfg):
            return unified_attention(q, kc, vc, bt, cu, sl, config=cfg, backend=backend, max_seqlen_q=seq,
                                     max_seqlen_k=seq)

        base = None
        for n in sizes:
            if hkv % n:
                failures.append(f"kernel {name}: {n} devices do not divide {hkv} KV heads")
                continue
            mesh = Mesh(np.array(devices[:n]), ("heads",))
            fn = jax.jit(jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=P(None, "heads", None)))
            out = fn(*arrays)
            out.block_until_ready()
            seconds = _median_s(lambda: fn(*arrays).block_until_ready(), args.reps)
            got = np.asarray(out.astype(jnp.float32))
            if base is None:
                base = got
            err = float(np.abs(got - base).max() / max(float(np.abs(base).max()), 1e-30))
            rec = dict(part="kernel", config=name, devices=n, seq=seq, heads=[hq, hkv], head_dim=d,
                       dtype=str(arrays[0].dtype), ms=round(seconds * 1e3, 4),
                       tflops=round(flops / seconds / 1e12, 3), tflops_per_device=round(flops / seconds / 1e12 / n, 3),
                       max_rel_diff_vs_1=err, sharding=str(out.sharding.spec))
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if err > args.atol:
                failures.append(f"kernel {name} on {n} devices differs from one device by {err:.3g} (relative)")


def model_part(args, sizes, devices, backend, configs, records, failures, jax, jnp, np) -> None:
    from flax import nnx
    from jax.sharding import Mesh

    from sparse24.flax.llama import Llama, LlamaConfig

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import _common as common

    if args.tiny:
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_q_heads=8,
                          num_kv_heads=4, head_dim=16)
        dtype, batch, prompt, new = jnp.float32, 2, 12, 5
    else:
        cfg = LlamaConfig.from_hf_config(common.LLAMA_1B)
        dtype, batch, prompt, new = jnp.bfloat16, args.batch, args.prompt, args.new
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, prompt).tolist() for _ in range(batch)]
    for name, sparsity in configs.items():
        base = None
        for n in sizes:
            if cfg.num_kv_heads % n:
                failures.append(f"model {name}: {n} devices do not divide {cfg.num_kv_heads} KV heads")
                continue
            model = Llama(cfg, attention=sparsity, backend=backend, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
            if n > 1:
                model.shard(Mesh(np.array(devices[:n]), ("model",)), head_axis="model")
            tokens = model.generate(prompts, new)  # compiles the prefill and the decode scan
            model.generate(prompts, 1)
            t_new = _median_s(lambda: model.generate(prompts, new), max(1, args.reps // 3))
            t_one = _median_s(lambda: model.generate(prompts, 1), max(1, args.reps // 3))
            if base is None:
                base = tokens
            same = tokens == base
            rec = dict(part="model", config=name, devices=n, batch=batch, prompt=prompt, new=new,
                       decode_ms_per_step=round((t_new - t_one) / max(new - 1, 1) * 1e3, 4),
                       prefill_ms=round(t_one * 1e3, 3), tokens_equal_to_1=same)
            records.append(rec)
            print(json.dumps(rec), flush=True)
            if not same:
                failures.append(f"model {name} on {n} devices: greedy tokens differ from one device's")


if __name__ == "__main__":
    sys.exit(main())
