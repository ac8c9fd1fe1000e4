"""CPU mode: flashattn's tiled PyTorch path against torch's own CPU attention, time and memory.

Defaults: batch 1, 8 heads, seqlen 8192, headdim 64, float32, non-causal. Times: flashattn's forward,
torch's scaled_dot_product_attention (default dispatch) and naive attention (matmul, softmax, matmul
in the inputs' dtype, materializing S and P: flashattn.demo.naive_attention), median over
repetitions in this process. Memory: peak extra memory of one forward of each, every measurement
in a fresh subprocess (see memory.py).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from ..flops import attention_flops, tflops
from . import memory
from .records import emit_markdown
from .environment import describe
from .progress import log_fn

CPU_IMPLS = ("flashattn", "sdpa", "naive")
LABELS = {"flashattn": "flashattn (tiled)", "sdpa": "torch SDPA (default)", "naive": "naive (materialized)"}


def time_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float, min_reps: int = 3,
            min_warmup: int = 2) -> dict:
    """Wall-clock median in ms: at least `min_warmup` calls and `warmup_ms` of calls untimed (oneDNN
    builds its kernels for each new matmul shape on first use), then at least `min_reps` calls and
    at least `rep_ms` of them."""
    t0 = time.perf_counter()
    n = 0
    while n < min_warmup or (time.perf_counter() - t0) * 1e3 < warmup_ms:
        fn()
        n += 1
    times: List[float] = []
    t0 = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - t0) * 1e3 < rep_ms:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "min_ms": min(times), "reps": len(times)}


def run(args, argv) -> int:
    seqlen = args.seqlen_list[0]
    hdim = args.hdim_list[0]
    causal = args.causal_list[0]
    batch, heads, dtype = args.batch, args.heads, args.dtype_t
    dtype_name = str(dtype).replace("torch.", "")
    impls = [i for i in CPU_IMPLS if i == "flashattn" or i in args.peer_list]
    env = describe("cpu", argv)
    env["dtype"] = dtype_name
    config = {"batch": batch, "heads": heads, "seqlen": seqlen, "hdim": hdim, "dtype": dtype_name,
              "causal": causal, "impls": impls, "warmup_ms": args.warmup, "rep_ms": args.rep,
              "memory": not args.no_memory}
    log = log_fn(getattr(args, "quiet", False))
    log(f"flashattn bench (cpu): {env['cpu']}, {env['threads']} threads, torch {env['torch']} | "
        f"batch {batch}, heads {heads}, seqlen {seqlen}, hdim {hdim}, {dtype_name}, "
        f"causal {'yes' if causal else 'no'}")

    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(batch, seqlen, heads, hdim, generator=g, dtype=dtype) for _ in range(3))
    inputs = {"bshd": (q, k, v), "bhsd": tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))}
    flops = attention_flops(batch, heads, seqlen, seqlen, hdim, causal, "fwd")

    results: Dict[str, dict] = {}
    outs: Dict[str, torch.Tensor] = {}
    for impl in impls:
        layout, fn = memory.attention_fn(impl, causal)
        args_ = inputs[layout]
        r: dict = {"impl": impl, "layout": layout}
        try:
            with torch.no_grad():
                out = fn(*args_)
                outs[impl] = out if layout == "bshd" else out.transpose(1, 2)
                r.update(time_ms(lambda: fn(*args_), args.warmup, args.rep))
            r["gflops"] = tflops(flops, r["ms"]) * 1e3
        except Exception as e:
            r["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        results[impl] = r
        log(f"  time {impl:>10}: " + (f"{r['ms']:.1f} ms ({r['reps']} reps)" if "ms" in r else r["error"]))
    check = {}
    if "flashattn" in outs:
        for other in ("sdpa", "naive"):
            if other in outs:
                check[f"max_abs_err_vs_{other}"] = (outs["flashattn"].float() - outs[other].float()).abs().max().item()
    del outs, inputs, q, k, v

    mem: Dict[str, dict] = {}
    if not args.no_memory:
        for impl in impls:
            try:
                mem[impl] = memory.measure_peak_memory(impl, seqlen=seqlen, batch=batch, heads=heads, hdim=hdim,
                                                       dtype=dtype_name, causal=causal)
            except Exception as e:
                mem[impl] = {"error": str(e)[:1000]}
            m = mem[impl]
            log(f"  memory {impl:>8}: " + (f"{m['peak_extra_mib']:.1f} MiB" if "peak_extra_mib" in m else m["error"]))

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if (a is not None and b) else None

    ms = {i: results[i].get("ms") for i in impls}
    mib = {i: mem.get(i, {}).get("peak_extra_mib") for i in impls}
    ratios = {"time_flashattn_over_sdpa": ratio(ms.get("flashattn"), ms.get("sdpa")),
              "time_flashattn_over_naive": ratio(ms.get("flashattn"), ms.get("naive")),
              "memory_flashattn_over_naive": ratio(mib.get("flashattn"), mib.get("naive")),
              "memory_sdpa_over_naive": ratio(mib.get("sdpa"), mib.get("naive"))}
    report = {"schema": "flashattn.bench/1", "mode": "cpu", "environment": env, "config": config,
              "results": results, "memory": mem, "ratios": ratios, "check": check,
              "elapsed_s": time.perf_counter() - t_start}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        emit_markdown(format_markdown(report), args.markdown)
    print(format_table(report), flush=True)
    return 0


def _fmt(x: Optional[float], fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_table(report: dict) -> str:
    env, c, res, mem, rt = report["environment"], report["config"], report["results"], report["memory"], report["ratios"]
    lines = [f"flashattn bench (cpu) | {env.get('cpu')} | {env.get('threads')} threads | torch {env.get('torch')}",
             f"batch {c['batch']}, heads {c['heads']}, seqlen {c['seqlen']}, hdim {c['hdim']}, {c['dtype']}, "
             f"causal {'yes' if c['causal'] else 'no'}; S and P of naive attention: "
             f"{c['batch'] * c['heads'] * c['seqlen'] ** 2 * (2 if c['dtype'] in ('float16', 'bfloat16') else 4) / 2**20:.0f} MiB each",
             f"{'impl':<22} {'fwd ms':>10} {'GFLOP/s':>9} {'peak extra MiB':>15}"]
    for impl in c["impls"]:
        r, m = res.get(impl, {}), mem.get(impl, {})
        ms = r.get("ms")
        line = f"{LABELS.get(impl, impl):<22} {_fmt(ms, '.1f'):>10} {_fmt(r.get('gflops'), '.1f'):>9} " \
               f"{_fmt(m.get('peak_extra_mib'), '.1f'):>15}"
        if r.get("error") or m.get("error"):
            line += "  " + (r.get("error") or m.get("error"))[:120]
        lines.append(line)
    lines.append(f"time ratio   flashattn / SDPA  = {_fmt(rt['time_flashattn_over_sdpa'], '.2f')}"
                 f"   (flashattn / naive = {_fmt(rt['time_flashattn_over_naive'], '.2f')}; < 1: flashattn faster)")
    lines.append(f"memory ratio flashattn / naive = {_fmt(rt['memory_flashattn_over_naive'], '.4f')}"
                 f"   (SDPA / naive = {_fmt(rt['memory_sdpa_over_naive'], '.4f')})")
    for name, err in report.get("check", {}).items():
        lines.append(f"{name.replace('_', ' ')}: {err:.2e}")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    env, c, res, mem, rt = report["environment"], report["config"], report["results"], report["memory"], report["ratios"]
    lines = [f"CPU: {env.get('cpu')}, {env.get('threads')} threads, torch {env.get('torch')}, "
             f"{env.get('date', '')[:10]}. Batch {c['batch']}, {c['heads']} heads, seqlen {c['seqlen']}, "
             f"headdim {c['hdim']}, {c['dtype']}, causal {'yes' if c['causal'] else 'no'}. "
             f"Command: `{env.get('command', '')}`", "",
             "| implementation | forward ms | GFLOP/s | peak extra memory (MiB) |", "|---|---|---|---|"]
    for impl in c["impls"]:
        r, m = res.get(impl, {}), mem.get(impl, {})
        lines.append(f"| {LABELS.get(impl, impl)} | {_fmt(r.get('ms'), '.1f')} | {_fmt(r.get('gflops'), '.1f')} | "
                     f"{_fmt(m.get('peak_extra_mib'), '.1f')} |")
    lines += ["", f"Time flashattn / SDPA: {_fmt(rt['time_flashattn_over_sdpa'], '.2f')}; "
              f"memory flashattn / naive: {_fmt(rt['memory_flashattn_over_naive'], '.4f')}."]
    return "\n".join(lines) + "\n"
