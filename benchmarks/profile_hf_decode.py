"""Profile HF decode steps (torch.profiler): where the time of a sparse24 decode step goes.

A random-weight Llama-3.2-1B-shaped model (bf16, 16 layers), B=8, prompt 4096, dynamic cache;
after the prefill, ``--steps`` decode steps under the profiler for each attention
implementation. Prints the top CUDA kernels and host ops. GPU only.

    python benchmarks/profile_hf_decode.py --impl sdpa,sparse24 --steps 8
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", default="sdpa,sparse24")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cprofile", action="store_true", help="also print the Python functions with the most own time")
    p.add_argument("--cprofile-filter", default=None, metavar="REGEX",
                   help="--cprofile: only functions whose path matches REGEX (e.g. 'sparse24|triton'), by own and "
                        "by cumulative time")
    p.add_argument("--insitu", type=int, default=0,
                   help="time (perf_counter, no sync) the attention and mask functions inside generate with this "
                        "many new tokens: host time per decode step spent in each, beside the step's wall time")
    p.add_argument("--cold", action="store_true", help="--insitu: clear sparse24.hf's plans before each generate")
    p.add_argument("--generate", type=int, default=0,
                   help="profile model.generate with this many new tokens instead of hand-written decode steps")
    args = p.parse_args()
    import sparse24.hf
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                      tie_word_embeddings=True, max_position_embeddings=8192)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device="cuda")
    for impl in args.impl.split(","):
        model.set_attn_implementation(impl)
        if impl == "sparse24":
            sparse24.hf.dense(model)
        if args.insitu:
            _insitu(model, ids, impl, args)
            continue
        if args.generate:
            _profile_generate(model, ids, impl, args)
            continue
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            mask = torch.ones(args.batch, args.prompt, dtype=torch.long, device="cuda")

            def step():
                nonlocal mask, nxt
                mask = torch.cat([mask, mask[:, :1]], 1)
                o = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)

            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / args.steps * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
        print(f"===== {impl}: {wall:.2f} ms/step wall (no profiler)")
        if args.cprofile:
            import cProfile
            import pstats

            py = cProfile.Profile()
            with torch.no_grad():
                py.enable()
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
                py.disable()
            if args.cprofile_filter:  # the functions of these paths only, by own time and by cumulative time
                pstats.Stats(py).sort_stats("tottime").print_stats(args.cprofile_filter, 30)
                pstats.Stats(py).sort_stats("cumtime").print_stats(args.cprofile_filter, 30)
            else:
                pstats.Stats(py).sort_stats("tottime").print_stats(25)
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))


def _insitu(model, ids, impl: str, args) -> None:
    """Host time per decode step inside ``generate`` (no profiler): the attention function, the
    mask function and (sparse24) the layout and the kernel launches, each wrapped in
    perf_counter; per step = (total of generate(new) - total of generate(1)) / (new - 1)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import sparse24.hf as hf
    import sparse24.torch_ops.api as api

    acc: dict[str, list] = {}

    def timed(name, fn):
        rec = acc.setdefault(name, [0.0, 0])

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                rec[0] += time.perf_counter() - t
                rec[1] += 1
        return wrapper

    name = "sparse24" if impl.startswith("sparse24") else impl
    patched = [(ALL_ATTENTION_FUNCTIONS._global_mapping, name), (ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name)]
    if name == "sparse24":
        import sparse24.torch_ops as ops
        import sparse24.kernels.launch as description
        import sparse24.torch_ops._launch as launch

        patched += [(vars(hf), "_layout"), (vars(hf), "_fused_decode_step"), (vars(ops), "plan_unified_attention"),
                    (vars(api), "_launch_unified"), (vars(launch), "unified_attention_launches"),
                    (vars(launch), "_fast_launch"), (vars(hf), "_can_sync"), (vars(hf), "_rebound_step"),
                    (vars(api), "launch_decode_mask_layout"),
                    (vars(description), "rebound_unified_attention_launches")]
    patched.insert(0, (vars(model), "forward"))  # the model's forward (instance attribute), host time
    model.forward = model.forward
    saved = [(d, k, d[k]) for d, k in patched]
    for i, (d, k) in enumerate(patched):
        d[k] = timed(("model forward", "attention fn", "mask fn")[i] if i < 3 else k, d[k])
    if name == "sparse24":  # methods, patched on their classes
        classes = [(api.UnifiedAttentionPlan, "direct"), (api.UnifiedAttentionPlan, "__call__"),
                   (api.UnifiedAttentionPlan, "rebind"), (launch.DirectLaunches, "rebind")]
        saved_methods = [(c, k, c.__dict__[k]) for c, k in classes]
        for c, k in classes:
            setattr(c, k, timed(f"{c.__name__}.{k}", c.__dict__[k]))
    else:
        saved_methods = []

    def gen(new):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    try:
        new = args.insitu
        gen(new + 2)
        res = {}
        for n in (1, new):
            if args.cold:  # what one generate of new lengths meets: no plan of these call forms yet
                hf._PLANS.clear()
                hf._LAYOUTS.clear()
            for rec in acc.values():
                rec[0], rec[1] = 0.0, 0
            torch.cuda.synchronize()
            t = time.perf_counter()
            gen(n)
            torch.cuda.synchronize()
            res[n] = ((time.perf_counter() - t), {k: tuple(v) for k, v in acc.items()})
        step = (res[new][0] - res[1][0]) / (new - 1) * 1e3
        print(f"===== {impl} in situ{' (cold plans)' if args.cold else ''}: {step:.2f} ms per decode step (wall difference of {new} and 1 new tokens)")
        for k in res[new][1]:
            (t_n, c_n), (t_1, c_1) = res[new][1][k], res[1][1][k]
            calls = (c_n - c_1) / (new - 1)
            ms = (t_n - t_1) / (new - 1) * 1e3
            print(f"  {k:18s} {ms:8.3f} ms/step host  {calls:6.1f} calls/step  {ms / max(calls, 1) * 1e3:8.1f} us/call")
    finally:
        for d, k, v in saved:
            d[k] = v
        for c, k, v in saved_methods:
            setattr(c, k, v)
        del model.forward


