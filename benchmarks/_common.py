"""Shared benchmark harness: records, timing, tables and plots (prefill and decode).

A record is one (shape, provider) measurement on one card::

    {"card", "date", "version", "shape": {"B", "Sq", "Sk", "Hq", "Hkv", "D", "causal"},
     "provider", "median_ms", "tflops" | "gbps", ...extra fields}

Times come from ``triton.testing.do_bench`` (median of the repetitions, warm-up excluded).
"""

from __future__ import annotations

import datetime
import json
import pathlib

import torch
from triton.testing import do_bench

import sparse24

RESULTS = pathlib.Path(__file__).parent / "results"


def card_name() -> str:
    return torch.cuda.get_device_name()


def card_slug(card: str) -> str:
    return card.replace(" ", "-")


def environment() -> dict:
    import triton

    return dict(card=card_name(), date=datetime.date.today().isoformat(), version=sparse24.__version__,
                torch=torch.__version__, triton=triton.__version__)


def time_ms(fn, *, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``; warm-up excluded)."""
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def record(env: dict, shape: dict, provider: str, ms: float, *, tflops: float | None = None,
           gbps: float | None = None, **extra) -> dict:
    r = dict(card=env["card"], date=env["date"], version=env["version"], shape=dict(shape), provider=provider,
             median_ms=round(ms, 5))
    if tflops is not None:
        r["tflops"] = round(tflops, 2)
    if gbps is not None:
        r["gbps"] = round(gbps, 1)
    r.update(extra)
    return r


def shape_label(shape: dict) -> str:
    s = f"B={shape['B']} Sq={shape['Sq']} Sk={shape['Sk']} H={shape['Hq']}/{shape['Hkv']} D={shape['D']}"
    if shape.get("varlen"):
        s = f"varlen x{shape['B']} (total {shape['Sq']}) H={shape['Hq']}/{shape['Hkv']} D={shape['D']}"
    return s + ("" if shape["causal"] else " non-causal")


def pivot(records: list[dict], metric: str, providers: list[str]) -> list[tuple[str, dict]]:
    """[(shape label, {provider: record})] in first-seen shape order."""
    rows: dict[str, dict] = {}
    for r in records:
        if metric in r:
            rows.setdefault(shape_label(r["shape"]), {})[r["provider"]] = r
    return list(rows.items())


def markdown_table(records: list[dict], metric: str, providers: list[str], ratios: list[tuple[str, str, str]],
                   env: dict, title: str) -> str:
    """A markdown table: one row per shape, one column per provider, then ratio columns
    ``(label, numerator provider, denominator provider)``."""
    unit = "TFLOP/s" if metric == "tflops" else "GB/s"
    head = ["shape"] + providers + [label for label, _, _ in ratios]
    lines = [f"### {title}", "",
             f"{env['card']}, {env['date']}, sparse24 {env['version']}, torch {env['torch']}, "
             f"triton {env['triton']}; {unit} (median of `do_bench`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, by_provider in pivot(records, metric, providers):
        cells = [label]
        for p in providers:
            cells.append(f"{by_provider[p][metric]:.0f}" if p in by_provider else "—")
        for _, num, den in ratios:
            if num in by_provider and den in by_provider:
                cells.append(f"{by_provider[num][metric] / by_provider[den][metric]:.2f}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(records: list[dict], metric: str, providers: list[str], env: dict, title: str, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pivot(records, metric, providers)
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(rows)), 4.5))
    for i, p in enumerate(providers):
        xs = [j + i * width for j, (_, by) in enumerate(rows) if p in by]
        ys = [by[p][metric] for _, by in rows if p in by]
        ax.bar(xs, ys, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([label.replace(" D=", "\nD=") for label, _ in rows], fontsize=7)
    ax.set_ylabel("TFLOP/s (dense-equivalent)" if metric == "tflops" else "GB/s of KV read")
    ax.set_title(f"{title} — {env['card']}, {env['date']}, sparse24 {env['version']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(records: list[dict], stem: str, env: dict, table: str, out_dir: pathlib.Path) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}-{card_slug(env['card'])}"
    base.with_suffix(".json").write_text(json.dumps(records, indent=1) + "\n")
    base.with_suffix(".md").write_text(table)
    return base


class StepEvents:
    """A transformers logits processor that marks every generated token: a CUDA event recorded
    on the current stream (no sync), or with ``host_clock`` a ``time.perf_counter`` stamp (CPU
    runs). ``mark()`` once before ``generate`` makes the first gap the prefill."""

    def __init__(self, host_clock: bool = False):
        self.host_clock = host_clock
        self.marks = []

    def mark(self):
        if self.host_clock:
            import time

            self.marks.append(time.perf_counter())
        else:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def gaps_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (synchronises for CUDA events)."""
        if self.host_clock:
            return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]


# The HF benchmarks' model: Llama-3.2-1B's shape (random weights), for transformers.LlamaConfig
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                intermediate_size=8192, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
