"""Public JAX ops: the same kernels as ``sparse24.torch_ops``, name for name.

Inference only (no gradients). Every entry point checks its arguments once, through the one
input contract shared with the torch ops and the references (``sparse24.validation``: the
same code and the same messages), then runs without checking again, whatever the backend.
Arrays are ``jax.Array`` or ``numpy.ndarray``. Works under ``jax.jit`` (lengths, offsets
and block tables are traced arrays, so a decode loop does not retrace), ``jax.vmap`` (a
batching rule folds the mapped axis into more sequences), and ``shard_map`` (per device).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparse24 import layouts as _layouts
from sparse24.backends import resolve_backend as _resolve_backend
from sparse24.config import SparsityConfig
from sparse24.validation import (
    check_arrays,
    check_slots_in_range,
    check_write_kv_cache_args,
    prepare_padded_attention,
    prepare_unified_attention,
)

from . import _launch


def _is_traced(*arrays) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in arrays)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_backend(backend: str) -> str:
    """``sparse24.backends.resolve_backend`` for JAX: "auto" = the jax-triton kernel when the
    default backend is a GPU, the interpreter in an interpreting process, else the jnp
    reference (the same meaning as for torch)."""
    return _resolve_backend(backend, "jax", on_gpu=_on_gpu())


def _host_metadata(cu_seqlens_q, seq_lens, block_table):
    """``read_metadata`` of the contract: host copies, or None when any of them is traced."""
    if _is_traced(block_table, cu_seqlens_q, seq_lens):
        return None
    return np.asarray(cu_seqlens_q), np.asarray(seq_lens), np.asarray(block_table)


def _in_host_memory(x) -> bool:
    """Reading ``x`` costs no device sync: a numpy array, or a concrete array on a CPU device."""
    if isinstance(x, np.ndarray):
        return True
    if _is_traced(x):
        return False
    return all(d.platform == "cpu" for d in x.devices())


def _run_unified(backend, statics, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
    """One unbatched call; returns ``(out [T, H_q, D] in q's dtype,)``, plus ``lse`` f32
    [T, H_q] when the statics ask for it (the kernel's STORE_LSE, as in torch)."""
    (cfg, causal, scale, window, softcap, max_q, max_k, splits, store_lse, store_stats) = statics
    if backend == "reference":  # checked already: straight to the computation
        from sparse24.jax_reference import _forward

        results = _forward(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=cfg, causal=causal,
            scale=scale, window=window, softcap=softcap, chunk_size=256, query_chunk=128, stats=store_stats,
        )
        if store_stats:  # (out, lse, kept mass, kept keys)
            return results
        return results[:2] if store_lse else results[:1]
    launches = _launch.attention_calls(
        q_shape=q.shape, dtype=q.dtype, cache_shape=k_cache.shape, block_table_shape=block_table.shape,
        num_seqs=int(seq_lens.shape[0]), config=cfg, causal=causal, softmax_scale=scale, window=window,
        softcap=softcap, max_seqlen_q=max_q, max_seqlen_k=max_k, num_kv_splits=splits,
        num_sms=_num_sms() if backend == "triton" else None, interpret=backend == "interpret",
        store_lse=store_lse, store_stats=store_stats,
    )
    run = _launch.run_triton if backend == "triton" else _launch.run_interpret
    results = ("out", "lse") if store_lse or store_stats else ("out",)
    results = tuple(run(launches, _launch.ATTENTION_INPUTS, results, q, k_cache, v_cache, block_table,
                        cu_seqlens_q, seq_lens))
    if store_stats:  # the kernel's (lse, kept mass, kept keys) rows
        stats = results[1]
        return results[0], stats[..., 0], stats[..., 1], stats[..., 2]
    return results


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


@functools.lru_cache(maxsize=256)
def _unified_primitive(backend, statics):
    """The op with a vmap rule (jax-triton refuses vmap; the rule makes every backend batch
    the same way, so CPU tests cover it); one per (backend, statics), built once."""

    @jax.custom_batching.custom_vmap
    def op(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        return _run_unified(backend, statics, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)

    @op.def_vmap
    def _rule(axis_size, in_batched, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens):
        num_tokens = q.shape[1] if in_batched[0] else q.shape[0]
        folded = _fold_batch(axis_size, in_batched, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)
        results = tuple(r.reshape((axis_size, num_tokens) + r.shape[1:]) for r in op(*folded))
        return results, tuple(True for _ in results)

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
    return_stats: bool = False,
):
    """N:M-sparse attention over a paged KV cache (see ``sparse24.torch_ops.unified_attention``).

    The same contract as the torch op (``sparse24.validation.prepare_unified_attention``).

    Args:
      q: [num_tokens, num_q_heads, head_dim] f32 | bf16 | f16 (a ``jax.Array`` or a
        ``numpy.ndarray``, as every array argument).
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype.
      block_table: i32[num_seqs, max_blocks_per_seq].
      cu_seqlens_q: i32[num_seqs + 1], starts at 0, ends at num_tokens; seq_lens:
        i32[num_seqs] (keys incl. the new tokens, >= each q_len). These may be traced (jit):
        only shapes and the keyword options are static.
      config, causal, softmax_scale, window, softcap: static options, as in torch_ops.
      return_lse: also return f32[num_tokens, num_q_heads] (natural log).
      max_seqlen_q, max_seqlen_k: static launch hints (upper bounds); given, the metadata is
        not read (the caller vouches for it). Else, when the metadata is concrete, they are
        read from it and the metadata is checked (a device-to-host copy); under jit they
        default to 1 for a decode-shaped batch (num_tokens == num_seqs) else num_tokens,
        and max_blocks_per_seq * block_size. Results never depend on them.
      num_kv_splits: force a split-KV count (power of two <= 64); results do not depend on it.
      backend: "auto" (the same meaning as for torch: the jax-triton kernel when JAX's default
        backend is a GPU, "interpret" in an interpreting process, else "reference") | "triton"
        | "interpret" (the Triton kernel in the CPU interpreter through a host callback;
        needs TRITON_INTERPRET=1 before triton is imported) | "reference" (jax.numpy).

      return_stats: also return a ``sparse24.reference.KeptStats`` of f32 [num_tokens,
        num_q_heads] arrays (kept softmax mass, kept keys, LSE), as the torch op does (the
        same kernel path; ``num_kv_splits`` None or 1).

    Returns:
      out [num_tokens, num_q_heads, head_dim] in q's dtype, or ``(out, lse)``, or
      ``(out, stats)`` with ``return_stats``.
    """
    prepared = prepare_unified_attention(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, framework="jax", config=config,
        causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_kv_splits=num_kv_splits,
        return_stats=return_stats, read_metadata=lambda: _host_metadata(cu_seqlens_q, seq_lens, block_table),
    )
    chosen = resolve_backend(backend)
    results = _call(chosen, prepared.config, prepared.options, prepared.max_seqlen_q, prepared.max_seqlen_k,
                    prepared.num_kv_splits, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
                    return_lse=prepared.return_lse, return_stats=prepared.return_stats)
    if prepared.return_stats:
        from sparse24.reference import KeptStats

        out, lse, mass, kept = results
        return out, KeptStats(mass, kept, lse)
    return results if prepared.return_lse else results[0]


def _call(backend, cfg, opts, max_seqlen_q, max_seqlen_k, num_kv_splits, q, k_cache, v_cache, block_table,
          cu_seqlens_q, seq_lens, *, return_lse: bool, return_stats: bool = False):
    """Checked inputs -> ``(out [T, H_q, D],)`` or ``(out, lse f32 [T, H_q])`` on a resolved
    backend (no validation here; ``cu_seqlens_q[-1] <= T`` is fine: rows past it belong to
    no sequence)."""
    statics = (cfg, opts.causal, opts.softmax_scale, opts.window, opts.softcap,
               int(max_seqlen_q), int(max_seqlen_k), num_kv_splits, bool(return_lse), bool(return_stats))
    op = _unified_primitive(backend, statics)
    return op(*(jnp.asarray(x) for x in (q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)))


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
    real and bottom-right aligned; other rows output zeros. A thin caller of the unified
    kernel (``sparse24.layouts``): K/V are handed over as a paged cache with one page per
    row (no copy), with the static maxima ``seqlen_q`` / ``seqlen_k`` (upper bounds), so the
    metadata is never read on the host; the real rows are packed and unpacked by gathers.
    ``seq_lens`` may be traced.

    Args:
      q: [batch, seqlen_q, num_q_heads, head_dim] f32 | bf16 | f16; k, v: [batch, seqlen_k,
        num_kv_heads, head_dim], q's dtype (``jax.Array`` or ``numpy.ndarray``).
      seq_lens: optional i32[batch]. Its values must lie in ``[0, seqlen_k]``: checked (a
        ValueError) when it sits in host memory (a numpy array, or a concrete array on a CPU
        device: no device sync); traced or on a GPU it is not read, and values outside the
        range are clamped to it.
      causal, config, softmax_scale, window, softcap, backend: as in ``unified_attention``.

    Returns:
      [batch, seqlen_q, num_q_heads, head_dim] in q's dtype.
    """
    prepared = prepare_padded_attention(
        q, k, v, seq_lens, framework="jax", config=config, causal=causal, softmax_scale=softmax_scale,
        window=window, softcap=softcap,
        read_seq_lens=lambda: np.asarray(seq_lens) if _in_host_memory(seq_lens) else None,
    )
    chosen = resolve_backend(backend)
    layout = _layouts.padded_layout_jnp(prepared.batch, prepared.seqlen_q, prepared.seqlen_k, seq_lens)
    q_packed = _layouts.pack_padded_jnp(jnp.asarray(q), layout)
    (out,) = _call(chosen, prepared.config, prepared.options, prepared.seqlen_q, prepared.seqlen_k, None,
                   q_packed, k, v, layout.block_table, layout.cu_seqlens_q, layout.seq_lens, return_lse=False)
    return _layouts.unpack_padded_jnp(out, layout, tuple(q.shape))


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, backend: str = "auto", check_slots: bool = True):
    """Write new keys/values into the paged caches; returns the updated ``(k_cache, v_cache)``.

    Functional; on the GPU the cache buffers are aliased to the outputs
    (``input_output_aliases``), so under ``jax.jit`` with donated caches no copy is made.

    Args:
      k, v: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
      num_kv_heads, head_dim]; slot_mapping: i32[num_tokens] (negative = skip).
      check_slots: True (default): a concrete slot_mapping is read on the host (a traced one
        under ``jax.jit`` cannot be) and a slot >= num_blocks * block_size is a ValueError;
        False: no host read. In every case a slot outside ``[0, num_blocks * block_size)`` is
        skipped: nothing is written outside the caches.
    """
    check_arrays("jax", k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping)
    chosen = resolve_backend(backend)
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    check_slots_in_range(None if _is_traced(slot_mapping) else (lambda: np.asarray(slot_mapping)), num_slots,
                         check_slots)
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
