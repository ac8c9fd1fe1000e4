"""FP8 accuracy report: relative RMS error of FP8 attention against the float64 reference, next to bf16's.

    python benchmarks/fp8_accuracy.py [--device auto|cpu|cuda] [--backend auto|torch|triton] [--json PATH]
    flashattn bench --fp8-accuracy                      (the same report with its defaults)

Data (float32 q, k, v of shape (batch, seqlen, nheads, headdim), then each method):
  normal            q, k, v ~ N(0, 1)
  outlier channels  as normal, with the same `--outlier-channels` channels of q and k (per head) multiplied by
                    `--outlier-scale`: the massive activations of LLM queries and keys, aligned in q and k
  sparse outliers   N(0, 1) + N(0, 10²)·Bernoulli(0.001) in q, k and v (FlashAttention-3's test data)
Methods:
  bf16              q, k, v rounded to bf16, flashattn's bf16 forward (out bf16)
  fp8 tensor        per-tensor descales (flashattn.fp8.quantize_qkv(granularity="tensor"))
  fp8 head          per-(batch, kv head) descales
  fp8 head + rot    per-head, q and k rotated by a random-sign Hadamard matrix first (QKᵀ unchanged)
error = ‖out − ref‖ / ‖ref‖ over the whole tensor, ref the float64 attention of the float32 inputs.
Decoding over a KV cache (normal data, `--kv-batch` sequences): the last query of each sequence attends
to all its keys, the first seqlen − 1 prefilled into the cache and the last appended by the call, with a
bf16 cache and with float8_e4m3fn caches whose descales (per tensor, per sequence and head) come from
fp8.quantize of the prefill; q and the new k, v bf16 (fp16 under the interpreter).

Where the numbers come from: on a GPU (`--device cuda`) the Triton kernels (FP8: q·kᵀ and P·V on e4m3
tensor cores, P quantized to e4m3). On the CPU two backends: `torch`, the PyTorch path, which computes
attention of the dequantized inputs exactly (the definition: input quantization only), at the full
size; and `triton`, the same kernels as on the GPU under Triton's interpreter (so P is quantized too),
at a small size (--interp-seqlen). The backward section compares gradients of a random loss:
bf16 = flash_attn_func on bf16 inputs, fp8 = flashattn.fp8.attention (experimental: quantized inside,
gradients of the dequantized inputs passed straight through), both against float64 autograd, and
fp8 against bf16 directly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch

DATA = ("normal", "outlier channels", "sparse outliers")
METHODS = ("bf16", "fp8 tensor", "fp8 head", "fp8 head + rot")


def make_data(kind: str, b: int, s: int, h: int, d: int, seed: int, outlier_channels: int = 4,
              outlier_scale: float = 20.0):
    """float32 q, k, v (b, s, h, d) on the CPU for one kind of DATA."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
    if kind == "outlier channels":
        for x in (q, k):
            x[..., :outlier_channels] *= outlier_scale
    elif kind == "sparse outliers":
        for x in (q, k, v):
            x += 10.0 * torch.randn(x.shape, generator=g) * (torch.rand(x.shape, generator=g) < 1e-3)
    elif kind != "normal":
        raise ValueError(f"unknown data kind {kind!r}; expected one of {DATA}")
    return q, k, v


class Setup(NamedTuple):
    """Where each method runs: the backend for the bf16 and the FP8 calls, the FP8 output dtype."""
    device: str
    bf16_backend: str
    fp8_backend: str
    fp8_out_dtype: torch.dtype = torch.bfloat16


@contextlib.contextmanager
def _backend(name: str):
    saved = os.environ.get("FLASHATTN_BACKEND")
    os.environ["FLASHATTN_BACKEND"] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FLASHATTN_BACKEND", None)
        else:
            os.environ["FLASHATTN_BACKEND"] = saved


def _rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm()).item()


def _forward(method: str, q, k, v, causal: bool, seed: int, setup: Setup):
    from flashattn import flash_attn_func, fp8

    if method == "bf16":
        with _backend(setup.bf16_backend):
            return flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=causal)
    granularity = "tensor" if method == "fp8 tensor" else "head"
    x = fp8.quantize_qkv(q, k, v, granularity, rotate=method.endswith("rot"), seed=seed)
    with _backend(setup.fp8_backend):
        return flash_attn_func(x.q, x.k, x.v, causal=causal, out_dtype=setup.fp8_out_dtype, **x.descales())


