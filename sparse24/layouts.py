"""Layouts: turning what frameworks hand us into the unified kernel's packed, paged form.

Foundation floor (imported by the ops; imports neither the ops nor the integrations).
torch and jax.numpy twins sit side by side. Nothing here reads a device tensor on the host.
"""

from __future__ import annotations

# ---------------------------------------------------------------- padded [B, S, H, D] <-> packed [T, H, D]
# (section owned by the padded-attention work: torch_ops.attention / jax_ops.attention)
#
# A padded batch q [B, S_q, H_q, D], k/v [B, S_k, H_kv, D] is handed to the unified kernel as
# packed queries [B * S_q, H_q, D] and k/v as a paged cache with one page (block_size S_k) per
# batch row (no copy of k/v). Row b's first kv_len = seq_lens[b] keys are real (default S_k);
# its first q_len = min(S_q, kv_len) query rows are real and bottom-right aligned; the other
# query rows come out as zeros. Everything is built on the device, from shapes and device
# arrays only: no host read, no host-to-device copy, no boolean-mask indexing (it syncs),
# so it works under torch.compile, CUDA graphs and jax.jit. The maxima S_q, S_k are static
# upper bounds of the lengths; the packed batch has cu_seqlens_q[-1] <= B * S_q (packed rows
# past it belong to no sequence: the kernel never reads or writes them, and they are never
# read back). torch and jax.numpy twins below compute the same thing.

from typing import Any, NamedTuple, Optional  # noqa: E402


class PaddedLayout(NamedTuple):
    """The unified-attention metadata of a padded batch (see the section comment).

    block_table: int32 [B, 1]: page b is row b of k/v.
    cu_seqlens_q: int32 [B + 1]: row b owns packed rows cu_seqlens_q[b]:cu_seqlens_q[b + 1].
    seq_lens: int32 [B]: keys of row b (the caller's seq_lens clamped to [0, S_k], else S_k).
    rows: None when every query row is real (packed = q.reshape(B * S_q, H_q, D)); else
      [B * S_q]: the packed row of padded row (b, i) (flat index b * S_q + i), or B * S_q
      (one past the packed rows: "none") for a padding row.
    sources: None, or [B * S_q]: the flat padded row each packed row is gathered from
      (packed rows past cu_seqlens_q[-1] gather an arbitrary row; they belong to no sequence).
    """

    block_table: Any
    cu_seqlens_q: Any
    seq_lens: Any
    rows: Optional[Any]
    sources: Optional[Any]


def padded_layout_torch(batch: int, seqlen_q: int, seqlen_k: int, seq_lens=None, *, device) -> PaddedLayout:
    """:class:`PaddedLayout` of a padded batch, as torch tensors on ``device`` (no sync).

    ``seq_lens``: None (every row has ``seqlen_k`` keys) or an int32 tensor ``[batch]`` on
    ``device``; its values are clamped to ``[0, seqlen_k]`` (so no key outside k/v is read).
    """
    import torch

    block_table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
    if seq_lens is None:
        cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen_q
        kv = torch.full((batch,), seqlen_k, dtype=torch.int32, device=device)
        return PaddedLayout(block_table, cu, kv, None, None)
    kv = seq_lens.clamp(0, seqlen_k)  # [batch] int32, a new tensor
    q_lens = kv.clamp(max=seqlen_q)
    cu = torch.cat([q_lens.new_zeros(1), torch.cumsum(q_lens, 0, dtype=torch.int32)])  # [batch + 1]
    i = torch.arange(seqlen_q, dtype=torch.int64, device=device)  # [S_q]
    total = batch * seqlen_q
    real = i[None, :] < q_lens[:, None]  # [batch, S_q]
    rows = torch.where(real, cu[:-1, None].long() + i[None, :], total).reshape(total)
    t = torch.arange(total, dtype=torch.int64, device=device)
    b = (torch.searchsorted(cu, t.to(torch.int32), right=True) - 1).clamp(0, batch - 1)  # [total]
    sources = (b * seqlen_q + t - cu[b].long()).clamp(0, total - 1)
    return PaddedLayout(block_table, cu, kv, rows, sources)


