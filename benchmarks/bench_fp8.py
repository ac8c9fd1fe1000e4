"""FP8 forward vs flashattn's bf16 forward on the GPU (issue #8: FP8 >= 1.5x our bf16 forward, and
>= 900 TFLOP/s at head dim 256).

    PYTHONPATH=src python benchmarks/bench_fp8.py [--hdims 64 128 256] [--seqlens 1024 2048 4096 8192 16384]
                                                  [--causal both|yes|no] [--json PATH]
The FlashAttention papers' grid: batch·seqlen = 16384 tokens, nheads·hdim = 2048. Per shape, in one process:
  bf16      flash_attn_func on bf16 q, k, v (autotuned, as `flashattn bench` measures it)
  fp8       flash_attn_func on float8_e4m3fn q, k, v with per-(batch, head) descales, v in the usual
            (b, s, h, d) layout: the launcher's keys-contiguous copy of v is inside the timing
  fp8 vT    the same with v already keys-contiguous (what a quantizer could write directly): no copy
  fp8 vK    v in the usual layout read as it is (backends.triton.fp8_v_copy = False: no copy, the kernel's
            V tiles transposed on chip; an experiment)
Quantization is outside the timing. TFLOP/s by flashattn.flops (causal halved). Medians of
triton.testing.do_bench. The first call of each shape autotunes (compiles) and is not timed. Also printed:
the relative RMS difference between the fp8 and bf16 outputs (sanity: a few percent) and the autotuned
configs of both forwards.
"""
import argparse
import json

import torch
import triton

from flashattn import flash_attn_func, fp8
from flashattn.backends import triton as fa_triton
from flashattn.flops import attention_flops, tflops


def _best(kernel: str) -> str:
    cfg = getattr(fa_triton._tuned[kernel], "best_config", None)
    if cfg is None:
        return "-"
    return f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hdims", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench_fp8.py times the Triton kernels: it needs a CUDA GPU"
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    names = ("bf16", "fp8", "fp8 vT", "fp8 vK")
    print(f"{'hdim':>4} {'seqlen':>6} {'causal':>6} | " + " | ".join(f"{n + ' ms':>9} {'TFLOP/s':>7}" for n in names)
          + " | " + " ".join(f"{n.split()[-1] + '/bf16':>8}" for n in names[1:]) + f" | {'rel diff':>8} | configs bf16 / fp8")
    rows = []
    for d in args.hdims:
        for s in args.seqlens:
            b, h = max(1, args.tokens // s), max(1, args.width // d)
            g = torch.Generator(device="cuda").manual_seed(s + d)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", generator=g) for _ in range(3))
            x = fp8.quantize_qkv(q, k, v, "head")
            vt = x.v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
            qb, kb, vb = (t.bfloat16() for t in (q, k, v))
            del q, k, v
            for causal in causals:
                def v_as_given():
                    fa_triton.fp8_v_copy = False
                    try:
                        return flash_attn_func(x.q, x.k, x.v, causal=causal, **x.descales())
                    finally:
                        fa_triton.fp8_v_copy = True

                calls = {"bf16": lambda: flash_attn_func(qb, kb, vb, causal=causal),
                         "fp8": lambda: flash_attn_func(x.q, x.k, x.v, causal=causal, **x.descales()),
                         "fp8 vT": lambda: flash_attn_func(x.q, x.k, vt, causal=causal, **x.descales()),
                         "fp8 vK": v_as_given}
                outs = {name: fn() for name, fn in calls.items()}   # autotune and compile, untimed
                torch.cuda.synchronize()
                ms = {name: triton.testing.do_bench(fn, rep=args.rep, return_mode="median")
                      for name, fn in calls.items()}
                f = attention_flops(b, h, s, s, d, causal)
                tf = {name: tflops(f, t) for name, t in ms.items()}
                diff = ((outs["fp8"].float() - outs["bf16"].float()).norm() / outs["bf16"].float().norm()).item()
                configs = f"{_best('fwd')} / {_best('fwd_fp8')}"
                print(f"{d:>4} {s:>6} {str(causal):>6} | " + " | ".join(f"{ms[n]:9.3f} {tf[n]:7.0f}" for n in names)
                      + " | " + " ".join(f"{ms['bf16'] / ms[n]:8.2f}" for n in names[1:])
                      + f" | {diff:8.2e} | {configs}", flush=True)
                if not torch.equal(outs["fp8 vK"], outs["fp8"]):   # the same products on the same values
                    print(f"  fp8 vK differs from fp8: max {(outs['fp8 vK'].float() - outs['fp8'].float()).abs().max():.2e}")
                rows.append(dict(hdim=d, seqlen=s, batch=b, nheads=h, causal=causal, ms=ms, tflops=tf,
                                 rel_diff_fp8_bf16=diff, configs=configs))
    best256 = max((r["tflops"]["fp8 vT"] for r in rows if r["hdim"] == 256), default=None)
    speedups = [r["ms"]["bf16"] / r["ms"]["fp8"] for r in rows]
    print(f"\nfp8 / bf16 speed-up: min {min(speedups):.2f}x, max {max(speedups):.2f}x (target >= 1.5x)")
    if best256 is not None:
        print(f"best FP8 TFLOP/s at hdim 256: {best256:.0f} (target >= 900)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
