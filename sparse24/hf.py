"""Hugging Face transformers backend: ``attn_implementation="sparse24"``.

Importing this module registers sparse24's attention function with transformers'
``AttentionInterface`` and, under the same name, its mask function (:func:`slot_mask`) with
``AttentionMaskInterface`` (without one transformers hands a custom backend
``attention_mask=None`` and padded batches go silently wrong). The attention function then
receives a ``[batch, kv_len]`` slot mask (or None) and turns it into per-sequence lengths, so
a padded batch selects exactly what each sequence alone selects.

    import sparse24.hf
    from sparse24 import SparsityConfig
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparse24")
    sparse24.hf.sparsify(model, SparsityConfig.parse("2:4,recent=64"))    # all layers
    sparse24.hf.sparsify(model, {0: None, 5: SparsityConfig()})           # layer 5 only
    sparse24.hf.sparsify(model, sparse24.plan.Plan.load("plan.json"))      # a `sparse24 plan`
    sparse24.hf.dense(model)                                                # plain attention
    model.generate(ids, attention_mask=mask, cache_implementation="static")  # CUDA graphs on a GPU

The cache's K/V (``[batch, kv_heads, kv_len, head_dim]``: a DynamicCache's keys so far, a
StaticCache's whole buffer) reach the kernel in place: they are viewed as a paged cache of
one-slot pages (no copy), and a block table maps each sequence's real keys, skipping
padding and a StaticCache's unwritten tail. Prefill, decode, chunked prefill (queries are
the last ``q_len`` written slots), left/right padding, GQA, sliding-window layers
(``sliding_window``, dropped keys counted back exactly) and softcap (``softcap``) are
handled; what cannot be expressed (``output_attentions``, an arbitrary 4D mask, dropout in
training) raises. ``sparsify`` / ``dense`` refuse a model whose layers do not really call
sparse24 (another ``attn_implementation``, or a module that picks sdpa/eager itself), attention
modules without ``is_causal``, chunked attention (``attention_chunk_size``) and learned sinks
(``module.sinks``); a window carried only by the mask function (``config.sliding_window`` /
``layer_types``) is honoured, and any other pattern in the mask function (chunks, packed
sequences, or-ed / bidirectional blocks, unknown functions) raises at the first forward. When
V's layout differs from K's (MLA families with batch >= 2) V is copied into K's page structure,
once per layer and forward: a cost, not a silent change.

Also refused, with the reason: ALiBi or other position biases, linear attention, modules that
compute attention themselves, attention-free models, learned sparse-attention indexers, MLA
value heads of another head_dim, head_dim > 256 (``sparse24.hf_families`` sweeps every family).

The hot path reads nothing on the host: the layout (``sparse24.layouts``) is built on the
device once per forward pass and shared by all layers, with static upper bounds for the
kernel's maxima; the op's contract is checked once per call form
(``torch_ops.plan_unified_attention``), and eager decode steps pack queries and unpack outputs
by views. The one host read is at a prefill (``q_len > 1``) with a mask, once per
forward: a padding mask with holes raises a ValueError there. A decode step cannot raise
without a sync: a row whose mask has holes outputs NaN (never silently wrong). Under
``torch.compile`` / CUDA graph capture there is no host read at all (holes give NaN).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from sparse24 import layouts as _layouts
from sparse24.config import SparsityConfig

DEFAULT_NAME = "sparse24"
_CONFIG_ATTR = "sparse24_config"
_BACKEND_ATTR = "sparse24_backend"


def _paged_view(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [batch, kv_heads, kv_len, head_dim] as a cache of one-slot pages, without a copy.

    Page ``b * pages_per_row + l`` is slot ``l`` of row ``b``: the view is
    [num_pages, 1, kv_heads, head_dim] with the page stride = x's kv_len stride (rows whose
    stride is a multiple of it, as every cache layout has). Returns (view, pages_per_row).
    """
    batch, kv_heads, kv_len, head_dim = x.shape
    s_b, s_h, s_l, s_d = x.stride()
    if kv_len == 0 or s_l <= 0 or (batch > 1 and s_b % s_l):
        raise ValueError(
            "key/value must have shape [batch, kv_heads, kv_len, head_dim] with a batch stride that is a multiple "
            f"of the kv_len stride (a cache layout), got shape {list(x.shape)} strides {list(x.stride())}"
        )
    pages_per_row = s_b // s_l if batch > 1 else kv_len
    num_pages = (batch - 1) * pages_per_row + kv_len
    view = x.as_strided((num_pages, 1, kv_heads, head_dim), (s_l, s_l, s_h, s_d))  # x's storage offset
    return view, pages_per_row


def _in_layout_of(value: torch.Tensor, pages_per_row: int) -> torch.Tensor:
    """``value`` [B, H, L, D] copied into a buffer whose rows are ``pages_per_row`` slots apart
    (the key's page structure), so one block table serves both. A copy of V per layer and
    forward: the cost of caches whose V is a strided view of another layout (MLA families,
    DeepSeek-V2/V3 and MiniCPM3, with batch >= 2)."""
    batch, heads, kv_len, head_dim = value.shape
    buf = value.new_empty(batch, max(pages_per_row, kv_len), heads, head_dim)
    buf[:, :kv_len] = value.transpose(1, 2)
    return buf.transpose(1, 2)[:, :, :kv_len]


