"""torch.library registrations of the Triton kernels (inference only, no autograd).

With compiled kernels the ops are ``torch.library.triton_op``s that launch through
``torch.library.wrap_triton``, so ``torch.compile`` sees the Triton kernels and CUDA
graphs can capture them. In an interpreting process (``TRITON_INTERPRET=1``) the same
kernel objects are called directly from an opaque ``torch.library.custom_op``. All launch
math and every kernel argument come from ``sparse24.kernels.launch`` (the one launch
description, shared with the JAX launcher).

Eager calls on plain tensors skip the op dispatcher: ``launch_unified_attention`` /
``launch_write_kv_cache`` (the functions the ops are made from) with ``direct=True`` launch
the kernels directly, which saves the custom-op machinery's host time per call (decode
steps are short; see benchmarks/NOTES.md). Under ``torch.compile`` and on tensor
subclasses the public functions go through ``torch.ops.sparse24.*``.
"""

from __future__ import annotations

import functools
import operator
from typing import Optional

import torch

from sparse24.backends import kernels_interpreted
from sparse24.kernels.launch import (
    KernelLaunch,
    applies_row_fixup,
    decode_mask_layout_launches,
    mask_layout_parameters,
    run_launches,
    unified_attention_launches,
    write_kv_cache_launches,
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


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int32": torch.int32, "bool": torch.bool}


# Direct launches of compiled kernels reuse Triton's compiled kernel object (its launcher)
# instead of going through ``JITFunction.run`` every call, whose argument binding and
# specialisation of every one of the ~55 arguments costs more host time than the decode
# kernel runs (benchmarks/profile_host_time.py). Sound because everything Triton specialises
# on is fixed by the key: the described launch fixes every scalar, stride and constexpr (the
# description is memoised, so one object per description), and the key adds each array's
# dtype and 16-byte alignment (what Triton specialises pointers on) and the device. The
# first call of a key goes through ``JITFunction.run`` (compiling if needed) and keeps the
# compiled kernel it returns. FAST_LAUNCH = False turns it off (benchmarks compare both).
FAST_LAUNCH = True
_COMPILED: dict = {}  # id(launch) -> (launch, trailing arguments, {array key: CompiledKernel}, 3-D grid, spec)
# A new description of the same specialisation (the next decode step of a growing cache: new
# strides and lengths, the same constexprs and the same int properties) reuses the compiled
# kernel instead of binding all ~55 arguments in ``JITFunction.run`` again.
_BY_SPECIALIZATION: dict = {}  # (specialisation, array key) -> CompiledKernel
# (id(CompiledKernel), 3-D grid) -> (the compiled kernel, its bare launch or None; see _bare_launch)
_BARE: dict = {}

try:  # Triton's own specialisation of one argument (what JITFunction's binder calls)
    from triton._C.libtriton import native_specialize_impl as _native_specialize
    from triton.backends.compiler import BaseBackend as _BaseBackend
except ImportError:  # another Triton: no reuse across descriptions (each first call binds)
    _native_specialize = None


_KEYWORDS: dict = {}  # (id(kernel), number of arrays) -> (kernel, names, getter, params, positions)


def _keyword_table(launch: KernelLaunch) -> tuple:
    """(keyword names in the kernel's order, a getter of their values from ``keywords``
    as a tuple, their Triton parameters or None where the kernel object has none, each
    name's position in that order), per kernel and array count, computed once."""
    n_arrays = len(launch.inputs) + len(launch.outputs)
    entry = _KEYWORDS.get((id(launch.kernel), n_arrays))
    if entry is None or entry[0] is not launch.kernel:
        names = tuple(launch.kernel.arg_names[n_arrays:])
        getter = (lambda kw: ()) if not names else (
            (lambda kw, n=names[0]: (kw[n],)) if len(names) == 1 else operator.itemgetter(*names))
        params = getattr(launch.kernel, "params", None)
        by_name = None if params is None else {p.name: p for p in params}
        entry = _KEYWORDS[(id(launch.kernel), n_arrays)] = (
            launch.kernel, names, getter, None if by_name is None else tuple(by_name[n] for n in names),
            {n: i for i, n in enumerate(names)})
    return entry[1:]


def _specialize(param, value):
    """Triton's JIT specialisation of a constexpr (its value) or of a scalar (its own rule:
    equal to 1, divisible by 16, 32 or 64 bits)."""
    if param.is_constexpr:
        return ("constexpr", value)
    return _native_specialize(_BaseBackend, value, param.is_const, not param.do_not_specialize,
                              not param.do_not_specialize_on_alignment)


def _specialization(launch: KernelLaunch) -> tuple | None:
    """The key Triton's JIT compiles the described launch under, less the arrays: the kernel,
    each keyword's specialisation in the kernel's order, warps and stages. None where this
    Triton or this kernel object does not expose it (then no reuse)."""
    _, getter, params, _ = _keyword_table(launch)
    if _native_specialize is None or params is None:
        return None
    spec = tuple(map(_specialize, params, getter(launch.keywords)))
    return (launch.kernel, spec, launch.num_warps, launch.num_stages)


def _fast_launch(launch: KernelLaunch, arrays: tuple, device: torch.device) -> None:
    entry = _COMPILED.get(id(launch))
    if entry is None or entry[0] is not launch:
        if len(_COMPILED) > 1024:
            _COMPILED.clear()
        getter = _keyword_table(launch)[1]  # the keywords, in the kernel's order
        grid = (*launch.grid, 1, 1)[:3]  # a compiled kernel's launcher takes all three grid sizes
        entry = _COMPILED[id(launch)] = (launch, getter(launch.keywords), {}, grid, _specialization(launch))
    pointers = [a.data_ptr() for a in arrays]
    key = (device.index, *[(a.dtype, p % 16 == 0) for a, p in zip(arrays, pointers)])
    compiled = entry[2].get(key)
    if compiled is None and entry[4] is not None:
        compiled = _BY_SPECIALIZATION.get((entry[4], key))
        if compiled is not None:
            entry[2][key] = compiled
    if compiled is None:
        compiled = entry[2][key] = launch.kernel[launch.grid](
            *arrays, **launch.keywords, num_warps=launch.num_warps, num_stages=launch.num_stages
        )
        if entry[4] is not None:
            if len(_BY_SPECIALIZATION) > 1024:
                _BY_SPECIALIZATION.clear()
            _BY_SPECIALIZATION[(entry[4], key)] = compiled
    else:  # pointers as integers: Triton's launcher then skips a data_ptr() call and a driver query per array
        bare = _BARE.get((id(compiled), entry[3]))
        if bare is None:
            if len(_BARE) > 1024:
                _BARE.clear()
            bare = _BARE[(id(compiled), entry[3])] = (
                compiled, _bare_launch(compiled, entry[3]) if device.type == "cuda" else None)
        if bare[1] is not None and _no_launch_hooks():
            launcher, grid, head = bare[1]
            launcher(*grid, _current_raw_stream(device.index if device.index is not None else 0), *head, *pointers,
                     *entry[1])
        else:
            compiled[entry[3]](*pointers, *entry[1])


_USER_ARRAYS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens", "out")

# Bare launches: a compiled kernel's C launcher called with the stream, the kernel handle and
# the packed metadata fixed, skipping Triton's Python ``runner`` (a device and a stream query,
# the launch metadata it builds for the launch hooks, the scratch allocation closures): on
# the lent H200 hosts that wrapper cost more host time per call than the decode kernel runs.
# Only for the C launcher whose argument layout was read here (Triton 3.6's CUDA launcher:
# grid x, y, z, stream, function, cooperative, PDL, global scratch, profile scratch, packed
# metadata, launch metadata, enter hook, exit hook, the kernel's arguments), for kernels
# that need no scratch memory, and while no launch hook is set (a profiler such as proton
# sets them: then the runner runs). Anything else: the runner. Used by ``DirectLaunches`` and by
# every eager direct launch of a kernel already compiled (``_fast_launch``).
try:
    from triton import knobs as _knobs
    from triton.backends.nvidia import driver as _nvidia_driver

    BARE_LAUNCH = getattr(_nvidia_driver, "_BASE_ARGS_FORMAT", None) == "iiiKKppOOOOOO"
except ImportError:  # another Triton: runners only
    BARE_LAUNCH = False


def _no_launch_hooks() -> bool:
    runtime = _knobs.runtime
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    return not (getattr(enter, "calls", enter) or getattr(exit_, "calls", exit_))


def _bare_launch(compiled, grid: tuple):
    """``(launch, grid, head)`` to call ``launch(*grid, stream, *head, *arguments)`` for a
    compiled kernel (the C launcher with the kernel handle, cooperative and PDL flags, no
    scratch, its packed metadata, no launch metadata and no hooks), or None where this
    kernel or launcher does not fit (see BARE_LAUNCH)."""
    if not BARE_LAUNCH:
        return None
    try:
        launcher = compiled.run  # loads the module (the handles) if not yet loaded
        if launcher.global_scratch_size or launcher.profile_scratch_size:
            return None
        head = (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None, None,
                compiled.packed_metadata, None, None, None)
        return launcher.launch, tuple(grid), head
    except AttributeError:
        return None


def _current_raw_stream(device_index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device_index)


def apply_row_fixup(out: torch.Tensor, row_keep: torch.Tensor, row_fill: torch.Tensor) -> None:
    """The row fix-up where no reduce launch writes it: ``out`` [T, H, D] gets ``row_fill[t]``
    in every element of each row t whose ``row_keep`` [T] is False (in place)."""
    out.copy_(torch.where(row_keep[:, None, None], out, row_fill[:, None, None]))


class DirectLaunches:
    """The compiled kernels of one planned call, launched with nothing between the caller and
    Triton's launcher but the argument tuple (``UnifiedAttentionPlan.direct``).

    Built from a plan's state after a direct call ran its launches: the launch description,
    the compiled kernel each launch kept for all-16-byte-aligned arrays (``_COMPILED``), the
    scratch partials and the unused-LSE buffer. Calling it with the seven user arrays
    (``q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out``) launches every kernel
    when all seven are 16-byte aligned and returns True; else it launches nothing and returns
    False (the caller takes the plan's path). The arrays are read by data pointer only, and
    handed to Triton's launcher as integers (a tensor argument costs the launcher a
    ``data_ptr()`` call and a driver query each); shapes and strides are the plan's, so a
    caller may pass the tensor an array is a view of when both have the same data pointer.
    Where every kernel fits (``_bare_launch``) and no launch hook is set, the C launchers are
    called directly on the current stream; else Triton's runners.
    """

    __slots__ = ("steps", "bare", "device_index", "fixed", "keep_alive", "row_fixup", "launches", "fixed_names")

    def __init__(self, steps, fixed: tuple, keep_alive: tuple, bare=None, device_index: int = 0):
        self.steps = steps  # ((runner, slots, trailing), ...): slot = index into (7 user pointers, *fixed)
        self.bare = bare  # None, or ((launch, grid, head, slots, trailing), ...): the C launchers
        self.device_index = device_index
        self.fixed = fixed  # the fixed buffers' data pointers
        self.keep_alive = keep_alive  # the fixed buffers themselves
        self.row_fixup = False  # a launch writes the row fix-up (reads row_keep; set by build)
        self.launches = ()  # the described launches these run (set by build and rebind)
        self.fixed_names = ()  # the fixed buffers' array names, in the order of ``fixed``

    @classmethod
    def build(cls, launches, fixed: dict, device: torch.device, dtypes: dict):
        steps, bare, names_fixed = [], [], list(fixed)
        for launch in launches:
            entry = _COMPILED.get(id(launch))
            if entry is None or entry[0] is not launch:
                return None
            names = launch.input_arrays + launch.output_arrays
            key = (device.index, *[(dtypes[n] if n in dtypes else fixed[n].dtype, True) for n in names])  # all aligned
            compiled = entry[2].get(key)
            if compiled is None:
                return None
            slots = tuple(_USER_ARRAYS.index(n) if n in _USER_ARRAYS else len(_USER_ARRAYS) + names_fixed.index(n)
                          for n in names)
            steps.append((compiled[entry[3]], slots, entry[1]))
            if bare is not None:
                direct = _bare_launch(compiled, entry[3]) if device.type == "cuda" else None
                bare = None if direct is None else [*bare, (*direct, slots, entry[1])]
        buffers = tuple(fixed[n] for n in names_fixed)
        index = device.index if device.index is not None else 0
        direct = cls(tuple(steps), tuple(b.data_ptr() for b in buffers), buffers, None if not bare else tuple(bare),
                     index)
        direct.row_fixup = any("row_keep" in launch.input_arrays for launch in launches)
        direct.launches, direct.fixed_names = tuple(launches), tuple(names_fixed)
        return direct

    def rebind(self, launches, buffers: dict) -> "DirectLaunches | None":
        """The same compiled kernels running other described launches: ``launches`` is the
        description of a call that differs from this one's in run-time scalars only (another
        key length's strides, say: the same kernels, grids, warps, stages, arrays, output
        shapes and constexprs), ``buffers`` {name: tensor} replaces fixed buffers by name
        (``row_keep``, ``row_fill``). Returns the new ``DirectLaunches``, or None where
        anything else differs or a changed scalar does not keep Triton's specialisation of
        the old value (divisibility by 16, equality to 1, 32 or 64 bits): there Triton's JIT
        would pick another compiled kernel (the caller then takes the plan's path, which
        does). No compilation, no driver call: tens of microseconds of Python."""
        launches = tuple(launches)
        if len(launches) != len(self.launches):
            return None
        trailing = []
        for old, new in zip(self.launches, launches):
            if new is old:
                trailing.append(None)
                continue
            if (new.kernel is not old.kernel or new.grid != old.grid or new.num_warps != old.num_warps
                    or new.num_stages != old.num_stages or new.inputs != old.inputs or new.outputs != old.outputs):
                return None
            values = _rebound_keywords(old, new)
            if values is None:
                return None
            trailing.append(values)
        return self._with(trailing, buffers, launches)

    def rebind_keywords(self, keywords, buffers: dict) -> "DirectLaunches | None":
        """These launches with some run-time scalars replaced: ``keywords[i]`` {name: value}
        for launch i (empty: unchanged), where the caller knows that the description of the
        new call is exactly this one's with those values (``sparse24.kernels.launch.
        key_side_parameters``: a decode step's new cache strides), ``buffers`` as in
        :meth:`rebind`. Each value is checked against the described launch's (``launches``,
        whose specialisation picked the compiled kernels; a result keeps its source's
        ``launches``): None where one is a constexpr or is specialised otherwise."""
        if len(keywords) != len(self.launches):
            return None
        trailing = []
        for launch, step, changes in zip(self.launches, self.steps, keywords):
            values = _replaced_keywords(launch, changes, step[2]) if changes else step[2]
            if values is None:
                return None
            trailing.append(values)
        return self._with(trailing, buffers, self.launches)

    def _with(self, trailing, buffers: dict, launches) -> "DirectLaunches | None":
        """A copy with new trailing arguments per launch (None: unchanged) and fixed buffers
        replaced by name; None for an unknown buffer name."""
        if not set(buffers) <= set(self.fixed_names):
            return None
        steps = tuple(s if t is None else (s[0], s[1], t) for s, t in zip(self.steps, trailing))
        bare = None if self.bare is None else tuple(b if t is None else (*b[:4], t) for b, t in zip(self.bare, trailing))
        kept = tuple(buffers.get(n, b) for n, b in zip(self.fixed_names, self.keep_alive))
        direct = DirectLaunches(steps, tuple(b.data_ptr() for b in kept), kept, bare, self.device_index)
        direct.row_fixup, direct.launches, direct.fixed_names = self.row_fixup, launches, self.fixed_names
        return direct

    def __call__(self, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out) -> bool:
        table = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_table.data_ptr(),
                 cu_seqlens_q.data_ptr(), seq_lens.data_ptr(), out.data_ptr(), *self.fixed)
        if (table[0] | table[1] | table[2] | table[3] | table[4] | table[5] | table[6]) % 16:
            return False
        if self.bare is not None and _no_launch_hooks():
            stream = _current_raw_stream(self.device_index)
            for launch, grid, head, slots, trailing in self.bare:
                launch(*grid, stream, *head, *[table[i] for i in slots], *trailing)
            return True
        for runner, slots, trailing in self.steps:
            runner(*[table[i] for i in slots], *trailing)
        return True


