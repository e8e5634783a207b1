"""The Hugging Face backend on tiny random-weight models (no download).

Runs the op with backend="reference" (the chunked torch path of the spec) for speed, plus
a few checks through the Triton kernel (interpreter on CPU, compiled on a GPU).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse24.hf  # noqa: E402  (registers attn_implementation="sparse24")
import sparse24.layouts  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402
from sparse24.reference import keep_mask_reference, unified_attention_reference  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask  # noqa: E402

TWO_FOUR = SparsityConfig(dense_recent_tokens=0)  # sparse everywhere: every decision shows


def eager_nm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A hand-written eager N:M attention: the kept mask from sparse24.reference, then softmax."""
    config = getattr(module, "sparse24_config", None) or SparsityConfig()
    batch, heads, q_len, head_dim = query.shape
    kv_len = key.shape[2]
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    scale = scaling if scaling is not None else head_dim ** -0.5
    out = torch.zeros(batch, q_len, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        real = attention_mask[b].bool() if attention_mask is not None else torch.ones(kv_len, dtype=torch.bool)
        keys = key[b].transpose(0, 1)[real].double()  # [n, H_kv, D]
        vals = value[b].transpose(0, 1)[real].double()
        n = keys.shape[0]
        rows = [i for i in range(q_len) if real[kv_len - q_len + i]]
        if not rows:
            continue
        q_rows = query[b].transpose(0, 1)[rows].double()  # [q, H, D]
        kept = keep_mask_reference(
            q_rows, keys[None], torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, len(rows)], dtype=torch.int32),
            torch.tensor([n], dtype=torch.int32), config=config, softmax_scale=scale, window=window, softcap=softcap,
        )[0]  # [H, q, n]
        group = heads // keys.shape[1]
        k_rep = keys.repeat_interleave(group, dim=1)  # [n, H, D]
        v_rep = vals.repeat_interleave(group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q_rows, k_rep) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~kept, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[b, rows] = torch.einsum("hqk,khd->qhd", p, v_rep)
    return out.to(query.dtype), None


AttentionInterface.register("eager_nm", eager_nm_attention)
AttentionMaskInterface.register("eager_nm", flash_attention_mask)


def tiny_model(kind: str = "llama", layers: int = 2):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=16, sliding_window=8, attn_logit_softcapping=20.0,
                                           final_logit_softcapping=None, query_pre_attn_scalar=16)
        model = transformers.Gemma2ForCausalLM(config)
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=8)
        model = transformers.MistralForCausalLM(config)
    else:
        raise ValueError(kind)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model.eval()


def logits_with(model, implementation, ids, config=None, backend="reference", **kwargs):
    model.set_attn_implementation(implementation)
    if config is not None:
        sparse24.hf.sparsify(model, config, backend=backend)
    with torch.no_grad():
        return model(ids, **kwargs).logits


IDS = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "mistral"])
def test_dense_equals_sdpa_and_eager(kind):
    model = tiny_model(kind)
    want = logits_with(model, "eager", IDS)
    got = logits_with(model, "sparse24", IDS, config=SparsityConfig.dense())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    if kind != "gemma2":  # sdpa has no softcap
        torch.testing.assert_close(got, logits_with(model, "sdpa", IDS), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "mistral"])
@pytest.mark.parametrize("config", [TWO_FOUR, SparsityConfig(n=1, m=8, dense_sink_tokens=2, dense_recent_tokens=3)],
                         ids=["2:4", "1:8-sink-recent"])
def test_nm_equals_hand_written_eager(kind, config):
    model = tiny_model(kind)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config)  # eager_nm reads the layers' sparse24_config too
    want = logits_with(model, "eager_nm", IDS)
    got = logits_with(model, "sparse24", IDS, config=config)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    dense = logits_with(model, "sparse24", IDS, config=SparsityConfig.dense())
    assert (got - dense).abs().max() > 1e-3  # the sparsity did something


def test_kernel_backend_equals_reference_backend(kernel_backend):
    backend, device = kernel_backend
    model = tiny_model("llama").to(device)
    ids = IDS.to(device)
    got = logits_with(model, "sparse24", ids, config=TWO_FOUR, backend=backend)
    want = logits_with(model, "sparse24", ids, config=TWO_FOUR, backend="reference")
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(padding_side):
    model = tiny_model("llama")
    lengths = [23, 15, 9]
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        sl = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
        ids[b, sl] = p
        mask[b, sl] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    batched = logits_with(model, "sparse24", ids, config=TWO_FOUR, attention_mask=mask, position_ids=position_ids)
    for b, p in enumerate(prompts):
        alone = logits_with(model, "sparse24", p[None], config=TWO_FOUR)[0]
        sl = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
        torch.testing.assert_close(batched[b, sl], alone, atol=2e-5, rtol=2e-5)


def test_left_padded_generation_equals_per_prompt_generation():
    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in (12, 7)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, 12 - len(p):] = p
        mask[b, 12 - len(p):] = 1
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for b, p in enumerate(prompts):
            alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert torch.equal(batched[b, 12:], alone[0, len(p):])


