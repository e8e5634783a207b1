"""HF dynamic-cache decode, interleaved, and the split-KV choice for eager decode (one GPU run).

Three parts, one process, one card:

``kernel``  the bare decode kernel (``torch_ops.unified_attention`` with the maxima given) at
            B=8, H 32/8, D=64, bf16 (the Llama-3.2-1B shape), kv_len 512 .. 8192, with the
            planner's split-KV count and with ``num_kv_splits=1``:
              device  µs per call from a CUDA graph of 20 calls (replayed, events around it);
              eager   µs per call of 200 back-to-back eager calls between two syncs (what a
                      host-bound caller gets: the larger of host and device time).
``paired``  decode steps of the variants side by side (``--paired`` steps each, one model, a
            dynamic cache per variant): each step timed alone, the per-step ratio to the
            neighbouring sdpa step (see ``paired_part``).
``hf``      ``generate`` on a random-weight Llama-3.2-1B-shaped model (bf16, B=8, prompt
            ``--prompt``, ``--new`` new tokens, the default dynamic cache), the variants taken
            in turn, ``--rounds`` times (sdpa, sparse24 dense, 2:4, ...: round-robin, so a
            host that slows down or speeds up during the run moves every variant alike).
            Per run: the median of the decode steps' CUDA-event gaps (a logits processor
            records one event per token, no sync); per variant: the median over rounds and
            the best round (the least disturbed by the host: lent hosts are noisy).
            ``*-unsplit`` variants force ``num_kv_splits=1`` for the decode layers
            (sparse24.hf.decode_kv_splits). ``/ sdpa``: the median over rounds of each
            run's ratio to the sdpa run of its round (the host drifts between rounds; the
            ratio of neighbours is steadier than either median). ``--vary-prompt K``: round
            r's prompt is ``--prompt + K r`` tokens, so no round meets cached shapes (a
            new prompt's case: sdpa's cuDNN path builds a plan per new key length).

    python benchmarks/bench_hf_decode.py [--rounds 5] [--new 64] [--prompt 4096] [--out DIR]

Writes ``hf-decode-<card>.json`` (every run's figures, the card, date, versions) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _common as common  # noqa: E402

LLAMA_1B = common.LLAMA_1B


def kernel_part(kv_lens, records: list) -> None:
    from sparse24 import SparsityConfig
    from sparse24.testing import make_paged_inputs
    from sparse24.torch_ops import plan_unified_attention, unified_attention

    B, HQ, HKV, D = 8, 32, 8, 64
    for config_name, config in (("dense", SparsityConfig.dense()), ("2:4", SparsityConfig())):
        for kv_len in kv_lens:
            inputs = make_paged_inputs([1] * B, [kv_len] * B, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                                       block_size=16, dtype=torch.bfloat16, device="cuda", seed=0)
            args = (inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, inputs.cu_seqlens_q,
                    inputs.seq_lens)
            outs = {}
            for splits in (None, 1):
                options = dict(config=config, max_seqlen_q=1, max_seqlen_k=kv_len, num_kv_splits=splits)
                plan = plan_unified_attention(*args, **options)
                out = torch.empty_like(inputs.q)
                plan(*args, out=out)
                torch.cuda.synchronize()
                outs[splits] = out.clone()
                # device time: a CUDA graph of 20 calls
                graph = torch.cuda.CUDAGraph()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    unified_attention(*args, out=out, **options)  # warm-up on the capture stream
                    torch.cuda.synchronize()
                    with torch.cuda.graph(graph, stream=stream):
                        for _ in range(20):
                            unified_attention(*args, out=out, **options)
                torch.cuda.synchronize()
                samples = []
                for _ in range(5):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end) * 1e3 / 20)
                device_us = statistics.median(samples)
                # eager: back-to-back calls of the plan (the HF backend's path)
                eager = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    for _ in range(200):
                        plan(*args, out=out)
                    torch.cuda.synchronize()
                    eager.append((time.perf_counter() - t) / 200 * 1e6)
                records.append(dict(part="kernel", config=config_name, batch=B, heads=f"{HQ}/{HKV}", head_dim=D,
                                    kv_len=kv_len, num_kv_splits=splits or "planner",
                                    launches=len(plan.state.get("launches", ())),
                                    device_us=round(device_us, 2), eager_us=round(statistics.median(eager), 2)))
                print(json.dumps(records[-1]), flush=True)
            err = (outs[None].float() - outs[1].float()).abs().max().item()
            records[-1]["max_abs_diff_split_vs_unsplit"] = err


def random_llama():
    """(config, model): the random-weight Llama-3.2-1B-shaped model on the GPU, bf16, sdpa."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    return cfg, model.eval()


