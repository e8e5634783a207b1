"""The one input contract of every unified-attention entry point (torch and JAX alike).

:func:`prepare_unified_attention` is the front door of ``sparse24.torch_ops.unified_attention``,
``sparse24.jax_ops.unified_attention`` and both references (``sparse24.reference``: the float64
oracle, the keep masks and the chunked path; ``sparse24.jax_reference``);
:func:`prepare_padded_attention` is the front door of both ``attention()`` functions. Checks
work on anything with ``.shape`` and ``.dtype`` (torch tensors, jax arrays, numpy arrays), so
every entry point raises the same errors with the same words. Every error is a ``ValueError``
or ``TypeError`` naming the argument, the expected shape template and what came. Nothing here
imports torch, jax or triton at module level; inputs are never modified.

The contract (one rule per point where the entry points used to disagree):

- ``window``: None (off) or an int >= 1; ``window=0`` is a ValueError everywhere (0 used to
  mean "off" in the references only).
- ``softmax_scale``: None (``1 / sqrt(head_dim)``) or a finite float > 0; ``<= 0`` is a
  ValueError everywhere.
- ``config``: a :class:`SparsityConfig` or None; a string is a TypeError everywhere that
  points at :meth:`SparsityConfig.parse` (strings are parsed at the edges: the CLI, the
  notebooks; the ops take one typed value so that ``jit`` statics and ``torch.compile`` see
  one kind of object).
- ``cu_seqlens_q`` ends at ``num_tokens`` exactly (``cu_seqlens_q[-1] == q.shape[0]``), as in
  vLLM; a query row outside every sequence is an error, not a silent zero row.
- ``seq_lens[b] >= q_len[b]``: the new tokens' keys are in the cache (docs/SPEC.md §2).
- dtypes: q, the caches and ``out`` share one dtype in ``FLOAT_DTYPES`` (float32, float16,
  bfloat16); the metadata is int32. float64 is accepted by the references only (they are the
  float64 oracles: ``allow_float64=True``); the ops raise a TypeError that names float64 and
  says where it is accepted. ``v_cache`` has the shape of ``k_cache`` everywhere.
- metadata values (the rules above, page indices in range, pages enough for every key) are
  read and checked on the host when the caller lets them be read (``read_metadata``) and the
  maxima are not given. Given ``max_seqlen_q`` / ``max_seqlen_k``, the caller vouches for the
  metadata and the maxima are upper bounds: nothing is read (no host sync). Traced (``jit``)
  metadata cannot be read: it is not checked, and the maxima default to static upper bounds.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Optional

import numpy as np

from sparse24.config import SparsityConfig

# The same values as sparse24.kernels.planner's SUPPORTED_DTYPES / MAX_KV_SPLITS (a test checks
# that they agree). Not imported from there: sparse24.kernels/__init__ imports triton, and this
# module must not need triton (the JAX reference and the CPU-only paths run without it).
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
REFERENCE_FLOAT_DTYPES = FLOAT_DTYPES + ("float64",)
INDEX_DTYPES = ("int32",)
MAX_HEAD_DIM = 256
MAX_KV_SPLITS = 64

Q_SHAPE = "[num_tokens, num_q_heads, head_dim]"
CACHE_SHAPE = "[num_blocks, block_size, num_kv_heads, head_dim]"
BLOCK_TABLE_SHAPE = "[num_seqs, max_blocks_per_seq]"
CU_SEQLENS_SHAPE = "[num_seqs + 1]"
SEQ_LENS_SHAPE = "[num_seqs]"
KV_SHAPE = "[num_tokens, num_kv_heads, head_dim]"
SLOT_MAPPING_SHAPE = "[num_tokens]"
PADDED_Q_SHAPE = "[batch, seqlen_q, num_q_heads, head_dim]"
PADDED_KV_SHAPE = "[batch, seqlen_k, num_kv_heads, head_dim]"

FRAMEWORKS = ("torch", "jax")

_FLOAT64_NOTE = (
    " (float64 is accepted by the references only: sparse24.reference and sparse24.jax_reference; "
    "the ops take float32, float16 or bfloat16)"
)


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
        note = _FLOAT64_NOTE if got == "float64" and "float32" in allowed else ""
        raise TypeError(f"{name} must have dtype in {list(allowed)}, got {got}{note}")
    return got


def check_dim(name: str, template: str, shape: tuple[int, ...], axis: int, expected: int, what: str) -> None:
    if shape[axis] != expected:
        raise ValueError(
            f"{name} must have shape {template} with {what} = {expected}, got shape {list(shape)}"
        )


def _array_types(framework: str) -> tuple[tuple[type, ...], str]:
    """(accepted types, how the error names them) of a framework. Looked up in ``sys.modules``
    (the caller already imported its framework; a dict lookup also traces under torch.compile)."""
    if framework == "torch":
        return (sys.modules["torch"].Tensor,), "a torch.Tensor"
    if framework == "jax":
        return (sys.modules["jax"].Array, np.ndarray), "a jax.Array"
    raise ValueError(f"framework must be one of {list(FRAMEWORKS)}, got {framework!r}")


def check_arrays(framework: str, optional: tuple[str, ...] = (), **arrays: Any) -> Any:
    """Every named array is of the framework's array type (torch: one device, that of the
    first; jax: a ``jax.Array`` or a ``numpy.ndarray``). Names in ``optional`` may be None.
    Returns the torch device (None for jax)."""
    types, what = _array_types(framework)
    note = " (numpy arrays are accepted too)" if framework == "jax" else ""
    device = first = None
    for name, x in arrays.items():
        if x is None and name in optional:
            continue
        if not isinstance(x, types):
            raise TypeError(f"{name} must be {what}, got {type(x).__name__}{note}")
        if framework == "torch":
            if device is None:
                device, first = x.device, name
            elif x.device != device:
                raise ValueError(f"{name} must be on the device of {first} ({device}), got {x.device}")
    return device


def resolve_config(config: SparsityConfig | None) -> SparsityConfig:
    """None -> the 2:4 defaults; anything but a SparsityConfig (a string too) is a TypeError."""
    if config is None:
        return SparsityConfig()
    if not isinstance(config, SparsityConfig):
        raise TypeError(
            "config must be a sparse24.SparsityConfig or None, got "
            f"{type(config).__name__} (use SparsityConfig.parse('2:4') for strings)"
        )
    return config


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Normalised scalar options: 0 means off for window and softcap."""

    softmax_scale: float
    window: int
    softcap: float
    causal: bool = True


