"""GPU check of the warp-specialized forward (WS) against the non-WS default (level-1 config: descriptors
where they are the default, no WS): error of out and lse vs the float64 reference and TFLOP/s, per shape,
causal and not (partly filled last query blocks included); "lpt": query blocks last first (kernels._query_tile).
Then the backward's WS loops. Prints a table last.

    PYTHONPATH=src python benchmarks/check_ws.py [--quick | --fwd-grid] [--bwd-only] [--variants a,b]
--fwd-grid: the causal forward only, on the benchmark grid's shapes (batch · seqlen = 16384, 16 heads, hdim 128).
"""
import sys

import torch
import triton

import flashattn
from flashattn import attention_ref
from flashattn.backends import triton as T
from flashattn.bench.gpu import do_bench_ms
from flashattn.flops import attention_flops

bench = do_bench_ms(25.0, 100.0)
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
SHAPES = [(1, 4096, 4096, 16, 16, 128), (2, 300, 384, 4, 2, 128), (3, 200, 256, 4, 1, 128), (1, 100, 128, 2, 2, 128),
          (1, 16384, 16384, 16, 16, 128), (2, 8192, 8192, 16, 16, 64), (2, 300, 384, 4, 2, 64),
          (4, 1024, 1024, 16, 16, 128)]
if "--quick" in sys.argv:
    SHAPES = [SHAPES[i] for i in (0, 1, 3, 5, 6)]
CAUSAL = (False, True)
if "--fwd-grid" in sys.argv:
    SHAPES, CAUSAL = [(16384 // s, s, s, 16, 16, 128) for s in (1024, 2048, 4096, 8192, 16384)], (True,)
if "--bwd-only" in sys.argv:   # (the backward on the benchmark grid's shapes: batch · seqlen = 16384, 16 heads)
    SHAPES = []
_WS128 = dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=2, TMA=True, WS=True)
_WS64 = dict(_WS128, BLOCK_N=64)
# without tiles: the default (level 1) plus these flags; LPT: the query blocks last first (kernels._query_tile)
VARIANTS = {"base": {}, "lpt": {"LPT": True}, "ws128": _WS128, "ws64": _WS64, "ws128-lpt": dict(_WS128, LPT=True)}
if "--variants" in sys.argv:   # a comma-separated subset (base and ws128 are always kept: the ratios use them)
    keep = set(sys.argv[sys.argv.index("--variants") + 1].split(",")) | {"base", "ws128"}
    VARIANTS = {n: c for n, c in VARIANTS.items() if n in keep}
rows = []
for b, s, sk, h, hk, d in SHAPES:
    for causal in CAUSAL:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        small = b * h * s * sk <= 2 ** 27
        if small:
            ref, ref_lse = attention_ref(q, k, v, causal=causal)
        res = {}
        for name, cfg in VARIANTS.items():
            T.pinned_configs["fwd"] = cfg if "BLOCK_M" in cfg else dict(T._default("fwd", d, 1), **cfg)
            out, lse, _ = flashattn.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
            ran = T._last_default.get(("fwd", d, True, False))
            err = (max((out.double() - ref).abs().max().item(), 0.0),
                   (lse.double() - ref_lse).nan_to_num(0.0, 0.0, 0.0).abs().max().item()) if small else (float("nan"),) * 2
            ms = bench(lambda: flashattn.flash_attn_func(q, k, v, causal=causal))
            tf = attention_flops(b, h, s, sk, d, causal) / ms / 1e9
            res[name] = (tf, err)
            print(f"b{b} s{s} sk{sk} h{h}/{hk} d{d} causal={causal} {name} ran={ran}: {ms:.3f} ms {tf:.0f} TFLOP/s "
                  f"err out/lse {err}", flush=True)
        rows.append((f"b{b} s{s}/{sk} h{h}/{hk} d{d}", causal, res))
        T.pinned_configs.clear()
print("\n| shape | causal | " + " | ".join(f"{n} TFLOP/s | {n} err out, lse" for n in VARIANTS) + " | "
      + " | ".join(f"{n}/base" for n in VARIANTS if n != "base") + " |")
for shape, causal, res in rows:
    cells = " | ".join(f"{tf:.0f} | {e[0]:.1e}, {e[1]:.1e}" for tf, e in res.values())
    print(f"| {shape} | {causal} | {cells} | " + " | ".join(f"{res[n][0] / res['base'][0]:.2f}" for n in res if n != "base")
          + " |")

# Backward: the warp-specialized dK/dV (MHA, whole tiles) and dQ loops against the defaults, apart and together.
def _ws(bm, bn):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, TMA=True, WS=True)


BWD_VARIANTS = {"base": {}, "dkdv32x128": {"dkdv": _ws(32, 128)}, "dkdv64x128": {"dkdv": _ws(64, 128)},
                "dq128x64-lpt": {"dq": dict(_ws(128, 64), LPT=True)},
                "dq128x64": {"dq": _ws(128, 64)}, "dq128x128": {"dq": _ws(128, 128)},
                "both": {"dkdv": _ws(64, 128), "dq": _ws(128, 64)}}
brows = []
BWD_SHAPES = [(1, 1024, 4, 128), (1, 4096, 16, 128), (4, 2048, 16, 64), (1, 16384, 16, 128)][:3 if "--quick" in sys.argv else 4]
if "--bwd-only" in sys.argv:
    BWD_SHAPES = [(16384 // s, s, 16, d) for d in (128, 64) for s in (2048, 8192)]
if "--fwd-grid" in sys.argv:
    BWD_SHAPES = []
for b, s, h, d in BWD_SHAPES:
    for causal in (False, True):
        g = torch.Generator(device="cuda").manual_seed(1)
        q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        for x in (q, k, v):
            x.requires_grad_(True)
        small = b * h * s * s <= 2 ** 25
        if small:
            qd, kd, vd = (x.detach().double().requires_grad_(True) for x in (q, k, v))
            ref = torch.autograd.grad(attention_ref(qd, kd, vd, causal=causal)[0], (qd, kd, vd), do.double())
        res = {}
        for name, cfg in BWD_VARIANTS.items():
            T.pinned_configs.update(dkdv=T._default("dkdv", d, 1), dq=T._default("dq", d, 1))
            T.pinned_configs.update(cfg)
            out = flashattn.flash_attn_func(q, k, v, causal=causal)
            grads = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
            ran = [T._last_default.get((kn, d, True, False)) for kn in ("dkdv", "dq")]
            err = tuple(f"{(a.double() - r).abs().max().item():.1e}" for a, r in zip(grads, ref)) if small else ()
            ms = bench(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
            tf = attention_flops(b, h, s, s, d, causal, "bwd") / ms / 1e9
            res[name] = tf
            print(f"bwd b{b} s{s} h{h} d{d} causal={causal} {name} ran={ran}: {ms:.3f} ms {tf:.0f} TFLOP/s err dq/dk/dv {err}",
                  flush=True)
        brows.append((f"b{b} s{s} h{h} d{d}", causal, res))
        T.pinned_configs.clear()
print("\n| backward shape | causal | " + " | ".join(f"{n} TFLOP/s" for n in BWD_VARIANTS) + " |")
for shape, causal, res in brows:
    print(f"| {shape} | {causal} | " + " | ".join(f"{tf:.0f}" for tf in res.values()) + " |")
