"""Compile every kernel specialization the launchers use for an sm_90 GPU, on any machine.

Run as a script in a process *without* TRITON_INTERPRET (tests/test_gpu_compile.py does
that): ``triton.compile`` runs the whole pipeline to a cubin with the ptxas shipped in
the triton wheel, so a GPU-only compile error fails CI instead of a user. The
specializations come from the same planner and constexpr builders the launchers call.

Prints one line per specialization; exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from sparse24.kernels import (
    decode_mask_layout_kernel,
    plan_decode_mask_layout,
    plan_unified_attention,
    plan_write_kv_cache,
    reduce_segments_kernel,
    unified_attention_kernel,
    write_kv_cache_kernel,
)

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 232448  # opt-in shared memory per block on H100 / H200 (227 KiB); more fails at launch
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
FLOAT_SCALARS = {"softmax_scale", "softcap"}
FP32_POINTERS = {"lse_ptr", "segm_acc_ptr", "segm_max_ptr", "segm_sum_ptr"}
INT32_POINTERS = {"block_table_ptr", "cu_seqlens_q_ptr", "seq_lens_ptr", "slot_mapping_ptr"}


def signature(kernel, dtype: str, constexprs: dict, float_scalar: str = "fp32") -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in INT32_POINTERS:
            sig[name] = "*i32"
        elif name == "row_keep_ptr":
            sig[name] = "*i1"
        elif name.endswith("_ptr"):
            sig[name] = "*" + TRITON_DTYPE[dtype]
        elif name in FLOAT_SCALARS:
            sig[name] = float_scalar
        else:
            sig[name] = "i32"
    return sig


def launch_specialization(kernel, constexprs: dict) -> tuple[dict, dict]:
    """What Triton's JIT does for a launch on contiguous tensors: an int argument equal to
    1 (the unit strides) becomes a constant, and pointers and the other strides carry
    ``tt.divisibility = 16`` (this is what lets the K/V gathers vectorise into async copies,
    so the compile below goes through the same software-pipelined code path as on a GPU)."""
    constexprs = dict(constexprs)
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            continue
        if name.endswith("_dim") or name in ("stride_bt_page", "stride_lse_head"):
            constexprs[name] = 1
        elif name.endswith("_ptr") or name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return constexprs, attrs


def compile_one(kernel, dtype: str, constexprs: dict, label: str, float_scalar: str = "fp32") -> None:
    constexprs = dict(constexprs)
    options = {"num_warps": constexprs.pop("num_warps"), "num_stages": constexprs.pop("num_stages", 2)}
    start = time.time()
    constexprs, attrs = launch_specialization(kernel, constexprs)
    src = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs, float_scalar), constexprs=constexprs,
                    attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options=options)
    assert compiled.asm.get("cubin"), label
    shared = compiled.metadata.shared
    if shared > MAX_SHARED_BYTES:
        raise RuntimeError(f"{label}: needs {shared} bytes of shared memory, sm_90 allows {MAX_SHARED_BYTES}")
    print(f"ok {label} ({time.time() - start:.1f}s, {shared} B shared)", flush=True)
    return compiled


# Feature constexprs of the unified kernel: every feature on / the common serving case.
FULL_FLAGS = dict(page_size=16, causal=True, use_window=True, use_softcap=True, use_sink=True, use_recent=True,
                  sparse_decode=False, store_lse=True)
PLAIN_FLAGS = dict(page_size=16, causal=True, use_window=False, use_softcap=False, use_sink=False, use_recent=True,
                   sparse_decode=True, store_lse=False)


def attention_specializations():
    """(dtype, plan kwargs, feature flags) covering every constexpr branch of the launchers."""
    configs = {"dense": (4, 4), "2:4": (2, 4), "1:8": (1, 8), "4:8": (4, 8)}
    full, plain = FULL_FLAGS, PLAIN_FLAGS
    non_causal = dict(plain, causal=False)
    for dtype, (name, (n, m)), head_dim in itertools.product(("bfloat16", "float16", "float32"), configs.items(), (64, 128)):
        if name == "4:8" and dtype != "bfloat16":
            continue
        yield dtype, dict(n=n, m=m, head_dim=head_dim, max_seqlen_q=512, num_q_heads=32, num_kv_heads=8), plain
    for head_dim in (80, 96, 256):
        yield "bfloat16", dict(n=2, m=4, head_dim=head_dim, max_seqlen_q=512, num_q_heads=8, num_kv_heads=8), full
    yield "bfloat16", dict(n=2, m=4, head_dim=128, max_seqlen_q=512, num_q_heads=40, num_kv_heads=8), non_causal
    yield "float32", dict(n=2, m=8, head_dim=64, max_seqlen_q=64, num_q_heads=4, num_kv_heads=4), full
    # the largest K/V tiles: D=256 and fp32 with M=8 (must fit sm_90's shared memory)
    for dtype, max_seqlen_q in (("bfloat16", 512), ("float32", 512), ("float32", 1)):
        yield dtype, dict(n=4, m=8, head_dim=256, max_seqlen_q=max_seqlen_q, num_q_heads=8, num_kv_heads=8), plain
    # the largest GQA groups per program (block_m = H_q/H_kv at the planner's tile-size ceiling)
    for dtype, (n, m), head_dim, qpk, max_seqlen_q in (("bfloat16", (2, 8), 256, 128, 512), ("float32", (2, 8), 256, 128, 1),
                                                       ("float32", (2, 4), 128, 256, 512)):
        yield dtype, dict(n=n, m=m, head_dim=head_dim, max_seqlen_q=max_seqlen_q, num_q_heads=qpk, num_kv_heads=1), plain
    # decode, split-KV (planner picks segments from the SM count)
    for dtype, (n, m) in itertools.product(("bfloat16", "float32"), ((4, 4), (2, 4), (2, 8))):
        yield dtype, dict(n=n, m=m, head_dim=128, max_seqlen_q=1, num_q_heads=32, num_kv_heads=8, num_sms=132), full


def selection_stays_in_registers() -> int:
    """The N:M selection adds no layout conversion (shared-memory round trip) to the dense
    kernel of the same tiles, for decode (16-row mma.sync tiles, warps along the keys) and
    prefill (wgmma) plans; a decode plan forced to the prefill member stride must add some
    (so the comparison can fail). Returns the number of compiles."""
    from sparse24.kernels import planner

    flags = dict(page_size=16, causal=True, use_window=False, use_softcap=False, use_sink=False, use_recent=True,
                 sparse_decode=True, store_lse=False)

    def conversions(n, m, max_seqlen_q, label, **tune):
        with planner.tuning(**tune):
            plan = plan_unified_attention(num_tokens=64, num_seqs=8, num_q_heads=32, num_kv_heads=8, head_dim=128,
                                          dtype="bfloat16", n=n, m=m, max_seqlen_q=max_seqlen_q, max_seqlen_k=4096,
                                          num_sms=132)
        compiled = compile_one(unified_attention_kernel, "bfloat16", plan.kernel_constexprs(**flags),
                               f"{label} BLOCK_M={plan.block_m} TILE_N={plan.tile_n} warps={plan.num_warps} "
                               f"member_stride={plan.member_stride}")
        return compiled.asm["ttgir"].count("ttg.convert_layout")

    for max_seqlen_q, what in ((1, "decode"), (512, "prefill")):
        dense = conversions(4, 4, max_seqlen_q, f"{what} dense")
        for n, m in ((2, 4), (2, 8)):
            sparse = conversions(n, m, max_seqlen_q, f"{what} {n}:{m}")
            if sparse != dense:
                raise RuntimeError(f"{what} {n}:{m}: {sparse} convert_layout ops vs {dense} for dense: the "
                                   "selection's member order does not match the MMA layout (planner.member_stride_for)")
    forced = conversions(2, 4, 1, "decode 2:4 with the prefill member stride", member_stride=8)
    dense = conversions(4, 4, 1, "decode dense (same tiles)")
    if forced <= dense:
        raise RuntimeError("a decode plan with member stride 8 should need layout conversions; the check is blind")
    print(f"selection in registers: decode and prefill 2:4 / 2:8 add no convert_layout "
          f"(stride 8 on decode would add {forced - dense})", flush=True)
    return 9


KERNELS = {"unified_attention": unified_attention_kernel, "reduce_segments": reduce_segments_kernel,
           "write_kv_cache": write_kv_cache_kernel}


# Float instructions of the PTX whose counts must agree between the two launchers' compiles.
FLOAT_OPS = ("fma.rn.f32", "add.f32", "sub.f32", "mul.f32", "neg.f32", "ex2.approx", "lg2.approx", "max.f32", "max.NaN.f32",
             "min.f32", "div", "rcp")


def _float_ops(ptx: str):
    import collections
    import re

    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))
    return {op: sum(n for name, n in ops.items() if name.startswith(op)) for op in FLOAT_OPS}


def _compile_launch(launch, dtype: str, *, all_constants: bool):
    """One described launch compiled as Triton's JIT specialises it for torch
    (:func:`launch_specialization`: run-time scalars and strides) or, ``all_constants``, as
    jax-triton 0.3.1 does (every keyword a constexpr, every array 16-byte aligned)."""
    keywords = dict(launch.keywords)
    if all_constants:
        constexprs = keywords
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(launch.kernel.arg_names)
                 if name not in keywords}
    else:
        constexprs, attrs = launch_specialization(launch.kernel, {k: v for k, v in keywords.items() if k.isupper()})
    src = ASTSource(fn=launch.kernel, signature=signature(launch.kernel, dtype, constexprs), constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": launch.num_warps,
                                                       "num_stages": launch.num_stages})


def launchers_compute_alike(case: int) -> int:
    """torch and jax-triton compile the same launch with different constants (jax-triton binds
    every scalar and stride as a constexpr): the float arithmetic of the two compiles must be
    the same, or their outputs differ in the last bits (a contracted multiply-add in one, a
    multiply and a subtract in the other). Same float instruction counts, except multiplies
    of run-time scalars by constants, which fold in the constant compile (at most 2)."""
    from sparse24.kernels.launch import unified_attention_launches

    cases = [  # (dtype, n, m, sink, recent, q_lens, max_seqlen_k, softcap, window, splits)
        ("bfloat16", 2, 4, 0, 64, 300, 300, 0.0, 0, None),
        ("bfloat16", 2, 4, 0, 64, 1, 4500, 0.0, 0, 8),
        ("float16", 4, 8, 4, 0, 1, 4500, 0.0, 0, 8),
        ("float32", 2, 8, 4, 16, 64, 300, 30.0, 100, None),
    ]
    dtype, n, m, sink, recent, q_len, max_k, softcap, window, splits = cases[case]
    num_seqs = 16 if q_len == 1 else 1
    launches = unified_attention_launches(
        q_shape=(q_len * num_seqs, 32, 128), dtype=dtype, cache_shape=(512, 16, 8, 128), num_seqs=num_seqs, n=n, m=m,
        dense_sink_tokens=sink, dense_recent_tokens=recent, sparse_decode=True, causal=True, softmax_scale=128 ** -0.5,
        window=window, softcap=softcap, max_seqlen_q=q_len, max_seqlen_k=max_k, store_lse=False, num_kv_splits=splits,
        num_sms=132, block_table_strides=(32, 1))
    for launch in launches:
        label = f"{launch.kernel.__name__} {dtype} {n}:{m} q_len={q_len} softcap={softcap}"
        torch_ops = _float_ops(_compile_launch(launch, dtype, all_constants=False).asm["ptx"])
        jax_ops = _float_ops(_compile_launch(launch, dtype, all_constants=True).asm["ptx"])
        differ = {op: (torch_ops[op], jax_ops[op]) for op in FLOAT_OPS
                  if torch_ops[op] != jax_ops[op] and not (op == "mul.f32" and 0 <= torch_ops[op] - jax_ops[op] <= 2)}
        if differ:
            raise RuntimeError(f"{label}: torch and jax-triton compiles differ in float instructions (torch, jax): "
                               f"{differ}")
        print(f"ok same float arithmetic for torch and jax-triton: {label}", flush=True)
    return 2 * len(launches)


def jobs():
    """Every compile of the CI check: ("compile", kernel name, dtype, constexprs, label[, float
    scalar type]), ("mask_layout", mask type, fill dtype), ("launchers", case) or ("selection",)."""
    yield ("selection",)
    for case in range(4):
        yield ("launchers", case)
    reduce_done = set()
    for dtype, plan_kwargs, flags in attention_specializations():
        plan = plan_unified_attention(num_tokens=4096, num_seqs=8, dtype=dtype, max_seqlen_k=4096, **plan_kwargs)
        on = ",".join(k for k, v in flags.items() if v is True)
        label = (f"unified_attention {dtype} n:m={plan_kwargs['n']}:{plan_kwargs['m']} D={plan_kwargs['head_dim']} "
                 f"BLOCK_M={plan.block_m} TILE_N={plan.tile_n} "
                 f"segments={plan.num_segments} [{on}]")
        yield ("compile", "unified_attention", dtype, plan.kernel_constexprs(**flags), label)
        key = (dtype, plan.head_dim, plan.num_segments, flags["store_lse"])
        if plan.is_split and key not in reduce_done:
            reduce_done.add(key)
            yield ("compile", "reduce_segments", dtype, plan.reduce_constexprs(store_lse=flags["store_lse"]),
                   f"reduce_segments {key}")
            yield ("compile", "reduce_segments", dtype,  # sparse24.hf's decode steps: the row fix-up
                   plan.reduce_constexprs(store_lse=flags["store_lse"], row_fixup=True),
                   f"reduce_segments {key} row fix-up")
    # a ragged batch (decodes beside prefill chunks): 64 x 32 / 4 warps
    for n, m in ((4, 4), (2, 4), (4, 8)):
        plan = plan_unified_attention(num_tokens=4096 + 60, num_seqs=64, dtype="bfloat16", max_seqlen_k=4096, n=n, m=m,
                                      head_dim=128, max_seqlen_q=2048, num_q_heads=32, num_kv_heads=8)
        assert (plan.block_m, plan.tile_n) == (64, 32), plan
        yield ("compile", "unified_attention", "bfloat16", plan.kernel_constexprs(**PLAIN_FLAGS),
               f"unified_attention bfloat16 {n}:{m} ragged batch BLOCK_M=64 TILE_N=32")
    # torch.compile (Inductor) passes Python floats as fp64 scalars
    plan = plan_unified_attention(num_tokens=64, num_seqs=2, dtype="bfloat16", max_seqlen_k=300, n=2, m=4,
                                  head_dim=64, max_seqlen_q=37, num_q_heads=8, num_kv_heads=2)
    flags = dict(page_size=1, causal=True, use_window=False, use_softcap=True, use_sink=False, use_recent=True,
                 sparse_decode=True, store_lse=False)
    yield ("compile", "unified_attention", "bfloat16", plan.kernel_constexprs(**flags),
           "unified_attention bfloat16 2:4 with fp64 float scalars (Inductor)", "fp64")
    for dtype, head_dim in itertools.product(("bfloat16", "float16", "float32"), (64, 80)):
        plan = plan_write_kv_cache(num_tokens=16, num_kv_heads=8, head_dim=head_dim)
        yield ("compile", "write_kv_cache", dtype,
               dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=plan.head_dim_pad, num_warps=plan.num_warps,
                    num_stages=plan.num_stages),
               f"write_kv_cache {dtype} D={head_dim}")
    # kept-mass statistics (return_stats): an unsplit launch, the LSE buffer [T, H_q, 3]
    for dtype, max_seqlen_q in (("bfloat16", 512), ("float32", 1)):
        plan = plan_unified_attention(num_tokens=4096, num_seqs=8, dtype=dtype, max_seqlen_k=4096, n=2, m=4,
                                      head_dim=128, max_seqlen_q=max_seqlen_q, num_q_heads=32, num_kv_heads=8,
                                      num_kv_splits=1)
        yield ("compile", "unified_attention", dtype, plan.kernel_constexprs(**FULL_FLAGS, store_stats=True),
               f"unified_attention {dtype} 2:4 max_seqlen_q={max_seqlen_q} with kept-mass statistics")
    for mask_type, out_dtype in (("*i1", "bfloat16"), ("*i8", "float16"), ("*i64", "float32"), ("*fp32", "bfloat16")):
        yield ("mask_layout", mask_type, out_dtype)


def run_job(job) -> int:
    """One job of :func:`jobs`; returns the number of compiles."""
    if job[0] == "selection":
        return selection_stays_in_registers()
    if job[0] == "mask_layout":
        return compile_mask_layout(*job[1:])
    if job[0] == "launchers":
        return launchers_compute_alike(job[1])
    _, name, dtype, constexprs, label, *float_scalar = job
    compile_one(KERNELS[name], dtype, constexprs, label, *float_scalar)
    return 1


def main() -> int:
    """Compile every job, on every CPU core (compiles are independent; each worker prints its
    lines); the first failure stops the run with its traceback."""
    import concurrent.futures
    import multiprocessing
    import os

    todo = list(jobs())
    todo.sort(key=lambda job: job[0] not in ("selection", "launchers") and "float32" not in job)  # the slowest first
    workers = max(1, min(len(todo), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    if workers == 1:
        count = sum(run_job(job) for job in todo)
    else:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            count = sum(pool.map(run_job, todo))
    print(f"compiled {count} specializations for sm_90 ({workers} processes)")
    return 0


def compile_mask_layout(mask_type: str, out_dtype: str) -> int:
    """``decode_mask_layout_kernel`` for a slot mask of ``mask_type`` (bool: unsigned)."""
    plan = plan_decode_mask_layout(batch=8, mask_len=4096, width=4097)
    constexprs = dict(SIGNED_MASK=mask_type != "*i1", BLOCK_L=plan.block_l)
    sig = {name: "i32" for name in decode_mask_layout_kernel.arg_names}
    sig.update(mask_ptr=mask_type, block_table_ptr="*i32", seq_lens_ptr="*i32", keep_ptr="*i1",
               fill_ptr="*" + TRITON_DTYPE[out_dtype], **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=decode_mask_layout_kernel, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": plan.num_warps, "num_stages": plan.num_stages})
    assert compiled.asm.get("cubin")
    print(f"ok decode_mask_layout mask {mask_type} fill {out_dtype}", flush=True)
    return 1


def ptx_digests() -> int:
    """``python tests/compile_sm90.py --ptx-digest``: a digest of the PTX of a few default
    specializations with source locations removed, to show that a kernel change leaves the
    default launch's code unchanged (run before and after, compare; not part of CI)."""
    import hashlib
    import re

    cases = [("bfloat16", dict(n=2, m=4, head_dim=128, max_seqlen_q=512, num_q_heads=32, num_kv_heads=8), PLAIN_FLAGS),
             ("bfloat16", dict(n=4, m=4, head_dim=128, max_seqlen_q=512, num_q_heads=32, num_kv_heads=8), PLAIN_FLAGS),
             ("bfloat16", dict(n=2, m=4, head_dim=64, max_seqlen_q=1, num_q_heads=32, num_kv_heads=8, num_sms=132),
              FULL_FLAGS),
             ("float32", dict(n=2, m=8, head_dim=64, max_seqlen_q=64, num_q_heads=4, num_kv_heads=4), FULL_FLAGS)]

    def digest(ptx: str) -> str:
        ptx = re.sub(r"//.*", "", ptx)
        ptx = "\n".join(line for line in ptx.splitlines() if not re.match(r"\s*\.(loc|file)\b", line))
        return hashlib.sha256(ptx.split(".section")[0].encode()).hexdigest()[:16]

    for dtype, kwargs, flags in cases:
        plan = plan_unified_attention(num_tokens=4096, num_seqs=8, dtype=dtype, max_seqlen_k=4096, **kwargs)
        label = f"{dtype} {kwargs['n']}:{kwargs['m']} D={kwargs['head_dim']} max_seqlen_q={kwargs['max_seqlen_q']}"
        compiled = compile_one(unified_attention_kernel, dtype, plan.kernel_constexprs(**flags), label)
        print(f"digest {label}: {digest(compiled.asm['ptx'])}")
        if plan.is_split:
            compiled = compile_one(reduce_segments_kernel, dtype, plan.reduce_constexprs(store_lse=flags["store_lse"]),
                                   f"reduce {label}")
            print(f"digest reduce {label}: {digest(compiled.asm['ptx'])}")
    return 0


