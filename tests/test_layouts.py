"""sparse24.layouts, section "padding masks / HF caches -> paged metadata": the torch slot-mask
layout (HF caches) and the jax.numpy Flax-mask reading, against simple per-row Python."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparse24 import SparsityConfig
from sparse24.layouts import (
    pack_padded_torch,
    packed_out_buffer_torch,
    padding_mask_layout_torch,
    unpack_padded_torch,
)
from sparse24.reference import keep_mask_reference


def expected_rows(codes, q_len, *, positions=None, m=4, sink=0):
    """Per-row Python reading of a slot mask (codes: list of rows; True/1 real, 0 padding,
    -1 not written; ``None`` = every slot real). Returns, per row, a dict or None (holes)."""
    out = []
    for b, row in enumerate(codes):
        written = sum(1 for c in row if c >= 0)
        real = [s for s, c in enumerate(row) if c > 0]
        if real and real != list(range(real[0], real[-1] + 1)):
            out.append(None)
            continue
        first_query = written - q_len
        query_slots = [s for s in real if s >= first_query]
        dropped = 0
        if positions is not None and query_slots:
            pos = positions[b] if len(positions) > 1 else positions[0]
            seen = pos[query_slots[-1] - first_query] + 1
            dropped = max(seen - len(real), 0)
            while dropped - m >= sink:  # the same decisions, a bounded block table
                dropped -= m
        out.append(dict(
            q_rows=[s - first_query for s in query_slots],  # query row index of each real query
            kv_len=len(real) + dropped,
            dropped=dropped,
            key_slots=real,  # key j (>= dropped) is slot real[j - dropped]
        ))
    return out


def check_layout(codes, q_len, kv_len, *, dtype=torch.bool, pages_per_row=None, positions=None, m=4, sink=0):
    batch = len(codes)
    pages_per_row = pages_per_row or kv_len
    mask = None if codes is None else torch.tensor(codes).to(dtype)
    pos = None if positions is None else torch.tensor(positions)
    layout = padding_mask_layout_torch(mask, batch, q_len, kv_len, pages_per_row=pages_per_row, device="cpu",
                                       position_ids=pos, sliding=positions is not None, m=m, dense_sink_tokens=sink)
    want = expected_rows(codes, q_len, positions=positions, m=m, sink=sink)
    cu = layout.cu_seqlens_q.tolist()
    assert layout.cu_seqlens_q.dtype == layout.seq_lens.dtype == layout.block_table.dtype == torch.int32
    assert layout.max_seqlen_q == q_len and layout.block_table.shape[1] == layout.max_seqlen_k
    assert layout.bad.tolist() == [w is None for w in want]
    for b, w in enumerate(want):
        if w is None:
            continue
        assert cu[b + 1] - cu[b] == len(w["q_rows"]), b
        assert layout.seq_lens[b] == w["kv_len"] <= layout.max_seqlen_k
        for j in range(w["dropped"], w["kv_len"]):
            assert layout.block_table[b, j] == b * pages_per_row + w["key_slots"][j - w["dropped"]], (b, j)
        for k, i in enumerate(w["q_rows"]):  # packed row cu[b] + k is query row (b, i), and back
            assert layout.sources[cu[b] + k] == b * q_len + i
            assert layout.rows[b * q_len + i] == cu[b] + k
        padded = set(range(q_len)) - set(w["q_rows"])
        assert all(layout.rows[b * q_len + i] == batch * q_len for i in padded)
    return layout


LEFT = [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
RIGHT = [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.int8])
def test_left_and_right_padding_prefill(dtype):
    check_layout(LEFT, 6, 6, dtype=dtype)
    check_layout(RIGHT, 6, 6, dtype=dtype)
    check_layout(LEFT + RIGHT, 6, 6, dtype=dtype)


def test_decode_and_chunked_prefill():
    check_layout(LEFT, 1, 6)  # decode: the last slot is the query
    check_layout(LEFT, 3, 6)  # a chunk of 3 after 3 cached slots
    check_layout([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], 3, 6)  # a chunk that starts in the padding; an empty row
    check_layout([[1] * 6], 2, 9, pages_per_row=20)  # mask shorter than the cache: slots >= 6 not written


def test_static_cache_tail_and_no_mask():
    """int8 codes with -1 on the slots a StaticCache has not written; mask None = all real."""
    static = [[0, 0, 1, 1, 1, -1, -1, -1], [1, 1, 1, 1, 1, -1, -1, -1]]
    check_layout(static, 2, 8, dtype=torch.int8)
    check_layout(static, 1, 8, dtype=torch.int8, pages_per_row=16)
    layout = padding_mask_layout_torch(None, 2, 3, 7, pages_per_row=7, device="cpu")
    assert layout.rows is None and layout.sources is None and layout.bad is None
    assert layout.cu_seqlens_q.tolist() == [0, 3, 6] and layout.seq_lens.tolist() == [7, 7]
    assert layout.block_table.tolist() == [list(range(7)), list(range(7, 14))]


def test_sliding_window_counts_dropped_keys_back():
    """A sliding cache keeps the newest slots; position_ids give each query's real index."""
    codes = [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    positions = [[10, 11], [3, 4], [2, 3]]  # row 0 dropped 7 keys, row 1 two (after its padding), row 2 none
    for m, sink in ((4, 0), (4, 2), (8, 3), (2, 5)):
        layout = check_layout(codes, 2, 5, positions=positions, m=m, sink=sink)
        assert layout.max_seqlen_k == 5 + sink + m - 1
    check_layout([[1, 1, 1]], 1, 3, positions=[[40]], m=4, sink=0)  # decode, far past the window


def test_mask_with_holes_is_flagged():
    layout = check_layout([[1, 0, 1, 1], [0, 1, 1, 1]], 4, 4)
    assert layout.bad.tolist() == [True, False]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, L\]"):
        padding_mask_layout_torch(torch.ones(2, 9, dtype=torch.bool), 2, 1, 8, pages_per_row=8, device="cpu")
    with pytest.raises(ValueError, match="L >= q_len"):
        padding_mask_layout_torch(torch.ones(2, 2, dtype=torch.bool), 2, 3, 8, pages_per_row=8, device="cpu")
    with pytest.raises(ValueError, match=r"position_ids must have shape \[batch \| 1, q_len\]"):
        padding_mask_layout_torch(None, 2, 3, 8, pages_per_row=8, device="cpu", position_ids=torch.zeros(2, 2),
                                  sliding=True)


