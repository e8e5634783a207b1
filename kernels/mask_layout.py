"""The decode layout of a transformers slot mask in one launch.

A decode step (one query per row) of ``sparse24.hf`` reads the 2-D slot mask of the cache
(``sparse24.layouts``, the section on padding masks: > 0 a real token, 0 padding, < 0 not
written; a bool mask has every slot written) and needs, per row, the unified kernel's metadata
and the output fix-up of rows it cannot vouch for without a host read. The same values as
``sparse24.layouts.padding_mask_layout_torch`` + ``sparse24.hf._decode_step`` (about 40
small torch ops), computed here by one program per row:

- ``seq_lens[b] = max(n_real, 1)``: the row's real tokens (a row without any still reads one
  valid key; its output is replaced);
- ``block_table[b, j] = b * pages_per_row + clamp(start + j, 0, kv_len - 1)`` for
  ``j < width``: key j of the row is the (start + j)-th slot, ``start`` its first real slot;
- ``keep[b]``: the query slot (the last written one) holds a real token and the real tokens
  are contiguous (no holes); ``fill[b]``: NaN for a row with holes, else 0 (what a row
  without ``keep`` outputs).

No sliding-window count-back (``position_ids``): those layers keep the torch layout.

Imports triton only.
"""

import triton
import triton.language as tl


# The scalars that follow the cache's length are not specialised (divisibility by 16, == 1):
# consecutive decode steps of a growing cache then launch one compiled kernel, rebound
# (``torch_ops._launch.DirectLaunch``), where L, L + 1 would alternate specialisations.
@triton.jit(do_not_specialize=["mask_len", "kv_len", "pages_per_row", "stride_mask_row"])
def decode_mask_layout_kernel(
    # ---- input arrays ----
    mask_ptr,  # [batch, mask_len] bool | int8 | int32 | int64 | float (slot mask)
    # ---- output arrays ----
    block_table_ptr,  # [batch, width] int32 (pages of the one-slot paged view)
    seq_lens_ptr,  # [batch] int32
    keep_ptr,  # [batch] bool
    fill_ptr,  # [batch] the attention output's dtype
    # ---- runtime scalars ----
    mask_len,  # L, the mask's width (<= kv_len)
    kv_len,  # the cache's slot count S_k
    width,  # the block table's width (max(kv_len, 1))
    pages_per_row,  # pages of the paged view per batch row
    stride_mask_row,
    stride_mask_slot,
    stride_bt_row,
    # ---- constexprs ----
    SIGNED_MASK: tl.constexpr,  # False: bool, every slot < L written; True: < 0 = not written
    BLOCK_L: tl.constexpr,
):
    """Grid: (batch,)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_L)
    n_real = tl.zeros((), dtype=tl.int32)
    n_written = tl.zeros((), dtype=tl.int32)
    start = tl.zeros((), dtype=tl.int32) + mask_len  # first real slot (L if none)
    end = tl.zeros((), dtype=tl.int32)  # one past the last real slot (0 if none)
    for slot0 in range(0, mask_len, BLOCK_L):
        slot = slot0 + offs
        in_mask = slot < mask_len
        value = tl.load(mask_ptr + row * stride_mask_row + slot.to(tl.int64) * stride_mask_slot, mask=in_mask,
                        other=0)
        if SIGNED_MASK:
            real = (value > 0) & in_mask
            n_written += tl.sum(((value >= 0) & in_mask).to(tl.int32), axis=0)
        else:
            real = (value != 0) & in_mask
        n_real += tl.sum(real.to(tl.int32), axis=0)
        start = tl.minimum(start, tl.min(tl.where(real, slot, mask_len), axis=0))
        end = tl.maximum(end, tl.max(tl.where(real, slot + 1, 0), axis=0))
    start = tl.where(n_real > 0, start, 0)
    contiguous = (end - start) == n_real  # no holes
    if SIGNED_MASK:
        end = tl.minimum(end, n_written)  # written slots are a prefix
        query_slot = n_written - 1
    else:
        query_slot = mask_len - 1
    has_query = (start <= query_slot) & (end > query_slot)
    tl.store(seq_lens_ptr + row, tl.maximum(n_real, 1))
    tl.store(keep_ptr + row, (has_query & contiguous).to(keep_ptr.dtype.element_ty))
    tl.store(fill_ptr + row, tl.where(contiguous, 0.0, float("nan")).to(fill_ptr.dtype.element_ty))
    first_page = row * pages_per_row
    for key0 in range(0, width, BLOCK_L):
        key = key0 + offs
        page = first_page + tl.minimum(tl.maximum(start + key, 0), kv_len - 1).to(tl.int64)
        tl.store(block_table_ptr + row * stride_bt_row + key, page.to(tl.int32), mask=key < width)
