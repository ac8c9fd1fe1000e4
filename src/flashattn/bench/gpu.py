"""GPU mode: the FlashAttention papers' grid, every implementation timed in one process on the same inputs.

Grid: batch · seqlen = 16384 tokens, nheads · headdim = 2048, seqlen 512 … 16384, causal off and on,
forward and backward timed separately with `triton.testing.do_bench` (median). Ceilings (a bf16
8192³ matmul, a large device-to-device copy) are measured at the start of the same run.
"""
from __future__ import annotations

import signal
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from . import records
from .progress import log_fn, progress_bar
from .peers import (PEERS, Bench, Case, DeviceLost, Peer, PeerRun, device_check, check_case,
                    make_inputs, run_peer)
from .records import OURS, Check, Result

GRID_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GRID_HDIMS = (64, 128)
QUICK_SEQLENS = (1024, 4096)
QUICK_HDIMS = (128,)


def do_bench_ms(warmup_ms: float, rep_ms: float) -> Bench:
    """triton.testing.do_bench, median, in milliseconds (it flushes the L2 cache before every call)."""
    from triton.testing import do_bench

    def bench(fn):
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return bench


def make_cases(hdims: Sequence[int], seqlens: Sequence[int], causals: Sequence[bool], dtype: torch.dtype,
               device: str, tokens: int = 16384, width: int = 2048) -> List[Case]:
    cases = []
    for hdim in hdims:
        if width % hdim:
            raise ValueError(f"--width {width} is not a multiple of headdim {hdim}; nheads = width / headdim")
        for causal in causals:
            for seqlen in seqlens:
                cases.append(Case(max(1, tokens // seqlen), width // hdim, seqlen, hdim, causal, dtype, device))
    return cases


def measure_ceilings(bench: Bench, device: str = "cuda", n: int = 8192, nbytes: int = 1 << 30) -> dict:
    """bf16 n³ matmul in TFLOP/s and a device-to-device copy of nbytes in TB/s (bytes read + written)."""
    out: dict = {}
    try:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        ms = bench(lambda: torch.mm(a, b, out=c))
        out.update(matmul_shape=[n, n, n], matmul_ms=ms, matmul_tflops=2.0 * n ** 3 / (ms * 1e-3) / 1e12)
        del a, b, c
        src = torch.empty(nbytes, device=device, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        ms = bench(lambda: dst.copy_(src))
        out.update(copy_bytes=nbytes, copy_ms=ms, copy_tbps=2.0 * nbytes / (ms * 1e-3) / 1e12)
        del src, dst
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_grid(cases: Sequence[Case], peers: Sequence[Peer], passes: Sequence[str], bench: Bench, *,
             check: bool = True, seed: int = 0, time_budget_s: Optional[float] = None,
             on_case_done: Optional[Callable[[List[Result], List[Check], bool], None]] = None,
             log: Callable[[str], None] = _progress,
             start: Optional[float] = None,
             progress: Callable[[Sequence[Case]], Iterable[Case]] = iter) -> Tuple[List[Result], List[Check], bool]:
    """Every peer on every case. Returns (results, checks, complete); cases not run (time budget,
    interruption, lost device) are recorded as results with the reason. The time budget counts
    from `start` (a time.perf_counter() value; default: now). `progress` wraps the cases (e.g. in a
    progress bar: bench/progress.py)."""
    results: List[Result] = []
    checks: List[Check] = []
    start = time.perf_counter() if start is None else start
    stop_reason: Optional[str] = None
    for n, case in enumerate(progress(cases)):
        if stop_reason is None and time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            stop_reason = f"skipped: time budget of {time_budget_s:.0f} s spent"
        if stop_reason is not None:
            results += [Result(p.name, case.hdim, case.seqlen, case.causal, pass_, case.batch, case.nheads,
                               case.dtype_name, error=stop_reason) for p in peers for pass_ in passes]
            continue
        tag = (f"[{n + 1}/{len(cases)} {time.perf_counter() - start:6.0f}s] hdim {case.hdim} seqlen {case.seqlen} "
               f"batch {case.batch} heads {case.nheads} causal {'yes' if case.causal else 'no'}")
        runs: Dict[str, PeerRun] = {}
        try:
            try:
                inputs = make_inputs(case, seed)
            except (KeyboardInterrupt, DeviceLost):
                raise
            except Exception as e:
                reason = f"inputs failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log(f"{tag}: {reason}")
                results += [Result(p.name, case.hdim, case.seqlen, case.causal, pass_, case.batch, case.nheads,
                                   case.dtype_name, error=reason) for p in peers for pass_ in passes]
                device_check(case)
                if on_case_done is not None:
                    on_case_done(results, checks, False)
                continue
            for peer in peers:
                run = run_peer(peer, case, inputs, passes, bench, keep_outputs=check)
                runs[peer.name] = run
                results += run.results
                log(f"{tag} {peer.name:>14}: " + "  ".join(
                    f"{r.pass_} {r.ms:8.3f} ms {r.tflops:6.1f} TFLOP/s" if r.ok else f"{r.pass_} n/a ({(r.error or '')[:90]})"
                    for r in run.results))
            if check:
                try:
                    checks.append(check_case(case, runs, inputs))
                except (KeyboardInterrupt, DeviceLost):
                    raise
                except Exception as e:
                    checks.append(Check(case.hdim, case.seqlen, case.causal, None, {},
                                        f"check failed: {type(e).__name__}: {str(e)[:300]}"))
                    device_check(case)
            del inputs, runs
            if case.device == "cuda":
                torch.cuda.empty_cache()
        except (KeyboardInterrupt, DeviceLost) as e:
            stop_reason = ("skipped: interrupted" if isinstance(e, KeyboardInterrupt)
                           else f"skipped: {e}")
            log(f"{tag}: stopping the run: {stop_reason}")
            done = {(r.impl, r.pass_) for r in results if r.key[:3] == (case.hdim, case.seqlen, case.causal)}
            results += [Result(p.name, case.hdim, case.seqlen, case.causal, pass_, case.batch, case.nheads,
                               case.dtype_name, error=stop_reason)
                        for p in peers for pass_ in passes if (p.name, pass_) not in done]
        if on_case_done is not None:
            on_case_done(results, checks, False)
    return results, checks, stop_reason is None


class _SigtermAsInterrupt:
    """Turn SIGTERM (what `timeout` sends) into KeyboardInterrupt so the table of what ran still prints."""

    def __enter__(self):
        def handler(signum, frame):
            raise KeyboardInterrupt
        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
            self.installed = True
        except (ValueError, OSError):   # not the main thread
            self.installed = False
        return self

    def __exit__(self, *exc):
        if self.installed:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
        return False


def run(args, argv, *, device: str = "cuda", bench: Optional[Bench] = None, with_ceilings: bool = True) -> int:
    """The GPU mode. `device`, `bench` and `with_ceilings` exist so the tests can drive it on the CPU."""
    from .environment import describe, flashattn_backend

    t_start = time.perf_counter()
    if device == "cuda" and not torch.cuda.is_available():
        print("flashattn bench: --device cuda asked for, but torch sees no CUDA device "
              f"(torch {torch.__version__}); run with --device cpu", file=sys.stderr)
        return 2
    dtype = args.dtype_t
    peers = [PEERS[OURS]] + [PEERS[p] for p in args.peer_list if p != OURS]
    passes = args.pass_list
    cases = make_cases(args.hdim_list, args.seqlen_list, args.causal_list, dtype, device, args.tokens, args.width)
    env = describe(device, argv)
    env["dtype"] = str(dtype).replace("torch.", "")
    env["flashattn_backend"], env["flashattn_backend_warning"] = flashattn_backend(device, dtype)
    config = {"hdims": list(args.hdim_list), "seqlens": list(args.seqlen_list),
              "causal": [bool(c) for c in args.causal_list], "passes": list(passes), "dtype": env["dtype"],
              "tokens": args.tokens, "width": args.width, "peers": [p.name for p in peers],
              "warmup_ms": args.warmup, "rep_ms": args.rep,
              "timer": "triton.testing.do_bench, median" if bench is None else getattr(bench, "__name__", "custom"),
              "layouts": {p.name: p.layout for p in peers}, "seed": args.seed, "quick": bool(args.quick)}
    quiet = getattr(args, "quiet", False)
    log = log_fn(quiet)
    for line in records.format_header(env, {}):
        log(line)
    bench = bench or do_bench_ms(args.warmup, args.rep)
    ceilings: dict = {}
    if with_ceilings:
        log("measuring ceilings (bf16 8192^3 matmul, 1 GiB device copy) ...")
        ceilings = measure_ceilings(bench, device)
    log("ceilings: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in ceilings.items()))
    impls = [p.name for p in peers]

    def save(results, checks, complete):
        if args.json:
            report = records.report_dict(env=env, config=config, ceilings=ceilings, results=results,
                                         checks=checks, impls=impls, elapsed_s=time.perf_counter() - t_start,
                                         complete=complete)
            records.write_json(args.json, report)

    with _SigtermAsInterrupt():
        results, checks, complete = run_grid(cases, peers, passes, bench, check=not args.no_check, seed=args.seed,
                                             time_budget_s=args.time_budget, on_case_done=save, start=t_start,
                                             log=log, progress=lambda cases: progress_bar(
                                                 cases, desc="bench prefill", unit="shape", quiet=quiet))
    save(results, checks, complete)
    return render(env, ceilings, config, results, checks, impls, args,
                  elapsed_s=time.perf_counter() - t_start)


def render(env: dict, ceilings: dict, config: dict, results: Sequence[Result], checks: Sequence[Check],
           impls: Sequence[str], args, elapsed_s: Optional[float] = None) -> int:
    """Errors, file notes, markdown, then the table last."""
    rows = records.build_rows(results, checks, impls)
    errors = records.format_errors(results)
    if errors:
        print(errors)
    if args.json and not getattr(args, "load", None):
        print(f"wrote {args.json}")
    if args.plot:
        try:
            title = f"{env.get('gpu', '')}  {env.get('dtype', '')}  {env.get('date', '')[:10]}"
            records.plot(rows, impls, args.plot, title=title)
            print(f"wrote {args.plot}")
        except Exception as e:
            print(f"plot failed: {type(e).__name__}: {e}")
    if args.markdown is not None:
        records.emit_markdown(records.format_markdown(rows, impls, env, ceilings), args.markdown)
    header = records.format_header(env, ceilings)
    if elapsed_s is not None:
        header.append(f"command: {env.get('command', '')}   ({elapsed_s:.0f} s)")
    print(records.format_table(rows, impls, header), flush=True)
    return 0