def sass_loops() -> int:
    """``python tests/compile_sm90.py --sass-loops``: the SASS of the prefill plans (bf16,
    causal, H 32/8 D 128 and H 16/16 D 64, dense and every N:M), disassembled with the
    ``nvdisasm`` of the triton wheel: per key-tile loop (a backward branch), its instruction
    count per thread and the most frequent opcodes. The unmasked middle loop is the first
    one listed; the second, longer one is the masked loop (its causal compares are the
    ISETPs). Not part of CI (benchmarks/NOTES.md, session 13, reads these counts)."""
    import collections
    import os
    import re
    import subprocess
    import tempfile

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    flags = dict(PLAIN_FLAGS, use_recent=False)
    for (n, m), head_dim, qpk in itertools.product(((4, 4), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)), (128, 64), (4, 1)):
        if (head_dim == 64) != (qpk == 1):
            continue
        plan = plan_unified_attention(num_tokens=16384, num_seqs=1, dtype="bfloat16", max_seqlen_k=16384, n=n, m=m,
                                      head_dim=head_dim, max_seqlen_q=16384, num_q_heads=8 * qpk, num_kv_heads=8,
                                      num_sms=132)
        label = f"{n}:{m} D={head_dim} {plan.block_m}x{plan.tile_n} {plan.num_warps} warps"
        compiled = compile_one(unified_attention_kernel, "bfloat16", plan.kernel_constexprs(**flags), label)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            sass = subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout
        instructions, labels = [], {}
        for line in sass.splitlines():
            if (mark := re.match(r"\s*\.(L_x_\d+):", line)) is not None:
                labels[mark.group(1)] = len(instructions)
            elif (ins := re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line)) is not None:
                instructions.append(ins.group(1).strip())
        for end, ins in enumerate(instructions):
            target = re.search(r"\bBRA\b.*?`\(\.(L_x_\d+)\)", ins)
            start = labels.get(target.group(1), end) if target else end
            if start < end and end - start > 64:  # a key-tile loop (not the block-table prefetch)
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0]
                                          for i in instructions[start:end + 1])
                print(f"  loop of {end - start + 1} instructions: "
                      + ", ".join(f"{k} {v}" for k, v in ops.most_common(10)), flush=True)
    return 0


