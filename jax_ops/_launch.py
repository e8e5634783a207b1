"""Launching the Triton kernels from JAX: one argument list, two ways to run it.

``KernelCall`` is the complete description of one launch: the kernel object from
``sparse24.kernels``, the positional input arrays, the output shapes/dtypes, the grid,
and the keyword scalars + constexprs -- built once here from the shared planner. It then
runs either

* on a GPU through ``jax_triton.triton_call`` (inputs positional, outputs appended,
  everything else by keyword -- jax-triton's binding, which the kernel signature follows);
* on the CPU through ``jax.pure_callback`` into Triton's interpreter, calling the very
  same kernel with the very same argument list on host copies.

So the CPU tests exercise the JAX launch contract (argument order, strides, dtypes,
outputs) with the real kernel source. jax-triton is imported lazily: it refuses to import
without a CUDA jaxlib.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparse24.kernels import (
    plan_unified_attention,
    plan_write_kv_cache,
    reduce_segments_kernel,
    unified_attention_kernel,
    write_kv_cache_kernel,
)


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major element strides of a JAX array of this shape (JAX arrays are dense)."""
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(int(dim), 1)
    return tuple(reversed(strides))


@dataclasses.dataclass(frozen=True)
class KernelCall:
    kernel: Any
    out_shapes: tuple[jax.ShapeDtypeStruct, ...]
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    keywords: dict  # runtime scalars (Python float / int) and constexprs, by name
    input_output_aliases: tuple[tuple[int, int], ...] = ()
    feeds_next: tuple[int, ...] = ()  # outputs that are the next call's inputs


def attention_calls(
    *,
    q_shape,
    dtype,
    cache_shape,
    block_table_shape,
    num_seqs: int,
    config,
    causal: bool,
    softmax_scale: float,
    window: int,
    softcap: float,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_kv_splits: int | None,
    num_sms: int | None,
    interpret: bool,
) -> list[KernelCall]:
    """The launch(es) of one unified-attention call: the main kernel, plus the reduce
    kernel when the plan splits the key range. Outputs of the last call: (out, lse)."""
    num_tokens, num_q_heads, head_dim = (int(d) for d in q_shape)
    num_kv_heads = int(cache_shape[2])
    dtype_name = jnp.dtype(dtype).name
    plan = plan_unified_attention(
        num_tokens=num_tokens, num_seqs=num_seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype_name, n=config.n, m=config.m,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_sms=num_sms, interpret=interpret,
        num_kv_splits=num_kv_splits,
    )
    q_strides = contiguous_strides(q_shape)
    cache_strides = contiguous_strides(cache_shape)
    bt_strides = contiguous_strides(block_table_shape)
    out = jax.ShapeDtypeStruct((num_tokens, num_q_heads, head_dim), dtype)
    lse = jax.ShapeDtypeStruct((num_tokens, num_q_heads), jnp.float32)
    if plan.is_split:
        segm_acc = jax.ShapeDtypeStruct((num_tokens, num_q_heads, plan.num_segments, plan.head_dim_pad), jnp.float32)
        segm_max = jax.ShapeDtypeStruct((num_tokens, num_q_heads, plan.num_segments), jnp.float32)
        segm_sum = segm_max
    else:
        segm_acc = segm_max = segm_sum = jax.ShapeDtypeStruct((1,), jnp.float32)
    constexprs = plan.kernel_constexprs(
        page_size=int(cache_shape[1]), causal=causal, use_window=window > 0, use_softcap=softcap > 0,
        use_sink=config.dense_sink_tokens > 0, use_recent=config.dense_recent_tokens > 0,
        sparse_decode=config.sparse_decode, store_lse=True,
    )
    num_warps = constexprs.pop("num_warps")
    num_stages = constexprs.pop("num_stages")
    out_strides = contiguous_strides(out.shape)
    lse_strides = contiguous_strides(lse.shape)
    main = KernelCall(
        kernel=unified_attention_kernel,
        out_shapes=(out, lse, segm_acc, segm_max, segm_sum),
        grid=plan.grid,
        num_warps=num_warps,
        num_stages=num_stages,
        feeds_next=(2, 3, 4),  # split partials -> reduce_segments_kernel
        keywords=dict(
            # jax-triton passes keyword scalars as compile-time constants: Python floats
            # (the kernel casts them to fp32), not np.float32, which Triton cannot convert.
            softmax_scale=float(softmax_scale), softcap=float(softcap), window=int(window),
            dense_sink_tokens=config.dense_sink_tokens, dense_recent_tokens=config.dense_recent_tokens,
            num_seqs=num_seqs,
            stride_q_token=q_strides[0], stride_q_head=q_strides[1], stride_q_dim=q_strides[2],
            stride_kc_block=cache_strides[0], stride_kc_slot=cache_strides[1],
            stride_kc_head=cache_strides[2], stride_kc_dim=cache_strides[3],
            stride_vc_block=cache_strides[0], stride_vc_slot=cache_strides[1],
            stride_vc_head=cache_strides[2], stride_vc_dim=cache_strides[3],
            stride_bt_seq=bt_strides[0], stride_bt_page=bt_strides[1],
            stride_out_token=out_strides[0], stride_out_head=out_strides[1], stride_out_dim=out_strides[2],
            stride_lse_token=lse_strides[0], stride_lse_head=lse_strides[1],
            **constexprs,
        ),
    )
    if not plan.is_split:
        return [main]
    reduce_constexprs = plan.reduce_constexprs(store_lse=True)
    reduce = KernelCall(
        kernel=reduce_segments_kernel,
        out_shapes=(out, lse),
        grid=plan.reduce_grid,
        num_warps=reduce_constexprs.pop("num_warps"),
        num_stages=2,
        keywords=dict(
            stride_out_token=out_strides[0], stride_out_head=out_strides[1], stride_out_dim=out_strides[2],
            stride_lse_token=lse_strides[0], stride_lse_head=lse_strides[1],
            **reduce_constexprs,
        ),
    )
    return [main, reduce]