def _mask_function_features(fn) -> int | None:
    """The sliding window of a transformers mask function (None: plain causal), from its
    structure (closures of ``masking_utils``; no tensor is read). Anything sparse24's slot
    mask would drop (chunked attention, packed sequences, bidirectional blocks, or-ed or
    unknown patterns) raises a ValueError."""
    from transformers import masking_utils as mu

    def code(f):
        return getattr(f, "__code__", None)

    known = {
        code(mu.causal_mask_function): "causal",
        code(mu.and_masks(mu.causal_mask_function)): "and",
        code(mu.or_masks(mu.causal_mask_function)): "or",
        code(mu.sliding_window_overlay(1)): "window",
        code(mu.chunked_overlay(1, None)): "chunked attention (attention_chunk_size)",
        code(mu.packed_sequence_mask_function(None)): "packed sequences (several sequences in one row)",
        code(mu.blockwise_overlay(None)): "bidirectional blocks (block_sequence_ids)",
        code(mu.bidirectional_mask_function): "bidirectional (non-causal) attention (an encoder's, or an "
                                               "encoder-decoder's cross-attention mask)",
    }
    windows, seen_causal = [], []

    def walk(f):
        kind = known.get(code(f))
        cells = dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ()))) if code(f) else {}
        if kind == "causal":
            seen_causal.append(True)
        elif kind == "and":
            for g in cells["mask_functions"]:
                walk(g)
        elif kind == "window":
            windows.append(int(cells["sliding_window"]))
        else:
            what = kind or f"an unknown mask function {getattr(f, '__qualname__', type(f).__name__)!r}"
            if kind == "or":
                what = "a union of mask patterns (or_mask_function)"
            raise ValueError(
                f"attn_implementation='sparse24' expresses causal, sliding-window and padding masks only; transformers "
                f"asks for a mask with {what}, which sparse24 cannot express"
            )

    walk(fn)
    if not seen_causal:
        raise ValueError("attn_implementation='sparse24' runs causal attention only; this mask function is not causal")
    return min(windows) if windows else None


def slot_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """The mask function registered beside the attention function (``AttentionMaskInterface``).

    Called by transformers' ``create_causal_mask`` (once per forward, and by ``generate``
    before a forward with a compilable cache) with the user's 2-D padding mask
    ``attention_mask [batch, seen_tokens]`` (or None) and the layer's cache sizes. Returns the
    *slot mask* of the ``kv_length`` cache slots the attention function will receive (see
    ``sparse24.layouts``): None when every slot holds a real token (no padding, cache full);
    a bool ``[batch, kv_length]`` (True = real token, False = padding) when every slot is
    written; else an int8 ``[batch, kv_length]`` with -1 on the slots not written yet (a
    StaticCache's tail; its fill level ``q_offset + q_length`` is a device tensor there).
    Unlike ``flash_attention_mask`` it never reads the mask on the host (no ``.all()``), and
    its shape does not change from one decode step to the next with a StaticCache (CUDA
    graphs). ``mask_function`` is read for its structure only (see :func:`_mask_function_features`):
    causal with an optional sliding window; anything else it carries raises rather than being dropped
    (in eager calls: under torch.compile the structure is not read).
    """
    if mask_function is not None and not torch.compiler.is_compiling():
        # refuses what the slot mask would drop; it reads Python closures, which Dynamo cannot
        # trace, so a compiled forward skips it (generate's prefill, eager, has checked the
        # same mask structure)
        _mask_function_features(mask_function)
    filled = q_offset - kv_offset + q_length  # written slots of the layer's cache (int or 0-d tensor)
    all_written = not isinstance(filled, torch.Tensor) and filled >= kv_length
    if attention_mask is None and all_written:
        return None
    if attention_mask is not None:
        device = attention_mask.device
    elif isinstance(filled, torch.Tensor):
        device = filled.device
    else:
        device = kwargs.get("device", "cpu")
    if attention_mask is None:
        base = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
    else:
        base = attention_mask[:, -kv_length:].to(torch.bool)  # a sliding layer's window of slots
        if base.shape[1] < kv_length:  # a StaticCache: the tail is not written yet
            base = torch.nn.functional.pad(base, (0, kv_length - base.shape[1]), value=False)
    if all_written:
        return base
    written = torch.arange(kv_length, device=device) < filled  # [kv_length]
    return torch.where(written, base.to(torch.int8), -1)


_OPS_CAN_SYNC: list = []  # the ops' check, imported on the first call (an import per layer call costs host time)


def _can_sync() -> bool:
    """Host reads are possible (not tracing for torch.compile, not capturing a CUDA graph): the
    ops' own check, called once per layer call."""
    if not _OPS_CAN_SYNC:
        from sparse24.torch_ops.api import _can_sync as ops_can_sync

        _OPS_CAN_SYNC.append(ops_can_sync)
    return _OPS_CAN_SYNC[0]()


def _version(t: torch.Tensor):
    """The tensor's version counter (bumped by in-place writes), or None for an inference
    tensor (``torch.inference_mode``), which has none: there an entry matches the same object."""
    return None if t.is_inference() else t._version


class _LayoutCache:
    """The layouts of the current forward pass, shared by its layers.

    All layers of one transformers forward receive the same mask tensor object (and the same
    ``position_ids`` object); an entry matches only that very object (a weak reference, so a
    new tensor that reuses a freed one's id or memory never matches) at the same version
    counter, with the same shapes and options. A few entries cover the two layouts of
    hybrid (full + sliding-window) models; the oldest are dropped.
    """

    def __init__(self, size: int = 8):
        self.size = size
        self.entries: list = []

    @staticmethod
    def _ref(t):
        return None if t is None else (weakref.ref(t), _version(t))

    @staticmethod
    def _same(ref, t) -> bool:
        if ref is None or t is None:
            return ref is None and t is None
        return ref[0]() is t and ref[1] == _version(t)

    def get(self, key, mask, positions):
        for entry in self.entries:
            if entry[0] == key and self._same(entry[1], mask) and self._same(entry[2], positions):
                return entry[3]
        return None

    def put(self, key, mask, positions, layout) -> None:
        self.entries.insert(0, (key, self._ref(mask), self._ref(positions), layout))
        del self.entries[self.size:]

    def clear(self) -> None:
        self.entries.clear()


