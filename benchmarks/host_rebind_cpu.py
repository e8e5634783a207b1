"""Host time of an HF decode step's re-description on the CPU, no GPU needed.

A dynamic cache makes every decode step a new call form (new cache strides, a longer mask).
The step's first layer re-describes its launches from the previous step's; this times that
Python, with the real kernels' descriptions and Triton's specialisation rules, in a process
without the interpreter:

- attention, session 12: ``rebound_unified_attention_launches`` (a planner call: the bound is
  the key length) and ``_rebound_keywords`` over every keyword of both launches;
- attention, session 13: ``key_side_parameters`` (the bound is the table's padded width, so no
  planner call) and ``_replaced_keywords`` of the ten stride parameters;
- mask layout, session 12: a new description per step and its fast-launch entry (keywords in
  the kernel's order, Triton's specialisation);
- mask layout, session 13: ``mask_layout_parameters`` and ``_replaced_keywords``.

The launches themselves are not included. Run: ``env -u TRITON_INTERPRET python
benchmarks/host_rebind_cpu.py`` (benchmarks/NOTES.md, session 13).
"""

import timeit

from sparse24.kernels import launch as L
from sparse24.torch_ops import _launch as TL

if TL.INTERPRETED:
    raise SystemExit("run without TRITON_INTERPRET: the compiled kernels' parameters are read")
B, H, HKV, D = 8, 32, 8, 64  # Llama-3.2-1B's attention at batch 8 (dense: n = m = 4)
STEPS = 2000


def attention_call(length: int, bound: int | None = None) -> dict:
    """unified_attention_launches' arguments for the decode step at key length ``length``
    (one-slot pages of a [B, H_kv, L, D] cache, a table padded to 16 columns)."""
    width = -(-length // 16) * 16
    return dict(q_shape=(B, H, D), dtype="bfloat16", cache_shape=((B - 1) * HKV * length + length, 1, HKV, D),
                num_seqs=B, n=4, m=4, dense_sink_tokens=0, dense_recent_tokens=0, sparse_decode=True, causal=True,
                softmax_scale=0.125, window=0, softcap=0.0, max_seqlen_q=1, max_seqlen_k=bound or length,
                store_lse=False, store_stats=False, num_kv_splits=None, num_sms=132, interpret=False, row_fixup=True,
                q_strides=(H * D, D, 1), k_cache_strides=(D, D, length * D, 1), v_cache_strides=(D, D, length * D, 1),
                block_table_strides=(width, 1), out_strides=(H * D, D, 1))


def mask_call(length: int) -> dict:
    return dict(mask_shape=(B, length), mask_strides=(length, 1), signed_mask=False, kv_len=length,
                pages_per_row=length, out_dtype="bfloat16", width=-(-length // 16) * 16)


def main() -> None:
    if TL.INTERPRETED:
        raise SystemExit("run without TRITON_INTERPRET: the compiled kernels' parameters are read")
    before = L.unified_attention_launches(**attention_call(4100))
    before_w = L.unified_attention_launches(**attention_call(4100, 4112))
    trailing = TL._keyword_table(before_w[0])[1](before_w[0].keywords)
    mask_before = L.decode_mask_layout_launches(**mask_call(4100))
    mask_trailing = TL._keyword_table(mask_before[0])[1](mask_before[0].keywords)
    step = iter(range(10**9))

    def attention_12():
        new = L.rebound_unified_attention_launches(before, **attention_call(4101 + next(step) % 8))
        return [TL._rebound_keywords(o, n) for o, n in zip(before, new)]

    def attention_13():
        strides = L.key_side_parameters(before_w, **attention_call(4101 + next(step) % 8, 4112))
        return TL._replaced_keywords(before_w[0], strides, trailing)

    def mask_12():  # the builder itself: each step's description is new (the memo misses)
        launch = L.decode_mask_layout_launches.__wrapped__(**mask_call(4101 + next(step) % 8))[0]
        return TL._keyword_table(launch)[1](launch.keywords), TL._specialization(launch)

    def mask_13():
        changes = L.mask_layout_parameters(mask_before, **mask_call(4101 + next(step) % 8))
        return TL._replaced_keywords(mask_before[0], changes, mask_trailing)

    for name, fn in (("attention: re-description (session 12)", attention_12),
                     ("attention: strides only (session 13)", attention_13),
                     ("mask layout: description + fast-launch entry (session 12)", mask_12),
                     ("mask layout: rebind (session 13)", mask_13)):
        assert fn() is not None
        us = min(timeit.repeat(fn, number=STEPS, repeat=5)) / STEPS * 1e6
        print(f"{name}: {us:.1f} us per step")


if __name__ == "__main__":
    main()