def _profile_generate(model, ids, impl: str, args) -> None:
    """Host time per decode step of ``generate``, by function and by op: each profile is the
    difference of ``generate(new)`` and ``generate(1)`` (the prefill and setup cancel out),
    divided by ``new - 1``."""
    import cProfile
    import pstats

    def gen(new):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    new = args.generate
    gen(new + 2)  # warm: every kernel specialisation compiled
    walls = {}
    for n in (1, new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen(n)
        torch.cuda.synchronize()
        walls[n] = (time.perf_counter() - t) * 1e3
    print(f"===== {impl} generate: {(walls[new] - walls[1]) / (new - 1):.2f} ms per decode step "
          f"(wall difference of {new} and 1 new tokens)")

    def functions(n):
        py = cProfile.Profile()
        py.enable()
        gen(n)
        torch.cuda.synchronize()
        py.disable()
        return {f"{k[0].rsplit('site-packages/', 1)[-1]}:{k[1]}({k[2]})": (v[1], v[2], v[3])
                for k, v in pstats.Stats(py).stats.items()}  # ncalls, tottime, cumtime

    one, many = functions(1), functions(new)
    rows = []
    for name, (calls, tot, cum) in many.items():
        c1, t1, u1 = one.get(name, (0, 0.0, 0.0))
        rows.append(((cum - u1) / (new - 1) * 1e3, (tot - t1) / (new - 1) * 1e3, (calls - c1) / (new - 1), name))
    print(f"----- {impl}: per decode step under cProfile (ms cumulative, ms own, calls), by cumulative")
    for cum, tot, calls, name in sorted(rows, reverse=True)[:40]:
        print(f"{cum:9.3f} {tot:9.3f} {calls:8.1f}  {name}")
    print(f"----- {impl}: by own time")
    for cum, tot, calls, name in sorted(rows, key=lambda r: -r[1])[:25]:
        print(f"{cum:9.3f} {tot:9.3f} {calls:8.1f}  {name}")

    def ops(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            gen(n)
            torch.cuda.synchronize()
        return {e.key: (e.count, e.self_cpu_time_total, e.self_device_time_total) for e in prof.key_averages()}

    o1, on = ops(1), ops(new)
    diff = []
    for key, (count, cpu, dev) in on.items():
        c1, p1, d1 = o1.get(key, (0, 0.0, 0.0))
        diff.append(((cpu - p1) / (new - 1) / 1e3, (dev - d1) / (new - 1) / 1e3, (count - c1) / (new - 1), key))
    print(f"----- {impl}: per decode step under torch.profiler (ms self CPU, ms self device, calls)")
    for cpu, dev, count, key in sorted(diff, reverse=True)[:30]:
        print(f"{cpu:9.3f} {dev:9.3f} {count:8.1f}  {key[:80]}")
    print(f"      total self CPU {sum(d[0] for d in diff):.2f} ms, self device {sum(d[1] for d in diff):.2f} ms "
          "per decode step")


if __name__ == "__main__":
    main()