def check_options(head_dim: int, softmax_scale: Any, window: Any, softcap: Any, causal: Any) -> AttentionOptions:
    """The scalar options (see the module docstring for the rules)."""
    causal = check_bool("causal", causal)
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
            raise ValueError(
                f"window must be an int >= 1 (keys with p - j < window are visible) or None (no window), got {window!r}"
            )
    if softcap is None:
        cap = 0.0
    else:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating, np.integer)):
            raise TypeError(f"softcap must be a float >= 0 or None (0 and None mean off), got {type(softcap).__name__}")
        cap = float(softcap)
        if not math.isfinite(cap) or cap < 0:
            raise ValueError(f"softcap must be a finite float >= 0 or None (0 and None mean off), got {softcap!r}")
    return AttentionOptions(softmax_scale=scale, window=win, softcap=cap, causal=causal)


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


def check_unified_attention_args(
    q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=None, *, float_dtypes: tuple[str, ...] = FLOAT_DTYPES
) -> UnifiedDims:
    """Ranks, shapes and dtypes of ``unified_attention``'s arrays (no data is read).

    ``q [num_tokens, num_q_heads, head_dim]``, ``k_cache``/``v_cache [num_blocks, block_size,
    num_kv_heads, head_dim]`` (``v_cache`` may be None: the keep masks need no values),
    ``block_table [num_seqs, max_blocks_per_seq]``, ``cu_seqlens_q [num_seqs + 1]``,
    ``seq_lens [num_seqs]``, ``out`` None or of q's shape and dtype.
    """
    q_shape = check_array("q", q, Q_SHAPE, 3)
    k_shape = check_array("k_cache", k_cache, CACHE_SHAPE, 4)
    v_shape = None if v_cache is None else check_array("v_cache", v_cache, CACHE_SHAPE, 4)
    bt_shape = check_array("block_table", block_table, BLOCK_TABLE_SHAPE, 2)
    cu_shape = check_array("cu_seqlens_q", cu_seqlens_q, CU_SEQLENS_SHAPE, 1)
    sl_shape = check_array("seq_lens", seq_lens, SEQ_LENS_SHAPE, 1)

    dtype = check_dtype("q", q, float_dtypes)
    caches = (("k_cache", k_cache),) if v_cache is None else (("k_cache", k_cache), ("v_cache", v_cache))
    for name, x in caches:
        got = check_dtype(name, x, float_dtypes)
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
    if v_shape is not None and v_shape != k_shape:
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
        got = check_dtype("out", out, float_dtypes)
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

    ``cu_seqlens_q [num_seqs + 1]`` starts at 0, never decreases and ends at num_tokens;
    ``seq_lens [num_seqs]``: ``0 <= q_len <= kv_len``; ``block_table [num_seqs,
    max_blocks_per_seq]`` covers every key and points at existing pages (entries past the
    pages a sequence uses are never read and may hold anything).
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
    used = np.arange(dims.max_blocks_per_seq)[None, :] < pages_needed[:, None]
    bad = used & ((bt < 0) | (bt >= dims.num_blocks))
    if bad.any():
        b, col = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table {BLOCK_TABLE_SHAPE} must hold page indices in [0, num_blocks = {dims.num_blocks}) "
            f"for the pages sequence {b} uses, got block_table[{b}, {col}] = {int(bt[b, col])}"
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


