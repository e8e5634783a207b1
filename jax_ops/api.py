"""Public JAX ops: the same kernels as ``sparse24.torch_ops``, name for name.

Inference only (no gradients). Validated with the same code and messages as the torch
side (``sparse24.validation``). Works under ``jax.jit`` (lengths, offsets and block
tables are traced arrays, so a decode loop does not retrace), ``jax.vmap`` (a batching
rule folds the mapped axis into more sequences), and ``shard_map`` (per device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse24.backends import resolve_backend as _resolve_backend
from sparse24.config import SparsityConfig
from sparse24.validation import (
    SEQ_LENS_SHAPE,
    check_array,
    check_dtype,
    check_lengths,
    check_max_seqlens,
    check_num_kv_splits,
    check_options,
    check_padded_attention_args,
    check_unified_attention_args,
    check_write_kv_cache_args,
    resolve_config,
)

from . import _launch


def _check_arrays(**arrays) -> None:
    for name, x in arrays.items():
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{name} must be a jax.Array, got {type(x).__name__}")


def _is_traced(*arrays) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in arrays)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_backend(backend: str) -> str:
    """JAX backends: "auto" = the jax-triton kernel on a GPU, else the jnp reference."""
    return _resolve_backend(backend, on_cuda=_on_gpu(), auto_interprets=False)


def _run_unified(backend, statics, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
    """One unbatched call; returns (out [T, H_q, D] in q's dtype, lse f32 [T, H_q])."""
    (cfg, causal, scale, window, softcap, max_q, max_k, splits) = statics
    if backend == "reference":
        from sparse24.jax_reference import unified_attention_jax_reference

        return unified_attention_jax_reference(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=cfg, causal=causal,
            softmax_scale=scale, window=window or None, softcap=softcap or None, return_lse=True,
        )
    calls = _launch.attention_calls(
        q_shape=q.shape, dtype=q.dtype, cache_shape=k_cache.shape, block_table_shape=block_table.shape,
        num_seqs=int(seq_lens.shape[0]), config=cfg, causal=causal, softmax_scale=scale, window=window,
        softcap=softcap, max_seqlen_q=max_q, max_seqlen_k=max_k, num_kv_splits=splits,
        num_sms=_num_sms() if backend == "triton" else None, interpret=backend == "interpret",
    )
    run = _launch.run_triton if backend == "triton" else _launch.run_interpret
    out, lse = run(calls, _launch.ATTENTION_INPUTS, ("out", "lse"), q, k_cache, v_cache, block_table,
                   cu_seqlens_q, seq_lens)
    return out, lse


@functools.lru_cache(maxsize=None)
def _num_sms() -> int | None:
    device = jax.devices()[0]
    return getattr(device, "core_count", None)


def _fold_batch(axis_size, in_batched, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
    """vmap rule: fold the mapped axis into sequences. Returns unbatched arrays."""
    v = axis_size

    def batched(x, flag):
        return x if flag else jnp.broadcast_to(x, (v,) + x.shape)

    q_b, kc_b, vc_b, bt_b, cu_b, sl_b = in_batched
    q = batched(q, q_b)
    num_tokens = q.shape[1]
    block_table = batched(block_table, bt_b)
    cu = batched(cu_seqlens_q, cu_b)
    seq_lens = batched(seq_lens, sl_b)
    if kc_b or vc_b:  # per-member caches: stack their pages, offset the block tables
        k_cache, v_cache = batched(k_cache, kc_b), batched(v_cache, vc_b)
        num_blocks = k_cache.shape[1]
        block_table = block_table + (jnp.arange(v, dtype=block_table.dtype) * num_blocks)[:, None, None]
        k_cache = k_cache.reshape((-1,) + k_cache.shape[2:])
        v_cache = v_cache.reshape((-1,) + v_cache.shape[2:])
    starts = cu[:, :-1] + (jnp.arange(v, dtype=cu.dtype) * num_tokens)[:, None]
    cu = jnp.concatenate([starts.reshape(-1), jnp.full((1,), v * num_tokens, cu.dtype)])
    return (
        q.reshape((-1,) + q.shape[2:]), k_cache, v_cache,
        block_table.reshape((-1,) + block_table.shape[2:]), cu, seq_lens.reshape(-1),
    )


def _unified_primitive(backend, statics):
    """The op with a vmap rule (jax-triton refuses vmap; the rule makes every backend batch
    the same way, so CPU tests cover it)."""

    @jax.custom_batching.custom_vmap
    def op(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        return _run_unified(backend, statics, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)

    @op.def_vmap
    def _rule(axis_size, in_batched, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        num_tokens = q.shape[1] if in_batched[0] else q.shape[0]
        folded = _fold_batch(axis_size, in_batched, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)
        out, lse = op(*folded)
        out = out.reshape((axis_size, num_tokens) + out.shape[1:])
        lse = lse.reshape((axis_size, num_tokens) + lse.shape[1:])
        return (out, lse), (True, True)

    return op


def unified_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cu_seqlens_q,
    seq_lens,
    *,
    config: SparsityConfig | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_kv_splits: int | None = None,
    backend: str = "auto",
):
    """N:M-sparse attention over a paged KV cache (see ``sparse24.torch_ops.unified_attention``).

    Args:
      q: [num_tokens, num_q_heads, head_dim] f32 | bf16 | f16.
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype.
      block_table: i32[num_seqs, max_blocks_per_seq].
      cu_seqlens_q: i32[num_seqs + 1]; seq_lens: i32[num_seqs] (keys incl. the new tokens).
        These may be traced (jit): only shapes and the keyword options are static.
      config, causal, softmax_scale, window, softcap: static options, as in torch_ops.
      return_lse: also return f32[num_tokens, num_q_heads] (natural log).
      max_seqlen_q, max_seqlen_k: static launch hints (upper bounds). When the metadata is
        concrete they are read from it (and the metadata is validated); under jit they
        default to 1 for a decode-shaped batch (num_tokens == num_seqs) else num_tokens,
        and max_blocks_per_seq * block_size. Results never depend on them.
      num_kv_splits: force a split-KV count (power of two <= 64); results do not depend on it.
      backend: "auto" (jax-triton kernel on a GPU, else "reference") | "triton" |
        "interpret" (the Triton kernel in the CPU interpreter through a host callback;
        needs TRITON_INTERPRET=1 before triton is imported) | "reference" (jax.numpy).

    Returns:
      out [num_tokens, num_q_heads, head_dim] in q's dtype, or ``(out, lse)``.
    """
    cfg = resolve_config(config)
    _check_arrays(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                  cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    dims = check_unified_attention_args(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)
    opts = check_options(dims.head_dim, softmax_scale, window, softcap, causal)
    check_max_seqlens(max_seqlen_q, max_seqlen_k)
    check_num_kv_splits(num_kv_splits)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    chosen = resolve_backend(backend)
    if max_seqlen_q is None:
        if not _is_traced(block_table, cu_seqlens_q, seq_lens):
            max_seqlen_q, max_seqlen_k = check_lengths(
                np.asarray(cu_seqlens_q), np.asarray(seq_lens), np.asarray(block_table), dims
            )
        else:
            max_seqlen_q = 1 if dims.num_tokens == dims.num_seqs else dims.num_tokens
            max_seqlen_k = dims.max_blocks_per_seq * dims.block_size
    q, k_cache, v_cache = jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache)
    statics = (cfg, bool(causal), opts.softmax_scale, opts.window, opts.softcap,
               int(max_seqlen_q), int(max_seqlen_k), None if num_kv_splits is None else int(num_kv_splits))
    op = _unified_primitive(chosen, statics)
    out, lse = op(q, k_cache, v_cache, jnp.asarray(block_table), jnp.asarray(cu_seqlens_q), jnp.asarray(seq_lens))
    return (out, lse) if return_lse else out


def attention(
    q,
    k,
    v,
    *,
    causal: bool = True,
    config: SparsityConfig | None = None,
    seq_lens=None,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
):
    """N:M-sparse attention in the ``[B, S, H, D]`` layout of ``jax.nn.dot_product_attention``.

    Same semantics as ``sparse24.torch_ops.attention``: row b's first ``seq_lens[b]`` keys
    are real (default all); its first ``q_len = min(seqlen_q, seq_lens[b])`` query rows are
    real and bottom-right aligned; other rows output zeros. K/V are handed to the kernel as
    a paged cache with one page per row (no copy). ``seq_lens`` may be traced.

    Args:
      q: [batch, seqlen_q, num_q_heads, head_dim]; k, v: [batch, seqlen_k, num_kv_heads, head_dim].
      seq_lens: optional i32[batch].

    Returns:
      [batch, seqlen_q, num_q_heads, head_dim] in q's dtype.
    """
    _check_arrays(q=q, k=k, v=v)
    batch, seqlen_q, seqlen_k, num_q_heads, _, head_dim = check_padded_attention_args(q, k, v)
    if seqlen_k < 1:
        raise ValueError(f"k must have shape [batch, seqlen_k, num_kv_heads, head_dim] with seqlen_k >= 1, got {list(k.shape)}")
    block_table = jnp.arange(batch, dtype=jnp.int32)[:, None]
    max_q = 1 if seqlen_q == 1 else seqlen_q
    kwargs = dict(config=config, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                  max_seqlen_q=max_q, max_seqlen_k=seqlen_k, backend=backend)
    if seq_lens is None:
        cu = jnp.arange(batch + 1, dtype=jnp.int32) * seqlen_q
        kv_lens = jnp.full((batch,), seqlen_k, jnp.int32)
        out = unified_attention(jnp.reshape(q, (batch * seqlen_q, num_q_heads, head_dim)), k, v, block_table, cu,
                                kv_lens, **kwargs)
        return out.reshape(q.shape)
    _check_arrays(seq_lens=seq_lens)
    check_array("seq_lens", seq_lens, SEQ_LENS_SHAPE, 1)
    check_dtype("seq_lens", seq_lens, ("int32",))
    if seq_lens.shape[0] != batch:
        raise ValueError(f"seq_lens must have shape {SEQ_LENS_SHAPE} with num_seqs = batch = {batch}, got {list(seq_lens.shape)}")
    if not _is_traced(seq_lens):
        host = np.asarray(seq_lens)
        if (host < 0).any() or (host > seqlen_k).any():
            raise ValueError(f"seq_lens must hold values in [0, seqlen_k = {seqlen_k}]")
    seq_lens = jnp.asarray(seq_lens)
    q_lens = jnp.minimum(seqlen_q, seq_lens)  # [batch]
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    rows = jnp.arange(seqlen_q, dtype=jnp.int32)[None, :]  # [1, seqlen_q]
    real = rows < q_lens[:, None]  # [batch, seqlen_q]
    total = batch * seqlen_q
    dest = jnp.where(real, cu[:-1, None] + rows, total).reshape(-1)  # packed row of each (b, i); total = drop
    q_packed = jnp.zeros((total, num_q_heads, head_dim), q.dtype).at[dest].set(
        jnp.reshape(q, (total, num_q_heads, head_dim)), mode="drop")
    # Packed rows past cu[-1] belong to no sequence: the kernel leaves them unwritten and
    # they are never read back below.
    out_packed = unified_attention(q_packed, k, v, block_table, cu, seq_lens, **kwargs)
    out = jnp.where(real.reshape(-1)[:, None, None], out_packed[jnp.minimum(dest, total - 1)], 0)
    return out.reshape(q.shape).astype(q.dtype)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend: str = "auto"):
    """Write new keys/values into the paged caches; returns the updated ``(k_cache, v_cache)``.

    Functional; on the GPU the cache buffers are aliased to the outputs
    (``input_output_aliases``), so under ``jax.jit`` with donated caches no copy is made.

    Args:
      k, v: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
      num_kv_heads, head_dim]; slot_mapping: i32[num_tokens] (negative = skip).
    """
    _check_arrays(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping)
    chosen = resolve_backend(backend)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if not _is_traced(slot_mapping) and (np.asarray(slot_mapping) >= num_slots).any():
        raise ValueError(f"slot_mapping must hold slots < num_blocks * block_size = {num_slots} (or < 0 to skip)")
    k, v, k_cache, v_cache = (jnp.asarray(x) for x in (k, v, k_cache, v_cache))
    slot_mapping = jnp.asarray(slot_mapping)
    if chosen == "reference":
        slots = jnp.where(slot_mapping >= 0, slot_mapping, num_slots)
        flat = (num_slots,) + k_cache.shape[2:]
        new_k = k_cache.reshape(flat).at[slots].set(k.astype(k_cache.dtype), mode="drop").reshape(k_cache.shape)
        new_v = v_cache.reshape(flat).at[slots].set(v.astype(v_cache.dtype), mode="drop").reshape(v_cache.shape)
        return new_k, new_v
    launches = _launch.write_kv_cache_call(kv_shape=k.shape, cache_shape=k_cache.shape, dtype=k_cache.dtype)
    run = _launch.run_triton if chosen == "triton" else _launch.run_interpret
    return tuple(run(launches, _launch.WRITE_INPUTS, ("k_cache", "v_cache"), k, v, slot_mapping, k_cache, v_cache))
