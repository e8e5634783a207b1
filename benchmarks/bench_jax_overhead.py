"""JAX (jax-triton) vs PyTorch launch of the same kernel, same plan, same card, one run.

For each shape (docs/SPEC.md §5: prefill B=1 S 4k/16k H 32/8 D 128 causal bf16; decode B=32
4k context page 16) and config (dense, 2:4) it checks that the outputs are bit-identical,
then times both the same way: N back-to-back calls of a jitted JAX function / the torch op
with fixed inputs, wall clock between two device syncs, median of 7 repeats. Writes
``benchmarks/results/jax-overhead-<card>.json`` and prints a table.

    python benchmarks/bench_jax_overhead.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import sparse24
from sparse24 import SparsityConfig
from sparse24.jax_ops import unified_attention as jax_unified_attention
from sparse24.torch_ops import unified_attention as torch_unified_attention


def _time(fn, sync, calls: int, repeats: int = 7) -> float:
    fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn()
        sync(result)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def shapes():
    hq, hkv, d = 32, 8, 128
    for seqlen in (4096, 16384):
        yield f"prefill B=1 S={seqlen}", dict(q_lens=[seqlen], kv_lens=[seqlen], page=seqlen, hq=hq, hkv=hkv, d=d)
    yield "decode B=32 ctx=4096", dict(q_lens=[1] * 32, kv_lens=[4096] * 32, page=16, hq=hq, hkv=hkv, d=d)


def build(spec, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q_lens, kv_lens, page = spec["q_lens"], spec["kv_lens"], spec["page"]
    pages = [-(-k // page) for k in kv_lens]
    num_blocks = sum(pages)
    q = torch.randn(sum(q_lens), spec["hq"], spec["d"], device="cuda", dtype=torch.bfloat16, generator=gen)
    k_cache = torch.randn(num_blocks, page, spec["hkv"], spec["d"], device="cuda", dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_table = torch.zeros(len(kv_lens), max(pages), dtype=torch.int32, device="cuda")
    start = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = perm[start:start + n]
        start += n
    cu = torch.tensor([0] + list(np.cumsum(q_lens)), dtype=torch.int32, device="cuda")
    kv = torch.tensor(kv_lens, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, block_table, cu, kv


def to_jax(t: torch.Tensor):
    return jax.dlpack.from_dlpack(t.contiguous())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    records = []
    for label, spec in shapes():
        tensors = build(spec)
        jax_arrays = [to_jax(t) for t in tensors]
        max_q, max_k = max(spec["q_lens"]), max(spec["kv_lens"])
        for name, cfg in (("dense", SparsityConfig.dense()), ("2:4", SparsityConfig())):
            kwargs = dict(config=cfg, max_seqlen_q=max_q, max_seqlen_k=max_k)
            out_t = torch.empty_like(tensors[0])
            torch_fn = lambda: torch_unified_attention(*tensors, out=out_t, backend="triton", **kwargs)  # noqa: E731
            jax_fn = jax.jit(lambda *a: jax_unified_attention(*a, backend="triton", **kwargs))
            identical = bool(torch.equal(torch_fn(), torch.from_dlpack(jax_fn(*jax_arrays))))
            calls = 20 if max_q > 1 else 200
            t_ms = _time(torch_fn, lambda *_: torch.cuda.synchronize(), calls)
            j_ms = _time(lambda: jax_fn(*jax_arrays), lambda r=None: jax.block_until_ready(r), calls)
            records.append(dict(card=card, date=date, version=sparse24.__version__, shape=label, config=name,
                                torch_ms=t_ms, jax_ms=j_ms, jax_over_torch=j_ms / t_ms, bit_identical=identical))
            print(records[-1], flush=True)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"jax-overhead-{card.replace(' ', '-')}.json").write_text(json.dumps(records, indent=1))
    print("| card | shape | config | torch ms | JAX ms | JAX/torch | bit-identical |\n|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {card} | {r['shape']} | {r['config']} | {r['torch_ms']:.3f} | {r['jax_ms']:.3f} | "
              f"{r['jax_over_torch']:.3f} | {r['bit_identical']} |")


if __name__ == "__main__":
    main()
