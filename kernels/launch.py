"""The one launch description: every kernel argument of every sparse24 launch, written once.

From shapes, strides, dtypes and options, ``unified_attention_launches`` and
``write_kv_cache_launches`` return the launches of one call: per kernel, the grid, which
named array goes to which pointer parameter (inputs, then outputs, the order jax-triton
binds by position), the shape and dtype of each output (so a launcher can allocate it),
the run-time scalars and strides, every constexpr (``USE_*``, ``STORE_LSE``, ...) and
``num_warps`` / ``num_stages``. Every launch is checked once against the kernel's own
parameter list, so a kernel signature change that the description misses is an error,
not a silently shifted argument.

The torch launcher (``sparse24.torch_ops._launch``), the jax-triton launcher and the JAX
interpreter callback (``sparse24.jax_ops._launch``) all run these launches through
``run_launches``; none of them writes a kernel argument by hand, so torch and JAX launch
bit-identical kernels with bit-identical arguments by construction.

Pure Python over ``sparse24.kernels.planner``; imports triton only (through the kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any, Callable, Mapping, Sequence

from . import planner
from .kv_cache import write_kv_cache_kernel
from .mask_layout import decode_mask_layout_kernel
from .unified_attention import reduce_segments_kernel, unified_attention_kernel

Shape = tuple[int, ...]


def contiguous_strides(shape: Sequence[int]) -> Shape:
    """Row-major element strides of a dense array of this shape (JAX arrays, fresh buffers)."""
    strides, acc = [], 1
    for dim in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(dim), 1)
    return tuple(reversed(strides))


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """An output array of a launch: the pointer parameter, the array's name, shape and dtype."""

    param: str  # kernel parameter, e.g. "segm_acc_ptr"
    array: str  # name of the array across the launches of one call, e.g. "segm_acc"
    shape: Shape
    dtype: str  # "float32" | "float16" | "bfloat16" | ...


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: ``kernel[grid](*inputs, *outputs, **keywords, num_warps=, num_stages=)``.

    ``inputs`` pairs each input pointer parameter with the name of the array it reads;
    ``outputs`` the same for the arrays it writes (an output named like an earlier
    launch's output, or like a caller-provided buffer, is that array). ``keywords`` holds
    the run-time scalars and strides and the constexprs, by parameter name (read-only).
    ``input_output_aliases`` (input index, output index): the output is the input's buffer.
    """

    kernel: Any
    grid: tuple[int, ...]
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[OutputSpec, ...]
    keywords: Mapping[str, Any]
    num_warps: int
    num_stages: int
    input_output_aliases: tuple[tuple[int, int], ...] = ()
    # (the description's arguments, the planner's plan) for launches a key-side change can
    # re-describe (rebound_unified_attention_launches); not part of the launch itself
    described_by: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def input_arrays(self) -> tuple[str, ...]:
        return tuple(a for _, a in self.inputs)

    @property
    def output_arrays(self) -> tuple[str, ...]:
        return tuple(o.array for o in self.outputs)


def kernel_arg_names(kernel) -> tuple[str, ...]:
    """Parameter names of a ``@triton.jit`` kernel, compiled or interpreted."""
    names = getattr(kernel, "arg_names", None)
    if names is None:  # InterpretedFunction (TRITON_INTERPRET=1)
        names = list(inspect.signature(kernel.fn).parameters)
    return tuple(names)


_CHECKED: set = set()


def _checked(launch: KernelLaunch) -> KernelLaunch:
    """The launch, after checking once per (kernel, parameter set) that it binds every
    parameter of the kernel exactly once, arrays first in the kernel's order."""
    pointers = tuple(p for p, _ in launch.inputs) + tuple(o.param for o in launch.outputs)
    key = (id(launch.kernel), pointers, tuple(launch.keywords))
    if key in _CHECKED:
        return launch
    names = kernel_arg_names(launch.kernel)
    bound = pointers + tuple(launch.keywords)
    if names[: len(pointers)] != pointers or sorted(bound) != sorted(names):
        missing = sorted(set(names) - set(bound))
        extra = sorted(set(bound) - set(names))
        raise RuntimeError(
            f"launch description out of date for {getattr(launch.kernel, '__name__', launch.kernel)}: "
            f"array parameters {pointers} vs the kernel's first {names[: len(pointers)]}; "
            f"missing {missing}, unknown {extra}"
        )
    _CHECKED.add(key)
    return launch


def _launch(kernel, grid, inputs, outputs, keywords, *, num_warps, num_stages, aliases=()) -> KernelLaunch:
    return _checked(
        KernelLaunch(
            kernel=kernel,
            grid=tuple(grid),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            keywords=types.MappingProxyType(dict(keywords)),
            num_warps=int(num_warps),
            num_stages=int(num_stages),
            input_output_aliases=tuple(aliases),
        )
    )


def _cached(builder):
    """Memoise a description builder on its (hashable) arguments and the planner's tuning
    overrides; symbolic sizes (torch.compile's SymInts) are not hashable and bypass the cache."""
    cached = functools.lru_cache(maxsize=512)(lambda tuning_key, kwargs: builder(**dict(kwargs)))

    @functools.wraps(builder)
    def wrapper(**kwargs):
        tuning_key = tuple(sorted(planner._TUNING.items()))
        try:
            return cached(tuning_key, tuple(sorted(kwargs.items())))
        except TypeError:  # unhashable (symbolic) argument
            return builder(**kwargs)

    wrapper.cache_clear = cached.cache_clear
    return wrapper


@_cached
def unified_attention_launches(
    *,
    q_shape: Shape,
    dtype: str,
    cache_shape: Shape,
    num_seqs: int,
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
    store_lse: bool,
    store_stats: bool = False,
    num_kv_splits: int | None = None,
    num_sms: int | None = None,
    interpret: bool = False,
    row_fixup: bool = False,
    q_strides: Shape | None = None,
    k_cache_strides: Shape | None = None,
    v_cache_strides: Shape | None = None,
    block_table_strides: Shape | None = None,
    out_strides: Shape | None = None,
) -> tuple[KernelLaunch, ...]:
    """The launches of one unified-attention call on validated inputs.

    Args:
      q_shape: (num_tokens, num_q_heads, head_dim); dtype: q's and the caches' dtype name.
      cache_shape: (num_blocks, block_size, num_kv_heads, head_dim).
      num_seqs: sequences (len(seq_lens)).
      n, m, dense_sink_tokens, dense_recent_tokens, sparse_decode: the SparsityConfig.
      causal, softmax_scale (> 0), window (0 = off), softcap (0 = off): the options.
      max_seqlen_q, max_seqlen_k: upper bounds of the per-sequence lengths (launch sizing).
      store_lse: write the LSE f32[num_tokens, num_q_heads]; else ``lse`` is a [1, 1] dummy.
      store_stats: ``lse`` is f32[num_tokens, num_q_heads, 3]: (LSE, kept mass, kept keys) per
        row (forces one segment: the reduce does not merge statistics).
      num_kv_splits: force a split-KV count (None = the planner's); num_sms: the GPU's SMs.
      interpret: the kernels run in Triton's CPU interpreter.
      row_fixup: with a split, the reduce launch also reads the input arrays ``row_keep``
        bool [num_tokens] and ``row_fill`` [num_tokens] (q's dtype) and writes ``row_fill``
        over every row whose ``row_keep`` is False (:func:`applies_row_fixup` tells whether
        the launches do; without a split they do not, and the caller applies it).
      *_strides: element strides of the arrays (None = contiguous; JAX arrays always are).
        block_table is (num_seqs, max_blocks_per_seq); it is only strided, never sized here.

    Arrays by name: inputs ``q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens``;
    outputs ``out`` [T, H_q, D] (q's dtype) and ``lse`` (f32 [T, H_q], or [1, 1] without
    ``store_lse``), plus fp32 split-KV partials ``segm_*`` (dummies [1] without a split).
    With a split the reduce launch follows and writes ``out`` and ``lse``.
    """
    call = dict(q_shape=q_shape, dtype=dtype, cache_shape=cache_shape, num_seqs=num_seqs, n=n, m=m,
                dense_sink_tokens=dense_sink_tokens, dense_recent_tokens=dense_recent_tokens,
                sparse_decode=sparse_decode, causal=causal, softmax_scale=softmax_scale, window=window, softcap=softcap,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, store_lse=store_lse, store_stats=store_stats,
                num_kv_splits=num_kv_splits, num_sms=num_sms, interpret=interpret, row_fixup=row_fixup,
                q_strides=q_strides, k_cache_strides=k_cache_strides, v_cache_strides=v_cache_strides,
                block_table_strides=block_table_strides, out_strides=out_strides)
    num_tokens, num_q_heads, head_dim = (int(d) for d in q_shape)
    plan = _plan_of(call)
    out_shape = (num_tokens, num_q_heads, head_dim)
    if store_stats:
        lse_shape = (num_tokens, num_q_heads, 3)
    else:
        lse_shape = (num_tokens, num_q_heads) if store_lse else (1, 1)
    qs = tuple(q_strides) if q_strides is not None else contiguous_strides(q_shape)
    ks, vs, bts = _key_side_layout(cache_shape, k_cache_strides, v_cache_strides, block_table_strides)
    os_ = tuple(out_strides) if out_strides is not None else contiguous_strides(out_shape)
    ls = contiguous_strides(lse_shape)
    if plan.is_split:
        segm_acc = (num_tokens, num_q_heads, plan.num_segments, plan.head_dim_pad)
        segm_max = (num_tokens, num_q_heads, plan.num_segments)
    else:
        segm_acc = segm_max = (1,)
    out_lse = (OutputSpec("out_ptr", "out", out_shape, dtype), OutputSpec("lse_ptr", "lse", lse_shape, "float32"))
    out_lse_strides = dict(
        stride_out_token=os_[0], stride_out_head=os_[1], stride_out_dim=os_[2],
        stride_lse_token=ls[0], stride_lse_head=ls[1] if store_stats else ls[-1],
    )
    # config / options -> kernel flags: the only place this mapping is written.
    constexprs = plan.kernel_constexprs(
        page_size=int(cache_shape[1]), causal=bool(causal), use_window=int(window) > 0,
        use_softcap=float(softcap) > 0, use_sink=int(dense_sink_tokens) > 0,
        use_recent=int(dense_recent_tokens) > 0, sparse_decode=bool(sparse_decode), store_lse=bool(store_lse),
        store_stats=bool(store_stats),
    )
    num_warps, num_stages = constexprs.pop("num_warps"), constexprs.pop("num_stages")
    main = _launch(
        unified_attention_kernel,
        plan.grid,
        inputs=[(p + "_ptr", p) for p in ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")],
        outputs=out_lse + (
            OutputSpec("segm_acc_ptr", "segm_acc", segm_acc, "float32"),
            OutputSpec("segm_max_ptr", "segm_max", segm_max, "float32"),
            OutputSpec("segm_sum_ptr", "segm_sum", segm_max, "float32"),
        ),
        keywords=dict(
            # Floats reach the kernel as Python floats (jax-triton: compile-time constants,
            # torch: fp32 scalars); the kernel casts them to fp32 itself.
            softmax_scale=float(softmax_scale), softcap=float(softcap), window=int(window),
            dense_sink_tokens=int(dense_sink_tokens), dense_recent_tokens=int(dense_recent_tokens),
            num_seqs=int(num_seqs),
            stride_q_token=qs[0], stride_q_head=qs[1], stride_q_dim=qs[2],
            **_key_side_strides(ks, vs, bts),
            **out_lse_strides,
            **constexprs,
        ),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    main = dataclasses.replace(main, described_by=(call, plan))
    if not plan.is_split:
        return (main,)
    reduce_constexprs = plan.reduce_constexprs(store_lse=bool(store_lse), row_fixup=bool(row_fixup))
    reduce_warps, reduce_stages = reduce_constexprs.pop("num_warps"), reduce_constexprs.pop("num_stages")
    fixup = ("row_keep", "row_fill") if row_fixup else ("segm_max", "segm_max")  # dummies: never read
    reduce = _launch(
        reduce_segments_kernel,
        plan.reduce_grid,
        inputs=[("segm_acc_ptr", "segm_acc"), ("segm_max_ptr", "segm_max"), ("segm_sum_ptr", "segm_sum"),
                ("row_keep_ptr", fixup[0]), ("row_fill_ptr", fixup[1])],
        outputs=out_lse,
        keywords=dict(**out_lse_strides, **reduce_constexprs),
        num_warps=reduce_warps,
        num_stages=reduce_stages,
    )
    return (main, reduce)


def _plan_of(call: Mapping) -> planner.AttentionPlan:
    """The planner's plan of a :func:`unified_attention_launches` call (its arguments)."""
    q_shape, cache_shape = call["q_shape"], call["cache_shape"]
    return planner.plan_unified_attention(
        num_tokens=int(q_shape[0]), num_seqs=int(call["num_seqs"]), num_q_heads=int(q_shape[1]),
        num_kv_heads=int(cache_shape[2]), head_dim=int(q_shape[2]), dtype=call["dtype"], n=int(call["n"]),
        m=int(call["m"]), max_seqlen_q=int(call["max_seqlen_q"]), max_seqlen_k=int(call["max_seqlen_k"]),
        num_sms=call["num_sms"], interpret=bool(call["interpret"]),
        num_kv_splits=1 if call["store_stats"] else call["num_kv_splits"],
    )


def _key_side_layout(cache_shape, k_cache_strides, v_cache_strides, block_table_strides) -> tuple[Shape, Shape, Shape]:
    """The caches' and the block table's element strides (None: contiguous caches; a block
    table is only strided, never sized here)."""
    ks = tuple(k_cache_strides) if k_cache_strides is not None else contiguous_strides(cache_shape)
    vs = tuple(v_cache_strides) if v_cache_strides is not None else contiguous_strides(cache_shape)
    bts = tuple(block_table_strides) if block_table_strides is not None else (1, 1)
    return ks, vs, bts


# The unified kernel's cache and block-table stride parameters: what a key-side rebind
# (``rebound_unified_attention_launches``) may change in the main launch, nothing else.
KEY_SIDE_PARAMETERS = (
    "stride_kc_block", "stride_kc_slot", "stride_kc_head", "stride_kc_dim",
    "stride_vc_block", "stride_vc_slot", "stride_vc_head", "stride_vc_dim",
    "stride_bt_seq", "stride_bt_page",
)


def _key_side_strides(ks: Shape, vs: Shape, bts: Shape) -> dict:
    """The unified kernel's cache and block-table stride parameters (the one mapping)."""
    return dict(zip(KEY_SIDE_PARAMETERS, (*ks[:4], *vs[:4], *bts[:2])))


# What a key-side change may touch: the caches' page count (cache_shape[0]) and strides, the
# block table's strides, the key-length bound (through the planner only).
_KEY_SIDE = frozenset({"cache_shape", "k_cache_strides", "v_cache_strides", "block_table_strides", "max_seqlen_k"})


def key_side_parameters(launches: Sequence[KernelLaunch], **call) -> dict | None:
    """The stride parameters (``KEY_SIDE_PARAMETERS`` -> value) of ``call``'s main launch,
    where ``call`` differs from the arguments that described ``launches`` (an earlier result
    of :func:`unified_attention_launches`) on the key side only (the caches' page count and
    strides, the block table's strides, ``max_seqlen_k``) and the planner plans both calls
    alike (asked only where ``max_seqlen_k`` changed). Then ``unified_attention_launches(**call)``
    is ``launches`` with the main launch's stride parameters replaced by these (the strides
    enter the description nowhere else). None where anything else differs."""
    described_by = launches[0].described_by if launches else None
    if described_by is None:
        return None
    before, plan = described_by
    if call.keys() != before.keys():
        return None
    for name, value in call.items():
        if name not in _KEY_SIDE and value != before[name]:
            return None
    if tuple(call["cache_shape"])[1:] != tuple(before["cache_shape"])[1:]:  # page size, heads, head_dim
        return None
    if call["max_seqlen_k"] != before["max_seqlen_k"] and _plan_of(call) != plan:
        return None
    return _key_side_strides(*_key_side_layout(call["cache_shape"], call["k_cache_strides"],
                                               call["v_cache_strides"], call["block_table_strides"]))


def rebound_unified_attention_launches(launches: Sequence[KernelLaunch], **call) -> tuple[KernelLaunch, ...] | None:
    """``unified_attention_launches(**call)`` made from ``launches`` (an earlier result of it)
    where :func:`key_side_parameters` applies (an HF dynamic cache's next decode step): the
    described launches with the main launch's ``KEY_SIDE_PARAMETERS`` replaced (the others
    are the very objects given), at most a planner call instead of a whole description.
    None where anything else differs (then describe the call)."""
    strides = key_side_parameters(launches, **call)
    if strides is None:
        return None
    main = launches[0]
    keywords = types.MappingProxyType({**main.keywords, **strides})
    return (dataclasses.replace(main, keywords=keywords, described_by=(dict(call), main.described_by[1])),
            *launches[1:])


def applies_row_fixup(launches: Sequence[KernelLaunch]) -> bool:
    """The launches of :func:`unified_attention_launches` apply its ``row_fixup`` (a split:
    the reduce launch does)."""
    return bool(launches[-1].keywords.get("USE_ROW_FIXUP"))


@_cached
def write_kv_cache_launches(
    *,
    kv_shape: Shape,
    cache_shape: Shape,
    dtype: str,
    k_strides: Shape | None = None,
    v_strides: Shape | None = None,
    k_cache_strides: Shape | None = None,
    v_cache_strides: Shape | None = None,
) -> tuple[KernelLaunch, ...]:
    """The cache-write launch (none for zero tokens). Inputs ``k, v, slot_mapping, k_cache,
    v_cache``; outputs ``k_cache, v_cache`` aliased to inputs 3 and 4 (written in place).

    Args:
      kv_shape: (num_tokens, num_kv_heads, head_dim); cache_shape: (num_blocks, block_size,
        num_kv_heads, head_dim); dtype: the caches' dtype name; *_strides: None = contiguous.
    """
    num_tokens, num_kv_heads, head_dim = (int(d) for d in kv_shape)
    if num_tokens == 0:
        return ()
    plan = planner.plan_write_kv_cache(num_tokens=num_tokens, num_kv_heads=num_kv_heads, head_dim=head_dim)
    kst = tuple(k_strides) if k_strides is not None else contiguous_strides(kv_shape)
    vst = tuple(v_strides) if v_strides is not None else contiguous_strides(kv_shape)
    kcs = tuple(k_cache_strides) if k_cache_strides is not None else contiguous_strides(cache_shape)
    vcs = tuple(v_cache_strides) if v_cache_strides is not None else contiguous_strides(cache_shape)
    cache = tuple(int(d) for d in cache_shape)
    launch = _launch(
        write_kv_cache_kernel,
        plan.grid,
        inputs=[("key_ptr", "k"), ("value_ptr", "v"), ("slot_mapping_ptr", "slot_mapping"),
                ("k_cache_in_ptr", "k_cache"), ("v_cache_in_ptr", "v_cache")],
        outputs=(OutputSpec("k_cache_ptr", "k_cache", cache, dtype), OutputSpec("v_cache_ptr", "v_cache", cache, dtype)),
        keywords=dict(
            block_size=cache[1], num_slots=cache[0] * cache[1],
            stride_k_token=kst[0], stride_k_head=kst[1], stride_k_dim=kst[2],
            stride_v_token=vst[0], stride_v_head=vst[1], stride_v_dim=vst[2],
            stride_kc_block=kcs[0], stride_kc_slot=kcs[1], stride_kc_head=kcs[2], stride_kc_dim=kcs[3],
            stride_vc_block=vcs[0], stride_vc_slot=vcs[1], stride_vc_head=vcs[2], stride_vc_dim=vcs[3],
            HEAD_DIM=head_dim, HEAD_DIM_PAD=plan.head_dim_pad,
        ),
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        aliases=((3, 0), (4, 1)),
    )
    return (launch,)


@_cached
def decode_mask_layout_launches(
    *,
    mask_shape: Shape,
    mask_strides: Shape,
    signed_mask: bool,
    kv_len: int,
    pages_per_row: int,
    out_dtype: str,
    width: int | None = None,
) -> tuple[KernelLaunch, ...]:
    """The decode layout of a slot mask (``decode_mask_layout_kernel``): input ``mask``
    [batch, L]; outputs ``block_table`` int32 [batch, width], ``seq_lens`` int32 [batch],
    ``keep`` bool [batch], ``fill`` [batch] in ``out_dtype``.

    Args:
      mask_shape, mask_strides: the slot mask's; signed_mask: False for a bool mask (every
        slot < L written), True for a signed one (< 0: not written).
      kv_len: the cache's slot count; pages_per_row: pages of the one-slot paged view per row.
      out_dtype: the attention output's dtype name (``fill`` is in it).
      width: the block table's width, >= max(kv_len, 1) (None: that); columns past a row's
        keys hold valid pages too (the last slot's).
    """
    batch, mask_len = (int(d) for d in mask_shape)
    width = _mask_layout_width(kv_len, width)
    plan = planner.plan_decode_mask_layout(batch=batch, mask_len=mask_len, width=width)
    call = dict(mask_shape=(batch, mask_len), mask_strides=tuple(int(s) for s in mask_strides),
                signed_mask=bool(signed_mask), kv_len=int(kv_len), pages_per_row=int(pages_per_row),
                out_dtype=out_dtype, width=width)
    launch = _launch(
        decode_mask_layout_kernel,
        plan.grid,
        inputs=[("mask_ptr", "mask")],
        outputs=(OutputSpec("block_table_ptr", "block_table", (batch, width), "int32"),
                 OutputSpec("seq_lens_ptr", "seq_lens", (batch,), "int32"),
                 OutputSpec("keep_ptr", "keep", (batch,), "bool"),
                 OutputSpec("fill_ptr", "fill", (batch,), out_dtype)),
        keywords=dict(
            **_mask_layout_keywords(mask_len, mask_strides, kv_len, pages_per_row, width),
            SIGNED_MASK=bool(signed_mask), BLOCK_L=plan.block_l,
        ),
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )
    return (dataclasses.replace(launch, described_by=(call, plan)),)


def _mask_layout_width(kv_len, width) -> int:
    """The block table's columns: ``width``, or ``max(kv_len, 1)`` where it is None."""
    return max(int(kv_len), 1) if width is None else int(width)


def _mask_layout_keywords(mask_len, mask_strides, kv_len, pages_per_row, width) -> dict:
    """The mask-layout kernel's run-time parameters (the one mapping)."""
    return dict(mask_len=int(mask_len), kv_len=int(kv_len), width=int(width), pages_per_row=int(pages_per_row),
                stride_mask_row=int(mask_strides[0]), stride_mask_slot=int(mask_strides[1]), stride_bt_row=int(width))


def mask_layout_parameters(launches: Sequence[KernelLaunch], **call) -> dict | None:
    """The run-time parameters (name -> value) of ``decode_mask_layout_launches(**call)``,
    where ``call`` differs from the arguments that described ``launches`` (an earlier result
    of it) in the mask's length and strides, ``kv_len`` and ``pages_per_row`` only (the next
    decode step of a growing cache: the same batch, mask kind, output dtype and block-table
    width) and the planner plans both alike. Then the description is ``launches`` with these
    keywords replaced (the same grid, constexprs and outputs). None where anything else
    differs (then describe the call)."""
    described_by = launches[0].described_by if len(launches) == 1 else None
    if described_by is None:
        return None
    before, plan = described_by
    width = _mask_layout_width(call["kv_len"], call.get("width"))
    if (call.keys() != before.keys() or width != before["width"] or call["signed_mask"] != before["signed_mask"]
            or call["out_dtype"] != before["out_dtype"] or int(call["mask_shape"][0]) != before["mask_shape"][0]):
        return None
    batch, mask_len = (int(d) for d in call["mask_shape"])
    if planner.plan_decode_mask_layout(batch=batch, mask_len=mask_len, width=width) != plan:
        return None
    return _mask_layout_keywords(mask_len, call["mask_strides"], call["kv_len"], call["pages_per_row"], width)


def run_launches(
    launches: Sequence[KernelLaunch],
    arrays: Mapping[str, Any],
    launch_fn: Callable[[KernelLaunch, list, dict], Sequence[Any]],
) -> dict:
    """Run ``launches`` in order over named arrays; returns every array by name afterwards.

    ``launch_fn(launch, input_arrays, env)`` launches one kernel and returns its output
    arrays in ``launch.outputs`` order (a torch launcher allocates the outputs not in
    ``env`` and returns them; jax-triton returns fresh arrays). Outputs then replace the
    arrays of the same name, so a reduce launch reads the main launch's partials.
    """
    env = dict(arrays)
    for launch in launches:
        outs = launch_fn(launch, [env[a] for a in launch.input_arrays], env)
        env.update(zip(launch.output_arrays, outs))
    return env
