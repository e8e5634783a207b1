"""N:M selection primitives: keep the N largest scores of every group of M keys.

The unified kernel loads each key tile as M strided *sub-tiles*: sub-tile ``r`` holds
the keys ``tile_start + M*g + r`` for ``g = 0 .. TILE_N/M - 1``. The M score tiles
``s_0 .. s_{M-1}`` (each ``[BLOCK_M, TILE_N // M]``) then share one register layout
and the members of a group sit at the same position of every sub-tile, so the
selection below is purely elementwise (no reshapes, no cross-thread shuffles).

Rank of member ``r`` in its group (the spec's order: larger score first, equal
scores -> the lower key index wins)::

    rank_r = #{r' < r : s_r' >= s_r} + #{r' > r : s_r' > s_r}

and the member is selected when ``rank_r < N``. This gives exactly N winners per
group, also when all M scores are equal or all are -inf. Truth table for M=4, N=2::

    scores (keys 4g..4g+3)   selected
    [1, 3, 2, 0]             [0, 1, 1, 0]
    [5, 5, 5, 5]             [1, 1, 0, 0]   (ties: lower index wins)
    [-inf, 2, -inf, -inf]    [1, 1, 0, 0]   (key 4g+1 and the first -inf;
                                             the -inf one is invisible, so not kept)

Imports triton only.
"""

import triton
import triton.language as tl


@triton.jit
def _ge(a, b):
    """1 where a >= b (as int32), elementwise."""
    return (a >= b).to(tl.int32)


@triton.jit
def _gt(a, b):
    """1 where a > b (as int32), elementwise."""
    return (a > b).to(tl.int32)


@triton.jit
def select_of_4(s0, s1, s2, s3, N_KEEP: tl.constexpr):
    """Selected flags of a group of 4 (keys 4g+0 .. 4g+3), each [BLOCK_M, G] bool."""
    rank0 = _gt(s1, s0) + _gt(s2, s0) + _gt(s3, s0)
    rank1 = _ge(s0, s1) + _gt(s2, s1) + _gt(s3, s1)
    rank2 = _ge(s0, s2) + _ge(s1, s2) + _gt(s3, s2)
    rank3 = _ge(s0, s3) + _ge(s1, s3) + _ge(s2, s3)
    return rank0 < N_KEEP, rank1 < N_KEEP, rank2 < N_KEEP, rank3 < N_KEEP


@triton.jit
def _rank_in_8(s, a0, a1, a2, a3, a4, a5, a6, a7, R: tl.constexpr):
    """Rank of member R (score ``s``) among the 8 members ``a0..a7`` (a_R is s itself)."""
    rank = tl.zeros(s.shape, tl.int32)
    if R != 0:
        rank += _ge(a0, s)
    if R > 1:
        rank += _ge(a1, s)
    if R < 1:
        rank += _gt(a1, s)
    if R > 2:
        rank += _ge(a2, s)
    if R < 2:
        rank += _gt(a2, s)
    if R > 3:
        rank += _ge(a3, s)
    if R < 3:
        rank += _gt(a3, s)
    if R > 4:
        rank += _ge(a4, s)
    if R < 4:
        rank += _gt(a4, s)
    if R > 5:
        rank += _ge(a5, s)
    if R < 5:
        rank += _gt(a5, s)
    if R > 6:
        rank += _ge(a6, s)
    if R < 6:
        rank += _gt(a6, s)
    if R > 7:
        rank += _ge(a7, s)
    if R < 7:
        rank += _gt(a7, s)
    return rank


@triton.jit
def select_of_8(s0, s1, s2, s3, s4, s5, s6, s7, N_KEEP: tl.constexpr):
    """Selected flags of a group of 8 (keys 8g+0 .. 8g+7), each [BLOCK_M, G] bool."""
    k0 = _rank_in_8(s0, s0, s1, s2, s3, s4, s5, s6, s7, 0) < N_KEEP
    k1 = _rank_in_8(s1, s0, s1, s2, s3, s4, s5, s6, s7, 1) < N_KEEP
    k2 = _rank_in_8(s2, s0, s1, s2, s3, s4, s5, s6, s7, 2) < N_KEEP
    k3 = _rank_in_8(s3, s0, s1, s2, s3, s4, s5, s6, s7, 3) < N_KEEP
    k4 = _rank_in_8(s4, s0, s1, s2, s3, s4, s5, s6, s7, 4) < N_KEEP
    k5 = _rank_in_8(s5, s0, s1, s2, s3, s4, s5, s6, s7, 5) < N_KEEP
    k6 = _rank_in_8(s6, s0, s1, s2, s3, s4, s5, s6, s7, 6) < N_KEEP
    k7 = _rank_in_8(s7, s0, s1, s2, s3, s4, s5, s6, s7, 7) < N_KEEP
    return k0, k1, k2, k3, k4, k5, k6, k7