def test_chunked_prefill_equals_one_shot():
    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    ids = IDS[:1]
    with torch.no_grad():
        full = model(ids).logits
        cache = transformers.DynamicCache(config=model.config)
        first = model(ids[:, :10], past_key_values=cache, use_cache=True).logits
        second = model(ids[:, 10:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=2e-5, rtol=2e-5)


SINK_M8 = SparsityConfig(n=1, m=8, dense_sink_tokens=2, dense_recent_tokens=3)


@pytest.mark.parametrize("kind,config,new_tokens", [("llama", TWO_FOUR, 14), ("mistral", TWO_FOUR, 14),
                                                    ("mistral", SINK_M8, 24)],
                         ids=["llama", "mistral", "mistral-sink-1:8"])
def test_greedy_decode_keeps_what_prefill_keeps(kind, config, new_tokens):
    """Token-by-token decode (with the cache) and one prefill over the same tokens give the
    same logits: the same keys are kept (also on a sliding-window layer whose cache drops
    old keys: 22 of 30 with the window of 8, more than sink + m, so the layout's bounded
    count of dropped keys is exercised)."""
    model = tiny_model(kind)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config)
    with torch.no_grad():
        generated = model.generate(IDS[:1, :6], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        step_logits = model.generate(IDS[:1, :6], max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                     output_logits=True, return_dict_in_generate=True).logits
        full = model(generated).logits
    for t, logits in enumerate(step_logits):
        torch.testing.assert_close(logits[0], full[0, 5 + t], atol=2e-5, rtol=2e-5)


def test_per_layer_sparsify_and_dense():
    model = tiny_model("llama", layers=3)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, {1: TWO_FOUR})
    assert sparse24.hf.layer_configs(model) == {0: SparsityConfig.dense(), 1: TWO_FOUR, 2: SparsityConfig.dense()}
    with torch.no_grad():
        one_layer = model(IDS).logits
        sparse24.hf.dense(model)
        dense = model(IDS).logits
        sparse24.hf.sparsify(model, TWO_FOUR)
        all_layers = model(IDS).logits
    assert 0 < (one_layer - dense).abs().max() < (all_layers - dense).abs().max()
    with pytest.raises(ValueError, match=r"^config names layers \[7\]"):
        sparse24.hf.sparsify(model, {7: TWO_FOUR})
    with pytest.raises(TypeError, match=r"^config must be a SparsityConfig or a dict"):
        sparse24.hf.sparsify(model, "2:4")


def test_refuses_what_it_cannot_do():
    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    mask = torch.ones(2, 23, dtype=torch.long)
    mask[0, 5] = 0  # a hole in the middle of a row
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous"):
        model(IDS, attention_mask=mask)
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 3, 16)
    kv = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="4D mask"):
        sparse24.hf.attention_forward(attn, q, kv, kv, torch.zeros(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="output_attentions"):
        sparse24.hf.attention_forward(attn, q, kv, kv, None, output_attentions=True)


def left_padded_batch(lengths=(12, 7), seed=10):
    width = max(lengths)
    prompts = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed + n)) for n in lengths]
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_static_cache_generate_equals_dynamic(kind, config):
    """generate(cache_implementation="static"): key/value are the whole static buffer and the
    slot mask marks its unwritten tail; same greedy tokens as the dynamic cache, for a
    left-padded batch and a single prompt (mistral: a static sliding-window layer too)."""
    model = tiny_model(kind)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config, backend="reference")
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for i, m in ((ids, mask), (ids[:1], mask[:1])):
            dynamic = model.generate(i, attention_mask=m, **kw)
            static = model.generate(i, attention_mask=m, cache_implementation="static", **kw)
            assert torch.equal(static, dynamic)


def test_static_cache_forward_without_attention_mask():
    """A StaticCache driven by hand without an attention_mask (the mask function sees the
    cache's fill level only as a device tensor): prefill + decode logits equal the dynamic
    cache's."""
    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    ids = IDS[:, :9]
    with torch.no_grad():
        got, want = [], []
        for cache, out in ((transformers.StaticCache(config=model.config, max_cache_len=32), got),
                           (transformers.DynamicCache(config=model.config), want)):
            out.append(model(ids[:, :6], past_key_values=cache, use_cache=True).logits)
            for t in range(6, 9):
                out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=2e-5, rtol=2e-5)


def count_layout_builds(monkeypatch):
    builds = []
    build = sparse24.layouts.padding_mask_layout_torch

    def counting(*args, **kwargs):
        builds.append(args[2])  # q_len
        return build(*args, **kwargs)

    fused = sparse24.hf._fused_decode_step

    def counting_fused(*args, **kwargs):
        builds.append(1)  # a decode layout in one launch
        return fused(*args, **kwargs)

    monkeypatch.setattr(sparse24.layouts, "padding_mask_layout_torch", counting)
    monkeypatch.setattr(sparse24.hf, "_fused_decode_step", counting_fused)
    return builds


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_layout_built_once_per_forward(monkeypatch, cache):
    """All layers of one forward share one layout (two for a hybrid sliding/full model)."""
    builds = count_layout_builds(monkeypatch)
    model = tiny_model("llama", layers=4)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert builds == [12]
        builds.clear()
        model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                       cache_implementation=cache if cache == "static" else None)
    assert builds == [12, 1, 1, 1, 1]  # a prefill and four decode forwards
    builds.clear()
    gemma = tiny_model("gemma2", layers=4)  # sliding, full, sliding, full
    gemma.set_attn_implementation("sparse24")
    with torch.no_grad():
        gemma(ids, attention_mask=mask)
    assert builds == [12, 12]