_LAYOUTS = _LayoutCache()


class _Step(NamedTuple):
    """What one forward pass's layers share: the layout, and the output fix-up of rows the
    layout could not vouch for without a host read: ``out = where(keep, out, fill)`` with
    ``keep`` bool [B, 1, 1, 1] and ``fill`` [B, 1, 1, 1] in the output dtype (NaN for a row
    whose mask has holes, 0 for a decode row without a real query), or both None; traced
    code (torch.compile) instead NaN-fills the rows ``nan_rows`` (bool [B]) of its gathered
    output, or nothing (None). An eager decode step hands ``keep`` and ``fill`` to the kernels
    as the plan's ``row_fixup`` (the split's reduce launch writes it; no ``where``)."""

    layout: _layouts.MaskLayout
    keep: torch.Tensor | None
    fill: torch.Tensor | None
    nan_rows: torch.Tensor | None = None
    layout_launch: object = None  # the fused layout's compiled launch: the next step's rebinds it


def _decode_step(layout: _layouts.MaskLayout, batch: int, dtype: torch.dtype) -> _Step:
    """A decode layout (q_len = 1) whose packed queries and outputs are views of the padded
    ones (no gathers): sequence b owns packed row b, and a row without a real query (its slot
    is padding) or with holes gets its output replaced (0 / NaN) by the fix-up (``_Step``)."""
    device = layout.seq_lens.device
    has_query = layout.rows < batch  # [B] the padding "none" row index is B * q_len = B
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device)
    seq_lens = torch.clamp(layout.seq_lens, min=1)  # a row without a query still reads a valid key
    layout = layout._replace(cu_seqlens_q=cu, seq_lens=seq_lens, rows=None, sources=None)
    keep = (has_query & ~layout.bad).view(batch, 1, 1, 1)
    fill = torch.where(layout.bad, float("nan"), 0.0).to(dtype).view(batch, 1, 1, 1)
    return _Step(layout, keep, fill)


_ARANGES: dict = {}  # (batch, device) -> int32 [batch + 1] 0..batch (read-only decode cu_seqlens_q)


def _kernels_build_layouts(backend: str, device: torch.device) -> bool:
    """The layer's backend runs the Triton kernels (compiled on CUDA, or interpreted): then
    they build the decode layout too; the reference backend keeps to torch."""
    from sparse24.backends import resolve_backend

    return resolve_backend(backend, "torch", on_gpu=device.type == "cuda") != "reference"


