"""GPT-2 medium attention, forward + backward: measured time next to the HBM traffic of the IO model.

The FlashAttention paper's measurement that the seeds cite (Dao et al. 2022, Figure 2 left: GPT-2
medium, seqlen 1024, head dim 64, 16 heads, batch 64, forward + backward, A100), here on this GPU,
causal (GPT-2 is a decoder; --no-causal for the unmasked case), bf16, every implementation in one
process on the same inputs:

    flashattn   flash_attn_func (the Triton kernels on CUDA)
    naive       flashattn.demo.naive_attention: matmul, in-place scale, in-place causal masked_fill,
                softmax, matmul, all in bf16; S and P materialized, autograd keeps P
    sdpa_flash  torch SDPA forced to its FLASH_ATTENTION backend (FlashAttention-2)
    sdpa_math   torch SDPA forced to its MATH backend (since torch 2.5 it upcasts bf16 to fp32)

Time: forward, and backward alone (torch.autograd.grad with retain_graph), each the median of
triton.testing.do_bench (L2 flushed before every call), through flashattn.bench.peers.run_peer as
in `flashattn bench`; fwd+bwd is their sum. TFLOP/s from flashattn.flops.

Bytes: flashattn.iomodel, whose docstring states the formulas. Per (batch, head), N = seqlen, d = hdim:
    standard attention (naive, sdpa_math): S and P written and read back, forward
        4Nd + 4N² elements, backward 8Nd + 7N², plus 2N² each way per elementwise pass over S
        (naive: 2, the scale and the causal mask; sdpa_math: 1, the mask, with fp32 score matrices
        when it upcasts). The seeds' Θ(Nd + N²).
    FlashAttention (flashattn, sdpa_flash): from the tile loops. K and V are re-read once per query
        block (N / B_r passes) in the forward and the dQ kernel, Q and dO once per key block in the
        dK/dV kernel, with the tiles the autotuner picked in this run (read back from the kernels,
        printed). That count assumes no L2 reuse: it is an upper bound; `compulsory` (each tensor
        once) is the lower bound. sdpa_flash: FA2's hdim-64 tiles (128 x 128, assumed) and its
        backward in one kernel with an fp32 dQ accumulator.
    The paper's Θ(N²d²/M), M = SRAM per SM (228 KiB on H100/H200, 192 KiB on A100), constant 1, is
    printed for reference: with the tiles of real kernels it is not a prediction.
Implied bandwidth = bytes / time, against the device-to-device copy bandwidth measured in the same
run. Standard attention near the copy bandwidth means it is memory-bound, as the paper argues;
FlashAttention's range [compulsory, tile loop] / time says how much L2 serves its re-reads.

    python benchmarks/gpt2_medium_io.py [--json gpt2_io.json] [--no-causal]
    python benchmarks/gpt2_medium_io.py --device cpu       # tiny shape: a smoke test (the CPU tier runs it)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Sequence

import torch

from flashattn import iomodel
from flashattn.bench.environment import describe
from flashattn.bench.peers import PEERS, Case, Peer, check_case, make_inputs, run_peer
from flashattn.demo import naive_attention
from flashattn.flops import attention_flops, tflops
from flashattn.iomodel import Tiles

GPT2_MEDIUM = dict(batch=64, heads=16, seqlen=1024, hdim=64)
CPU_TINY = dict(batch=2, heads=2, seqlen=128, hdim=32)
IMPLS = ("flashattn", "naive", "sdpa_flash", "sdpa_math")
FA2_HDIM64_TILES = Tiles(fwd=(128, 128), dkdv=(128, 128), dq=(128, 128))   # assumed: torch's FA2 kernel traits


def _naive_peer() -> Peer:
    def make(case: Case):
        scale = case.hdim ** -0.5
        return lambda q, k, v: naive_attention(q, k, v, scale, causal=case.causal)
    return Peer("naive", "bshd", make)


def flashattn_tiles(hdim: int, device: str) -> tuple:
    """(Tiles, how they were found) of flashattn's last forward and backward launches."""
    if device != "cuda":
        return Tiles(), "CPU: the PyTorch path ran; the model is of the GPU kernels, with their default tiles"
    from flashattn.backends import triton as tb
    block_d = max(16, 1 << (hdim - 1).bit_length())
    cfgs = {k: tb.launch_config(k, block_d) for k in ("fwd", "dkdv", "dq")}
    if any("BLOCK_M" not in c for c in cfgs.values()):
        return Tiles(), f"unknown ({cfgs}); the default tiles assumed"
    tiles = Tiles(*((c["BLOCK_M"], c["BLOCK_N"]) for c in (cfgs["fwd"], cfgs["dkdv"], cfgs["dq"])))
    return tiles, ", ".join(f"{k} {c['BLOCK_M']}x{c['BLOCK_N']} ({c['source']})" for k, c in cfgs.items())