class DirectLaunch:
    """One described launch of a compiled kernel, called with its input tensors and nothing
    between the caller and Triton's launcher but the arguments (the outputs are allocated
    from the description's shapes): ``DirectLaunch.of`` after ``_fast_launch`` ran it,
    ``rebind_keywords`` for the next call of the same form. The decode mask layout of
    ``sparse24.hf``'s steps (``launch_decode_mask_layout(..., previous=)``)."""

    __slots__ = ("launch", "runner", "bare", "trailing", "device", "key")

    def __init__(self, launch, runner, bare, trailing, device, key):
        self.launch, self.runner, self.bare, self.trailing = launch, runner, bare, trailing
        self.device, self.key = device, key  # key: (dtype, 16-byte aligned) of each input

    @classmethod
    def of(cls, launch: KernelLaunch, inputs: tuple, outputs: tuple, device: torch.device) -> "DirectLaunch | None":
        """The compiled kernel ``_fast_launch`` kept for ``launch`` on arrays like these
        (dtypes, alignment, device; the outputs: fresh allocations, as ``__call__`` makes
        them), or None where there is none. The C launcher where it fits (``_bare_launch``),
        else Triton's runner."""
        entry = _COMPILED.get(id(launch))
        if entry is None or entry[0] is not launch:
            return None
        key = tuple((a.dtype, a.data_ptr() % 16 == 0) for a in (*inputs, *outputs))
        compiled = entry[2].get((device.index, *key))
        if compiled is None:
            return None
        bare = _bare_launch(compiled, entry[3]) if device.type == "cuda" else None
        return cls(launch, compiled[entry[3]], bare, entry[1], device, key[:len(inputs)])

    def rebind_keywords(self, changes) -> "DirectLaunch | None":
        """The same compiled kernel with the run-time scalars ``changes`` {name: value} (as in
        ``DirectLaunches.rebind_keywords``; the caller knows the new call's description is this
        one's with those values), or None."""
        values = _replaced_keywords(self.launch, changes, self.trailing)
        return None if values is None else DirectLaunch(self.launch, self.runner, self.bare, values, self.device,
                                                        self.key)

    def __call__(self, *inputs) -> tuple | None:
        """Launch on ``inputs`` (tensors in the description's order); returns the new outputs,
        or None (nothing launched) where an input's dtype or alignment is not the kernel's."""
        pointers = [a.data_ptr() for a in inputs]
        if any(a.dtype != dtype or (p % 16 == 0) != aligned for a, p, (dtype, aligned) in zip(inputs, pointers, self.key)):
            return None
        outputs = tuple(torch.empty(o.shape, dtype=_TORCH_DTYPES[o.dtype], device=self.device)
                        for o in self.launch.outputs)
        pointers += [o.data_ptr() for o in outputs]
        if self.bare is not None and _no_launch_hooks():
            launcher, grid, head = self.bare
            index = self.device.index if self.device.index is not None else 0
            launcher(*grid, _current_raw_stream(index), *head, *pointers, *self.trailing)
        else:
            self.runner(*pointers, *self.trailing)
        return outputs


