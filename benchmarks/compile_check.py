"""Compile the Triton kernels for Hopper (sm_90) on any machine, GPU or not, and read the result.

`triton.compile` with an explicit target runs the whole code generator (TTIR → TTGIR → LLVM → PTX →
cubin through Triton's bundled ptxas) without a device. This checks that every kernel variant
compiles, that the matrix products use Hopper's wgmma, and (with --hist) writes a histogram of the
PTX instructions, so that two versions of the kernels can be compared for codegen equivalence
before any GPU time is spent.

FP8 variants (float8 e4m3 q, k, v; bf16 out and gradients) compile with the FP8 configurations at
head dims 64, 128, 256; their forward must use wgmma with e4m3 operands for both products (no other
wgmma, no mma.sync fallback) and load K and V tiles with cp.async, not byte by byte. They compile
with the 16-byte divisibility hints a real launch carries (pointers, tensor strides, seqlens: Triton
adds them for arguments divisible by 16), without which no load can be vectorized; the other
variants compile without hints, as the recorded histograms were made. The wgmma forms are listed.

--ws compiles the warp-specialized variants (hdim 128, the WS configs' 4 warps and 2 stages) and checks that
Triton's warp specializer took each loop (`ttg.warp_specialize` in the TTGIR): it declines silently, e.g. when
a product stands beside the loop (tried for the causal forward's diagonal: benchmarks/NOTES.md), and the kernel
then runs unspecialized.

    python benchmarks/compile_check.py [--quick | --fp8 | --ws] [--hist FILE.json] [--regs] [--aligned]
--regs runs Triton's bundled ptxas -v on each PTX and prints registers per thread and spilled bytes;
--aligned gives every variant the alignment hints (closer to a real launch: without them loads are
scalar and registers fuller; histograms compare only within one mode).
Run it without TRITON_INTERPRET (the interpreter replaces the kernels by Python functions).
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check: unset TRITON_INTERPRET (it turns the kernels into interpreted functions)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashattn.backends.triton import kernels as K  # noqa: E402

_POINTERS = {"Lse": "*fp32", "Delta": "*fp32", "Alibi": "*fp32", "CuQ": "*i32", "CuK": "*i32", "Glob": "*i8",
             "SpCnt": "*i32", "SpIdx": "*i32", "SpPid": "*i32", "SpTile": "*i8", "Descale": "*fp32"}
_FLOATS = {"sm_scale", "softcap", "keep_scale"}
_INT64 = {"seed", "drop_threshold"}
BASE = dict(GROUP=2, HEAD_DIM=128, BLOCK_D=128, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, HAS_ALIBI=False,
            VARLEN=False, HAS_SINK=False, DROPOUT=False, HAS_GLOBAL=False, BLOCK_SPARSE=False, FP8=False, ROUND_P=False,
            BLOCK_M=128, BLOCK_N=64, SUB_M=1, TMA=False, WS=False, LPT=False)
VARIANTS = [{}, dict(HAS_LEFT=True, HAS_SINK=True), dict(DROPOUT=True), dict(HAS_GLOBAL=True, HAS_LEFT=True),
            dict(VARLEN=True, SOFTCAP=True, HAS_ALIBI=True), dict(BLOCK_SPARSE=1, HAS_RIGHT=False), dict(BLOCK_SPARSE=2, HAS_RIGHT=False)]
KERNELS = {"fwd": (K._attn_fwd, 8), "dkdv": (K._attn_bwd_dkdv, 4), "dq": (K._attn_bwd_dq, 4)}
# (kernel, flags): the FP8 forward with its default tiles (backends/triton: _default("fwd_fp8")), causal
# and not, at head dims 64, 128, 256; the FP8 backward (upcasting) at 128. "warps"/"stages" override.
_FP8_128 = dict(FP8=True, BLOCK_M=128, BLOCK_N=128, warps=8, stages=3)
FP8_VARIANTS = [("fwd", _FP8_128), ("fwd", dict(_FP8_128, HAS_RIGHT=False)),
                ("fwd", dict(_FP8_128, HEAD_DIM=64, BLOCK_D=64)),
                ("fwd", dict(FP8=True, HEAD_DIM=256, BLOCK_D=256, BLOCK_M=64, BLOCK_N=64, warps=8, stages=3)),
                ("dkdv", dict(FP8=True)), ("dq", dict(FP8=True))]


# (kernel, flags): the warp-specialized loops as the launcher runs them (WS configs: 4 warps per warpgroup, 2 stages;
# GROUP 1 for dK/dV)
_WS = dict(TMA=True, WS=True, GROUP=1, warps=4, stages=2)
WS_VARIANTS = [("fwd", dict(_WS, HAS_RIGHT=False, BLOCK_N=128)), ("fwd", dict(_WS, BLOCK_N=128)), ("fwd", dict(_WS)),
               ("dkdv", dict(_WS, HAS_RIGHT=False, BLOCK_M=64, BLOCK_N=128)), ("dkdv", dict(_WS, BLOCK_M=32, BLOCK_N=128)),
               ("dq", dict(_WS, HAS_RIGHT=False)), ("dq", dict(_WS))]


def signature(fn, flags):
    """Argument types of a bf16 launch (float8 e4m3 q, k, v with FP8=True): pointers by name, floats and
    64-bit ints by name, i32 otherwise. The FP8 forward's v has its key axis contiguous: stride_vn is 1,
    which Triton specializes as a constant at launch, as here."""
    sig, consts = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", flags[p.name]
        elif flags["FP8"] and p.name in ("Q", "K", "V"):
            sig[p.name] = "*fp8e4nv"
        elif flags["FP8"] and p.name == "stride_vn" and "ROUND_P" in flags and fn is K._attn_fwd:
            sig[p.name], consts[p.name] = "constexpr", 1
        elif p.name[0].isupper():
            sig[p.name] = _POINTERS.get(p.name, "*bf16")
        else:
            sig[p.name] = "fp32" if p.name in _FLOATS else ("i64" if p.name in _INT64 else "i32")
    return sig, consts


def alignment_hints(fn, sig) -> dict:
    """tt.divisibility = 16 on pointers, the q/k/v/out/gradient strides and the seqlens, as Triton's launcher
    specializes arguments that are multiples of 16."""
    hinted = re.compile(r"stride_(q|k|v|o|do|dq|dk|dv)[bmnhd]$|seqlen_[qk]$")
    return {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params)
            if sig[p.name] != "constexpr" and (sig[p.name].startswith("*") or hinted.match(p.name))}


def compile_one(name, variant, aligned=False):
    fn, warps = KERNELS[name]
    flags = dict(BASE, **variant)
    if name == "dkdv" and not {"BLOCK_M", "BLOCK_N"} & set(variant):
        flags.update(BLOCK_M=32, BLOCK_N=64)
    warps, stages = flags.pop("warps", warps), flags.pop("stages", 3)
    sig, consts = signature(fn, flags)
    attrs = alignment_hints(fn, sig) if flags["FP8"] or aligned else None
    if name == "dkdv":
        flags.pop("LPT")
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def registers(ptx: str) -> str:
    """'N registers, S B spilled' from Triton's bundled ptxas -v for sm_90a."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull], capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr)
    return f"{regs.group(1) if regs else '?'} registers, {spill.group(1) if spill else '?'} B spilled"