def write_kv_cache_call(*, kv_shape, cache_shape, dtype) -> KernelCall:
    """The cache-write launch. Inputs (k, v, slot_mapping, k_cache, v_cache); outputs the
    two caches, aliased to inputs 3 and 4 so a jitted step updates them in place."""
    num_tokens, num_kv_heads, head_dim = (int(d) for d in kv_shape)
    plan = plan_write_kv_cache(num_tokens=num_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim)
    kv_strides = contiguous_strides(kv_shape)
    cache_strides = contiguous_strides(cache_shape)
    cache = jax.ShapeDtypeStruct(tuple(cache_shape), dtype)
    return KernelCall(
        kernel=write_kv_cache_kernel,
        out_shapes=(cache, cache),
        grid=plan.grid,
        num_warps=plan.num_warps,
        num_stages=1,
        keywords=dict(
            block_size=int(cache_shape[1]),
            stride_k_token=kv_strides[0], stride_k_head=kv_strides[1], stride_k_dim=kv_strides[2],
            stride_v_token=kv_strides[0], stride_v_head=kv_strides[1], stride_v_dim=kv_strides[2],
            stride_kc_block=cache_strides[0], stride_kc_slot=cache_strides[1],
            stride_kc_head=cache_strides[2], stride_kc_dim=cache_strides[3],
            stride_vc_block=cache_strides[0], stride_vc_slot=cache_strides[1],
            stride_vc_head=cache_strides[2], stride_vc_dim=cache_strides[3],
            HEAD_DIM=head_dim, HEAD_DIM_PAD=plan.head_dim_pad,
        ),
        input_output_aliases=((3, 0), (4, 1)),
    )


# ---------------------------------------------------------------- GPU: jax-triton


@functools.lru_cache(maxsize=None)
def jax_triton():
    """The jax_triton module (imported on first GPU use; it needs a CUDA jaxlib)."""
    # jax-triton 0.3.1 sets os.environ["TRITON_CACHE_DIR"] = "" at import, which breaks every
    # later Triton compile in the process (torch's included: "Could not create or locate cache
    # dir"). Keep the process's setting.
    saved_cache_dir = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton as jt
    except Exception as err:  # ImportError, or its own refusal on a CPU-only jaxlib
        raise RuntimeError(
            "backend='triton' for JAX needs jax-triton (pip install 'jax-triton==0.3.1') and a CUDA jaxlib; "
            f"importing it failed: {err}"
        ) from err
    finally:
        if saved_cache_dir is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved_cache_dir
    return jt


def run_triton(calls: Sequence[KernelCall], *inputs):
    """The launches through ``jax_triton.triton_call``; returns the last one's outputs."""
    jt = jax_triton()
    args = inputs
    for call in calls:
        kwargs = dict(
            kernel=call.kernel, out_shape=list(call.out_shapes), grid=call.grid,
            num_warps=call.num_warps, num_stages=call.num_stages, **call.keywords,
        )
        if call.input_output_aliases:
            kwargs["input_output_aliases"] = dict(call.input_output_aliases)
        outs = tuple(jt.triton_call(*args, **kwargs))
        args = tuple(outs[i] for i in call.feeds_next)
    return outs


# ---------------------------------------------------------------- CPU: the interpreter


def _to_torch(x: np.ndarray):
    import torch

    x = np.array(x, copy=True)  # callback buffers are read-only
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _to_numpy(t, dtype) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(jnp.dtype(dtype))
    return t.numpy()


_INTERPRETER_LOCK = threading.Lock()  # Triton's interpreter patches module state: one launch at a time


def _host_launch(calls: Sequence[KernelCall], *inputs: np.ndarray):
    """Run the launches on host copies through Triton's interpreter. The outputs of one
    launch feed the next (the reduce kernel takes the split partials). Callbacks of several
    devices (shard_map) may arrive concurrently: launches are serialised."""
    with _INTERPRETER_LOCK:
        return _host_launch_locked(calls, *inputs)


def _host_launch_locked(calls: Sequence[KernelCall], *inputs: np.ndarray):
    import torch

    args = [_to_torch(x) for x in inputs]
    for call in calls:
        outs = [torch.empty(s.shape, dtype=_torch_dtype(s.dtype)) for s in call.out_shapes]
        for i, o in call.input_output_aliases:
            outs[o] = args[i]  # aliased output = the input buffer, as on the GPU
        call.kernel[call.grid](*args, *outs, num_warps=call.num_warps, num_stages=call.num_stages, **call.keywords)
        args = [outs[i] for i in call.feeds_next]
    return tuple(_to_numpy(o, s.dtype) for o, s in zip(outs, calls[-1].out_shapes))


def _torch_dtype(dtype):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "int32": torch.int32}[jnp.dtype(dtype).name]


def run_interpret(calls: Sequence[KernelCall], *inputs):
    """The launches as a ``jax.pure_callback`` into Triton's interpreter (jit/vmap-safe)."""
    result_shapes = tuple(calls[-1].out_shapes)
    return jax.pure_callback(
        functools.partial(_host_launch, tuple(calls)), result_shapes, *inputs, vmap_method="sequential"
    )
