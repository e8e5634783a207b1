"""Input validation shared by every public op (torch and JAX alike).

Checks work on anything with ``.shape`` and ``.dtype`` (torch tensors, jax arrays,
numpy arrays), so the two frameworks raise the same errors with the same words. Every
error is a ``ValueError`` or ``TypeError`` naming the argument, the expected shape
template and what came; tensor contents are never put into messages.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from sparse24.config import SparsityConfig

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
INDEX_DTYPES = ("int32",)
MAX_HEAD_DIM = 256

Q_SHAPE = "[num_tokens, num_q_heads, head_dim]"
CACHE_SHAPE = "[num_blocks, block_size, num_kv_heads, head_dim]"
BLOCK_TABLE_SHAPE = "[num_seqs, max_blocks_per_seq]"
CU_SEQLENS_SHAPE = "[num_seqs + 1]"
SEQ_LENS_SHAPE = "[num_seqs]"
LSE_SHAPE = "[num_tokens, num_q_heads]"
KV_SHAPE = "[num_tokens, num_kv_heads, head_dim]"
SLOT_MAPPING_SHAPE = "[num_tokens]"
PADDED_Q_SHAPE = "[batch, seqlen_q, num_q_heads, head_dim]"
PADDED_KV_SHAPE = "[batch, seqlen_k, num_kv_heads, head_dim]"


def dtype_name(x: Any) -> str:
    """'float32', 'bfloat16', 'int32', ... for a torch, jax or numpy array."""
    return str(x.dtype).rsplit(".", 1)[-1]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def check_array(name: str, x: Any, template: str, ndim: int) -> tuple[int, ...]:
    """``x`` must be an array of rank ``ndim``; returns its shape."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array of shape {template}, got {type(x).__name__}")
    shape = _shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{name} must have shape {template} (rank {ndim}), got shape {list(shape)}")
    return shape


def check_dtype(name: str, x: Any, allowed: tuple[str, ...]) -> str:
    got = dtype_name(x)
    if got not in allowed:
        raise TypeError(f"{name} must have dtype in {list(allowed)}, got {got}")
    return got


def check_dim(name: str, template: str, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    if shape[axis] != expected:
        raise ValueError(
            f"{name} must have shape {template} with {what} = {expected}, got shape {list(shape)}"
        )


def resolve_config(config: SparsityConfig | None) -> SparsityConfig:
    """None -> the 2:4 defaults; anything but a SparsityConfig is a TypeError."""
    if config is None:
        return SparsityConfig()
    if not isinstance(config, SparsityConfig):
        raise TypeError(
            "config must be a sparse24.SparsityConfig or None, got "
            f"{type(config).__name__} (use SparsityConfig.parse('2:4') for strings)"
        )
    return config


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Normalised scalar options: 0 means off for window and softcap."""

    softmax_scale: float
    window: int
    softcap: float


def check_options(head_dim: int, softmax_scale: Any, window: Any, softcap: Any, causal: Any) -> AttentionOptions:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    else:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        scale = float(softmax_scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"softmax_scale must be a finite float > 0, got {softmax_scale!r}")
    if window is None:
        win = 0
    else:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be an int >= 1 or None, got {type(window).__name__}")
        win = int(window)
        if win < 1:
            raise ValueError(f"window must be an int >= 1 (keys with p - j < window are visible) or None, got {window!r}")
    if softcap is None:
        cap = 0.0
    else:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
            raise TypeError(f"softcap must be a float >= 0 or None (0 and None mean off), got {type(softcap).__name__}")
        cap = float(softcap)
        if not math.isfinite(cap) or cap < 0:
            raise ValueError(f"softcap must be a finite float >= 0 or None (0 and None mean off), got {softcap!r}")
    return AttentionOptions(softmax_scale=scale, window=win, softcap=cap)


@dataclasses.dataclass(frozen=True)
class UnifiedDims:
    num_tokens: int
    num_q_heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    num_seqs: int
    max_blocks_per_seq: int
    dtype: str


def check_unified_attention_args(q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=None) -> UnifiedDims:
    """Ranks, shapes and dtypes of ``unified_attention``'s arrays (no data is read)."""
    q_shape = check_array("q", q, Q_SHAPE, 3)
    k_shape = check_array("k_cache", k_cache, CACHE_SHAPE, 4)
    v_shape = check_array("v_cache", v_cache, CACHE_SHAPE, 4)
    bt_shape = check_array("block_table", block_table, BLOCK_TABLE_SHAPE, 2)
    cu_shape = check_array("cu_seqlens_q", cu_seqlens_q, CU_SEQLENS_SHAPE, 1)
    sl_shape = check_array("seq_lens", seq_lens, SEQ_LENS_SHAPE, 1)

    dtype = check_dtype("q", q, FLOAT_DTYPES)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        got = check_dtype(name, x, FLOAT_DTYPES)
        if got != dtype:
            raise TypeError(f"{name} must have the dtype of q ({dtype}), got {got}")
    for name, x in (("block_table", block_table), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens)):
        check_dtype(name, x, INDEX_DTYPES)

    num_tokens, num_q_heads, head_dim = q_shape
    num_blocks, block_size, num_kv_heads, _ = k_shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q must have shape {Q_SHAPE} with 1 <= head_dim <= {MAX_HEAD_DIM}, got shape {list(q_shape)}")
    if num_q_heads < 1:
        raise ValueError(f"q must have shape {Q_SHAPE} with num_q_heads >= 1, got shape {list(q_shape)}")
    check_dim("k_cache", CACHE_SHAPE, k_shape, 3, head_dim, "head_dim (from q)")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"k_cache must have shape {CACHE_SHAPE} with num_kv_heads dividing num_q_heads = {num_q_heads}, "
            f"got shape {list(k_shape)}"
        )
    if block_size < 1 or num_blocks < 1:
        raise ValueError(f"k_cache must have shape {CACHE_SHAPE} with num_blocks, block_size >= 1, got shape {list(k_shape)}")
    if v_shape != k_shape:
        raise ValueError(f"v_cache must have the shape of k_cache {list(k_shape)} ({CACHE_SHAPE}), got shape {list(v_shape)}")
    num_seqs = sl_shape[0]
    if num_seqs < 1:
        raise ValueError(f"seq_lens must have shape {SEQ_LENS_SHAPE} with num_seqs >= 1, got shape {list(sl_shape)}")
    check_dim("cu_seqlens_q", CU_SEQLENS_SHAPE, cu_shape, 0, num_seqs + 1, "num_seqs + 1 (from seq_lens)")
    check_dim("block_table", BLOCK_TABLE_SHAPE, bt_shape, 0, num_seqs, "num_seqs (from seq_lens)")
    if bt_shape[1] < 1:
        raise ValueError(f"block_table must have shape {BLOCK_TABLE_SHAPE} with max_blocks_per_seq >= 1, got shape {list(bt_shape)}")
    if out is not None:
        out_shape = check_array("out", out, Q_SHAPE, 3)
        if out_shape != q_shape:
            raise ValueError(f"out must have the shape of q {list(q_shape)} ({Q_SHAPE}), got shape {list(out_shape)}")
        got = check_dtype("out", out, FLOAT_DTYPES)
        if got != dtype:
            raise TypeError(f"out must have the dtype of q ({dtype}), got {got}")
    return UnifiedDims(
        num_tokens=num_tokens,
        num_q_heads=num_q_heads,
        head_dim=head_dim,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=num_kv_heads,
        num_seqs=num_seqs,
        max_blocks_per_seq=bt_shape[1],
        dtype=dtype,
    )


