"""A small mixed batch for ``compute-sanitizer --tool memcheck`` (GPU only, not a pytest file).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/gpu_sanitize_case.py

Covers the unified kernel (prefill + decode rows, page 16 and a ragged last page, split-KV
and its reduce kernel, 2:4 / 4:8 / dense, window, softcap) and write_kv_cache.
"""

import torch

from sparse24 import SparsityConfig
from sparse24.testing import make_paged_inputs
from sparse24.torch_ops import unified_attention, write_kv_cache

inputs = make_paged_inputs((1, 37, 1, 5), (300, 37, 65, 129), num_q_heads=8, num_kv_heads=2, head_dim=128,
                           block_size=16, dtype=torch.bfloat16, device="cuda")
for config, kwargs in (("2:4", {}), ("dense", dict(num_kv_splits=4)), ("4:8,sink=4,recent=16", dict(window=50)),
                       ("2:4,recent=0,sparse_decode=true", dict(softcap=20.0, num_kv_splits=2))):
    out = unified_attention(*inputs, config=SparsityConfig.parse(config), backend="triton", **kwargs)
    assert torch.isfinite(out).all(), config
k_new = torch.randn(4, 2, 128, device="cuda", dtype=torch.bfloat16)
slots = torch.tensor([0, 17, -1, 33], device="cuda")
write_kv_cache(k_new, k_new, inputs.k_cache, inputs.v_cache, slots, backend="triton")
torch.cuda.synchronize()
print("sanitize case ok")
