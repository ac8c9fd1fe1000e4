"""`flashattn bench`: flashattn against its peers, measured side by side in one process.

Sub-commands (the first argument; none means prefill):
    prefill   the default: full-sequence attention, forward and backward (below)
    decode    one decoding step over a KV cache, as bandwidth (bench/decode.py; GPU)
    memory    peak extra memory vs seqlen, forward + backward, CPU or CUDA (bench/memory_sweep.py)

Prefill, GPU mode (default when CUDA is available): the FlashAttention papers' grid (batch·seqlen = 16384,
nheads·headdim = 2048, seqlen 512 … 16384, bf16, causal off/on, forward and backward), flashattn
against torch SDPA with each backend forced (FA2, cuDNN, memory-efficient) and compiled
FlexAttention, with the matmul and copy ceilings of the same GPU measured in the same run.

Prefill, CPU mode (`--device cpu`, default without CUDA): flashattn's tiled PyTorch path against torch's CPU
SDPA in time, and against naive attention in peak extra memory (one fresh process per measurement).

    flashattn bench --quick --json bench.json --plot bench.png      # = flashattn bench prefill --quick ...
    flashattn bench prefill --device cpu --seqlens 8192
    flashattn bench --load a.json b.json --plot all.png --markdown BENCHMARKS.md
    flashattn bench decode [--contexts ...] [--batches ...] [--plot decode.png]   # KV-cache decoding bandwidth
    flashattn bench memory [--device cpu|cuda] [--seqlens ...] [--plot mem.png] [--json [PATH]]
    flashattn bench --fp8-accuracy [--device cpu] [--json fp8.json]

Long sweeps draw a progress bar on stderr when it is a terminal (`--quiet`: none, and no per-shape lines).
`--fp8-accuracy` prints the FP8 accuracy report instead (flashattn.bench.fp8_accuracy; its full set of
options: benchmarks/fp8_accuracy.py --help).

The table is printed last. Speed is reported as ratios to peers measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

SUBCOMMANDS = {
    "prefill": "full-sequence attention fwd/bwd vs peers (the default; the options above)",
    "decode": "KV-cache decoding step bandwidth vs copy bandwidth and SDPA (GPU); flashattn bench decode --help",
    "memory": "peak extra memory vs seqlen, fwd+bwd, flashattn vs naive and SDPA; flashattn bench memory --help",
}

_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32"}


def _int_list(values: Sequence[str], name: str) -> List[int]:
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise SystemExit(f"flashattn bench: {name} takes integers, got {part!r}")
            if n <= 0:
                raise SystemExit(f"flashattn bench: {name} must be positive, got {n}")
            out.append(n)
    return out


def _str_list(values: Sequence[str]) -> List[str]:
    return [p.strip() for v in values for p in str(v).split(",") if p.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashattn bench",
        usage="flashattn bench [prefill] [options]\n       flashattn bench decode [options]\n"
              "       flashattn bench memory [options]",
        description="Benchmark flashattn against its peers in one process. Prefill (the default; GPU: TFLOP/s\n"
                    "and ratios over the FlashAttention papers' grid; CPU: time vs torch SDPA and peak memory vs\n"
                    "naive attention). The table is printed last.",
        epilog="sub-commands:\n" + "\n".join(f"  {name:<9} {text}" for name, text in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto (default): cuda when torch sees a GPU, else cpu")
    p.add_argument("--hdims", nargs="+", default=None, metavar="D",
                   help="head dims, e.g. '64,128' or '64 128' (GPU default 64 128; CPU default 64)")
    p.add_argument("--seqlens", nargs="+", default=None, metavar="N",
                   help="GPU default 512 1024 2048 4096 8192 16384; CPU default 8192 (one value)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default=None,
                   help="GPU default both; CPU default no")
    p.add_argument("--passes", default="fwd,bwd", help="GPU: fwd, bwd or fwd,bwd (default; timed separately)")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (GPU default bf16, CPU default fp32)")
    p.add_argument("--peers", default=None,
                   help="comma-separated. GPU: sdpa_flash, sdpa_cudnn, flex, sdpa_efficient, sdpa_math; default all "
                        "but sdpa_math; 'all' adds sdpa_math; 'none' times flashattn alone. CPU: sdpa, naive "
                        "(default both)")
    p.add_argument("--tokens", type=int, default=16384, help="GPU: batch = tokens // seqlen (default 16384)")
    p.add_argument("--width", type=int, default=2048, help="GPU: nheads = width // headdim (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="CPU: batch size (default 1)")
    p.add_argument("--heads", type=int, default=8, help="CPU: number of heads (default 8)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny subset: GPU hdim 128, seqlens 1024 4096 (both causal settings); CPU seqlen 1024")
    p.add_argument("--warmup", type=float, default=None,
                   help="warmup time per measurement, ms (default 25; 10 with --quick)")
    p.add_argument("--rep", type=float, default=None,
                   help="time of the timed repetitions per measurement, ms (default 100; 50 with --quick)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write everything as JSON (GPU mode rewrites it after every shape)")
    p.add_argument("--plot", default=None, metavar="PATH", help="GPU: PNG of TFLOP/s vs seqlen")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                   help="a markdown table for BENCHMARKS.md: printed, or appended to PATH")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="GPU: start no new shape once S seconds have passed since the start of the run (the rest is "
                        "recorded as skipped; the table of what ran still prints)")
    p.add_argument("--no-check", action="store_true", help="GPU: skip the max-abs-error check against SDPA")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the memory measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-shape lines on stderr (the table still prints)")
    p.add_argument("--load", nargs="+", default=None, metavar="JSON",
                   help="run nothing: re-render GPU-mode JSON files (merged) as table, --plot, --markdown")
    p.add_argument("--fp8-accuracy", action="store_true",
                   help="instead of timing: the FP8 accuracy report (relative RMS error vs float64, FP8 vs bf16; "
                        "uses --device, --json, --seed; more options in benchmarks/fp8_accuracy.py --help)")
    return p


def _resolve(args: argparse.Namespace, device: str) -> None:
    """Mode-dependent defaults and validation; adds *_list and dtype_t attributes."""
    import torch

    gpu = device == "cuda"
    from .gpu import GRID_HDIMS, GRID_SEQLENS, QUICK_HDIMS, QUICK_SEQLENS
    if gpu:
        hdims = QUICK_HDIMS if args.quick else GRID_HDIMS
        seqlens = QUICK_SEQLENS if args.quick else GRID_SEQLENS
    else:
        hdims, seqlens = (64,), ((1024,) if args.quick else (8192,))
    args.hdim_list = _int_list(args.hdims, "--hdims") if args.hdims else list(hdims)
    args.seqlen_list = _int_list(args.seqlens, "--seqlens") if args.seqlens else list(seqlens)
    causal = args.causal or ("both" if gpu else "no")
    args.causal_list = {"both": [False, True], "yes": [True], "no": [False]}[causal]
    dtype = args.dtype or ("bf16" if gpu else "fp32")
    if dtype.lower() not in _DTYPES:
        raise SystemExit(f"flashattn bench: --dtype {dtype!r} is not one of {sorted(set(_DTYPES))}")
    args.dtype_t = getattr(torch, _DTYPES[dtype.lower()])
    if args.warmup is None:
        args.warmup = 10.0 if args.quick else 25.0
    if args.rep is None:
        args.rep = 50.0 if args.quick else 100.0
    args.pass_list = _str_list([args.passes])
    bad = [x for x in args.pass_list if x not in ("fwd", "bwd")]
    if bad or not args.pass_list:
        raise SystemExit(f"flashattn bench: --passes takes fwd and/or bwd, got {args.passes!r}")

    if gpu:
        from .peers import DEFAULT_PEERS, PEERS
        names = _str_list([args.peers]) if args.peers else list(DEFAULT_PEERS)
        if names == ["all"]:
            names = [n for n in PEERS if n != "flashattn"]
        elif names == ["none"]:
            names = []
        unknown = [n for n in names if n not in PEERS]
        if unknown:
            raise SystemExit(f"flashattn bench: unknown peer(s) {unknown}; GPU peers are "
                             f"{[n for n in PEERS if n != 'flashattn']} (or 'all', 'none')")
        args.peer_list = names
    else:
        from .cpu import CPU_IMPLS
        names = _str_list([args.peers]) if args.peers else ["sdpa", "naive"]
        if names == ["all"]:
            names = ["sdpa", "naive"]
        elif names == ["none"]:
            names = []
        unknown = [n for n in names if n not in CPU_IMPLS]
        if unknown:
            raise SystemExit(f"flashattn bench: unknown CPU peer(s) {unknown}; CPU peers are 'sdpa' and 'naive'")
        args.peer_list = names
        for name, values in (("--seqlens", args.seqlen_list), ("--hdims", args.hdim_list)):
            if len(values) != 1:
                raise SystemExit(f"flashattn bench: CPU mode measures one shape; give {name} one value, "
                                 f"got {values}")
        if causal == "both":
            raise SystemExit("flashattn bench: CPU mode measures one shape; give --causal yes or no")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `flashattn bench` (and benchmarks/bench_attention.py). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decode"]:
        from .decode import run as run_decode
        return run_decode(argv[1:])
    if argv[:1] == ["memory"]:
        from .memory_sweep import run as run_memory
        return run_memory(argv[1:])
    if argv[:1] == ["prefill"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)

    if args.fp8_accuracy:
        from . import fp8_accuracy
        return fp8_accuracy.main(["--device", args.device, "--seed", str(args.seed)]
                                 + (["--json", args.json] if args.json else []))

    if args.load:
        from . import gpu, records
        meta, results, checks, impls = records.load_reports(args.load)
        args.json = None
        return gpu.render(meta["environment"], meta["ceilings"], meta["config"], results, checks, impls, args)

    import torch
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _resolve(args, device)
    if device == "cuda":
        from . import gpu
        return gpu.run(args, argv)
    from . import cpu
    return cpu.run(args, argv)
