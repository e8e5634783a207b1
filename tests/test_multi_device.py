"""benchmarks/bench_multi_gpu.py, the multi-GPU scaling run, as a smoke run on four CPU host
devices: the kernel under ``shard_map`` over 1, 2 and 4 devices gives one device's output,
and the head-sharded Flax Llama gives one device's greedy tokens (the jax.numpy reference; the
script exits 1 otherwise). On a multi-GPU host the same script runs through jax-triton."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_multi_gpu.py"


def test_multi_gpu_script_on_four_cpu_devices(tmp_path):
    out = tmp_path / "multi.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TRITON_INTERPRET")}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-devices", "4", "--tiny", "--backend", "reference", "--devices", "1,2,4",
         "--reps", "1", "--out", str(out)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads(out.read_text())
    assert result["env"]["devices_present"] == 4 and not result["failures"]
    kernel = [r for r in result["records"] if r["part"] == "kernel"]
    model = [r for r in result["records"] if r["part"] == "model"]
    assert sorted((r["config"], r["devices"]) for r in kernel) == sorted(
        (c, n) for c in ("dense", "2:4") for n in (1, 2, 4))
    assert all(r["max_rel_diff_vs_1"] == 0.0 for r in kernel)
    assert all(r["sharding"] == "P(None, 'heads')" for r in kernel if r["devices"] > 1)
    assert len(model) == 6 and all(r["tokens_equal_to_1"] for r in model)