SYNCS = {"item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "argwhere", "unique",
         "__bool__", "__int__", "__float__", "__index__", "repeat_interleave"}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every tensor operation that reads a tensor's values on the host (a sync on a
    GPU): .item()/.tolist()/.cpu()/.numpy(), bool()/int(), nonzero, boolean-mask indexing,
    .to("cpu")."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        indices = index if isinstance(index, tuple) else (index,)
        if name in SYNCS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices) or (
                name == "to" and any(str(a).startswith("cpu") for a in (*args[1:], kwargs.get("device")))):
            self.reads.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_no_host_read_per_layer(monkeypatch, cache):
    """Inside the attention function (the op itself excluded): a padded prefill reads the
    host once per forward (the holes / all-real flags, first layer only), a decode step
    never."""
    import sparse24.torch_ops

    reads = HostReads()
    op, plan_op = sparse24.torch_ops.unified_attention, sparse24.torch_ops.plan_unified_attention

    def op_unwatched(*args, **kwargs):  # the op's own checks and backends are not the adapter's
        assert kwargs["max_seqlen_q"] is not None and kwargs["max_seqlen_k"] is not None
        with torch.overrides._pop_mode_temporarily():
            return op(*args, **kwargs)

    def plan_unwatched(*args, **kwargs):
        assert kwargs["max_seqlen_q"] is not None and kwargs["max_seqlen_k"] is not None
        with torch.overrides._pop_mode_temporarily():
            plan = plan_op(*args, **kwargs)

        def run(*a, **k):
            with torch.overrides._pop_mode_temporarily():
                return plan(*a, **k)
        return run

    forward = sparse24.hf.attention_forward

    def watched(*args, **kwargs):
        with reads:
            return forward(*args, **kwargs)

    monkeypatch.setattr(sparse24.torch_ops, "unified_attention", op_unwatched)
    monkeypatch.setattr(sparse24.torch_ops, "plan_unified_attention", plan_unwatched)
    monkeypatch.setattr(sparse24.hf, "attention_forward", watched)
    sparse24.hf._PLANS.clear()
    sparse24.hf.register("sparse24_watched")
    model = tiny_model("mistral", layers=3)  # sliding-window layers: position_ids are read on the device
    model.set_attn_implementation("sparse24_watched")
    sparse24.hf.sparsify(model, TWO_FOUR)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        past = (transformers.StaticCache(config=model.config, max_cache_len=40) if cache == "static"
                else transformers.DynamicCache(config=model.config))
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=mask, position_ids=position_ids, past_key_values=past, use_cache=True).logits
        assert reads.reads == ["tolist"]
        for _ in range(10):  # past the window of 8
            reads.reads.clear()
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            position_ids = position_ids[:, -1:] + 1
            logits = model(logits[:, -1:].argmax(-1), attention_mask=mask, position_ids=position_ids,
                           past_key_values=past, use_cache=True).logits
            assert reads.reads == []


@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_decode_rows_are_views_with_one_fixup(config):
    """A decode step (q_len = 1) packs and unpacks by views: each row's query attends over its
    real keys (left padding, a longer real range), a row whose query slot is padding (right
    padding) outputs zeros and a row with holes NaN, the other rows exact, all without a host read,
    and a second layer of the same forward reuses the layout and the checked plan."""

    class Layer(torch.nn.Module):
        is_causal = True

    layer = Layer()
    layer.sparse24_config, layer.sparse24_backend = config, "reference"
    torch.manual_seed(0)
    batch, kv_len, heads, kv_heads, dim = 4, 11, 4, 2, 8
    q = torch.randn(batch, heads, 1, dim)
    k, v = torch.randn(batch, kv_heads, kv_len, dim), torch.randn(batch, kv_heads, kv_len, dim)
    mask = torch.ones(batch, kv_len, dtype=torch.long)
    mask[1, :4] = 0  # left padding: 7 real keys
    mask[2, -2:] = 0  # right padding: the query's slot is padding
    mask[3, 5] = 0  # holes
    sparse24.hf._PLANS.clear()
    out, _ = sparse24.hf.attention_forward(layer, q, k, v, mask, scaling=0.3)
    assert out.shape == (batch, 1, heads, dim)
    for b, start in ((0, 0), (1, 4)):  # each row alone, in float64
        n = kv_len - start
        kc = k[b, :, start:].transpose(0, 1)[None].double()  # [1, n, H_kv, D]
        vc = v[b, :, start:].transpose(0, 1)[None].double()
        want = unified_attention_reference(
            q[b].transpose(0, 1).double(), kc, vc, torch.zeros(1, 1, dtype=torch.int32),
            torch.tensor([0, 1], dtype=torch.int32), torch.tensor([n], dtype=torch.int32), config=config,
            softmax_scale=0.3,
        )  # [1, H, D]
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)
    assert (out[2] == 0).all()
    assert torch.isnan(out[3]).all()
    plans = dict(sparse24.hf._PLANS.entries)
    again, _ = sparse24.hf.attention_forward(layer, q, k, v, mask, scaling=0.3)  # the next layer
    assert sparse24.hf._PLANS.entries == plans
    torch.testing.assert_close(again, out, equal_nan=True)