def check_num_kv_splits(num_kv_splits: Any) -> Optional[int]:
    """None (the planner decides) or a power of two in [1, 64]; returns it as an int or None."""
    if num_kv_splits is None:
        return None
    if isinstance(num_kv_splits, bool) or not isinstance(num_kv_splits, (int, np.integer)):
        raise TypeError(
            f"num_kv_splits must be a power of two in [1, {MAX_KV_SPLITS}] or None, got {type(num_kv_splits).__name__}"
        )
    value = int(num_kv_splits)
    if value < 1 or value > MAX_KV_SPLITS or value & (value - 1):
        raise ValueError(f"num_kv_splits must be a power of two in [1, {MAX_KV_SPLITS}] or None, got {num_kv_splits!r}")
    return value


# ---------------------------------------------------------------- the front doors


@dataclasses.dataclass(frozen=True)
class PreparedAttention:
    """What :func:`prepare_unified_attention` checked and derived.

    ``max_seqlen_q`` / ``max_seqlen_k``: the caller's maxima, those read from the metadata,
    or (metadata unreadable: traced) static upper bounds. ``metadata``: the host copies
    ``(cu_seqlens_q [num_seqs + 1], seq_lens [num_seqs], block_table [num_seqs,
    max_blocks_per_seq])`` as int64 numpy arrays when they were read (and checked), else None.
    """

    config: SparsityConfig
    dims: UnifiedDims
    options: AttentionOptions
    return_lse: bool
    max_seqlen_q: int
    max_seqlen_k: int
    num_kv_splits: Optional[int]
    metadata: Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]
    return_stats: bool = False


