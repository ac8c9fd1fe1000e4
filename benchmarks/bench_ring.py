"""Context parallelism on N GPUs: ring (zigzag), Ulysses and hybrid attention, forward+backward, causal.

    torchrun --nproc_per_node N benchmarks/bench_ring.py [--seqlens 131072 262144 524288 1048576]
        [--heads 32] [--kv-heads 32] [--hdim 128] [--methods ring ulysses hybrid] [--ulysses-degree 2 4]
        [--reps 2] [--single-max 524288] [--json bench_ring.json] [--autotune]

Run from the repository root with PYTHONPATH=src (or flashattn installed). NCCL, one GPU per process,
bf16, batch 1, causal. Each rank holds total_seqlen / N tokens (random shards: the values do not change
the work). Per total seqlen and method: the time of one forward+backward (wall clock with the GPU
synchronized around the step, ranks aligned by a barrier before it; the slowest rank's median over
--reps after --warmup calls), the peak torch.cuda.max_memory_allocated over the ranks (during the first
call), TFLOP/s per GPU (flashattn.flops: causal fwd+bwd of the full sequence, / N), and the scaling
efficiency

    T1 / (N · TN),   T1 = one GPU doing the whole attention (rank 0 alone, flash_attn_func on the full
                     sequence) for seqlens up to --single-max (and when it fits in memory); above, T1 is
                     extrapolated quadratically from the largest seqlen measured (attention's work is ∝ seqlen²).

Methods: ring (zigzag layout, transfers overlapped), ulysses (all-to-all), ring-contiguous (contiguous
layout: causal work unbalanced across ranks), ring-no-overlap (zigzag, each transfer completed before
the step's attention: the difference to ring is the communication that overlap hides), hybrid (zigzag,
Ulysses groups of U consecutive ranks and a ring of N / U between them: one row hybrid-uU per
--ulysses-degree U, each dividing N, --heads and --kv-heads; groups made once with hybrid_groups).
Autotuning is off by default (FLASHATTN_AUTOTUNE=0; the H200 sweep's configurations), because a tuning
run at these sizes is a full multi-second kernel per config; --autotune turns it on.
Rough run time at the defaults on H200s (≈ 350 TFLOP/s fwd+bwd): 2 GPUs ≈ 7–8 minutes, most of it at 1M
tokens (≈ 45 s per ring or Ulysses step) and the one-GPU baseline at 512k (≈ 22 s per step); split the
seqlens over two runs to stay under a 10-minute limit. The table goes to stdout and, with --json, to a
file rewritten after every seqlen.
"""
import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--seqlens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
ap.add_argument("--hdim", type=int, default=128)
ap.add_argument("--methods", nargs="+", default=["ring", "ulysses"],
                choices=["ring", "ulysses", "ring-contiguous", "ring-no-overlap", "hybrid"])
ap.add_argument("--ulysses-degree", type=int, nargs="+", default=[2],
                help="method hybrid: the Ulysses group sizes to run (one row each)")
ap.add_argument("--warmup", type=int, default=1)
ap.add_argument("--reps", type=int, default=2)
ap.add_argument("--single-max", type=int, default=524288,
                help="largest total seqlen timed on one GPU; larger ones are extrapolated")
ap.add_argument("--json", default=None)
ap.add_argument("--autotune", action="store_true")
ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                help="cpu: gloo and float32 on the PyTorch path, a smoke test of this script (no peak memory)")
args = ap.parse_args()
if not args.autotune:
    os.environ.setdefault("FLASHATTN_AUTOTUNE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from flashattn import flash_attn_func  # noqa: E402
from flashattn.bench.environment import describe  # noqa: E402
from flashattn.distributed import ring as ring_module  # noqa: E402
from flashattn.distributed import hybrid_groups, ring_flash_attn_func  # noqa: E402
from flashattn.flops import attention_flops  # noqa: E402

METHODS = {   # name -> (method, layout, overlap); hybrid-uU rows are added by main
    "ring": ("ring", "zigzag", True),
    "ulysses": ("ulysses", "zigzag", True),
    "ring-contiguous": ("ring", "contiguous", True),
    "ring-no-overlap": ("ring", "zigzag", False),
}
GROUPS = {}   # hybrid row name -> HybridGroups


def sync():
    if args.device == "cuda":
        torch.cuda.synchronize()


def step_ms(step, warmup, reps, barrier=True):
    """Median over reps of this rank's time of step() (ms; ranks aligned by a barrier before each call,
    the device synchronized around it), and the peak memory of the first call (GiB; None on the CPU)."""
    sync()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, peak = [], None
    for i in range(warmup + reps):
        if barrier:
            dist.barrier()
        sync()
        start = time.perf_counter()
        step(first=i == 0)
        sync()
        if i == 0 and args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], peak