def _wide_rows(width):
    rows = [[1] * width for _ in range(5)]
    rows[1][: width - 700] = [0] * (width - 700)  # left padding across chunks of 1024 slots
    rows[2][1500] = 0  # a hole in the second chunk
    rows[3][width - 1] = 0  # right padding: the query slot is padding
    rows[4] = [0] * width  # nothing real
    return rows


FUSED_CASES = {
    "bool": ([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1], [1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0],
              [0, 0, 0, 0, 0, 0]], torch.bool, 9),
    "static int8": ([[0, 1, 1, 1, -1, -1], [1, 1, 1, 1, 1, -1], [1, 0, 1, 1, -1, -1], [1, 1, 1, 0, -1, -1],
                     [-1, -1, -1, -1, -1, -1]], torch.int8, 6),
    "long": ([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], torch.long, 4),
    "float": ([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], torch.float32, 5),
    "wide bool": (_wide_rows(2500), torch.bool, 2600),
}


@pytest.mark.parametrize("case", FUSED_CASES, ids=list(FUSED_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_decode_layout_equals_the_torch_layout(case, dtype, kernel_backend):
    """The one-launch decode layout (``torch_ops.decode_mask_layout``) gives the block table,
    lengths and fix-up of ``padding_mask_layout_torch`` + ``_decode_step`` for left / right
    padding, holes, rows with nothing real, StaticCache tails, masks wider than a chunk."""
    from sparse24.torch_ops import decode_mask_layout

    _, device = kernel_backend
    codes, mask_dtype, kv_len = FUSED_CASES[case]
    mask = torch.tensor(codes).to(mask_dtype).to(device)
    batch, pages_per_row = mask.shape[0], kv_len + 3
    want = sparse24.hf._decode_step(
        sparse24.layouts.padding_mask_layout_torch(mask, batch, 1, kv_len, pages_per_row=pages_per_row, device=device),
        batch, dtype)
    block_table, seq_lens, keep, fill = decode_mask_layout(mask, kv_len=kv_len, pages_per_row=pages_per_row,
                                                           out_dtype=dtype)
    assert block_table.dtype == seq_lens.dtype == torch.int32 and keep.dtype == torch.bool and fill.dtype == dtype
    torch.testing.assert_close(block_table, want.layout.block_table, rtol=0, atol=0)
    torch.testing.assert_close(seq_lens, want.layout.seq_lens, rtol=0, atol=0)
    assert torch.equal(keep, want.keep.flatten())
    torch.testing.assert_close(fill, want.fill.flatten(), rtol=0, atol=0, equal_nan=True)
    assert keep.any() and not keep.all()  # every case has rows of both kinds
    # with its launch (for the next step's previous=): the same outputs; a compiled launch on a GPU only
    again, launch = decode_mask_layout(mask, kv_len=kv_len, pages_per_row=pages_per_row, out_dtype=dtype,
                                       with_launch=True)
    for got, expected in zip(again, (block_table, seq_lens, keep, fill)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    assert (launch is None) == (kernel_backend[0] == "interpret")
    # a wider table (what sparse24.hf asks for: a multiple of 16 columns): the same first
    # kv_len columns, then each row's last page repeated (valid pages, never read)
    wide = decode_mask_layout(mask, kv_len=kv_len, pages_per_row=pages_per_row, out_dtype=dtype, width=kv_len + 21)[0]
    assert wide.shape == (batch, kv_len + 21)
    assert torch.equal(wide[:, :kv_len], block_table)
    assert torch.equal(wide[:, kv_len:], block_table[:, -1:].expand(batch, 21))


def test_decode_mask_layout_refuses_a_bad_mask():
    from sparse24.torch_ops import decode_mask_layout

    with pytest.raises(ValueError, match=r"mask must be a tensor \[batch, L\] with 1 <= L <= kv_len = 4, got \[2, 5\]"):
        decode_mask_layout(torch.ones(2, 5, dtype=torch.bool), kv_len=4, pages_per_row=4, out_dtype=torch.float32)
    for width in (3, 4.0, True):
        with pytest.raises(ValueError, match=r"width must be None or an int >= max\(kv_len, 1\) = 4"):
            decode_mask_layout(torch.ones(2, 4, dtype=torch.bool), kv_len=4, pages_per_row=4, out_dtype=torch.float32,
                               width=width)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"previous must be None or the launch of an earlier with_launch call, got tuple"):
        decode_mask_layout(mask, kv_len=4, pages_per_row=4, out_dtype=torch.float32, previous=())
    with pytest.raises(TypeError, match=r"with_launch must be a bool, got int"):
        decode_mask_layout(mask, kv_len=4, pages_per_row=4, out_dtype=torch.float32, with_launch=1)


def test_eager_decode_builds_its_layout_in_one_launch(monkeypatch, kernel_backend):
    """A decode step of a model on the kernels builds the layout once per forward with the
    fused launch; the reference backend keeps to torch."""
    from sparse24 import torch_ops

    calls = []
    real = torch_ops.decode_mask_layout
    monkeypatch.setattr(torch_ops, "decode_mask_layout", lambda *a, **k: calls.append(1) or real(*a, **k))
    device = kernel_backend[1]
    for backend, launches in ((kernel_backend[0], 1), ("reference", 0)):
        model = tiny_model("llama").to(device)
        model.set_attn_implementation("sparse24")
        sparse24.hf.sparsify(model, TWO_FOUR, backend=backend)
        ids, mask = (t.to(device) for t in left_padded_batch())
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            calls.clear()
            model(ids[:, -1:], attention_mask=torch.cat([mask, mask.new_ones(2, 1)], 1),
                  past_key_values=cache, use_cache=True)
        assert len(calls) == launches, backend


def test_decode_kv_splits_changes_the_launch_not_the_result(monkeypatch, kernel_backend):
    """decode_kv_splits(k) forces k split-KV segments on decode steps (prefill keeps the
    planner's): the decode launches change, the logits do not (fp32 rounding of the merge);
    None restores the planner's choice; a bad count is refused at the door."""
    from sparse24.torch_ops import _launch

    backend, device = kernel_backend
    segments = []
    real = _launch.unified_attention_launches
    monkeypatch.setattr(_launch, "unified_attention_launches",
                        lambda *a, **k: segments.append((k["max_seqlen_q"], k["num_kv_splits"])) or real(*a, **k))
    model = tiny_model("llama").to(device)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR, backend=backend)
    ids, mask = (t.to(device) for t in left_padded_batch())
    step_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)

    def decode_logits():
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            segments.clear()
            return model(ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True).logits

    try:
        want = decode_logits()
        sparse24.hf.decode_kv_splits(2)
        got = decode_logits()
        assert segments and all(s == (1, 2) for s in segments), segments
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        sparse24.hf.decode_kv_splits(None)
    decode_logits()
    assert segments and all(s[1] in (None, 0) for s in segments), segments
    for bad in (0, 3, 128):
        with pytest.raises(ValueError, match="num_kv_splits"):
            sparse24.hf.decode_kv_splits(bad)
    for bad in (2.0, True, "1"):  # the ops' rule: a wrong type is a TypeError
        with pytest.raises(TypeError, match="num_kv_splits"):
            sparse24.hf.decode_kv_splits(bad)


