"""Hugging Face transformers backend: ``attn_implementation="sparse24"``.

Importing this module registers sparse24's attention function with transformers'
``AttentionInterface`` and, under the same name, the FlashAttention-style mask function
with ``AttentionMaskInterface`` (without it transformers hands a custom backend
``attention_mask=None`` and padded batches go silently wrong). The attention function
then receives a ``[batch, kv_len]`` padding mask (or None) and turns it into per-sequence
lengths, so a padded batch selects exactly what each sequence alone selects.

    import sparse24.hf
    from sparse24 import SparsityConfig
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sparse24")
    sparse24.hf.sparsify(model, SparsityConfig.parse("2:4,recent=64"))    # all layers
    sparse24.hf.sparsify(model, {0: None, 5: SparsityConfig()})           # layer 5 only
    sparse24.hf.dense(model)                                                # plain attention

The cache's K/V (``[batch, kv_heads, kv_len, head_dim]``, the whole cache so far) reach the
kernel in place: they are viewed as a paged cache of one-slot pages (no copy), and a block
table maps each sequence's real keys, skipping padding. Prefill, decode, chunked prefill
(queries are the last ``q_len`` slots), left/right padding, GQA, sliding-window layers
(``sliding_window``) and softcap (``softcap``) are handled; what cannot be expressed
(``output_attentions``, an arbitrary 4D mask, a padding mask with holes, dropout in
training) raises.
"""

from __future__ import annotations

import torch

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
    view = x.as_strided((num_pages, 1, kv_heads, head_dim), (s_l, s_l, s_h, s_d), x.storage_offset())
    return view, pages_per_row


