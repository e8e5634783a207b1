"""A compact Flax NNX Llama-family decoder whose attention runs through sparse24's paged cache.

RMSNorm, rotary embeddings (the rotate-half convention of Hugging Face's Llama), grouped-query
attention through :class:`sparse24.flax.PagedAttention` (so prefill, decode and mixed batches
all run ``sparse24.jax_ops.unified_attention`` over a paged KV cache held as module state),
a SwiGLU MLP and tied (or untied) embeddings. It loads the weights of a Hugging Face torch
Llama (e.g. SmolLM2-135M-Instruct from ``sparse24.models.load_model``)::

    import sparse24.models
    from sparse24 import SparsityConfig
    from sparse24.flax.llama import load_from_hf

    hf_model, tokenizer = sparse24.models.load_model()
    model = load_from_hf(hf_model, attention=SparsityConfig())          # 2:4 in every layer
    model.set_attention({5: SparsityConfig(), 6: SparsityConfig()})    # or in chosen layers
    ids = tokenizer("The capital of France is")["input_ids"]
    new_tokens = model.generate([ids], max_new_tokens=20)[0]

``attention`` is ``"dense"``, a :class:`~sparse24.SparsityConfig` for every layer,
a ``sparse24.plan.Plan`` (from ``sparse24 plan``), or
``{layer_index: SparsityConfig | None}`` (None and layers not named are dense), as in
``sparse24.hf.sparsify``.

Several devices: ``model.shard(jax.sharding.Mesh(devices, ("model",)))`` splits every layer's
attention heads and KV cache over the mesh axis "model" (``Llama.shard``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparse24.config import SparsityConfig
from sparse24.flax import PageAllocator, PagedAttention

__all__ = ["LlamaConfig", "Llama", "load_from_hf", "resolve_attention"]


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The shape of a Llama-family decoder (the fields of a HF ``LlamaConfig`` we use)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 8192
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf_config(cls, hf_config, **overrides) -> "LlamaConfig":
        """From a transformers config (``model.config``) or its dict; ``overrides`` replace fields
        (e.g. ``num_layers=2`` for a model made of the first two layers)."""
        get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, Mapping) else (
            lambda k, d=None: getattr(hf_config, k, d))
        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"only the SwiGLU (silu) MLP is implemented, got hidden_act={act!r}")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
        if rope_type not in (None, "default"):
            raise NotImplementedError(f"rope_type {rope_type!r} is not implemented (only the default RoPE)")
        theta = (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or get("rope_theta") or 10000.0
        num_q = get("num_attention_heads")
        hidden = get("hidden_size")
        eos = get("eos_token_id")
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        fields = dict(
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_q_heads=num_q,
            num_kv_heads=get("num_key_value_heads") or num_q,
            head_dim=get("head_dim") or hidden // num_q,
            rms_norm_eps=float(get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            tie_word_embeddings=bool(get("tie_word_embeddings", True)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
            max_position_embeddings=int(get("max_position_embeddings", 8192)),
            eos_token_id=eos,
        )
        fields.update(overrides)
        return cls(**fields)


def resolve_attention(attention, num_layers: int) -> list[SparsityConfig]:
    """``"dense"`` | SparsityConfig | ``{layer: SparsityConfig | None}`` | a
    ``sparse24.plan.Plan`` (``sparse24 plan``'s JSON, ``Plan.from_json``; made for a model with
    the same number of layers) -> one config per layer."""
    if hasattr(attention, "for_sparsify"):  # a sparse24.plan.Plan
        if attention.num_layers != num_layers:
            raise ValueError(f"the plan is for {attention.num_layers} attention layers, the model has {num_layers}")
        attention = attention.for_sparsify()
    if isinstance(attention, str):
        if attention != "dense":
            raise ValueError(f'attention must be "dense", a SparsityConfig or a dict, got {attention!r}')
        return [SparsityConfig.dense()] * num_layers
    if isinstance(attention, SparsityConfig):
        return [attention] * num_layers
    if isinstance(attention, Mapping):
        unknown = sorted(set(attention) - set(range(num_layers)), key=str)
        if unknown:
            raise ValueError(f"attention names layers {unknown} that the model does not have (layers 0..{num_layers - 1})")
        out = []
        for i in range(num_layers):
            c = attention.get(i)
            if c is not None and not isinstance(c, SparsityConfig):
                raise TypeError(f"attention[{i}] must be a SparsityConfig or None, got {type(c).__name__}")
            out.append(c if c is not None else SparsityConfig.dense())
        return out
    raise TypeError(
        'attention must be "dense", a SparsityConfig or a dict {layer_index: SparsityConfig | None}, '
        f"got {type(attention).__name__}"
    )


# ----------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 (as HF Llama)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin [T, head_dim] (float32) for integer positions [T], HF's layout (halves repeated)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [T, H, D]: ``x * cos + rotate_half(x) * sin`` with rotate_half = cat(-x2, x1)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


@dataclasses.dataclass(frozen=True)
class Batch:
    """Unified-attention metadata for one model step over packed tokens [T]."""

    positions: Any  # i32[T]
    slot_mapping: Any  # i32[T]
    block_table: Any  # i32[B, max_blocks]
    cu_seqlens_q: Any  # i32[B + 1]
    seq_lens: Any  # i32[B]


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, sparsity: SparsityConfig, *, num_blocks: int, block_size: int,
                 backend: str, dtype, param_dtype, rngs: nnx.Rngs):
        h, hq, hkv, d = cfg.hidden_size, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        lin = lambda i, o: nnx.Linear(i, o, use_bias=cfg.attention_bias, dtype=dtype,  # noqa: E731
                                      param_dtype=param_dtype, rngs=rngs)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = lin(h, hq * d), lin(h, hkv * d), lin(h, hkv * d), lin(hq * d, h)
        self.num_q_heads, self.num_kv_heads, self.head_dim, self.rope_theta = hq, hkv, d, cfg.rope_theta
        self.paged = PagedAttention(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, num_blocks=num_blocks,
                                    block_size=block_size, dtype=dtype, config=sparsity, backend=backend,
                                    softmax_scale=1.0 / math.sqrt(d))
        self.mesh, self.head_axis = None, None  # set by Llama.shard

    def __call__(self, x, batch: Batch, cos, sin):
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).reshape(t, self.num_q_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).reshape(t, self.num_kv_heads, self.head_dim)
        if self.mesh is None:
            out = self.paged(q, k, v, slot_mapping=batch.slot_mapping, block_table=batch.block_table,
                             cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens)
        else:
            out = self._paged_over_heads(q, k, v, batch)
        return self.o_proj(out.reshape(t, self.num_q_heads * self.head_dim))

    def _paged_over_heads(self, q, k, v, batch: Batch):
        """``self.paged`` (cache write, then unified attention) under ``jax.shard_map`` over
        ``head_axis``: with n devices on that axis each one holds q [T, H_q/n, D], k/v
        [T, H_kv/n, D] and its cache slice [num_blocks, block_size, H_kv/n, D] (contiguous head
        ranges, so every GQA group stays on one device); the metadata is replicated. The
        projections around it stay replicated (q/k/v and the output are pinned replicated), so
        every device computes them as one device would. Returns out [T, H_q, D]."""
        paged, mesh, axis = self.paged, self.mesh, self.head_axis
        replicated = jax.sharding.NamedSharding(mesh, P())
        q, k, v = (jax.lax.with_sharding_constraint(a, replicated) for a in (q, k, v))

        def per_device(q, k, v, k_cache, v_cache, slot_mapping, block_table, cu_seqlens_q, seq_lens):
            return paged.apply(q, k, v, k_cache, v_cache, slot_mapping=slot_mapping, block_table=block_table,
                               cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)

        heads, cache = P(None, axis, None), P(None, None, axis, None)
        out, k_cache, v_cache = jax.shard_map(
            per_device, mesh=mesh, in_specs=(heads, heads, heads, cache, cache, P(), P(), P(), P()),
            out_specs=(heads, cache, cache),
        )(q, k, v, paged.k_cache[...], paged.v_cache[...], batch.slot_mapping, batch.block_table,
          batch.cu_seqlens_q, batch.seq_lens)
        paged.k_cache[...] = k_cache
        paged.v_cache[...] = v_cache
        return jax.lax.with_sharding_constraint(out, replicated)


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = lambda i, o: nnx.Linear(i, o, use_bias=cfg.mlp_bias, dtype=dtype,  # noqa: E731
                                      param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, sparsity: SparsityConfig, *, num_blocks, block_size, backend, dtype,
                 param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, sparsity, num_blocks=num_blocks, block_size=block_size, backend=backend,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, batch: Batch, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------- model


class Llama(nnx.Module):
    """Llama-family causal LM over a paged KV cache (``num_blocks`` pages of ``block_size`` slots
    per layer; grown on demand by ``__call__`` and ``generate``).

    Args:
      config: a :class:`LlamaConfig`.
      attention: ``"dense"`` | SparsityConfig | ``{layer: SparsityConfig | None}``.
      backend: the attention backend (``sparse24.jax_ops``): "auto" (the jax-triton kernel on a
        GPU, the jax.numpy reference on CPU) | "reference" | "interpret" | "triton".
      dtype / param_dtype: computation / parameter dtype (the KV cache uses ``dtype``).

    Runs on one device unless :meth:`shard` spreads its attention heads over a mesh.
    """

    def __init__(self, config: LlamaConfig, *, attention="dense", backend: str = "auto", num_blocks: int = 64,
                 block_size: int = 16, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.block_size = int(block_size)
        self.dtype = dtype
        sparsity = resolve_attention(attention, config.num_layers)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(config, sparsity[i], num_blocks=num_blocks, block_size=block_size, backend=backend,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i in range(config.num_layers)
        ])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if config.tie_word_embeddings else nnx.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mesh, self.head_axis = None, None  # set by shard()

    # --- configuration

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0].self_attn.paged.k_cache.get_value().shape[0])

    def layer_configs(self) -> list[SparsityConfig]:
        """The sparsity each layer runs with."""
        return [layer.self_attn.paged.config for layer in self.layers]

    def set_attention(self, attention, *, backend: str | None = None) -> "Llama":
        """Swap the sparsity (``"dense"`` | SparsityConfig | ``{layer: ...}``) and optionally the
        backend of every layer, keeping the weights; returns the model."""
        for layer, cfg in zip(self.layers, resolve_attention(attention, self.config.num_layers)):
            layer.self_attn.paged.config = cfg
            if backend is not None:
                layer.self_attn.paged.backend = backend
        return self

    def shard(self, mesh: jax.sharding.Mesh, *, head_axis: str = "model") -> "Llama":
        """Spread the attention heads over the devices of ``mesh``'s axis ``head_axis``; returns
        the model, sharded from then on (every later call, ``step``, ``generate``, ``reserve``).

        With n devices on ``head_axis`` (n must divide ``num_kv_heads``), every layer's cache
        write and attention run under ``jax.shard_map``: device i holds query heads
        ``[i*H_q/n, (i+1)*H_q/n)`` of q [T, H_q, D] and KV heads ``[i*H_kv/n, (i+1)*H_kv/n)`` of
        the caches [num_blocks, block_size, H_kv, D] (placed with a ``NamedSharding`` over their
        KV-head axis; whole GQA groups per device); the metadata (block table, lengths, slots)
        is replicated. That is how a per-head kernel that XLA cannot partition (the jax-triton
        custom call, the interpreter's host callback) runs under a mesh, on every backend.

        Everything else (the weights, embeddings, norms, projections, MLP and logits) stays
        replicated over the whole mesh, the simplest correct choice: each device computes them
        whole, as one device would. Axes of ``mesh`` other than ``head_axis`` replicate
        everything too: the packed tokens of :meth:`step` share one page pool, so they are
        not split over a batch axis.

        Every head's attention is the single-device computation on the same inputs. The
        results equal the single-device model's up to float32 rounding: XLA compiles the
        elementwise code around the attention (RoPE) of the partitioned program differently,
        which can move values by an ulp (measured on CPU: logits within 1e-6 of their largest
        magnitude, as between the same model jitted and run eagerly; greedy tokens equal).

        Args:
          mesh: a ``jax.sharding.Mesh``.
          head_axis: the name of the mesh axis the heads are split over.
        """
        if not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if not isinstance(head_axis, str) or head_axis not in mesh.axis_names:
            raise ValueError(f"head_axis must name an axis of the mesh (one of {list(mesh.axis_names)}), "
                             f"got {head_axis!r}")
        size = mesh.shape[head_axis]
        if self.config.num_kv_heads % size:
            raise ValueError(f"the mesh's head_axis {head_axis!r} has {size} devices, which must divide "
                             f"num_kv_heads ({self.config.num_kv_heads})")
        self.mesh, self.head_axis = mesh, head_axis
        for layer in self.layers:
            layer.self_attn.mesh, layer.self_attn.head_axis = mesh, head_axis
        replicated = jax.sharding.NamedSharding(mesh, P())
        for _, node in nnx.iter_graph(self):
            if isinstance(node, nnx.Variable) and not isinstance(node, nnx.Cache):
                node.set_value(jax.device_put(node.get_value(), replicated))
        self._place_caches()
        return self

    def _place_caches(self) -> None:
        """Put every layer's K/V cache on the mesh, split over its KV-head axis (no-op unsharded)."""
        if self.mesh is None:
            return
        sharding = jax.sharding.NamedSharding(self.mesh, P(None, None, self.head_axis, None))
        for layer in self.layers:
            for var in (layer.self_attn.paged.k_cache, layer.self_attn.paged.v_cache):
                var.set_value(jax.device_put(var.get_value(), sharding))

    def reserve(self, num_blocks: int) -> None:
        """Grow every layer's paged cache to at least ``num_blocks`` pages (contents kept)."""
        have = self.num_blocks
        if num_blocks <= have:
            return
        for layer in self.layers:
            paged = layer.self_attn.paged
            for name in ("k_cache", "v_cache"):
                var = getattr(paged, name)
                old = var.get_value()
                var.set_value(jnp.concatenate([old, jnp.zeros((num_blocks - have,) + old.shape[1:], old.dtype)]))
        self._place_caches()

    # --- forward

    def step(self, tokens, *, slot_mapping, block_table, cu_seqlens_q, seq_lens, positions=None, logits_at=None):
        """One unified step over packed tokens: prefill chunks, decode tokens, or both.

        tokens i32[T]: sequence ``b`` owns ``tokens[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``, its last
        ``q_len`` tokens (``seq_lens[b]`` counts its keys including them). ``slot_mapping`` i32[T]:
        each token's cache slot (``page * block_size + offset``); ``block_table`` i32[B, max_blocks]
        its pages. ``positions`` default ``seq_lens[b] - q_len + i``. ``logits_at`` i32[N]: return
        logits only for these token rows (default all). Writes the tokens' K/V into the cache.
        Returns logits float32 [T or N, vocab].
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        cu = jnp.asarray(cu_seqlens_q, jnp.int32)
        seq_lens = jnp.asarray(seq_lens, jnp.int32)
        if positions is None:
            t = jnp.arange(tokens.shape[0], dtype=jnp.int32)
            seq = jnp.clip(jnp.searchsorted(cu, t, side="right") - 1, 0, seq_lens.shape[0] - 1)
            positions = seq_lens[seq] - (cu[seq + 1] - cu[seq]) + (t - cu[seq])
        batch = Batch(jnp.asarray(positions, jnp.int32), jnp.asarray(slot_mapping, jnp.int32),
                      jnp.asarray(block_table, jnp.int32), cu, seq_lens)
        cos, sin = rope_cos_sin(batch.positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, batch, cos, sin)
        if logits_at is not None:
            x = x[jnp.asarray(logits_at, jnp.int32)]
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)
        return logits.astype(jnp.float32)

    def __call__(self, tokens, lengths=None):
        """Full-sequence logits: a fresh prefill of ``tokens`` i32[B, S] (right-padded; row ``b``'s
        real tokens are the first ``lengths[b]``, default S) -> float32 [B, S, vocab], zeros past
        each row's length. Overwrites the start of the paged cache (pages ``b*P .. (b+1)*P-1`` hold
        row ``b``, P = ceil(S / block_size)). Jit it with ``nnx.jit``.
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        b, s = tokens.shape
        pages = -(-s // self.block_size)
        if not isinstance(tokens, jax.core.Tracer):
            self.reserve(b * pages)
        elif b * pages > self.num_blocks:
            raise ValueError(f"the cache holds {self.num_blocks} pages, {b * pages} needed: call reserve() before jit")
        # Each row is one sequence of S queries over S keys: causality keeps the padding (at
        # the end of a row) out of every real token's keys, so the real rows are exact.
        block_table = jnp.arange(b * pages, dtype=jnp.int32).reshape(b, pages)
        offsets = jnp.arange(s, dtype=jnp.int32)
        slots = (block_table[:, offsets // self.block_size] * self.block_size + offsets % self.block_size).reshape(-1)
        logits = self.step(
            tokens.reshape(-1), slot_mapping=slots, block_table=block_table,
            cu_seqlens_q=jnp.arange(b + 1, dtype=jnp.int32) * s, seq_lens=jnp.full((b,), s, jnp.int32),
            positions=jnp.tile(offsets, b),
        ).reshape(b, s, -1)
        if lengths is not None:
            valid = offsets[None, :] < jnp.asarray(lengths, jnp.int32)[:, None]
            logits = jnp.where(valid[..., None], logits, 0.0)
        return logits

    def generate(self, prompt_tokens: list[list[int]], max_new_tokens: int, *,
                 eos_token_id: int | None = None) -> list[list[int]]:
        """Greedy decoding with the paged cache. Returns the new tokens of each prompt (up to
        ``max_new_tokens``; a sequence stops after ``eos_token_id`` if given).

        One unified call prefills every prompt (variable lengths packed together), then each
        decode step is one unified call for all sequences (each at its own length), run as a
        jitted ``lax.scan`` over the steps.
        """
        prompts = [list(map(int, p)) for p in prompt_tokens]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompt_tokens must be a non-empty list of non-empty token lists")
        if max_new_tokens < 1:
            return [[] for _ in prompts]
        lens = np.array([len(p) for p in prompts], np.int32)
        num = len(prompts)
        # every key a sequence will ever hold: its prompt and all generated tokens but the last
        total = lens + max_new_tokens - 1
        self.reserve(int(sum(-(-int(n) // self.block_size) for n in total)))
        alloc = PageAllocator(self.num_blocks, self.block_size)
        slots = [alloc.allocate(i, int(total[i])) for i in range(num)]
        block_table = jnp.asarray(alloc.block_table(list(range(num))))
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        first = _prefill(self, jnp.asarray(np.concatenate(prompts), jnp.int32),
                         jnp.asarray(np.concatenate([s[:n] for s, n in zip(slots, lens)]), jnp.int32),
                         block_table, jnp.asarray(cu), jnp.asarray(lens), jnp.asarray(cu[1:] - 1))
        steps = max_new_tokens - 1
        if steps:
            decode_slots = np.stack([np.asarray(s[n:], np.int32) for s, n in zip(slots, lens)])  # [B, steps]
            rest = _decode(self, first, jnp.asarray(decode_slots.T), block_table, jnp.asarray(lens))  # [steps, B]
            out = np.concatenate([np.asarray(first)[None], np.asarray(rest)], axis=0).T
        else:
            out = np.asarray(first)[:, None]
        result = []
        for row in out.tolist():
            if eos_token_id is not None and eos_token_id in row:
                row = row[: row.index(eos_token_id) + 1]
            result.append(row)
        return result


@nnx.jit
def _prefill(model: Llama, tokens, slot_mapping, block_table, cu, seq_lens, last):
    logits = model.step(tokens, slot_mapping=slot_mapping, block_table=block_table, cu_seqlens_q=cu,
                        seq_lens=seq_lens, logits_at=last)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@nnx.jit
def _decode(model: Llama, first, slots, block_table, prompt_lens):
    """slots i32[steps, B]: step ``s`` feeds token ``s`` of each sequence at position
    ``prompt_len + s``. Returns the greedy tokens i32[steps, B]."""
    num = first.shape[0]
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)
    cu = jnp.arange(num + 1, dtype=jnp.int32)

    def body(carry, xs):
        cache, token = carry
        step_slots, s = xs
        m = nnx.merge(graphdef, cache, rest)
        logits = m.step(token, slot_mapping=step_slots, block_table=block_table, cu_seqlens_q=cu,
                        seq_lens=prompt_lens + s + 1)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (nnx.state(m, nnx.Cache), token), token

    (cache, _), tokens = jax.lax.scan(body, (cache, first), (slots, jnp.arange(slots.shape[0], dtype=jnp.int32)))
    nnx.update(model, cache)
    return tokens


# ----------------------------------------------------------------------------- loading


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch
        x = x.detach().to("cpu")
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def load_from_hf(hf_model_or_state_dict, config: LlamaConfig | None = None, *, attention="dense",
                 backend: str = "auto", num_blocks: int = 64, block_size: int = 16, dtype=jnp.float32,
                 param_dtype=jnp.float32) -> Llama:
    """A :class:`Llama` with the weights of a Hugging Face torch Llama-family model.

    Args:
      hf_model_or_state_dict: a transformers ``LlamaForCausalLM`` (e.g. from
        ``sparse24.models.load_model()``) or its ``state_dict()`` (torch tensors or arrays).
      config: default ``LlamaConfig.from_hf_config(model.config)`` (required for a state dict).
        A config with fewer layers loads the first ``num_layers`` layers.
      attention, backend, num_blocks, block_size, dtype, param_dtype: as in :class:`Llama`.
    """
    if hasattr(hf_model_or_state_dict, "state_dict"):
        if config is None:
            config = LlamaConfig.from_hf_config(hf_model_or_state_dict.config)
        state = hf_model_or_state_dict.state_dict()
    else:
        if config is None:
            raise ValueError("config is required when loading from a state dict")
        state = dict(hf_model_or_state_dict)
    prefix = "model." if any(k.startswith("model.") for k in state) else ""

    def get(name):
        key = prefix + name
        if key not in state:
            raise KeyError(f"the state dict has no {key!r} (is it a Llama-family decoder?)")
        return _to_numpy(state[key])

    # Built abstractly (no random initialisation of ~all the parameters), then filled in.
    model = nnx.eval_shape(lambda: Llama(config, attention=attention, backend=backend, num_blocks=num_blocks,
                                         block_size=block_size, dtype=dtype, param_dtype=param_dtype,
                                         rngs=nnx.Rngs(0)))

    def put(param, value, transpose=False):
        value = value.T if transpose else value
        want = tuple(param.get_value().shape)
        if want != value.shape:
            raise ValueError(f"shape mismatch: {value.shape} into a parameter of shape {want}")
        param.set_value(jnp.asarray(value, param_dtype))

    def linear(module: nnx.Linear, name: str):
        put(module.kernel, get(name + ".weight"), transpose=True)
        if module.bias is not None:
            put(module.bias, get(name + ".bias"))

    put(model.embed_tokens.embedding, get("embed_tokens.weight"))
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        put(layer.input_layernorm.weight, get(p + "input_layernorm.weight"))
        put(layer.post_attention_layernorm.weight, get(p + "post_attention_layernorm.weight"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(getattr(layer.self_attn, proj), p + "self_attn." + proj)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear(getattr(layer.mlp, proj), p + "mlp." + proj)
    put(model.norm.weight, get("norm.weight"))
    if model.lm_head is not None:
        key = "lm_head.weight"
        if key not in state:
            raise KeyError("the config has untied embeddings but the state dict has no 'lm_head.weight'")
        put(model.lm_head.kernel, _to_numpy(state[key]), transpose=True)
    for _, node in nnx.iter_graph(model):  # the KV caches (and anything else left abstract): zeros
        if isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.ShapeDtypeStruct):
            if not isinstance(node, nnx.Cache):
                raise RuntimeError(f"load_from_hf left a {type(node).__name__} unset")
            value = node.get_value()
            node.set_value(jnp.zeros(value.shape, value.dtype))
    return model
