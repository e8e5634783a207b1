"""Write new keys/values into a paged KV cache.

Token ``t`` goes to slot ``slot_mapping[t]`` = ``page * block_size + offset``; a negative
slot (padding) is skipped, and so is a slot ``>= num_slots`` (the cache's size: the kernel never
writes outside the cache, also where the caller's slots were not checked on the host). The caches appear twice in the signature, once as inputs and
once as outputs: jax-triton passes an aliased buffer both ways (``input_output_aliases``),
torch passes the same tensor to both parameters. Only the outputs are written.

Imports triton only.
"""

import triton
import triton.language as tl


@triton.jit
def write_kv_cache_kernel(
    # ---- input arrays ----
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32 or int64; < 0 or >= num_slots means skip
    k_cache_in_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] (aliased with k_cache_ptr)
    v_cache_in_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim] (aliased with v_cache_ptr)
    # ---- output arrays ----
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    # ---- runtime scalars ----
    block_size,
    num_slots,  # num_blocks * block_size
    stride_k_token,
    stride_k_head,
    stride_k_dim,
    stride_v_token,
    stride_v_head,
    stride_v_dim,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_kc_dim,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    stride_vc_dim,
    # ---- constexprs ----
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Grid: (num_tokens, num_kv_heads)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot < 0) | (slot >= num_slots):
        return
    page = slot // block_size
    offset = slot - page * block_size
    offs_d = tl.arange(0, HEAD_DIM_PAD).to(tl.int64)
    dim_valid = offs_d < HEAD_DIM
    key = tl.load(key_ptr + token * stride_k_token + head * stride_k_head + offs_d * stride_k_dim, mask=dim_valid)
    value = tl.load(value_ptr + token * stride_v_token + head * stride_v_head + offs_d * stride_v_dim, mask=dim_valid)
    tl.store(
        k_cache_ptr + page * stride_kc_block + offset * stride_kc_slot + head * stride_kc_head + offs_d * stride_kc_dim,
        key.to(k_cache_ptr.dtype.element_ty),
        mask=dim_valid,
    )
    tl.store(
        v_cache_ptr + page * stride_vc_block + offset * stride_vc_slot + head * stride_vc_head + offs_d * stride_vc_dim,
        value.to(v_cache_ptr.dtype.element_ty),
        mask=dim_valid,
    )
