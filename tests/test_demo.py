"""The README's main command: the demo runs the kernel and its decisions match the spec."""

from sparse24.demo import main


def test_demo_runs_and_kernel_matches_spec(capsys):
    assert main(["--sparsity", "2:4,recent=0", "--sparsity", "1:8,sink=2,recent=5"]) == 0
    out = capsys.readouterr().out
    assert "kernel decisions match the spec for every config" in out
    assert "1:8,sink=2,recent=5" in out