def _fused_decode_step(mask: torch.Tensor, batch: int, kv_len: int, pages_per_row: int, dtype: torch.dtype,
                       previous=None) -> _Step:
    """:func:`_decode_step` of :func:`sparse24.layouts.padding_mask_layout_torch` in one kernel
    launch (``torch_ops.decode_mask_layout``): the same block table (padded to a multiple of
    16 columns, each a valid page: the row stride keeps Triton's specialisation as the cache
    grows, so the next step's launches rebind, ``_rebound_step``), lengths and fix-up.
    ``previous``: an earlier step's ``layout_launch`` (rebound for this one where it applies)."""
    from sparse24.torch_ops import decode_mask_layout

    width = -(-max(kv_len, 1) // 16) * 16
    (block_table, seq_lens, keep, fill), launch = decode_mask_layout(
        mask, kv_len=kv_len, pages_per_row=pages_per_row, out_dtype=dtype, width=width, previous=previous,
        with_launch=True)
    cu = _ARANGES.get((batch, mask.device))
    if cu is None:
        cu = _ARANGES[(batch, mask.device)] = torch.arange(batch + 1, dtype=torch.int32, device=mask.device)
    # the key-length bound is the table's width: it changes every 16 steps, not every step, so
    # most steps rebind the strides alone, without a planner call (UnifiedAttentionPlan.rebind)
    layout = _layouts.MaskLayout(block_table, cu, seq_lens, None, None, None, None, 1, width)
    return _Step(layout, keep.view(batch, 1, 1, 1), fill.view(batch, 1, 1, 1), None, launch)


def _layout(attention_mask, position_ids, *, batch: int, q_len: int, kv_len: int, pages_per_row: int,
            sliding: bool, config: SparsityConfig, device: torch.device, dtype: torch.dtype,
            can_sync: bool | None = None, backend: str = "reference") -> _Step:
    """The layout of this forward pass: built on the device by the first layer, reused by the
    others. A prefill (q_len > 1) that builds a layout for a mask reads one flag pair on the
    host (one sync per forward): a mask with holes raises there, and an all-real batch skips
    the query gather. Decode steps never sync: a row with holes outputs NaN instead. An eager
    decode step whose ``backend`` runs the Triton kernels builds its layout in one launch
    (:func:`_fused_decode_step`; not for a sliding layer with ``position_ids``)."""
    positions = position_ids if sliding else None
    key = (batch, q_len, kv_len, pages_per_row, str(device), dtype,
           (config.m, config.dense_sink_tokens, positions is not None) if sliding else None)
    cacheable = _can_sync() if can_sync is None else can_sync  # traced or captured code builds its own
    if cacheable:
        step = _LAYOUTS.get(key, attention_mask, positions)
        if step is not None:
            return step
    if (q_len == 1 and cacheable and attention_mask is not None and positions is None
            and _kernels_build_layouts(backend, device)):
        step = _fused_decode_step(attention_mask, batch, kv_len, pages_per_row, dtype)
        _LAYOUTS.put(key, attention_mask, positions, step)
        return step
    layout = _layouts.padding_mask_layout_torch(
        attention_mask, batch, q_len, kv_len, pages_per_row=pages_per_row, device=device,
        position_ids=positions, sliding=sliding, m=config.m, dense_sink_tokens=config.dense_sink_tokens,
    )
    if layout.bad is not None and q_len > 1 and cacheable:
        has_holes, all_real = torch.stack([layout.bad.any(), layout.all_rows_real]).tolist()  # the one sync
        if has_holes:
            b = int(layout.bad.int().argmax())
            raise ValueError(
                "attn_implementation='sparse24' needs each row's real tokens to be contiguous (left or right "
                f"padding); row {b} of the attention_mask has holes"
            )
        layout = layout._replace(bad=None)
        if all_real:
            layout = layout._replace(rows=None, sources=None)
    if layout.bad is None:
        step = _Step(layout, None, None)
    elif q_len == 1 and cacheable:
        step = _decode_step(layout, batch, dtype)
    else:  # traced (torch.compile, CUDA graphs): gathers, and rows with holes output NaN
        step = _Step(layout, None, None, layout.bad)
    if cacheable:
        _LAYOUTS.put(key, attention_mask, positions, step)
    return step


class _Plans:
    """``torch_ops.plan_unified_attention`` results by call form (shapes, strides, dtypes,
    devices, options): the contract is checked by the first layer of a forward pass with a new
    form, the others run the plan. A few entries; the oldest are dropped."""

    def __init__(self, size: int = 16):
        self.size = size
        self.entries: dict = {}

    def get(self, key, make):
        plan = self.entries.get(key)
        if plan is None:
            plan = make()
            if len(self.entries) >= self.size:
                del self.entries[next(iter(self.entries))]
            self.entries[key] = plan
        return plan

    def clear(self) -> None:
        self.entries.clear()


_PLANS = _Plans()


class _DirectCalls:
    """Eager decode steps: after a step's first layer, the others of the same call form (and
    the same mask object) launch the compiled kernels directly (``UnifiedAttentionPlan.direct``):
    (mask, its version counter, step, launches, scratch) by key; a few entries (hybrid models
    alternate two forms). With a split the reduce launch writes the fix-up into a new output
    (scratch None); without one the kernel writes into the scratch output and the fix-up
    ``where`` makes the output. Not for sliding layers (their layout also depends on
    ``position_ids``)."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: dict = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, value) -> None:
        if len(self.entries) >= self.size:
            del self.entries[next(iter(self.entries))]
        self.entries[key] = value

    def clear(self) -> None:
        self.entries.clear()


_DIRECT = _DirectCalls()
# Eager decode steps of a growing cache (transformers' DynamicCache concatenates: each step's
# key/value tensors are new, one slot longer, with new strides): the last plan and direct
# launches of a call form without its key length, by _template_key; a step whose form has no
# _DIRECT entry yet rebinds them (_rebound_step) instead of checking, planning and building.
_STEP_TEMPLATES = _DirectCalls()


def _template_key(direct_key: tuple) -> tuple:
    """A ``direct_key`` without what changes from one decode step of a growing cache to the
    next: the key/value shapes' key length, their strides and the mask object."""
    (q_shape, q_stride, k_shape, _, v_shape, _), rest = direct_key[:6], direct_key[6:-1]
    return (q_shape, q_stride, k_shape[:2] + k_shape[3:], v_shape[:2] + v_shape[3:], *rest)


def _rebound_step(direct_key, query, key, value, attention_mask):
    """``(entry, out)`` for an eager decode step's first layer whose call form differs from an
    earlier step's in the key length only: this step's layout (one launch), then the earlier
    step's direct launches rebound to the new strides and lengths (``UnifiedAttentionPlan.rebind``:
    the launch description of the new call, from the old one's where only the key side
    changed; the compiled kernels reused where Triton would pick them). ``entry`` goes into
    ``_DIRECT`` (the later layers' launches), ``out`` [B, 1, H, D] is this layer's output
    buffer (the description's). The arrays are built here as the plan's path builds them, so
    they meet the contract the plan checked. ``(None, None)`` where there is no such step or
    no mask, the packed query is a copy, or the rebind refuses (then the plan's path runs)."""
    template_key = _template_key(direct_key)
    template = _STEP_TEMPLATES.get(template_key)
    if template is None or attention_mask is None:
        return None, None
    plan, launch, layout_launch = template
    batch, num_q_heads, _, head_dim = query.shape
    k_cache, pages_per_row = _paged_view(key)
    v_cache, v_pages_per_row = _paged_view(value)
    if v_pages_per_row != pages_per_row:
        return None, None
    # a template exists only for compiled kernels (plan.direct), where _layout builds a decode
    # step's layout with the fused launch: that launch here (later layers take _DIRECT)
    step = _fused_decode_step(attention_mask, batch, key.shape[2], pages_per_row, query.dtype, layout_launch)
    layout = step.layout
    q_packed = _layouts.pack_padded_torch(query.transpose(1, 2), layout)  # [B, H, D]: row b is sequence b
    if q_packed.data_ptr() != query.data_ptr():  # a copy: the direct launches read query's own memory
        return None, None
    out = torch.empty((batch, 1, num_q_heads, head_dim), dtype=query.dtype, device=query.device)  # this layer's
    rebound = plan.rebind(launch, q_packed, k_cache, v_cache, layout.block_table, layout.cu_seqlens_q,
                          layout.seq_lens, out.view(batch, num_q_heads, head_dim), max_seqlen_k=layout.max_seqlen_k,
                          row_fixup=(step.keep.view(-1), step.fill.view(-1)))
    if rebound is None:
        return None, None
    entry = (attention_mask, _version(attention_mask), step, rebound, None)
    _DIRECT.put(direct_key, entry)
    _STEP_TEMPLATES.put(template_key, (plan, rebound, step.layout_launch))
    return entry, out


_DECODE_KV_SPLITS: list = [None]  # decode_kv_splits(): the split-KV count of decode steps (None: the planner's)


def decode_kv_splits(num_kv_splits: int | None) -> None:
    """Force the split-KV count of every sparse24 decode step (one query per row) from now on:
    ``1`` launches one kernel per layer (no split, no reduce), ``None`` (the default) leaves it
    to the planner, which splits the keys until the grid covers the GPU. Results do not change
    beyond fp32 rounding (the split merges partial softmaxes); only the launch does. For
    measuring (benchmarks/bench_hf_decode.py)."""
    from sparse24.validation import check_num_kv_splits

    _DECODE_KV_SPLITS[0] = check_num_kv_splits(num_kv_splits)  # the ops' own rule (TypeError / ValueError)
    _PLANS.clear()
    _DIRECT.clear()
    _STEP_TEMPLATES.clear()


class KeptMassCollector:
    """Per layer and head, what the N:M selection keeps of the dense softmax (the kernel's
    ``return_stats``), accumulated on the device over the forwards run inside
    :func:`collect_kept_mass`: ``layers[layer] = (mass_sum [H], mass_sq_sum [H], rows [H],
    kept_keys_sum [H])``. ``rows`` (a ``slice`` of query positions, or None = all) limits the
    rows counted (an evaluation's scored positions). Rows without a real query (padding) are
    not counted."""

    def __init__(self):
        self.layers: dict = {}
        self.rows: slice | None = None

    def add(self, layer: int, batch: int, q_len: int, stats, packed_rows=None) -> None:
        """``stats``: the kernel's KeptStats of the packed rows [T, H]; ``packed_rows``: None
        (packed row b * q_len + i is query (b, i)) or the layout's ``rows`` [B * q_len]
        (the packed row of each query, T = none)."""
        mass, kept = stats.kept_mass, stats.kept_keys
        if packed_rows is not None:
            total = mass.shape[0]
            real = (packed_rows < total)[:, None]
            index = packed_rows.clamp(max=total - 1)
            mass = torch.where(real, mass[index], float("nan"))
            kept = torch.where(real, kept[index], 0.0)
        mass = mass[: batch * q_len].view(batch, q_len, -1)  # [B, Lq, H]
        kept = kept[: batch * q_len].view(batch, q_len, -1)
        if self.rows is not None:
            mass, kept = mass[:, self.rows], kept[:, self.rows]
        real = torch.isfinite(mass)
        m = torch.where(real, mass, 0.0).double()
        sums = (m.sum((0, 1)), (m * m).sum((0, 1)), real.sum((0, 1)).double(),
                torch.where(real, kept, 0.0).double().sum((0, 1)))
        if layer in self.layers:
            self.layers[layer] = tuple(a + b for a, b in zip(self.layers[layer], sums))
        else:
            self.layers[layer] = sums

    def summary(self) -> dict:
        """``{layer: {"mean": [H], "std": [H] (over positions), "rows": int, "kept_keys": [H]
        (mean)}}`` on the host (one read)."""
        out = {}
        for layer in sorted(self.layers):
            total, squares, rows, kept = (t.cpu() for t in self.layers[layer])
            n = rows.clamp(min=1)
            mean = total / n
            std = (squares / n - mean * mean).clamp(min=0).sqrt()
            out[layer] = {"mean": mean.tolist(), "std": std.tolist(), "rows": int(rows.max()),
                          "kept_keys": (kept / n).tolist()}
        return out


_COLLECTOR: list = []  # the active KeptMassCollector, if any


class collect_kept_mass:
    """``with sparse24.hf.collect_kept_mass() as stats: model(...)``: the sparse24 layers of
    the forwards inside run the kernel with ``return_stats`` (one unsplit launch, eager, no
    plan reuse) and add their per-head kept softmax mass to ``stats``
    (:class:`KeptMassCollector`). Layers are keyed by ``module.layer_idx``."""

    def __init__(self, collector: KeptMassCollector | None = None):
        self.collector = collector or KeptMassCollector()

    def __enter__(self) -> KeptMassCollector:
        if _COLLECTOR:
            raise RuntimeError("collect_kept_mass() is already active")
        _COLLECTOR.append(self.collector)
        return self.collector

    def __exit__(self, *exc) -> None:
        _COLLECTOR.clear()


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention function: query [B, H, Lq, D], key/value [B, H_kv, Lk, D]
    (not repeated for GQA; the whole cache: a StaticCache's whole buffer), attention_mask
    None or the slot mask [B, L <= Lk] of :func:`slot_mask` (a plain [B, Lk] padding mask
    works too) -> (out [B, Lq, H, D], None). No host read on the hot path (see ``_layout``)."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='sparse24' cannot return attention weights (output_attentions=True)")
    if dropout and module.training:
        raise ValueError("attn_implementation='sparse24' is inference-only: dropout > 0 in training mode is not supported")
    config = getattr(module, _CONFIG_ATTR, None) or SparsityConfig()  # unset: the 2:4 defaults
    backend = getattr(module, _BACKEND_ATTR, "auto")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if causal is None:
        causal = True
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='sparse24' has no attention sinks: s_aux (learned sink logits) must be None")
    window = kwargs.get("sliding_window") or _layer_window(module)  # some families carry it only in the mask
    softcap = kwargs.get("softcap")

    batch, num_q_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "attn_implementation='sparse24' handles causal attention with a [batch, kv_len] padding mask; got an "
                f"attention_mask of shape {list(attention_mask.shape)} (an arbitrary 4D mask cannot be expressed)"
            )
        if attention_mask.shape[0] != batch or not 1 <= attention_mask.shape[1] <= kv_len:
            raise ValueError(
                f"attention_mask must have shape [batch, L] with batch = {batch} and 1 <= L <= kv_len = {kv_len} "
                f"(the key/value length), got {list(attention_mask.shape)}"
            )
    can_sync = _can_sync()
    direct_key = None
    if q_len == 1 and can_sync and not window and not _COLLECTOR:  # an eager decode step: later layers launch directly
        direct_key = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
                      key.dtype, value.dtype, query.device, id(config), backend, causal, window, softcap, scaling,
                      id(attention_mask))
        direct = _DIRECT.get(direct_key)
        out = None
        if direct is None or direct[0] is not attention_mask or direct[1] != _version(attention_mask):
            direct, out = _rebound_step(direct_key, query, key, value, attention_mask)
        if direct is not None:
            _, _, step, launch, scratch = direct
            layout = step.layout
            if out is None:
                out = scratch if scratch is not None else torch.empty((batch, 1, num_q_heads, head_dim),
                                                                      dtype=query.dtype, device=query.device)
            if launch(query, key, value, layout.block_table, layout.cu_seqlens_q, layout.seq_lens, out):
                return (torch.where(step.keep, out, step.fill) if scratch is not None else out), None
    from sparse24.torch_ops import plan_unified_attention, unified_attention  # here: not on the direct path
    k_cache, pages_per_row = _paged_view(key)
    v_cache, v_pages_per_row = _paged_view(value)
    copied_value = v_pages_per_row != pages_per_row
    if copied_value:
        v_cache = _paged_view(_in_layout_of(value, pages_per_row))[0]
    step = _layout(attention_mask, kwargs.get("position_ids"), batch=batch, q_len=q_len, kv_len=kv_len,
                   pages_per_row=pages_per_row, sliding=bool(window), config=config, device=query.device,
                   dtype=query.dtype, can_sync=can_sync, backend=backend)
    layout = step.layout

    q_rows = query.transpose(1, 2)  # [B, Lq, H, D]
    q_packed = _layouts.pack_padded_torch(q_rows, layout)  # [B * Lq, H, D]
    buffer = _layouts.packed_out_buffer_torch(layout, q_rows)  # [B * Lq (+ 1), H, D]
    out_packed = buffer[: batch * q_len]
    tables = (layout.block_table, layout.cu_seqlens_q, layout.seq_lens)
    options = dict(config=config, causal=bool(causal), softmax_scale=scaling, window=int(window) if window else None,
                   softcap=float(softcap) if softcap else None, max_seqlen_q=layout.max_seqlen_q,
                   max_seqlen_k=layout.max_seqlen_k, backend=backend)
    if q_len == 1 and _DECODE_KV_SPLITS[0] is not None and not _COLLECTOR:
        options["num_kv_splits"] = _DECODE_KV_SPLITS[0]
    if _COLLECTOR and can_sync:  # a kept-mass study: the statistics path, eager
        _, stats = unified_attention(q_packed, k_cache, v_cache, *tables, out=out_packed, return_stats=True, **options)
        _COLLECTOR[0].add(getattr(module, "layer_idx", id(module)), batch, q_len, stats, layout.rows)
    elif can_sync:  # the contract is checked once per call form (a forward pass's first layer)
        form = (q_packed.shape, q_packed.stride(), q_packed.dtype, q_packed.device, k_cache.shape, k_cache.stride(),
                k_cache.dtype, k_cache.device, v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device,
                layout.block_table.shape, *options.values())
        plan = _PLANS.get(form, lambda: plan_unified_attention(q_packed, k_cache, v_cache, *tables, out=out_packed,
                                                               **options))
        # a decode step's fix-up (packed row b is sequence b's query): in the split's reduce launch
        fixup = None if step.keep is None or q_len != 1 else (step.keep.view(-1), step.fill.view(-1))
        plan(q_packed, k_cache, v_cache, *tables, out=out_packed, row_fixup=fixup)
        decode_step = step
        if fixup is not None:
            step = step._replace(keep=None, fill=None)  # applied
        if (direct_key is not None and fixup is not None and not copied_value
                and q_packed.data_ptr() == query.data_ptr() and k_cache.data_ptr() == key.data_ptr()
                and v_cache.data_ptr() == value.data_ptr()):
            launch = plan.direct(q_packed, k_cache, v_cache, *tables, out_packed, row_fixup=fixup)
            if launch is not None:  # the next layers' calls of this step
                # the reduce launch writes the fixed-up rows into a new output; without a split
                # the kernel writes into scratch and ``where`` makes the output
                scratch = None if launch.row_fixup else torch.empty((batch, 1, num_q_heads, head_dim),
                                                                    dtype=query.dtype, device=query.device)
                _DIRECT.put(direct_key, (attention_mask, _version(attention_mask), decode_step,
                                         launch, scratch))
                if launch.row_fixup:  # the next steps' first layers rebind these launches (_rebound_step)
                    _STEP_TEMPLATES.put(_template_key(direct_key), (plan, launch, decode_step.layout_launch))
    else:  # traced: no cache (the trace runs once)
        unified_attention(q_packed, k_cache, v_cache, *tables, out=out_packed, **options)
    out = _layouts.unpack_padded_torch(buffer, layout, (batch, q_len, num_q_heads, head_dim))
    if step.keep is not None:  # rows with holes: NaN, never silently wrong (no host read here)
        out = torch.where(step.keep, out, step.fill)
    elif step.nan_rows is not None:
        out = out.masked_fill(step.nan_rows[:, None, None, None], float("nan"))
    return out, None


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention function and its mask function under ``name``; returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, slot_mask)
    return name