def test_built_without_host_reads():
    """On the meta device no value can be read: the layout builds there (no .item(), no
    .tolist(), no bool(tensor), no boolean-mask indexing), shapes and maxima static."""
    mask = torch.ones(3, 10, dtype=torch.int8, device="meta")
    pos = torch.zeros(3, 2, dtype=torch.long, device="meta")
    layout = padding_mask_layout_torch(mask, 3, 2, 10, pages_per_row=40, device="meta", position_ids=pos,
                                       sliding=True, m=4, dense_sink_tokens=1)
    assert layout.block_table.shape == (3, 10 + 1 + 3) and layout.max_seqlen_k == 14
    assert layout.sources.shape == layout.rows.shape == (6,)
    q = torch.zeros(3, 2, 4, 8, device="meta")
    buffer = packed_out_buffer_torch(layout, q)
    assert pack_padded_torch(q, layout).shape == (6, 4, 8)
    assert unpack_padded_torch(buffer, layout, q.shape).shape == q.shape


def test_dropped_key_shift_keeps_every_decision():
    """The block table counts at most sink + m - 1 dropped keys back in: the kept keys are
    those of the unshifted layout (every dropped key counted), key for key."""
    torch.manual_seed(0)
    config = SparsityConfig(n=1, m=4, dense_sink_tokens=2, dense_recent_tokens=3)
    window, heads, dim = 6, 2, 8
    cached, q_len, dropped = 7, 2, 13  # a sliding cache of 7 slots, 13 older keys dropped
    keys = torch.randn(1, cached, heads, dim, dtype=torch.float64)
    q = torch.randn(q_len, heads, dim, dtype=torch.float64)
    positions = torch.tensor([[dropped + cached - q_len, dropped + cached - 1]])
    layout = padding_mask_layout_torch(None, 1, q_len, cached, pages_per_row=cached, device="cpu",
                                       position_ids=positions, sliding=True, m=config.m,
                                       dense_sink_tokens=config.dense_sink_tokens)
    shifted = int(layout.seq_lens[0]) - cached
    assert shifted < dropped and (dropped - shifted) % config.m == 0
    # unshifted: every dropped key counted, block_size 1 pages of the same cache
    full = torch.clamp(torch.arange(dropped + cached) - dropped, min=0).to(torch.int32)[None]
    pages = keys.reshape(cached, 1, heads, dim)
    cu = torch.tensor([0, q_len], dtype=torch.int32)
    kw = dict(config=config, window=window, softmax_scale=0.5)
    want = keep_mask_reference(q, pages, full, cu, torch.tensor([dropped + cached], dtype=torch.int32), **kw)[0]
    got = keep_mask_reference(q, pages, layout.block_table[:, : int(layout.seq_lens[0])], layout.cu_seqlens_q,
                              layout.seq_lens, **kw)[0]
    assert not want[:, :, :dropped].any() and not got[:, :, :shifted].any()
    assert torch.equal(got[:, :, shifted:], want[:, :, dropped:])
    assert want.any(-1).all()


