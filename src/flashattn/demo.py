"""`flashattn demo`: exact like naive attention, without its seqlen² memory. Measured, on this machine.

For each sequence length, one forward of flashattn and one of naive attention (softmax(QKᵀ)V with S
and P materialized), each in a fresh Python process, report
  - max |out - attention_ref| (float64 reference; up to --check-max-seqlen, the reference itself is O(N²));
  - the peak extra memory of one call: RSS high-water mark growth on CPU, max_memory_allocated on CUDA;
  - the time of one call (the best of up to 3 while they are cheap);
then print a table and save a plot of memory and time against seqlen.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch

from .api import flash_attn_func
from .masks import mask_matrix
from .reference import attention_ref

DEFAULT_SEQLENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (256, 512, 1024)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_REPEAT_MS = 2000   # repeat a timed call only while the calls so far took less than this
MiB = 2 ** 20
GiB = 2 ** 30


def naive_attention(q, k, v, softmax_scale: float, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ · scale) v the textbook way, in the inputs' dtype: S and P both exist in full.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads, headdim).
    causal: the mask of flashattn.masks (bottom-right aligned), applied in place to S; a row that
    sees no key (seqlen_q > seqlen_k) comes out NaN here, unlike flashattn's 0.
    Returns (batch, seqlen_q, nheads, headdim). Differentiable (autograd keeps P for the backward).
    """
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))                 # (b, h, s, d)
    s = torch.matmul(qh, kh.transpose(-1, -2)).mul_(softmax_scale)     # S: (b, h, sq, sk)
    if causal:
        sq, sk = s.shape[-2:]
        s.masked_fill_(~mask_matrix(sq, sk, -1, 0, device=s.device), float("-inf"))
    p = torch.softmax(s, dim=-1)                                       # P: another (b, h, sq, sk)
    return torch.matmul(p, vh).transpose(1, 2)


def naive_bytes(batch: int, nheads: int, seqlen: int, itemsize: int) -> int:
    """Size of S and P together. Only used to decide to skip naive, never reported as a measurement."""
    return 2 * batch * nheads * seqlen * seqlen * itemsize


def _flashattn(q, k, v, softmax_scale: float) -> torch.Tensor:
    return flash_attn_func(q, k, v, softmax_scale=softmax_scale)


IMPLS = {"flashattn": _flashattn, "naive": naive_attention}


# ----------------------------------------------------------------------------------------------
# one measurement, in the process that runs it


@dataclass
class Job:
    impl: str       # a key of IMPLS
    seqlen: int
    batch: int
    nheads: int
    headdim: int
    dtype: str      # a key of _DTYPES
    device: str     # "cpu" or "cuda"
    check: bool     # also compare with the float64 reference, after the measurement
    seed: int = 0


def _rss_peak_bytes() -> int:
    """This process's own RSS high-water mark."""
    # Not ru_maxrss: Linux carries a parent's peak across fork+exec into the child's ru_maxrss, so a
    # worker started by a big parent would begin with a peak above anything it does itself. VmHWM is
    # the worker's own address space only.
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except OSError:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024   # macOS reports bytes, Linux KiB


