"""Host time per call of each layer of the sparse24 decode path, on the GPU (no sync inside).

The HF decode step is host-bound: this times, for one decode-shaped call (B=8, H 32/8,
D=64, kv 4096, bf16), every layer from the raw Triton launch up to ``sparse24.hf.attention_forward``,
beside ``F.scaled_dot_product_attention`` on the same tensors, then one HF decode step of a
random-weight Llama-3.2-1B-shaped model per implementation (wall, and the Python functions with the most
own time under cProfile). GPU only.

    python -P benchmarks/profile_host_time.py [--steps 16]
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pstats
import time

import torch


def per_call_us(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return host


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-model", action="store_true")
    args = p.parse_args()
    import sparse24.hf as hf
    from sparse24 import SparsityConfig
    from sparse24.kernels.launch import unified_attention_launches
    from sparse24.torch_ops import _launch as L
    from sparse24.torch_ops import api as A
    from sparse24.validation import prepare_unified_attention

    B, Hq, Hk, D, S = 8, 32, 8, 64, 4096
    dev, dt = "cuda", torch.bfloat16

    class Mod(torch.nn.Module):
        is_causal = True

    mod = Mod()
    q4 = torch.randn(B, 1, Hq, D, device=dev, dtype=dt).transpose(1, 2)  # [B, H, 1, D] as HF gives it
    k4 = torch.randn(B, Hk, S, D, device=dev, dtype=dt)
    v4 = torch.randn(B, Hk, S, D, device=dev, dtype=dt)
    mask = torch.ones(B, S, dtype=torch.long, device=dev)
    rows = {}
    rows["sdpa (enable_gqa)"] = per_call_us(lambda: torch.nn.functional.scaled_dot_product_attention(
        q4, k4, v4, enable_gqa=True, scale=0.125))
    rows["torch.empty_like(q)"] = per_call_us(lambda: torch.empty_like(q4))
    for name, cfg in (("dense", SparsityConfig.dense()), ("2:4", SparsityConfig.parse("2:4"))):
        mod.sparse24_config = cfg
        for fast in (False, True):
            L.FAST_LAUNCH = fast
            rows[f"{name}: hf.attention_forward (layout cached, fast launch {fast})"] = per_call_us(
                lambda: hf.attention_forward(mod, q4, k4, v4, mask, scaling=0.125))
        kc, ppr = hf._paged_view(k4)
        vc, _ = hf._paged_view(v4)
        lay = hf._layout(mask, None, batch=B, q_len=1, kv_len=S, pages_per_row=ppr, sliding=False, config=cfg,
                         device=q4.device, dtype=dt).layout
        qp = q4.transpose(1, 2).reshape(B, Hq, D)
        out = torch.empty_like(qp)
        call = (qp, kc, vc, lay.block_table, lay.cu_seqlens_q, lay.seq_lens)
        kw = dict(config=cfg, softmax_scale=0.125, out=out, max_seqlen_q=1, max_seqlen_k=S)
        rows[f"{name}: torch_ops.unified_attention (maxima)"] = per_call_us(lambda: A.unified_attention(*call, **kw))
        rows[f"{name}: prepare_unified_attention"] = per_call_us(lambda: prepare_unified_attention(
            *call, framework="torch", config=cfg, causal=True, softmax_scale=0.125, window=None, softcap=None,
            return_lse=False, out=out, max_seqlen_q=1, max_seqlen_k=S, num_kv_splits=None, read_metadata=None))
        lse = torch.empty((1, 1), dtype=torch.float32, device=dev)
        largs = (*call, out, lse, cfg.n, cfg.m, cfg.dense_sink_tokens, cfg.dense_recent_tokens, cfg.sparse_decode,
                 True, 0.125, 0, 0.0, 1, S, 0, False)
        rows[f"{name}: launch_unified_attention(direct)"] = per_call_us(
            lambda: L.launch_unified_attention(*largs, direct=True))
        desc = dict(q_shape=tuple(qp.shape), dtype="bfloat16", cache_shape=tuple(kc.shape), num_seqs=B, n=cfg.n,
                    m=cfg.m, dense_sink_tokens=cfg.dense_sink_tokens, dense_recent_tokens=cfg.dense_recent_tokens,
                    sparse_decode=cfg.sparse_decode, causal=True, softmax_scale=0.125, window=0, softcap=0.0,
                    max_seqlen_q=1, max_seqlen_k=S, store_lse=False, num_kv_splits=None,
                    num_sms=L.num_sms(q4.device), interpret=False, q_strides=tuple(qp.stride()),
                    k_cache_strides=tuple(kc.stride()), v_cache_strides=tuple(vc.stride()),
                    block_table_strides=tuple(lay.block_table.stride()), out_strides=tuple(out.stride()))
        rows[f"{name}: unified_attention_launches (cached)"] = per_call_us(lambda: unified_attention_launches(**desc))
        launches = unified_attention_launches(**desc)
        rows[f"{name}: launches"] = len(launches)
        env = dict(q=qp, k_cache=kc, v_cache=vc, block_table=lay.block_table, cu_seqlens_q=lay.cu_seqlens_q,
                   seq_lens=lay.seq_lens, out=out, lse=lse)
        for i, la in enumerate(launches):
            ins = [env[a] for a in la.input_arrays]
            outs = [env[o.array] if o.array in env else torch.empty(o.shape, dtype=L._TORCH_DTYPES[o.dtype],
                                                                    device=dev) for o in la.outputs]
            env.update(zip(la.output_arrays, outs))
            kern = la.kernel
            rows[f"{name}: raw triton launch {i} ({kern.fn.__name__ if hasattr(kern, 'fn') else kern.__name__}, "
                 f"{len(ins) + len(outs) + len(la.keywords)} args)"] = per_call_us(
                functools.partial(kern[la.grid], *ins, *outs, **la.keywords, num_warps=la.num_warps,
                                  num_stages=la.num_stages))
    for k, v in rows.items():
        print(f"{k:70s} {v:9.1f}" + (" us" if isinstance(v, float) else ""))
    mod.sparse24_config = SparsityConfig.dense()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        hf.attention_forward(mod, q4, k4, v4, mask, scaling=0.125)
    torch.cuda.synchronize()
    pr.disable()
    print("===== cProfile of 200 hf.attention_forward calls (dense)")
    pstats.Stats(pr).sort_stats("tottime").print_stats(40)
    if args.no_model:
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, dt).eval()
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=dev)
    for impl in ("sdpa", "sparse24-dense", "sparse24-2:4"):
        model.set_attn_implementation("sdpa" if impl == "sdpa" else "sparse24")
        if impl != "sdpa":
            hf.sparsify(model, SparsityConfig.dense() if impl.endswith("dense") else SparsityConfig.parse("2:4"))
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            cache, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            state = dict(mask=torch.ones(B, S, dtype=torch.long, device=dev), nxt=nxt)

            def step():
                state["mask"] = torch.cat([state["mask"], state["mask"][:, :1]], 1)
                o = model(input_ids=state["nxt"], attention_mask=state["mask"], past_key_values=cache, use_cache=True)
                state["nxt"] = o.logits[:, -1:].argmax(-1)

            for _ in range(40):  # past every kv_len specialisation of the first steps
                step()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            times.sort()
            print(f"===== {impl}: decode step {times[len(times) // 2]:.2f} ms median (min {times[0]:.2f}, "
                  f"max {times[-1]:.2f}), synchronised per step")
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(4):
                step()
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
