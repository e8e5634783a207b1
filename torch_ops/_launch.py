"""torch.library registrations of the Triton kernels (inference only, no autograd).

With compiled kernels the ops are ``torch.library.triton_op``s that launch through
``torch.library.wrap_triton``, so ``torch.compile`` sees the Triton kernels and CUDA
graphs can capture them. In an interpreting process (``TRITON_INTERPRET=1``) the same
kernel objects are called directly from an opaque ``torch.library.custom_op``. All launch
math comes from ``sparse24.kernels.planner``.

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
from sparse24.kernels import (
    plan_unified_attention,
    plan_write_kv_cache,
    reduce_segments_kernel,
    unified_attention_kernel,
    write_kv_cache_kernel,
)


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
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    plan = plan_unified_attention(
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype_str(q.dtype),
        n=n,
        m=m,
        max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k,
        num_sms=num_sms(q.device),
        interpret=INTERPRETED,
        num_kv_splits=num_kv_splits or None,
    )
    if plan.is_split:
        segm_acc = torch.empty(
            (num_tokens, num_q_heads, plan.num_segments, plan.head_dim_pad), dtype=torch.float32, device=q.device
        )
        segm_max = torch.empty((num_tokens, num_q_heads, plan.num_segments), dtype=torch.float32, device=q.device)
        segm_sum = torch.empty_like(segm_max)
    else:
        segm_acc = segm_max = segm_sum = torch.empty((1,), dtype=torch.float32, device=q.device)
    _launcher(unified_attention_kernel, direct)[plan.grid](
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
        out, lse, segm_acc, segm_max, segm_sum,
        softmax_scale, softcap, window, dense_sink_tokens, dense_recent_tokens,
        num_seqs,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        block_table.stride(0), block_table.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(-1),
        **plan.kernel_constexprs(
            page_size=k_cache.shape[1],
            causal=causal,
            use_window=window > 0,
            use_softcap=softcap > 0,
            use_sink=dense_sink_tokens > 0,
            use_recent=dense_recent_tokens > 0,
            sparse_decode=sparse_decode,
            store_lse=store_lse,
        ),
    )
    if plan.is_split:
        _launcher(reduce_segments_kernel, direct)[plan.reduce_grid](
            segm_acc, segm_max, segm_sum,
            out, lse,
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(-1),
            **plan.reduce_constexprs(store_lse=store_lse),
        )


def launch_write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    direct: bool = False,
) -> None:
    """Scatter k/v [T, H_kv, D] into the caches at ``slot_mapping`` [T] (negative = skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    plan = plan_write_kv_cache(num_tokens=num_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim)
    if num_tokens == 0:
        return
    _launcher(write_kv_cache_kernel, direct)[plan.grid](
        k, v, slot_mapping, k_cache, v_cache,
        k_cache, v_cache,
        k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), v_cache.stride(3),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=plan.head_dim_pad,
        num_warps=plan.num_warps,
    )


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