def test_generate_under_inference_mode():
    """Inference tensors have no version counter: the per-forward caches still work (the
    same tokens as under no_grad)."""
    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kw)
    with torch.inference_mode():
        got = model.generate(ids, **kw)
    assert torch.equal(got, want)


def test_collect_kept_mass_per_layer_and_head(kernel_backend):
    """``collect_kept_mass``: per layer and head, the kernel's kept mass over the real query
    rows of a left-padded batch (padding not counted), the same from the reference backend;
    exactly 1 for a dense config; the collector is off again afterwards."""
    device = kernel_backend[1]
    ids, mask = (t.to(device) for t in left_padded_batch())
    summaries = {}
    for backend in (kernel_backend[0], "reference"):
        for name, config in (("2:4", SparsityConfig(n=2, m=4, dense_recent_tokens=0)), ("dense", SparsityConfig.dense())):
            model = tiny_model("llama").to(device)
            model.set_attn_implementation("sparse24")
            sparse24.hf.sparsify(model, config, backend=backend)
            with torch.no_grad(), sparse24.hf.collect_kept_mass() as stats:
                model(ids, attention_mask=mask)
            summaries[backend, name] = stats.summary()
    assert not sparse24.hf._COLLECTOR
    real = int(mask.sum())
    for (backend, name), summary in summaries.items():
        assert sorted(summary) == [0, 1]
        for row in summary.values():
            assert row["rows"] == real and len(row["mean"]) == 4
            if name == "dense":
                assert row["mean"] == [1.0] * 4
            else:
                assert all(0.3 < m < 1.0 for m in row["mean"])
    for layer in (0, 1):
        torch.testing.assert_close(torch.tensor(summaries[kernel_backend[0], "2:4"][layer]["mean"]),
                                   torch.tensor(summaries["reference", "2:4"][layer]["mean"]), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already active"), sparse24.hf.collect_kept_mass():
        with sparse24.hf.collect_kept_mass():
            pass


@pytest.mark.parametrize("splits", [None, 2], ids=["planner", "split"])
def test_decode_with_holes_outputs_nan(kernel_backend, splits):
    """A decode step cannot raise without a host read: a row whose mask has holes gets NaN
    (the other rows are unaffected), also when the split's reduce launch writes the fix-up
    (``decode_kv_splits(2)``; the planner does not split in the interpreter)."""
    backend, device = kernel_backend
    model = tiny_model("llama").to(device)
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR, backend=backend)
    ids, mask = (t.to(device) for t in left_padded_batch())
    sparse24.hf.decode_kv_splits(splits)
    try:
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            holed = torch.cat([mask, mask.new_ones(2, 1)], 1)
            holed[1, -3] = 0
            logits = model(ids[:, -1:], attention_mask=holed, past_key_values=cache, use_cache=True).logits
    finally:
        sparse24.hf.decode_kv_splits(None)
    assert torch.isnan(logits[1]).all() and torch.isfinite(logits[0]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_gpu_direct_decode_launches_equal_the_plan(monkeypatch, config):
    """Eager decode steps whose later layers launch the compiled kernels directly
    (``_DIRECT``) give bit-identical logits to steps that run the plan in every layer, for a
    left-padded batch with a row whose query slot is padding."""
    model = tiny_model("llama", layers=4).to("cuda")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config, backend="triton")
    ids, mask = (t.to("cuda") for t in left_padded_batch())

    def decode_logits():
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            step_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
            step_mask[1, -1] = 0  # row 1's query slot is padding: its output is the fix-up's 0
            return model(ids[:, -1:], attention_mask=step_mask, past_key_values=cache, use_cache=True).logits

    sparse24.hf._DIRECT.clear()
    used = []
    put = sparse24.hf._DIRECT.put
    monkeypatch.setattr(sparse24.hf._DIRECT, "put", lambda *a: used.append(1) or put(*a))
    direct = decode_logits()
    assert used, "the direct path was not taken"
    monkeypatch.setattr(sparse24.hf._DIRECT, "put", lambda *a: None)
    sparse24.hf._DIRECT.clear()
    planned = decode_logits()
    assert torch.equal(direct, planned)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64], ids=["bool", "int64"])
