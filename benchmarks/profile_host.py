"""Where the host time of a small flashattn call goes: cProfile over repeated calls (GPU).

    PYTHONPATH=src python benchmarks/profile_host.py [--shape 16 1024 12 64] [--top 25]
Prints the host time per call of forward and forward+backward, then the functions with the most
own time. Run with FLASHATTN_AUTOTUNE=0 to see the cost without Triton's autotuner wrapper.
"""
import argparse
import cProfile
import pstats
import time

import torch

from flashattn import flash_attn_func

ap = argparse.ArgumentParser()
ap.add_argument("--shape", type=int, nargs=4, default=(16, 1024, 12, 64))
ap.add_argument("--top", type=int, default=25)
args = ap.parse_args()
b, s, h, d = args.shape
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)


def fwd():
    return flash_attn_func(q, k, v, causal=True)


def step():
    torch.autograd.grad(fwd(), (q, k, v), do)


for fn in (fwd, step):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    n = 100
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    print(f"{fn.__name__}: {host * 1e6:.1f} us host time per call (includes waits if the GPU is slower)")
pr = cProfile.Profile()
pr.enable()
for _ in range(100):
    step()
pr.disable()
torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(args.top)
