"""A first look at the foundation kernel's speed on the lent GPU (not the full suite).

Times, in one run on one card, with ``triton.testing.do_bench`` (median, warm-up
excluded) on fresh random bf16 inputs:
  * prefill B=1, S in {4096, 16384}, H 32/8, D=128, causal: sparse24 dense, sparse24 2:4,
    sparse24 2:4 recent=0, torch SDPA (flash, cuDNN) -- dense-equivalent TFLOP/s;
  * decode B=32, 4k context, page 16: sparse24 dense and 2:4 -- GB/s of KV read.
Writes ``benchmarks/results/quick-<card>.json`` (records as in the prefill issue) and
prints a markdown table.

    python benchmarks/bench_quick.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import sparse24
from sparse24 import SparsityConfig
from sparse24.torch_ops import unified_attention

PROVIDERS = {
    "sparse24-dense": SparsityConfig.dense(),
    "sparse24-2:4": SparsityConfig(),
    "sparse24-2:4-recent0": SparsityConfig(dense_recent_tokens=0),
}


def prefill_records(card: str, date: str, seqlen: int) -> list[dict]:
    hq, hkv, d = 32, 8, 128
    q = torch.randn(seqlen, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, seqlen, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    bt = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    kv = torch.tensor([seqlen], dtype=torch.int32, device="cuda")
    flops = 4 * hq * seqlen * seqlen * d / 2
    shape = dict(B=1, Sq=seqlen, Sk=seqlen, Hq=hq, Hkv=hkv, D=d, causal=True)
    records = []
    out = torch.empty_like(q)
    for name, cfg in PROVIDERS.items():
        fn = lambda: unified_attention(q, k, v, bt, cu, kv, config=cfg, out=out, max_seqlen_q=seqlen,  # noqa: E731
                                       max_seqlen_k=seqlen, backend="triton")
        ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
        records.append(dict(card=card, date=date, version=sparse24.__version__, shape=shape, provider=name,
                            median_ms=ms, tflops=flops / ms / 1e9))
    qs = q.view(1, seqlen, hq, d).transpose(1, 2)
    ks = k.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    vs = v.transpose(1, 2).repeat_interleave(hq // hkv, dim=1)
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                ms = do_bench(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), warmup=100, rep=500,
                              return_mode="median")
        except RuntimeError as err:  # backend unavailable for this shape / build
            print(f"{name}: {err}")
            continue
        records.append(dict(card=card, date=date, version=sparse24.__version__, shape=shape, provider=name,
                            median_ms=ms, tflops=flops / ms / 1e9))
    return records


def decode_records(card: str, date: str, batch=32, context=4096, page=16) -> list[dict]:
    hq, hkv, d = 32, 8, 128
    pages_per_seq = context // page
    num_blocks = batch * pages_per_seq
    k_cache = torch.randn(num_blocks, page, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    bt = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, pages_per_seq)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    cu = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    kv = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    kv_bytes = 2 * batch * context * hkv * d * 2
    shape = dict(B=batch, Sq=1, Sk=context, Hq=hq, Hkv=hkv, D=d, causal=True)
    records = []
    out = torch.empty_like(q)
    for name, cfg in PROVIDERS.items():
        fn = lambda: unified_attention(q, k_cache, v_cache, bt, cu, kv, config=cfg, out=out, max_seqlen_q=1,  # noqa: E731
                                       max_seqlen_k=context, backend="triton")
        ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
        records.append(dict(card=card, date=date, version=sparse24.__version__, shape=shape, provider=name,
                            median_ms=ms, gbps=kv_bytes / ms / 1e6))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    records = prefill_records(card, date, 4096) + prefill_records(card, date, 16384) + decode_records(card, date)
    slug = card.replace(" ", "-")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"quick-{slug}.json").write_text(json.dumps(records, indent=1))
    print(f"| card | shape | provider | median ms | TFLOP/s or GB/s |\n|---|---|---|---|---|")
    for r in records:
        s = r["shape"]
        value = f"{r['tflops']:.0f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
        print(f"| {card} | B={s['B']} Sq={s['Sq']} Sk={s['Sk']} | {r['provider']} | {r['median_ms']:.3f} | {value} |")


if __name__ == "__main__":
    main()