def test_layouts_import_without_jax():
    code = "import sys; sys.modules['jax'] = None; sys.modules['jax.numpy'] = None; import sparse24.layouts"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


# ---------------------------------------------------------------- jax.numpy: Flax masks


def flax_expected(mask):
    """Per-row Python: (seq_len, is a padding mask, is a causal one)."""
    out = []
    for row in mask:  # [heads, q, k]
        q_len, kv_len = len(row[0]), len(row[0][0])
        seq = sum(any(row[h][i][j] for h in range(len(row)) for i in range(q_len)) for j in range(kv_len))
        ql = min(q_len, seq)
        plain = [[j < seq and i < ql for j in range(kv_len)] for i in range(q_len)]
        causal = [[plain[i][j] and j <= seq - ql + i for j in range(kv_len)] for i in range(q_len)]
        same = lambda e: all(row[h][i][j] == e[i][j] for h in range(len(row)) for i in range(q_len)  # noqa: E731
                             for j in range(kv_len))
        out.append((seq, same(plain), same(causal)))
    return out


def test_flax_mask_layout_matches_per_row_python():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from sparse24.layouts import attention_mask_layout_jnp

    q_len, kv_len = 4, 6
    i, j = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
    causal = j <= kv_len - q_len + i
    pad = j < 3
    rows = [
        causal,  # causal
        np.broadcast_to(j < 6, (q_len, kv_len)),  # no mask at all
        pad & (i < 3),  # padding, 3 keys
        pad & (i < 3) & (j <= 3 - 3 + i),  # causal + padding
        causal.copy(),  # a hole
        np.zeros((q_len, kv_len), bool),  # all padding
    ]
    rows[4][2, 1] = False
    mask = np.stack(rows)[:, None]  # [6, 1, q, k]
    seq, ok_plain, ok_causal = attention_mask_layout_jnp(jnp.asarray(mask), q_len, kv_len)
    got = list(zip(np.asarray(seq).tolist(), np.asarray(ok_plain).tolist(), np.asarray(ok_causal).tolist()))
    assert got == flax_expected(mask.tolist())
    jitted = jax.jit(lambda m: attention_mask_layout_jnp(m, q_len, kv_len))(jnp.asarray(mask))
    assert [np.asarray(x).tolist() for x in jitted] == [np.asarray(x).tolist() for x in (seq, ok_plain, ok_causal)]
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, 1 \| heads, q_len, kv_len\]"):
        attention_mask_layout_jnp(jnp.ones((2, 4, 6), bool), q_len, kv_len)
