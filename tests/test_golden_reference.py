"""The torch reference against the 40 golden cases of tests/data/golden (computed by an
independent float64 implementation of docs/SPEC.md §2)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse24.config import SparsityConfig
from sparse24.reference import unified_attention_chunked, unified_attention_reference
from sparse24.testing import assert_close_report

GOLDEN = Path(__file__).parent / "data" / "golden"
CASES = json.loads((GOLDEN / "nm_attention_cases.json").read_text())
ARRAYS = ("q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN / "nm_attention_cases.npz") as data:
        return {key: data[key] for key in data.files}


def load_case(golden, case):
    i = case["case"]
    inputs = [torch.from_numpy(golden[f"case{i}_{name}"]) for name in ARRAYS]
    config = SparsityConfig(n=case["n"], m=case["m"], dense_sink_tokens=case["sink"],
                            dense_recent_tokens=case["recent"], sparse_decode=case["sparse_decode"])
    kwargs = dict(config=config, causal=case["causal"], window=case["window"],
                  softcap=case["softcap"])
    return inputs, kwargs, torch.from_numpy(golden[f"case{i}_out"])


def test_golden_set_is_complete():
    assert len(CASES) == 40
    assert [c["case"] for c in CASES] == list(range(40))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c['case']}")
def test_reference_matches_golden(golden, case):
    inputs, kwargs, expected = load_case(golden, case)
    out = unified_attention_reference(*inputs, **kwargs)
    assert_close_report(out, expected, 1e-6, 0.0, f"case {case['case']} out")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"case{c['case']}")
def test_chunked_matches_golden(golden, case):
    inputs, kwargs, expected = load_case(golden, case)
    out = unified_attention_chunked(*inputs, chunk_size=kwargs["config"].m * 2, **kwargs)
    assert out.dtype == torch.float32
    assert_close_report(out, expected, 1e-4, 0.0, f"case {case['case']} chunked out")