def pack_padded_torch(x, layout: PaddedLayout):
    """``x [B, S_q, H, D]`` -> packed ``[B * S_q, H, D]`` (a view when every row is real)."""
    batch, seqlen_q = x.shape[0], x.shape[1]
    flat = x.reshape(batch * seqlen_q, *x.shape[2:])
    return flat if layout.sources is None else flat.index_select(0, layout.sources)


def packed_out_buffer_torch(layout: PaddedLayout, like):
    """An output buffer for the packed call: ``[B * S_q (+ 1), H, D]`` in ``like``'s dtype and
    device, ``like [B, S_q, H, D]``. With padding rows it has one more, zeroed row (what the
    padding rows read back); the kernel writes ``buffer[:B * S_q]``."""
    import torch

    total = like.shape[0] * like.shape[1]
    if layout.rows is None:
        return torch.empty((total, *like.shape[2:]), dtype=like.dtype, device=like.device)
    buffer = torch.empty((total + 1, *like.shape[2:]), dtype=like.dtype, device=like.device)
    buffer[total].zero_()
    return buffer


def unpack_padded_torch(buffer, layout: PaddedLayout, shape):
    """The packed output ``buffer`` (from :func:`packed_out_buffer_torch`) -> padded ``shape``
    ``[B, S_q, H, D]``; padding rows are zeros."""
    if layout.rows is None:
        return buffer.view(shape)
    return buffer.index_select(0, layout.rows).view(shape)


def padded_layout_jnp(batch: int, seqlen_q: int, seqlen_k: int, seq_lens=None) -> PaddedLayout:
    """The jax.numpy twin of :func:`padded_layout_torch` (``seq_lens`` may be traced)."""
    import jax.numpy as jnp

    block_table = jnp.arange(batch, dtype=jnp.int32)[:, None]
    if seq_lens is None:
        cu = jnp.arange(batch + 1, dtype=jnp.int32) * seqlen_q
        kv = jnp.full((batch,), seqlen_k, jnp.int32)
        return PaddedLayout(block_table, cu, kv, None, None)
    kv = jnp.clip(jnp.asarray(seq_lens), 0, seqlen_k).astype(jnp.int32)
    q_lens = jnp.minimum(kv, seqlen_q)
    cu = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    i = jnp.arange(seqlen_q, dtype=jnp.int32)
    total = batch * seqlen_q
    real = i[None, :] < q_lens[:, None]
    rows = jnp.where(real, cu[:-1, None] + i[None, :], total).reshape(total)
    t = jnp.arange(total, dtype=jnp.int32)
    b = jnp.clip(jnp.searchsorted(cu, t, side="right").astype(jnp.int32) - 1, 0, batch - 1)
    sources = jnp.clip(b * seqlen_q + t - cu[b], 0, total - 1)
    return PaddedLayout(block_table, cu, kv, rows, sources)


def pack_padded_jnp(x, layout: PaddedLayout):
    """The jax.numpy twin of :func:`pack_padded_torch`: ``[B, S_q, H, D]`` -> ``[B * S_q, H, D]``."""
    import jax.numpy as jnp

    flat = jnp.reshape(x, (x.shape[0] * x.shape[1],) + tuple(x.shape[2:]))
    return flat if layout.sources is None else flat[layout.sources]


def unpack_padded_jnp(out, layout: PaddedLayout, shape):
    """Packed ``out [B * S_q, H, D]`` -> padded ``shape`` ``[B, S_q, H, D]``; padding rows are
    zeros (the jax.numpy twin of :func:`unpack_padded_torch`; functional, so no extra row)."""
    import jax.numpy as jnp

    if layout.rows is None:
        return jnp.reshape(out, shape)
    total = out.shape[0]
    real = (layout.rows < total)[:, None, None]
    return jnp.where(real, out[jnp.minimum(layout.rows, total - 1)], 0).astype(out.dtype).reshape(shape)


