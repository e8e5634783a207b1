"""Test helpers shared by the project's test suites: paged inputs and a reporting assert."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["PagedInputs", "make_paged_inputs", "assert_close_report", "kernel_keep_mask", "jax_unified_attention",
           "to_jax", "to_torch", "TOLERANCE", "EDGE_CASE_BASE", "EDGE_CASES"]

# Output tolerances against the float64 oracle, from the dtype: fp32 accumulates like the
# oracle up to rounding; bf16/fp16 round q, k, v (exact for small integers), P and the output.
TOLERANCE = {
    "float32": dict(atol=2e-5, rtol=1e-5),
    "float16": dict(atol=4e-3, rtol=4e-3),
    "bfloat16": dict(atol=2.5e-2, rtol=2e-2),
}


class PagedInputs(NamedTuple):
    """Inputs in the unified-attention layout (see :mod:`sparse24.reference`).

    ``q [T, H_q, D]``, ``k_cache``/``v_cache [num_blocks, block_size, H_kv, D]``,
    ``block_table [B, max_blocks]`` int32, ``cu_seqlens_q [B + 1]`` int32,
    ``seq_lens [B]`` int32.
    """

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor


def make_paged_inputs(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    integer: bool = False,
    int_range: int = 2,
    seed: int = 0,
    extra_blocks: int = 3,
    device="cpu",
) -> PagedInputs:
    """Random paged attention inputs for sequences with ``q_lens[b]`` new queries and
    ``kv_lens[b]`` keys (``q_len <= kv_len``).

    Pages are handed out in a random permutation (block tables are not the identity), the
    cache has ``extra_blocks`` unused pages, the block table is one entry wider than the
    longest sequence needs, and unused block-table entries hold random page numbers: none of
    that may ever be read. Slots past ``kv_len`` in a sequence's last page hold random values.

    ``integer=True`` fills q and k with integers in ``[-int_range, int_range]`` (exact scores
    in every dtype, exact ties on purpose); v (and everything with ``integer=False``) is
    standard normal. Deterministic for a given ``seed``; generated on the CPU, then moved to
    ``device``.
    """
    q_lens, kv_lens = [int(x) for x in q_lens], [int(x) for x in kv_lens]
    if len(q_lens) != len(kv_lens):
        raise ValueError(f"q_lens and kv_lens differ in length: {q_lens} vs {kv_lens}")
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        if not 0 <= q_len <= kv_len:
            raise ValueError(f"sequence {b}: need 0 <= q_len <= kv_len, got {q_len}, {kv_len}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    gen = torch.Generator().manual_seed(seed)

    pages = [-(-kv_len // block_size) for kv_len in kv_lens]
    num_blocks = sum(pages) + extra_blocks
    width = max(pages, default=0) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.randint(0, max(num_blocks, 1), (len(kv_lens), width), generator=gen)
    offset = 0
    for b, count in enumerate(pages):
        block_table[b, :count] = perm[offset : offset + count]
        offset += count

    def draw(shape, ints):
        if ints:
            x = torch.randint(-int_range, int_range + 1, shape, generator=gen).to(torch.float32)
        else:
            x = torch.randn(shape, generator=gen)
        return x.to(dtype)

    num_tokens = sum(q_lens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q = draw((num_tokens, num_q_heads, head_dim), integer)
    k_cache = draw(cache_shape, integer)
    v_cache = draw(cache_shape, False)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0).to(torch.int32)
    return PagedInputs(
        q=q.to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        block_table=block_table.to(torch.int32).to(device),
        cu_seqlens_q=cu.to(device),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
    )


def assert_close_report(actual, expected, atol: float, rtol: float, name: str = "value") -> None:
    """Assert ``|actual - expected| <= atol + rtol * |expected|`` elementwise.

    Equal infinities match; a NaN anywhere it is not expected fails. On failure the
    AssertionError names ``name`` and gives the largest absolute difference, its index and
    both values, and how many elements are out of tolerance.
    """
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if a.numel() == 0:
        return
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    diff = torch.where(same, torch.zeros_like(a), (a - e).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    tol = atol + rtol * torch.where(torch.isfinite(e), e.abs(), torch.zeros_like(e))
    bad = diff > tol
    if bool(bad.any()):
        flat = int(torch.argmax(diff).item())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} elements out of tolerance "
            f"(atol={atol}, rtol={rtol}); max abs diff {diff.max().item():.6g} at {index}: "
            f"actual {a[index].item()!r}, expected {e[index].item()!r}"
        )


def to_jax(tensors) -> list:
    """torch tensors -> jax arrays of the same dtype (bf16 through fp32, exactly)."""
    import jax.numpy as jnp

    out = []
    for t in tensors:
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            out.append(jnp.asarray(t.float().numpy()).astype(jnp.bfloat16))
        else:
            out.append(jnp.asarray(t.numpy()))
    return out


def to_torch(x) -> torch.Tensor:
    """A jax array -> a writable fp32 CPU torch copy (exact for every float dtype we use)."""
    import jax.numpy as jnp
    import numpy as np

    return torch.from_numpy(np.array(jnp.asarray(x, jnp.float32)))


def jax_unified_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, **kwargs):
    """``sparse24.jax_ops.unified_attention`` on torch inputs, returning torch (fp32 CPU), so
    the torch-side checks (``kernel_keep_mask``) run the JAX door unchanged."""
    from sparse24.jax_ops import unified_attention

    result = unified_attention(*to_jax((q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens)), **kwargs)
    if isinstance(result, tuple):
        return tuple(to_torch(r) for r in result)
    return to_torch(result)


def kernel_keep_mask(inputs: PagedInputs, op=None, **kwargs) -> list[torch.Tensor]:
    """The keys the *kernel* kept, per sequence: bool [H_q, q_len, kv_len] (CPU).

    Reads the decisions through the output, with no debug path in the kernel: V is replaced
    by one-hot rows (key j -> e_(j - start) for the keys [start, start + head_dim)), one
    call per ``head_dim`` keys, so ``out[t, h, j - start] > 0`` iff key j was kept. Keep
    scores moderate (small-integer q and k, as ``make_paged_inputs(integer=True,
    int_range=1)`` gives) so that kept probabilities do not underflow to zero.

    Args:
      inputs: the unified-attention inputs (``v_cache`` is ignored).
      op: the door to probe, called like ``unified_attention`` on torch tensors; default
        ``sparse24.torch_ops.unified_attention``; ``jax_unified_attention`` probes JAX's.
      **kwargs: passed to ``op`` (config, causal, window, softcap, num_kv_splits, backend, ...).
    """
    if op is None:
        from sparse24.torch_ops import unified_attention as op

    q, k_cache, v_cache, block_table, cu, kv = inputs
    head_dim = q.shape[-1]
    block_size = k_cache.shape[1]
    cu_h, kv_h, bt_h = cu.cpu().tolist(), kv.cpu().tolist(), block_table.cpu()
    masks = [torch.zeros(q.shape[1], cu_h[b + 1] - cu_h[b], kv_h[b], dtype=torch.bool) for b in range(len(kv_h))]
    for start in range(0, max(kv_h, default=0), head_dim):
        probe = torch.zeros(v_cache.shape, dtype=torch.float32)
        for b, kv_len in enumerate(kv_h):
            for j in range(start, min(start + head_dim, kv_len)):
                probe[int(bt_h[b, j // block_size]), j % block_size, :, j - start] = 1.0
        probe = probe.to(v_cache.dtype).to(v_cache.device)
        out = op(q, k_cache, probe, block_table, cu, kv, **kwargs).cpu()
        for b, kv_len in enumerate(kv_h):
            width = min(start + head_dim, kv_len) - start
            if width <= 0:
                continue
            rows = out[cu_h[b] : cu_h[b + 1], :, :width].float()  # [q_len, H_q, width]
            masks[b][:, :, start : start + width] = rows.permute(1, 0, 2) > 0
    return masks


# The edge-case grid every kernel/reference test suite runs (torch kernel, JAX kernel, jnp
# reference): one factor at a time around a mixed batch. Each entry overrides keyword
# arguments of a case: q_lens, kv_lens, num_q_heads, num_kv_heads, head_dim, block_size,
# config (SparsityConfig.parse text), causal, window, softcap, num_kv_splits. Lengths are
# off the multiples of 4, 16 and 64 somewhere; the base mixes chunked prefill, decode, a
# full prefill and a one-token sequence.
EDGE_CASE_BASE = dict(q_lens=(9, 1, 23, 1), kv_lens=(41, 30, 23, 1))
EDGE_CASES = {
    "mixed": {},
    "decode": dict(q_lens=(1, 1, 1), kv_lens=(1, 37, 64)),
    "prefill": dict(q_lens=(50,), kv_lens=(50,)),
    "chunked-prefill": dict(q_lens=(13, 7), kv_lens=(61, 30)),
    "gqa1": dict(num_q_heads=2, num_kv_heads=2),
    "gqa4": dict(num_q_heads=8, num_kv_heads=2),
    "gqa5": dict(num_q_heads=5, num_kv_heads=1),
    "gqa8": dict(num_q_heads=8, num_kv_heads=1),
    "head-dim-80": dict(head_dim=80),
    "head-dim-128": dict(head_dim=128, q_lens=(9, 1, 70), kv_lens=(100, 127, 70)),
    "page-1": dict(block_size=1),
    "page-32": dict(block_size=32),
    "page-whole-seq": dict(block_size=64),
    "non-causal": dict(causal=False),
    "window-7": dict(window=7),
    "window-20-non-causal": dict(window=20, causal=False),
    "softcap": dict(softcap=5.0),
    "sink-recent": dict(config="2:4,sink=3,recent=6"),
    "recent-64": dict(config="2:4"),
    "dense-decode": dict(config="2:4,recent=0,sparse_decode=false"),
    "1:4": dict(config="1:4,recent=0"),
    "3:4": dict(config="3:4,recent=0"),
    "2:8": dict(config="2:8,recent=0"),
    "5:8": dict(config="5:8,sink=2,recent=3"),
    "1:8-window": dict(config="1:8,recent=0", window=11),
    "dense": dict(config="dense"),
    "split-2": dict(num_kv_splits=2),
    "split-8-decode": dict(num_kv_splits=8, q_lens=(1, 1, 1), kv_lens=(1, 37, 64)),
    "split-4-window": dict(num_kv_splits=4, window=9, q_lens=(3, 1), kv_lens=(64, 50)),
}
