"""sparse24.flax: the drop-in attention_fn and the paged-cache module (CPU, jnp reference)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from flax import linen, nnx  # noqa: E402

import sparse24.flax  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402
from sparse24.jax_ops import attention as jax_attention  # noqa: E402

TWO_FOUR = SparsityConfig(dense_recent_tokens=0)


def mha(attention_fn, decode=False):
    return nnx.MultiHeadAttention(num_heads=4, in_features=32, qkv_features=32, decode=decode,
                                  attention_fn=attention_fn, rngs=nnx.Rngs(0))


def x_input(batch=2, length=13, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, length, 32))


def padding_mask(lengths, length):
    valid = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]
    return nnx.make_attention_mask(valid, valid)


@pytest.mark.parametrize("mask_kind", ["causal", "causal+padding", "padding", "none"])
def test_dense_attention_fn_equals_nnx_dot_product_attention(mask_kind):
    x = x_input()
    masks = {
        "causal": nnx.make_causal_mask(x[..., 0]),
        "causal+padding": nnx.combine_masks(nnx.make_causal_mask(x[..., 0]), padding_mask([13, 9], 13)),
        "padding": padding_mask([13, 9], 13),
        "none": None,
    }
    mask = masks[mask_kind]
    ours = mha(sparse24.flax.attention_fn(SparsityConfig.dense(), backend="reference"))
    theirs = mha(nnx.dot_product_attention)
    got, want = ours(x, mask=mask), theirs(x, mask=mask)
    if mask_kind.endswith("padding"):  # padded query rows: nnx averages all values, we give zeros
        got, want = got[1, :9], want[1, :9]
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_nm_attention_fn_matches_the_padded_op():
    x = x_input()
    layer = mha(sparse24.flax.attention_fn(TWO_FOUR, backend="reference"))
    got = layer(x, mask=nnx.make_causal_mask(x[..., 0]))
    q = layer.query(x)
    k = layer.key(x)
    v = layer.value(x)
    want = layer.out(jax_attention(q, k, v, causal=True, config=TWO_FOUR, backend="reference"))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    dense = mha(sparse24.flax.attention_fn(SparsityConfig.dense(), backend="reference"))(x, mask=nnx.make_causal_mask(x[..., 0]))
    assert float(jnp.abs(got - dense).max()) > 1e-3


def test_jit_with_traced_causal_mask_and_is_causal():
    x = x_input()
    layer = mha(sparse24.flax.attention_fn(TWO_FOUR, backend="reference"))
    eager = layer(x, mask=nnx.make_causal_mask(x[..., 0]))

    @nnx.jit
    def run(layer, x, mask):
        return layer(x, mask=mask)

    np.testing.assert_allclose(run(layer, x, nnx.make_causal_mask(x[..., 0])), eager, atol=1e-6)
    plain = padding_mask([13, 9], 13)
    eager_plain = layer(x, mask=plain)
    np.testing.assert_allclose(run(layer, x, plain), eager_plain, atol=1e-6)


def test_linen_passes_the_mask_by_signature():
    x = x_input()
    mask = nnx.make_causal_mask(x[..., 0])
    ours = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=32,
                                             attention_fn=sparse24.flax.attention_fn(SparsityConfig.dense(), backend="reference"))
    theirs = linen.MultiHeadDotProductAttention(num_heads=4, qkv_features=32)
    params = theirs.init(jax.random.key(1), x, mask=mask)
    np.testing.assert_allclose(ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask), atol=2e-5, rtol=2e-5)


def test_nnx_decode_mode_equals_prefill():
    """NNX decode mode (key/value = the whole cache, mask [B, 1, 1, max_len]) keeps what a
    causal prefill over the same tokens keeps."""
    x = x_input(batch=1, length=12)
    fn = sparse24.flax.attention_fn(TWO_FOUR, backend="reference")
    prefill = mha(fn)
    full = prefill(x, mask=nnx.make_causal_mask(x[..., 0]))
    decoder = mha(fn, decode=True)
    nnx.update(decoder, nnx.state(prefill, nnx.Param))
    decoder.init_cache(x.shape)
    steps = [decoder(x[:, t : t + 1]) for t in range(12)]
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)


def test_unexpressible_masks_and_training_dropout_raise():
    x = x_input()
    layer = mha(sparse24.flax.attention_fn(TWO_FOUR, backend="reference"))
    arbitrary = jnp.ones((2, 1, 13, 13), bool).at[:, :, 5, 2].set(False)
    with pytest.raises(ValueError, match="cannot be expressed"):
        layer(x, mask=arbitrary)
    fn = sparse24.flax.attention_fn(TWO_FOUR, backend="reference")
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="inference-only"):
        fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(ValueError, match="bias"):
        fn(q, q, q, bias=jnp.zeros((1, 2, 4, 4)))


def test_paged_attention_mixed_batch_decode_equals_full_recompute():
    num_q_heads, num_kv_heads, head_dim = 4, 2, 16
    attn = sparse24.flax.PagedAttention(num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                        num_blocks=16, block_size=4, config=TWO_FOUR, backend="reference")
    pages = sparse24.flax.PageAllocator(num_blocks=16, block_size=4)
    key = jax.random.key(3)
    lengths = {"a": 9, "b": 14}
    total = {s: n + 3 for s, n in lengths.items()}
    qkv = {s: [jax.random.normal(jax.random.fold_in(key, i * 10 + j), (total[s], h, head_dim))
               for j, h in enumerate((num_q_heads, num_kv_heads, num_kv_heads))]
           for i, s in enumerate(lengths)}

    def step(chunks):  # chunks: {seq: (start, stop)} -> outputs per seq, one unified call
        seqs = list(chunks)
        slots, q, k, v, cu, kv = [], [], [], [], [0], []
        for s in seqs:
            a, b = chunks[s]
            slots += pages.allocate(s, b - a)
            q.append(qkv[s][0][a:b]), k.append(qkv[s][1][a:b]), v.append(qkv[s][2][a:b])
            cu.append(cu[-1] + b - a)
            kv.append(b)
        out = attn(jnp.concatenate(q), jnp.concatenate(k), jnp.concatenate(v),
                   slot_mapping=jnp.asarray(slots, jnp.int32), block_table=jnp.asarray(pages.block_table(seqs, 8)),
                   cu_seqlens_q=jnp.asarray(cu, jnp.int32), seq_lens=jnp.asarray(kv, jnp.int32))
        return {s: out[cu[i]:cu[i + 1]] for i, s in enumerate(seqs)}

    step({s: (0, n) for s, n in lengths.items()})  # prefill both
    for t in range(3):  # three mixed decode steps
        last = step({s: (n + t, n + t + 1) for s, n in lengths.items()})
    for s in lengths:  # the last decode step equals a full recompute over every key
        q, k, v = qkv[s]
        full = jax_attention(q[None], k[None], v[None], causal=True, config=TWO_FOUR, backend="reference")[0]
        np.testing.assert_allclose(last[s][0], full[-1], atol=2e-5, rtol=2e-5)


def count_runs(monkeypatch):
    """Count the padded-attention runs *executed* (a debug callback inside each run fires only
    when its branch runs, also under jit)."""
    runs = []
    attention = sparse24.flax._padded_attention

    def counted(*args, **kwargs):
        out = attention(*args, **kwargs)
        jax.debug.callback(lambda: runs.append(kwargs["causal"]))
        return out

    monkeypatch.setattr(sparse24.flax, "_padded_attention", counted)
    return runs


def test_jit_with_a_mask_and_no_is_causal_runs_the_kernel_once(monkeypatch):
    runs = count_runs(monkeypatch)
    fn = sparse24.flax.attention_fn(TWO_FOUR, backend="reference")
    q = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
    run = jax.jit(lambda q, mask: fn(q, q, q, mask=mask))
    causal = nnx.make_causal_mask(q[..., 0, 0])
    padding = padding_mask([6, 4], 6)
    eager_causal, eager_plain = fn(q, q, q, mask=causal), fn(q, q, q, mask=padding)
    runs.clear()
    got = run(q, causal)
    jax.effects_barrier()
    assert runs == [True]
    np.testing.assert_allclose(got, eager_causal, atol=1e-6)
    runs.clear()
    got = run(q, padding)
    jax.effects_barrier()
    assert runs == [False]
    np.testing.assert_allclose(got[0], eager_plain[0], atol=1e-6)
    np.testing.assert_allclose(got[1, :4], eager_plain[1, :4], atol=1e-6)
    mixed = jnp.concatenate([causal[:1], padding[1:]])  # row 0 causal, row 1 a padding mask
    runs.clear()
    got = run(q, mixed)
    jax.effects_barrier()
    assert sorted(runs) == [False, True]  # only a mixed batch needs both readings
    np.testing.assert_allclose(got[0], eager_causal[0], atol=1e-6)
    np.testing.assert_allclose(got[1, :4], eager_plain[1, :4], atol=1e-6)
    np.testing.assert_allclose(fn(q, q, q, mask=mixed), got, atol=1e-6)
    arbitrary = jnp.ones((2, 1, 6, 6), bool).at[:, :, 4, 2].set(False)
    assert bool(jnp.isnan(run(q, arbitrary)).all())  # under jit: NaN, never silently wrong


def test_extra_keywords_of_newer_flax():
    """Newer Flax passes more keywords (input_positions): None is accepted, values that carry
    meaning raise; named parameters stay (Linen filters by signature)."""
    import inspect

    fn = sparse24.flax.attention_fn(TWO_FOUR, backend="reference")
    assert {"mask", "is_causal", "dropout_rng"} <= set(inspect.signature(fn).parameters)
    q = jax.random.normal(jax.random.key(0), (1, 5, 4, 8))
    np.testing.assert_allclose(fn(q, q, q, input_positions=None, out_sharding=None), fn(q, q, q))
    with pytest.raises(ValueError, match="input_positions must be None"):
        fn(q, q, q, input_positions=jnp.arange(5)[None])
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['sinks'\]"):
        fn(q, q, q, sinks=jnp.zeros(4))


def test_per_head_masks_and_weight_sowing_raise():
    """Masks that differ per head (an arbitrary 4-D mask) and sowing weights cannot be
    expressed: they raise instead of being approximated by one mask per row."""
    fn = sparse24.flax.attention_fn(TWO_FOUR, backend="reference")
    q = jnp.ones((1, 6, 2, 8))
    per_head = jnp.ones((1, 2, 6, 6), bool).at[:, 1, :, 4:].set(False)  # head 1 sees fewer keys
    with pytest.raises(ValueError, match="cannot be expressed"):
        fn(q, q, q, mask=per_head)
    with pytest.raises(ValueError, match="sow"):
        fn(q, q, q, module=object())
    fn(q, q, q, mask=jnp.ones((1, 1, 6, 6), bool))  # the same mask on every head is fine