# ---------------------------------------------------------------- padding masks / HF caches -> paged metadata
# (section owned by the HF / Flax work)
#
# A transformers cache hands the attention function key/value [B, H_kv, S_k, D] (the whole
# cache: a DynamicCache's keys so far, a StaticCache's whole buffer) and a 2-D slot mask
# [B, L] (L <= S_k) saying what each cache slot holds:
#
#   > 0 (True)  a real token of row b (its key is a key of the sequence)
#   0 (False)   padding: a written slot that is no token of row b (left or right padding)
#   < 0         not written yet (a StaticCache's free tail); slots >= L are not written either
#
# The queries are the last q_len *written* slots, and row b's real tokens must be contiguous
# (left or right padding; a row with holes is flagged in ``bad``). Key j of row b counts from
# its first real token (docs/SPEC.md §2), so a padded batch selects what each row alone selects.
# Sliding-window caches drop old slots: with ``position_ids`` (the real-token index of each
# query) the dropped keys are counted back in, exactly, as a shift of the key index by a
# multiple of M that keeps every decision (groups, sink, recent, window, causality) the same
# and bounds the block table statically (see :func:`padding_mask_layout_torch`).
#
# All of it is device tensor arithmetic from shapes and device tensors: no host read, no
# host-to-device copy, no boolean-mask indexing; the maxima are static upper bounds, so the
# kernel never syncs either. Rows past cu_seqlens_q[-1] belong to no sequence (as in the
# section above); ``rows`` / ``sources`` follow :class:`PaddedLayout`, so
# :func:`pack_padded_torch` / :func:`packed_out_buffer_torch` / :func:`unpack_padded_torch`
# pack and unpack with them.


class MaskLayout(NamedTuple):
    """The unified-attention metadata of a cache + slot mask (see the section comment).

    block_table: int32 [B, max_seqlen_k]: key j of row b is page ``block_table[b, j]`` of
      the one-slot paged view of the cache (page ``b * pages_per_row + slot``).
    cu_seqlens_q: int32 [B + 1]: row b owns packed rows cu_seqlens_q[b]:cu_seqlens_q[b + 1].
    seq_lens: int32 [B]: keys of row b (real keys in the cache + dropped ones counted back).
    rows: None when every query row is real (static: no mask); else int64 [B * q_len]: the
      packed row of query row (b, i) (flat b * q_len + i), or B * q_len ("none": padding).
    sources: None, or int64 [B * q_len]: the flat query row each packed row is gathered from.
    bad: None (no mask), or bool [B]: rows whose real tokens are not contiguous (holes);
      the metadata of such a row is meaningless and its output must not be used.
    all_rows_real: None (no mask), or a bool tensor [] (0-d): every query row is real.
    max_seqlen_q: int, a static upper bound of the query lengths (q_len).
    max_seqlen_k: int, a static upper bound of seq_lens (the block table's width).
    """

    block_table: Any
    cu_seqlens_q: Any
    seq_lens: Any
    rows: Optional[Any]
    sources: Optional[Any]
    bad: Optional[Any]
    all_rows_real: Optional[Any]
    max_seqlen_q: int
    max_seqlen_k: int


def _shift_dropped_torch(dropped, m: int, dense_sink_tokens: int):
    """The smallest d' <= dropped with d' = dropped (mod m) and d' >= dense_sink_tokens when
    dropped >= dense_sink_tokens; d' < dense_sink_tokens + m. Shifting key indices and query
    positions down by dropped - d' (a multiple of m) keeps every decision: groups move as a
    whole, the sink keys stay the dropped (invisible) ones, and window, recent region and
    causality are differences of positions."""
    import torch

    excess = torch.clamp(dropped - dense_sink_tokens, min=0)
    return dropped - m * torch.div(excess, m, rounding_mode="floor")


