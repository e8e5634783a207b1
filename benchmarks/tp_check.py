"""Tensor parallelism over ``attn_implementation="sparse24"``: the same logits and tokens as one process.

Each rank loads the model with transformers' own tensor-parallel plan
(``distributed_config=DistributedConfig(tp_plan="auto")``, the successor of the deprecated
``tp_plan="auto"`` keyword, on an explicit ``device_mesh``): the q/k/v and MLP gate/up
projections are column-sharded, o_proj and down_proj row-sharded (an all-reduce after each),
lm_head column-sharded with its output gathered. So each rank's attention layer runs sparse24
on its own heads only (query ``[B, H / world, L, D]``, key/value ``[B, H_kv / world, L, D]``,
plain local tensors, not DTensors) and its own shard of the KV cache; the N:M selection is per
head, so nothing in sparse24 changes. Rank 0 also loads the same checkpoint without TP, and
compares, for dense (``sparse24.hf.dense``) and 2:4 with nothing kept dense
(``SparsityConfig(dense_recent_tokens=0)``), on a single unpadded prompt and on a left-padded
batch of two prompts with its ``attention_mask``:

* the full-forward logits (real positions) -- max |TP - single process|;
* greedy ``generate`` (``--new-tokens`` tokens; the default dynamic cache, and for the padded
  batch also ``cache_implementation="static"``, whose buffers transformers sizes per rank):
  the tokens, equal or not, and the max |diff| of the raw logits of every generated step (the
  decode path);
* every rank's generated tokens are the same, every rank's attention got its own heads (plain
  tensors, ``H / world`` query and ``H_kv / world`` KV heads), and 2:4 changes the logits
  against dense by more than 1e-3 (a sparsify that silently did nothing would fail).

It also records what the attention function received on each rank (type, shapes) and which
parameters were sharded (placements, local / global shapes). Exits 1 when a logit differs by
more than ``--atol`` (default 1e-5, fp32) or a token differs, 0 when all agree; ``--json PATH``
writes everything (rank 0).

    # CPU, gloo, 2 processes (the tiny random Llama below, or --model FOLDER):
    torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cpu [--backends reference,interpret]
    # the same with the keyword as the issue writes it (FutureWarning in transformers 5.17):
    torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cpu --tp-plan-keyword
    # GPUs, NCCL (leave NVLink multicast off on lent machines):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cuda [--backends triton,reference]

``--backends``: sparse24 backends to run (``sparse24.hf.sparsify(..., backend=)``), default
``reference`` on the CPU and ``triton`` on CUDA. ``interpret`` (the Triton kernel in Triton's
CPU interpreter) makes this script set ``TRITON_INTERPRET=1`` before triton is imported;
``interpret`` and ``triton`` cannot share a process. Without ``--model`` rank 0 saves a tiny
random-weight Llama (2 layers, hidden 64, 4 query / 2 KV heads, head_dim 16, vocab 128;
projection weights of std 0.15 so that attention scores, and the 2:4 choice, matter) to a
temporary folder (``save_pretrained``) and every rank loads it from there (one host). The
number of KV heads must be divisible by the number of processes. Greedy generation suppresses
EOS (``min_new_tokens``) so every run compares ``--new-tokens`` tokens. The logits are not
bit-identical: the row-sharded o_proj / down_proj sum partial products in another order (an
all-reduce), about 5e-7 in fp32 on the tiny model; 1e-5 is the bound. In bf16 / fp16 pass a
looser ``--atol`` (and expect greedy ties to be able to flip on a real model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: gloo process group; cuda: NCCL, one GPU per rank (LOCAL_RANK)")
    p.add_argument("--model", default=None, help="a saved transformers causal-LM folder (default: a tiny random Llama)")
    p.add_argument("--backends", default=None,
                   help="comma-separated sparse24 backends (default: reference on cpu, triton on cuda)")
    p.add_argument("--configs", default="dense,2:4", help="comma-separated: dense, 2:4 (recent=0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--new-tokens", type=int, default=4, help="greedy tokens to generate")
    p.add_argument("--atol", type=float, default=1e-5, help="largest allowed |logit TP - logit single process|")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp-plan-keyword", action="store_true",
                   help="load with from_pretrained(..., tp_plan='auto') (deprecated in transformers 5.17) instead of "
                        "distributed_config=DistributedConfig(tp_plan='auto')")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    args = p.parse_args(argv)
    if args.backends is None:
        args.backends = "reference" if args.device == "cpu" else "triton"
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in args.configs:
        if c not in ("dense", "2:4"):
            p.error(f"--configs: unknown config {c!r} (dense, 2:4)")
    if "interpret" in args.backends and "triton" in args.backends:
        p.error("--backends: 'interpret' and 'triton' cannot run in one process")
    return args


def tiny_llama(folder: str, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # larger than the init's std 0.02, so attention scores (and the 2:4 choice) matter
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.normal_(0.0, 0.15)
    model.save_pretrained(folder)


def batches(vocab: int, seed: int):
    """(name, input_ids, attention_mask or None, cache_implementation or None): one unpadded prompt; two
    prompts, left-padded (generated with the default dynamic cache, and with a StaticCache)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    single = torch.randint(3, vocab, (1, 37), generator=g)
    long_, short = torch.randint(3, vocab, (40,), generator=g), torch.randint(3, vocab, (27,), generator=g)
    ids = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    ids[0], mask[0] = long_, 1
    ids[1, 40 - 27:], mask[1, 40 - 27:] = short, 1
    return [("single", single, None, None), ("left_padded", ids, mask, None),
            ("left_padded_static", ids, mask, "static")]


