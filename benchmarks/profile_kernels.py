"""Kernel-level GPU time of one forward+backward, flashattn vs SDPA flash, from torch.profiler (GPU).

    PYTHONPATH=src python benchmarks/profile_kernels.py
For the training examples' shapes, with q, k, v either separate contiguous tensors or views of one
fused qkv projection (as in examples/train_gpt.py): the sum of CUDA kernel times per step (no host
gaps, unlike event timing of a host-bound call) and the kernels that make it up.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from flashattn import flash_attn_func

SHAPES = [(16, 1024, 12, 64), (2, 8192, 8, 64), (4, 4096, 16, 128)]


def inputs(b, s, h, d, fused):
    if fused:
        qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        return qkv, qkv.unbind(2)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    return (q, k, v), (q, k, v)


def run(impl, qkv, leaves, do):
    q, k, v = qkv
    if impl == "flashattn":
        out = flash_attn_func(q, k, v, causal=True)
    else:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(1, 2)
    torch.autograd.grad(out, leaves, do)


for b, s, h, d in SHAPES:
    for fused in (False, True):
        leaves, qkv = inputs(b, s, h, d, fused)
        leaves = leaves if isinstance(leaves, tuple) else (leaves,)
        do = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        line = []
        for impl in ("flashattn", "sdpa-flash"):
            for _ in range(3):
                run(impl, qkv, leaves, do)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    run(impl, qkv, leaves, do)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in events) / 5
            line.append(f"{impl} {total:8.1f} us")
            if impl == "flashattn":
                top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
                detail = "; ".join(f"{e.key[:40]} {e.self_device_time_total / 5:.0f}us x{e.count // 5}" for e in top)
        print(f"(b, s, h, d)=({b}, {s}, {h}, {d}) {'fused qkv' if fused else 'separate '}: " + "  ".join(line))
        print(f"    flashattn kernels: {detail}")
