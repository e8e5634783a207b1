"""N:M selection on a whole score tile: keep the N largest scores of every group of M keys.

The unified kernel computes one score tile ``[BLOCK_M, TILE_N]`` per loop iteration with
one MMA. Its key tile is loaded in a *member-interleaved column order*
(:func:`tile_key_offsets`) chosen so that the M members of every group land on
columns that one thread holds in registers in the MMA accumulator layout: column bit 0
and the column bits from ``S = log2(MEMBER_STRIDE)`` up (bits 1-2 are spread over the
lanes of a quad). ``MEMBER_STRIDE`` is 8 for Hopper's wgmma and for mma.sync with the
warps along the rows; it is ``8 * W`` for mma.sync with ``W`` warps side by side along
the columns (decode's 16-row tiles), whose warps take interleaved 8-column slices. The
reshape / permute / split below then only relabel registers: Triton's linear layouts
turn them into no-ops (no shared memory, no shuffles; checked on the sm_90 TTGIR), and
the selection is elementwise across the M member tensors. Any stride gives the same
result (only the speed changes).

Column ``c`` of a tile holds key ``tile_start + offset(c)``. With ``S = MEMBER_STRIDE``
and ``c = e + 2 * lo + S * rest`` (``e`` one bit, ``lo < S / 2``):

* M = 4: ``rest = b + 2 * hi``  ->  key ``4 * (hi * S / 2 + lo) + 2b + e``
  (group ``hi * S / 2 + lo``, member ``2b + e``); for S = 8,
  ``c = 16a + 8b + 2l + e -> 16a + 4l + 2b + e``;
* M = 8: ``rest = b + 2f + 4 * hi``  ->  key ``8 * (hi * S / 2 + lo) + 4f + 2b + e``;
* dense (M = 1): ``c`` -> key ``c``.

A group is always 4 (8) consecutive absolute keys inside one tile, as the spec asks.

Rank of member ``r`` in its group (the spec's order: larger score first, equal scores ->
the lower key index wins)::

    rank_r = #{r' < r : s_r' >= s_r} + #{r' > r : s_r' > s_r}

and the member is selected when ``rank_r < N``. This gives exactly N winners per group,
also when all M scores are equal or all are -inf. Truth table for M=4, N=2::

    scores (keys 4g..4g+3)   selected
    [1, 3, 2, 0]             [0, 1, 1, 0]
    [5, 5, 5, 5]             [1, 1, 0, 0]   (ties: lower index wins)
    [-inf, 2, -inf, -inf]    [1, 1, 0, 0]   (key 4g+1 and the first -inf;
                                             the -inf one is invisible, so not kept)

Each pair of members is compared once (6 comparisons per group of 4, 28 per group of 8); M=8
adds up its eight ranks in one integer of 4-bit fields (:func:`select_of_8`).

Imports triton only.
"""

import triton
import triton.language as tl


