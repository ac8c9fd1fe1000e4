"""Peak extra memory of one attention forward (or forward + backward), measured in a fresh process.

    from flashattn.bench.memory import measure_peak_memory
    m = measure_peak_memory("naive", seqlen=8192)        # runs `python -m flashattn.bench.memory ...`
    m["peak_extra_mib"]

or from a shell (prints one JSON line):

    python -m flashattn.bench.memory --impl flashattn --seqlen 8192 --heads 8 --hdim 64 --dtype float32 [--backward]

Implementations: "flashattn" (flash_attn_func), "sdpa" (torch's scaled_dot_product_attention, default
dispatch) and "naive" (flashattn.demo.naive_attention: matmul, softmax, matmul in the inputs' dtype,
materializing the seqlen × seqlen scores S and probabilities P). With backward=True the call is a
forward and `torch.autograd.grad` of (q, k, v) for a random upstream gradient: the peak then
includes the gradients (3 × the size of q) and whatever the implementation keeps for the backward.

CPU: the growth of the resident set over the call. A fresh process per measurement, because peak
RSS only ever goes up within a process. In that process: warm the implementation up on a tiny
shape (thread pools and lazy initialization are not the attention's memory), build the inputs,
reset the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`), read VmRSS, run once, read
VmHWM; the difference is the peak extra memory. VmHWM rather than `ru_maxrss`: a child's ru_maxrss
starts at its parent's peak RSS (Linux carries it over at exec), so a big parent would hide the
child's own peak. Where /proc is missing, ru_maxrss growth is the fallback. glibc's malloc is
pinned to its static mmap threshold so that freed large blocks go back to the system and RSS
follows the live memory.

CUDA (`device="cuda"`): torch.cuda.max_memory_allocated() minus the memory allocated before the call,
after a warm-up call on the full shape (compiling and autotuning the kernels allocate memory of
their own). The allocator's high-water mark can be reset, so on CUDA `measure_here` may also run
in the caller's process (`flashattn bench memory --device cuda` does).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..iomodel import score_matrix_bytes

IMPLS = ("flashattn", "sdpa", "naive")
MIB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# parent side


def measure_peak_memory(impl: str, *, seqlen: int, batch: int = 1, heads: int = 8, hdim: int = 64,
                        dtype: str = "float32", causal: bool = False, device: str = "cpu",
                        backward: bool = False, timeout: float = 1800.0) -> dict:
    """Run one measurement in a fresh Python process; returns its JSON record (see `measure_here`).

    Raises RuntimeError (with the child's stderr tail) if the child fails, e.g. runs out of memory.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    cmd = [sys.executable, "-m", "flashattn.bench.memory", "--impl", impl, "--seqlen", str(seqlen),
           "--batch", str(batch), "--heads", str(heads), "--hdim", str(hdim), "--dtype", dtype,
           "--device", device]
    if causal:
        cmd.append("--causal")
    if backward:
        cmd.append("--backward")
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])   # the directory holding the flashattn package
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
        raise RuntimeError(f"memory measurement of {impl} at seqlen {seqlen} failed: {why}: " + " | ".join(tail))
    return json.loads(lines[-1])


def peak_extra_mib(impl: str, **kwargs) -> float:
    """Just the number: peak extra MiB of one forward of `impl` (see measure_peak_memory)."""
    return measure_peak_memory(impl, **kwargs)["peak_extra_mib"]


# ----------------------------------------------------------------------------------------------
# child side


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform == "darwin" else r   # bytes on macOS, KiB on Linux


