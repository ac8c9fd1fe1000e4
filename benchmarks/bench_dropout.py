"""What dropout costs: causal forward+backward with and without dropout_p = 0.1, flashattn vs SDPA flash (GPU).

    PYTHONPATH=src python benchmarks/bench_dropout.py [--shape 4 4096 16 128]
"""
import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashattn import flash_attn_func

ap = argparse.ArgumentParser()
ap.add_argument("--shape", type=int, nargs=4, default=(4, 4096, 16, 128))
args = ap.parse_args()
b, s, h, d = args.shape
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
do = torch.randn_like(q)
qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))


def ours(p):
    return lambda: torch.autograd.grad(flash_attn_func(q, k, v, dropout_p=p, causal=True), (q, k, v), do)


def sdpa(p):
    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=p, is_causal=True)
        return torch.autograd.grad(out, (qt, kt, vt), do.transpose(1, 2))
    return run


print(f"{torch.cuda.get_device_name()}  (b, s, h, d) = {tuple(args.shape)}, causal, bf16, forward+backward ms")
rows = {name: [triton.testing.do_bench(make(p), return_mode="median") for p in (0.0, 0.1)]
        for name, make in (("flashattn", ours), ("sdpa-flash", sdpa))}
for name, (t0, t1) in rows.items():
    print(f"{name:11s} p=0: {t0:.3f}  p=0.1: {t1:.3f}  dropout costs +{(t1 / t0 - 1) * 100:.0f}%")
print(f"with dropout, flashattn / sdpa-flash speed: {rows['sdpa-flash'][1] / rows['flashattn'][1]:.2f}x")