def _keeps_specialization(param, before, after) -> bool:
    """A keyword's new value ``after`` launches the kernel compiled for ``before``: equal, or a
    run-time int / float scalar that Triton's JIT specialises as it did ``before``."""
    if before == after and type(before) is type(after):
        return True
    if param.is_constexpr or type(before) is not type(after) or isinstance(before, bool):
        return False
    if isinstance(before, int):
        return _specialize(param, before) == _specialize(param, after)
    return isinstance(before, float)


def _rebound_keywords(old: KernelLaunch, new: KernelLaunch) -> tuple | None:
    """``new``'s keywords in the kernel's order (the launcher's trailing arguments), where
    ``new`` differs from ``old`` in non-constexpr scalars only and each changed scalar keeps
    the specialisation Triton's JIT gave the old value; else None."""
    _, getter, params, _ = _keyword_table(old)
    if _native_specialize is None or params is None:
        return None
    after_all = getter(new.keywords)
    if all(map(_keeps_specialization, params, getter(old.keywords), after_all)):
        return after_all
    return None


def _replaced_keywords(launch: KernelLaunch, changes, trailing: tuple) -> tuple | None:
    """``trailing`` (keywords in the kernel's order, of a launch that runs ``launch``'s
    compiled kernel) with ``changes`` {name: value} put in, each value checked against
    ``launch``'s as in :func:`_rebound_keywords`; else None."""
    _, _, params, positions = _keyword_table(launch)
    if _native_specialize is None or params is None:
        return None
    values = list(trailing)
    for name, after in changes.items():
        i = positions[name]
        if not _keeps_specialization(params[i], launch.keywords[name], after):
            return None
        values[i] = after
    return tuple(values)


