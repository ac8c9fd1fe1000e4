"""Block-sparse vs dense on the GPU (issue: ≥ 3× faster at 25% of the blocks, seqlen 8192).

    PYTHONPATH=src python benchmarks/bench_blocksparse.py [--seqlen 8192] [--density 0.25]
Times flashattn forward and backward with a random block layout of the given density (the same
layout for every batch entry and head; the diagonal always present, so no row is empty) against
flashattn dense on the same inputs, bf16, hdim 128, 16 heads, batch·seqlen = 16384.
Prediction (benchmarks/NOTES.md): time scales with the blocks present, so ≈ 1/density minus the
per-block overhead of reading the index lists: ≈ 3.5× at 25%.
"""
import argparse

import torch
import triton

from flashattn import BlockMask, flash_attn_func
from flashattn.flops import attention_flops, tflops

ap = argparse.ArgumentParser()
ap.add_argument("--seqlen", type=int, default=8192)
ap.add_argument("--density", type=float, default=0.25)
ap.add_argument("--block", type=int, nargs=2, default=(128, 64))
args = ap.parse_args()
s, (bq, bk) = args.seqlen, args.block
b, h, d = max(1, 16384 // s), 16, 128
g = torch.Generator(device="cuda").manual_seed(0)
layout = torch.rand(s // bq, s // bk, generator=g, device="cuda") < args.density
layout |= (torch.arange(s // bq, device="cuda")[:, None] * bq // bk) == torch.arange(s // bk, device="cuda")[None, :]
bm = BlockMask.from_layout(layout[None, None], (bq, bk), s, s)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)
rows = []
for name, kw in (("dense", {}), ("sparse", {"block_mask": bm})):
    fwd = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, **kw), return_mode="median")
    out = flash_attn_func(q, k, v, **kw)
    bwd = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                                  return_mode="median")
    rows.append((name, fwd, bwd))
f = attention_flops(b, h, s, s, d)
print(f"{torch.cuda.get_device_name()}  seqlen {s}  blocks {bq}x{bk}  density {bm.density():.3f}")
for name, fwd, bwd in rows:
    print(f"{name:7s} fwd {fwd:7.3f} ms ({tflops(f, fwd):5.0f} dense-equivalent TFLOP/s)   bwd {bwd:7.3f} ms")
print(f"speed-up sparse vs dense: fwd {rows[0][1] / rows[1][1]:.2f}x   bwd {rows[0][2] / rows[1][2]:.2f}x")
