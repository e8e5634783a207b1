"""``python -m sparse24.demo``: run the N:M kernel on a small mixed batch and compare it
with dense attention and the float64 reference.

On a machine without a GPU the demo runs the real Triton kernel in Triton's CPU
interpreter (``sparse24.backends.use_interpreter_if_no_gpu()`` sets ``TRITON_INTERPRET=1``
for its own process before triton is imported); with a GPU it runs compiled. It prints, per sparsity config, how far the
output moves from dense attention, how close the kernel is to the float64 reference, and
the fraction of visible keys the kernel kept (read from the kernel itself).
"""

from __future__ import annotations

import argparse
import sys
import time

from sparse24.backends import use_interpreter_if_no_gpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse24.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sparsity", action="append", default=None,
                        help="configs to compare with dense (SparsityConfig.parse syntax); repeatable. "
                             "Default: 2:4 with recent=0, 2:4 (recent=64), 4:8 with recent=0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    interpreting = use_interpreter_if_no_gpu()
    import torch

    from sparse24 import SparsityConfig
    from sparse24.reference import keep_mask_reference, unified_attention_reference
    from sparse24.testing import kernel_keep_mask, make_paged_inputs
    from sparse24.torch_ops import unified_attention

    configs = [SparsityConfig.parse(s) for s in (args.sparsity or ["2:4,recent=0", "2:4", "4:8,recent=0"])]
    device = "cuda" if torch.cuda.is_available() and not interpreting else "cpu"
    # A mixed batch: a 96-token prompt (prefill), a decode step over 200 keys, and a
    # 17-token chunk appended to a 120-key context (chunked prefill). GQA 4 query / 2 KV heads.
    q_lens, kv_lens = (96, 1, 17), (96, 200, 137)
    inputs = make_paged_inputs(q_lens, kv_lens, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                               integer=True, int_range=1, seed=args.seed, device=device)
    backend = "triton" if device == "cuda" else "interpret"
    print(f"sparse24 demo: backend={backend} ({'compiled, ' + torch.cuda.get_device_name() if device == 'cuda' else 'Triton interpreter on the CPU'})")
    print(f"batch: q_lens={q_lens}, kv_lens={kv_lens}, heads 4/2, head_dim 64, page 16, fp32, integer q/k\n")

    start = time.time()
    dense = unified_attention(*inputs, config=SparsityConfig.dense(), backend=backend)
    dense_ref = unified_attention_reference(*[t.cpu() for t in inputs], config=SparsityConfig.dense())
    print(f"{'config':<42} {'max|out-dense|':>15} {'cos(out,dense)':>15} {'max|out-ref64|':>15} {'kept (kernel)':>14} {'kept (spec)':>12}")
    print(f"{str(SparsityConfig.dense()):<42} {0.0:>15.4f} {1.0:>15.4f} {float((dense.cpu().double() - dense_ref).abs().max()):>15.2e} {1.0:>14.3f} {1.0:>12.3f}")
    ref_args = [t.cpu() for i, t in enumerate(inputs) if i != 2]
    all_same = True
    for cfg in configs:
        out = unified_attention(*inputs, config=cfg, backend=backend)
        ref = unified_attention_reference(*[t.cpu() for t in inputs], config=cfg)
        kept = kernel_keep_mask(inputs, config=cfg, backend=backend)
        spec = keep_mask_reference(*ref_args, config=cfg)
        visible = keep_mask_reference(*ref_args, config=SparsityConfig.dense())
        frac = sum(int(k.sum()) for k in kept) / sum(int(v.sum()) for v in visible)
        frac_spec = sum(int(k.sum()) for k in spec) / sum(int(v.sum()) for v in visible)
        same = all(torch.equal(a, b) for a, b in zip(kept, spec))
        all_same = all_same and same
        o, d = out.cpu().double().flatten(), dense.cpu().double().flatten()
        cos = float(torch.dot(o, d) / (o.norm() * d.norm()))
        print(f"{str(cfg):<42} {float((o - d).abs().max()):>15.4f} {cos:>15.4f} "
              f"{float((out.cpu().double() - ref).abs().max()):>15.2e} {frac:>14.3f} {frac_spec:>12.3f}"
              + ("" if same else "   <-- kernel and spec disagree!"))
    verdict = "match the spec for every config" if all_same else "DIFFER from the spec"
    print(f"\nkernel decisions {verdict} ({time.time() - start:.1f}s)")
    row = 80  # query 80 of the prompt: 81 visible keys
    print(f"query row {row}, head 0, dims 0..5:")
    print(f"  {'dense':<40}{dense[row, 0, :6].cpu().numpy().round(4)}")
    for cfg in configs:
        out = unified_attention(*inputs, config=cfg, backend=backend)
        print(f"  {str(cfg):<40}{out[row, 0, :6].cpu().numpy().round(4)}")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
