"""The transformers family sweep (issue 15): every causal-LM family of the installed
transformers runs exactly through sparse24 or is refused with a clear error; no silent outcome.

The sweep (``sparse24.hf_families``) runs once, in this process, for the whole module; it uses
``backend="reference"`` (the kernel's exactness is the kernel tests' job). The README's family
table must be the sweep's output.
"""

from __future__ import annotations

import pathlib
import time

import pytest

transformers = pytest.importorskip("transformers")

import sparse24.hf  # noqa: E402
from sparse24 import SparsityConfig, hf_families  # noqa: E402

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
OUTCOMES = {"runs", "refused", "not buildable", "FAILED"}


@pytest.fixture(scope="module")
def results():
    return hf_families.sweep()


def test_families_come_from_the_transformers_auto_mapping():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = hf_families.families()
    assert len(families) == len(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) > 100
    assert families == dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def test_no_family_fails(results):
    assert list(results) == list(hf_families.families())
    assert {outcome for outcome, _ in results.values()} <= OUTCOMES
    failed = {name: reason for name, (outcome, reason) in results.items() if outcome == "FAILED"}
    assert not failed, "families with a silent or unclear outcome:\n" + "\n".join(
        f"  {name}: {reason}" for name, reason in failed.items())


def test_sweep_outcomes_of_known_families(results):
    """A floor for the sweep: families the backend is built for run; known refusals name their reason."""
    for name in ("llama", "qwen2", "mistral", "gemma2", "phimoe", "gpt2"):
        assert results[name] == ("runs", "equals sdpa"), (name, results[name])
    refused = {"bloom": "ALiBi", "mpt": "ALiBi", "minimax": "linear (lightning) attention", "gpt_oss": "sinks",
               "llama4_text": "chunked attention", "doge": "no is_causal", "falcon": "compute attention themselves",
               "gemma4_unified_text": "head_dim 512", "deepseek_v3": "(MLA)", "deepseek_v32": "indexer",
               "mamba": "no attention modules"}
    for name, why in refused.items():
        outcome, reason = results[name]
        assert outcome == "refused" and why in reason, (name, outcome, reason)
    assert sum(outcome == "runs" for outcome, _ in results.values()) >= 80


def test_readme_table_is_the_sweeps(results):
    block = hf_families.readme_block(README.read_text())
    assert block == hf_families.table(results), (
        "README.md's families table is stale: run `python -m sparse24.hf_families --write-readme README.md`")


def test_a_silently_wrong_backend_is_failed(monkeypatch):
    """The sweep catches a wrong result: a "dense" that really is 2:4 differs from sdpa."""
    def fake_dense(model, *, backend="auto"):
        return sparse24.hf.sparsify(model, SparsityConfig(dense_recent_tokens=0), backend=backend)

    monkeypatch.setattr(sparse24.hf, "dense", fake_dense)
    outcome, reason = hf_families.check("llama")
    assert outcome == "FAILED" and "differs from sdpa" in reason, (outcome, reason)


def test_an_error_from_model_code_is_not_a_refusal():
    def from_model_code():
        raise TypeError("'NoneType' object is not subscriptable")

    with pytest.raises(TypeError) as info:
        from_model_code()
    assert hf_families._refusal("first forward", info.value)[0] == "FAILED"
    with pytest.raises(ValueError) as info:
        sparse24.hf.slot_mask(1, 2, 2, mask_function=transformers.masking_utils.bidirectional_mask_function)
    assert hf_families._refusal("first forward", info.value)[0] == "refused"


def test_the_per_family_guard_stops_a_hang():
    start = time.monotonic()
    with pytest.raises(hf_families._Timeout), hf_families._guard(1):
        while True:
            time.sleep(0.05)
    assert time.monotonic() - start < 5
