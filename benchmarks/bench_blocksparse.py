"""Block-sparse vs dense on the GPU (issue: ≥ 3× faster at 25% of the blocks, seqlen 8192).

    PYTHONPATH=src python benchmarks/bench_blocksparse.py [--seqlen 8192] [--density 0.25] [--kernels]
        [--stages 2 3 4 5]
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
ap.add_argument("--kernels", action="store_true",
                help="also the backward's kernels timed apart (torch.profiler), dense with the mask's tiles pinned too")
ap.add_argument("--stages", type=int, nargs="+", default=None, metavar="N",
                help="also A/B the sparse forward's pipeline depth: these stage counts, 5 interleaved repeats each")
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


def kernel_times(kw):
    """CUDA time per kernel name (us) of one backward, from torch.profiler over 5 backwards."""
    from torch.profiler import ProfilerActivity, profile
    out = flash_attn_func(q, k, v, **kw)
    for _ in range(3):
        torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {e.key: e.self_device_time_total / 5 for e in events}


if args.kernels:
    from flashattn.backends import triton as fa_triton
    variants = [("dense (tuned)", {}, {}), ("sparse", {"block_mask": bm}, {})]
    tile = dict(BLOCK_M=bq, BLOCK_N=bk, num_warps=8, num_stages=2)
    variants.append(("dense, mask's tiles", {}, {"dkdv": tile, "dq": tile}))
    for bm_, bn_, w_ in ((32, 64, 4), (64, 64, 4)):
        variants.append((f"dense, dkdv {bm_}x{bn_}", {}, {"dkdv": dict(BLOCK_M=bm_, BLOCK_N=bn_, num_warps=w_, num_stages=2)}))
    variants.append(("dense, fwd mask's tile", {}, {"fwd": dict(tile, num_stages=3)}))
    for name, kw, pins in variants:
        fa_triton.pinned_configs.clear()
        fa_triton.pinned_configs.update(pins)
        if not pins or "fwd" in pins:
            fwd_ms = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, **kw), return_mode="median")
            cfg = "the mask's tiles" if kw else fa_triton.launch_config("fwd", 128)   # block-mask launches record none
            print(f"{name:22s} fwd {fwd_ms * 1000:7.0f} us  (fwd config {cfg})")
        times = kernel_times(kw)
        cells = "  ".join(f"{key.split('(')[0][:24]} {t:7.0f}" for key, t in sorted(times.items(), key=lambda x: -x[1])[:3])
        print(f"{name:22s} bwd kernels (us): {cells}")
    fa_triton.pinned_configs.clear()
    for w_, s_ in ((8, 2), (8, 4), (8, 5), (4, 3)):   # the sparse forward's warps and stages (tiles: the mask's)
        fa_triton.pinned_configs["fwd"] = dict(num_warps=w_, num_stages=s_)
        fwd_ms = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, block_mask=bm), return_mode="median")
        print(f"sparse fwd, {w_} warps {s_} stages: {fwd_ms * 1000:7.0f} us")
    fa_triton.pinned_configs.clear()


if args.stages:
    from flashattn.backends import triton as fa_triton
    times = {}
    for rep in range(5):   # interleaved, so that clock or thermal drift hits every variant alike
        for st in args.stages:
            fa_triton.pinned_configs["fwd"] = dict(num_warps=8, num_stages=st)
            times.setdefault(st, []).append(
                triton.testing.do_bench(lambda: flash_attn_func(q, k, v, block_mask=bm), return_mode="median"))
    fa_triton.pinned_configs.clear()
    for st, t in times.items():
        t = sorted(t)
        print(f"sparse fwd, 8 warps, {st} stages: median {t[2] * 1000:6.0f} us  (min {t[0] * 1000:.0f}, "
              f"max {t[-1] * 1000:.0f})  {rows[0][1] / t[2]:.2f}x dense ({rows[0][1] * 1000:.0f} us)")