def _run_one(launch: KernelLaunch, inputs: list, env: dict, *, direct: bool, device: torch.device,
             scratch: dict | None = None) -> list:
    """Launch one described kernel: outputs not given by the caller (split-KV partials) are
    allocated here, or taken from ``scratch`` (a plan's buffers, kept between calls: later
    launches on the stream use them after earlier ones, in stream order); arrays go by
    position, everything else by keyword, as described."""
    outputs = []
    for o in launch.outputs:
        array = env.get(o.array)
        if array is None and scratch is not None:
            array = scratch.get(o.array)
        if array is None:
            array = torch.empty(o.shape, dtype=_TORCH_DTYPES[o.dtype], device=device)
            if scratch is not None:
                scratch[o.array] = array
        outputs.append(array)
    if direct and FAST_LAUNCH and not INTERPRETED:
        _fast_launch(launch, (*inputs, *outputs), device)
    else:
        _launcher(launch.kernel, direct)[launch.grid](
            *inputs, *outputs, **launch.keywords, num_warps=launch.num_warps, num_stages=launch.num_stages
        )
    return outputs


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
    store_stats: bool = False,
    row_keep: Optional[torch.Tensor] = None,
    row_fill: Optional[torch.Tensor] = None,
) -> None:
    """Launch the unified kernel on validated inputs; writes ``out`` [T, H_q, D] and
    (when ``store_lse``) ``lse`` [T, H_q] fp32, or with ``store_stats`` ``lse`` [T, H_q, 3]
    fp32 (LSE, kept mass, kept keys). ``num_kv_splits`` 0 = planner's choice.
    ``direct``: launch the raw Triton kernels (eager calls outside the op dispatcher; the
    op itself always runs with the default False). ``row_keep`` bool [T] with ``row_fill``
    [T] in out's dtype: every row whose ``row_keep`` is False is ``row_fill`` in ``out``
    (written by the split's reduce launch, or by a ``where`` here without a split)."""
    _launch_unified(
        None, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse, n, m, dense_sink_tokens,
        dense_recent_tokens, sparse_decode, causal, softmax_scale, window, softcap, max_seqlen_q, max_seqlen_k,
        num_kv_splits, store_lse, direct, store_stats, row_keep, row_fill,
    )


