"""`flashattn bench decode`: one decoding step over a KV cache, as bandwidth (GPU).

Decoding reads the whole K/V cache once per step and does ~2 FLOPs per byte: it is bound by memory
bandwidth, so the figure of merit is K/V bytes read / time against the copy bandwidth measured in
the same run (a 1 GiB device copy, bytes read + written). Each step appends one token (k, v) and
attends with seqlen_q = 1 over `context` keys, for contiguous caches and paged ones.

    flashattn bench decode                                   # the default grid
    flashattn bench decode --contexts 16384 65536 --batches 1 8 --layouts contiguous,paged16 --json d.json
    flashattn bench decode --kv-dtype fp8                    # float8_e4m3fn caches (1 byte per element read)

Times are CUDA-graph replays (triton.testing.do_bench_cudagraph), as a serving engine that captures
its decode step sees them; the host-side cost of a call is not in them (see benchmarks/overhead.py).
The peer is torch SDPA (default backend choice, enable_gqa) on a contiguous (batch, nheads_k,
context, headdim) cache: the same bytes, its preferred layout. With --kv-dtype fp8 the caches are
float8_e4m3fn with per-(sequence, kv head) descales (q and the appended token stay bf16), so K/V bytes
count 1 per element; the SDPA peer still reads a bf16 cache (its TB/s count 2 bytes per element).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import List, Optional, Sequence

LAYOUTS = ("contiguous", "paged16", "paged256")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashattn bench decode",
                                description="decode-step bandwidth over a KV cache vs the copy bandwidth and torch SDPA")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated of {LAYOUTS}")
    p.add_argument("--nheads", type=int, default=32)
    p.add_argument("--nheads-k", type=int, default=8)
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--num-splits", type=int, default=0, help="0 (default): automatic")
    p.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16",
                   help="cache dtype: bf16, or fp8 (float8_e4m3fn with per-(sequence, kv head) descales; q stays bf16)")
    p.add_argument("--max-gib", type=float, default=32.0,
                   help="skip shapes whose bf16 K/V cache exceeds this (GiB; built in bf16 for every --kv-dtype)")
    p.add_argument("--no-sdpa", action="store_true", help="time flashattn only")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG: achieved bandwidth vs context")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-shape lines (the table still prints)")
    return p


def _paged(k, v, page_size, gen):
    """The contiguous (b, s, hk, d) caches scattered over randomly permuted pages of page_size rows."""
    import torch
    dtype = k.dtype
    if dtype == torch.float8_e4m3fn:   # pad and index_put on the bytes
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    b, s, hk, d = k.shape
    per_seq = math.ceil(s / page_size)
    perm = torch.randperm(b * per_seq, generator=gen).to(k.device)
    table = perm.view(b, per_seq).to(torch.int32)
    pages = torch.empty(b * per_seq, page_size, hk, d, dtype=k.dtype, device=k.device)
    vpages = torch.empty_like(pages)
    pad = per_seq * page_size - s
    kk = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page_size, hk, d)
    vv = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad)).view(b * per_seq, page_size, hk, d)
    pages[perm] = kk
    vpages[perm] = vv
    return pages.view(dtype), vpages.view(dtype), table


def _fp8_cache(x):
    """x (b, s, hk, d) as float8_e4m3fn with descales (b, hk) = amax / 448 per sequence and kv head, one
    sequence at a time (bounded float32 temporaries)."""
    import torch

    from ..fp8 import E4M3_MAX, quantize_with
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    descale = torch.empty(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)
    for i in range(x.shape[0]):
        descale[i] = x[i].float().abs().amax(dim=(0, 2)).clamp_min(1e-30) / E4M3_MAX
        x8[i] = quantize_with(x[i], descale[i][:, None])
    return x8, descale


def run(argv: Sequence[str]) -> int:
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    from ..kvcache import flash_attn_with_kvcache
    from .environment import describe
    from .gpu import do_bench_ms, measure_ceilings
    from .progress import log_fn, progress_bar

    args = build_parser().parse_args(list(argv))
    if not torch.cuda.is_available():
        print("flashattn bench decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        raise SystemExit(f"flashattn bench decode: unknown layout(s) {bad}; choose from {LAYOUTS}")
    env = describe("cuda", ["bench", "decode", *argv])
    ceilings = measure_ceilings(do_bench_ms(25, 100))
    copy_tbps = ceilings.get("copy_tbps")
    dt = torch.bfloat16
    h, hk, d = args.nheads, args.nheads_k, args.hdim
    gen = torch.Generator().manual_seed(0)
    rows: List[dict] = []
    shapes = [(ctx, b) for ctx in args.contexts for b in args.batches]
    log = log_fn(args.quiet)
    fp8 = args.kv_dtype == "fp8"
    for ctx, b in progress_bar(shapes, desc="bench decode", unit="shape", quiet=args.quiet):
        bf16_bytes = 2 * b * ctx * hk * d * 2
        kv_bytes = bf16_bytes // 2 if fp8 else bf16_bytes
        if bf16_bytes > args.max_gib * 2**30:
            rows.append(dict(context=ctx, batch=b, skipped=f"K/V {bf16_bytes / 2**30:.0f} GiB (bf16) > --max-gib"))
            continue
        q = torch.randn(b, 1, h, d, device="cuda", dtype=dt)
        knew, vnew = (torch.randn(b, 1, hk, d, device="cuda", dtype=dt) for _ in range(2))
        k = torch.randn(b, ctx, hk, d, device="cuda", dtype=dt)
        v = torch.randn(b, ctx, hk, d, device="cuda", dtype=dt)
        seqlens = torch.full((b,), ctx - 1, dtype=torch.int32, device="cuda")
        row = dict(context=ctx, batch=b, kv_bytes=kv_bytes)
        kq, vq, descales = k, v, {}
        if fp8:
            (kq, kd), (vq, vd) = _fp8_cache(k), _fp8_cache(v)
            descales = dict(k_descale=kd, v_descale=vd)
        ref = None
        for layout in layouts:
            if layout == "contiguous":
                kc, vc, table = kq, vq, None
            else:
                kc, vc, table = _paged(kq, vq, int(layout[5:]), gen)
            fn = lambda: flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=seqlens, block_table=table,
                                                 causal=True, num_splits=args.num_splits, validate=False, **descales)
            out = fn()
            ref = out if ref is None else ref
            row[f"{layout}_err"] = float((out.float() - ref.float()).abs().max())
            ms = do_bench_cudagraph(fn, rep=50)
            row[f"{layout}_us"] = ms * 1e3
            row[f"{layout}_tbps"] = kv_bytes / (ms * 1e-3) / 1e12
            del kc, vc, table
        del kq, vq   # (fp8: the quantized copies) before SDPA's transposed bf16 ones
        if not args.no_sdpa:
            kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            kt[:, :, -1:], vt[:, :, -1:] = knew.transpose(1, 2), vnew.transpose(1, 2)
            qt = q.transpose(1, 2)
            sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
            o = sdpa().transpose(1, 2)
            row["sdpa_err"] = float((o.float() - ref.float()).abs().max())
            ms = do_bench_cudagraph(sdpa, rep=50)
            row["sdpa_us"], row["sdpa_tbps"] = ms * 1e3, bf16_bytes / (ms * 1e-3) / 1e12
            del kt, vt
        rows.append(row)
        del k, v
        torch.cuda.empty_cache()
        log(_line(row, layouts, copy_tbps, not args.no_sdpa))
    table = format_table(rows, layouts, copy_tbps, not args.no_sdpa, env, ceilings, h, hk, d, args.kv_dtype)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, ceilings=ceilings, config=vars(args), rows=rows), f, indent=1)
    if args.plot:
        plot(rows, layouts, copy_tbps, args.plot, f"decode, {env.get('gpu')}, {args.kv_dtype} cache, {h}/{hk} heads, "
                                                  f"hdim {d}")
    return 0


def _line(row: dict, layouts, copy_tbps, sdpa: bool) -> str:
    if "skipped" in row:
        return f"{row['context']:>8d} {row['batch']:>5d}   skipped: {row['skipped']}"
    cells = [f"{row['context']:>8d} {row['batch']:>5d}"]
    for lay in layouts:
        tb = row[f"{lay}_tbps"]
        cells.append(f"{row[f'{lay}_us']:>9.1f} {tb:>5.2f} {tb / copy_tbps:>5.0%}" if copy_tbps else f"{tb:>5.2f}")
    if sdpa:
        cells.append(f"{row['sdpa_us']:>9.1f} {row['sdpa_tbps']:>5.2f} {row['sdpa_us'] / row[layouts[0] + '_us']:>6.2f}x")
    return " | ".join(cells)


def format_table(rows, layouts, copy_tbps, sdpa, env, ceilings, h, hk, d, kv_dtype="bf16") -> str:
    cache = "bf16" if kv_dtype == "bf16" else "bf16 q, fp8 (e4m3) K/V cache (1 byte per element; sdpa: bf16 cache)"
    copy = (f"copy bandwidth {copy_tbps:.2f} TB/s (1 GiB device copy, read + write)" if copy_tbps
            else "copy bandwidth: not measured")
    head = [f"flashattn bench decode: {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"{env.get('date')}",
            f"{cache}, nheads {h}, nheads_k {hk}, hdim {d}, seqlen_q 1 (+1 appended token); {copy}",
            "per layout: time (us), K/V TB/s, fraction of the copy bandwidth"
            + ("; sdpa: time, TB/s, speed-up of flashattn's first layout over it" if sdpa else "")]
    cols = [f"{'context':>8s} {'batch':>5s}"] + [f"{lay:>21s}" for lay in layouts] + (["sdpa".rjust(24)] if sdpa else [])
    lines = head + [" | ".join(cols)] + [_line(r, layouts, copy_tbps, sdpa) for r in rows]
    return "\n".join(lines)


def plot(rows, layouts, copy_tbps, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    batches = sorted({r["batch"] for r in rows if "skipped" not in r})
    for lay in layouts + ["sdpa"]:
        for b in batches:
            pts = [(r["context"], r.get(f"{lay}_tbps")) for r in rows if r["batch"] == b and r.get(f"{lay}_tbps")]
            if pts:
                ax.plot(*zip(*pts), marker="o" if lay != "sdpa" else "x", label=f"{lay} batch {b}",
                        linestyle="-" if lay != "sdpa" else ":")
    if copy_tbps:
        ax.axhline(copy_tbps, color="k", linestyle="--", label=f"copy {copy_tbps:.2f} TB/s")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (keys)")
    ax.set_ylabel("K/V bytes read / time (TB/s)")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
