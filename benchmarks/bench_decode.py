"""Paged decode speed (and the mixed-batch cost): sparse24 dense and 2:4 against cuDNN SDPA
on a contiguous cache and the card's copy bandwidth, in one run on one card.

Decode: one query token per sequence, page 16 (pages in random order), bf16, H_q=32,
H_kv=8, D=128. GB/s counts the K/V bytes a decode step must read, ``2 * kv_len * H_kv *
D * 2`` per sequence, for every provider. ``copy`` is a 1 GiB device-to-device copy
(bytes read + written per second): the practical memory-speed ceiling.

``sparse24-2:4`` decodes with ``SparsityConfig(sparse_decode=True)``: with the default
(``sparse_decode=False``) a decode step is dense by design and would time the dense path.
``sdpa-cudnn-contiguous`` gets K/V as [B, H_kv, S, D] (``enable_gqa``; if cuDNN refuses
GQA, K/V expanded to the query heads, which then reads 4x the bytes counted).

Mixed batch: 4 prefill chunks (512..2048 tokens, contexts up to 4k) + 60 decodes (4k
contexts) in one launch, against the same two parts launched separately.

    python benchmarks/bench_decode.py        # -> results/decode-<card>.{json,md,png}
"""

from __future__ import annotations

import argparse
import itertools
import math
import pathlib
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common as common  # noqa: E402

from sparse24 import SparsityConfig  # noqa: E402
from sparse24 import reference  # noqa: E402
from sparse24.torch_ops import unified_attention  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = {"b32-4k": (32, 4096), "b8-32k": (8, 32768), "b128-2k": (128, 2048), "b1-128k": (1, 131072)}
CONFIGS = {"sparse24-dense": SparsityConfig.dense(), "sparse24-2:4": SparsityConfig(sparse_decode=True)}
PROVIDERS = list(CONFIGS) + ["sdpa-cudnn-contiguous", "copy"]


def paged_batch(q_lens: list[int], kv_lens: list[int], seed: int = 0):
    """Random bf16 paged inputs: (q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)."""
    torch.manual_seed(seed)
    dev, dt = "cuda", torch.bfloat16
    pages = [math.ceil(n / PAGE) for n in kv_lens]
    num_blocks = sum(pages)
    k_cache = torch.randn(num_blocks, PAGE, HKV, D, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=dev).to(torch.int32)
    block_table = torch.zeros(len(kv_lens), max(pages), dtype=torch.int32, device=dev)
    used = 0
    for b, npg in enumerate(pages):
        block_table[b, :npg] = perm[used:used + npg]
        used += npg
    q = torch.randn(sum(q_lens), HQ, D, device=dev, dtype=dt)
    cu = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32, device=dev)
    kv = torch.tensor(kv_lens, dtype=torch.int32, device=dev)
    return q, k_cache, v_cache, block_table, cu, kv


def contiguous_kv(k_cache, block_table, kv_len: int, batch: int) -> torch.Tensor:
    """[B, H_kv, kv_len, D] copy of the paged cache (for SDPA)."""
    pages = math.ceil(kv_len / PAGE)
    x = k_cache[block_table[:, :pages].long()]  # [B, pages, PAGE, H_kv, D]
    return x.reshape(batch, pages * PAGE, HKV, D)[:, :kv_len].transpose(1, 2).contiguous()


def copy_gbps(env: dict) -> dict:
    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = common.time_ms(lambda: dst.copy_(src))
    shape = dict(B=1, Sq=0, Sk=0, Hq=0, Hkv=0, D=0, causal=False)
    return common.record(env, shape, "copy", ms, gbps=2 * src.numel() * 2 / ms / 1e6, bytes=2 * src.numel() * 2)


