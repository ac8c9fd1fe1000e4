"""Compile the Triton kernels for Hopper (sm_90) on any machine, GPU or not, and read the result.

`triton.compile` with an explicit target runs the whole code generator (TTIR → TTGIR → LLVM → PTX →
cubin through Triton's bundled ptxas) without a device. This checks that every kernel variant
compiles, that the matrix products use Hopper's wgmma, and (with --hist) writes a histogram of the
PTX instructions, so that two versions of the kernels can be compared for codegen equivalence
before any GPU time is spent.

    python benchmarks/compile_check.py [--quick] [--hist FILE.json]
Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""
import argparse
import collections
import json
import os
import re
import sys
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (it turns the kernels into interpreted functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashattn.backends.triton import kernels as K  # noqa: E402

_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "Alibi": "*fp32", "CuQ": "*i32", "CuK": "*i32", "Glob": "*i8",
             "SpCnt": "*i32", "SpIdx": "*i32", "SpPid": "*i32", "SpTile": "*i8"}
_FLOATS = {"sm_scale", "softcap", "keep_scale"}
_INT64 = {"seed", "drop_threshold"}
BASE = dict(GROUP=2, HEAD_DIM=128, BLOCK_D=128, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, HAS_ALIBI=False,
            VARLEN=False, HAS_SINK=False, DROPOUT=False, HAS_GLOBAL=False, BLOCK_SPARSE=False, BLOCK_M=128, BLOCK_N=64)
VARIANTS = [{}, dict(HAS_LEFT=True, HAS_SINK=True), dict(DROPOUT=True), dict(HAS_GLOBAL=True, HAS_LEFT=True),
            dict(VARLEN=True, SOFTCAP=True, HAS_ALIBI=True), dict(BLOCK_SPARSE=True, HAS_RIGHT=False)]
KERNELS = {"fwd": (K._attn_fwd, 8), "dkdv": (K._attn_bwd_dkdv, 4), "dq": (K._attn_bwd_dq, 4)}


def signature(fn, flags):
    """Argument types of a bf16 launch: pointers by name, floats and 64-bit ints by name, i32 otherwise."""
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", flags[p.name]
        elif p.name[0].isupper():
            sig[p.name] = _POINTERS.get(p.name, "*bf16")
        else:
            sig[p.name] = "fp32" if p.name in _FLOATS else ("i64" if p.name in _INT64 else "i32")
    return sig, consts


def compile_one(name, variant):
    fn, warps = KERNELS[name]
    flags = dict(BASE, **variant)
    if name == "dkdv":
        flags.update(BLOCK_M=32, BLOCK_N=64)
    sig, consts = signature(fn, flags)
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 3})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the default variant of each kernel only")
    ap.add_argument("--hist", help="write PTX instruction counts (default variants) to this JSON file")
    args = ap.parse_args(argv)
    hist, failures = {}, 0
    for name in KERNELS:
        for variant in VARIANTS[:1] if args.quick else VARIANTS:
            t = time.time()
            try:
                k = compile_one(name, variant)
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL {name:5s} {variant}: {type(e).__name__}: {str(e)[:300]}")
                continue
            ptx = k.asm["ptx"]
            print(f"OK   {name:5s} {variant}  {time.time() - t:.1f}s  wgmma: {'wgmma' in ptx}  "
                  f"shared memory: {k.metadata.shared} B")
            if "wgmma" not in ptx:
                failures += 1
            if not variant:
                ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+([a-z][\w.]*)", ptx, re.M))
                hist[name] = {op: n for op, n in sorted(ops.items()) if not op.startswith("ld.param")}
    if args.hist:
        with open(args.hist, "w") as f:
            json.dump(hist, f, indent=1)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
