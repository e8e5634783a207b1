"""Public PyTorch ops: check the contract once, allocate, dispatch to a backend.

Every entry point checks its arguments once, through the one input contract
(``sparse24.validation``: :func:`~sparse24.validation.prepare_unified_attention` for
``unified_attention``, :func:`~sparse24.validation.prepare_padded_attention` for
``attention``), then dispatches (``_dispatch``) without checking again, whatever the backend.
Inference only (no autograd). Inputs are never modified (``write_kv_cache`` writes the caches
it is given: that is its job).
"""

from __future__ import annotations

import torch

from sparse24 import layouts as _layouts
from sparse24 import reference as _reference
from sparse24.backends import resolve_backend
from sparse24.config import SparsityConfig
from sparse24.validation import (
    AttentionOptions,
    check_arrays,
    check_slots_in_range,
    check_write_kv_cache_args,
    prepare_padded_attention,
    prepare_unified_attention,
)

from sparse24.kernels.launch import (
    key_side_parameters,
    rebound_unified_attention_launches,
    unified_attention_launches,
)

from ._launch import (  # importing registers the ops
    _launch_unified,
    apply_row_fixup,
    DirectLaunch,
    launch_decode_mask_layout,
    launch_write_kv_cache,
    unified_attention_call,
)


def _eager(*tensors: torch.Tensor) -> bool:
    """Plain tensors outside torch.compile: launch directly, without the op dispatcher."""
    return not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)


_CUDA: list = []  # [torch.cuda.is_available()], asked once


def _can_sync() -> bool:
    """Host reads are allowed (not tracing for torch.compile, not capturing a CUDA graph).
    Asks the CUDA runtime directly: ``sparse24.hf`` calls it once per layer call, and the
    public wrappers cost tens of microseconds there."""
    if torch.compiler.is_compiling():
        return False
    if not _CUDA:
        _CUDA.append(torch.cuda.is_available())
    return not (_CUDA[0] and torch._C._cuda_isCurrentStreamCapturing())


def _host_metadata(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor):
    """``read_metadata`` of the contract: host copies (a sync on the GPU), or an error where a
    host read is impossible."""
    if not _can_sync():
        raise ValueError(
            "max_seqlen_q and max_seqlen_k must be given under torch.compile or CUDA graph capture "
            "(the metadata cannot be read on the host there)"
        )
    return cu_seqlens_q.cpu().numpy(), seq_lens.cpu().numpy(), block_table.cpu().numpy()