def sharded_parameters(model) -> dict:
    """{generic parameter name: placement, local and global shape} of the DTensor parameters."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            generic = re.sub(r"\.\d+\.", ".*.", name)
            out.setdefault(generic, {"placements": [str(p) for p in param.placements],
                                     "local_shape": list(param.to_local().shape), "global_shape": list(param.shape)})
    return out


class AttentionProbe:
    """Records what the attention function receives (type and shape of q/k/v), for one forward:
    a wrapper registered under the backend's name while the probe is active (``sparsify`` has
    already checked the dispatch, and ``sparse24.hf.register()`` restores it)."""

    def __init__(self):
        self.calls = []

    def __enter__(self):
        import sparse24.hf
        from transformers import AttentionInterface

        real = sparse24.hf.attention_forward

        def probe(module, query, key, value, attention_mask, *args, **kwargs):
            self.calls.append({"layer": getattr(module, "layer_idx", None), "query_type": type(query).__name__,
                               "query": list(query.shape), "key": list(key.shape), "value": list(value.shape)})
            return real(module, query, key, value, attention_mask, *args, **kwargs)

        AttentionInterface.register(sparse24.hf.DEFAULT_NAME, probe)
        return self

    def __exit__(self, *exc):
        import sparse24.hf

        sparse24.hf.register()


def run_model(model, cases, config_name: str, backend: str, new_tokens: int, probe: bool = False) -> dict:
    """{case: {"logits", "tokens", "step_logits"}} for one sparsity config and backend."""
    import torch

    import sparse24.hf
    from sparse24 import SparsityConfig

    if config_name == "dense":
        sparse24.hf.dense(model, backend=backend)
    else:
        sparse24.hf.sparsify(model, SparsityConfig(dense_recent_tokens=0), backend=backend)
    out = {}
    for name, ids, mask, cache in cases:
        ids = ids.to(model.device)
        mask = None if mask is None else mask.to(model.device)
        with torch.no_grad():
            if probe and not out:
                with AttentionProbe() as seen:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                out["_attention_calls"] = seen.calls
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             **({"cache_implementation": cache} if cache else {}))
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        layers = getattr(gen.past_key_values, "layers", None) or [None]
        keys = getattr(layers[0], "keys", None)
        shape = list(keys.shape) if keys is not None else "?"
        out[name] = {"cache": f"{type(gen.past_key_values).__name__} keys {shape}",
                     "logits": logits.float().cpu(), "real": real.cpu(),
                     "tokens": gen.sequences[:, ids.shape[1]:].cpu(),
                     "step_logits": torch.stack(gen.logits, 1).float().cpu()}
    return out


def compare(tp: dict, ref: dict, atol: float) -> dict:
    rows = {}
    for name in ref:
        if name.startswith("_"):
            continue
        a, b = tp[name], ref[name]
        real = b["real"]
        logit_diff = (a["logits"] - b["logits"])[real].abs().max().item()
        step_diff = (a["step_logits"] - b["step_logits"]).abs().max().item()
        tokens_equal = bool(torch_equal(a["tokens"], b["tokens"]))
        rows[name] = {"max_abs_logit_diff": logit_diff, "max_abs_step_logit_diff": step_diff,
                      "tokens_equal": tokens_equal, "tokens_tp": a["tokens"].tolist(),
                      "tokens_single": b["tokens"].tolist(), "cache_tp": a["cache"], "cache_single": b["cache"],
                      "ok": tokens_equal and logit_diff <= atol and step_diff <= atol}
    return rows


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "interpret" in args.backends:  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import sparse24.hf  # noqa: F401  (registers attn_implementation="sparse24")
    from transformers import AutoModelForCausalLM

    if "WORLD_SIZE" not in os.environ:
        print("run me under torchrun: torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cpu", file=sys.stderr)
        return 2
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    mesh = init_device_mesh(args.device, (world,))
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()

    folder, made = [args.model], None
    if args.model is None:
        if rank == 0:
            made = tempfile.mkdtemp(prefix="sparse24-tp-")
            tiny_llama(made, args.seed)
            folder = [made]
        dist.broadcast_object_list(folder, src=0)
    folder = folder[0]

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # older transformers: only the keyword
        DistributedConfig = None
    if args.tp_plan_keyword or DistributedConfig is None:
        tp_kwargs = dict(tp_plan="auto")  # deprecated in transformers 5.17 (a FutureWarning), same path
    else:
        tp_kwargs = dict(distributed_config=DistributedConfig(tp_plan="auto"))
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sparse24", dtype=dtype,
                                                 device_mesh=mesh, **tp_kwargs)
    model.eval()
    sharded = sharded_parameters(model)
    device = model.device
    cases = batches(model.config.vocab_size, args.seed)

    ref_model = None
    if rank == 0:  # the same checkpoint in one process, no TP
        ref_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sparse24", dtype=dtype)
        ref_model.to(device).eval()

    results, all_ok = [], True
    for backend in args.backends:
        tp_dense = None
        for config_name in args.configs:
            tp = run_model(model, cases, config_name, backend, args.new_tokens, probe=True)
            mine = {"tokens": {k: v["tokens"].tolist() for k, v in tp.items() if not k.startswith("_")},
                    "attention": tp["_attention_calls"][0]}
            gathered = [None] * world
            dist.all_gather_object(gathered, mine)
            if config_name == "dense":
                tp_dense = tp
            if rank != 0:
                continue
            ref = run_model(ref_model, cases, config_name, backend, args.new_tokens, probe=True)
            rows = compare(tp, ref, args.atol)
            ranks_agree = all(g["tokens"] == gathered[0]["tokens"] for g in gathered)
            single = ref["_attention_calls"][0]
            # each rank's attention got its own heads, as plain tensors
            local_heads = all(g["attention"]["query_type"] == "Tensor" and g["attention"]["query"][1] * world
                              == single["query"][1] and g["attention"]["key"][1] * world == single["key"][1]
                              for g in gathered)
            ok = ranks_agree and local_heads and all(r["ok"] for r in rows.values())
            record = {"backend": backend, "config": config_name, "ok": ok, "ranks_agree": ranks_agree,
                      "attention_got_local_heads": local_heads, "cases": rows,
                      "attention_tp": [g["attention"] for g in gathered], "attention_single": single}
            if config_name == "2:4" and tp_dense is not None:  # else a silent no-op sparsify would pass
                change = max((tp[n]["logits"] - tp_dense[n]["logits"])[tp[n]["real"]].abs().max().item() for n in rows)
                record["max_abs_logit_change_2:4_vs_dense"] = change
                record["sparsity_matters"] = change > 1e-3
                ok = record["ok"] = ok and change > 1e-3
                print(f"[tp_check] backend={backend}: 2:4 changes the TP logits by up to {change:.3e} vs dense "
                      f"(must be > 1e-3)", flush=True)
            all_ok &= ok
            results.append(record)
            for name, r in rows.items():
                print(f"[tp_check] backend={backend} config={config_name} case={name}: "
                      f"max|logit diff|={r['max_abs_logit_diff']:.3e} "
                      f"max|step logit diff|={r['max_abs_step_logit_diff']:.3e} "
                      f"tokens_equal={r['tokens_equal']} ranks_agree={ranks_agree} tokens={r['tokens_tp']} "
                      f"cache: TP rank 0 {r['cache_tp']}, single {r['cache_single']}", flush=True)
            seen = ", ".join(f"rank {i} {g['attention']['query_type']} query {g['attention']['query']} key "
                             f"{g['attention']['key']}" for i, g in enumerate(gathered))
            print(f"[tp_check] attention input ({single['query'][0]}-row case): {seen}; single process query "
                  f"{single['query']} key {single['key']}; local heads: {local_heads}", flush=True)

    verdict = [all_ok]
    dist.broadcast_object_list(verdict, src=0)
    if rank == 0:
        print("[tp_check] sharded parameters: " + "; ".join(f"{k} {v['placements']} local {v['local_shape']} "
                                                              f"of {v['global_shape']}" for k, v in sharded.items()))
        print(f"[tp_check] world={world} device={args.device} backend(s)={','.join(args.backends)} "
              f"dtype={args.dtype} atol={args.atol} time={time.perf_counter() - started:.1f}s "
              f"RESULT: {'ALL EQUAL' if all_ok else 'MISMATCH'}", flush=True)
        if args.json:
            import transformers
            record = {"world_size": world, "device": args.device, "dtype": args.dtype, "atol": args.atol,
                      "model": args.model or "tiny random Llama (2 layers, 4/2 heads, head_dim 16)",
                      "torch": torch.__version__, "transformers": transformers.__version__,
                      "sharded_parameters": sharded, "results": results, "all_equal": all_ok}
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
    dist.barrier()
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)
    dist.destroy_process_group()
    return 0 if verdict[0] else 1


if __name__ == "__main__":
    sys.exit(main())