def prepare_unified_attention(
    q,
    k_cache,
    v_cache,
    block_table,
    cu_seqlens_q,
    seq_lens,
    *,
    framework: str,
    config: SparsityConfig | None = None,
    causal: Any = True,
    softmax_scale: Any = None,
    window: Any = None,
    softcap: Any = None,
    return_lse: Any = False,
    out=None,
    max_seqlen_q: Any = None,
    max_seqlen_k: Any = None,
    num_kv_splits: Any = None,
    return_stats: Any = False,
    allow_float64: bool = False,
    read_metadata: Callable[[], Optional[tuple]] | None = None,
) -> PreparedAttention:
    """Check every argument of a unified-attention call; the one contract (module docstring).

    Args:
      q: [num_tokens, num_q_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
        num_kv_heads, head_dim] (``v_cache`` None for the keep masks); block_table:
        [num_seqs, max_blocks_per_seq]; cu_seqlens_q: [num_seqs + 1]; seq_lens: [num_seqs];
        out: None or [num_tokens, num_q_heads, head_dim] (torch only).
      framework: "torch" (torch tensors, all on one device) or "jax" (jax or numpy arrays).
      config, causal, softmax_scale, window, softcap, return_lse, max_seqlen_q, max_seqlen_k,
        num_kv_splits, return_stats: the op's options, checked here (``return_stats``, the kept
        softmax mass and kept key count per row, needs ``num_kv_splits`` None or 1: the split-KV
        reduce does not merge them).
      allow_float64: the references (float64 oracles) accept float64 too.
      read_metadata: returns host copies ``(cu_seqlens_q, seq_lens, block_table)`` (numpy or
        anything ``np.asarray`` takes), or None when they cannot be read (traced). Called
        only when the maxima are not given; None here = never read.

    Order: config, array types (and devices), ranks / shapes / dtypes, options, maxima,
    split count, return_lse, then the metadata values. Returns a :class:`PreparedAttention`.
    """
    cfg = resolve_config(config)
    check_arrays(
        framework, q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
        cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, out=out,
        optional=("out",) if v_cache is not None else ("out", "v_cache"),
    )
    float_dtypes = REFERENCE_FLOAT_DTYPES if allow_float64 else FLOAT_DTYPES
    dims = check_unified_attention_args(
        q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out=out, float_dtypes=float_dtypes
    )
    opts = check_options(dims.head_dim, softmax_scale, window, softcap, causal)
    check_max_seqlens(max_seqlen_q, max_seqlen_k)
    splits = check_num_kv_splits(num_kv_splits)
    lse = check_bool("return_lse", return_lse)
    stats = check_bool("return_stats", return_stats)
    if stats and splits not in (None, 1):
        raise ValueError(
            f"return_stats=True needs num_kv_splits None or 1 (the split-KV reduce does not merge the statistics), "
            f"got num_kv_splits={num_kv_splits!r}"
        )
    metadata = None
    if max_seqlen_q is not None:
        max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    else:
        host = read_metadata() if read_metadata is not None else None
        if host is not None:
            metadata = tuple(np.asarray(x).astype(np.int64) for x in host)
            max_q, max_k = check_lengths(*metadata, dims)
        else:  # traced: static upper bounds (launch sizing only; results never depend on them)
            max_q = 1 if dims.num_tokens == dims.num_seqs else dims.num_tokens
            max_k = dims.max_blocks_per_seq * dims.block_size
    return PreparedAttention(
        config=cfg, dims=dims, options=opts, return_lse=lse, max_seqlen_q=max_q, max_seqlen_k=max_k,
        num_kv_splits=splits, metadata=metadata, return_stats=stats,
    )


@dataclasses.dataclass(frozen=True)
class PreparedPadded:
    """What :func:`prepare_padded_attention` checked and derived (shapes of ``q [batch,
    seqlen_q, num_q_heads, head_dim]`` and ``k/v [batch, seqlen_k, num_kv_heads, head_dim]``)."""

    config: SparsityConfig
    options: AttentionOptions
    batch: int
    seqlen_q: int
    seqlen_k: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str


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