def hf_part(args, records: list) -> None:
    from transformers import LogitsProcessorList

    import sparse24.hf
    from sparse24 import SparsityConfig

    cfg, model = random_llama()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    gen = torch.Generator(device="cpu").manual_seed(1)
    longest = args.prompt + args.vary_prompt * max(args.rounds - 1, 0)
    all_ids = torch.randint(1, cfg.vocab_size, (args.batch, longest), generator=gen).cuda()
    configs = {"dense": SparsityConfig.dense(), "2:4": SparsityConfig()}

    def use(variant: str) -> None:
        if variant == "sdpa":
            model.set_attn_implementation("sdpa")
            return
        name, _, split = variant.removeprefix("sparse24-").partition("-")
        model.set_attn_implementation("sparse24")
        sparse24.hf.sparsify(model, configs[name])
        sparse24.hf.decode_kv_splits(1 if split == "unsplit" else None)

    def generate(new: int, events=None, prompt: int = args.prompt):
        extra = dict(logits_processor=LogitsProcessorList([events])) if events is not None else {}
        input_ids = all_ids[:, :prompt]
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0, **extra)

    variants = args.variants.split(",")
    tokens = {}
    for variant in variants:  # warm-up: every kernel compiled before anything is timed
        use(variant)
        tokens[variant] = generate(8)[:, args.prompt:]
    for r in range(args.rounds):
        prompt = args.prompt + args.vary_prompt * r  # --vary-prompt: no round meets the lengths of another
        for variant in variants:
            use(variant)
            ev = common.StepEvents()
            torch.cuda.synchronize()
            t = time.perf_counter()
            ev.mark()
            out = generate(args.new, ev, prompt)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) * 1e3
            gaps = ev.gaps_ms()
            dec = gaps[1:]
            rec = dict(part="hf", variant=variant, round=r, prompt=prompt, decode_ms_step_median=round(statistics.median(dec), 4),
                       decode_ms_step_min=round(min(dec), 4), prefill_ms=round(gaps[0], 3),
                       generate_wall_ms=round(wall, 2))
            if variant != "sdpa" and prompt == args.prompt:
                rec["first8_tokens_equal_to_sdpa"] = round(float((out[:, args.prompt:args.prompt + 8]
                                                                  == tokens["sdpa"]).float().mean()), 4)
            records.append(rec)
            print(json.dumps(rec), flush=True)
    sparse24.hf.decode_kv_splits(None)


class _StepParts:
    """``--attribute``: one decode step's host time by part, from perf_counter wrappers around
    transformers' attention functions (sdpa's and sparse24's: the first layer apart from the
    others), its mask functions and ``create_causal_mask`` (the mask of the forward), plus
    the time to queue the step (until the token's read) and the wait for the device. The
    wrappers cost the same ~1 µs per call for every variant."""

    def __init__(self):
        import transformers.models.llama.modeling_llama as llama
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.calls: list = []
        slots = [(m, name, label) for m, label in ((ALL_ATTENTION_FUNCTIONS._global_mapping, "attention"),
                                                   (ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "mask fn"))
                 for name in ("sdpa", "sparse24")] + [(vars(llama), "create_causal_mask", "create_causal_mask")]
        self.originals = [(m, name, m[name]) for m, name, _ in slots]
        self.wrapped = [(m, name, self._timed(label, m[name])) for m, name, label in slots]
        self.patch()
        self.gc_started = None
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info) -> None:
        """Python's garbage collections within the step (allocation-triggered: they land in
        whichever part allocates, mostly the rest of the step)."""
        if phase == "start":
            self.gc_started = time.perf_counter()
        elif self.gc_started is not None:
            self.calls.append(("gc", time.perf_counter() - self.gc_started))
            self.gc_started = None

    def patch(self) -> None:
        for mapping, name, fn in self.wrapped:
            mapping[name] = fn

    def restore(self) -> None:
        """The functions themselves (sparsify checks that the layers reach sparse24's)."""
        for mapping, name, fn in self.originals:
            mapping[name] = fn

    def _timed(self, label, fn):
        calls = self.calls

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                calls.append((label, time.perf_counter() - t))
        return wrapper

    def start(self) -> None:
        self.calls.clear()

    def stop(self, queued_s: float) -> dict:
        attention = [s for label, s in self.calls if label == "attention"]
        mask = sum(s for label, s in self.calls if label == "create_causal_mask")
        out = {"queue step": queued_s, "attention, layer 0": attention[0] if attention else 0.0,
               "attention, other layers (mean)": sum(attention[1:]) / max(len(attention) - 1, 1),
               "attention, all layers": sum(attention), "create_causal_mask": mask,
               "garbage collection": sum(s for label, s in self.calls if label == "gc"),
               "rest of the step (queue - attention - mask)": queued_s - sum(attention) - mask}
        return {k: v * 1e6 for k, v in out.items()}