def test_gpu_decode_mask_layout_rebinds_the_previous_launch(mask_dtype):
    """``decode_mask_layout(previous=)`` over 40 steps of a growing left-padded mask with a
    hole (the table width crossing 16, 32, 48, 64): every step's outputs are bitwise those of a
    fresh description, and every step whose width did not change launched the previous
    step's compiled kernel with rebound scalars (the same described launch)."""
    from sparse24.torch_ops import decode_mask_layout

    mask = torch.ones(3, 9, dtype=mask_dtype, device="cuda")
    mask[0, :4] = 0
    mask[2, 5] = 0  # a hole: that row's fill is NaN
    previous, rebound = None, 0
    for _ in range(40):
        mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
        kv_len = mask.shape[1]
        width = -(-kv_len // 16) * 16
        outputs, launch = decode_mask_layout(mask, kv_len=kv_len, pages_per_row=kv_len, out_dtype=torch.bfloat16,
                                             width=width, previous=previous, with_launch=True)
        want = decode_mask_layout(mask, kv_len=kv_len, pages_per_row=kv_len, out_dtype=torch.bfloat16, width=width)
        for got, expected in zip(outputs, want):
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
        assert launch is not None
        rebound += previous is not None and launch.launch is previous.launch
        previous = launch
    assert rebound == 39 - 3  # all but the first step and the width changes (16 -> 32 -> 48 -> 64)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_gpu_rebound_decode_steps_equal_the_plan(monkeypatch, config):
    """Decode steps of a dynamic cache whose first layer rebinds the previous step's direct
    launches to the new key length (``_rebound_step``) give bit-identical logits, step by step,
    to steps that check and plan every new form, for a left-padded batch over 20 steps (key
    lengths 13..32: the block table's padded width crosses 16 and 32, where it keeps its
    specialisation). The plans and direct launches of other tests' forms are cleared first."""
    model = tiny_model("llama", layers=4).to("cuda")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config, backend="triton")
    ids, mask = (t.to("cuda") for t in left_padded_batch())

    def decode_logits():
        out = []
        with torch.no_grad():
            cache = transformers.DynamicCache(config=model.config)
            logits = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            step_mask, token = mask, logits[:, -1:].argmax(-1)
            for _ in range(20):
                step_mask = torch.cat([step_mask, step_mask.new_ones(2, 1)], 1)
                logits = model(token, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
                out.append(logits)
                token = logits[:, -1:].argmax(-1)
        return torch.stack(out)

    monkeypatch.setattr(sparse24.hf, "_DECODE_KV_SPLITS", [4])  # a split (the rebind is for split launches) at
    # these short lengths, where the planner would not split
    rebound = []
    rebind = sparse24.hf._rebound_step

    def counted(*a, **k):
        entry, out = rebind(*a, **k)
        rebound.append(entry)
        return entry, out

    monkeypatch.setattr(sparse24.hf, "_rebound_step", counted)
    for cache in (sparse24.hf._PLANS, sparse24.hf._DIRECT, sparse24.hf._STEP_TEMPLATES):
        cache.clear()
    with_rebinds = decode_logits()
    assert sum(r is not None for r in rebound) == 19, "every step after the first rebinds"
    monkeypatch.setattr(sparse24.hf._STEP_TEMPLATES, "put", lambda *a: None)
    sparse24.hf._DIRECT.clear()
    sparse24.hf._STEP_TEMPLATES.clear()
    planned = decode_logits()
    assert torch.equal(with_rebinds, planned)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_gpu_static_cache_compiled_generate_equals_eager(config):
    """StaticCache + torch.compile(mode="reduce-overhead", fullgraph=True) of the decode step
    (generate compiles it on a GPU; CUDA graphs): the same greedy tokens as eager, for a
    left-padded batch, also when the captured graphs are replayed by a second generate."""
    model = tiny_model("llama").to("cuda")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config, backend="triton")
    ids, mask = (t.to("cuda") for t in left_padded_batch())
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
    from torch._dynamo.utils import counters

    counters.clear()
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, disable_compile=True, **kw)
        dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
        compiled = model.generate(ids, attention_mask=mask, compile_config=compile_config, **kw)
        again = model.generate(ids, attention_mask=mask, compile_config=compile_config, **kw)
    assert torch.equal(eager, dynamic)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])  # CUDA graphs did run