def prepare_padded_attention(
    q,
    k,
    v,
    seq_lens=None,
    *,
    framework: str,
    config: SparsityConfig | None = None,
    causal: Any = True,
    softmax_scale: Any = None,
    window: Any = None,
    softcap: Any = None,
    read_seq_lens: Callable[[], Any] | None = None,
) -> PreparedPadded:
    """Check every argument of a padded ``attention()`` call (the rules of
    :func:`prepare_unified_attention`, in the padded layout's words).

    Args:
      q: [batch, seqlen_q, num_q_heads, head_dim]; k, v: [batch, seqlen_k, num_kv_heads,
        head_dim], q's dtype, ``seqlen_k >= 1``; seq_lens: None or int32 [batch].
      framework: "torch" | "jax" (array types, and one device for torch).
      read_seq_lens: returns a host copy of ``seq_lens`` when that costs no device sync (the
        values are then checked to lie in ``[0, seqlen_k]``), else None (not checked here;
        the layout clamps them to that range, so nothing outside k/v is ever read).
    """
    cfg = resolve_config(config)
    check_arrays(framework, q=q, k=k, v=v, seq_lens=seq_lens, optional=("seq_lens",))
    batch, seqlen_q, seqlen_k, num_q_heads, num_kv_heads, head_dim = check_padded_attention_args(q, k, v)
    if batch < 1:
        raise ValueError(f"q must have shape {PADDED_Q_SHAPE} with batch >= 1, got shape {list(_shape(q))}")
    if seqlen_k < 1:
        raise ValueError(f"k must have shape {PADDED_KV_SHAPE} with seqlen_k >= 1, got shape {list(_shape(k))}")
    dtype = check_dtype("q", q, FLOAT_DTYPES)
    for name, x in (("k", k), ("v", v)):
        got = check_dtype(name, x, FLOAT_DTYPES)
        if got != dtype:
            raise TypeError(f"{name} must have the dtype of q ({dtype}), got {got}")
    opts = check_options(head_dim, softmax_scale, window, softcap, causal)
    if seq_lens is not None:
        check_array("seq_lens", seq_lens, SEQ_LENS_SHAPE, 1)
        check_dtype("seq_lens", seq_lens, INDEX_DTYPES)
        if int(seq_lens.shape[0]) != batch:
            raise ValueError(
                f"seq_lens must have shape {SEQ_LENS_SHAPE} with num_seqs = batch = {batch}, got {list(_shape(seq_lens))}"
            )
        host = read_seq_lens() if read_seq_lens is not None else None
        if host is not None:
            host = np.asarray(host)
            if (host < 0).any() or (host > seqlen_k).any():
                b = int(np.argmax((host < 0) | (host > seqlen_k)))
                raise ValueError(
                    f"seq_lens must hold values in [0, seqlen_k = {seqlen_k}], got seq_lens[{b}] = {int(host[b])}"
                )
    return PreparedPadded(
        config=cfg, options=opts, batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype,
    )


def check_slots_in_range(read_slots: Callable[[], np.ndarray] | None, num_slots: int, check_slots: Any) -> None:
    """``write_kv_cache``'s slot rule, for every door: with ``check_slots`` (a bool) True and
    the slots readable on the host (``read_slots`` not None: not traced), a slot
    ``>= num_slots`` (``num_blocks * block_size``) is a ValueError; False reads nothing (no
    device-to-host copy on the hot path). Either way the kernels and the references skip a
    slot outside ``[0, num_slots)``: nothing is written outside the cache."""
    if check_bool("check_slots", check_slots) and read_slots is not None:
        if (np.asarray(read_slots()) >= num_slots).any():
            raise ValueError(f"slot_mapping must hold slots < num_blocks * block_size = {num_slots} (or < 0 to skip)")


def check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping) -> tuple[int, int, int]:
    """Shapes and dtypes of ``write_kv_cache``: ``k/v [num_tokens, num_kv_heads, head_dim]``,
    caches ``[num_blocks, block_size, num_kv_heads, head_dim]``, ``slot_mapping [num_tokens]``
    int32 or int64. Returns (num_tokens, num_kv_heads, head_dim)."""
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