def unified_attention_call(q, k_cache, v_cache, block_table, seq_lens, out, n, m, dense_sink_tokens,
                           dense_recent_tokens, sparse_decode, causal, softmax_scale, window, softcap,
                           max_seqlen_q, max_seqlen_k, num_kv_splits, store_lse, store_stats=False,
                           row_fixup=False) -> dict:
    """The arguments of ``unified_attention_launches`` for a call on these tensors (their
    shapes, strides, dtypes and device; arguments as in :func:`launch_unified_attention`)."""
    return dict(
        q_shape=tuple(q.shape), dtype=dtype_str(q.dtype), cache_shape=tuple(k_cache.shape),
        num_seqs=seq_lens.shape[0], n=n, m=m, dense_sink_tokens=dense_sink_tokens,
        dense_recent_tokens=dense_recent_tokens, sparse_decode=sparse_decode, causal=causal,
        softmax_scale=softmax_scale, window=window, softcap=softcap,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, store_lse=store_lse, store_stats=store_stats,
        num_kv_splits=num_kv_splits or None, num_sms=num_sms(q.device), interpret=INTERPRETED,
        row_fixup=bool(row_fixup), q_strides=tuple(q.stride()), k_cache_strides=tuple(k_cache.stride()),
        v_cache_strides=tuple(v_cache.stride()), block_table_strides=tuple(block_table.stride()),
        out_strides=tuple(out.stride()),
    )