@pytest.mark.parametrize("config", [SparsityConfig.dense(), TWO_FOUR], ids=["dense", "2:4"])
def test_static_cache_generate_traces_fullgraph_on_cpu(config):
    """The decode step generate compiles (StaticCache, fullgraph=True) traces in one graph here
    too (Dynamo with the eager backend: no GPU, no C++ compiler), and the compiled generate
    gives the eager tokens for a left-padded batch: mask function, slot mask, layout, the op.
    (Under torch 2.11, the GPU image's, Dynamo fails on the slot mask's structure check, which
    compiled code therefore skips; torch 2.13 traces it.)"""
    import torch._dynamo

    model = tiny_model("llama")
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, config)
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static")
    compile_config = transformers.CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate compiles on CPU too
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(ids, attention_mask=mask, disable_compile=True, **kw)
        compiled = model.generate(ids, attention_mask=mask, compile_config=compile_config, **kw)
    assert torch.equal(compiled, eager)


def test_transformers_does_not_see_a_kernels_package():
    """The repo's kernels/ folder installs as sparse24.kernels, never as a top-level `kernels`
    that transformers' hub-kernels probe could mistake for the HF `kernels` package."""
    from transformers.utils import import_utils

    probe = getattr(import_utils, "is_kernels_available", None)
    if probe is None:
        pytest.skip("this transformers has no is_kernels_available probe")
    import importlib.metadata

    try:
        importlib.metadata.distribution("kernels")
        pytest.skip("the HF `kernels` distribution is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert not probe()


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_layout_traces_without_graph_breaks(cache):
    """What the attention function does around the op (paged views, slot mask, layout,
    packing) traces into one graph (torch.compile fullgraph, Dynamo only: CPU)."""
    import torch._dynamo

    batch, q_len, kv_len = 2, 1, 16
    q = torch.randn(batch, 4, q_len, 16)
    kv = torch.randn(batch, 2, kv_len, 16)
    filled = torch.tensor(9) if cache == "static" else 15  # a StaticCache's fill level is a tensor
    mask = torch.ones(batch, 10 if cache == "static" else 16, dtype=torch.bool)
    mask[1, :3] = False
    positions = torch.tensor([[9], [6]])

    def around_the_op(q, kv, mask, positions, filled):
        slots = sparse24.hf.slot_mask(batch, q_len, kv_len, filled, 0, attention_mask=mask)
        k_cache, pages_per_row = sparse24.hf._paged_view(kv)
        step = sparse24.hf._layout(slots, positions, batch=batch, q_len=q_len, kv_len=kv_len,
                                   pages_per_row=pages_per_row, sliding=True, config=TWO_FOUR, device=q.device,
                                   dtype=q.dtype, can_sync=False)  # the traced path, also when run eagerly
        layout = step.layout
        packed = sparse24.layouts.pack_padded_torch(q.transpose(1, 2), layout)
        return (k_cache.sum(), packed, layout.block_table, layout.cu_seqlens_q, layout.seq_lens, step.nan_rows)

    torch._dynamo.reset()
    compiled = torch.compile(around_the_op, fullgraph=True, backend="eager")
    for got, want in zip(compiled(q, kv, mask, positions, filled), around_the_op(q, kv, mask, positions, filled)):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- no silent fallbacks (issue 15)

def _tiny(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0)
    common.update(extra)
    common = {k: v for k, v in common.items() if v is not None}
    model = model_cls(config_cls(**common)).eval()
    model.generation_config.eos_token_id = None
    return model


def test_sparsify_refuses_a_model_not_routed_to_sparse24():
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    for call in (lambda: sparse24.hf.sparsify(model, TWO_FOUR), lambda: sparse24.hf.dense(model)):
        with pytest.raises(ValueError, match=r"layers \[0, 1\].*'sdpa'.*set_attn_implementation\('sparse24'\)"):
            call()
    model.set_attn_implementation("sparse24")
    sparse24.hf.sparsify(model, TWO_FOUR)  # now it does


def test_sparsify_refuses_attention_that_picks_its_own_implementation():
    model = _tiny(transformers.FalconConfig, transformers.FalconForCausalLM, num_kv_heads=2, head_dim=None,
                  new_decoder_architecture=True)
    model.set_attn_implementation("sparse24")  # accepted by transformers, but FalconAttention ignores it
    with pytest.raises(ValueError, match="FalconAttention.*do not dispatch through transformers' AttentionInterface"):
        sparse24.hf.sparsify(model, TWO_FOUR)


def test_doge_refusal_names_the_missing_is_causal():
    model = _tiny(transformers.DogeConfig, transformers.DogeForCausalLM)
    model.set_attn_implementation("sparse24")
    with pytest.raises(ValueError, match=r"DogeAttention.*have a layer_idx but no is_causal"):
        sparse24.hf.sparsify(model, TWO_FOUR)


def test_window_carried_only_by_the_mask_function_is_honoured():
    """PhiMoE passes no sliding_window to the attention function: only its mask function has it."""
    model = _tiny(transformers.PhimoeConfig, transformers.PhimoeForCausalLM, sliding_window=8, num_local_experts=4,
                  num_experts_per_tok=2)
    want = logits_with(model, "eager", IDS)
    got = logits_with(model, "sparse24", IDS, config=SparsityConfig.dense())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    model.config.sliding_window = None  # the window really matters here
    assert (logits_with(model, "eager", IDS) - want).abs().max() > 1e-3


def test_chunked_attention_and_sinks_are_refused():
    llama4 = _tiny(transformers.Llama4TextConfig, transformers.Llama4ForCausalLM, attention_chunk_size=8,
                   intermediate_size_mlp=128, num_local_experts=2)
    llama4.set_attn_implementation("sparse24")
    with pytest.raises(ValueError, match="chunked attention.*attention_chunk_size = 8"):
        sparse24.hf.sparsify(llama4, TWO_FOUR)
    with torch.no_grad(), pytest.raises(ValueError, match="chunked attention"):  # not sparsified: at the first forward
        llama4(IDS)
    oss = _tiny(transformers.GptOssConfig, transformers.GptOssForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    oss.set_attn_implementation("sparse24")
    with pytest.raises(ValueError, match="learned attention sinks"):
        sparse24.hf.sparsify(oss, TWO_FOUR)


def test_mask_functions_sparse24_cannot_express_raise():
    from transformers import masking_utils as mu

    window = mu.sliding_window_causal_mask_function(8)
    assert sparse24.hf._mask_function_features(window) == 8
    assert sparse24.hf._mask_function_features(mu.causal_mask_function) is None
    bad = {
        "chunked attention": mu.chunked_causal_mask_function(8, torch.zeros(2, dtype=torch.long)),
        "union of mask patterns": mu.or_masks(mu.causal_mask_function, mu.sliding_window_overlay(3)),
        "packed sequences": mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(torch.zeros(2, 3))),
        "unknown mask function": mu.and_masks(mu.causal_mask_function, lambda b, h, q, k: k >= 0),
        "bidirectional": mu.bidirectional_mask_function,
    }
    for reason, fn in bad.items():
        with pytest.raises(ValueError, match=reason):
            sparse24.hf.slot_mask(2, 3, 3, 0, 0, mask_function=fn, attention_mask=None)


@pytest.mark.parametrize("family", ["deepseek_v3", "minicpm3"])
def test_mla_batch_with_a_value_layout_of_its_own(family):
    """MLA: V is a strided view laid out unlike K; a padded batch equals each prompt alone."""
    extra = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=None, num_key_value_heads=4)
    if family == "deepseek_v3":
        model = _tiny(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, n_routed_experts=4,
                      num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=32,
                      first_k_dense_replace=1, **extra)
    else:
        model = _tiny(transformers.MiniCPM3Config, transformers.MiniCPM3ForCausalLM, **extra)
    want = logits_with(model, "eager", IDS)
    got = logits_with(model, "sparse24", IDS, config=SparsityConfig.dense())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    ids, mask = left_padded_batch()
    batched = logits_with(model, "sparse24", ids, config=TWO_FOUR, attention_mask=mask)
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        alone = logits_with(model, "sparse24", ids[b:b + 1, -n:], config=TWO_FOUR)[0]
        torch.testing.assert_close(batched[b, -n:], alone, atol=1e-4, rtol=1e-4)