def _candidate_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    layers = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and type(module).__name__.endswith("Attention"):
            layers.setdefault(int(idx), module)
    return layers


def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    candidates = _candidate_modules(model)
    if not candidates:
        raise ValueError(
            f"model must have attention modules with a layer_idx (a transformers decoder), got {type(model).__name__}: "
            "none of its modules is a *Attention module with a layer_idx"
        )
    no_causal = {i: type(m).__name__ for i, m in candidates.items() if not hasattr(m, "is_causal")}
    if no_causal:
        raise ValueError(
            f"sparse24 runs causal attention only, and the attention modules of layers {sorted(no_causal)} "
            f"({sorted(set(no_causal.values()))}) of {type(model).__name__} have a layer_idx but no is_causal "
            "attribute, so whether (and how) they mask cannot be known; such models are not supported"
        )
    return candidates


def _dispatches_through_interface(module: torch.nn.Module) -> bool:
    """The module's forward looks its attention function up in transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (a module that picks sdpa/eager itself never calls ours)."""
    forward = getattr(type(module).forward, "__code__", None)
    return forward is not None and "ALL_ATTENTION_FUNCTIONS" in forward.co_names


def _check_dispatch(model: torch.nn.Module, layers: dict[int, torch.nn.Module]) -> None:
    """Every layer really calls :func:`attention_forward` (else sparsify would be a silent no-op)."""
    import inspect

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def what_it_computes(module) -> str:
        """What a module that computes its attention itself does, as far as its signature and
        config say: the reason it cannot be routed to sparse24."""
        params = inspect.signature(type(module).forward).parameters
        config = getattr(module, "config", None) or model.config
        idx = getattr(module, "layer_idx", None)
        layer_types = getattr(config, "layer_types", None)
        listed = isinstance(layer_types, (list, tuple)) and idx is not None and idx < len(layer_types)
        kind = layer_types[idx] if listed else None
        name = type(module).__name__
        flags = [c for c in (config, getattr(config, "attn_config", None)) if hasattr(c, "alibi")]
        alibi = bool(flags[0].alibi) if flags else "alibi" in params  # Falcon has the argument, off by default
        if alibi:
            return ("they add an ALiBi position bias to the attention scores, which sparse24's kernel has no term "
                    "for")
        if "position_bias" in params:
            return ("they add a position bias to the attention scores (forward argument 'position_bias'), which "
                    "sparse24's kernel has no term for")
        if kind == "linear_attention" or "Linear" in name or "Lightning" in name:
            return "they are linear (lightning) attention layers, not softmax attention"
        return "they compute attention themselves (their own eager/sdpa code)"

    own = {i: type(m).__name__ for i, m in layers.items() if not _dispatches_through_interface(m)}
    if own:
        reasons = {}
        for i in sorted(own):
            reasons.setdefault(what_it_computes(layers[i]), []).append(i)
        why = "; ".join(reason if len(reasons) == 1 else f"layers {idx}: {reason}" for reason, idx in reasons.items())
        raise ValueError(
            f"the attention modules of layers {sorted(own)} ({sorted(set(own.values()))}) of {type(model).__name__} "
            f"do not dispatch through transformers' AttentionInterface: {why}; attn_implementation='sparse24' never "
            "reaches them, so this model is not supported"
        )
    wrong = {}
    for i, module in layers.items():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if impl is None:
            impl = getattr(model.config, "_attn_implementation", None)
        if impl not in ALL_ATTENTION_FUNCTIONS or ALL_ATTENTION_FUNCTIONS[impl] is not attention_forward:
            wrong[i] = impl
    if wrong:
        raise ValueError(
            f"the attention of layers {sorted(wrong)} of {type(model).__name__} runs attn_implementation="
            f"{sorted(set(map(str, wrong.values())))}, not sparse24, so sparsify would change nothing; load the model "
            f"with attn_implementation={DEFAULT_NAME!r} or call model.set_attn_implementation({DEFAULT_NAME!r}) first"
        )