def paired_part(args, records: list) -> None:
    """Decode steps of the variants side by side: one model, one dynamic cache per variant
    (the same prompt prefilled by each), then ``--paired`` steps in which every variant takes
    one decode step in turn (the order rotates every step), each timed alone: the mask
    update generate makes, the model forward, the next token's argmax, a sync. Neighbouring
    steps are ~15 ms apart, so a host whose speed drifts by 2x within a minute moves them
    alike: the per-step ratio to sdpa is the comparison (median over steps, with a bootstrap
    95% interval of that median). Every step meets a key length new to the process (as a
    fresh generate does); ``--paired-twice`` repeats the whole pass through the same lengths
    (as a generate of a prompt length seen before does), where sdpa's cuDNN path finds its
    per-length plans cached."""
    import random

    import sparse24.hf
    from sparse24 import SparsityConfig

    cfg, model = random_llama()
    ids = torch.randint(1, cfg.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1)).cuda()
    configs = {"sparse24-dense": SparsityConfig.dense(), "sparse24-2:4": SparsityConfig()}
    variants = [v for v in args.variants.split(",") if v == "sdpa" or v in configs]
    sparse24.hf.decode_kv_splits(None)
    parts = _StepParts() if args.attribute else None

    def use(variant: str) -> None:
        model.set_attn_implementation("sdpa" if variant == "sdpa" else "sparse24")
        if variant != "sdpa":
            if parts is not None:
                parts.restore()
            sparse24.hf.sparsify(model, configs[variant])
            if parts is not None:
                parts.patch()

    rng = random.Random(0)
    passes = ("new lengths", "lengths seen before") if args.paired_twice else ("new lengths",)
    for pass_name in passes:  # the second pass decodes through the same key lengths again
        state = {}
        with torch.no_grad():
            for v in variants:
                use(v)
                mask = torch.ones_like(ids)
                out = model(input_ids=ids, attention_mask=mask, use_cache=True)
                state[v] = [out.past_key_values, mask, out.logits[:, -1:].argmax(-1)]

            def step(v):
                cache, mask, nxt = state[v]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)  # what generate does per token
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                state[v] = [cache, mask, out.logits[:, -1:].argmax(-1)]

            for _ in range(8):  # warm-up: every kernel of these shapes compiled
                for v in variants:
                    use(v)
                    step(v)
            times = {v: [] for v in variants}
            split = {v: [] for v in variants}  # --attribute: each step's host time by part
            for i in range(args.paired):
                order = variants[i % len(variants):] + variants[: i % len(variants)]
                for v in order:
                    use(v)
                    torch.cuda.synchronize()
                    if parts is not None:
                        parts.start()
                    t = time.perf_counter()
                    step(v)
                    queued = time.perf_counter()
                    state[v][2].view(-1)[0].item()  # the token on the host, as generate's stop check needs it
                    times[v].append((time.perf_counter() - t) * 1e3)
                    if parts is not None:
                        split[v].append(parts.stop(queued - t))
        for v in variants:
            ratios = [a / b for a, b in zip(times[v], times["sdpa"])] if "sdpa" in times else []
            rec = dict(part="paired", variant=v, steps=args.paired, prompt=args.prompt, key_lengths=pass_name,
                       step_ms_median=round(statistics.median(times[v]), 4), step_ms_min=round(min(times[v]), 4))
            if ratios and v != "sdpa":
                boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
                rec.update(ratio_to_sdpa_median=round(statistics.median(ratios), 4),
                           ratio_to_sdpa_ci95=[round(boot[50], 4), round(boot[1949], 4)],
                           steps_faster_than_sdpa=sum(r < 1 for r in ratios))
            if split[v]:  # medians over steps, µs
                rec["host_us_median"] = {k: round(statistics.median(s[k] for s in split[v]), 1) for k in split[v][0]}
            records.append(rec)
            print(json.dumps(rec), flush=True)


