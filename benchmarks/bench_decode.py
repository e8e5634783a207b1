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

Times are CUDA-graph replays (medians of ``do_bench`` over ``graph.replay``), as serving
engines run decode steps: a decode step takes ~0.1-0.3 ms of GPU time, less than the host
needs to launch it from Python, so eager timings measure the host. The eager GB/s and the
host's submission time per call are recorded next to them.

    python benchmarks/bench_decode.py          # -> results/decode-<card>.{json,md,png}
    python benchmarks/bench_decode.py --sweep  # launch parameters -> results/decode-sweep-<card>.json
"""

from __future__ import annotations

import argparse
import itertools
import json
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
from sparse24.kernels import planner  # noqa: E402
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


def graph_ms(fn, rep: int) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (the GPU's time, no host launch cost)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return common.time_ms(graph.replay, rep=rep)


def host_us(fn, calls: int = 200) -> float:
    """Host time to submit one call (wall clock of back-to-back calls, no sync inside)."""
    import time

    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


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
        ms = graph_ms(fn, rep)
        eager = common.time_ms(fn, rep=rep)
        submit = host_us(fn)
        records.append(common.record(env, shape, prov, ms, gbps=kv_bytes / ms / 1e6, page_size=PAGE,
                                     check_max_err=err, timing="cuda-graph replay", eager_ms=round(eager, 5),
                                     eager_gbps=round(kv_bytes / eager / 1e6, 1), host_us=round(submit, 1)))
        print(f"  {prov:24s} {ms:8.4f} ms {kv_bytes / ms / 1e6:7.0f} GB/s (eager {kv_bytes / eager / 1e6:5.0f} GB/s, "
              f"host {submit:.0f} us/call)  check err {err:.3g}", flush=True)
    gqa_note = "enable_gqa"

    def timed(fn):  # graph replay like ours; eager if cuDNN's call cannot be captured
        try:
            return graph_ms(fn, rep), "cuda-graph replay"
        except RuntimeError:
            return common.time_ms(fn, rep=rep), "eager (graph capture failed)"

    try:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            got = F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)
            fn = lambda: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True)  # noqa: E731
            ms, how = timed(fn)
    except RuntimeError:
        gqa_note = "K/V expanded to the query heads (cuDNN refused enable_gqa)"
        ke = k.repeat_interleave(HQ // HKV, dim=1)
        ve = v.repeat_interleave(HQ // HKV, dim=1)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                got = F.scaled_dot_product_attention(qs, ke, ve)
                fn = lambda: F.scaled_dot_product_attention(qs, ke, ve)  # noqa: E731
                ms, how = timed(fn)
        except RuntimeError as exc:
            print(f"  sdpa-cudnn-contiguous unavailable: {str(exc).splitlines()[0][:160]}")
            return records
    err = (got.view(batch, HQ, D).float() - want).abs().max().item()
    records.append(common.record(env, shape, "sdpa-cudnn-contiguous", ms, gbps=kv_bytes / ms / 1e6,
                                 check_max_err=err, note=gqa_note, timing=how))
    print(f"  {'sdpa-cudnn-contiguous':24s} {ms:8.4f} ms {kv_bytes / ms / 1e6:7.0f} GB/s  check err {err:.3g} "
          f"({gqa_note})", flush=True)
    return records


def mixed_batch():
    """The mixed batch: 4 prefill chunks (512..2048 tokens over contexts up to 4k) + 60 decodes
    at 4k. Returns (chunks, chunk contexts, the whole batch's (q, k_cache, v_cache,
    block_table, cu_seqlens_q, seq_lens), the prefill part's, the decode part's)."""
    g = torch.Generator().manual_seed(1)
    chunks = [int(x) for x in torch.randint(512, 2049, (4,), generator=g)]
    chunk_ctx = [c + int(x) for c, x in zip(chunks, torch.randint(0, 2049, (4,), generator=g))]
    q, k_cache, v_cache, bt, cu, kv = batch = paged_batch(chunks + [1] * 60, chunk_ctx + [4096] * 60, seed=2)
    split = sum(chunks)
    pre = (q[:split], k_cache, v_cache, bt[:4], cu[:5], kv[:4])
    dec = (q[split:], k_cache, v_cache, bt[4:], cu[4:] - split, kv[4:])
    return chunks, chunk_ctx, batch, pre, dec


def mixed_records(env: dict, rep: int) -> list[dict]:
    """4 prefill chunks + 60 decodes in one launch vs the two parts launched separately."""
    chunks, chunk_ctx, (q, k_cache, v_cache, bt, cu, kv), pre, dec = mixed_batch()
    q_lens = chunks + [1] * 60
    out = torch.empty_like(q)
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
        ms_both = graph_ms(both, rep)
        ms_pre = graph_ms(only_pre, rep)
        ms_dec = graph_ms(only_dec, rep)
        shape = dict(B=64, Sq=sum(q_lens), Sk=4096, Hq=HQ, Hkv=HKV, D=D, causal=True, mixed=dict(
            prefill_chunks=chunks, prefill_contexts=chunk_ctx, decodes=60, decode_context=4096))
        records.append(common.record(env, shape, prov + "-mixed", ms_both, mixed_ms=ms_both, prefill_ms=ms_pre,
                                     decode_ms=ms_dec, ratio=ms_both / (ms_pre + ms_dec), timing="cuda-graph replay"))
        print(f"== mixed {prov}: one launch {ms_both:.3f} ms, separate {ms_pre:.3f} + {ms_dec:.3f} ms, "
              f"ratio {ms_both / (ms_pre + ms_dec):.3f}", flush=True)
    return records


SWEEP = dict(tile_n=(32, 64, 128), num_warps=(2, 4, 8), num_stages=(2, 3))
SPLIT_FACTORS = (0.25, 0.5, 2, 4)


def run_sweep(shape_names: list[str], env: dict, rep: int, warm: tuple[int, int] | None = None) -> list[dict]:
    """tile_n x num_warps x num_stages, then the split count, for sparse24 dense and 2:4. Times
    are CUDA-graph replays (the kernels' own time); every output is checked against the
    default plan's. ``warm=(k, n)``: only compile the k-th of every n tile variants (no
    timing), so n processes fill Triton's cache in parallel before the timed run."""
    records = []
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name in shape_names:
        batch, ctx = SHAPES[name]
        q, k_cache, v_cache, bt, cu, kv = paged_batch([1] * batch, [ctx] * batch)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        shape = dict(B=batch, Sq=1, Sk=ctx, Hq=HQ, Hkv=HKV, D=D, causal=True)
        out = torch.empty_like(q)
        for prov, cfg in CONFIGS.items():
            def fn(splits=0):
                return unified_attention(q, k_cache, v_cache, bt, cu, kv, config=cfg, out=out, max_seqlen_q=1,
                                         max_seqlen_k=ctx, backend="triton", num_kv_splits=splits or None)
            fn()
            base = out.clone()
            default_plan = planner.plan_unified_attention(
                num_tokens=batch, num_seqs=batch, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, dtype="bfloat16",
                n=cfg.n, m=cfg.m, max_seqlen_q=1, max_seqlen_k=ctx, num_sms=num_sms)
            grid = [dict(zip(SWEEP, v)) for v in itertools.product(*SWEEP.values())]
            if warm:
                for i, tune in enumerate(grid):
                    if i % warm[1] == warm[0]:
                        try:
                            with planner.tuning(**tune):
                                fn()
                        except Exception:
                            pass
                torch.cuda.synchronize()
                continue
            eager = common.time_ms(fn, warmup=10, rep=rep)
            submit = host_us(fn)
            gdefault = graph_ms(fn, rep)
            print(f"  {name} {prov:15s} default plan (tile {default_plan.tile_n}, warps {default_plan.num_warps}, "
                  f"stages {default_plan.num_stages}, splits {default_plan.num_segments}): graph "
                  f"{kv_bytes / gdefault / 1e6:.0f} GB/s, eager {kv_bytes / eager / 1e6:.0f} GB/s, "
                  f"host {submit:.0f} us/call", flush=True)
            records.append(common.record(env, shape, prov, gdefault, gbps=kv_bytes / gdefault / 1e6,
                                         tuning="default", eager_ms=eager, host_us=submit))
            rows = []
            for tune in grid + [None]:
                if tune is None:  # the split count, with the best tiles
                    best = max(rows, key=lambda r: r[0])[1]
                    base_splits = best["splits"]
                    variants = []
                    for f in SPLIT_FACTORS:
                        s = int(base_splits * f)
                        if 1 <= s <= planner.MAX_KV_SPLITS and s != base_splits:
                            variants.append(dict(best, splits=s))
                else:
                    variants = [dict(tune, splits=0)]
                for var in variants:
                    var = dict(var)
                    splits = var.pop("splits")
                    try:
                        with planner.tuning(**var):
                            fn(splits)
                            err = (out.float() - base.float()).abs().max().item()
                            ms = graph_ms(lambda: fn(splits), rep)
                            used = planner.plan_unified_attention(
                                num_tokens=batch, num_seqs=batch, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                dtype="bfloat16", n=cfg.n, m=cfg.m, max_seqlen_q=1, max_seqlen_k=ctx,
                                num_sms=num_sms, num_kv_splits=splits or None).num_segments
                    except Exception as exc:  # out of resources, compile failures: part of the data
                        print(f"  {prov} {var} splits={splits}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:120]}", flush=True)
                        continue
                    gbps = kv_bytes / ms / 1e6
                    var_rec = dict(var, splits=used)
                    rows.append((gbps, var_rec))
                    records.append(common.record(env, shape, prov, ms, gbps=gbps, tuning=var_rec,
                                                 diff_vs_default=err))
                    print(f"  {name} {prov:15s} {var_rec} {ms:8.4f} ms {gbps:6.0f} GB/s diff {err:.1e}", flush=True)
            rows.sort(key=lambda r: -r[0])
            print(f"best {name} {prov} (graph): " + "; ".join(f"{g:.0f} {c}" for g, c in rows[:5]), flush=True)
        torch.cuda.empty_cache()
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--no-mixed", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="sweep the launch parameters of the sparse24 providers")
    parser.add_argument("--warm", default=None, help="K/N: with --sweep, only compile every N-th variant from K")
    parser.add_argument("--rep", type=int, default=200)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    env = common.environment()
    if args.sweep and args.warm:
        k, n = (int(x) for x in args.warm.split("/"))
        run_sweep(args.shapes.split(","), env, args.rep, warm=(k, n))
        return 0
    if args.sweep:
        records = [copy_gbps(env)] + run_sweep(args.shapes.split(","), env, args.rep)
        path = pathlib.Path(args.out) / f"decode-sweep-{common.card_slug(env['card'])}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1) + "\n")
        print(f"copy {records[0]['gbps']:.0f} GB/s; wrote {path}")
        return 0
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
    table += ("\nTimes: CUDA-graph replays of each call (the GPU's time); the JSON also holds eager GB/s and the "
              "host's submission time per call (`eager_gbps`, `host_us`).\n")
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