_FEATURES_ATTR = "sparse24_features"


def _layer_window(module: torch.nn.Module) -> int | None:
    """The sliding window transformers applies to this layer (possibly only through its mask
    function), from the layer's config (``config.sliding_window`` without ``layer_types`` only
    where the family's code builds a sliding-window mask); refuses what the kernel cannot
    express (chunked attention, learned sinks, a learned sparse-attention indexer, a value
    head_dim unlike the query/key head_dim, head_dim > MAX_HEAD_DIM). Cached on the module."""
    cached = getattr(module, _FEATURES_ATTR, None)
    if cached is not None:
        return cached[0]
    import inspect
    import sys

    from sparse24.validation import MAX_HEAD_DIM

    name, idx = type(module).__name__, getattr(module, "layer_idx", None)
    if getattr(module, "sinks", None) is not None:
        raise ValueError(
            f"{name} (layer {idx}) has learned attention sinks (module.sinks: per-head logits in the softmax "
            "denominator); sparse24's kernel has no sink logits, so this model is not supported"
        )
    if getattr(module, "indexer", None) is not None:
        raise ValueError(
            f"{name} (layer {idx}) has a learned sparse-attention indexer (module.indexer, DeepSeek sparse attention: "
            "it picks the keys each query attends to); sparse24 selects keys by its own N:M rule, so this model is "
            "not supported"
        )
    qk_dim = getattr(module, "qk_head_dim", None) or getattr(module, "head_dim", None)
    v_dim = getattr(module, "v_head_dim", None)
    if isinstance(qk_dim, int) and isinstance(v_dim, int) and v_dim != qk_dim:
        raise ValueError(
            f"{name} (layer {idx}) has value heads of head_dim {v_dim} and query/key heads of head_dim {qk_dim} "
            "(MLA); sparse24's kernel takes one head_dim for q, k and v, so this model is not supported"
        )
    if isinstance(qk_dim, int) and qk_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"{name} (layer {idx}) has head_dim {qk_dim}; sparse24's kernel supports head_dim <= {MAX_HEAD_DIM}, so "
            "this model is not supported"
        )
    config = getattr(module, "config", None)
    window = None
    layer_types = getattr(config, "layer_types", None)
    kind = layer_types[idx] if isinstance(layer_types, (list, tuple)) and idx is not None and idx < len(layer_types) else None
    chunk = getattr(config, "attention_chunk_size", None)
    if kind == "chunked_attention" or (kind is None and chunk):
        raise ValueError(
            f"{name} (layer {idx}) uses chunked attention (config.layer_types[{idx}] = {kind!r}, attention_chunk_size "
            f"= {chunk}); sparse24 expresses causal, sliding-window and padding masks only, not chunked attention"
        )
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
    if kind is None and windowed:
        # config.sliding_window without layer_types is a window only where the family's code builds a
        # sliding-window mask (Moshi, e.g., has the field and a plain causal mask)
        try:
            source = inspect.getsource(sys.modules[type(module).__module__])
        except (KeyError, OSError, TypeError):
            source = ""
        masks = ("create_sliding_window_causal_mask", "sliding_window_causal_mask_function", "sliding_window_overlay")
        if any(m in source for m in masks):
            window = config.sliding_window
    elif kind == "sliding_attention":
        window = getattr(config, "sliding_window", None)
    setattr(module, _FEATURES_ATTR, (int(window) if window else None,))
    return getattr(module, _FEATURES_ATTR)[0]


