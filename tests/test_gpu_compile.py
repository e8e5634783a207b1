"""Every kernel specialization the launchers use compiles for sm_90 (H100/H200) -- on a CPU.

Runs tests/compile_sm90.py in a subprocess without TRITON_INTERPRET (this test process
may be interpreting): Triton's full pipeline down to a cubin, with the ptxas in the wheel.
"""

import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("compile_sm90.py")


def test_all_specializations_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # compile for real, not from a cache
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "compiled" in proc.stdout.splitlines()[-1]