def sweep() -> int:
    """``python tests/compile_sm90.py --sweep``: compile every distinct plan the planner makes over
    dtype x N:M x head_dim x H_q/H_kv x max_seqlen_q (125 plans; 10 minutes on 2 CPU cores with part cached;
    not part of CI). Prints each plan's shared memory; exits non-zero if any plan fails."""
    flags = dict(FULL_FLAGS, sparse_decode=True)
    seen, failed = set(), 0
    for dtype, (n, m), head_dim, qpk, max_seqlen_q in itertools.product(
        ("bfloat16", "float32"), ((4, 4), (2, 4), (4, 8)), (256, 128, 64), (128, 64, 32, 16, 8, 1), (512, 16, 1)
    ):
        plan = plan_unified_attention(num_tokens=2 * max_seqlen_q, num_seqs=2, dtype=dtype, max_seqlen_k=4096, n=n,
                                      m=m, head_dim=head_dim, max_seqlen_q=max_seqlen_q, num_q_heads=qpk,
                                      num_kv_heads=1, num_sms=132)
        key = (dtype, m, n < m, plan.block_m, plan.tile_n, plan.head_dim_pad, plan.num_warps, plan.num_stages,
               plan.member_stride, plan.is_split)
        if key in seen:
            continue
        seen.add(key)
        label = (f"{dtype} {n}:{m} D={head_dim} H_q/H_kv={qpk} q={max_seqlen_q} BLOCK_M={plan.block_m} "
                 f"TILE_N={plan.tile_n} warps={plan.num_warps} segments={plan.num_segments}")
        try:
            compile_one(unified_attention_kernel, dtype, plan.kernel_constexprs(**flags), label)
        except Exception as exc:  # report every failing plan, not just the first
            failed += 1
            print(f"FAIL {label}: {str(exc)[:200]}", flush=True)
    print(f"{len(seen)} plans, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    if "--ptx-digest" in sys.argv[1:]:
        sys.exit(ptx_digests())
    if "--sass-loops" in sys.argv[1:]:
        sys.exit(sass_loops())
    sys.exit(sweep() if "--sweep" in sys.argv[1:] else main())