def decode_records(name: str, env: dict, rep: int) -> list[dict]:
    batch, ctx = SHAPES[name]
    q, k_cache, v_cache, bt, cu, kv = paged_batch([1] * batch, [ctx] * batch)
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    shape = dict(B=batch, Sq=1, Sk=ctx, Hq=HQ, Hkv=HKV, D=D, causal=True)
    out = torch.empty_like(q)
    records = []
    k = contiguous_kv(k_cache, bt, ctx, batch)
    v = contiguous_kv(v_cache, bt, ctx, batch)
    qs = q.view(batch, HQ, 1, D)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(qs.float(), k.float(), v.float(), enable_gqa=True).view(batch, HQ, D)
    print(f"== decode {name}: B={batch} context {ctx}", flush=True)
    for prov, cfg in CONFIGS.items():
        fn = lambda: unified_attention(q, k_cache, v_cache, bt, cu, kv, config=cfg, out=out, max_seqlen_q=1,  # noqa: E731
                                       max_seqlen_k=ctx, backend="triton")
        fn()
        if prov == "sparse24-dense":
            err = (out.float() - want).abs().max().item()
            if err > 2e-2:
                raise AssertionError(f"{prov} vs SDPA math: max error {err:.3g}")
        else:  # 2:4 decode vs the float64 reference on the first sequence (a 2k prefix)
            n = min(ctx, 2048)
            small = (q[:1], k_cache, v_cache, bt[:1], cu[:2], torch.tensor([n], dtype=torch.int32, device="cuda"))
            got = unified_attention(*small, config=cfg, max_seqlen_q=1, max_seqlen_k=n, backend="triton")
            ref = reference.unified_attention_reference(*small, config=cfg)
            err = (got.double().cpu() - ref.double().cpu()).abs().max().item()
            if err > 3e-2:
                raise AssertionError(f"{prov} vs reference: max error {err:.3g}")
        ms = common.time_ms(fn, rep=rep)
        records.append(common.record(env, shape, prov, ms, gbps=kv_bytes / ms / 1e6, page_size=PAGE,
                                     check_max_err=err))
        print(f"  {prov:24s} {ms:8.4f} ms {kv_bytes / ms / 1e6:7.0f} GB/s  check err {err:.3g}", flush=True)
    gqa_note = "enable_gqa"
    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            got = F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)
            fn = lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)  # noqa: E731
            ms = common.time_ms(fn, rep=rep)
    except RuntimeError:
        gqa_note = "K/V expanded to the query heads (cuDNN refused enable_gqa)"
        ke = k.repeat_interleave(HQ // HKV, dim=1)
        ve = v.repeat_interleave(HQ // HKV, dim=1)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                got = F.scaled_dot_product_attention(qs, ke, ve)
                fn = lambda: F.scaled_dot_product_attention(qs, ke, ve)  # noqa: E731
                ms = common.time_ms(fn, rep=rep)
        except RuntimeError as exc:
            print(f"  sdpa-cudnn-contiguous unavailable: {str(exc).splitlines()[0][:160]}")
            return records
    err = (got.view(batch, HQ, D).float() - want).abs().max().item()
    records.append(common.record(env, shape, "sdpa-cudnn-contiguous", ms, gbps=kv_bytes / ms / 1e6,
                                 check_max_err=err, note=gqa_note))
    print(f"  {'sdpa-cudnn-contiguous':24s} {ms:8.4f} ms {kv_bytes / ms / 1e6:7.0f} GB/s  check err {err:.3g} "
          f"({gqa_note})", flush=True)
    return records


def mixed_records(env: dict, rep: int) -> list[dict]:
    """4 prefill chunks + 60 decodes in one launch vs the two parts launched separately."""
    g = torch.Generator().manual_seed(1)
    chunks = [int(x) for x in torch.randint(512, 2049, (4,), generator=g)]
    chunk_ctx = [c + int(x) for c, x in zip(chunks, torch.randint(0, 2049, (4,), generator=g))]
    q_lens = chunks + [1] * 60
    kv_lens = chunk_ctx + [4096] * 60
    q, k_cache, v_cache, bt, cu, kv = paged_batch(q_lens, kv_lens, seed=2)
    out = torch.empty_like(q)
    split = sum(chunks)
    pre = (q[:split], k_cache, v_cache, bt[:4], cu[:5], kv[:4])
    dec = (q[split:], k_cache, v_cache, bt[4:], cu[4:] - split, kv[4:])
    records = []
    for prov, cfg in (("sparse24-dense", SparsityConfig.dense()), ("sparse24-2:4", SparsityConfig())):
        both = lambda: unified_attention(q, k_cache, v_cache, bt, cu, kv, config=cfg, out=out,  # noqa: E731
                                         max_seqlen_q=max(chunks), max_seqlen_k=4096, backend="triton")
        only_pre = lambda: unified_attention(*pre, config=cfg, max_seqlen_q=max(chunks), max_seqlen_k=4096,  # noqa: E731
                                             backend="triton")
        only_dec = lambda: unified_attention(*dec, config=cfg, max_seqlen_q=1, max_seqlen_k=4096,  # noqa: E731
                                             backend="triton")
        both()
        sep = torch.cat([only_pre(), only_dec()])
        err = (out.float() - sep.float()).abs().max().item()
        if err > 2e-2:
            raise AssertionError(f"mixed {prov}: one launch vs separate launches differ by {err:.3g}")
        ms_both = common.time_ms(both, rep=rep)
        ms_pre = common.time_ms(only_pre, rep=rep)
        ms_dec = common.time_ms(only_dec, rep=rep)
        shape = dict(B=64, Sq=sum(q_lens), Sk=4096, Hq=HQ, Hkv=HKV, D=D, causal=True, mixed=dict(
            prefill_chunks=chunks, prefill_contexts=chunk_ctx, decodes=60, decode_context=4096))
        records.append(common.record(env, shape, prov + "-mixed", ms_both, mixed_ms=ms_both, prefill_ms=ms_pre,
                                     decode_ms=ms_dec, ratio=ms_both / (ms_pre + ms_dec)))
        print(f"== mixed {prov}: one launch {ms_both:.3f} ms, separate {ms_pre:.3f} + {ms_dec:.3f} ms, "
              f"ratio {ms_both / (ms_pre + ms_dec):.3f}", flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--no-mixed", action="store_true")
    parser.add_argument("--rep", type=int, default=200)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    env = common.environment()
    records = [copy_gbps(env)]
    print(f"copy: {records[0]['gbps']:.0f} GB/s", flush=True)
    for name in args.shapes.split(","):
        records += decode_records(name, env, args.rep)
        torch.cuda.empty_cache()
    if not args.no_mixed:
        records += mixed_records(env, args.rep)
    copy = records[0]["gbps"]
    ratios = [("2:4 / dense", "sparse24-2:4", "sparse24-dense")]
    for r in records[1:]:
        if "gbps" in r:
            r["fraction_of_copy"] = round(r["gbps"] / copy, 3)
    table = common.markdown_table([r for r in records[1:] if "gbps" in r], "gbps", PROVIDERS[:-1],
                                  ratios, env, "Paged decode, GB/s of K/V read")
    table += f"\ncopy bandwidth (1 GiB device-to-device, read + write): {copy:.0f} GB/s\n\n"
    table += "| decode shape | 2:4 / copy | dense / copy |\n|---|---|---|\n"
    for label, by in common.pivot([r for r in records[1:] if "gbps" in r], "gbps", PROVIDERS):
        cells = [f"{by[p]['gbps'] / copy:.2f}" if p in by else "—" for p in ("sparse24-2:4", "sparse24-dense")]
        table += f"| {label} | " + " | ".join(cells) + " |\n"
    mixed = [r for r in records if "ratio" in r]
    if mixed:
        table += "\n| mixed batch (4 chunks + 60 decodes) | one launch ms | prefill ms | decode ms | ratio |\n|---|---|---|---|---|\n"
        for r in mixed:
            table += (f"| {r['provider']} | {r['mixed_ms']:.3f} | {r['prefill_ms']:.3f} | {r['decode_ms']:.3f} | "
                      f"{r['ratio']:.3f} |\n")
    base = common.write_results(records, "decode", env, table, pathlib.Path(args.out))
    common.bar_plot([r for r in records[1:] if "gbps" in r], "gbps", PROVIDERS[:-1], env, "Paged decode (bf16)",
                    base.with_suffix(".png"))
    print(table)
    print(f"wrote {base}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
