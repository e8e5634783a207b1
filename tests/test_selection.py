"""The N:M selection helpers alone (``sparse24.kernels.selection``), decision for decision.

``select_of_4`` and ``select_of_8`` run in a small Triton kernel (the interpreter on a CPU,
compiled on a GPU) over every N and thousands of groups whose scores are drawn from a few
values, so ties, all-equal groups and all -inf groups are frequent; their flags must be the
spec's rank rule (docs/SPEC.md §3: larger score first, equal scores -> the lower key index)
exactly (``sparse24.reference._nm_select``, the float64 reference's selection): N winners
per group.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from sparse24.kernels.selection import select_of_4, select_of_8
from sparse24.reference import _nm_select  # the spec's step 3, in float64


@triton.jit
def _selection_kernel(
    scores_ptr,  # [M, G] fp32: member r of group g at r * G + g
    kept_ptr,  # [M, G] int8: 1 where selected
    G: tl.constexpr,
    M: tl.constexpr,
    N_KEEP: tl.constexpr,
):
    g = tl.arange(0, G)
    if M == 4:
        k0, k1, k2, k3 = select_of_4(tl.load(scores_ptr + g), tl.load(scores_ptr + G + g),
                                     tl.load(scores_ptr + 2 * G + g), tl.load(scores_ptr + 3 * G + g), N_KEEP)
        flags = (k0, k1, k2, k3)
    else:
        flags = select_of_8(tl.load(scores_ptr + g), tl.load(scores_ptr + G + g), tl.load(scores_ptr + 2 * G + g),
                            tl.load(scores_ptr + 3 * G + g), tl.load(scores_ptr + 4 * G + g),
                            tl.load(scores_ptr + 5 * G + g), tl.load(scores_ptr + 6 * G + g),
                            tl.load(scores_ptr + 7 * G + g), N_KEEP)
    for r in tl.static_range(M):
        tl.store(kept_ptr + r * G + g, flags[r].to(tl.int8))


@pytest.mark.parametrize("m,n", [(4, 1), (4, 2), (4, 3), *[(8, n) for n in range(1, 8)]],
                         ids=lambda v: str(v))
def test_selection_helpers_follow_the_rank_rule(m, n, kernel_backend):
    """Exactly the spec's winners, exactly n per group, on groups full of ties and -inf."""
    _, device = kernel_backend
    groups = 4096
    rng = np.random.default_rng(1000 * m + n)
    values = np.array([-np.inf, -2.0, -0.0, 0.0, 1.0, 1.5, 3.0], dtype=np.float32)
    scores = values[rng.integers(0, len(values), size=(m, groups))]
    scores[:, 0] = 1.0  # all equal
    scores[:, 1] = -np.inf  # nothing visible
    scores[:, 2] = np.arange(m)  # increasing
    scores[:, 3] = -np.arange(m)  # decreasing
    scores[:, 4:1024] = rng.standard_normal((m, 1020))  # distinct
    kept = torch.empty((m, groups), dtype=torch.int8, device=device)
    _selection_kernel[(1,)](torch.from_numpy(scores).to(device), kept, G=groups, M=m, N_KEEP=n)
    got = kept.cpu().numpy().astype(bool)
    want = _nm_select(torch.from_numpy(scores.T).double(), n, m).numpy().T  # [M, G]
    assert (want.sum(0) == n).all()
    mismatches = np.flatnonzero((got != want).any(0))
    assert mismatches.size == 0, (
        f"{mismatches.size} groups differ, first {mismatches[0]}: scores {scores[:, mismatches[0]]}, "
        f"got {got[:, mismatches[0]].astype(int)}, want {want[:, mismatches[0]].astype(int)}")
