"""The `flashattn` command: demo | explain | bench | info.

    flashattn demo [--quick] [--device auto] ...   flashattn vs naive attention: error, memory, time
    flashattn explain                              the online softmax, step by step, on small examples
    flashattn bench ...                            benchmarks (options: flashattn bench --help)
    flashattn info                                 versions, devices, what each kind of call runs, autotune cache
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from importlib import metadata
from typing import Optional, Sequence


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


class _Probe:
    """What `choose_backend` reads of q (device, dtype), for a device this machine may not have: the
    answer then comes from the one dispatch point itself, not from a copy of its rule."""

    def __init__(self, device: str, dtype):
        import torch
        self.device = torch.device(device)
        self.dtype = dtype
        self.is_cuda = self.device.type == "cuda"


# backend name -> (dense and varlen calls, kvcache decoding) as the user would meet them
_WHAT_RUNS = {
    "triton": ("Triton kernels: _attn_fwd; backward _attn_bwd_preprocess, _attn_bwd_dkdv, _attn_bwd_dq "
               "(autotuned){varlen}",
               "Triton kernels: _append_kv, _attn_fwd_kvcache (split-KV, GQA rows packed), _combine"),
    "torch": ("PyTorch tiled path (backends/torch_tiled.py, the same online softmax){varlen}",
              "gather the cache into a packed batch, then the varlen forward on the PyTorch tiled path"),
    "reference": ("reference: float64 naive attention (backends/naive.py){varlen}",
                  "gather the cache into a packed batch, then the float64 reference"),
}


def _varlen_note(backend: str) -> str:
    """How a backend takes a packed batch (ops.py: VARLEN_NATIVE, else sequence by sequence)."""
    from flashattn import ops
    try:
        native = getattr(ops.backend_module(backend), "VARLEN_NATIVE", False)
    except Exception:
        return ""
    return ", the packed batch in one launch" if native else ", one sequence at a time"


def call_backends(cuda_visible: bool) -> list:
    """(kind of call, what runs) rows, each decided by flashattn.choose_backend."""
    import torch

    from flashattn.api import choose_backend

    kinds = [("dense fp16/bf16, CUDA", "cuda", torch.bfloat16, 0),
             ("dense fp32/fp64, CUDA", "cuda", torch.float32, 0),
             ("dense, CPU (any dtype)", "cpu", torch.float32, 0),
             ("varlen (cu_seqlens), CUDA fp16/bf16", "cuda", torch.bfloat16, 0),
             ("varlen (cu_seqlens), CPU", "cpu", torch.float32, 0),
             ("kvcache decode, CUDA fp16/bf16", "cuda", torch.bfloat16, 1),
             ("kvcache decode, CPU", "cpu", torch.float32, 1)]
    rows = []
    for label, device, dtype, which in kinds:
        try:
            name = choose_backend(_Probe(device, dtype))
        except ValueError as e:   # e.g. FLASHATTN_BACKEND names a backend these tensors cannot use
            rows.append((label, f"error: {e}"))
            continue
        what = _WHAT_RUNS.get(name, (name + "{varlen}", name))[which]
        what = what.replace("{varlen}", _varlen_note(name) if label.startswith("varlen") else "")
        if name == "triton" and dtype not in (torch.float16, torch.bfloat16):
            what += " -- which raise TypeError: the kernels take fp16/bf16 only"
        if device == "cuda" and not cuda_visible:
            what += " (if a GPU were visible; none is)"
        rows.append((label, f"{name} -> {what}"))
    return rows


def info() -> int:
    """Print versions, devices, what each kind of call runs, the autotune cache; 0."""
    import torch

    import flashattn
    from flashattn.api import triton_available
    from flashattn.bench.environment import _cudnn_version, cpu_name, triton_cache_dir

    cuda = torch.cuda.is_available()
    rows = [
        ("flashattn", flashattn.__version__),
        ("torch", torch.__version__),
        ("triton", _version("triton")),
        ("numpy", _version("numpy")),
        ("python", platform.python_version()),
        ("cpu", f"{cpu_name()}, {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"),
    ]
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
                                      f"{p.multi_processor_count} SMs"))
        rows.append(("CUDA usable", f"yes (CUDA {torch.version.cuda}, cuDNN {_cudnn_version()})"))
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        rows.append(("CUDA usable", f"no ({why})"))
    if not triton_available():
        rows.append(("Triton usable", "no (not importable)"))
    elif cuda:
        rows.append(("Triton usable", "yes"))
    elif os.environ.get("TRITON_INTERPRET") == "1":
        rows.append(("Triton usable", "interpreter only (TRITON_INTERPRET=1, CPU)"))
    else:
        rows.append(("Triton usable", "importable, but needs a CUDA GPU (or TRITON_INTERPRET=1 to interpret on CPU)"))
    rows.append(("FLASHATTN_BACKEND", os.environ.get("FLASHATTN_BACKEND") or "unset (flashattn chooses)"))
    tuning = "off (FLASHATTN_AUTOTUNE=0: one config per kernel)" if os.environ.get("FLASHATTN_AUTOTUNE") == "0" else "on"
    cache = triton_cache_dir()
    try:
        state = f"{len(os.listdir(cache))} entries" if os.path.isdir(cache) else "not created yet"
    except OSError as e:
        state = f"unreadable: {e.strerror}"
    rows.append(("autotuning", tuning))
    rows.append(("autotune cache", f"{cache} ({state}; Triton's cache: compiled kernels and tuning results; "
                                   "TRITON_CACHE_DIR moves it)"))
    for label, what in call_backends(cuda):
        rows.append((f"call: {label}", what))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def bench(argv: Sequence[str]) -> int:
    """Forward argv to flashattn.bench.main, imported only now (the CLI works without it)."""
    try:
        from flashattn import bench as bench_module
    except ModuleNotFoundError as e:
        if e.name != "flashattn.bench":   # a missing dependency *inside* bench is a real error
            raise
        print("flashattn bench: the benchmark module flashattn.bench is not available in this install",
              file=sys.stderr)
        return 2
    return bench_module.main(list(argv))


def build_parser() -> argparse.ArgumentParser:
    from flashattn import demo

    parser = argparse.ArgumentParser(prog="flashattn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p_demo = sub.add_parser("demo", help="flashattn vs naive attention: error, memory, time",
                            description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p_demo)
    sub.add_parser("explain", help="the online softmax, step by step, on the seeds' worked examples")
    sub.add_parser("bench", help="benchmarks; everything after `bench` goes to flashattn.bench", add_help=False)
    sub.add_parser("info", help="versions, devices, which backend would run")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # bench's options belong to flashattn.bench; argparse would reject the ones it does not know
    if argv[:1] == ["bench"]:
        return bench(argv[1:])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # argparse exits on --help (0) and on bad usage (2): report it as the return code
        return e.code if isinstance(e.code, int) else 2
    if args.command == "demo":
        from flashattn import demo
        return demo.run(args)
    if args.command == "explain":
        from flashattn import explain
        return explain.run()
    return info()


if __name__ == "__main__":
    sys.exit(main())
