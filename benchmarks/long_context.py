"""Million-token attention on one GPU: forward and backward of flash_attn_func from 128k to 1M tokens.

    PYTHONPATH=src python benchmarks/long_context.py [--seqlens 131072 262144 524288 1048576]
        [--heads 8] [--hdim 128] [--no-causal] [--reps 3] [--json long_context.json] [--autotune]

bf16, batch 1. Per seqlen: forward and backward time (CUDA events, median of the repetitions after one
warm-up), TFLOP/s (flashattn.flops), the peak of torch.cuda.max_memory_allocated over a forward+backward
(inputs included), and a check of the rows at the largest offsets: out and dq of the last 16 queries
(they see every key) and dk, dv of the last 16 keys (causal: seen by those queries only) against the
float32 reference on those slices, as max|ours - ref| / max|ref| (bf16: about 1e-2 or less; a wrong
offset gives about 1; the script exits 1 above 0.1).
Autotuning is off by default (FLASHATTN_AUTOTUNE=0: the H200 sweep's configurations): at these sizes
each tuning run is a full multi-second kernel, per config, per seqlen bucket. --autotune turns it on.
"""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--seqlens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
ap.add_argument("--heads", type=int, default=8)
ap.add_argument("--hdim", type=int, default=128)
ap.add_argument("--no-causal", dest="causal", action="store_false")
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--json", default=None)
ap.add_argument("--autotune", action="store_true")
args = ap.parse_args()
if not args.autotune:
    os.environ.setdefault("FLASHATTN_AUTOTUNE", "0")

import torch  # noqa: E402

from flashattn import attention_ref, flash_attn_func  # noqa: E402
from flashattn.bench.environment import describe  # noqa: E402
from flashattn.flops import attention_flops, tflops  # noqa: E402


def timed(fn, reps):
    """Median milliseconds of fn() over reps runs (after the caller's warm-up)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def tail_check(q, k, v, out, dout, grads, causal, rows=16):
    """max|ours - ref| / max|ref| of out, dq (last `rows` queries) and dk, dv (last `rows` keys)."""
    qs = q[:, -rows:].detach().requires_grad_()
    ks, vs = k.detach().requires_grad_(), v.detach().requires_grad_()
    ref, _ = attention_ref(qs, ks, vs, causal=causal, compute_dtype=torch.float32)   # bottom-right: the last rows
    rdq, rdk, rdv = torch.autograd.grad(ref, (qs, ks, vs), dout[:, -rows:].float())

    def rel(ours, r):
        return ((ours.float() - r).abs().max() / r.abs().max()).item()

    errs = {"out": rel(out[:, -rows:], ref), "dq": rel(grads[0][:, -rows:], rdq)}
    if causal:   # the last keys are seen by the last queries only
        errs["dk"] = rel(grads[1][:, -rows:], rdk[:, -rows:])
        errs["dv"] = rel(grads[2][:, -rows:], rdv[:, -rows:])
    return errs


def run_one(b, s, h, d):
    """Measure one seqlen; its tensors are freed on return."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    state = {}

    def fwd():
        state["out"] = flash_attn_func(q, k, v, causal=args.causal)

    def bwd():
        state["grads"] = torch.autograd.grad(state["out"], (q, k, v), dout, retain_graph=True)

    torch.cuda.reset_peak_memory_stats()
    fwd()
    bwd()   # warm-up (compiles); its peak is the fwd+bwd peak
    torch.cuda.synchronize()
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    fwd_ms = timed(fwd, args.reps)
    bwd_ms = timed(bwd, args.reps)
    errs = tail_check(q, k, v, state["out"], dout, state["grads"], args.causal)
    f_fwd = attention_flops(b, h, s, s, d, args.causal, "fwd")
    f_bwd = attention_flops(b, h, s, s, d, args.causal, "bwd")
    return dict(seqlen=s, batch=b, heads=h, hdim=d, causal=args.causal, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                fwd_tflops=tflops(f_fwd, fwd_ms), bwd_tflops=tflops(f_bwd, bwd_ms), peak_gib=peak_gib,
                inputs_gib=4 * q.numel() * q.element_size() / 2**30, rel_err=errs)


def main():
    env = describe("cuda")
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  FLASHATTN_AUTOTUNE="
          f"{os.environ.get('FLASHATTN_AUTOTUNE', '1')}")
    b, h, d = 1, args.heads, args.hdim
    rows = []
    header = (f"{'seqlen':>8} {'fwd ms':>10} {'fwd TF/s':>8} {'bwd ms':>10} {'bwd TF/s':>8} {'peak GiB':>9} "
              f"{'inputs GiB':>10}  rel. err (out, dq, dk, dv)")
    print(header, flush=True)
    for s in args.seqlens:
        torch.cuda.empty_cache()
        row = run_one(b, s, h, d)
        rows.append(row)
        print(f"{s:>8} {row['fwd_ms']:>10.1f} {row['fwd_tflops']:>8.0f} {row['bwd_ms']:>10.1f} "
              f"{row['bwd_tflops']:>8.0f} {row['peak_gib']:>9.2f} {row['inputs_gib']:>10.2f}  "
              + ", ".join(f"{e:.1e}" for e in row["rel_err"].values()), flush=True)
        if args.json:   # after every seqlen, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump({"environment": env, "config": vars(args), "results": rows}, f, indent=1)
    bad = [r["seqlen"] for r in rows if not max(r["rel_err"].values()) < 0.1]
    if bad:
        print(f"CHECK FAILED at seqlens {bad}: errors far above bf16 rounding (a wrong offset gives ~1)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