@triton.jit
def tile_key_offsets(TILE_N: tl.constexpr, M: tl.constexpr, MEMBER_STRIDE: tl.constexpr):
    """Key offset (within the tile) held by each column, [TILE_N] int32 (see module doc)."""
    c = tl.arange(0, TILE_N)
    HALF: tl.constexpr = MEMBER_STRIDE // 2  # groups per stride (column bits 1 .. S-1)
    if M == 4:
        tl.static_assert(TILE_N >= 2 * MEMBER_STRIDE, "M=4 needs TILE_N >= 2 * MEMBER_STRIDE")
        group = (c // (2 * MEMBER_STRIDE)) * HALF + (c // 2) % HALF
        offs = group * 4 + ((c // MEMBER_STRIDE) % 2) * 2 + c % 2
    elif M == 8:
        tl.static_assert(TILE_N >= 4 * MEMBER_STRIDE, "M=8 needs TILE_N >= 4 * MEMBER_STRIDE")
        group = (c // (4 * MEMBER_STRIDE)) * HALF + (c // 2) % HALF
        offs = group * 8 + ((c // (2 * MEMBER_STRIDE)) % 2) * 4 + ((c // MEMBER_STRIDE) % 2) * 2 + c % 2
    else:
        tl.static_assert(M == 1, "M must be 1 (dense), 4 or 8")
        offs = c
    return offs


@triton.jit
def split4(x, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, MEMBER_STRIDE: tl.constexpr):
    """[BLOCK_M, TILE_N] in M=4 column order -> members 0..3, each [BLOCK_M, TILE_N // 4]."""
    x = tl.reshape(x, [BLOCK_M, TILE_N // (2 * MEMBER_STRIDE), 2, MEMBER_STRIDE // 2, 2])  # (row, hi, b, lo, e)
    x = tl.permute(x, [0, 1, 3, 2, 4])  # (row, hi, lo, b, e)
    x = tl.reshape(x, [BLOCK_M, TILE_N // 4, 2, 2])  # (row, group, b, e)
    e0, e1 = tl.split(x)  # (row, group, b)
    x0, x2 = tl.split(e0)
    x1, x3 = tl.split(e1)
    return x0, x1, x2, x3


@triton.jit
def join4(x0, x1, x2, x3, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, MEMBER_STRIDE: tl.constexpr):
    """Inverse of :func:`split4`."""
    x = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # (row, group, b, e)
    x = tl.reshape(x, [BLOCK_M, TILE_N // (2 * MEMBER_STRIDE), MEMBER_STRIDE // 2, 2, 2])  # (row, hi, lo, b, e)
    x = tl.permute(x, [0, 1, 3, 2, 4])  # (row, hi, b, lo, e)
    return tl.reshape(x, [BLOCK_M, TILE_N])


@triton.jit
def _split8(x, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, MEMBER_STRIDE: tl.constexpr):
    """[BLOCK_M, TILE_N] in M=8 column order -> members 0..7, each [BLOCK_M, TILE_N // 8]."""
    x = tl.reshape(x, [BLOCK_M, TILE_N // (4 * MEMBER_STRIDE), 2, 2, MEMBER_STRIDE // 2, 2])  # (row, hi, f, b, lo, e)
    x = tl.permute(x, [0, 1, 4, 2, 3, 5])  # (row, hi, lo, f, b, e)
    x = tl.reshape(x, [BLOCK_M, TILE_N // 8, 2, 2, 2])  # (row, group, f, b, e)
    e0, e1 = tl.split(x)  # (row, group, f, b)
    e0b0, e0b1 = tl.split(e0)  # (row, group, f)
    e1b0, e1b1 = tl.split(e1)
    x0, x4 = tl.split(e0b0)
    x2, x6 = tl.split(e0b1)
    x1, x5 = tl.split(e1b0)
    x3, x7 = tl.split(e1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _join8(x0, x1, x2, x3, x4, x5, x6, x7, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, MEMBER_STRIDE: tl.constexpr):
    """Inverse of :func:`_split8`."""
    e0 = tl.join(tl.join(x0, x4), tl.join(x2, x6))  # e = 0: (row, group, f, b)
    e1 = tl.join(tl.join(x1, x5), tl.join(x3, x7))
    x = tl.join(e0, e1)  # (row, group, f, b, e)
    x = tl.reshape(x, [BLOCK_M, TILE_N // (4 * MEMBER_STRIDE), MEMBER_STRIDE // 2, 2, 2, 2])  # (row, hi, lo, f, b, e)
    x = tl.permute(x, [0, 1, 3, 4, 2, 5])  # (row, hi, f, b, lo, e)
    return tl.reshape(x, [BLOCK_M, TILE_N])


@triton.jit
def _maj(x, y, z):
    """True where at least two of the three are true."""
    return (x & y) | (z & (x | y))


@triton.jit
def _at_least3(x, y, z, T: tl.constexpr):
    """True where at least ``T`` (1..3) of the three flags are true (one 3-input logic op)."""
    if T == 3:
        out = x & y & z
    elif T == 2:
        out = _maj(x, y, z)
    else:
        tl.static_assert(T == 1, "T must be 1..3")
        out = x | y | z
    return out


@triton.jit
def select_of_4(s0, s1, s2, s3, N_KEEP: tl.constexpr):
    """Selected flags of the members of groups of 4 (keys 4g+0 .. 4g+3), elementwise."""
    c01 = s0 >= s1  # member 0 outranks member 1 (ties: lower index)
    c02 = s0 >= s2
    c03 = s0 >= s3
    c12 = s1 >= s2
    c13 = s1 >= s3
    c23 = s2 >= s3
    # member r is selected when it outranks at least 4 - N_KEEP of the other three
    k0 = _at_least3(c01, c02, c03, 4 - N_KEEP)
    k1 = _at_least3(~c01, c12, c13, 4 - N_KEEP)
    k2 = _at_least3(~c02, ~c12, c23, 4 - N_KEEP)
    k3 = _at_least3(~c03, ~c13, ~c23, 4 - N_KEEP)
    return k0, k1, k2, k3


@triton.jit
def _beaten_by(c, i: tl.constexpr, j: tl.constexpr):
    """Member j's (c: i outranks j) or else member i's rank field gains one: the difference
    16**j - 16**i where i wins (see :func:`select_of_8`)."""
    return tl.where(c, (1 << (4 * j)) - (1 << (4 * i)), 0)


@triton.jit
def select_of_8(s0, s1, s2, s3, s4, s5, s6, s7, N_KEEP: tl.constexpr):
    """Selected flags of the members of groups of 8 (keys 8g+0 .. 8g+7), elementwise.

    The eight ranks are counted in one int32 of 4-bit fields (member r's rank in bits
    4r .. 4r+3): each of the 28 pairs i < j adds one to the loser's field, i.e. the base
    ``sum_i (7 - i) * 16**i`` (every pair counted for its lower member) plus
    ``16**j - 16**i`` where i outranks j. The base also adds 8 - N_KEEP to every field, so
    a field's bit 3 is set exactly when its rank is >= N_KEEP (ranks are <= 7, fields never
    carry into each other; additions wrap mod 2**32 and the final value is exact).
    """
    BASE: tl.constexpr = (15 - N_KEEP) * 0x11111111 - 0x76543210  # field i: (7 - i) + (8 - N_KEEP)
    r = tl.full(s0.shape, BASE, tl.int32)  # BASE < 2**31 for N_KEEP >= 1
    r += _beaten_by(s0 >= s1, 0, 1) + _beaten_by(s0 >= s2, 0, 2) + _beaten_by(s0 >= s3, 0, 3)
    r += _beaten_by(s0 >= s4, 0, 4) + _beaten_by(s0 >= s5, 0, 5) + _beaten_by(s0 >= s6, 0, 6)
    r += _beaten_by(s0 >= s7, 0, 7) + _beaten_by(s1 >= s2, 1, 2) + _beaten_by(s1 >= s3, 1, 3)
    r += _beaten_by(s1 >= s4, 1, 4) + _beaten_by(s1 >= s5, 1, 5) + _beaten_by(s1 >= s6, 1, 6)
    r += _beaten_by(s1 >= s7, 1, 7) + _beaten_by(s2 >= s3, 2, 3) + _beaten_by(s2 >= s4, 2, 4)
    r += _beaten_by(s2 >= s5, 2, 5) + _beaten_by(s2 >= s6, 2, 6) + _beaten_by(s2 >= s7, 2, 7)
    r += _beaten_by(s3 >= s4, 3, 4) + _beaten_by(s3 >= s5, 3, 5) + _beaten_by(s3 >= s6, 3, 6)
    r += _beaten_by(s3 >= s7, 3, 7) + _beaten_by(s4 >= s5, 4, 5) + _beaten_by(s4 >= s6, 4, 6)
    r += _beaten_by(s4 >= s7, 4, 7) + _beaten_by(s5 >= s6, 5, 6) + _beaten_by(s5 >= s7, 5, 7)
    r += _beaten_by(s6 >= s7, 6, 7)
    return ((r & 0x8) == 0, (r & 0x80) == 0, (r & 0x800) == 0, (r & 0x8000) == 0,
            (r & 0x80000) == 0, (r & 0x800000) == 0, (r & 0x8000000) == 0, r >= 0)


@triton.jit
def select_tile(score, N_KEEP: tl.constexpr, M: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr,
                MEMBER_STRIDE: tl.constexpr):
    """Selected flags of a score tile in :func:`tile_key_offsets` column order.

    score: [BLOCK_M, TILE_N] fp32 (invisible entries already -inf). Returns [BLOCK_M, TILE_N] bool.
    """
    if M == 4:
        s0, s1, s2, s3 = split4(score, BLOCK_M, TILE_N, MEMBER_STRIDE)
        k0, k1, k2, k3 = select_of_4(s0, s1, s2, s3, N_KEEP)
        keep = join4(k0, k1, k2, k3, BLOCK_M, TILE_N, MEMBER_STRIDE)
    else:
        tl.static_assert(M == 8, "M must be 4 or 8")
        s0, s1, s2, s3, s4, s5, s6, s7 = _split8(score, BLOCK_M, TILE_N, MEMBER_STRIDE)
        k0, k1, k2, k3, k4, k5, k6, k7 = select_of_8(s0, s1, s2, s3, s4, s5, s6, s7, N_KEEP)
        keep = _join8(k0, k1, k2, k3, k4, k5, k6, k7, BLOCK_M, TILE_N, MEMBER_STRIDE)
    return keep