def table(result: dict) -> str:
    env = result["env"]
    lines = [f"{env['card']}, {env['date']}, sparse24 {env['version']}, torch {env['torch']}, "
             f"transformers {env['transformers']}", ""]
    kern = [r for r in result["records"] if r["part"] == "kernel"]
    if kern:
        lines += ["Bare decode kernel, B=8, H 32/8, D=64, bf16 (µs per call)", "",
                  "| config | kv_len | splits | launches | device (graph) | eager (back-to-back) |",
                  "|---|---|---|---|---|---|"]
        for r in kern:
            lines.append(f"| {r['config']} | {r['kv_len']} | {r['num_kv_splits']} | {r['launches']} | {r['device_us']:.1f} | "
                         f"{r['eager_us']:.1f} |")
        lines.append("")
    hf = [r for r in result["records"] if r["part"] == "hf"]
    if hf:
        m = result["model"]
        lines += [f"HF generate, dynamic cache, random Llama-3.2-1B shape, bf16, B={m['batch']}, prompt {m['prompt']}, "
                  f"{m['new']} new tokens; median ms/step per run, median over {m['rounds']} interleaved rounds"
                  + (f"; round r's prompt is {m['prompt']} + {m['vary_prompt']} r tokens" if m.get("vary_prompt") else "")
                  + "; / sdpa: the median over rounds of the run's ratio to sdpa's run of the same round", "",
                  "| variant | median over rounds | best round | / sdpa | per round |", "|---|---|---|---|---|"]
        sdpa = {r["round"]: r["decode_ms_step_median"] for r in hf if r["variant"] == "sdpa"}
        for variant in dict.fromkeys(r["variant"] for r in hf):
            runs = [r["decode_ms_step_median"] for r in hf if r["variant"] == variant]
            ratios = [r["decode_ms_step_median"] / sdpa[r["round"]] for r in hf
                      if r["variant"] == variant and r["round"] in sdpa]
            ratio = f"{statistics.median(ratios):.3f}" if ratios else "-"
            lines.append(f"| {variant} | {statistics.median(runs):.2f} | {min(runs):.2f} | {ratio} | "
                         f"{', '.join(f'{x:.2f}' for x in runs)} |")
    paired = [r for r in result["records"] if r["part"] == "paired"]
    if paired:
        m = result["model"]
        lines += ["", f"Paired decode steps (one model, a dynamic cache per variant, B={m['batch']}, prompt {m['prompt']}; "
                  f"every variant takes one step in turn, {paired[0]['steps']} steps each, each step timed alone with "
                  "its sync); / sdpa: the median over steps of the step's ratio to its neighbouring sdpa step, "
                  "with a bootstrap 95% interval", "",
                  "| key lengths | variant | median ms/step | best | / sdpa | 95% interval | steps faster than sdpa |",
                  "|---|---|---|---|---|---|---|"]
        for r in paired:
            ci = r.get("ratio_to_sdpa_ci95")
            lines.append(f"| {r.get('key_lengths', 'new lengths')} | {r['variant']} | {r['step_ms_median']:.2f} | {r['step_ms_min']:.2f} | "
                         f"{r.get('ratio_to_sdpa_median', 1.0):.3f} | {f'{ci[0]:.3f}-{ci[1]:.3f}' if ci else '-'} | "
                         f"{r.get('steps_faster_than_sdpa', '-')} |")
        split = [r for r in paired if r.get("host_us_median")]
        if split:  # --attribute
            names = list(split[0]["host_us_median"])
            lines += ["", "Host time of one decode step by part (µs, median over steps; --attribute)", "",
                      "| key lengths | variant | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for r in split:
                lines.append(f"| {r.get('key_lengths', 'new lengths')} | {r['variant']} | "
                             + " | ".join(f"{r['host_us_median'][k]:.0f}" for k in names) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--prompt", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vary-prompt", type=int, default=0,
                   help="round r's prompt is --prompt + r * this many tokens (0: the same prompt every round; "
                        "then every round after the first meets cached shapes, e.g. cuDNN's plans)")
    p.add_argument("--stem", default=None, help="output file name stem (default hf-decode-<card>)")
    p.add_argument("--variants", default="sdpa,sparse24-dense,sparse24-dense-unsplit,sparse24-2:4,"
                                         "sparse24-2:4-unsplit")
    p.add_argument("--kv-lens", default="512,1024,2048,4096,8192")
    p.add_argument("--parts", default="kernel,hf", help="kernel, hf, paired")
    p.add_argument("--paired", type=int, default=200, help="paired: decode steps per variant")
    p.add_argument("--paired-twice", action="store_true",
                   help="paired: a second pass through the same key lengths (sdpa's cuDNN path keeps a plan per "
                        "key length: the first pass meets new lengths, the second cached ones)")
    p.add_argument("--attribute", action="store_true",
                   help="paired: each step's host time by part (attention per layer, masks, the rest; see _StepParts)")
    p.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = p.parse_args()

    import transformers
    import triton

    import sparse24

    card = torch.cuda.get_device_name()
    env = dict(card=card, date=datetime.date.today().isoformat(), version=sparse24.__version__,
               torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    records: list = []
    parts = args.parts.split(",")
    if "kernel" in parts:
        kernel_part([int(x) for x in args.kv_lens.split(",")], records)
    if "hf" in parts:
        hf_part(args, records)
    if "paired" in parts:
        paired_part(args, records)
    result = dict(env=env, model=dict(llama=LLAMA_1B, batch=args.batch, prompt=args.prompt, new=args.new,
                                      rounds=args.rounds, vary_prompt=args.vary_prompt, cache="dynamic (transformers' default)"),
                  method=__doc__, records=records)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or f"hf-decode-{card.replace(' ', '-')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table(result))
    print(table(result))


if __name__ == "__main__":
    main()
