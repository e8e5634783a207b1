"""The torch reference (float64 oracle, keep masks, chunked path) against a brute force
written here straight from docs/SPEC.md §2 (plain loops, sorting for the N:M choice)."""

import math
import zlib

import numpy as np
import pytest
import torch

from sparse24 import reference
from sparse24.config import SparsityConfig
from sparse24.reference import (
    keep_mask_reference,
    unified_attention_chunked,
    unified_attention_reference,
)
from sparse24.testing import assert_close_report, make_paged_inputs

# --------------------------------------------------------------------------------------------
# brute force


def brute_force(inp, config, *, causal=True, scale=None, window=None, softcap=None):
    """Loops over sequence, head, query row; N:M by sorting (-score, key index)."""
    q = inp.q.double().numpy()
    kc = inp.k_cache.double().numpy()
    vc = inp.v_cache.double().numpy()
    bt = inp.block_table.numpy()
    cu = inp.cu_seqlens_q.tolist()
    kv_lens = inp.seq_lens.tolist()
    num_tokens, hq, d = q.shape
    bs, hkv = kc.shape[1], kc.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros((num_tokens, hq, vc.shape[3]))
    lse = np.full((num_tokens, hq), -np.inf)
    masks = []
    n, m = config.n, config.m
    for b, kv_len in enumerate(kv_lens):
        q_len = cu[b + 1] - cu[b]
        keys = np.stack([kc[bt[b, j // bs], j % bs] for j in range(kv_len)]) if kv_len else np.zeros((0, hkv, d))
        vals = np.stack([vc[bt[b, j // bs], j % bs] for j in range(kv_len)]) if kv_len else np.zeros((0, hkv, d))
        mask = np.zeros((hq, q_len, kv_len), dtype=bool)
        for h in range(hq):
            kvh = h // (hq // hkv)
            for i in range(q_len):
                p = kv_len - q_len + i
                row = q[cu[b] + i, h]
                s = [scale * float(row @ keys[j, kvh]) for j in range(kv_len)]
                if softcap:
                    s = [softcap * math.tanh(x / softcap) for x in s]
                vis = [(not causal or j <= p) and (not window or p - j < window) for j in range(kv_len)]
                masked = [s[j] if vis[j] else -math.inf for j in range(kv_len)]
                selected = set()
                for g in range(-(-kv_len // m)):
                    members = [(masked[j] if j < kv_len else -math.inf, j) for j in range(g * m, g * m + m)]
                    members.sort(key=lambda t: (-t[0], t[1]))
                    selected.update(j for _, j in members[:n])
                for j in range(kv_len):
                    dense = (
                        j < config.dense_sink_tokens
                        or 0 <= p - j < config.dense_recent_tokens
                        or (q_len == 1 and not config.sparse_decode)
                    )
                    mask[h, i, j] = vis[j] and (dense or j in selected)
                idx = np.nonzero(mask[h, i])[0]
                sk = np.array([s[j] for j in idx])
                if len(idx) and np.isfinite(sk).any():
                    mx = sk.max()
                    w = np.exp(sk - mx)
                    out[cu[b] + i, h] = (w[:, None] * vals[idx, kvh]).sum(0) / w.sum()
                    lse[cu[b] + i, h] = mx + math.log(w.sum())
        masks.append(mask)
    return out, lse, masks


# --------------------------------------------------------------------------------------------
# scenarios

BASE = dict(q_lens=[7, 1, 12], kv_lens=[30, 17, 12], hq=4, hkv=2, d=8, bs=4,
            config=SparsityConfig(dense_recent_tokens=0), kw={})


def scenario(**over):
    s = dict(BASE)
    s.update(over)
    return s


SCENARIOS = {
    "decode": scenario(q_lens=[1, 1, 1], kv_lens=[5, 17, 33]),
    "prefill": scenario(q_lens=[13, 20], kv_lens=[13, 20]),
    "chunked_prefill": scenario(q_lens=[7, 5], kv_lens=[30, 18]),
    "kv_not_multiple_of_4": scenario(q_lens=[3, 6, 1], kv_lens=[19, 26, 11]),
    "gqa_1": scenario(hq=3, hkv=3),
    "gqa_4": scenario(hq=8, hkv=2),
    "gqa_5": scenario(hq=5, hkv=1),
    "window": scenario(kw=dict(window=7)),
    "window_3_decode": scenario(q_lens=[1, 4], kv_lens=[21, 23], kw=dict(window=3)),
    "softcap": scenario(kw=dict(softcap=1.5)),
    "scale": scenario(kw=dict(softmax_scale=0.7)),
    "sink_recent": scenario(config=SparsityConfig(dense_sink_tokens=3, dense_recent_tokens=5)),
    "default_config": scenario(q_lens=[10, 1], kv_lens=[80, 70], config=None),
    "sparse_decode_false": scenario(config=SparsityConfig(dense_recent_tokens=2, sparse_decode=False)),
    "m4_n1": scenario(config=SparsityConfig(n=1, m=4, dense_recent_tokens=0)),
    "m4_n3": scenario(config=SparsityConfig(n=3, m=4, dense_recent_tokens=0)),
    "m8_n1": scenario(config=SparsityConfig(n=1, m=8, dense_recent_tokens=0)),
    "m8_n2": scenario(config=SparsityConfig(n=2, m=8, dense_recent_tokens=0)),
    "m8_n4": scenario(config=SparsityConfig(n=4, m=8, dense_sink_tokens=2, dense_recent_tokens=3)),
    "m8_n7": scenario(config=SparsityConfig(n=7, m=8, dense_recent_tokens=0)),
    "dense": scenario(config=SparsityConfig.dense()),
    "dense_m8": scenario(config=SparsityConfig(n=8, m=8, dense_recent_tokens=0)),
    "noncausal": scenario(kw=dict(causal=False)),
    "noncausal_window": scenario(kw=dict(causal=False, window=5)),
    "block_size_1": scenario(bs=1),
    "block_size_16": scenario(bs=16, kv_lens=[40, 17, 12]),
    "empty_sequence": scenario(q_lens=[0, 3, 0], kv_lens=[9, 10, 0]),
    "everything": scenario(hq=8, hkv=2, bs=8, config=SparsityConfig(n=2, m=8, dense_sink_tokens=1,
                           dense_recent_tokens=3, sparse_decode=False),
                           kw=dict(window=11, softcap=2.0)),
}


def build(s, *, integer, seed=0, dtype=torch.float32):
    return make_paged_inputs(s["q_lens"], s["kv_lens"], num_q_heads=s["hq"], num_kv_heads=s["hkv"],
                             head_dim=s["d"], block_size=s["bs"], integer=integer, seed=seed,
                             dtype=dtype)


def brute_kwargs(kw):
    return dict(causal=kw.get("causal", True), scale=kw.get("softmax_scale"),
                window=kw.get("window"), softcap=kw.get("softcap"))


# --------------------------------------------------------------------------------------------
# the oracle against the brute force


@pytest.mark.parametrize("integer", [False, True], ids=["randn", "int"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reference_matches_brute_force(name, integer):
    s = SCENARIOS[name]
    inp = build(s, integer=integer, seed=zlib.crc32(name.encode()) % 1000)
    cfg = s["config"] if s["config"] is not None else SparsityConfig()
    want_out, want_lse, want_masks = brute_force(inp, cfg, **brute_kwargs(s["kw"]))

    out, lse = unified_attention_reference(*inp, config=s["config"], return_lse=True, **s["kw"])
    masks = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                                inp.seq_lens, config=s["config"], **s["kw"])
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert len(masks) == len(want_masks)
    for b, (got, want) in enumerate(zip(masks, want_masks)):
        assert got.dtype == torch.bool and tuple(got.shape) == want.shape
        diff = np.argwhere(got.numpy() != want)
        assert diff.size == 0, f"{name}: seq {b} kept mask differs at [h, i, j] = {diff[:5].tolist()}"
    assert_close_report(out, want_out, 1e-12, 1e-12, "out")
    assert_close_report(lse, want_lse, 1e-12, 1e-12, "lse")


def test_sparsity_actually_drops_keys():
    """Guard against a vacuous grid: 2:4 without dense regions drops about half the keys."""
    inp = build(SCENARIOS["prefill"], integer=False)
    masks = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                                inp.seq_lens, config=SparsityConfig(dense_recent_tokens=0))
    dense = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                                inp.seq_lens, config=SparsityConfig.dense())
    kept, visible = sum(int(x.sum()) for x in masks), sum(int(x.sum()) for x in dense)
    assert 0.5 * visible < kept < 0.75 * visible


# --------------------------------------------------------------------------------------------
# specific rules


def single_row_inputs(key_values, m_heads=1):
    """One query row (q = e_0) over keys whose score is ``key_values[j]`` (non-causal use)."""
    kv_len = len(key_values)
    inp = make_paged_inputs([1], [kv_len], num_q_heads=m_heads, num_kv_heads=1, head_dim=4,
                            block_size=4)
    q = torch.zeros_like(inp.q)
    q[..., 0] = 1.0
    k = torch.zeros_like(inp.k_cache)
    for j, x in enumerate(key_values):
        k[inp.block_table[0, j // 4], j % 4, :, 0] = x
    return inp._replace(q=q, k_cache=k)


@pytest.mark.parametrize(
    "scores, n, m, kept",
    [
        ([3, 1, 1, 1, 1, 1, 2, 2], 2, 4, [0, 1, 6, 7]),
        ([1, 2, 2, 0], 2, 4, [1, 2]),
        ([1, 1, 0, 1], 1, 4, [0]),
        ([0, 5, 5, 5], 2, 4, [1, 2]),
        ([0, 5, 5, 5], 1, 4, [1]),
        ([7, 7, 7, 7], 3, 4, [0, 1, 2]),
        ([1, 1, 1, 1, 1, 1, 1, 1], 2, 8, [0, 1]),
        ([0, 0, 0, 0, 2, 2, 2, 2], 4, 8, [4, 5, 6, 7]),
        ([0, 0, 0, 0, 2, 2, 2, 1], 5, 8, [0, 4, 5, 6, 7]),
    ],
)
def test_tie_rule_lower_index_wins(scores, n, m, kept):
    inp = single_row_inputs(scores)
    cfg = SparsityConfig(n=n, m=m, dense_recent_tokens=0)
    mask = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                               inp.seq_lens, config=cfg, causal=False)[0]
    assert mask[0, 0].nonzero().flatten().tolist() == kept


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (3, 4), (2, 8), (5, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_all_equal_scores_keep_first_n_of_each_group(n, m, causal):
    inp = make_paged_inputs([9, 1], [23, 14], num_q_heads=4, num_kv_heads=2, head_dim=8,
                            block_size=4)
    inp = inp._replace(q=torch.ones_like(inp.q), k_cache=torch.ones_like(inp.k_cache))
    cfg = SparsityConfig(n=n, m=m, dense_recent_tokens=0)
    masks = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                                inp.seq_lens, config=cfg, causal=causal)
    for b, (q_len, kv_len) in enumerate([(9, 23), (1, 14)]):
        j = torch.arange(kv_len)
        p = torch.arange(kv_len - q_len, kv_len)[:, None]
        visible = (j <= p) if causal else torch.ones(q_len, kv_len, dtype=torch.bool)
        expected = visible & (j % m < n)
        assert torch.equal(masks[b], expected.expand(4, -1, -1))


def test_dense_regions_are_token_exact():
    # all scores equal: selection keeps j % 4 < 2; the dense regions add exactly their keys
    inp = make_paged_inputs([1], [20], num_q_heads=1, num_kv_heads=1, head_dim=4, block_size=4)
    inp = inp._replace(q=torch.ones_like(inp.q), k_cache=torch.ones_like(inp.k_cache))
    cfg = SparsityConfig(dense_sink_tokens=3, dense_recent_tokens=6)
    mask = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                               inp.seq_lens, config=cfg)[0][0, 0]
    j = torch.arange(20)
    expected = (j % 4 < 2) | (j < 3) | (j > 19 - 6)
    assert torch.equal(mask, expected)


def test_dense_config_is_plain_softmax_attention():
    s = SCENARIOS["chunked_prefill"]
    inp = build(s, integer=False, seed=3)
    out = unified_attention_reference(*inp, config=SparsityConfig.dense())
    cu, kv = inp.cu_seqlens_q.tolist(), inp.seq_lens.tolist()
    bs = inp.k_cache.shape[1]
    for b in range(len(kv)):
        q_len, kv_len = cu[b + 1] - cu[b], kv[b]
        pages = inp.block_table[b, : -(-kv_len // bs)].long()
        k = inp.k_cache[pages].flatten(0, 1)[:kv_len].double()  # [kv_len, H_kv, D]
        v = inp.v_cache[pages].flatten(0, 1)[:kv_len].double()
        q = inp.q[cu[b] : cu[b + 1]].double()
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, kv_len, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        mask = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask)
        assert_close_report(out[cu[b] : cu[b + 1]], want.transpose(0, 1), 1e-12, 1e-12, f"seq {b}")


def test_n_equals_m_is_dense():
    inp = build(SCENARIOS["kv_not_multiple_of_4"], integer=True)
    dense = unified_attention_reference(*inp, config=SparsityConfig.dense())
    for cfg in (SparsityConfig(n=4, m=4), SparsityConfig(n=8, m=8, dense_sink_tokens=3)):
        assert torch.equal(unified_attention_reference(*inp, config=cfg), dense)


def test_prefill_and_decode_select_the_same_keys():
    L = 27
    inp = make_paged_inputs([L], [L], num_q_heads=4, num_kv_heads=2, head_dim=8, block_size=4,
                            integer=True, seed=5)
    cfg = SparsityConfig(dense_sink_tokens=1, dense_recent_tokens=3)
    prefill = keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q,
                                  inp.seq_lens, config=cfg)[0]
    # decode step t: one query (row t of the prompt) over the first t + 1 keys
    for t in range(L):
        q = inp.q[t : t + 1]
        cu = torch.tensor([0, 1], dtype=torch.int32)
        kv = torch.tensor([t + 1], dtype=torch.int32)
        step = keep_mask_reference(q, inp.k_cache, inp.block_table, cu, kv, config=cfg)[0]
        assert torch.equal(step[:, 0], prefill[:, t, : t + 1])


def test_rows_with_nothing_kept_give_zeros_and_minus_inf_lse():
    inp = make_paged_inputs([4, 2], [4, 9], num_q_heads=2, num_kv_heads=1, head_dim=4,
                            block_size=4, seed=1)
    # rows 0 and 5 score -inf against every key (k > 0): nothing to keep, never NaN
    q = inp.q.clone()
    q[0] = -math.inf
    q[5] = -math.inf
    inp = inp._replace(q=q, k_cache=inp.k_cache.abs() + 1.0)
    for fn, kw in [(unified_attention_reference, {}),
                   (unified_attention_chunked, dict(chunk_size=4)),
                   (unified_attention_chunked, dict(chunk_size=4, compute_dtype=torch.float64))]:
        out, lse = fn(*inp, return_lse=True, **kw)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        for row in (0, 5):
            assert torch.equal(out[row], torch.zeros_like(out[row]))
            assert torch.isneginf(lse[row]).all()
        for row in (1, 2, 3, 4):
            assert torch.isfinite(lse[row]).all() and out[row].abs().sum() > 0


def test_q_len_greater_than_kv_len_is_an_error():
    """Contract rule (sparse24.validation): seq_lens counts the new tokens' keys too, so
    q_len <= kv_len, in the references as in the ops."""
    inp = make_paged_inputs([4, 2], [4, 9], num_q_heads=2, num_kv_heads=1, head_dim=4, block_size=4, seed=1)
    inp = inp._replace(seq_lens=torch.tensor([2, 9], dtype=torch.int32))
    match = r"^seq_lens \[num_seqs\] counts every key .*sequence 0 has q_len = 4 > seq_lens\[0\] = 2"
    for fn in (unified_attention_reference, unified_attention_chunked):
        with pytest.raises(ValueError, match=match):
            fn(*inp)
    with pytest.raises(ValueError, match=match):
        keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q, inp.seq_lens)


def test_cu_seqlens_q_must_end_at_num_tokens():
    """Contract rule: cu_seqlens_q[-1] == num_tokens (a row of no sequence is an error)."""
    inp = make_paged_inputs([3], [6], num_q_heads=2, num_kv_heads=2, head_dim=4, block_size=4)
    padded = inp._replace(q=torch.cat([inp.q, torch.randn(2, 2, 4)]))  # two tokens past cu_seqlens_q[-1]
    match = r"^cu_seqlens_q \[num_seqs \+ 1\] must end at num_tokens = 5 \(q.shape\[0\]\), got cu_seqlens_q\[-1\] = 3"
    for fn in (unified_attention_reference, unified_attention_chunked):
        with pytest.raises(ValueError, match=match):
            fn(*padded)
    with pytest.raises(ValueError, match=match):
        keep_mask_reference(padded.q, padded.k_cache, *padded[3:])


def test_chunked_core_zeros_rows_past_the_last_sequence():
    """The internal path of the padded attention() (packed rows past cu_seqlens_q[-1] belong to
    no sequence): they come out as zeros, in a given out buffer too."""
    inp = make_paged_inputs([3], [6], num_q_heads=2, num_kv_heads=2, head_dim=4, block_size=4)
    q = torch.cat([inp.q, torch.randn(2, 2, 4)])
    want = unified_attention_reference(*inp)
    opts = reference.AttentionOptions(softmax_scale=0.5, window=0, softcap=0.0)
    out = torch.full((5, 2, 4), 7.0)
    got = reference._chunked(q, inp.k_cache, inp.v_cache, inp.block_table, [0, 3], [6], config=SparsityConfig(),
                             options=opts, return_lse=False, out=out)
    assert got is out and torch.equal(out[3:], torch.zeros_like(out[3:]))
    assert_close_report(out[:3], want, 2e-6, 1e-5, "rows of the sequence")


# --------------------------------------------------------------------------------------------
# the chunked path


CHUNKED = ["decode", "chunked_prefill", "kv_not_multiple_of_4", "gqa_5", "window",
           "window_3_decode", "softcap", "sink_recent", "default_config", "sparse_decode_false",
           "m8_n2", "m8_n4", "dense", "noncausal", "noncausal_window", "block_size_1",
           "empty_sequence", "everything"]


@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_fp32_matches_reference(name):
    s = SCENARIOS[name]
    inp = build(s, integer=True, seed=7)
    want, want_lse = unified_attention_reference(*inp, config=s["config"], return_lse=True, **s["kw"])
    m = (s["config"] or SparsityConfig()).m
    for chunk in (m, 2 * m, 1024):
        out, lse = unified_attention_chunked(*inp, config=s["config"], return_lse=True,
                                             chunk_size=chunk, **s["kw"])
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        # integer inputs: exact scores, so the kept keys are the same; a flipped decision
        # would show as an error of ~1e-1
        assert_close_report(out, want, 2e-6, 1e-5, f"out chunk={chunk}")
        assert_close_report(lse, want_lse, 2e-6, 1e-5, f"lse chunk={chunk}")


@pytest.mark.parametrize("integer", [False, True], ids=["randn", "int"])
@pytest.mark.parametrize("name", CHUNKED)
def test_chunked_fp64_matches_reference(name, integer):
    s = SCENARIOS[name]
    inp = build(s, integer=integer, seed=11, dtype=torch.float64)
    want, want_lse = unified_attention_reference(*inp, config=s["config"], return_lse=True, **s["kw"])
    m = (s["config"] or SparsityConfig()).m
    out, lse = unified_attention_chunked(*inp, config=s["config"], return_lse=True, chunk_size=m,
                                         compute_dtype=torch.float64, **s["kw"])
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close_report(out, want, 1e-12, 1e-12, "out")
    assert_close_report(lse, want_lse, 1e-12, 1e-12, "lse")


def test_chunked_query_chunking(monkeypatch):
    """Force query chunks of one or two rows and long contexts of many key chunks."""
    monkeypatch.setattr(reference, "_CHUNK_SCORE_ELEMENTS", 64)
    cfg = SparsityConfig(dense_sink_tokens=2, dense_recent_tokens=5)
    inp = make_paged_inputs([40, 1, 17], [300, 129, 17], num_q_heads=4, num_kv_heads=2,
                            head_dim=8, block_size=16, integer=True, seed=2)
    for kw in ({}, dict(window=37), dict(causal=False)):
        want = unified_attention_reference(*inp, config=cfg, **kw)
        got = unified_attention_chunked(*inp, config=cfg, chunk_size=8, **kw)
        assert_close_report(got, want, 2e-6, 1e-5, f"out {kw}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision(dtype):
    s = SCENARIOS["everything"]
    inp = build(s, integer=True, seed=4, dtype=dtype)
    want = unified_attention_reference(*inp, config=s["config"], **s["kw"])
    out = torch.empty(inp.q.shape, dtype=dtype)
    got, lse = unified_attention_chunked(*inp, config=s["config"], chunk_size=8, out=out,
                                         return_lse=True, **s["kw"])
    assert got is out and got.dtype == dtype and lse.dtype == torch.float32
    assert_close_report(got, want, 1e-2, 1e-2, f"out {dtype}")


def test_noncontiguous_caches():
    s = SCENARIOS["everything"]
    inp = build(s, integer=True, seed=6)
    # same values, stored head-major: [num_blocks, H_kv, block_size, D] viewed as the layout
    k = inp.k_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    v = inp.v_cache.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    q = torch.stack([inp.q, inp.q], dim=-1)[..., 0]
    assert not k.is_contiguous() and not v.is_contiguous() and not q.is_contiguous()
    strided = inp._replace(k_cache=k, v_cache=v, q=q)
    for fn in (unified_attention_reference, unified_attention_chunked):
        assert_close_report(fn(*strided, config=s["config"], **s["kw"]),
                            fn(*inp, config=s["config"], **s["kw"]), 0, 0, fn.__name__)


def test_inputs_are_not_modified():
    s = SCENARIOS["everything"]
    for dtype in (torch.float32, torch.float64):
        inp = build(s, integer=False, dtype=dtype)
        before = [t.clone() for t in inp]
        unified_attention_reference(*inp, config=s["config"], return_lse=True, **s["kw"])
        keep_mask_reference(inp.q, inp.k_cache, inp.block_table, inp.cu_seqlens_q, inp.seq_lens,
                            config=s["config"], **s["kw"])
        for compute in (torch.float32, torch.float64):
            unified_attention_chunked(*inp, config=s["config"], return_lse=True, chunk_size=8,
                                      compute_dtype=compute, **s["kw"])
        for t, b in zip(inp, before):
            assert torch.equal(t, b)


def test_unused_pages_are_never_read():
    s = SCENARIOS["chunked_prefill"]
    inp = build(s, integer=True)
    kv, bs = inp.seq_lens.tolist(), inp.k_cache.shape[1]
    k, v = inp.k_cache.clone(), inp.v_cache.clone()
    used = torch.zeros(k.shape[:2], dtype=torch.bool)
    for b, kv_len in enumerate(kv):
        for j in range(kv_len):
            used[inp.block_table[b, j // bs], j % bs] = True
    k[~used] = float("nan")
    v[~used] = float("nan")
    poisoned = inp._replace(k_cache=k, v_cache=v)
    for fn in (unified_attention_reference, unified_attention_chunked):
        assert_close_report(fn(*poisoned), fn(*inp), 0, 0, fn.__name__)


def test_config_argument_forms():
    """None is the 2:4 default; a string is a TypeError (contract rule: the references take
    what the ops take; parse strings with SparsityConfig.parse)."""
    inp = build(SCENARIOS["prefill"], integer=True)
    assert torch.equal(unified_attention_reference(*inp),
                       unified_attention_reference(*inp, config=SparsityConfig()))
    for config in ("1:8", (2, 4)):
        with pytest.raises(TypeError, match=r"^config must be a sparse24\.SparsityConfig or None, got "):
            unified_attention_reference(*inp, config=config)


def test_argument_errors():
    inp = build(SCENARIOS["prefill"], integer=True)
    with pytest.raises(ValueError, match="chunk_size must be a positive multiple of m = 8"):
        unified_attention_chunked(*inp, config=SparsityConfig(n=2, m=8), chunk_size=12)
    with pytest.raises(ValueError, match="compute_dtype"):
        unified_attention_chunked(*inp, compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="window"):
        unified_attention_reference(*inp, window=-1)
    with pytest.raises(ValueError, match="softcap"):
        unified_attention_reference(*inp, softcap=-1.0)
    with pytest.raises(ValueError, match=r"^out must have the shape of q"):
        unified_attention_chunked(*inp, out=torch.empty(1, 2, 3))
    bad = inp.block_table.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match=r"^block_table .* must hold page indices .*got block_table\[0, 0\] = 10000"):
        unified_attention_reference(*inp._replace(block_table=bad))
    with pytest.raises(ValueError, match="num_kv_heads"):
        unified_attention_reference(inp.q[:, :3], inp.k_cache, inp.v_cache, *inp[3:])