def attention_fn(impl: str, causal: bool):
    """(layout, fn(q, k, v) -> out) for one of IMPLS."""
    import torch.nn.functional as F

    if impl == "flashattn":
        from flashattn import flash_attn_func
        return "bshd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    if impl == "sdpa":
        return "bhsd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if impl == "naive":
        # not SDPA's MATH backend: since torch 2.5 it upcasts fp16/bf16 to fp32, doubling S and P
        from flashattn.demo import naive_attention
        return "bshd", lambda q, k, v: naive_attention(q, k, v, q.shape[-1] ** -0.5, causal=causal)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def make_qkv(layout: str, batch: int, seqlen: int, heads: int, hdim: int, dtype, device: str, seed: int = 0,
             n_tensors: int = 3):
    """`n_tensors` random tensors (q, k, v[, dout]) of shape (batch, seqlen, heads, hdim) for layout
    "bshd", (batch, heads, seqlen, hdim) for "bhsd"."""
    import torch
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    shape = (batch, seqlen, heads, hdim) if layout == "bshd" else (batch, heads, seqlen, hdim)
    return [torch.randn(shape, generator=g, dtype=dtype, device=device) for _ in range(n_tensors)]


def measure_here(impl: str, *, seqlen: int, batch: int = 1, heads: int = 8, hdim: int = 64,
                 dtype: str = "float32", causal: bool = False, device: str = "cpu", backward: bool = False) -> dict:
    """The measurement itself, in this process (on CPU meaningful once per process: see the module
    docstring). Returns a JSON-able record; peak_extra_mib is the number."""
    import gc

    import torch

    dt = getattr(torch, dtype)
    layout, fn = attention_fn(impl, causal)

    def call(q, k, v, dout):
        if not backward:
            with torch.no_grad():
                return fn(q, k, v)
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    def inputs(b, n, h):
        q, k, v, dout = make_qkv(layout, b, n, h, hdim, dt, device, n_tensors=4)
        if backward:
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
        return q, k, v, dout

    # warm up: lazy initialization is not attention memory. On CPU on a tiny shape (the RSS of this
    # process must not have held blocks of the measured size before); on CUDA on the full shape
    # (compilation and autotuning allocate), then the allocator's peak is reset.
    call(*inputs(1, 128, 2))
    q, k, v, dout = inputs(batch, seqlen, heads)
    if device == "cuda":
        call(q, k, v, dout)
        torch.cuda.synchronize()
    gc.collect()
    record = {"impl": impl, "device": device, "seqlen": seqlen, "batch": batch, "heads": heads, "hdim": hdim,
              "dtype": dtype, "causal": causal, "layout": layout, "passes": "fwd_bwd" if backward else "fwd",
              "inputs_mib": 3 * q.numel() * q.element_size() / MIB,
              "output_mib": q.numel() * q.element_size() / MIB,
              "scores_mib": score_matrix_bytes(batch, heads, seqlen, seqlen, q.element_size()) / MIB}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = call(q, k, v, dout)
        torch.cuda.synchronize()
        record["ms"] = (time.perf_counter() - t0) * 1e3
        peak = torch.cuda.max_memory_allocated()
        record.update(method="torch.cuda.max_memory_allocated - memory_allocated before the call",
                      baseline_mib=base / MIB, peak_mib=peak / MIB, peak_extra_mib=(peak - base) / MIB)
    else:
        use_hwm = _status_kib("VmHWM") is not None and _reset_hwm()
        base_kib = _status_kib("VmRSS") if use_hwm else _maxrss_kib()
        t0 = time.perf_counter()
        out = call(q, k, v, dout)
        record["ms"] = (time.perf_counter() - t0) * 1e3
        peak_kib = _status_kib("VmHWM") if use_hwm else _maxrss_kib()
        record.update(method=("VmHWM after clear_refs reset - VmRSS before the call" if use_hwm
                              else "ru_maxrss growth over the call"),
                      baseline_mib=base_kib / 1024, peak_mib=peak_kib / 1024,
                      peak_extra_mib=(peak_kib - base_kib) / 1024,
                      malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    del out
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashattn.bench.memory",
                                description="Peak extra memory of one attention forward (prints one JSON line).")
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--hdim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="forward + backward (torch.autograd.grad of q, k, v)")
    a = p.parse_args(argv)
    record = measure_here(a.impl, seqlen=a.seqlen, batch=a.batch, heads=a.heads, hdim=a.hdim, dtype=a.dtype,
                          causal=a.causal, device=a.device, backward=a.backward)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
