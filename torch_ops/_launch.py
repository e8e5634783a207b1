"""torch.library registrations of the Triton kernels (inference only, no autograd).

With compiled kernels the ops are ``torch.library.triton_op``s that launch through
``torch.library.wrap_triton``, so ``torch.compile`` sees the Triton kernels and CUDA
graphs can capture them. In an interpreting process (``TRITON_INTERPRET=1``) the same
kernel objects are called directly from an opaque ``torch.library.custom_op``. All launch
math and every kernel argument come from ``sparse24.kernels.launch`` (the one launch
description, shared with the JAX launcher).

Eager calls on plain tensors skip the op dispatcher: ``launch_unified_attention`` /
``launch_write_kv_cache`` (the functions the ops are made from) with ``direct=True`` launch
the kernels directly, which saves the custom-op machinery's host time per call (decode
steps are short; see benchmarks/NOTES.md). Under ``torch.compile`` and on tensor
subclasses the public functions go through ``torch.ops.sparse24.*``.
"""

from __future__ import annotations

import functools

import torch

from sparse24.backends import kernels_interpreted
from sparse24.kernels.launch import KernelLaunch, run_launches, unified_attention_launches, write_kv_cache_launches


INTERPRETED = kernels_interpreted()  # decided once per process, before any tracing


def _launcher(kernel, direct: bool = False):
    """The kernel as the launch sees it: raw for interpreted or ``direct`` (eager, outside
    the op dispatcher) launches, else wrapped so torch.compile can trace it."""
    return kernel if INTERPRETED or direct else torch.library.wrap_triton(kernel)


# Compiled kernels: ``triton_op``, which torch.compile decomposes into the wrapped Triton
# launches (Inductor sees the kernels). Interpreted kernels cannot be traced, so there the
# op is an opaque ``custom_op`` with a fake implementation (torch.compile still works on CPU).
_register_op = torch.library.custom_op if INTERPRETED else torch.library.triton_op


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int | None:
    """SM count of a CUDA device, None elsewhere (the planner then never splits on its own)."""
    if device.type != "cuda":
        return None
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# Direct launches of compiled kernels reuse Triton's compiled kernel object (its launcher)
# instead of going through ``JITFunction.run`` every call, whose argument binding and
# specialisation of every one of the ~55 arguments costs more host time than the decode
# kernel runs (benchmarks/profile_host_time.py). Sound because everything Triton specialises
# on is fixed by the key: the described launch fixes every scalar, stride and constexpr (the
# description is memoised, so one object per description), and the key adds each array's
# dtype and 16-byte alignment (what Triton specialises pointers on) and the device. The
# first call of a key goes through ``JITFunction.run`` (compiling if needed) and keeps the
# compiled kernel it returns. FAST_LAUNCH = False turns it off (benchmarks compare both).
FAST_LAUNCH = True
_COMPILED: dict = {}  # id(launch) -> (launch, trailing arguments, {array key: CompiledKernel}, 3-D grid)


def _fast_launch(launch: KernelLaunch, arrays: tuple, device: torch.device) -> None:
    entry = _COMPILED.get(id(launch))
    if entry is None or entry[0] is not launch:
        if len(_COMPILED) > 1024:
            _COMPILED.clear()
        names = launch.kernel.arg_names[len(arrays):]  # the keywords, in the kernel's order
        grid = (*launch.grid, 1, 1)[:3]  # a compiled kernel's launcher takes all three grid sizes
        entry = _COMPILED[id(launch)] = (launch, tuple(launch.keywords[n] for n in names), {}, grid)
    key = (device.index, *[(a.dtype, a.data_ptr() % 16 == 0) for a in arrays])
    compiled = entry[2].get(key)
    if compiled is None:
        entry[2][key] = launch.kernel[launch.grid](
            *arrays, **launch.keywords, num_warps=launch.num_warps, num_stages=launch.num_stages
        )
    else:
        compiled[entry[3]](*arrays, *entry[1])