def check_lengths(cu_seqlens_q: np.ndarray, seq_lens: np.ndarray, block_table: np.ndarray, dims: UnifiedDims) -> tuple[int, int]:
    """Values of the metadata (host numpy copies). Returns (max_seqlen_q, max_seqlen_k).

    cu_seqlens_q starts at 0, never decreases and ends at num_tokens; 0 <= q_len <= kv_len;
    the block table covers every key and points at existing pages.
    """
    cu = np.asarray(cu_seqlens_q, dtype=np.int64)
    kv = np.asarray(seq_lens, dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q {CU_SEQLENS_SHAPE} must start at 0, got cu_seqlens_q[0] = {int(cu[0])}")
    q_lens = np.diff(cu)
    if (q_lens < 0).any():
        b = int(np.argmax(q_lens < 0))
        raise ValueError(
            f"cu_seqlens_q {CU_SEQLENS_SHAPE} must be non-decreasing, got cu_seqlens_q[{b}] = {int(cu[b])} "
            f"> cu_seqlens_q[{b + 1}] = {int(cu[b + 1])}"
        )
    if cu[-1] != dims.num_tokens:
        raise ValueError(
            f"cu_seqlens_q {CU_SEQLENS_SHAPE} must end at num_tokens = {dims.num_tokens} (q.shape[0]), "
            f"got cu_seqlens_q[-1] = {int(cu[-1])}"
        )
    if (kv < 0).any():
        b = int(np.argmax(kv < 0))
        raise ValueError(f"seq_lens {SEQ_LENS_SHAPE} must be >= 0, got seq_lens[{b}] = {int(kv[b])}")
    if (q_lens > kv).any():
        b = int(np.argmax(q_lens > kv))
        raise ValueError(
            f"seq_lens {SEQ_LENS_SHAPE} counts every key of a sequence including its new tokens, so it must be "
            f">= the sequence's query length; sequence {b} has q_len = {int(q_lens[b])} > seq_lens[{b}] = {int(kv[b])}"
        )
    pages_needed = -(-kv // dims.block_size)
    if (pages_needed > dims.max_blocks_per_seq).any():
        b = int(np.argmax(pages_needed > dims.max_blocks_per_seq))
        raise ValueError(
            f"block_table {BLOCK_TABLE_SHAPE} is too small: sequence {b} has seq_lens[{b}] = {int(kv[b])} keys = "
            f"{int(pages_needed[b])} pages of block_size {dims.block_size}, got max_blocks_per_seq = {dims.max_blocks_per_seq}"
        )
    bt = np.asarray(block_table)
    for b in range(dims.num_seqs):
        used = bt[b, : int(pages_needed[b])]
        if used.size and (used.min() < 0 or used.max() >= dims.num_blocks):
            raise ValueError(
                f"block_table {BLOCK_TABLE_SHAPE} must hold page indices in [0, num_blocks = {dims.num_blocks}) "
                f"for the pages sequence {b} uses, got a value out of range"
            )
    max_q = int(q_lens.max()) if q_lens.size else 0
    max_k = int(kv.max()) if kv.size else 0
    return max_q, max_k


def check_max_seqlens(max_seqlen_q: Any, max_seqlen_k: Any) -> None:
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int >= 0 or None, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be an int >= 0 or None, got {value!r}")
    if (max_seqlen_q is None) != (max_seqlen_k is None):
        raise ValueError(
            "max_seqlen_q and max_seqlen_k must be given together (the caller vouches for the metadata) "
            f"or both left None (they are read from the tensors), got max_seqlen_q={max_seqlen_q!r}, "
            f"max_seqlen_k={max_seqlen_k!r}"
        )


def check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping) -> tuple[int, int, int]:
    """Shapes and dtypes of ``write_kv_cache``; returns (num_tokens, num_kv_heads, head_dim)."""
    k_shape = check_array("k", k, KV_SHAPE, 3)
    v_shape = check_array("v", v, KV_SHAPE, 3)
    kc_shape = check_array("k_cache", k_cache, CACHE_SHAPE, 4)
    vc_shape = check_array("v_cache", v_cache, CACHE_SHAPE, 4)
    sm_shape = check_array("slot_mapping", slot_mapping, SLOT_MAPPING_SHAPE, 1)
    dtype = check_dtype("k_cache", k_cache, FLOAT_DTYPES)
    for name, x in (("k", k), ("v", v), ("v_cache", v_cache)):
        got = check_dtype(name, x, FLOAT_DTYPES)
        if got != dtype:
            raise TypeError(f"{name} must have the dtype of k_cache ({dtype}), got {got}")
    check_dtype("slot_mapping", slot_mapping, ("int32", "int64"))
    if v_shape != k_shape:
        raise ValueError(f"v must have the shape of k {list(k_shape)} ({KV_SHAPE}), got shape {list(v_shape)}")
    if vc_shape != kc_shape:
        raise ValueError(f"v_cache must have the shape of k_cache {list(kc_shape)} ({CACHE_SHAPE}), got shape {list(vc_shape)}")
    if kc_shape[2:] != k_shape[1:]:
        raise ValueError(
            f"k_cache must have shape {CACHE_SHAPE} with num_kv_heads, head_dim = {list(k_shape[1:])} (from k), "
            f"got shape {list(kc_shape)}"
        )
    check_dim("slot_mapping", SLOT_MAPPING_SHAPE, sm_shape, 0, k_shape[0], "num_tokens (from k)")
    return k_shape[0], k_shape[1], k_shape[2]


def check_padded_attention_args(q, k, v) -> tuple[int, int, int, int, int, int]:
    """Shapes of ``attention``; returns (batch, seqlen_q, seqlen_k, num_q_heads, num_kv_heads, head_dim)."""
    q_shape = check_array("q", q, PADDED_Q_SHAPE, 4)
    k_shape = check_array("k", k, PADDED_KV_SHAPE, 4)
    v_shape = check_array("v", v, PADDED_KV_SHAPE, 4)
    if v_shape != k_shape:
        raise ValueError(f"v must have the shape of k {list(k_shape)} ({PADDED_KV_SHAPE}), got shape {list(v_shape)}")
    if k_shape[0] != q_shape[0]:
        raise ValueError(f"k must have shape {PADDED_KV_SHAPE} with batch = {q_shape[0]} (from q), got shape {list(k_shape)}")
    if k_shape[3] != q_shape[3]:
        raise ValueError(f"k must have shape {PADDED_KV_SHAPE} with head_dim = {q_shape[3]} (from q), got shape {list(k_shape)}")
    if not 1 <= q_shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q must have shape {PADDED_Q_SHAPE} with 1 <= head_dim <= {MAX_HEAD_DIM}, got shape {list(q_shape)}")
    if q_shape[2] < 1 or k_shape[2] < 1 or q_shape[2] % k_shape[2]:
        raise ValueError(
            f"k must have shape {PADDED_KV_SHAPE} with num_kv_heads dividing num_q_heads = {q_shape[2]} (from q), "
            f"got shape {list(k_shape)}"
        )
    return q_shape[0], q_shape[1], k_shape[1], q_shape[2], k_shape[2], q_shape[3]


def check_num_kv_splits(num_kv_splits: Any) -> None:
    """None (the planner decides) or a power of two in [1, 64]."""
    if num_kv_splits is None:
        return
    if isinstance(num_kv_splits, bool) or not isinstance(num_kv_splits, (int, np.integer)):
        raise TypeError(f"num_kv_splits must be a power of two in [1, 64] or None, got {type(num_kv_splits).__name__}")
    value = int(num_kv_splits)
    if value < 1 or value > 64 or value & (value - 1):
        raise ValueError(f"num_kv_splits must be a power of two in [1, 64] or None, got {num_kv_splits!r}")