def traffic_models(impl: str, shape: dict, causal: bool, itemsize: int, tiles: Tiles) -> dict:
    """{"lo": Traffic, "hi": Traffic, "model": words}: the IO-model bytes of one implementation."""
    b, h, n, d = shape["batch"], shape["heads"], shape["seqlen"], shape["hdim"]
    if impl in ("naive", "sdpa_math"):
        if impl == "naive":
            t = iomodel.standard_attention_traffic(b, h, n, n, d, itemsize, elementwise_passes=1 + int(causal))
            words = f"standard, S/P in the input dtype, {1 + int(causal)} elementwise pass(es)"
        else:
            # torch >= 2.5 computes fp16/bf16 math SDPA in fp32 unless allow_fp16_bf16_reduction_math_sdp(True)
            allowed = getattr(torch.backends.cuda, "fp16_bf16_reduction_math_sdp_allowed", lambda: True)()
            upcast = itemsize < 4 and not allowed
            t = iomodel.standard_attention_traffic(b, h, n, n, d, itemsize, score_itemsize=4 if upcast else None,
                                                   elementwise_passes=int(causal))
            words = f"standard, S/P in {'fp32 (upcast)' if upcast else 'input dtype'}, approximate"
        return {"lo": t, "hi": t, "model": words}
    low = iomodel.compulsory_traffic(b, h, n, n, d, itemsize)
    if impl == "flashattn":
        hi = iomodel.flash_attention_traffic(b, h, n, n, d, itemsize, causal=causal, tiles=tiles)
        return {"lo": low, "hi": hi, "model": "compulsory .. tile loop (tiles above)"}
    hi = iomodel.flash_attention_traffic(b, h, n, n, d, itemsize, causal=causal, tiles=FA2_HDIM64_TILES,
                                         atomic_dq=True)
    return {"lo": low, "hi": hi, "model": "compulsory .. FA2 tile loop (128x128 assumed, atomic dQ)"}


def _bench(device: str, warmup: float, rep: float):
    if device == "cuda":
        from flashattn.bench.gpu import do_bench_ms
        return do_bench_ms(warmup, rep)
    from flashattn.bench.cpu import time_ms
    return lambda fn: time_ms(fn, warmup, rep)["ms"]


