"""A/B of the block-sparse forward's pipeline depth, interleaved repeats (GPU; an experiment for NOTES.md).

    PYTHONPATH=src python benchmarks/ab_sparse_stages.py
"""
import torch
import triton

from flashattn import BlockMask, flash_attn_func
from flashattn.backends import triton as fa_triton

s, bq, bk, b, h, d = 8192, 128, 64, 2, 16, 128
g = torch.Generator(device="cuda").manual_seed(0)
layout = torch.rand(s // bq, s // bk, generator=g, device="cuda") < 0.25
layout |= (torch.arange(s // bq, device="cuda")[:, None] * bq // bk) == torch.arange(s // bk, device="cuda")[None, :]
bm = BlockMask.from_layout(layout[None, None], (bq, bk), s, s)
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
times = {}
for rep in range(5):
    for stages in (2, 3, 4, 5):
        fa_triton.pinned_configs["fwd"] = dict(num_warps=8, num_stages=stages)
        times.setdefault(stages, []).append(
            triton.testing.do_bench(lambda: flash_attn_func(q, k, v, block_mask=bm), return_mode="median"))
fa_triton.pinned_configs.clear()
dense = triton.testing.do_bench(lambda: flash_attn_func(q, k, v), return_mode="median")
for stages, t in times.items():
    t = sorted(t)
    print(f"sparse fwd, 8 warps, {stages} stages: median {t[2] * 1000:6.0f} us  (min {t[0] * 1000:.0f}, max {t[-1] * 1000:.0f})"
          f"  {dense / t[2]:.2f}x dense ({dense * 1000:.0f} us)")