def _family(name):
    from sparse24 import hf_families

    return hf_families.build(name)  # the sweep's tiny config of that family


@pytest.mark.parametrize("family,why", [
    ("bloom", "ALiBi position bias"),
    ("mpt", "ALiBi position bias"),
    ("cpmant", "position bias .*'position_bias'"),
    ("minimax", r"linear \(lightning\) attention"),  # layer 1; layer 0 is softmax attention
    ("falcon", "compute attention themselves"),  # Falcon has an alibi argument, off in its config
])
def test_modules_that_compute_attention_themselves_are_refused_with_the_reason(family, why):
    model = _family(family)
    model.set_attn_implementation("sparse24")
    with pytest.raises(ValueError, match=f"do not dispatch through transformers' AttentionInterface: .*{why}"):
        sparse24.hf.sparsify(model, TWO_FOUR)


@pytest.mark.parametrize("family,why", [
    ("deepseek_v32", r"sparse-attention indexer \(module.indexer"),
    ("deepseek_v3", "value heads of head_dim 8 and query/key heads of head_dim 16 \\(MLA\\)"),
    ("gemma4_text", "head_dim 512; sparse24's kernel supports head_dim <= 256"),
    ("mamba", "has no attention modules"),
    ("gpt_neo", r"\['GPTNeoAttention', 'GPTNeoSelfAttention'\] have no layer_idx"),
])
def test_what_the_kernel_cannot_run_is_refused_at_sparsify(family, why):
    model = _family(family)
    model.set_attn_implementation("sparse24")
    with pytest.raises(ValueError, match=why):
        sparse24.hf.sparsify(model, TWO_FOUR)


def test_mla_head_dims_are_refused_at_the_first_forward_too():
    """Not sparsified: the first forward refuses (in the backend), not the op's argument checks."""
    model = _family("deepseek_v3")
    model.set_attn_implementation("sparse24")
    with torch.no_grad(), pytest.raises(ValueError, match="DeepseekV3Attention .*MLA"):
        model(IDS[:, :8] % 128)


def test_a_config_sliding_window_the_family_does_not_apply_is_not_applied():
    """Moshi's config has sliding_window, but its code builds a plain causal mask: no window."""
    model = _family("moshi")
    assert model.config.sliding_window == 4
    ids = IDS[:, :12] % 128
    mask = torch.ones_like(ids)  # Moshi's eager builds a causal mask only when given a mask
    want = logits_with(model, "sdpa", ids, attention_mask=mask)
    got = logits_with(model, "sparse24", ids, config=SparsityConfig.dense(), attention_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