def wgmma_forms(ptx: str) -> dict:
    """{'m64n128k32.f32.e4m3.e4m3': count, ...}: the wgmma instructions of a PTX listing by shape and types."""
    return dict(collections.Counter(m.group(1) for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(\S+)", ptx)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the default variant of each kernel only")
    ap.add_argument("--fp8", action="store_true", help="the FP8 variants only")
    ap.add_argument("--ws", action="store_true", help="the warp-specialized variants only (checks the specializer took them)")
    ap.add_argument("--hist", help="write PTX instruction counts (default variants) to this JSON file")
    ap.add_argument("--regs", action="store_true", help="registers and spills of each kernel (ptxas -v)")
    ap.add_argument("--aligned", action="store_true", help="alignment hints for every variant, not only FP8")
    args = ap.parse_args(argv)
    hist, failures = {}, 0
    if args.fp8:
        todo = FP8_VARIANTS
    elif args.ws:
        todo = WS_VARIANTS
    else:
        todo = [(name, v) for name in KERNELS for v in (VARIANTS[:1] if args.quick else VARIANTS)]
        todo += [] if args.quick else FP8_VARIANTS
    for name, variant in todo:
        t = time.time()
        try:
            k = compile_one(name, variant, args.aligned)
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL {name:5s} {variant}: {type(e).__name__}: {str(e)[:300]}")
            continue
        ptx = k.asm["ptx"]
        forms = wgmma_forms(ptx)
        regs = f"  {registers(ptx)}" if args.regs else ""
        print(f"OK   {name:5s} {variant}  {time.time() - t:.1f}s  wgmma: {'wgmma' in ptx}  "
              f"shared memory: {k.metadata.shared} B  {forms}{regs}")
        if "wgmma" not in ptx:
            failures += 1
        if variant.get("WS") and "ttg.warp_specialize" not in k.asm["ttgir"]:
            failures += 1
            print("FAIL Triton's warp specializer declined this loop (no ttg.warp_specialize in the TTGIR)")
        if variant.get("FP8") and name == "fwd" and (any(not f.endswith("e4m3.e4m3") for f in forms)
                                                       or "mma.sync" in ptx):
            failures += 1
            print("FAIL the FP8 forward must run both products as e4m3 wgmma")
        if variant.get("FP8") and name == "fwd" and ("ld.global.b8" in ptx or "cp.async" not in ptx):
            failures += 1
            print("FAIL the FP8 forward must load its K and V tiles as vectors with cp.async")
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
