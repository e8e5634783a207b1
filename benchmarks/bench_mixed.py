"""Mixed batch under tile variants: one launch against the two parts launched with their own plans.

bench_decode.py's mixed batch (4 prefill chunks of 512..2048 tokens over contexts up to 4k, plus
60 decodes at 4k; bf16, H 32/8, D=128, page 16): the one launch of the whole batch with the
planner's plan (``default``) and with each ``--variants`` tile override (block_m, tile_n,
num_warps, num_stages through ``planner.tuning``), against the prefill part and the decode
part each launched alone with its default plan. Times are CUDA-graph replays (ms). Every
one-launch output is checked against the two parts' outputs. Two rounds. GPU only.

    python benchmarks/bench_mixed.py [--variants 256x64x16x2,64x32x4x2] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_decode as bd  # noqa: E402

from sparse24 import SparsityConfig  # noqa: E402
from sparse24.kernels import planner  # noqa: E402
from sparse24.torch_ops import unified_attention  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", default="256x64x16x2", help="comma-separated block_m x tile_n x warps x stages")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    chunks, chunk_ctx, (q, kc, vc, bt, cu, kv), pre, dec = bd.mixed_batch()
    num_seqs = len(chunks) + 60
    out = torch.empty_like(q)
    variants = [None] + [tuple(int(x) for x in v.split("x")) for v in args.variants.split(",") if v]
    records = []
    for name, cfg in (("dense", SparsityConfig.dense()), ("2:4", SparsityConfig())):
        only_pre = lambda: unified_attention(*pre, config=cfg, max_seqlen_q=max(chunks), max_seqlen_k=4096,  # noqa: E731
                                             backend="triton")
        only_dec = lambda: unified_attention(*dec, config=cfg, max_seqlen_q=1, max_seqlen_k=4096,  # noqa: E731
                                             backend="triton")
        sep = torch.cat([only_pre(), only_dec()])
        ms_pre, ms_dec = bd.graph_ms(only_pre, 50), bd.graph_ms(only_dec, 50)
        default = planner.plan_unified_attention(
            num_tokens=q.shape[0], num_seqs=num_seqs, num_q_heads=bd.HQ, num_kv_heads=bd.HKV, head_dim=bd.D,
            dtype="bfloat16", n=cfg.n, m=cfg.m, max_seqlen_q=max(chunks), max_seqlen_k=4096, num_sms=132)
        print(f"{name}: default plan {default.block_m} x {default.tile_n} / {default.num_warps} warps", flush=True)
        for rnd in range(2):
            for v in variants:
                ctx = (planner.tuning(block_m=v[0], tile_n=v[1], num_warps=v[2], num_stages=v[3]) if v
                       else contextlib.nullcontext())
                with ctx:
                    both = lambda: unified_attention(q, kc, vc, bt, cu, kv, config=cfg, out=out,  # noqa: E731
                                                     max_seqlen_q=max(chunks), max_seqlen_k=4096, backend="triton")
                    both()
                    err = (out.float() - sep.float()).abs().max().item()
                    if err > 2e-2:
                        raise AssertionError(f"{name} {v}: one launch vs the parts differ by {err:.3g}")
                    ms = bd.graph_ms(both, 50)
                label = "default" if v is None else "x".join(map(str, v))
                rec = dict(config=name, variant=label, round=rnd, mixed_ms=ms, prefill_ms=ms_pre, decode_ms=ms_dec,
                           ratio=ms / (ms_pre + ms_dec), max_err=err,
                           default_plan=[default.block_m, default.tile_n, default.num_warps, default.num_stages])
                records.append(rec)
                print(f"{name:5s} {label:12s} r{rnd} one launch {ms:.3f} ms, parts {ms_pre:.3f} + {ms_dec:.3f}, "
                      f"ratio {rec['ratio']:.3f}, err {err:.2e}", flush=True)
    result = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, chunks=chunks, chunk_contexts=chunk_ctx,
                  decodes=60, decode_context=4096, timing="cuda-graph replay, median ms", records=records)
    out_path = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" /
                            f"mixed-{torch.cuda.get_device_name().replace(' ', '-')}.json")
    out_path.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
