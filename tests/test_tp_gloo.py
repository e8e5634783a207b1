"""Tensor parallelism over attn_implementation="sparse24": 2 gloo processes on the CPU.

Runs ``benchmarks/tp_check.py`` under torchrun (``python -m torch.distributed.run --standalone``,
which picks a free port) with 2 processes: a tiny random Llama loaded with transformers' own
``tp_plan="auto"`` (heads and MLP split over the 2 ranks), dense and 2:4 (recent=0), the
reference backend and the Triton kernel in the interpreter, against the same model in one
process: full-forward logits within 1e-5, greedy tokens (dynamic and static cache) equal.
About 25 s on a 2-core CPU. The deprecated ``from_pretrained(..., tp_plan="auto")`` keyword
(transformers 5.17 turns it into the same ``DistributedConfig``) is checked by hand:
``torchrun --nproc-per-node 2 benchmarks/tp_check.py --device cpu --tp-plan-keyword``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tp_check.py"

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


def _torchrun(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "tp.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--device", "cpu", "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def _check(proc, record, backends: list[str]) -> None:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"tp_check failed (exit {proc.returncode}):\n{log[-6000:]}"
    assert "RESULT: ALL EQUAL" in proc.stdout, proc.stdout[-4000:]
    lines = re.findall(r"^\[tp_check\] backend=(\S+) config=(\S+) case=(\S+): max\|logit diff\|=(\S+) "
                       r"max\|step logit diff\|=(\S+) tokens_equal=(\S+) ranks_agree=(\S+)", proc.stdout, flags=re.M)
    seen = {(b, c, case) for b, c, case, *_ in lines}
    cases = ("single", "left_padded", "left_padded_static")
    assert seen == {(b, c, case) for b in backends for c in ("dense", "2:4") for case in cases}, lines
    for _, _, _, logit, step, tokens_equal, ranks_agree in lines:
        assert float(logit) <= 1e-5 and float(step) <= 1e-5, lines
        assert tokens_equal == "True" and ranks_agree == "True", lines
    assert record is not None and record["all_equal"] is True and record["world_size"] == 2
    sharded = record["sharded_parameters"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f".{name}." in k for k in sharded), sharded
    for r in record["results"]:
        assert r["ok"] and r["attention_got_local_heads"], r
        for seen_by_rank in r["attention_tp"]:  # 4 query / 2 KV heads split over 2 ranks
            assert seen_by_rank["query_type"] == "Tensor" and seen_by_rank["query"][1] == 2
            assert seen_by_rank["key"][1] == 1
        if r["config"] == "2:4":
            assert r["sparsity_matters"] and r["max_abs_logit_change_2:4_vs_dense"] > 1e-3, r
    padded_static = record["results"][0]["cases"]["left_padded_static"]
    assert padded_static["cache_tp"].startswith("StaticCache keys [2, 1,"), padded_static


@needs_gloo
@pytest.mark.interpret
def test_tp2_gloo_equals_one_process(tmp_path):
    proc, record = _torchrun(tmp_path, "--backends", "reference,interpret")
    _check(proc, record, ["reference", "interpret"])


def test_verdict_fails_on_a_logit_or_token_difference():
    """The comparison the script's exit code comes from flags a logit beyond atol and a token."""
    spec = importlib.util.spec_from_file_location("tp_check", SCRIPT)
    tp_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_check)

    def run(logit_shift=0.0, token=5):
        logits = torch.zeros(2, 3, 8)
        return {"case": {"logits": logits + logit_shift, "real": torch.tensor([[1, 1, 1], [0, 1, 1]]).bool(),
                         "tokens": torch.tensor([[1, 2], [3, token]]), "step_logits": torch.zeros(2, 2, 8),
                         "cache": "DynamicCache"}}

    ref = run()
    assert tp_check.compare(run(), ref, 1e-5)["case"]["ok"]
    assert tp_check.compare(run(logit_shift=2e-6), ref, 1e-5)["case"]["ok"]
    assert not tp_check.compare(run(logit_shift=1e-4), ref, 1e-5)["case"]["ok"]
    bad = tp_check.compare(run(token=6), ref, 1e-5)["case"]
    assert not bad["ok"] and not bad["tokens_equal"]
