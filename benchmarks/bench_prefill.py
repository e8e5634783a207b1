"""Prefill speed: sparse24 (dense, 2:4, 2:4 recent=0) vs torch SDPA (flash, cuDNN) and
FlexAttention, in one run on one card.

Every provider's output is checked before it is timed: sparse24 dense and FlexAttention
against SDPA, sparse24 2:4 against the float64 reference (``sparse24.reference``) on a
small problem with the same heads. Inputs are fresh random bf16; the sparse24 caches are
paged (page 16, pages in random order). Times: ``triton.testing.do_bench`` medians.
TFLOP/s are dense-equivalent: ``4 * B * H * Sq * Sk * D``, halved for causal (summed
per sequence for the varlen batch), for every provider, so 2:4 is compared on the
work dense attention would do.

    python benchmarks/bench_prefill.py                 # the suite -> results/prefill-<card>.{json,md,png}
    python benchmarks/bench_prefill.py --shapes gqa16k --providers sparse24-dense,sparse24-2:4
    python benchmarks/bench_prefill.py --sweep         # launch-parameter sweep -> results/prefill-sweep-<card>.json

SDPA and FlexAttention get K/V already expanded to the query heads (for SDPA; Flex uses
``enable_gqa``) and in [B, H, S, D]; that copy is outside the timed region. The varlen batch
runs SDPA once per sequence (no varlen SDPA in torch) and Flex on the packed batch with a
document-causal block mask.
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

SPARSE24 = {
    "sparse24-dense": SparsityConfig.dense(),
    "sparse24-2:4": SparsityConfig(),
    "sparse24-2:4-recent0": SparsityConfig(dense_recent_tokens=0),
    # on request (--providers): not in the default suite
    "sparse24-1:4": SparsityConfig(n=1, m=4),
    "sparse24-4:8": SparsityConfig(n=4, m=8),
    "sparse24-2:8": SparsityConfig(n=2, m=8),
}
PROVIDERS = ["sparse24-dense", "sparse24-2:4", "sparse24-2:4-recent0", "sdpa-flash", "sdpa-cudnn", "flex"]
SHAPES = {  # name -> (sequence lengths, Hq, Hkv, D, causal)
    "gqa4k": ([4096], 32, 8, 128, True),
    "gqa16k": ([16384], 32, 8, 128, True),
    "mha2k-b8": ([2048] * 8, 32, 32, 128, True),
    "noncausal8k": ([8192], 32, 8, 128, False),
    "d64-b4": ([4096] * 4, 16, 16, 64, True),
    "varlen": (None, 32, 8, 128, True),  # lengths drawn in 300..6000, seed 0
}
PAGE = 16


def varlen_lengths() -> list[int]:
    g = torch.Generator().manual_seed(0)
    return [int(x) for x in torch.randint(300, 6001, (8,), generator=g)]


class Problem:
    """One prefill problem: packed q, paged K/V for sparse24, [B, H, S, D] views for SDPA."""

    def __init__(self, lens: list[int], hq: int, hkv: int, d: int, causal: bool, page: int = PAGE, seed: int = 0):
        torch.manual_seed(seed)
        dev, dt = "cuda", torch.bfloat16
        self.lens, self.hq, self.hkv, self.d, self.causal, self.page = lens, hq, hkv, d, causal, page
        total = sum(lens)
        self.q = torch.randn(total, hq, d, device=dev, dtype=dt)
        self.k = torch.randn(total, hkv, d, device=dev, dtype=dt)
        self.v = torch.randn(total, hkv, d, device=dev, dtype=dt)
        pages = [math.ceil(n / page) for n in lens]
        num_blocks = sum(pages)
        perm = torch.randperm(num_blocks, device=dev).to(torch.int32)
        self.block_table = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=dev)
        self.k_cache = torch.zeros(num_blocks, page, hkv, d, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        start = used = 0
        for b, (n, npg) in enumerate(zip(lens, pages)):
            ids = perm[used:used + npg]
            self.block_table[b, :npg] = ids
            for cache, src in ((self.k_cache, self.k), (self.v_cache, self.v)):
                padded = torch.zeros(npg * page, hkv, d, device=dev, dtype=dt)
                padded[:n] = src[start:start + n]
                cache[ids.long()] = padded.view(npg, page, hkv, d)
            start += n
            used += npg
        self.cu_seqlens = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)
        self.seq_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        self.out = torch.empty_like(self.q)
        self.equal = len(set(lens)) == 1

    def shape(self) -> dict:
        s = dict(B=len(self.lens), Sq=sum(self.lens) if not self.equal else self.lens[0],
                 Sk=sum(self.lens) if not self.equal else self.lens[0], Hq=self.hq, Hkv=self.hkv, D=self.d,
                 causal=self.causal)
        if not self.equal:
            s["varlen"] = list(self.lens)
        return s

    def flops(self) -> float:
        return sum(4 * self.hq * n * n * self.d / (2 if self.causal else 1) for n in self.lens)

    def sparse24(self, config: SparsityConfig):
        return lambda: unified_attention(
            self.q, self.k_cache, self.v_cache, self.block_table, self.cu_seqlens, self.seq_lens, config=config,
            causal=self.causal, out=self.out, max_seqlen_q=max(self.lens), max_seqlen_k=max(self.lens),
            backend="triton")

    def bhsd(self, x: torch.Tensor, b: int, heads: int) -> torch.Tensor:
        """Rows of sequence b as [1, heads, n, D] (K/V expanded to the query heads)."""
        start, n = int(self.cu_seqlens[b]), self.lens[b]
        t = x[start:start + n].transpose(0, 1)
        if t.shape[0] != heads:
            t = t.repeat_interleave(heads // t.shape[0], dim=0)
        return t.unsqueeze(0).contiguous()

    def sdpa(self, backend):
        if self.equal:
            q = torch.cat([self.bhsd(self.q, b, self.hq) for b in range(len(self.lens))])
            k = torch.cat([self.bhsd(self.k, b, self.hq) for b in range(len(self.lens))])
            v = torch.cat([self.bhsd(self.v, b, self.hq) for b in range(len(self.lens))])
            qkv = [(q, k, v)]
        else:
            qkv = [(self.bhsd(self.q, b, self.hq), self.bhsd(self.k, b, self.hq), self.bhsd(self.v, b, self.hq))
                   for b in range(len(self.lens))]

        def run():
            with sdpa_kernel(backend):
                return [F.scaled_dot_product_attention(q, k, v, is_causal=self.causal) for q, k, v in qkv]

        return run

    def sdpa_packed(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """SDPA outputs back to the packed [T, Hq, D] layout."""
        if self.equal:
            return torch.cat([o.transpose(1, 2).reshape(-1, self.hq, self.d) for o in outs[0].split(1)])
        return torch.cat([o[0].transpose(0, 1) for o in outs])

    def flex(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        causal = self.causal
        if self.equal:
            b, n = len(self.lens), self.lens[0]
            q = self.q.view(b, n, self.hq, self.d).transpose(1, 2).contiguous()
            k = self.k.view(b, n, self.hkv, self.d).transpose(1, 2).contiguous()
            v = self.v.view(b, n, self.hkv, self.d).transpose(1, 2).contiguous()

            def mask_mod(b_, h_, qi, ki):
                return qi >= ki if causal else qi >= 0

            block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda")
        else:
            total = sum(self.lens)
            q = self.q.transpose(0, 1).unsqueeze(0).contiguous()
            k = self.k.transpose(0, 1).unsqueeze(0).contiguous()
            v = self.v.transpose(0, 1).unsqueeze(0).contiguous()
            doc = torch.repeat_interleave(torch.arange(len(self.lens), device="cuda"),
                                          torch.tensor(self.lens, device="cuda"))

            def mask_mod(b_, h_, qi, ki):
                same = doc[qi] == doc[ki]
                return same & (qi >= ki) if causal else same

            block_mask = create_block_mask(mask_mod, None, None, total, total, device="cuda")

        def run():
            return flex(q, k, v, block_mask=block_mask, enable_gqa=self.hq != self.hkv)

        return run

    def flex_packed(self, o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(-1, self.hq, self.d)


def check_sparse(hq: int, hkv: int, d: int, causal: bool, config: SparsityConfig, tol: float = 3e-2) -> float:
    """Max |kernel - float64 reference| on a small problem (two sequences, 333 and 517 tokens)."""
    p = Problem([333, 517], hq, hkv, d, causal, seed=1)
    p.sparse24(config)()
    ref = reference.unified_attention_reference(p.q, p.k_cache, p.v_cache, p.block_table, p.cu_seqlens,
                                                p.seq_lens, config=config, causal=causal)
    err = (p.out.double().cpu() - ref.double().cpu()).abs().max().item()
    if not err <= tol:
        raise AssertionError(f"sparse24 {config} vs reference: max error {err:.3g} > {tol}")
    return err


def run_suite(shape_names: list[str], providers: list[str], env: dict, rep: int) -> list[dict]:
    records = []
    checked = set()
    for name in shape_names:
        lens, hq, hkv, d, causal = SHAPES[name]
        p = Problem(lens or varlen_lengths(), hq, hkv, d, causal)
        shape, flops = p.shape(), p.flops()
        print(f"== {name}: {common.shape_label(shape)}", flush=True)
        sdpa_out = None
        try:
            sdpa_out = p.sdpa_packed(p.sdpa(SDPBackend.FLASH_ATTENTION)())
        except RuntimeError as err:
            print(f"  sdpa-flash unavailable for the check: {err}")
        for prov in providers:
            try:
                if prov in SPARSE24:
                    cfg = SPARSE24[prov]
                    fn = p.sparse24(cfg)
                    fn()
                    if prov == "sparse24-dense":
                        err = (p.out.float() - sdpa_out.float()).abs().max().item() if sdpa_out is not None else None
                        if err is not None and err > 2e-2:
                            raise AssertionError(f"sparse24-dense vs SDPA: max error {err:.3g}")
                    else:
                        key = (hq, hkv, d, causal, prov)
                        if key not in checked:
                            err = check_sparse(hq, hkv, d, causal, cfg)
                            checked.add(key)
                        else:
                            err = None
                elif prov.startswith("sdpa"):
                    backend = SDPBackend.FLASH_ATTENTION if prov == "sdpa-flash" else SDPBackend.CUDNN_ATTENTION
                    fn = p.sdpa(backend)
                    out = p.sdpa_packed(fn())
                    err = (out.float() - sdpa_out.float()).abs().max().item() if sdpa_out is not None else None
                    if err is not None and err > 2e-2:
                        raise AssertionError(f"{prov} vs sdpa-flash: max error {err:.3g}")
                else:
                    fn = p.flex()
                    out = p.flex_packed(fn())
                    err = (out.float() - sdpa_out.float()).abs().max().item() if sdpa_out is not None else None
                    if err is not None and err > 2e-2:
                        raise AssertionError(f"flex vs sdpa-flash: max error {err:.3g}")
                ms = common.time_ms(fn, rep=rep)
            except (RuntimeError, NotImplementedError) as exc:  # a provider that does not run here
                print(f"  {prov:22s} unavailable: {str(exc).splitlines()[0][:160]}", flush=True)
                continue
            tflops = flops / ms / 1e9
            records.append(common.record(env, shape, prov, ms, tflops=tflops, page_size=PAGE if prov in SPARSE24 else None,
                                         check_max_err=err))
            print(f"  {prov:22s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s   check err {err}", flush=True)
        del p
        torch.cuda.empty_cache()
    return records


SWEEP = dict(block_m=(64, 128), tile_n=(64, 128), num_warps=(4, 8), num_stages=(2, 3))


def parse_grid(text: str) -> dict:
    """'block_m=128,256;tile_n=64' -> {"block_m": (128, 256), "tile_n": (64,)} (keys of SWEEP)."""
    grid = {}
    for part in filter(None, text.split(";")):
        key, _, values = part.partition("=")
        if key.strip() not in SWEEP:
            raise SystemExit(f"--sweep-grid: unknown parameter {key!r}, expected one of {list(SWEEP)}")
        grid[key.strip()] = tuple(int(v) for v in values.split(","))
    return grid


def run_sweep(shape_names: list[str], providers: list[str], env: dict, rep: int, grid: dict | None = None) -> list[dict]:
    """Every tuning() combination for the sparse24 providers; outputs checked against the default plan."""
    grid = grid or SWEEP
    records = []
    for name in shape_names:
        lens, hq, hkv, d, causal = SHAPES[name]
        p = Problem(lens or varlen_lengths(), hq, hkv, d, causal)
        shape, flops = p.shape(), p.flops()
        print(f"== sweep {name}: {common.shape_label(shape)}", flush=True)
        for prov in providers:
            cfg = SPARSE24[prov]
            fn = p.sparse24(cfg)
            fn()
            base = p.out.clone()
            rows = []
            for values in itertools.product(*grid.values()):
                tune = dict(zip(grid, values))
                try:
                    with planner.tuning(**tune):
                        fn()
                        err = (p.out.float() - base.float()).abs().max().item()
                        ms = common.time_ms(fn, warmup=10, rep=rep)
                except Exception as exc:  # out of resources, compile failures: part of the data
                    print(f"  {prov} {tune}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                    continue
                tflops = flops / ms / 1e9
                rows.append((tflops, tune))
                records.append(common.record(env, shape, prov, ms, tflops=tflops, tuning=tune, diff_vs_default=err))
                print(f"  {prov:22s} {tune} {ms:8.3f} ms {tflops:6.1f} TFLOP/s diff {err:.2e}", flush=True)
            rows.sort(key=lambda r: -r[0])
            print(f"  best {prov}: " + "; ".join(f"{t:.0f} {c}" for t, c in rows[:3]), flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {PROVIDERS} (also {[p for p in SPARSE24 if p not in PROVIDERS]})")
    parser.add_argument("--sweep", action="store_true", help="sweep the launch parameters of the sparse24 providers")
    parser.add_argument("--sweep-grid", default=None,
                        help="--sweep: the grid, e.g. 'block_m=128,256;tile_n=64,128;num_warps=4,8;num_stages=2' "
                             f"(default {';'.join(k + '=' + ','.join(map(str, v)) for k, v in SWEEP.items())})")
    parser.add_argument("--rep", type=int, default=300, help="do_bench repetition time, ms")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args(argv)
    env = common.environment()
    shapes = args.shapes.split(",")
    providers = args.providers.split(",")
    out_dir = pathlib.Path(args.out)
    if args.sweep:
        providers = [p for p in providers if p in SPARSE24]
        records = run_sweep(shapes, providers, env, args.rep, parse_grid(args.sweep_grid) if args.sweep_grid else None)
        out_dir.mkdir(parents=True, exist_ok=True)
        suffix = "-" + "-".join(shapes) if args.sweep_grid else ""
        path = out_dir / f"prefill-sweep{suffix}-{common.card_slug(env['card'])}.json"
        path.write_text(json.dumps(records, indent=1) + "\n")
        print(f"wrote {path}")
        return 0
    records = run_suite(shapes, providers, env, args.rep)
    columns = [p for p in PROVIDERS if p in providers] + [p for p in providers if p not in PROVIDERS]
    ratios = [("2:4 / dense", "sparse24-2:4", "sparse24-dense"),
              ("2:4 r0 / dense", "sparse24-2:4-recent0", "sparse24-dense"),
              ("1:4 / 2:4", "sparse24-1:4", "sparse24-2:4"),
              ("4:8 / dense", "sparse24-4:8", "sparse24-dense"),
              ("2:8 / dense", "sparse24-2:8", "sparse24-dense"),
              ("dense / flash", "sparse24-dense", "sdpa-flash"),
              ("dense / cuDNN", "sparse24-dense", "sdpa-cudnn")]
    ratios = [r for r in ratios if r[1] in columns and r[2] in columns]
    table = common.markdown_table(records, "tflops", columns, ratios, env, "Prefill, dense-equivalent TFLOP/s")
    base = common.write_results(records, "prefill", env, table, out_dir)
    common.bar_plot(records, "tflops", columns, env, "Prefill (bf16)", base.with_suffix(".png"))
    print(table)
    print(f"wrote {base}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