def inputs(seqlen, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    hk = args.kv_heads or args.heads

    def rand(heads):
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        return torch.randn(1, seqlen, heads, args.hdim, device=device, dtype=dtype, generator=g)

    return rand(args.heads).requires_grad_(), rand(hk).requires_grad_(), rand(hk).requires_grad_(), rand(args.heads)


def single_gpu_ms(seqlen, device):
    """Rank 0 alone: fwd+bwd of flash_attn_func over the full sequence; None when it does not fit."""
    def run():
        q, k, v, dout = inputs(seqlen, device, seed=0)

        def step(first):
            out = flash_attn_func(q, k, v, causal=True)
            torch.autograd.grad(out, (q, k, v), dout)

        return step_ms(step, args.warmup, args.reps, barrier=False)[0]

    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        empty_cache()


def empty_cache():
    if args.device == "cuda":
        torch.cuda.empty_cache()


def measure(name, total, world, rank, device):
    """(ms, peak GiB) of this rank for one method at a total seqlen; its tensors are freed on return."""
    method, layout, overlap = METHODS[name]
    q, k, v, dout = inputs(total // world, device, seed=1 + rank)

    def step(first):
        out = ring_flash_attn_func(q, k, v, causal=True, layout=layout, method=method, validate=first,
                                   groups=GROUPS.get(name))
        torch.autograd.grad(out, (q, k, v), dout)

    ring_module.OVERLAP = overlap
    try:
        return step_ms(step, args.warmup, args.reps)
    finally:
        ring_module.OVERLAP = True


def main():
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    names = []
    for name in args.methods:
        if name != "hybrid":
            names.append(name)
            continue
        for u in args.ulysses_degree:
            hk = args.kv_heads or args.heads
            if world % u or args.heads % u or hk % u:
                raise SystemExit(f"--ulysses-degree {u} must divide the world size ({world}), --heads ({args.heads}) "
                                 f"and --kv-heads ({hk})")
            names.append(f"hybrid-u{u}")
            METHODS[names[-1]] = ("hybrid", "zigzag", True)
            GROUPS[names[-1]] = hybrid_groups(u)   # every rank, in the same order
    env = describe(args.device)
    env["world_size"] = world
    if args.device == "cuda":
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    if rank == 0:
        print(f"{world} x {env.get('gpu', env.get('cpu'))}  torch {env['torch']}  triton {env['triton']}  "
              f"NCCL {env.get('nccl')}  heads {args.heads}/{args.kv_heads or args.heads}  hdim {args.hdim}  causal  "
              f"FLASHATTN_AUTOTUNE={os.environ.get('FLASHATTN_AUTOTUNE', '1')}", flush=True)
        print(f"{'seqlen':>8} {'method':>16} {'ms fwd+bwd':>11} {'TF/s/GPU':>9} {'peak GiB':>9} "
              f"{'1-GPU ms':>10} {'efficiency':>10}", flush=True)
    single = {}      # seqlen -> measured one-GPU ms
    rows = []
    for total in args.seqlens:
        if total % (2 * world):
            raise SystemExit(f"--seqlens: {total} is not divisible by 2 x world_size = {2 * world} (zigzag chunks)")
        # the one-GPU time: measured, or extrapolated (quadratic) from the largest measured seqlen
        base = total
        while base > args.single_max:
            base //= 2
        if base not in single:
            single[base] = single_gpu_ms(base, device) if rank == 0 else None
            dist.barrier()
        measured = [s for s, t in single.items() if t is not None and s <= base]
        ref_s = max(measured) if measured else None
        t1 = single[ref_s] * (total / ref_s) ** 2 if ref_s else None
        t1_kind = "measured" if ref_s == total else (f"extrapolated from {ref_s}" if ref_s else "none")
        flops = attention_flops(1, args.heads, total, total, args.hdim, causal=True, mode="fwd_bwd")
        for name in names:
            ms, peak = measure(name, total, world, rank, device)
            empty_cache()
            stats = torch.tensor([ms, -1.0 if peak is None else peak], device=device, dtype=torch.float64)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)   # the slowest rank, the fullest GPU
            ms, peak = stats.tolist()
            peak = None if peak < 0 else peak
            method, layout, overlap = METHODS[name]
            row = dict(seqlen=total, method=name, layout=layout, overlap=overlap, world_size=world,
                       ulysses_degree=dist.get_world_size(GROUPS[name].ulysses) if name in GROUPS else None, ms=ms,
                       tflops_per_gpu=flops / world / (ms * 1e-3) / 1e12, peak_gib=peak,
                       single_gpu_ms=t1, single_gpu=t1_kind,
                       efficiency=(t1 / (world * ms)) if t1 else None)
            rows.append(row)
            if rank == 0:
                eff = f"{row['efficiency']:.3f}" if t1 else "-"
                one = f"{t1:.0f}{'' if t1_kind == 'measured' else '*'}" if t1 else "-"
                mem = f"{peak:.2f}" if peak is not None else "-"
                print(f"{total:>8} {name:>16} {ms:>11.1f} {row['tflops_per_gpu']:>9.3g} {mem:>9} {one:>10} "
                      f"{eff:>10}", flush=True)
        if rank == 0 and args.json:
            with open(args.json, "w") as f:
                json.dump({"environment": env, "config": vars(args), "single_gpu_ms": single, "results": rows}, f,
                          indent=1)
    if rank == 0:
        print("* one-GPU time extrapolated (x seqlen^2) from the largest seqlen measured on one GPU", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