class _Layout:
    """Per-call packing: which query rows are real, and the unified-attention metadata."""

    def __init__(self, attention_mask, position_ids, batch: int, q_len: int, kv_len: int,
                 pages_per_row: int, sliding: bool, device: torch.device):
        if attention_mask is None:
            start = torch.zeros(batch, dtype=torch.int64)
            end = torch.full((batch,), kv_len, dtype=torch.int64)
        else:
            if attention_mask.dim() != 2:
                raise ValueError(
                    "attn_implementation='sparse24' handles causal attention with a [batch, kv_len] padding mask; got an "
                    f"attention_mask of shape {list(attention_mask.shape)} (an arbitrary 4D mask cannot be expressed)"
                )
            if attention_mask.shape != (batch, kv_len):
                raise ValueError(
                    f"attention_mask must have shape [batch, kv_len] = {[batch, kv_len]} (the key/value length; a "
                    f"StaticCache is not supported), got {list(attention_mask.shape)}"
                )
            mask = attention_mask.detach().to("cpu", torch.bool)
            real = mask.sum(1)
            start = torch.where(real > 0, mask.int().argmax(1), 0).long()
            end = torch.where(real > 0, kv_len - mask.flip(1).int().argmax(1), 0).long()
            if bool((end - start != real).any()):
                b = int((end - start != real).int().argmax())
                raise ValueError(
                    "attn_implementation='sparse24' needs each row's real tokens to be contiguous (left or right "
                    f"padding); row {b} of the attention_mask has holes"
                )
        real_len = end - start  # real keys per row
        first_query_slot = kv_len - q_len  # queries are the last q_len slots
        q_start = torch.maximum(start, torch.full_like(start, first_query_slot))
        q_lens = (end - q_start).clamp(min=0)
        # Sliding-window layers keep only the newest keys: count the dropped ones back in, so
        # key indices stay absolute (groups of M from the first real token).
        dropped = torch.zeros(batch, dtype=torch.int64)
        if sliding and position_ids is not None and bool((q_lens > 0).any()):
            pos = position_ids.detach().to("cpu", torch.int64).expand(batch, -1)
            last_row = (end - 1 - first_query_slot).clamp(0, q_len - 1)
            seen = pos.gather(1, last_row[:, None])[:, 0] + 1
            dropped = torch.where(q_lens > 0, (seen - real_len).clamp(min=0), 0)
        kv_lens = real_len + dropped
        self.q_lens = q_lens
        self.all_rows_real = bool((q_lens == q_len).all())
        if not self.all_rows_real:
            rows = torch.arange(q_len)[None, :] + first_query_slot  # slot of each query row
            self.row_mask = ((rows >= q_start[:, None]) & (rows < end[:, None])).to(device)  # [batch, q_len]
        self.max_seqlen_q = int(q_lens.max()) if batch else 0
        self.max_seqlen_k = int(kv_lens.max()) if batch else 0
        width = max(self.max_seqlen_k, 1)
        j = torch.arange(width)[None, :]
        slot = (start[:, None] + j - dropped[:, None]).clamp(min=0)
        slot = torch.minimum(slot, torch.full_like(slot, kv_len - 1))
        block_table = torch.arange(batch, dtype=torch.int64)[:, None] * pages_per_row + slot
        self.block_table = block_table.to(torch.int32).to(device)
        cu = torch.zeros(batch + 1, dtype=torch.int64)
        cu[1:] = torch.cumsum(q_lens, 0)
        self.cu_seqlens_q = cu.to(torch.int32).to(device)
        self.seq_lens = kv_lens.to(torch.int32).to(device)


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
    (not repeated for GQA) -> (out [B, Lq, H, D], None)."""
    from sparse24.torch_ops import unified_attention

    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='sparse24' cannot return attention weights (output_attentions=True)")
    if dropout and module.training:
        raise ValueError("attn_implementation='sparse24' is inference-only: dropout > 0 in training mode is not supported")
    config = getattr(module, _CONFIG_ATTR, None) or SparsityConfig()  # unset: the 2:4 defaults
    backend = getattr(module, _BACKEND_ATTR, "auto")
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if causal is None:
        causal = True
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")

    batch, num_q_heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    k_cache, pages_per_row = _paged_view(key)
    v_cache, v_pages_per_row = _paged_view(value)
    if v_pages_per_row != pages_per_row:
        raise ValueError(f"key and value must share a layout, got strides {list(key.stride())} and {list(value.stride())}")
    layout = _Layout(attention_mask, kwargs.get("position_ids"), batch, q_len, kv_len, pages_per_row,
                     sliding=bool(window), device=query.device)

    q_rows = query.transpose(1, 2)  # [B, Lq, H, D]
    if layout.all_rows_real:
        q_packed = q_rows.reshape(batch * q_len, num_q_heads, head_dim)
    else:
        q_packed = q_rows[layout.row_mask]
    out_packed = unified_attention(
        q_packed, k_cache, v_cache, layout.block_table, layout.cu_seqlens_q, layout.seq_lens,
        config=config, causal=bool(causal), softmax_scale=scaling,
        window=int(window) if window else None, softcap=float(softcap) if softcap else None,
        max_seqlen_q=layout.max_seqlen_q, max_seqlen_k=layout.max_seqlen_k, backend=backend,
    )
    if layout.all_rows_real:
        return out_packed.view(batch, q_len, num_q_heads, head_dim), None
    out = torch.zeros(batch, q_len, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    out[layout.row_mask] = out_packed
    return out, None


def register(name: str = DEFAULT_NAME) -> str:
    """Register the attention function and its mask function under ``name``; returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name


def _attention_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    layers = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "is_causal") and type(module).__name__.endswith("Attention"):
            layers[int(idx)] = module
    if not layers:
        raise ValueError(f"model must have attention modules with a layer_idx (a transformers decoder), got {type(model).__name__}")
    return layers


def sparsify(model: torch.nn.Module, config, *, backend: str = "auto") -> torch.nn.Module:
    """Set the sparsity of every attention layer; returns the model.

    Args:
      model: a transformers model using ``attn_implementation="sparse24"``.
      config: a ``SparsityConfig`` for all layers, or ``{layer_index: SparsityConfig | None}``
        (None = dense; layers not named are dense).
      backend: "auto" | "triton" | "interpret" | "reference" for the attention op.
    """
    from sparse24.backends import BACKENDS

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    layers = _attention_modules(model)
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