def _rss_reset_peak() -> None:
    """Lower the high-water mark to the current RSS (Linux), so that an earlier transient peak
    (imports, input generation) cannot hide the growth we are about to measure."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass   # then the baseline is the earlier peak: growth below it would read as 0


def measure(job: Job) -> dict:
    """One forward of `job.impl` in this process -> {"peak_mib", "ms", "max_err"} (max_err None unless job.check).

    peak_mib: memory growth during the first call; ms: the best of up to 3 calls (fewer if slow).

    Run it in a fresh process (see `measure_in_subprocess`): on CPU nothing else may have touched
    and freed memory of that size, or the allocator would reuse it and the RSS would not grow.
    """
    device, dtype = torch.device(job.device), _DTYPES[job.dtype]
    fn, scale = IMPLS[job.impl], job.headdim ** -0.5
    gen = torch.Generator().manual_seed(job.seed)

    def inputs(n):
        shape = (job.batch, n, job.nheads, job.headdim)
        return [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)]

    cuda = device.type == "cuda"
    if not cuda:
        # first-call costs (op dispatch, thread pool) out of the timing; tiny, for the reason above
        fn(*inputs(64), scale)
    q, k, v = inputs(job.seqlen)
    if cuda:
        fn(q, k, v, scale)   # full-size warm-up compiles the kernels; the CUDA peak counter can be reset
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _rss_reset_peak()
        base = _rss_peak_bytes()

    def timed_call():
        t0 = time.perf_counter()
        out = fn(q, k, v, scale)
        if cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3

    out, ms = timed_call()
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss_peak_bytes()) - base
    # Time: best of up to 3 calls while they are cheap; one call on a shared machine can catch a hiccup.
    times = [ms]
    while len(times) < 3 and sum(times) < MAX_REPEAT_MS:
        times.append(timed_call()[1])
    result = {"peak_mib": peak / MiB, "ms": min(times), "max_err": None}
    if job.check:
        ref, _ = attention_ref(q, k, v, softmax_scale=scale)   # float64, O(seqlen²)
        result["max_err"] = (out.double() - ref).abs().max().item()
    return result


def measure_in_subprocess(job: Job) -> dict:
    """`measure(job)` in a fresh Python process; {"error": why} if that process fails."""
    cmd = [sys.executable, "-m", "flashattn.demo", "--_measure", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode == -9:
            return {"error": "killed (out of memory?)"}
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": last}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# the sweep


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu (or auto)")
    return name


def default_dtype(device: str) -> str:
    return "bfloat16" if device == "cuda" else "float32"


def run_demo(seqlens: Sequence[int], *, batch: int = 1, nheads: int = 8, headdim: int = 64,
             device: str = "cpu", dtype: Optional[str] = None, check_max_seqlen: int = 4096,
             naive_max_gib: float = 8.0, seed: int = 0, progress: bool = True) -> List[dict]:
    """Measure flashattn and naive at every seqlen. dtype None: float32 on CPU, bfloat16 on CUDA.

    Returns one row per seqlen: {"seqlen", "check", "flashattn": result, "naive": result}, where a
    result is `measure`'s dict, {"skipped": why} or {"error": why}.
    """
    from tqdm import tqdm

    dtype = dtype or default_dtype(device)
    itemsize = torch.empty((), dtype=_DTYPES[dtype]).element_size()
    rows, jobs = [], []
    for n in seqlens:
        row = {"seqlen": n, "check": n <= check_max_seqlen}
        need = naive_bytes(batch, nheads, n, itemsize)
        if need > naive_max_gib * GiB:
            row["naive"] = {"skipped": f"would need ~{need / GiB:.1f} GiB"}
        rows.append(row)
        for impl in IMPLS:
            if impl not in row:
                jobs.append((row, Job(impl, n, batch, nheads, headdim, dtype, device, row["check"], seed)))
    bar = tqdm(jobs, desc="flashattn demo", unit="run", disable=not progress)
    for row, job in bar:
        bar.set_postfix_str(f"{job.impl} seqlen={job.seqlen}")
        row[job.impl] = measure_in_subprocess(job)
    return rows


def _cell(result: dict, key: str, spec: str) -> str:
    if "error" in result:
        return "failed: " + result["error"]
    if "skipped" in result:
        return "skipped (" + result["skipped"] + ")"
    value = result.get(key)
    return "-" if value is None else format(value, spec)


def _ms(result: dict) -> str:
    # whole milliseconds on the CPU; three significant digits for the sub-millisecond GPU times
    ms = result.get("ms")
    return _cell(result, "ms", ".0f" if ms is not None and ms >= 100 else ".3g")


def format_table(rows: List[dict]) -> str:
    """The results as an aligned plain-text table."""
    head = ["seqlen", "max err flashattn", "max err naive", "flashattn MiB", "naive MiB", "naive/flashattn",
            "flashattn ms", "naive ms"]
    body = []
    for r in rows:
        fa, nv = r["flashattn"], r["naive"]
        if r["check"]:
            err_fa, err_nv = _cell(fa, "max_err", ".1e"), _cell(nv, "max_err", ".1e")
        else:
            err_fa = err_nv = "skipped"
        ok = "peak_mib" in fa and "peak_mib" in nv and fa["peak_mib"] > 0
        ratio = f"{nv['peak_mib'] / fa['peak_mib']:.3g}x" if ok else "-"
        ms_nv = "-" if "skipped" in nv else _ms(nv)
        body.append([str(r["seqlen"]), err_fa, err_nv, _cell(fa, "peak_mib", ".1f"), _cell(nv, "peak_mib", ".1f"),
                     ratio, _ms(fa), ms_nv])
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_plot(rows: List[dict], path: str, title: str) -> None:
    """Memory and time against seqlen, two log-log panels, as a PNG (no display needed)."""
    from matplotlib.figure import Figure   # a bare Figure renders with Agg; no pyplot, no global backend

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_mem, ax_ms = fig.subplots(1, 2)
    for impl, style in (("flashattn", "o-"), ("naive", "s--")):
        for ax, key in ((ax_mem, "peak_mib"), (ax_ms, "ms")):
            pts = [(r["seqlen"], r[impl][key]) for r in rows if r[impl].get(key, 0) > 0]
            if pts:
                ax.plot(*zip(*pts), style, label=impl)
    for ax, ylabel in ((ax_mem, "peak extra memory of one forward (MiB)"), (ax_ms, "time of one forward (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["seqlen"] for r in rows], [str(r["seqlen"]) for r in rows])
        ax.minorticks_off()
        ax.set_yscale("log")
        ax.set_xlabel("seqlen")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seqlens", type=int, nargs="+", metavar="N",
                   help=f"sequence lengths (default {' '.join(map(str, DEFAULT_SEQLENS))})")
    p.add_argument("--quick", action="store_true",
                   help=f"seqlens {' '.join(map(str, QUICK_SEQLENS))}: seconds instead of minutes")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="auto: cuda when torch sees one (default cpu)")
    p.add_argument("--dtype", choices=("auto", *_DTYPES), default="auto",
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--check-max-seqlen", type=int, default=4096, metavar="N",
                   help="compare with the float64 reference up to this seqlen; it needs O(N²) memory (default 4096)")
    p.add_argument("--naive-max-gib", type=float, default=8.0, metavar="GIB",
                   help="skip naive when its S and P would exceed this many GiB (default 8)")
    p.add_argument("--plot", default="flashattn_demo.png", metavar="PATH", help="PNG to write ('' for none)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """`flashattn demo` with parsed arguments; prints the table and returns an exit code."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"flashattn demo: {e}", file=sys.stderr)
        return 2
    seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else DEFAULT_SEQLENS)
    dtype = default_dtype(device) if args.dtype == "auto" else args.dtype
    t0 = time.perf_counter()
    rows = run_demo(seqlens, batch=args.batch, nheads=args.heads, headdim=args.headdim, device=device, dtype=dtype,
                    check_max_seqlen=args.check_max_seqlen, naive_max_gib=args.naive_max_gib, seed=args.seed,
                    progress=not args.no_progress)
    wall = time.perf_counter() - t0
    what = "peak RSS growth" if device == "cpu" else "max_memory_allocated growth"
    title = f"{device}, {dtype}, batch {args.batch}, {args.heads} heads, headdim {args.headdim}"
    print(f"flashattn vs naive attention: {title}; threads {torch.get_num_threads()}")
    print(f"each in a fresh process; memory = {what} during one forward; ms = best of up to 3 forwards; "
          "errors = max |out - float64 reference|")
    print(format_table(rows))
    if args.plot:
        save_plot(rows, args.plot, f"flashattn vs naive attention ({title})")
        print(f"plot: {os.path.abspath(args.plot)}")
    if args.json:
        meta = {"device": device, "dtype": dtype, "batch": args.batch, "nheads": args.heads, "headdim": args.headdim,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "wall_s": wall}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"done in {wall:.1f} s")
    failed = [r["seqlen"] for r in rows if "error" in r["flashattn"]]
    return 1 if failed else 0


def build_parser(prog: str = "flashattn demo") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_measure"]:   # the worker side of measure_in_subprocess
        print(json.dumps(measure(Job(**json.loads(argv[1])))))
        return 0
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