def padding_mask_layout_torch(
    attention_mask,
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    pages_per_row: int,
    device,
    position_ids=None,
    sliding: bool = False,
    m: int = 4,
    dense_sink_tokens: int = 0,
) -> MaskLayout:
    """:class:`MaskLayout` of a transformers cache and its 2-D slot mask (no sync).

    Args:
      attention_mask: None (every one of the ``kv_len`` slots holds a real token of every
        row) or a tensor [batch, L] on ``device``, 1 <= L <= kv_len, bool / integer / float,
        read as in the section comment (> 0 real, 0 padding, < 0 not written; slots >= L not
        written). A bool mask has its queries at slots L - q_len .. L - 1 (L >= q_len).
      batch, q_len, kv_len: the query count per row and the cache length S_k (key.shape[2]).
      pages_per_row: pages of the one-slot paged view per batch row (the cache's batch
        stride over its slot stride).
      device: where the metadata is built.
      position_ids: None or an integer tensor [batch | 1, q_len]: the real-token index of each
        query (as transformers computes it from the mask); read only when ``sliding``.
      sliding: the cache may have dropped old slots (a sliding-window layer): count the
        dropped keys back in from ``position_ids`` (without ``position_ids``, none are).
      m, dense_sink_tokens: the layer's group size and sink count; with ``sliding`` they
        bound the dropped count that is counted back (see :func:`_shift_dropped_torch`).

    Returns:
      a :class:`MaskLayout`; ``max_seqlen_q = q_len``, ``max_seqlen_k = kv_len`` (plus
      ``dense_sink_tokens + m - 1`` for a sliding layer with ``position_ids``).
    """
    import torch

    count_dropped = bool(sliding) and position_ids is not None
    extra = dense_sink_tokens + m - 1 if count_dropped else 0
    width = max(kv_len + extra, 1)
    rows_b = torch.arange(batch, dtype=torch.int64, device=device)  # [batch]
    if attention_mask is None:
        start = torch.zeros(batch, dtype=torch.int64, device=device)
        n_real = torch.full((batch,), kv_len, dtype=torch.int64, device=device)
        q_lens = torch.full((batch,), q_len, dtype=torch.int64, device=device)
        first_query = kv_len - q_len  # slot of query row 0 (static)
        last_row = torch.full((batch,), q_len - 1, dtype=torch.int64, device=device)
        bad = all_real = None
    else:
        mask = attention_mask.detach()
        if mask.dim() != 2 or mask.shape[0] != batch or not 1 <= mask.shape[1] <= kv_len:
            raise ValueError(
                f"attention_mask must have shape [batch, L] with batch = {batch} and 1 <= L <= kv_len = {kv_len}, "
                f"got {list(mask.shape)}"
            )
        width_l = mask.shape[1]
        if mask.dtype == torch.bool and width_l < q_len:
            raise ValueError(
                f"a bool attention_mask [batch, L] must cover the q_len = {q_len} query slots (L >= q_len), "
                f"got {list(mask.shape)}"
            )
        if mask.dtype == torch.bool:
            real = mask
            first_query = width_l - q_len  # every slot < L is written (static)
            filled = None
        else:
            real = mask > 0
            filled = (mask >= 0).sum(1)  # [batch] written slots (a prefix)
            first_query = filled - q_len  # [batch]
        slot = torch.arange(width_l, dtype=torch.int64, device=device)  # [L]
        n_real = real.sum(1)  # [batch]
        start = torch.where(real, slot, width_l).amin(1)  # first real slot (L if none)
        end = torch.where(real, slot + 1, 0).amax(1)  # one past the last real slot (0 if none)
        start = torch.where(n_real > 0, start, 0)
        bad = end - start != n_real  # [batch] holes
        if filled is not None:
            end = torch.minimum(end, filled)
        q_start = torch.clamp(start, min=first_query) if filled is None else torch.maximum(start, first_query)
        q_lens = torch.clamp(end - q_start, min=0)  # real query rows (the last ones of the real range)
        last_row = torch.clamp(end - 1 - first_query, 0, q_len - 1)  # query row of the last real token
        all_real = (q_lens == q_len).all()
    dropped = None
    if count_dropped:
        pos = position_ids.detach()
        if pos.dim() != 2 or pos.shape[1] != q_len or pos.shape[0] not in (1, batch):
            raise ValueError(
                f"position_ids must have shape [batch | 1, q_len] = [{batch} | 1, {q_len}] on a sliding-window "
                f"layer, got {list(pos.shape)}"
            )
        pos = pos.to(torch.int64).expand(batch, q_len)
        seen = pos.gather(1, last_row[:, None])[:, 0] + 1  # real tokens up to the last real query
        dropped = torch.where(q_lens > 0, torch.clamp(seen - n_real, min=0), 0)
        dropped = _shift_dropped_torch(dropped, m, dense_sink_tokens)
    kv_lens = n_real if dropped is None else n_real + dropped  # [batch]
    j = torch.arange(width, dtype=torch.int64, device=device)[None, :]  # [1, width]
    first_key_slot = start if dropped is None else start - dropped
    slots = torch.clamp(first_key_slot[:, None] + j, 0, max(kv_len - 1, 0))  # [batch, width]
    block_table = (rows_b[:, None] * pages_per_row + slots).to(torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(q_lens, 0).to(torch.int32)
    rows = sources = None
    if attention_mask is not None:
        total = batch * q_len
        first_row = q_start - first_query  # [batch] query row of the first real query
        i = torch.arange(q_len, dtype=torch.int64, device=device)[None, :]  # [1, q_len]
        local = i - first_row[:, None]  # [batch, q_len]
        real_row = (local >= 0) & (local < q_lens[:, None])
        rows = torch.where(real_row, cu[:-1, None].long() + local, total).reshape(total)
        t = torch.arange(total, dtype=torch.int32, device=device)
        b = torch.clamp(torch.searchsorted(cu, t, right=True) - 1, 0, max(batch - 1, 0)).long()  # [total]
        sources = torch.clamp(b * q_len + first_row[b] + t.long() - cu[b].long(), 0, max(total - 1, 0))
    return MaskLayout(block_table, cu, kv_lens.to(torch.int32), rows, sources, bad, all_real, q_len, width)


def attention_mask_layout_jnp(mask, q_len: int, kv_len: int):
    """Read a Flax boolean attention mask ``[batch, 1 | H, q_len, kv_len]`` as per-row key
    lengths (jax.numpy; traceable, no host read).

    Row b's keys are its valid keys' count ``seq_lens[b]``; its mask is a *padding* mask when
    it is exactly "the first seq_lens[b] keys, for the first min(q_len, seq_lens[b]) query
    rows", and a *causal* one when it is that and bottom-right-aligned causal
    (``j <= seq_lens[b] - min(q_len, seq_lens[b]) + i``).

    Returns:
      (seq_lens int32 [batch], ok_plain bool [batch], ok_causal bool [batch]).
    """
    import jax.numpy as jnp

    m = jnp.asarray(mask).astype(bool)
    if m.ndim != 4 or m.shape[2:] != (q_len, kv_len):
        raise ValueError(
            f"mask must have shape [batch, 1 | heads, q_len, kv_len] = [batch, 1 | heads, {q_len}, {kv_len}], "
            f"got {list(m.shape)}"
        )
    key_valid = m.any(axis=(1, 2))  # [batch, kv_len]
    seq_lens = key_valid.sum(axis=-1).astype(jnp.int32)
    q_lens = jnp.minimum(q_len, seq_lens)
    i = jnp.arange(q_len)[None, :, None]
    j = jnp.arange(kv_len)[None, None, :]
    plain = (j < seq_lens[:, None, None]) & (i < q_lens[:, None, None])  # [batch, q_len, kv_len]
    causal = plain & (j <= seq_lens[:, None, None] - q_lens[:, None, None] + i)
    ok_plain = jnp.all(m == plain[:, None], axis=(1, 2, 3))
    ok_causal = jnp.all(m == causal[:, None], axis=(1, 2, 3))
    return seq_lens, ok_plain, ok_causal
