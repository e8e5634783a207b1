"""Public PyTorch ops: validate once, allocate, dispatch to a backend.

Inference only (no autograd). Inputs are never modified (``write_kv_cache`` writes the
caches it is given: that is its job).
"""

from __future__ import annotations

import torch

from sparse24 import reference as _reference
from sparse24.backends import resolve_backend
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

from ._launch import launch_unified_attention, launch_write_kv_cache  # importing registers the ops


def _check_tensors(optional: tuple[str, ...] = (), **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors are torch tensors on one device (that of the first)."""
    device = first = None
    for name, t in tensors.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} must be on the device of {first} ({device}), got {t.device}")
    return device


def _eager(*tensors: torch.Tensor) -> bool:
    """Plain tensors outside torch.compile: launch directly, without the op dispatcher."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


def _can_sync() -> bool:
    """Host reads are allowed (not tracing for torch.compile, not capturing a CUDA graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def unified_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    config: SparsityConfig | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_kv_splits: int | None = None,
    backend: str = "auto",
):
    """N:M-sparse attention over a paged KV cache, prefill and decode mixed in one call.

    Sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` (``q_len``) and
    ``seq_lens[b]`` keys (``kv_len``, the new tokens' keys included, already in the
    cache). Query ``i`` sits at position ``p = kv_len - q_len + i``. In every group of M
    consecutive keys ``[M*g, M*g + M)`` each query row keeps the N largest scores (ties:
    the lower key index); keys in the dense regions are always kept::

        keys      0 1 2 3 | 4 5 6 7 | 8 9 10 11    2:4 (recent=0), causal, row p = 9
        scores    3 1 4 1 | 5 9 2 6 | 5 3 -inf -inf
        kept      x . x . | . x . x | x x  .    .   (a group cut by causality)

    Args:
      q: [num_tokens, num_q_heads, head_dim] fp32 | bf16 | fp16, packed queries.
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype, any
        strides. A contiguous cache is one page per sequence.
      block_table: i32[num_seqs, max_blocks_per_seq]; key j of sequence b is at page
        ``block_table[b, j // block_size]``, slot ``j % block_size``.
      cu_seqlens_q: i32[num_seqs + 1], starts at 0, ends at num_tokens.
      seq_lens: i32[num_seqs], keys per sequence (>= its q_len).
      config: the N:M pattern and dense regions; None = ``SparsityConfig()`` (2:4,
        64 dense recent keys); ``SparsityConfig.dense()`` = plain attention.
      causal: mask keys after the query's position.
      softmax_scale: default ``1 / sqrt(head_dim)``.
      window: sliding window, keys with ``p - j < window`` are visible (None = off).
      softcap: ``s = softcap * tanh(s / softcap)`` before masking and selection (None = off).
      return_lse: also return the log-sum-exp, f32[num_tokens, num_q_heads] (natural log;
        -inf for rows with nothing kept).
      out: optional output buffer [num_tokens, num_q_heads, head_dim] in q's dtype.
      max_seqlen_q, max_seqlen_k: give both to skip reading the metadata on the host
        (no sync; needed under CUDA graphs). The caller then vouches that the metadata is
        valid and the maxima are upper bounds.
      num_kv_splits: force a split-KV count (power of two <= 64); None = the planner's.
        Results do not depend on it.
      backend: "auto" | "triton" | "interpret" | "reference" (see sparse24.backends).

    Returns:
      out [num_tokens, num_q_heads, head_dim] in q's dtype, or ``(out, lse)``.

    Example::

        >>> import torch, sparse24
        >>> from sparse24.torch_ops import unified_attention
        >>> q = torch.randn(5, 4, 64); kc = torch.randn(2, 16, 2, 64); vc = torch.randn(2, 16, 2, 64)
        >>> bt = torch.tensor([[0], [1]], dtype=torch.int32)
        >>> cu = torch.tensor([0, 4, 5], dtype=torch.int32); kv = torch.tensor([4, 9], dtype=torch.int32)
        >>> unified_attention(q, kc, vc, bt, cu, kv, backend="reference").shape
        torch.Size([5, 4, 64])
    """
    cfg = resolve_config(config)
    device = _check_tensors(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, out=out, optional=("out",),
    )
    dims = check_unified_attention_args(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out)
    opts = check_options(dims.head_dim, softmax_scale, window, softcap, causal)
    check_max_seqlens(max_seqlen_q, max_seqlen_k)
    check_num_kv_splits(num_kv_splits)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    chosen = resolve_backend(backend, on_cuda=device.type == "cuda")

    if max_seqlen_q is None:
        if not _can_sync():
            raise ValueError(
                "max_seqlen_q and max_seqlen_k must be given under torch.compile or CUDA graph capture "
                "(the metadata cannot be read on the host there)"
            )
        max_seqlen_q, max_seqlen_k = check_lengths(
            cu_seqlens_q.cpu().numpy(), seq_lens.cpu().numpy(), block_table.cpu().numpy(), dims
        )

    if chosen == "reference":
        return _reference.unified_attention_chunked(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens,
            config=cfg, causal=causal, softmax_scale=opts.softmax_scale,
            window=opts.window or None, softcap=opts.softcap or None,
            return_lse=return_lse, out=out,
        )

    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if return_lse:
        lse = torch.empty((dims.num_tokens, dims.num_q_heads), dtype=torch.float32, device=device)
    else:
        lse = torch.empty((1, 1), dtype=torch.float32, device=device)
    if dims.num_tokens > 0:
        args = (
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse,
            cfg.n, cfg.m, cfg.dense_sink_tokens, cfg.dense_recent_tokens, cfg.sparse_decode,
            bool(causal), opts.softmax_scale, opts.window, opts.softcap,
            int(max_seqlen_q), int(max_seqlen_k), int(num_kv_splits or 0), return_lse,
        )
        if _eager(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out):
            launch_unified_attention(*args, direct=True)
        else:
            torch.ops.sparse24.unified_attention(*args)
    return (out, lse) if return_lse else out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    config: SparsityConfig | None = None,
    seq_lens: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    window: int | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """N:M-sparse attention in the padded layout of flash-attn / ``jax.nn.dot_product_attention``.

    Args:
      q: [batch, seqlen_q, num_q_heads, head_dim].
      k, v: [batch, seqlen_k, num_kv_heads, head_dim]. Reached by the kernel in place
        (a contiguous K/V is a paged cache with one page per sequence; no copy).
      seq_lens: optional i32[batch]: row b's first ``seq_lens[b]`` keys are real (right
        padding); default ``seqlen_k`` for every row. Row b has
        ``q_len = min(seqlen_q, seq_lens[b])`` real queries (its first rows), bottom-right
        aligned: query i sits at position ``seq_lens[b] - q_len + i``. Other query rows
        output zeros.
      causal, config, softmax_scale, window, softcap, backend: as in ``unified_attention``.

    Returns:
      [batch, seqlen_q, num_q_heads, head_dim] in q's dtype.
    """
    device = _check_tensors(q=q, k=k, v=v, seq_lens=seq_lens, optional=("seq_lens",))
    batch, seqlen_q, seqlen_k, _, _, _ = check_padded_attention_args(q, k, v)
    if seqlen_k < 1:
        raise ValueError(f"k must have shape [batch, seqlen_k, num_kv_heads, head_dim] with seqlen_k >= 1, got {list(k.shape)}")
    if seq_lens is None:
        kv_lens = torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
        q_lens_host = [seqlen_q] * batch
    else:
        check_array("seq_lens", seq_lens, SEQ_LENS_SHAPE, 1)
        check_dtype("seq_lens", seq_lens, ("int32",))
        if seq_lens.shape[0] != batch:
            raise ValueError(f"seq_lens must have shape {SEQ_LENS_SHAPE} with num_seqs = batch = {batch}, got {list(seq_lens.shape)}")
        host = seq_lens.cpu()
        if (host < 0).any() or (host > seqlen_k).any():
            raise ValueError(f"seq_lens must hold values in [0, seqlen_k = {seqlen_k}]")
        kv_lens = seq_lens
        q_lens_host = [min(seqlen_q, int(x)) for x in host.tolist()]

    # K/V as a paged cache: page b = row b of k (block_size = seqlen_k), no copy.
    block_table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
    q_lens = torch.tensor(q_lens_host, dtype=torch.int32)
    cu_seqlens_q = torch.zeros(batch + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.cumsum(q_lens, 0)
    cu_seqlens_q = cu_seqlens_q.to(device)
    full_rows = all(x == seqlen_q for x in q_lens_host)
    if full_rows:
        q_packed = q.reshape(batch * seqlen_q, q.shape[2], q.shape[3])
    else:
        row_mask = torch.arange(seqlen_q, device=device)[None, :] < q_lens.to(device)[:, None]  # [batch, seqlen_q]
        q_packed = q[row_mask]
    out_packed = unified_attention(
        q_packed, k, v, block_table, cu_seqlens_q, kv_lens,
        config=config, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
        backend=backend,
    )
    if full_rows:
        return out_packed.view(q.shape)
    out = torch.zeros(q.shape, dtype=q.dtype, device=device)
    out[row_mask] = out_packed
    return out


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new keys/values into the paged caches, in place; returns ``(k_cache, v_cache)``.

    Args:
      k, v: [num_tokens, num_kv_heads, head_dim], the caches' dtype.
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
      slot_mapping: i32 or i64 [num_tokens]; token t goes to page ``slot // block_size``,
        slot ``slot % block_size``; a negative slot skips the token (padding).
    """
    device = _check_tensors(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping)
    chosen = resolve_backend(backend, on_cuda=device.type == "cuda")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if _can_sync():
        host = slot_mapping.cpu()
        if (host >= num_slots).any():
            raise ValueError(f"slot_mapping must hold slots < num_blocks * block_size = {num_slots} (or < 0 to skip)")
    if chosen == "reference":
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        block_size = k_cache.shape[1]
        k_cache[slots // block_size, slots % block_size] = k[valid]
        v_cache[slots // block_size, slots % block_size] = v[valid]
    elif _eager(k, v, k_cache, v_cache, slot_mapping):
        launch_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, direct=True)
    else:
        torch.ops.sparse24.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return k_cache, v_cache