def _dispatch(
    backend: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    out: torch.Tensor | None,
    config: SparsityConfig,
    options: AttentionOptions,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_kv_splits: int | None,
    return_lse: bool,
    host_metadata=None,
    state: dict | None = None,
    return_stats: bool = False,
    row_fixup: tuple | None = None,
):
    """Run checked inputs on a resolved backend (no validation here). ``q [T, H_q, D]``,
    caches ``[num_blocks, block_size, H_kv, D]``, ``block_table [B, max_blocks]``,
    ``cu_seqlens_q [B + 1]`` (``cu_seqlens_q[-1] <= T``: rows past it belong to no sequence;
    the kernel leaves them unwritten), ``seq_lens [B]``, ``out`` None or ``[T, H_q, D]``.
    ``host_metadata``: the host copies the contract already read, if any (the reference
    backend loops over sequences on the host and reuses them). Returns ``out``, or
    ``(out, lse f32 [T, H_q])``, or with ``return_stats`` ``(out, KeptStats)`` (f32 [T, H_q]
    each; its ``lse`` is the LSE). ``row_fixup``: None, or ``(row_keep bool [T], row_fill [T]
    in q's dtype)``: the rows whose ``row_keep`` is False come out as ``row_fill`` (the LSE
    is unchanged)."""
    if row_fixup is not None and backend == "reference":
        result = _dispatch(backend, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, config=config,
                           options=options, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                           num_kv_splits=num_kv_splits, return_lse=return_lse, host_metadata=host_metadata,
                           state=state, return_stats=return_stats)
        apply_row_fixup(result[0] if isinstance(result, tuple) else result, *row_fixup)
        return result
    if return_stats and backend == "reference":
        return _reference_stats(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, config=config,
                                options=options, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                host_metadata=host_metadata)
    if backend == "reference":
        if host_metadata is not None:
            cu, kv = host_metadata[0].tolist(), host_metadata[1].tolist()
        else:
            cu, kv = cu_seqlens_q.tolist(), seq_lens.tolist()
        return _reference._chunked(
            q, k_cache, v_cache, block_table, cu, kv, config=config, options=options,
            return_lse=return_lse, out=out,
        )
    num_tokens, num_q_heads = q.shape[0], q.shape[1]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if return_stats:  # (lse, kept mass, kept keys) per row; rows past cu_seqlens_q[-1] read back -inf / NaN / 0
        lse = torch.empty((num_tokens, num_q_heads, 3), dtype=torch.float32, device=q.device)
        lse[..., 0], lse[..., 1], lse[..., 2] = float("-inf"), float("nan"), 0.0
        num_kv_splits = 1
    elif return_lse:
        lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    elif state is not None and "no_lse" in state:
        lse = state["no_lse"]  # the kernel never writes it (STORE_LSE off)
    else:
        lse = torch.empty((1, 1), dtype=torch.float32, device=q.device)
        if state is not None:
            state["no_lse"] = lse
    if num_tokens > 0:
        args = (
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse,
            config.n, config.m, config.dense_sink_tokens, config.dense_recent_tokens, config.sparse_decode,
            options.causal, options.softmax_scale, options.window, options.softcap,
            int(max_seqlen_q), int(max_seqlen_k), int(num_kv_splits or 0), return_lse or return_stats,
        )
        fixup = () if row_fixup is None else tuple(row_fixup)
        if _eager(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, *fixup):
            _launch_unified(None if return_stats else state, *args, True, return_stats, *fixup)
        else:
            torch.ops.sparse24.unified_attention(*args, False, return_stats, *fixup)
    if return_stats:
        return out, _reference.KeptStats(lse[..., 1], lse[..., 2], lse[..., 0])
    return (out, lse) if return_lse else out