def run(args) -> dict:
    """Measure every implementation once; returns the report (also what --json writes)."""
    from flashattn.bench.gpu import measure_ceilings

    device = args.device
    shape = dict(GPT2_MEDIUM if device == "cuda" else CPU_TINY)
    for key in shape:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    case = Case(shape["batch"], shape["heads"], shape["seqlen"], shape["hdim"], args.causal, dtype, device)
    bench = _bench(device, args.warmup, args.rep)
    env = describe(device, sys.argv[1:])
    ceilings = measure_ceilings(bench, device) if device == "cuda" else \
        measure_ceilings(bench, device, n=256, nbytes=1 << 24)
    inputs = make_inputs(case, args.seed)
    peers = {"naive": _naive_peer(), **{n: PEERS[n] for n in ("flashattn", "sdpa_flash", "sdpa_math")}}
    runs, rows = {}, []
    tiles, tiles_note = Tiles(), ""
    for impl in args.impls:
        run_ = run_peer(peers[impl], case, inputs, ("fwd", "bwd"), bench, keep_outputs=True)
        runs[impl] = run_
        if impl == "flashattn":
            tiles, tiles_note = flashattn_tiles(shape["hdim"], device)
        res = {r.pass_: r for r in run_.results}
        row = {"impl": impl, "fwd_ms": res["fwd"].ms, "bwd_ms": res["bwd"].ms,
               "errors": {p: r.error for p, r in res.items() if r.error}}
        row["fwd_bwd_ms"] = row["fwd_ms"] + row["bwd_ms"] if row["fwd_ms"] and row["bwd_ms"] else None
        rows.append(row)
        print(f"  {impl:>10}: fwd {_fmt(row['fwd_ms'], '.3f')} ms, bwd {_fmt(row['bwd_ms'], '.3f')} ms"
              + (f"  {row['errors']}" if row["errors"] else ""), file=sys.stderr, flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    check = check_case(case, runs, inputs)
    flops = attention_flops(case.batch, case.nheads, case.seqlen, case.seqlen, case.hdim, case.causal, "fwd_bwd")
    for row in rows:
        m = traffic_models(row["impl"], shape, args.causal, itemsize, tiles)
        row["model"] = m["model"]
        for pass_ in ("fwd", "bwd", "fwd_bwd"):
            lo, hi = m["lo"].of(pass_), m["hi"].of(pass_)
            row[f"{pass_}_bytes"] = [lo, hi]
            ms = row[f"{pass_}_ms"]
            row[f"{pass_}_tbps"] = [lo / (ms * 1e-3) / 1e12, hi / (ms * 1e-3) / 1e12] if ms else None
        row["tflops"] = tflops(flops, row["fwd_bwd_ms"]) if row["fwd_bwd_ms"] else None
        row["max_abs_err"] = check.errors.get(row["impl"])
    sram = iomodel.sram_per_sm(env.get("gpu", "")) or iomodel.SRAM_PER_SM["H100"]
    theta = iomodel.flash_theta_bound(shape["batch"], shape["heads"], shape["seqlen"], shape["hdim"], sram, itemsize)
    return {"schema": "flashattn.gpt2_medium_io/1", "environment": env, "ceilings": ceilings,
            "config": dict(shape, causal=args.causal, dtype=str(dtype).replace("torch.", ""), device=device,
                           impls=list(args.impls)),
            "tiles": {"flashattn": tiles_note, "sdpa_flash": "128x128 assumed (FA2 hdim 64)"},
            "theta_bound": {"sram_bytes": sram, "bytes": theta}, "reference": check.reference, "rows": rows}


def _range(pair: Optional[List[float]], scale: float, fmt: str) -> str:
    if not pair:
        return "-"
    lo, hi = pair[0] / scale, pair[1] / scale
    return format(lo, fmt) if abs(hi - lo) <= 1e-9 * max(1.0, abs(hi)) else f"{format(lo, fmt)}..{format(hi, fmt)}"


def format_table(report: dict) -> str:
    env, c, ceil = report["environment"], report["config"], report["ceilings"]
    where = env.get("gpu") or env.get("cpu")
    copy = ceil.get("copy_tbps")
    lines = [f"GPT-2 medium attention, fwd+bwd | {where} | torch {env.get('torch')} | triton {env.get('triton')} | "
             f"{env.get('date', '')[:10]}",
             f"batch {c['batch']}, heads {c['heads']}, seqlen {c['seqlen']}, hdim {c['hdim']}, {c['dtype']}, causal "
             f"{'yes' if c['causal'] else 'no'}; copy bandwidth "
             + (f"{copy:.3g} TB/s (a device copy, read + write, same run)" if copy else "not measured"),
             f"flashattn tiles: {report['tiles']['flashattn']}",
             "GB: HBM bytes of the IO model (flashattn.iomodel), a..b = compulsory..tile loop; TB/s = GB / time"]
    head = ["impl", "fwd ms", "bwd ms", "fwd+bwd ms", "TFLOP/s", "fwd+bwd GB", "TB/s", "x copy", "max err", "model"]
    body = []
    for r in report["rows"]:
        tb = r.get("fwd_bwd_tbps")
        err = r.get("max_abs_err")
        body.append([r["impl"], _fmt(r["fwd_ms"], ".2f"), _fmt(r["bwd_ms"], ".2f"), _fmt(r["fwd_bwd_ms"], ".2f"),
                     _fmt(r.get("tflops"), ".3g"), _range(r["fwd_bwd_bytes"], 1e9, ".3g"), _range(tb, 1, ".3g"),
                     _range(tb, copy, ".2g") if (tb and copy) else "-",
                     f"{max(err.values()):.1e}" if err else ("ref" if r["impl"] == report["reference"] else "-"),
                     r["model"]])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    table = ["  ".join(x.ljust(w) if i in (0, len(head) - 1) else x.rjust(w) for i, (x, w) in
                       enumerate(zip(line, widths))).rstrip() for line in [head] + body]
    table.insert(1, "  ".join("-" * w for w in widths))
    th = report["theta_bound"]
    notes = [f"Theta(N^2 d^2 / M), M = {th['sram_bytes'] // 1024} KiB SRAM per SM, constant 1: "
             f"{th['bytes'] / 1e9:.3f} GB (order of growth only; see flashattn/iomodel.py)"]
    for r in report["rows"]:
        for p, e in r["errors"].items():
            notes.append(f"{r['impl']} {p}: {e[:200]}")
    return "\n".join([ln for ln in lines if ln] + table + notes)


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default): GPT-2 medium in bf16; cpu: a tiny fp32 shape, a smoke test")
    for key in ("batch", "heads", "seqlen", "hdim"):
        p.add_argument(f"--{key}", type=int, default=None,
                       help=f"default {GPT2_MEDIUM[key]} (cuda), {CPU_TINY[key]} (cpu)")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated of {IMPLS}")
    p.add_argument("--warmup", type=float, default=25.0, help="ms of warm-up per measurement")
    p.add_argument("--rep", type=float, default=100.0, help="ms of timed repetitions per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.impls = [x.strip() for x in args.impls.split(",") if x.strip()]
    bad = [x for x in args.impls if x not in IMPLS]
    if bad or "flashattn" not in args.impls:
        raise SystemExit(f"--impls: choose from {IMPLS}, flashattn included; got {args.impls}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpt2_medium_io.py: no CUDA device visible; --device cpu runs a tiny smoke test", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    report = run(args)
    report["elapsed_s"] = time.perf_counter() - t0
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    print(format_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
