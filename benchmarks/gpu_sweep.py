"""GPU check and config sweep for the Triton kernels (developer tool, one device call).

1. correctness of the Triton backend vs the float64 reference (bf16 and fp16, tolerance rule);
2. forward/backward TFLOP/s for a few pinned configs per kernel next to torch SDPA flash and cuDNN.
Prints a short table last.   PYTHONPATH=src python benchmarks/gpu_sweep.py [--quick]
"""
import argparse
import itertools
import os
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashattn
from flashattn import attention_ref, flash_attn_func
from flashattn.backends import triton as tb
from flashattn.flops import attention_flops, tflops

ap = argparse.ArgumentParser()
ap.add_argument("--quick", action="store_true")
ap.add_argument("--skip-check", action="store_true")
ap.add_argument("--hdims", default="64,128")
ap.add_argument("--seqlens", default="1024,4096,16384")
ap.add_argument("--sweep", default="fwd,dkdv,dq")
args = ap.parse_args()
dev = "cuda"
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "cudnn", torch.backends.cudnn.version(), flush=True)


def check():
    os.environ["FLASHATTN_BACKEND"] = "triton"
    rows = []
    cases = [(2, 1, 1, 2, 2, 64, False, (-1, -1)), (2, 97, 97, 4, 2, 40, True, (-1, -1)),
             (2, 257, 1025, 4, 1, 128, True, (-1, -1)), (1, 1025, 257, 2, 2, 256, True, (-1, -1)),
             (2, 300, 300, 4, 4, 96, False, (64, 16)), (1, 8192, 8192, 2, 1, 128, True, (-1, -1)),
             (1, 8192, 8192, 2, 2, 256, False, (-1, -1)), (2, 500, 700, 4, 2, 64, False, (-1, -1))]
    for dt in (torch.bfloat16, torch.float16):
        for (b, sq, sk, h, hk, d, causal, win) in cases:
            torch.manual_seed(0)
            q = torch.randn(b, sq, h, d, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(b, sk, hk, d, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(b, sk, hk, d, device=dev, dtype=dt, requires_grad=True)
            do = torch.randn(b, sq, h, d, device=dev, dtype=dt)
            out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=win, return_attn_probs=True)
            g = torch.autograd.grad(out, (q, k, v), do)
            errs = []
            ref, rlse = attention_ref(q, k, v, causal=causal, window_size=win)
            pt, plse = attention_ref(q, k, v, causal=causal, window_size=win, compute_dtype=None)
            rg = torch.autograd.grad(ref, (q, k, v), do.double())
            pg = torch.autograd.grad(pt, (q, k, v), do)
            ok = True
            for name, o, r, p in [("out", out, ref, pt), ("dq", g[0], rg[0], pg[0]), ("dk", g[1], rg[1], pg[1]),
                                  ("dv", g[2], rg[2], pg[2])]:
                e, ep = (o.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
                good = e <= 2 * ep + 1e-4 and e == e
                ok &= good
                errs.append(f"{name} {e:.1e}/{ep:.1e}")
            fin = torch.isfinite(rlse)
            le = (lse.double() - rlse)[fin].abs().max().item() if fin.any() else 0.0
            ok &= bool((torch.isinf(lse) == torch.isinf(rlse)).all()) and le < 1e-3
            rows.append(f"{'PASS' if ok else 'FAIL'} {str(dt)[6:]} b{b} sq{sq} sk{sk} h{h}/{hk} d{d} causal={causal} "
                        f"win={win}: lse {le:.1e} " + " ".join(errs))
            del q, k, v, do, out, g, ref, pt, rg, pg
            torch.cuda.empty_cache()
    os.environ.pop("FLASHATTN_BACKEND")
    return rows


def bench_shape(d, s, causal, configs):
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    res = {}
    # every pinned config's out and gradients are compared with SDPA flash's (bf16 noise is ~1e-2 here)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        qs, ks, vs = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        ref_out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        ref = [ref_out.transpose(1, 2)] + [g.transpose(1, 2) for g in
                                             torch.autograd.grad(ref_out, (qs, ks, vs), do.transpose(1, 2))]
    f_fwd = attention_flops(b, h, s, s, d, causal, "fwd")
    f_bwd = attention_flops(b, h, s, s, d, causal, "bwd")
    for name, cfg in configs:
        tb.pinned_configs.clear()
        tb.pinned_configs.update(cfg)
        try:
            ms = triton.testing.do_bench(lambda: flash_attn_func(q, k, v, causal=causal), warmup=25, rep=100,
                                         return_mode="median")
            out = flash_attn_func(q, k, v, causal=causal)
            mine = [out] + list(torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            err = max(((a.float() - r.float()).abs().max() / r.float().abs().max()).item() for a, r in zip(mine, ref))
            if not err < 0.05:
                print(f"config {name} d{d} s{s} causal={causal}: WRONG (max error {err:.2e} of the largest value)",
                      flush=True)
            msb = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True),
                                          warmup=25, rep=100, return_mode="median")
            res[name] = (tflops(f_fwd, ms), tflops(f_bwd, msb))
        except Exception as e:  # noqa: BLE001
            res[name] = (float("nan"), float("nan"))
            print("config", name, "failed:", str(e)[:200], flush=True)
    tb.pinned_configs.clear()
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2)
    for name, be in [("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
        try:
            with sdpa_kernel(be):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                out = fn()
                msb = triton.testing.do_bench(lambda: torch.autograd.grad(out, (qt, kt, vt), dot, retain_graph=True),
                                              warmup=25, rep=100, return_mode="median")
            res[name] = (tflops(f_fwd, ms), tflops(f_bwd, msb))
        except Exception as e:  # noqa: BLE001
            res[name] = (float("nan"), float("nan"))
    return res


def cfg(bm, bn, w, s, tma=False):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **({"TMA": True} if tma else {}))


t0 = time.time()
if not args.skip_check:
    rows = check()
    print("\n".join(rows), flush=True)
    print(f"check took {time.time() - t0:.0f}s", flush=True)

# config candidates: (name, {kernel: cfg}); default = the launcher's own defaults (no pin); "+tma": tensor
# descriptors (Hopper TMA) for the streamed tiles
sweep = {
    "fwd": [cfg(128, 64, 8, 3), cfg(128, 64, 8, 3, True), cfg(64, 64, 4, 3), cfg(64, 64, 4, 3, True),
            cfg(128, 64, 8, 4, True), cfg(128, 128, 8, 3)],
    "dkdv": [cfg(32, 64, 4, 3), cfg(32, 64, 4, 3, True), cfg(64, 128, 8, 2), cfg(64, 128, 8, 2, True),
             cfg(64, 64, 4, 3), cfg(64, 64, 4, 3, True), cfg(32, 128, 8, 2)],
    "dq": [cfg(128, 32, 4, 3), cfg(128, 32, 4, 3, True), cfg(64, 64, 4, 3), cfg(64, 64, 4, 3, True),
           cfg(128, 64, 8, 2)],
}
configs = [("default", {})]
for kern in args.sweep.split(","):
    for c in sweep[kern]:
        configs.append((f"{kern}:{c['BLOCK_M']}x{c['BLOCK_N']}w{c['num_warps']}s{c['num_stages']}"
                        f"{'+tma' if c.get('TMA') else ''}", {kern: c}))
table = []
for d in map(int, args.hdims.split(",")):
    for s in map(int, args.seqlens.split(",")):
        for causal in (False, True):
            if args.quick and causal and s != 4096:
                continue
            r = bench_shape(d, s, causal, configs if (s == 4096) else configs[:1])
            table.append((d, s, causal, r))
            print(f"d{d} s{s} causal={causal} done at {time.time() - t0:.0f}s", flush=True)
print("\n=== TFLOP/s fwd / bwd (bf16, batch*seqlen=16384, heads*hdim=2048) ===")
for d, s, causal, r in table:
    print(f"d{d:<4}s{s:<6}{'causal' if causal else 'full  '} " +
          "  ".join(f"{n}={a:.0f}/{b:.0f}" for n, (a, b) in r.items()))