def _reference_stats(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, out, config, options,
                     max_seqlen_q, max_seqlen_k, host_metadata):
    """``return_stats`` on the reference backend: the output as :func:`_dispatch` computes it,
    the statistics from the float64 ``kept_stats_reference`` (rows past cu_seqlens_q[-1]:
    NaN / 0 / -inf, as the kernel path leaves them)."""
    out = _dispatch("reference", q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, config=config,
                    options=options, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_kv_splits=1,
                    return_lse=False, host_metadata=host_metadata)
    rows = int(cu_seqlens_q[-1])  # the reference's contract: rows past cu_seqlens_q[-1] are no one's
    ref = _reference.kept_stats_reference(
        q[:rows], k_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=options.causal,
        softmax_scale=options.softmax_scale, window=options.window or None, softcap=options.softcap or None,
    )
    stats = []
    for t, fill in zip(ref, (float("nan"), 0.0, float("-inf"))):
        full = torch.full(q.shape[:2], fill, dtype=torch.float32, device=q.device)
        full[:rows] = t
        stats.append(full)
    return out, _reference.KeptStats(*stats)


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
    return_stats: bool = False,
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

    The arguments are checked once, by the one contract shared with the JAX ops and the
    references (``sparse24.validation.prepare_unified_attention``, whose docstring lists the
    rules); all tensors on one device.

    Args:
      q: [num_tokens, num_q_heads, head_dim] fp32 | bf16 | fp16, packed queries (float64 is
        for the references only: a TypeError here).
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], q's dtype, any
        strides. A contiguous cache is one page per sequence.
      block_table: i32[num_seqs, max_blocks_per_seq]; key j of sequence b is at page
        ``block_table[b, j // block_size]``, slot ``j % block_size``.
      cu_seqlens_q: i32[num_seqs + 1], starts at 0, ends at num_tokens.
      seq_lens: i32[num_seqs], keys per sequence (>= its q_len).
      config: the N:M pattern and dense regions, a ``SparsityConfig``; None =
        ``SparsityConfig()`` (2:4, 64 dense recent keys); ``SparsityConfig.dense()`` = plain
        attention. A string is a TypeError (use ``SparsityConfig.parse``).
      causal: mask keys after the query's position.
      softmax_scale: default ``1 / sqrt(head_dim)``; else a finite float > 0.
      window: sliding window, keys with ``p - j < window`` are visible; an int >= 1, or
        None = off (0 is a ValueError).
      softcap: ``s = softcap * tanh(s / softcap)`` before masking and selection (None = off).
      return_lse: also return the log-sum-exp, f32[num_tokens, num_q_heads] (natural log;
        -inf for rows with nothing kept).
      out: optional output buffer [num_tokens, num_q_heads, head_dim] in q's dtype.
      max_seqlen_q, max_seqlen_k: give both to skip reading the metadata on the host
        (no sync; needed under torch.compile and CUDA graphs). The caller then vouches that
        the metadata is valid and the maxima are upper bounds. Without them the metadata is
        copied to the host and its values checked (one round trip).
      num_kv_splits: force a split-KV count (power of two <= 64); None = the planner's.
        Results do not depend on it.
      backend: "auto" | "triton" | "interpret" | "reference" (``sparse24.backends``;
        "auto": triton on CUDA inputs, interpret in an interpreting process, else reference).
      return_stats: also return what the selection keeps of each row's dense softmax, a
        ``sparse24.reference.KeptStats`` of f32 [num_tokens, num_q_heads] tensors:
        ``kept_mass`` = exp(lse_kept - lse_visible) (1: every visible key kept; NaN: no key
        visible), ``kept_keys`` (the count) and ``lse``. Computed by the same kernel in one
        unsplit launch (a compile-time path: the default launch's code is unchanged);
        ``num_kv_splits`` must be None or 1. Replaces ``return_lse``'s lse.

    Returns:
      out [num_tokens, num_q_heads, head_dim] in q's dtype, or ``(out, lse)``, or
      ``(out, stats)`` with ``return_stats``.

    Example::

        >>> import torch, sparse24
        >>> from sparse24.torch_ops import unified_attention
        >>> q = torch.randn(5, 4, 64); kc = torch.randn(2, 16, 2, 64); vc = torch.randn(2, 16, 2, 64)
        >>> bt = torch.tensor([[0], [1]], dtype=torch.int32)
        >>> cu = torch.tensor([0, 4, 5], dtype=torch.int32); kv = torch.tensor([4, 9], dtype=torch.int32)
        >>> unified_attention(q, kc, vc, bt, cu, kv, backend="reference").shape
        torch.Size([5, 4, 64])
    """
    chosen, prepared = _checked(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse, out=out,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_kv_splits=num_kv_splits, backend=backend,
        return_stats=return_stats,
    )
    # the plan's path without a plan object (torch.compile traces this function; a plan is for eager reuse)
    return _dispatch(
        chosen, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, config=prepared.config,
        options=prepared.options, max_seqlen_q=prepared.max_seqlen_q, max_seqlen_k=prepared.max_seqlen_k,
        num_kv_splits=prepared.num_kv_splits, return_lse=prepared.return_lse, host_metadata=prepared.metadata,
        return_stats=prepared.return_stats,
    )


class UnifiedAttentionPlan:
    """A checked, resolved ``unified_attention`` call, to run again on arrays of the same form.

    :func:`plan_unified_attention` checks the arguments once (the one contract) and resolves
    the backend; calling the plan runs the call on the given arrays without checking them
    again. The caller vouches that they have the shapes, strides, dtypes and device of the
    arrays the plan was made from (and, where the plan was made without maxima, the same
    metadata values). ``sparse24.hf`` plans once per forward pass and shape, and runs the plan
    in every layer: the checks cost more host time than a decode step's kernel. Compiled
    eager launches keep the launch description and their scratch buffers (split-KV partials)
    in the plan between calls, so run one plan on one CUDA stream at a time.
    """

    __slots__ = ("backend", "prepared", "state")

    def __init__(self, backend: str, prepared):
        self.backend = backend
        self.prepared = prepared
        self.state: dict = {}  # direct launches: the launch description and scratch buffers of this form

    def direct(self, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, row_fixup=None):
        """The planned call's compiled kernels as a ``DirectLaunches`` (``torch_ops._launch``),
        for arrays of the dtypes of the given ones (arrays of the plan's form):
        ``direct(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out)`` launches the
        kernels with no per-call work but the arguments (True), or does nothing when an array
        is not 16-byte aligned (False: run the plan instead). Available once the plan has run
        a direct eager launch of compiled kernels without LSE (else None); the caller vouches
        for the arrays as for the plan (they are read by data pointer only). ``row_fixup``
        (as in ``__call__``): the launches of the plan's runs with it; their ``row_fixup``
        attribute tells whether they apply it (a split's reduce launch does; without a split
        the caller applies it)."""
        from ._launch import _USER_ARRAYS, FAST_LAUNCH, INTERPRETED, DirectLaunches

        state, slot = self.state, "launches" if row_fixup is None else "launches_row_fixup"
        if (self.backend != "triton" or INTERPRETED or not FAST_LAUNCH or self.prepared.return_lse
                or self.prepared.return_stats or slot not in state or "no_lse" not in state):
            return None
        fixed = dict(state.get("scratch", {}), lse=state["no_lse"])
        if row_fixup is not None:  # fixed arrays of these launches (unused where no launch reads them)
            fixed.update(row_keep=row_fixup[0], row_fill=row_fixup[1])
        arrays = (q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out)
        dtypes = {name: a.dtype for name, a in zip(_USER_ARRAYS, arrays)}
        return DirectLaunches.build(state[slot], fixed, q.device, dtypes)

    def rebind(self, direct, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, *, max_seqlen_k: int,
               row_fixup=None):
        """``direct`` (this plan's :meth:`direct` launches, or an earlier rebind's) for arrays
        whose form differs from the plan's in the key side only: other cache shapes and
        strides, another block-table width, the key-length bound ``max_seqlen_k`` (an HF
        dynamic cache's next decode step). The launch description of the new call is made
        from ``direct``'s (``rebound_unified_attention_launches``: the planner plans the new
        call, the stride parameters change) or anew, and the compiled kernels are reused
        where it differs from the old one in run-time scalars only, with Triton's
        specialisation of each unchanged (``DirectLaunches.rebind``); else None (run a plan
        of the new form).
        ``row_fixup`` as in :meth:`direct`, and present exactly when it was there. The
        caller vouches that the new arrays meet the contract the plan checked (as for the
        plan: ``sparse24.hf`` builds them); they are not checked again."""
        p, config, options = self.prepared, self.prepared.config, self.prepared.options
        if direct is None or (row_fixup is None) != ("row_keep" not in direct.fixed_names):
            return None
        call = unified_attention_call(
            q, k_cache, v_cache, block_table, seq_lens, out, config.n, config.m, config.dense_sink_tokens,
            config.dense_recent_tokens, config.sparse_decode, options.causal, options.softmax_scale, options.window,
            options.softcap, p.max_seqlen_q, int(max_seqlen_k), p.num_kv_splits, False, False, row_fixup is not None,
        )
        # a key-side change (the usual case) re-describes from the launches; anything else describes anew
        buffers = {} if row_fixup is None else dict(row_keep=row_fixup[0], row_fill=row_fixup[1])
        described = direct.launches[0].described_by if direct.launches else None
        if described is not None and described[0]["max_seqlen_k"] == call["max_seqlen_k"]:
            strides = key_side_parameters(direct.launches, **call)  # the same plan: the strides alone change
            if strides is not None:
                return direct.rebind_keywords((strides,) + ({},) * (len(direct.launches) - 1), buffers)
        # another key-length bound (the planner plans it) or another form: re-described
        launches = rebound_unified_attention_launches(direct.launches, **call) or unified_attention_launches(**call)
        return direct.rebind(launches, buffers)

    def __call__(self, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, out=None, row_fixup=None):
        """Run the planned call; returns ``out`` [T, H_q, D] or ``(out, lse)`` as planned.
        ``row_fixup``: None, or ``(row_keep bool [T], row_fill [T] in q's dtype)`` on q's
        device: every row whose ``row_keep`` is False comes out as ``row_fill`` (the LSE is
        unchanged). ``sparse24.hf``'s decode fix-up; a split's reduce launch applies it."""
        p = self.prepared
        return _dispatch(
            self.backend, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, config=p.config,
            options=p.options, max_seqlen_q=p.max_seqlen_q, max_seqlen_k=p.max_seqlen_k,
            num_kv_splits=p.num_kv_splits, return_lse=p.return_lse, host_metadata=p.metadata, state=self.state,
            return_stats=p.return_stats, row_fixup=row_fixup,
        )


def plan_unified_attention(
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
    return_stats: bool = False,
) -> UnifiedAttentionPlan:
    """Check a :func:`unified_attention` call once (same arguments, same errors) and return
    its :class:`UnifiedAttentionPlan`; ``plan_unified_attention(...)(q, k_cache, v_cache,
    block_table, cu_seqlens_q, seq_lens, out=out)`` computes what ``unified_attention(...)``
    computes (which runs the same check and dispatch without a plan object, so torch.compile
    traces it)."""
    return UnifiedAttentionPlan(*_checked(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, config=config, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap, return_lse=return_lse, out=out,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, num_kv_splits=num_kv_splits, backend=backend,
        return_stats=return_stats,
    ))


def _checked(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, *, backend, **options):
    """The one contract's check (``prepare_unified_attention``) and the resolved backend:
    (backend, PreparedAttention)."""
    prepared = prepare_unified_attention(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, framework="torch",
        read_metadata=lambda: _host_metadata(cu_seqlens_q, seq_lens, block_table), **options,
    )
    return resolve_backend(backend, "torch", on_gpu=q.device.type == "cuda"), prepared


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

    A thin caller of the unified kernel (``sparse24.layouts``): q is packed to
    ``[batch * seqlen_q, num_q_heads, head_dim]`` and k/v are handed over as a paged cache with
    one page per batch row (no copy), with the static maxima ``max_seqlen_q = seqlen_q``,
    ``max_seqlen_k = seqlen_k`` (upper bounds), so the metadata is never read on the host.
    Without ``seq_lens`` the call makes no host read and no host-to-device copy at all (it
    works under torch.compile and CUDA graphs); with ``seq_lens`` the real rows are packed and
    unpacked by index arithmetic on the device (gathers, no boolean-mask indexing).

    Args:
      q: [batch, seqlen_q, num_q_heads, head_dim] fp32 | bf16 | fp16.
      k, v: [batch, seqlen_k, num_kv_heads, head_dim], q's dtype. Reached by the kernel in
        place (a K/V is a paged cache with one page per sequence; no copy).
      seq_lens: optional i32[batch] on q's device: row b's first ``seq_lens[b]`` keys are
        real (right padding); default ``seqlen_k`` for every row. Row b has
        ``q_len = min(seqlen_q, seq_lens[b])`` real queries (its first rows), bottom-right
        aligned: query i sits at position ``seq_lens[b] - q_len + i``. Other query rows
        output zeros. Its values must lie in ``[0, seqlen_k]``: that is checked (a
        ValueError) when seq_lens is a CPU tensor, where reading it costs no device sync; on
        the GPU it is not read, and values outside the range are clamped to it.
      causal, config, softmax_scale, window, softcap, backend: as in ``unified_attention``
        (the same contract and the same errors).

    Returns:
      [batch, seqlen_q, num_q_heads, head_dim] in q's dtype.
    """
    prepared = prepare_padded_attention(
        q, k, v, seq_lens, framework="torch", config=config, causal=causal, softmax_scale=softmax_scale,
        window=window, softcap=softcap,
        read_seq_lens=lambda: seq_lens.numpy() if seq_lens.device.type == "cpu" and _can_sync() else None,
    )
    chosen = resolve_backend(backend, "torch", on_gpu=q.device.type == "cuda")
    layout = _layouts.padded_layout_torch(
        prepared.batch, prepared.seqlen_q, prepared.seqlen_k, seq_lens, device=q.device
    )
    buffer = _layouts.packed_out_buffer_torch(layout, q)
    total = prepared.batch * prepared.seqlen_q
    _dispatch(
        chosen, _layouts.pack_padded_torch(q, layout), k, v, layout.block_table, layout.cu_seqlens_q,
        layout.seq_lens, out=buffer[:total], config=prepared.config, options=prepared.options,
        max_seqlen_q=prepared.seqlen_q, max_seqlen_k=prepared.seqlen_k, num_kv_splits=None, return_lse=False,
    )
    return _layouts.unpack_padded_torch(buffer, layout, q.shape)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
    check_slots: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new keys/values into the paged caches, in place; returns ``(k_cache, v_cache)``.

    Args:
      k, v: [num_tokens, num_kv_heads, head_dim], the caches' dtype.
      k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim].
      slot_mapping: i32 or i64 [num_tokens]; token t goes to page ``slot // block_size``,
        slot ``slot % block_size``; a negative slot skips the token (padding).
      check_slots: True (default): slot_mapping is copied to the host (one sync on a GPU;
        not under torch.compile or CUDA-graph capture) and a slot >= num_blocks * block_size
        is a ValueError. False: no host read (a decode loop's hot path). In every case a slot
        outside ``[0, num_blocks * block_size)`` is skipped: nothing is written outside the
        caches.
    """
    device = check_arrays("torch", k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping)
    chosen = resolve_backend(backend, "torch", on_gpu=device.type == "cuda")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    check_slots_in_range((lambda: slot_mapping.cpu().numpy()) if _can_sync() else None, num_slots, check_slots)
    if chosen == "reference":
        valid = (slot_mapping >= 0) & (slot_mapping < num_slots)
        slots = slot_mapping[valid].long()
        block_size = k_cache.shape[1]
        k_cache[slots // block_size, slots % block_size] = k[valid]
        v_cache[slots // block_size, slots % block_size] = v[valid]
    elif _eager(k, v, k_cache, v_cache, slot_mapping):
        launch_write_kv_cache(k, v, k_cache, v_cache, slot_mapping, direct=True)
    else:
        torch.ops.sparse24.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    return k_cache, v_cache


def decode_mask_layout(mask: torch.Tensor, *, kv_len: int, pages_per_row: int, out_dtype: torch.dtype,
                       width: int | None = None, previous=None, with_launch: bool = False):
    """The decode (one query per row) layout of a transformers slot mask in one Triton launch
    (``sparse24.kernels.mask_layout``; eager, compiled or interpreted kernels only).

    Args:
      mask: [batch, L] on the kernels' device, 1 <= L <= kv_len: bool (every slot written) or
        a signed integer / float slot mask (> 0 real, 0 padding, < 0 not written), as in
        ``sparse24.layouts``.
      kv_len: the cache's slot count; pages_per_row: pages of its one-slot paged view per row.
      out_dtype: the attention output's dtype (of ``fill``).
      width: the block table's width, an int >= max(kv_len, 1) (None: that); the columns
        past a row's keys hold its last slot's page. ``sparse24.hf`` rounds it up to a
        multiple of 16, so the table's row stride keeps Triton's specialisation from one
        decode step to the next (``UnifiedAttentionPlan.rebind``).
      previous: None, or the launch an earlier call returned (``with_launch``): this call
        then launches that compiled kernel with its run-time scalars rebound where only the
        mask's length and strides, ``kv_len`` and ``pages_per_row`` changed (the next decode
        step of a growing cache; ``mask_layout_parameters``), else as without it.
      with_launch: also return this call's compiled launch (a ``torch_ops._launch.DirectLaunch``,
        or None for interpreted kernels or off CUDA), for the next call's ``previous``.

    Returns:
      ``(block_table i32 [batch, width], seq_lens i32 [batch], keep bool [batch],
      fill [batch] out_dtype)``: what ``padding_mask_layout_torch`` and the decode fix-up of
      ``sparse24.hf`` compute (``block_table[:, :kv_len]``; ``keep``: the row's query slot is
      real and its real tokens are contiguous; ``fill``: NaN for a row with holes, else 0);
      with ``with_launch``: ``(that tuple, launch)``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not 1 <= mask.shape[1] <= kv_len:
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor [batch, L] with 1 <= L <= kv_len = {kv_len}, got {got}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < max(kv_len, 1)):
        raise ValueError(f"width must be None or an int >= max(kv_len, 1) = {max(kv_len, 1)}, got {width!r}")
    if not isinstance(with_launch, bool):
        raise TypeError(f"with_launch must be a bool, got {type(with_launch).__name__}")
    if previous is not None and not isinstance(previous, DirectLaunch):
        raise TypeError(f"previous must be None or the launch of an earlier with_launch call, got {type(previous).__name__}")
    outputs, launch = launch_decode_mask_layout(mask, kv_len, pages_per_row, out_dtype, width=width, previous=previous)
    return (outputs, launch) if with_launch else outputs