def _launch_unified(state, q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, out, lse, n, m,
                    dense_sink_tokens, dense_recent_tokens, sparse_decode, causal, softmax_scale, window, softcap,
                    max_seqlen_q, max_seqlen_k, num_kv_splits, store_lse, direct, store_stats=False,
                    row_keep=None, row_fill=None) -> None:
    """:func:`launch_unified_attention`; ``state``: None, or a plan's dict (``torch_ops.api``)
    that keeps the launch descriptions (with and without the row fix-up) and the scratch
    outputs of its call form between calls."""
    row_fixup = row_keep is not None
    slot = "launches_row_fixup" if row_fixup else "launches"
    launches = None if state is None else state.get(slot)
    if launches is None:
        launches = unified_attention_launches(**unified_attention_call(
            q, k_cache, v_cache, block_table, seq_lens, out, n, m, dense_sink_tokens, dense_recent_tokens,
            sparse_decode, causal, softmax_scale, window, softcap, max_seqlen_q, max_seqlen_k, num_kv_splits,
            store_lse, store_stats, row_fixup,
        ))
        if state is not None:
            state[slot] = launches
    arrays = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                  cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens, out=out, lse=lse)
    if row_fixup:
        arrays.update(row_keep=row_keep, row_fill=row_fill)
    scratch = None if state is None else state.setdefault("scratch", {})
    run_launches(launches, arrays, functools.partial(_run_one, direct=direct, device=q.device, scratch=scratch))
    if row_fixup and not applies_row_fixup(launches):  # no split, no reduce launch: the fix-up here
        apply_row_fixup(out, row_keep, row_fill)


