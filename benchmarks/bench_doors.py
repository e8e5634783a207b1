"""The public doors beside the bare kernel, in one process on one card (issue 14, docs/SPEC.md §5).

Sections (``--only`` picks some; each is wrapped: a failure is recorded in the JSON as an error
string and the run goes on; each has a time budget, checked between its items, so the whole run
fits in ~8 minutes on an H200; the JSON is rewritten after every item, so a run killed at its limit
still leaves what it measured):

``torch``  prefill, bf16, causal, dense-equivalent TFLOP/s (``4*B*H*Sq*Sk*D / 2``), medians of
           ``triton.testing.do_bench``, on B=1 S=4096 H 32/8 D=128, B=8 S=2048 H 32/32 D=128 and
           B=4 S=4096 H 16/16 D=64, configs dense (``SparsityConfig.dense()``) and 2:4
           (``SparsityConfig(n=2, m=4, dense_recent_tokens=0)``), through
             kernel        ``torch_ops.unified_attention`` with ``max_seqlen_q/k`` given (the contiguous
                           K/V as one page per sequence: no host read of the metadata; this is the
                           "bare kernel" line of docs/SPEC.md §5),
             unified-nomax ``unified_attention`` without the maxima (validates the metadata on the host),
             attention     ``torch_ops.attention(q, k, v, config=...)`` on [B, S, H, D],
             sdpa-flash / sdpa-cudnn  torch SDPA on the same data ([B, H, S, D] copies made outside
                           the timed region; GQA through ``enable_gqa=True``, else K/V expanded).
           Ratios attention / kernel and unified-nomax / kernel (the issue's target: >= 0.95).
``jax``    the same shapes and configs under ``jax.jit``: ``jax_ops.unified_attention`` with the maxima
           vs ``jax_ops.attention``; wall clock of N back-to-back calls between two
           ``block_until_ready`` (warm-up first, median of 7 repeats; JAX runs on its own stream, so
           ``do_bench``'s torch events cannot time it). Skipped, with the reason, without jax-triton.
``hf``     ``generate`` on a random-weight Llama-3.2-1B-shaped model (bf16, B=8, prompt 4096 random
           tokens, 64 new tokens, greedy, no EOS) for ``sdpa``, ``sparse24`` dense and ``sparse24``
           2:4, each on the same weights (one model; ``set_attn_implementation``):
             prefill     device time from an event recorded just before ``generate`` to the first
                         logits-processor call (prefill forward + input preparation), and the wall
                         clock of ``generate(max_new_tokens=1)``;
             decode      a logits processor records a CUDA event (no sync) at every generated token;
                         ms/step = median (and mean) of the 63 gaps between consecutive events: the
                         device timeline's time per decode step, host stalls included (when the host
                         is the bottleneck the GPU idles between events). Cross-check:
                         (wall(64 new) - wall(1 new)) / 63, each a synced wall clock;
             host syncs  ``torch.profiler`` (CPU + CUDA) over ``generate(1 + 8 new)`` minus
                         ``generate(1 new)``, divided by 8: calls per decode step of
                         ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / ``cudaEventSynchronize``
                         / ``cudaMemcpyAsync`` and the copy activities (``Memcpy HtoD``/``DtoH``) by name;
             static      the same with one ``StaticCache(max_cache_len=prompt + 64)`` passed as
                         ``past_key_values`` and reset before every call (fixed tensor addresses, so
                         the CUDA graphs are recorded once): transformers 5.17 then compiles the
                         decode step itself (``torch.compile(mode="reduce-overhead")``, CUDA graphs,
                         its default ``CompileConfig``) and runs prefill eagerly; one warm-up
                         ``generate`` compiles before anything is timed. Then one
                         ``generate(cache_implementation="static")`` (the documented door) must give
                         the timed run's tokens.
           Greedy tokens of each run are compared with sdpa's (fraction equal; random weights in bf16
           can diverge legitimately, so this is information, not a check).

``--smoke`` runs every section on tiny shapes on the CPU (torch/JAX/HF ``backend="reference"``,
float32, a 2-layer tiny Llama, prompt 16, 4 new tokens, ``time.perf_counter`` loops instead of
``do_bench``, no compilation: transformers compiles only on accelerators) and writes to a
temporary folder, to prove the code paths before a GPU run.

GPU run (the device tool, ``carry=[".whl"]``; the image has no jax-triton, so its 0.3.1 wheel
travels in the git-ignored ``.whl/``: ``python -m pip download --no-deps -d .whl jax-triton==0.3.1``
here; sparse24 itself is installed from the working tree without build isolation, the machine
having no index)::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --no-build-isolation --target /tmp/site .whl/*.whl . && export PYTHONPATH=/tmp/site || exit; \
    PYTHONUNBUFFERED=1 python3 benchmarks/bench_doors.py --out $OUT 2>&1 | tee $OUT/doors-log.txt

then copy ``doors-<card>.{json,md}`` from the returned files into ``benchmarks/results/``. The JSON
and the table are rewritten after every item, so a run stopped at the 10-minute limit still
returns what it measured; ``--only hf --budget hf=520`` re-runs one section alone (merged into an
existing ``doors-<card>.json`` in ``--out``).

    python benchmarks/bench_doors.py --smoke                    # CPU, tiny shapes, -> /tmp/sparse24-doors-smoke
    python benchmarks/bench_doors.py --only torch,jax           # some sections (merged into an existing JSON)
    python benchmarks/bench_doors.py --budget hf=400            # per-section budgets, seconds
    python benchmarks/bench_doors.py --deadline 540             # whole-run soft limit (default), seconds

Writes ``<out>/doors-<card>.json`` (env, method, every figure) and ``<out>/doors-<card>.md``
(the tables, also printed).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave the card's memory to torch too

import torch  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common as common  # noqa: E402

import sparse24  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402

SECTIONS = ("torch", "jax", "hf")
BUDGET_S = {"torch": 100.0, "jax": 100.0, "hf": 300.0}  # soft, checked between items

CONFIGS = {"dense": SparsityConfig.dense(), "2:4": SparsityConfig(n=2, m=4, dense_recent_tokens=0)}
SHAPES = [  # (B, S, Hq, Hkv, D)
    (1, 4096, 32, 8, 128),
    (8, 2048, 32, 32, 128),
    (4, 4096, 16, 16, 64),
]
SMOKE_SHAPES = [(1, 64, 4, 2, 32), (2, 32, 4, 4, 32), (2, 48, 2, 2, 16)]

LLAMA_1B = common.LLAMA_1B
LLAMA_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256, rope_theta=500000.0, tie_word_embeddings=True,
                  max_position_embeddings=512, rms_norm_eps=1e-5)
HF_GPU = dict(batch=8, prompt=4096, new=64, profile_steps=8)
HF_SMOKE = dict(batch=2, prompt=16, new=4, profile_steps=2)
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
              "cudaMemcpy", "aten::_local_scalar_dense")  # the last: .item()/.tolist() (a sync on a GPU tensor)


# --------------------------------------------------------------------------------------------------
# run state: results, budgets, incremental writing


class Run:
    def __init__(self, args, env: dict):
        self.args = args
        self.smoke = args.smoke
        self.env = env
        self.out_dir = pathlib.Path(args.out)
        self.stem = self.out_dir / f"doors-{common.card_slug(env['card'])}"
        self.device = "cpu" if self.smoke else "cuda"
        self.dtype = torch.float32 if self.smoke else torch.bfloat16
        self.backend = "reference" if self.smoke else "triton"
        self.result = dict(env=env, method=METHOD, configs={k: str(v) for k, v in CONFIGS.items()}, sections={})
        if args.only and self.stem.with_suffix(".json").exists():  # merge: keep the sections not re-run
            try:
                old = json.loads(self.stem.with_suffix(".json").read_text())
                for name, sec in old.get("sections", {}).items():
                    if name not in args.only:
                        sec.setdefault("env", old.get("env"))
                        self.result["sections"][name] = sec
            except (OSError, ValueError) as err:
                print(f"could not merge {self.stem}.json: {err}")
        self.deadline = None
        self.section = None

    def start(self, name: str, budget: float) -> dict:
        self.section = dict(status="running", budget_s=budget, records=[], errors=[], skipped=[], notes=[])
        self.result["sections"][name] = self.section
        self.deadline = time.monotonic() + budget
        self.t0 = time.monotonic()
        self.write()
        return self.section

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def over(self, what: str, need: float = 0.0) -> bool:
        """True (and records the skip) when the section's budget has less than ``need`` s left."""
        if self.left() < need:
            self.section["skipped"].append(f"{what}: section budget ({self.section['budget_s']:.0f} s) spent")
            print(f"  skip {what}: budget spent", flush=True)
            return True
        return False

    def error(self, what: str, err: BaseException) -> None:
        msg = f"{what}: {type(err).__name__}: {err}"
        self.section["errors"].append(msg[:2000])
        print(f"  ERROR {msg[:400]}", flush=True)
        if self.args.verbose:
            traceback.print_exc()

    def add(self, record: dict) -> None:
        self.section["records"].append(record)
        print("  " + json.dumps(record, default=str)[:400], flush=True)
        self.write()

    def finish(self, status: str = "done") -> None:
        self.section["status"] = status
        self.section["wall_s"] = round(time.monotonic() - self.t0, 1)
        self.write()

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.stem.with_suffix(".json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        try:  # the table too, so a run stopped at its limit leaves both
            self.stem.with_suffix(".md").write_text(tables(self.result))
        except Exception as err:  # noqa: BLE001
            print(f"table: {type(err).__name__}: {err}")


METHOD = {
    "tflops": "dense-equivalent 4*B*Hq*S*S*D/2 (causal), same for every provider and config",
    "torch_timing": "triton.testing.do_bench median (warm-up excluded), after one untimed call that compiles",
    "jax_timing": "jax.jit, N back-to-back calls between two block_until_ready, median of 7 repeats, warm-up first",
    "kernel": "torch_ops.unified_attention with max_seqlen_q/max_seqlen_k given: no host read of the metadata; "
              "the bare-kernel line of docs/SPEC.md §5",
    "hf_decode_ms_per_step": "CUDA events recorded (no sync) by a logits processor at every generated token; "
                             "median/mean of the gaps = device-timeline time per decode step, host stalls included; "
                             "cross-check (wall(new) - wall(1)) / (new - 1)",
    "hf_prefill_ms": "event before generate() to the first logits-processor call; and synced wall of generate(1 new)",
    "hf_syncs_per_step": "torch.profiler (CPU+CUDA): counts in generate(1+k new) minus generate(1 new), over k",
    "hf_static": "one StaticCache(max_cache_len = prompt + new) passed as past_key_values and reset before every "
                 "generate (fixed addresses: CUDA graphs recorded once); transformers compiles the decode step itself "
                 "(torch.compile mode='reduce-overhead', its default CompileConfig; prefill eager); one warm-up "
                 "generate first; then one generate(cache_implementation='static') whose tokens must equal the timed "
                 "run's (static_door_tokens_equal)",
}


# --------------------------------------------------------------------------------------------------
# timing helpers


def sync(run: Run) -> None:
    if not run.smoke:
        torch.cuda.synchronize()


def time_torch_ms(run: Run, fn) -> float:
    if run.smoke:
        return loop_ms(fn, lambda r: None, calls=2, repeats=3)
    return common.time_ms(fn, warmup=25, rep=run.args.rep)


def loop_ms(fn, block, *, calls: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean wall ms of ``calls`` back-to-back calls between two syncs."""
    block(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            result = fn()
        block(result)
        samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def calls_for(one_ms: float, target_ms: float = 60.0) -> int:
    return max(1, min(200, int(target_ms / max(one_ms, 1e-3))))


def shape_dict(B, S, Hq, Hkv, D) -> dict:
    return dict(B=B, Sq=S, Sk=S, Hq=Hq, Hkv=Hkv, D=D, causal=True)


def label(B, S, Hq, Hkv, D) -> str:
    return f"B={B} S={S} H {Hq}/{Hkv} D={D}"


def flops(B, S, Hq, Hkv, D) -> float:
    return 4.0 * B * Hq * S * S * D / 2


# --------------------------------------------------------------------------------------------------
# 1 + 4: torch prefill, the kernel line beside the doors


def section_torch(run: Run) -> None:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparse24.torch_ops import attention, unified_attention

    dev, dt, be = run.device, run.dtype, run.backend
    shapes = SMOKE_SHAPES if run.smoke else SHAPES
    gen = torch.Generator(device=dev).manual_seed(0)
    for B, S, Hq, Hkv, D in shapes:
        if run.over(f"shape {label(B, S, Hq, Hkv, D)}", need=5.0):
            continue
        try:
            q = torch.randn(B, S, Hq, D, device=dev, dtype=dt, generator=gen)
            k = torch.randn(B, S, Hkv, D, device=dev, dtype=dt, generator=gen)
            v = torch.randn(B, S, Hkv, D, device=dev, dtype=dt, generator=gen)
            # the contiguous K/V as a paged cache of one page per sequence (num_blocks=B, block_size=S)
            q_packed = q.view(B * S, Hq, D)
            block_table = torch.arange(B, dtype=torch.int32, device=dev).view(B, 1)
            cu = (torch.arange(B + 1, dtype=torch.int32, device=dev) * S).to(torch.int32)
            seq_lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            fl = flops(B, S, Hq, Hkv, D)
            shape = shape_dict(B, S, Hq, Hkv, D)
        except Exception as err:  # noqa: BLE001
            run.error(f"inputs {label(B, S, Hq, Hkv, D)}", err)
            continue
        outs = {}
        for cname, cfg in CONFIGS.items():
            doors = {
                "kernel": lambda cfg=cfg: unified_attention(
                    q_packed, k, v, block_table, cu, seq_lens, config=cfg, max_seqlen_q=S, max_seqlen_k=S,
                    backend=be),
                "unified-nomax": lambda cfg=cfg: unified_attention(
                    q_packed, k, v, block_table, cu, seq_lens, config=cfg, backend=be),
                "attention": lambda cfg=cfg: attention(q, k, v, config=cfg, backend=be),
            }
            for door, fn in doors.items():
                if run.over(f"{label(B, S, Hq, Hkv, D)} {cname} {door}", need=2.0):
                    continue
                try:
                    out = fn()  # compiles; checked against the kernel line below
                    sync(run)
                    outs[(cname, door)] = out.reshape(B, S, Hq, D)
                    ms = time_torch_ms(run, fn)
                    rec = common.record(run.env, shape, f"{door}", ms, tflops=fl / ms / 1e9, config=cname,
                                        section="torch")
                    ref = outs.get((cname, "kernel"))
                    if ref is not None and door != "kernel":
                        rec["max_abs_diff_vs_kernel"] = float((outs[(cname, door)].float() - ref.float()).abs().max())
                    run.add(rec)
                except Exception as err:  # noqa: BLE001
                    run.error(f"{label(B, S, Hq, Hkv, D)} {cname} {door}", err)
        # SDPA reference on the same data ([B, H, S, D] copies outside the timed region)
        qs, ks, vs = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        backends = [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]
        if run.smoke:
            backends = [("sdpa-math", SDPBackend.MATH)]
        for name, sb in backends:
            if run.over(f"{label(B, S, Hq, Hkv, D)} {name}", need=2.0):
                continue
            try:
                gqa = "enable_gqa"
                try:
                    with sdpa_kernel(sb):
                        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=Hq != Hkv)
                    kk, vv = ks, vs
                except (RuntimeError, TypeError):
                    if Hq == Hkv:
                        raise
                    gqa = "expanded"
                    kk, vv = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (ks, vs))
                    with sdpa_kernel(sb):
                        out = F.scaled_dot_product_attention(qs, kk, vv, is_causal=True)

                def fn(sb=sb, kk=kk, vv=vv, gqa=gqa):
                    with sdpa_kernel(sb):
                        if gqa == "enable_gqa" and Hq != Hkv:
                            return F.scaled_dot_product_attention(qs, kk, vv, is_causal=True, enable_gqa=True)
                        return F.scaled_dot_product_attention(qs, kk, vv, is_causal=True)

                ms = time_torch_ms(run, fn)
                rec = common.record(run.env, shape, name, ms, tflops=fl / ms / 1e9, config="dense", section="torch",
                                    gqa=gqa if Hq != Hkv else "none")
                ref = outs.get(("dense", "kernel"))
                if ref is not None:
                    rec["max_abs_diff_vs_kernel"] = float((out.transpose(1, 2).float() - ref.float()).abs().max())
                run.add(rec)
            except Exception as err:  # noqa: BLE001
                run.error(f"{label(B, S, Hq, Hkv, D)} {name}", err)
        del q, k, v, qs, ks, vs, outs
        gc.collect()
        if not run.smoke:
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# 2: JAX prefill under jit


def section_jax(run: Run) -> None:
    import jax
    import jax.numpy as jnp

    from sparse24.jax_ops import attention, unified_attention

    if run.smoke:
        be = "reference"
        run.section["notes"].append(f"smoke: backend='reference' on {jax.default_backend()}")
    else:
        if jax.default_backend() != "gpu":
            run.section["skipped"].append(f"jax default backend is {jax.default_backend()!r}, not 'gpu'")
            return
        try:
            from sparse24.jax_ops._launch import jax_triton  # keeps the process's TRITON_CACHE_DIR

            jax_triton()
        except Exception as err:  # noqa: BLE001
            run.section["skipped"].append(f"jax-triton not importable: {type(err).__name__}: {err}")
            return
        be = "triton"
    dt = jnp.float32 if run.smoke else jnp.bfloat16
    shapes = SMOKE_SHAPES if run.smoke else SHAPES
    key = jax.random.PRNGKey(0)
    for B, S, Hq, Hkv, D in shapes:
        if run.over(f"shape {label(B, S, Hq, Hkv, D)}", need=5.0):
            continue
        try:
            key, kq, kk, kv = jax.random.split(key, 4)
            q = jax.random.normal(kq, (B, S, Hq, D), dt)
            k = jax.random.normal(kk, (B, S, Hkv, D), dt)
            v = jax.random.normal(kv, (B, S, Hkv, D), dt)
            q_packed = q.reshape(B * S, Hq, D)
            block_table = jnp.arange(B, dtype=jnp.int32)[:, None]
            cu = jnp.arange(B + 1, dtype=jnp.int32) * S
            seq_lens = jnp.full((B,), S, jnp.int32)
            fl = flops(B, S, Hq, Hkv, D)
            shape = shape_dict(B, S, Hq, Hkv, D)
        except Exception as err:  # noqa: BLE001
            run.error(f"inputs {label(B, S, Hq, Hkv, D)}", err)
            continue
        for cname, cfg in CONFIGS.items():
            uni = jax.jit(lambda q_, k_, v_, bt_, cu_, sl_, cfg=cfg, S=S: unified_attention(
                q_, k_, v_, bt_, cu_, sl_, config=cfg, max_seqlen_q=S, max_seqlen_k=S, backend=be))
            att = jax.jit(lambda q_, k_, v_, cfg=cfg: attention(q_, k_, v_, config=cfg, backend=be))
            doors = {"kernel": lambda uni=uni: uni(q_packed, k, v, block_table, cu, seq_lens),
                     "attention": lambda att=att: att(q, k, v)}
            outs = {}
            for door, fn in doors.items():
                if run.over(f"{label(B, S, Hq, Hkv, D)} {cname} jax {door}", need=3.0):
                    continue
                try:
                    t = time.perf_counter()
                    outs[door] = jax.block_until_ready(fn())  # trace + compile
                    compile_s = time.perf_counter() - t
                    t = time.perf_counter()
                    jax.block_until_ready(fn())
                    one = (time.perf_counter() - t) * 1e3
                    calls = 2 if run.smoke else calls_for(one)
                    ms = loop_ms(fn, jax.block_until_ready, calls=calls, repeats=3 if run.smoke else 7)
                    rec = common.record(run.env, shape, f"jax-{door}", ms, tflops=fl / ms / 1e9, config=cname,
                                        section="jax", calls_per_repeat=calls, first_call_s=round(compile_s, 2))
                    if door != "kernel" and "kernel" in outs:
                        a = jnp.reshape(outs[door], (B * S, Hq, D)).astype(jnp.float32)
                        rec["max_abs_diff_vs_kernel"] = float(jnp.max(jnp.abs(a - outs["kernel"].astype(jnp.float32))))
                    run.add(rec)
                except Exception as err:  # noqa: BLE001
                    run.error(f"{label(B, S, Hq, Hkv, D)} {cname} jax {door}", err)
            del outs
        del q, k, v, q_packed
        gc.collect()


# --------------------------------------------------------------------------------------------------
# 3: HF generate


def _profile_counts(run: Run, do) -> dict:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([] if run.smoke else [ProfilerActivity.CUDA])
    sync(run)
    with profile(activities=acts) as prof:
        do()
        sync(run)
    counts = {}
    for ev in prof.key_averages():
        name = ev.key
        if name in SYNC_NAMES or name.startswith("Memcpy") or "Synchronize" in name:
            counts[name] = counts.get(name, 0) + int(ev.count)
    return counts


def section_hf(run: Run) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessorList

    import sparse24.hf

    p = HF_SMOKE if run.smoke else HF_GPU
    dev, dt, be = run.device, run.dtype, run.backend
    B, P, NEW, K = p["batch"], p["prompt"], p["new"], p["profile_steps"]
    cfg = LlamaConfig(**(LLAMA_TINY if run.smoke else LLAMA_1B), bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    run.section["model"] = dict(llama=LLAMA_TINY if run.smoke else LLAMA_1B, dtype=str(dt), batch=B, prompt=P,
                                new_tokens=NEW, profile_decode_steps=K, greedy=True, eos=None)
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dt)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.generation_config.do_sample = False
    run.section["notes"].append(f"model built in {time.perf_counter() - t:.1f} s, "
                                f"{sum(x.numel() for x in model.parameters()) / 1e9:.3f} B parameters")
    gen = torch.Generator(device="cpu").manual_seed(1)
    input_ids = torch.randint(1, cfg.vocab_size, (B, P), generator=gen).to(dev)
    attention_mask = torch.ones_like(input_ids)

    impls = {"sdpa": None, "sparse24-dense": SparsityConfig.dense(), "sparse24-2:4": CONFIGS["2:4"]}

    def use(impl: str) -> None:
        if impls[impl] is None:
            model.set_attn_implementation("sdpa")
        else:
            model.set_attn_implementation("sparse24")
            sparse24.hf.sparsify(model, impls[impl], backend=be)

    static = {}  # "cache": the one StaticCache of the current static run (reset before every generate)

    def generate(new: int, events: "common.StepEvents | None" = None, **kw):
        extra = dict(logits_processor=LogitsProcessorList([events])) if events is not None else {}
        if "cache" in static:
            static["cache"].reset()
            extra["past_key_values"] = static["cache"]
        with torch.no_grad():  # as generate() itself (inference_mode tensors would refuse the cache's reset)
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  **extra, **kw)

    def wall(new: int, **kw) -> tuple[float, torch.Tensor]:
        sync(run)
        t = time.perf_counter()
        out = generate(new, **kw)
        sync(run)
        return (time.perf_counter() - t) * 1e3, out

    def timed(new: int, **kw) -> dict:
        ev = common.StepEvents(host_clock=run.smoke)
        sync(run)
        ev.mark()  # before generate: prefill is the first gap
        t = time.perf_counter()
        out = generate(new, events=ev, **kw)
        sync(run)
        wall_ms = (time.perf_counter() - t) * 1e3
        gaps = ev.gaps_ms()
        assert out.shape[1] == P + new, f"generated {out.shape[1] - P} tokens, expected {new}"
        dec = gaps[1:]
        return dict(prefill_ms_events=round(gaps[0], 3), decode_ms_step_median=round(statistics.median(dec), 4),
                    decode_ms_step_mean=round(statistics.mean(dec), 4), decode_ms_step_min=round(min(dec), 4),
                    decode_ms_step_max=round(max(dec), 4), generate_wall_ms=round(wall_ms, 2), tokens=out[:, P:])

    tokens = {}

    def one(impl: str, mode: str, **kw) -> None:
        rec = dict(section="hf", provider=impl, mode=mode, card=run.env["card"], date=run.env["date"])
        try:
            use(impl)
            static.clear()
            if mode == "static":
                # one StaticCache for every call of this run, reset before each (the HF pattern for repeated
                # generate: fixed tensor addresses, so the compiled step's CUDA graphs are recorded once);
                # generate() then compiles the decode step itself, as with cache_implementation="static"
                from transformers import StaticCache

                static["cache"] = StaticCache(config=model.config, max_cache_len=P + NEW)
                rec["cache"] = f"StaticCache(max_cache_len={P + NEW}), one object reset before every generate"
                t = time.perf_counter()
                generate(NEW, **kw)  # warm-up: compiles the decode step (CUDA graphs) on an accelerator
                sync(run)
                rec["warmup_generate_s"] = round(time.perf_counter() - t, 1)
                rec["compiled"] = getattr(model, "_compiled_call", None) is not None
            else:
                generate(min(NEW, 4), **kw)  # warm-up: kernels compiled for prefill and decode shapes
            runs = [timed(NEW, **kw) for _ in range(1 if run.smoke else 2)]
            best = min(runs, key=lambda r: r["decode_ms_step_median"])
            toks = best.pop("tokens")
            for r in runs:
                r.pop("tokens", None)
            rec.update(best)
            rec["repeats"] = [{k: r[k] for k in ("decode_ms_step_median", "prefill_ms_events", "generate_wall_ms")}
                              for r in runs]
            w1 = min(wall(1, **kw)[0] for _ in range(1 if run.smoke else 2))
            rec["generate1_wall_ms"] = round(w1, 2)
            rec["decode_ms_step_wall_diff"] = round((best["generate_wall_ms"] - w1) / (NEW - 1), 4)
            tokens[(impl, mode)] = toks
            ref = tokens.get(("sdpa", mode))
            if ref is not None and impl != "sdpa":
                rec["tokens_equal_to_sdpa"] = round(float((toks == ref).float().mean()), 4)
            dyn = tokens.get((impl, "dynamic"))
            if mode == "static" and dyn is not None:
                rec["tokens_equal_to_dynamic"] = round(float((toks == dyn).float().mean()), 4)
            if not run.over(f"{impl} {mode} profile", need=10.0):
                c1 = _profile_counts(run, lambda: generate(1, **kw))
                ck = _profile_counts(run, lambda: generate(1 + K, **kw))
                per = {n: round((ck.get(n, 0) - c1.get(n, 0)) / K, 3) for n in sorted(set(c1) | set(ck))}
                rec["per_decode_step"] = per
                rec["prefill_counts"] = c1
                rec["syncs_per_decode_step"] = round(sum(v for n, v in per.items() if "Synchronize" in n), 3)
            if mode == "static" and not run.over(f"{impl} cache_implementation='static'", need=10.0):
                static.pop("cache")  # the documented door: generate() makes its own StaticCache
                t = time.perf_counter()
                out = generate(NEW, cache_implementation="static", max_cache_len=P + NEW)
                sync(run)
                rec["static_door_wall_ms"] = round((time.perf_counter() - t) * 1e3, 1)
                rec["static_door_tokens_equal"] = bool(torch.equal(out[:, P:], toks))
        except Exception as err:  # noqa: BLE001
            rec["error"] = f"{type(err).__name__}: {err}"[:2000]
            run.error(f"hf {impl} {mode}", err)
        static.clear()
        run.add(rec)

    for mode, need in (("dynamic", 20.0), ("static", 90.0)):
        for impl in impls:
            if run.over(f"hf {impl} {mode}", need=5.0 if run.smoke else need):
                continue
            if mode == "static":  # a fresh compile per implementation
                if hasattr(model, "_compiled_call"):
                    del model._compiled_call
                torch._dynamo.reset()
            one(impl, mode)
    del model
    gc.collect()
    if not run.smoke:
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# tables


def _fmt(x, spec=".0f"):
    return "—" if x is None else format(x, spec)


def tables(result: dict) -> str:
    env = result["env"]
    smoke = env["card"] == "cpu-smoke"
    metric, unit = ("median_ms", "ms") if smoke else ("tflops", "dense-equivalent TFLOP/s")
    dtype = "float32" if smoke else "bf16"
    vfmt = ".3f" if smoke else ".0f"
    head = (f"{env['card']}, {env['date']}, sparse24 {env['version']}, torch {env['torch']}, triton {env['triton']}, "
            f"jax {env.get('jax')}, jax-triton {env.get('jax_triton')}, transformers {env.get('transformers')}")
    lines = ["## Public doors beside the kernel", "", head, ""]
    secs = result["sections"]

    def recs(name):
        return secs.get(name, {}).get("records", [])

    def problems(name):
        sec = secs.get(name)
        if not sec:
            return []
        out = [f"- {name}: error: {e}" for e in sec.get("errors", [])]
        out += [f"- {name}: skipped: {s}" for s in sec.get("skipped", [])]
        return out

    if "torch" in secs:
        lines += [f"### torch prefill ({dtype}, causal, {unit}, {'perf_counter loop' if smoke else 'do_bench'} "
                  "median; ratios are kernel time / door time)", "",
                  "| shape | config | kernel (unified + maxima) | unified, no maxima | attention() | SDPA flash "
                  "| SDPA cuDNN | attention()/kernel | no-maxima/kernel |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = {}
        for r in recs("torch"):
            s = r["shape"]
            key = (label(s["B"], s["Sq"], s["Hq"], s["Hkv"], s["D"]), r["config"])
            rows.setdefault(key, {})[r["provider"]] = r
        sdpa = {k[0]: v for k, v in rows.items() if k[1] == "dense"}

        def val(r):
            return None if r is None else r.get(metric)

        for (lab, cname), by in rows.items():
            kern = by.get("kernel")
            ratio = lambda p: (f"{kern['median_ms'] / by[p]['median_ms']:.2f}" if p in by and kern else "—")  # noqa: E731
            flash = sdpa.get(lab, {}).get("sdpa-flash") or sdpa.get(lab, {}).get("sdpa-math")
            lines.append(f"| {lab} | {cname} | {_fmt(val(kern), vfmt)} | {_fmt(val(by.get('unified-nomax')), vfmt)} | "
                         f"{_fmt(val(by.get('attention')), vfmt)} | {_fmt(val(flash), vfmt) if cname == 'dense' else ''} | "
                         f"{_fmt(val(sdpa.get(lab, {}).get('sdpa-cudnn')), vfmt) if cname == 'dense' else ''} | "
                         f"{ratio('attention')} | {ratio('unified-nomax')} |")
        lines += [""] + problems("torch") + [""]
    if "jax" in secs:
        lines += [f"### JAX prefill under jit ({dtype}, causal, {unit}, wall clock of back-to-back calls, median "
                  "of repeats; ratio is kernel time / door time)", "",
                  "| shape | config | kernel (unified + maxima) | attention() | attention()/kernel |",
                  "|---|---|---|---|---|"]
        rows = {}
        for r in recs("jax"):
            s = r["shape"]
            key = (label(s["B"], s["Sq"], s["Hq"], s["Hkv"], s["D"]), r["config"])
            rows.setdefault(key, {})[r["provider"]] = r
        for (lab, cname), by in rows.items():
            kern, att = by.get("jax-kernel"), by.get("jax-attention")
            ratio = f"{kern['median_ms'] / att['median_ms']:.2f}" if kern and att else "—"
            lines.append(f"| {lab} | {cname} | {_fmt(kern and kern[metric], vfmt)} | "
                         f"{_fmt(att and att[metric], vfmt)} | {ratio} |")
        lines += [""] + problems("jax") + [""]
    if "hf" in secs:
        m = secs["hf"].get("model", {})
        lines += [f"### HF generate (random-weight Llama, {m.get('dtype')}, B={m.get('batch')}, prompt "
                  f"{m.get('prompt')}, {m.get('new_tokens')} new tokens, greedy)", "",
                  "| attention | cache | prefill ms (events) | decode ms/step (events, median) | decode ms/step "
                  "(wall diff) | host syncs / decode step | memcpy / decode step | tokens = sdpa's "
                  "| tokens = dynamic cache's | cache_implementation='static' tokens = these |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in recs("hf"):
            if "error" in r:
                lines.append(f"| {r['provider']} | {r['mode']} | error: {r['error'][:160]} | | | | | | | |")
                continue
            per = r.get("per_decode_step", {})
            mem = ", ".join(f"{n}: {v:g}" for n, v in per.items() if "emcpy" in n and v) or "0"
            cache = r["mode"] + (" + compiled" if r.get("compiled") else "")
            lines.append(f"| {r['provider']} | {cache} | {_fmt(r.get('prefill_ms_events'), '.1f')} | "
                         f"{_fmt(r.get('decode_ms_step_median'), '.3f')} | "
                         f"{_fmt(r.get('decode_ms_step_wall_diff'), '.3f')} | "
                         f"{_fmt(r.get('syncs_per_decode_step'), 'g')} | {mem} | "
                         f"{_fmt(r.get('tokens_equal_to_sdpa'), '.3f') if 'tokens_equal_to_sdpa' in r else ''} | "
                         f"{_fmt(r.get('tokens_equal_to_dynamic'), '.3f') if 'tokens_equal_to_dynamic' in r else ''} | "
                         f"{r.get('static_door_tokens_equal', '')} |")
        lines += [""] + problems("hf") + [""]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------


def environment(smoke: bool) -> dict:
    if smoke:
        import triton

        env = dict(card="cpu-smoke", date=datetime.date.today().isoformat(), version=sparse24.__version__,
                   torch=torch.__version__, triton=triton.__version__)
    else:
        env = common.environment()
    env["python"] = platform.python_version()
    # Versions from the installed metadata: importing jax_triton itself would set
    # TRITON_CACHE_DIR="" for the whole process (jax-triton 0.3.1) and break every compile.
    import importlib.metadata

    for dist, key in (("jax", "jax"), ("jaxlib", "jaxlib"), ("jax-triton", "jax_triton"),
                      ("transformers", "transformers"), ("numpy", "numpy")):
        try:
            env[key] = importlib.metadata.version(dist)
        except Exception as err:  # noqa: BLE001
            env[key] = f"unavailable ({type(err).__name__})"
    if not smoke:
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> int:
    t_start = time.monotonic()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (reference backends)")
    parser.add_argument("--budget", default="", help="per-section budgets in s, e.g. torch=100,jax=100,hf=300")
    parser.add_argument("--deadline", type=float, default=540.0,
                        help="whole-run soft limit in s: each section's budget is cut to what is left of it")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results; "
                        "--smoke: /tmp/sparse24-doors-smoke)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of recorded errors")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        parser.error(f"--only: unknown sections {bad}; known {list(SECTIONS)}")
    args.only = only if args.only != ",".join(SECTIONS) else None
    budgets = dict(BUDGET_S)
    for item in filter(None, args.budget.split(",")):
        name, _, value = item.partition("=")
        if name not in budgets:
            parser.error(f"--budget: unknown section {name!r}")
        budgets[name] = float(value)
    if args.out is None:
        args.out = "/tmp/sparse24-doors-smoke" if args.smoke else str(common.RESULTS)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU, or use --smoke")

    if args.smoke:
        torch.set_num_threads(1)  # a shared CPU: one thread, no spinning barriers
    run = Run(args, environment(args.smoke))
    print(json.dumps(run.env), flush=True)
    runners = {"torch": section_torch, "jax": section_jax, "hf": section_hf}
    t_all = time.monotonic()
    for name in only:
        budget = max(0.0, min(budgets[name], args.deadline - (time.monotonic() - t_start)))
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        run.start(name, budget)
        try:
            runners[name](run)
            run.finish()
        except Exception as err:  # noqa: BLE001
            run.error(f"section {name}", err)
            run.finish("error")
        print(f"== {name}: {run.section['wall_s']} s", flush=True)
    run.result["wall_s"] = round(time.monotonic() - t_all, 1)
    run.write()
    print(tables(run.result))
    print(f"wrote {run.stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
