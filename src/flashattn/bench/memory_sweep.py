"""`flashattn bench memory`: peak extra memory of flashattn, naive attention and torch SDPA as seqlen grows.

One forward + backward per measurement by default (`--fwd-only`: the forward alone), measured by
bench/memory.py: on the CPU the RSS high-water mark of a fresh process per measurement, on CUDA
torch.cuda.max_memory_allocated() in this process (after a warm-up on the same shape). "Extra" is
above the inputs (q, k, v and the upstream gradient), so it includes the output and the gradients
(3 × the size of q in the backward) and everything an implementation keeps or allocates. Naive
attention (matmul, softmax, matmul in the inputs' dtype) holds S and P and, in the backward, dP and
dS: about 4 score matrices; flashattn holds none.

    flashattn bench memory --device cpu --seqlens 512 1024 2048 4096 --plot mem.png
    flashattn bench memory --device cuda --json mem.json --plot mem.png
    flashattn bench memory --json > mem.json          # the JSON on stdout, the table on stderr

The table is printed last. Naive attention is skipped (recorded as such) where its score matrices
alone would exceed --naive-max-gib.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

from ..iomodel import score_matrix_bytes
from . import memory
from .progress import log_fn, progress_bar

MIB, GIB = 2 ** 20, 2 ** 30
DEFAULTS = {
    "cpu": dict(seqlens=(512, 1024, 2048, 4096), batch=1, heads=8, hdim=64, dtype="float32"),
    "cuda": dict(seqlens=(1024, 2048, 4096, 8192, 16384, 32768, 65536), batch=1, heads=16, hdim=128,
                 dtype="bfloat16"),
}
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
           "fp32": "float32", "float32": "float32"}
LABELS = {"flashattn": "flashattn", "naive": "naive", "sdpa": "torch SDPA"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashattn bench memory",
        description="Peak extra memory of flashattn vs naive attention and torch SDPA, forward + backward, as "
                    "seqlen grows (CPU: a fresh process per measurement; CUDA: max_memory_allocated). "
                    "The table is printed last.")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help=f"default CPU {' '.join(map(str, DEFAULTS['cpu']['seqlens']))}; "
                        f"CUDA {' '.join(map(str, DEFAULTS['cuda']['seqlens']))}")
    p.add_argument("--batch", type=int, default=None, help="default 1")
    p.add_argument("--heads", type=int, default=None, help="default CPU 8, CUDA 16")
    p.add_argument("--hdim", type=int, default=None, help="default CPU 64, CUDA 128")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default CPU fp32, CUDA bf16)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--impls", default="flashattn,naive,sdpa", help=f"comma-separated of {memory.IMPLS}")
    p.add_argument("--fwd-only", action="store_true", help="measure the forward alone")
    p.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip naive where its score matrices (4 in the backward, 2 in the forward) exceed this "
                        "(default CPU 8, CUDA 90%% of the GPU's memory)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the report as JSON to PATH; without PATH print it on stdout (the table then goes "
                        "to stderr)")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of peak memory vs seqlen (log-log)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-measurement lines")
    return p


Measure = Callable[..., dict]


def _measure_cuda(impl: str, **kw) -> dict:
    """measure_here in this process; out-of-memory and other failures come back as {"error": why}."""
    import torch
    try:
        return memory.measure_here(impl, device="cuda", **kw)
    except torch.cuda.OutOfMemoryError as e:
        return {"error": "out of memory: " + str(e).splitlines()[0][:200]}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _measure_cpu(impl: str, **kw) -> dict:
    return memory.measure_peak_memory(impl, device="cpu", **kw)


def sweep(seqlens: Sequence[int], impls: Sequence[str], *, batch: int, heads: int, hdim: int, dtype: str,
          causal: bool, device: str, backward: bool, naive_max_gib: float, quiet: bool = False,
          measure: Optional[Measure] = None) -> List[dict]:
    """One row per seqlen: {"seqlen", "scores_mib", impl: record | {"skipped": why} | {"error": why}}.

    A record is bench/memory.py's dict (peak_extra_mib is the number). `measure(impl, **shape)`
    replaces the measuring function (default: a fresh process on the CPU, this process on CUDA).
    """
    measure = measure or (_measure_cuda if device == "cuda" else _measure_cpu)
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    log = log_fn(quiet)
    rows, jobs = [], []
    for n in seqlens:
        s_bytes = score_matrix_bytes(batch, heads, n, n, itemsize)
        row: Dict[str, object] = {"seqlen": n, "scores_mib": s_bytes / MIB}
        for impl in impls:
            need = (4 if backward else 2) * s_bytes
            if impl == "naive" and need > naive_max_gib * GIB:
                row[impl] = {"skipped": f"its score matrices need ~{need / GIB:.1f} GiB > --naive-max-gib "
                                        f"{naive_max_gib:g}"}
            else:
                jobs.append((row, impl))
        rows.append(row)
    for row, impl in progress_bar(jobs, desc="bench memory", unit="run", quiet=quiet):
        n = row["seqlen"]
        try:
            rec = measure(impl, seqlen=n, batch=batch, heads=heads, hdim=hdim, dtype=dtype, causal=causal,
                          backward=backward)
        except Exception as e:   # a child that died (out of memory, ...) is a result, not the end of the sweep
            rec = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        row[impl] = rec
        log(f"seqlen {n:>6} {impl:>9}: " + (f"{rec['peak_extra_mib']:.1f} MiB" if "peak_extra_mib" in rec
                                             else rec.get("error", "")))
    return rows


def _resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(argv: Sequence[str]) -> int:
    """Entry point of `flashattn bench memory`; returns the exit status."""
    import torch

    from .environment import describe

    args = build_parser().parse_args(list(argv))
    device = _resolve_device(args.device)
    if device == "cuda" and not torch.cuda.is_available():
        print("flashattn bench memory: --device cuda asked for, but torch sees no CUDA device; use --device cpu",
              file=sys.stderr)
        return 2
    d = DEFAULTS[device]
    dtype = _DTYPES.get((args.dtype or d["dtype"]).lower())
    if dtype is None:
        raise SystemExit(f"flashattn bench memory: --dtype {args.dtype!r} is not one of {sorted(_DTYPES)}")
    impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    bad = [x for x in impls if x not in memory.IMPLS]
    if bad or not impls:
        raise SystemExit(f"flashattn bench memory: unknown implementation(s) {bad}; choose from {memory.IMPLS}")
    seqlens = list(args.seqlens or d["seqlens"])
    if any(n <= 0 for n in seqlens):
        raise SystemExit(f"flashattn bench memory: --seqlens must be positive, got {seqlens}")
    naive_max = args.naive_max_gib
    if naive_max is None:
        naive_max = (0.9 * torch.cuda.get_device_properties(0).total_memory / GIB) if device == "cuda" else 8.0
    config = dict(device=device, seqlens=seqlens, batch=args.batch or d["batch"], heads=args.heads or d["heads"],
                  hdim=args.hdim or d["hdim"], dtype=dtype, causal=bool(args.causal), impls=impls,
                  passes="fwd" if args.fwd_only else "fwd_bwd", naive_max_gib=naive_max,
                  method="fresh process per measurement, RSS high-water mark" if device == "cpu"
                  else "torch.cuda.max_memory_allocated in this process")
    env = describe(device, ["memory", *argv])
    t0 = time.perf_counter()
    rows = sweep(seqlens, impls, batch=config["batch"], heads=config["heads"], hdim=config["hdim"], dtype=dtype,
                 causal=config["causal"], device=device, backward=not args.fwd_only, naive_max_gib=naive_max,
                 quiet=args.quiet)
    report = {"schema": "flashattn.bench.memory/1", "environment": env, "config": config, "rows": rows,
              "elapsed_s": time.perf_counter() - t0}
    table_out = sys.stdout
    if args.json == "-":
        table_out = sys.stderr
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}", file=table_out)
    print(format_table(report), file=table_out, flush=True)
    if args.json == "-":
        print(json.dumps(report, indent=1), flush=True)
    return 0


def _mib(rec: dict) -> Optional[float]:
    return rec.get("peak_extra_mib") if isinstance(rec, dict) else None


def format_table(report: dict) -> str:
    """Peak extra MiB per implementation and seqlen, with the size of one score matrix for scale."""
    env, c, rows = report["environment"], report["config"], report["rows"]
    where = env.get("gpu") if c["device"] == "cuda" else f"{env.get('cpu')}, {env.get('threads')} threads"
    impls = c["impls"]
    lines = [f"flashattn bench memory ({c['device']}) | {where} | torch {env.get('torch')} | {env.get('date', '')[:10]}",
             f"batch {c['batch']}, heads {c['heads']}, hdim {c['hdim']}, {c['dtype']}, causal "
             f"{'yes' if c['causal'] else 'no'}, {'forward + backward' if c['passes'] == 'fwd_bwd' else 'forward'}; "
             f"peak extra MiB ({c['method']}); S = one seqlen x seqlen score matrix of all heads"]
    head = ["seqlen", "S MiB"] + [LABELS.get(i, i) for i in impls]
    if "flashattn" in impls and "naive" in impls:
        head.append("naive/flashattn")
    body, notes = [], []
    for r in rows:
        cells = [str(r["seqlen"]), f"{r['scores_mib']:.4g}"]
        for impl in impls:
            rec = r.get(impl, {})
            v = _mib(rec)
            if v is not None:
                cells.append(f"{v:.1f}")
            else:
                cells.append("skipped" if "skipped" in rec else "failed")
                notes.append(f"  seqlen {r['seqlen']} {impl}: {rec.get('skipped') or rec.get('error') or 'no result'}")
        if len(head) > len(cells):
            a, b = _mib(r.get("naive", {})), _mib(r.get("flashattn", {}))
            cells.append(f"{a / b:.1f}x" if a is not None and b else "-")
        body.append(cells)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    table = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head] + body]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + (["not measured:"] + notes if notes else []) + table)


def plot(report: dict, path: str) -> None:
    """Peak extra memory vs seqlen, log-log, one line per implementation, one score matrix dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    c, rows = report["config"], report["rows"]
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for impl, style in zip(c["impls"], ("o-", "s--", "^-.", "v:")):
        pts = [(r["seqlen"], _mib(r.get(impl, {}))) for r in rows if _mib(r.get(impl, {})) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=LABELS.get(impl, impl), linewidth=2.5 if impl == "flashattn" else 1.4)
    ax.plot([r["seqlen"] for r in rows], [r["scores_mib"] for r in rows], color="gray", linestyle=":",
            label="one score matrix (b·h·N²)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([r["seqlen"] for r in rows], [str(r["seqlen"]) for r in rows], fontsize=8)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_xlabel("seqlen")
    ax.set_ylabel("peak extra memory (MiB)")
    env = report["environment"]
    where = env.get("gpu") if c["device"] == "cuda" else "CPU"
    ax.set_title(f"{where}: batch {c['batch']}, heads {c['heads']}, hdim {c['hdim']}, {c['dtype']}, "
                 f"{'fwd+bwd' if c['passes'] == 'fwd_bwd' else 'fwd'}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