def launch_write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    direct: bool = False,
) -> None:
    """Scatter k/v [T, H_kv, D] into the caches at ``slot_mapping`` [T] (negative = skip)."""
    launches = write_kv_cache_launches(
        kv_shape=tuple(k.shape), cache_shape=tuple(k_cache.shape), dtype=dtype_str(k_cache.dtype),
        k_strides=tuple(k.stride()), v_strides=tuple(v.stride()),
        k_cache_strides=tuple(k_cache.stride()), v_cache_strides=tuple(v_cache.stride()),
    )
    arrays = dict(k=k, v=v, slot_mapping=slot_mapping, k_cache=k_cache, v_cache=v_cache)
    run_launches(launches, arrays, functools.partial(_run_one, direct=direct, device=k.device))


def launch_decode_mask_layout(mask: torch.Tensor, kv_len: int, pages_per_row: int, out_dtype: torch.dtype,
                              direct: bool = True, width: int | None = None, previous: DirectLaunch | None = None
                              ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                                         DirectLaunch | None]:
    """One launch: the decode layout of a slot mask ``mask [B, L]`` (bool, or signed: < 0 not
    written) -> ``((block_table i32 [B, width], seq_lens i32 [B], keep bool [B], fill [B]
    out_dtype), direct)`` (``sparse24.kernels.mask_layout``; width None: max(kv_len, 1)).
    ``direct``: the compiled launch as a :class:`DirectLaunch` (None for interpreted kernels or
    off CUDA); given back as ``previous`` by the next call of a growing cache, it launches
    with its run-time scalars rebound (``mask_layout_parameters``) instead of a new
    description, where that applies. Eager, no validation here."""
    call = dict(mask_shape=tuple(mask.shape), mask_strides=tuple(mask.stride()), signed_mask=mask.dtype != torch.bool,
                kv_len=int(kv_len), pages_per_row=int(pages_per_row), out_dtype=dtype_str(out_dtype), width=width)
    if previous is not None:
        changes = mask_layout_parameters((previous.launch,), **call)
        rebound = None if changes is None else previous.rebind_keywords(changes)
        outputs = None if rebound is None else rebound(mask)
        if outputs is not None:
            return outputs, rebound
    launches = decode_mask_layout_launches(**call)
    env = run_launches(launches, {"mask": mask}, functools.partial(_run_one, direct=direct, device=mask.device))
    outputs = env["block_table"], env["seq_lens"], env["keep"], env["fill"]
    kept = None
    if direct and FAST_LAUNCH and not INTERPRETED and len(launches) == 1:
        kept = DirectLaunch.of(launches[0], (mask,), outputs, mask.device)
    return outputs, kept


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