def _run_one(launch: KernelLaunch, inputs: list, env: dict, *, direct: bool, device: torch.device,
             scratch: dict | None = None) -> list:
    """Launch one described kernel: outputs not given by the caller (split-KV partials) are
    allocated here, or taken from ``scratch`` (a plan's buffers, kept between calls: later
    launches on the stream use them after earlier ones, in stream order); arrays go by
    position, everything else by keyword, as described."""
    outputs = []
    for o in launch.outputs:
        array = env.get(o.array)
        if array is None and scratch is not None:
            array = scratch.get(o.array)
        if array is None:
            array = torch.empty(o.shape, dtype=_TORCH_DTYPES[o.dtype], device=device)
            if scratch is not None:
                scratch[o.array] = array
        outputs.append(array)
    if direct and FAST_LAUNCH and not INTERPRETED:
        _fast_launch(launch, (*inputs, *outputs), device)
    else:
        _launcher(launch.kernel, direct)[launch.grid](
            *inputs, *outputs, **launch.keywords, num_warps=launch.num_warps, num_stages=launch.num_stages
        )
    return outputs


def launch_unified_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    n: int,
    m: int,
    dense_sink_tokens: int,
    dense_recent_tokens: int,
    sparse_decode: bool,
    causal: bool,
    softmax_scale: float,
    window: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_kv_splits: int,
    store_lse: bool,
    direct: bool = False,
) -> None:
    """Launch the unified kernel on validated inputs; writes ``out`` [T, H_q, D] and
    (when ``store_lse``) ``lse`` [T, H_q] fp32. ``num_kv_splits`` 0 = planner's choice.
    ``direct``: launch the raw Triton kernels (eager calls outside the op dispatcher; the
    op itself always runs with the default False)."""
    _launch_unified(
        None, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse, n, m, dense_sink_tokens,
        dense_recent_tokens, sparse_decode, causal, softmax_scale, window, softcap, max_seqlen_q, max_seqlen_k,
        num_kv_splits, store_lse, direct,
    )


def _launch_unified(state, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse, n, m,
                    dense_sink_tokens, dense_recent_tokens, sparse_decode, causal, softmax_scale, window, softcap,
                    max_seqlen_q, max_seqlen_k, num_kv_splits, store_lse, direct) -> None:
    """:func:`launch_unified_attention`; ``state``: None, or a plan's dict (``torch_ops.api``)
    that keeps the launch description and the scratch outputs of its call form between calls."""
    launches = None if state is None else state.get("launches")
    if launches is None:
        launches = unified_attention_launches(
            q_shape=tuple(q.shape), dtype=dtype_str(q.dtype), cache_shape=tuple(k_cache.shape),
            num_seqs=seq_lens.shape[0], n=n, m=m, dense_sink_tokens=dense_sink_tokens,
            dense_recent_tokens=dense_recent_tokens, sparse_decode=sparse_decode, causal=causal,
            softmax_scale=softmax_scale, window=window, softcap=softcap,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, store_lse=store_lse,
            num_kv_splits=num_kv_splits or None, num_sms=num_sms(q.device), interpret=INTERPRETED,
            q_strides=tuple(q.stride()), k_cache_strides=tuple(k_cache.stride()),
            v_cache_strides=tuple(v_cache.stride()), block_table_strides=tuple(block_table.stride()),
            out_strides=tuple(out.stride()),
        )
        if state is not None:
            state["launches"] = launches
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                  cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, out=out, lse=lse)
    scratch = None if state is None else state.setdefault("scratch", {})
    run_launches(launches, arrays, functools.partial(_run_one, direct=direct, device=q.device, scratch=scratch))


def launch_write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    direct: bool = False,
) -> None:
    """Scatter k/v [T, H_kv, D] into the caches at ``slot_mapping`` [T] (negative = skip)."""
    launches = write_kv_cache_launches(
        kv_shape=tuple(k.shape), cache_shape=tuple(k_cache.shape), dtype=dtype_str(k_cache.dtype),
        k_strides=tuple(k.stride()), v_strides=tuple(v.stride()),
        k_cache_strides=tuple(k_cache.stride()), v_cache_strides=tuple(v_cache.stride()),
    )
    arrays = dict(k=k, v=v, slot_mapping=slot_mapping, k_cache=k_cache, v_cache=v_cache)
    run_launches(launches, arrays, functools.partial(_run_one, direct=direct, device=k.device))


# The ops are the launch functions themselves (their schema carries ``direct``, always False
# through the ops): one signature and one body for the op and the direct eager path.
unified_attention_op = _register_op("sparse24::unified_attention", mutates_args={"out", "lse"})(
    launch_unified_attention
)
write_kv_cache_op = _register_op("sparse24::write_kv_cache", mutates_args={"k_cache", "v_cache"})(
    launch_write_kv_cache
)


if INTERPRETED:

    @unified_attention_op.register_fake
    def _(*args, **kwargs) -> None:
        return None

    @write_kv_cache_op.register_fake
    def _(*args, **kwargs) -> None:
        return None