def sparsify(model: torch.nn.Module, config, *, backend: str = "auto") -> torch.nn.Module:
    """Set the sparsity of every attention layer; returns the model.

    Args:
      model: a transformers model using ``attn_implementation="sparse24"``.
      config: a ``SparsityConfig`` for all layers, or ``{layer_index: SparsityConfig | None}``
        (None = dense; layers not named are dense), or a ``sparse24.plan.Plan``.
      backend: "auto" | "triton" | "interpret" | "reference" for the attention op.
    """
    from sparse24.backends import check_backend_name

    check_backend_name(backend)
    if hasattr(config, "for_sparsify"):  # a sparse24.plan.Plan
        config = config.for_sparsify()
    candidates = _candidate_modules(model)
    if not candidates:
        named = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Attention")})
        if not named:
            layer_types = getattr(getattr(model, "config", None), "layer_types", None)
            raise ValueError(
                f"{type(model).__name__} has no attention modules (an attention-free model, e.g. state-space or "
                f"recurrent layers{f': layer_types {sorted(set(layer_types))}' if layer_types else ''}); there is "
                "nothing for sparse24 to run"
            )
        own = sorted({type(m).__name__ for m in model.modules()
                      if type(m).__name__ in named and not _dispatches_through_interface(m)})
        raise ValueError(
            f"model must have attention modules with a layer_idx (a transformers decoder), got {type(model).__name__}, "
            f"whose attention modules {named} have no layer_idx"
            + (f" and {own} do not dispatch through transformers' AttentionInterface (they compute attention "
               "themselves)" if own else "") + "; this model is not supported"
        )
    _check_dispatch(model, candidates)  # first: a module that never calls sparse24 is the real reason
    layers = _attention_modules(model)
    for module in layers.values():
        _layer_window(module)  # refuses chunked attention / sinks here rather than at the first forward
    if isinstance(config, SparsityConfig):
        chosen = {i: config for i in layers}
    elif isinstance(config, dict):
        unknown = sorted(set(config) - set(layers))
        if unknown:
            raise ValueError(f"config names layers {unknown} that the model does not have (layers 0..{max(layers)})")
        for i, c in config.items():
            if c is not None and not isinstance(c, SparsityConfig):
                raise TypeError(f"config[{i}] must be a SparsityConfig or None, got {type(c).__name__}")
        chosen = {i: config.get(i) for i in layers}
    else:
        raise TypeError(f"config must be a SparsityConfig or a dict {{layer_index: SparsityConfig | None}}, got {type(config).__name__}")
    for i, module in layers.items():
        setattr(module, _CONFIG_ATTR, chosen[i] if chosen[i] is not None else SparsityConfig.dense())
        setattr(module, _BACKEND_ATTR, backend)
    return model


def dense(model: torch.nn.Module, *, backend: str = "auto") -> torch.nn.Module:
    """Plain attention (``SparsityConfig.dense()``) in every layer, through the same kernel."""
    return sparsify(model, SparsityConfig.dense(), backend=backend)


def layer_configs(model: torch.nn.Module) -> dict[int, SparsityConfig]:
    """The sparsity each layer runs with (unset layers run the 2:4 defaults)."""
    return {i: getattr(m, _CONFIG_ATTR, None) or SparsityConfig() for i, m in _attention_modules(model).items()}


register()