def forward_errors(q, k, v, causal: bool, setup: Setup, seed: int = 0) -> Dict[str, float]:
    """{method: relative RMS error} of one input set; ref in float64 on the same device."""
    from flashattn import attention_ref

    qd, kd, vd = (x.to(setup.device) for x in (q, k, v))
    ref = attention_ref(qd.double(), kd.double(), vd.double(), causal=causal)[0]
    return {m: _rel_rms(_forward(m, qd, kd, vd, causal, seed, setup), ref) for m in METHODS}


def backward_errors(q, k, v, causal: bool, setup: Setup, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Relative RMS errors of dq, dk, dv: bf16 and fp8 (head, with and without rotation) against float64
    autograd, and fp8 against bf16. The loss is <out, w> with w ~ N(0, 1) rounded to bf16."""
    from flashattn import attention_ref, flash_attn_func, fp8

    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(q.shape, generator=g).bfloat16()
    leaves = [x.to(device=setup.device, dtype=torch.float64).requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(attention_ref(*leaves, causal=causal)[0], leaves, w.to(setup.device).double())

    def grads(fn, backend):
        xs = [x.to(device=setup.device, dtype=torch.bfloat16).requires_grad_() for x in (q, k, v)]
        with _backend(backend):
            out = fn(*xs)
            return torch.autograd.grad(out, xs, w.to(device=setup.device, dtype=out.dtype))

    out_dtype = setup.fp8_out_dtype
    got = {"bf16": grads(lambda *x: flash_attn_func(*x, causal=causal), setup.bf16_backend),
           "fp8 head": grads(lambda *x: fp8.attention(*x, causal=causal, out_dtype=out_dtype), setup.fp8_backend),
           "fp8 head + rot": grads(lambda *x: fp8.attention(*x, causal=causal, rotate=True, seed=seed,
                                                            out_dtype=out_dtype), setup.fp8_backend)}
    res = {name: {f"d{n}": _rel_rms(a, r) for n, a, r in zip("qkv", gs, ref)} for name, gs in got.items()}
    res["fp8 head vs bf16"] = {f"d{n}": _rel_rms(a, r) for n, a, r in zip("qkv", got["fp8 head"], got["bf16"])}
    return res


KV_CACHES = ("bf16", "fp8 tensor", "fp8 head")


def kvcache_errors(q, k, v, setup: Setup) -> Dict[str, float]:
    """{cache: relative RMS error vs float64} of one decoding step of q[:, -1:] over k, v (b, s, h, d),
    keys 0 … s − 2 prefilled into the cache (bf16, or float8_e4m3fn with descales from fp8.quantize of
    them), key s − 1 appended by flash_attn_with_kvcache (quantized into an FP8 cache)."""
    from flashattn import attention_ref, flash_attn_with_kvcache, fp8

    b, s, h, d = k.shape
    q, k, v = (x.to(setup.device) for x in (q[:, -1:], k, v))
    ref = attention_ref(q.double(), k.double(), v.double())[0]
    errors = {}
    for cache in KV_CACHES:
        if cache == "bf16":
            dtype, backend, descales = torch.bfloat16, setup.bf16_backend, {}
            prefill = (k[:, :-1].to(dtype), v[:, :-1].to(dtype))
        else:
            dtype, backend = setup.fp8_out_dtype, setup.fp8_backend   # q's dtype: bf16 (fp16 under the interpreter)
            (k8, kd), (v8, vd) = (fp8.quantize(x[:, :-1], cache.split()[1]) for x in (k, v))
            prefill, descales = (k8, v8), {"k_descale": kd, "v_descale": vd}
        k_cache, v_cache = (torch.zeros(b, s, h, d, dtype=x.dtype, device=setup.device) for x in prefill)
        k_cache[:, :-1], v_cache[:, :-1] = prefill
        with _backend(backend):
            out = flash_attn_with_kvcache(q.to(dtype), k_cache, v_cache, k[:, -1:].to(dtype), v[:, -1:].to(dtype),
                                          cache_seqlens=s - 1, causal=True, **descales)
        errors[cache] = _rel_rms(out, ref)
    return errors


def _table(title: str, rows: Dict[str, Dict[str, float]], cols: Sequence[str]) -> List[str]:
    width = max(len(r) for r in rows) + 2
    lines = [title, "".ljust(width) + "".join(c.rjust(18) for c in cols)]
    for name, vals in rows.items():
        lines.append(name.ljust(width) + "".join(f"{vals[c]:18.2e}" if c in vals else "-".rjust(18) for c in cols))
    return lines


def run_one(label: str, setup: Setup, shape, causal: bool, args) -> dict:
    """Forward errors for every kind of data (and backward errors on normal data) with one setup."""
    b, s, h, d = shape
    fwd = {}
    for kind in DATA:
        q, k, v = make_data(kind, b, s, h, d, args.seed, args.outlier_channels, args.outlier_scale)
        fwd[kind] = forward_errors(q, k, v, causal, setup, args.seed)
    rows = {m: {kind: fwd[kind][m] for kind in DATA} for m in METHODS}
    for m in METHODS[1:]:   # how many times bf16's error
        rows[f"  {m} / bf16"] = {kind: fwd[kind][m] / fwd[kind]["bf16"] for kind in DATA}
    print()
    print("\n".join(_table(f"{label}: forward, relative RMS error vs float64 (batch {b}, seqlen {s}, heads {h}, "
                           f"hdim {d}, {'causal' if causal else 'not causal'})", rows, DATA)))
    bwd = None
    if not args.no_backward:
        q, k, v = make_data("normal", b, s, h, d, args.seed)
        bwd = backward_errors(q, k, v, causal, setup, args.seed)
        print("\n".join(_table(f"{label}: backward on normal data, relative RMS error vs float64 autograd "
                               "(last row: fp8 against bf16)", bwd, ("dq", "dk", "dv"))))
    kv = None
    if not args.no_kvcache:
        q, k, v = make_data("normal", args.kv_batch, s, h, d, args.seed)
        kv = kvcache_errors(q, k, v, setup)
        rows = {"error": kv, "/ bf16 cache": {c: kv[c] / kv["bf16"] for c in KV_CACHES}}
        print("\n".join(_table(f"{label}: decoding over a KV cache (normal data, {args.kv_batch} sequences of {s} "
                               "keys; only the cache in FP8, P unquantized), relative RMS error vs float64", rows, KV_CACHES)))
    return {"label": label, "setup": {**setup._asdict(), "fp8_out_dtype": str(setup.fp8_out_dtype)},
            "shape": list(shape), "causal": causal, "forward": fwd, "backward": bwd, "kvcache": kv}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fp8_accuracy", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="CPU: torch (full size), triton (the kernels under the interpreter, small size) or auto "
                        "(both); GPU: the Triton kernels")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=None, help="default 4096 on a GPU, 1024 on the CPU")
    p.add_argument("--heads", type=int, default=None, help="default 16 on a GPU, 4 on the CPU")
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--interp-seqlen", type=int, default=256, help="seqlen of the interpreter run (CPU, triton)")
    p.add_argument("--interp-heads", type=int, default=2)
    p.add_argument("--outlier-channels", type=int, default=4)
    p.add_argument("--outlier-scale", type=float, default=20.0)
    p.add_argument("--no-backward", action="store_true", help="skip the backward section")
    p.add_argument("--no-kvcache", action="store_true", help="skip the KV-cache decoding section")
    p.add_argument("--kv-batch", type=int, default=8, help="sequences of the KV-cache decoding section")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the numbers as JSON")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    shape = (args.batch, args.seqlen or (4096 if gpu else 1024), args.heads or (16 if gpu else 4), args.hdim)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if gpu else "cpu"}
    print(f"flashattn FP8 accuracy report ({env['device']}, torch {env['torch']})")
    runs = []
    if gpu:
        runs.append(run_one("GPU, Triton kernels", Setup(device, "triton", "triton"), shape, args.causal, args))
    else:
        if args.backend in ("auto", "torch"):
            runs.append(run_one("CPU, PyTorch path (input quantization only)", Setup(device, "torch", "torch"), shape,
                                args.causal, args))
        if args.backend in ("auto", "triton"):
            if os.environ.get("TRITON_INTERPRET") != "1":
                print("\n(the Triton kernels on the CPU need TRITON_INTERPRET=1 in the environment: skipped)")
            else:
                # the interpreter's bf16 dot is wrong (triton 3.6): FP8 output and gradients in fp16 there
                small = (1, args.interp_seqlen, args.interp_heads, args.hdim)
                runs.append(run_one("CPU, Triton kernels under the interpreter (P quantized too; FP8 out and "
                                    "gradients fp16; bf16 row: PyTorch path)",
                                    Setup(device, "torch", "triton", torch.float16), small, args.causal, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
