"""The `flashattn` command: demo | explain | bench | info.

    flashattn demo [--quick] [--device auto] ...   flashattn vs naive attention: error, memory, time
    flashattn explain                              the online softmax, step by step, on small examples
    flashattn bench ...                            benchmarks (options: flashattn bench --help)
    flashattn info                                 versions, devices, which backend would run
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


def info() -> int:
    """Print versions, devices and the backend choice; 0."""
    import torch

    import flashattn
    from flashattn.bench.environment import cpu_name
    from flashattn.api import choose_backend, triton_available

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
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"))
        rows.append(("CUDA usable", f"yes (CUDA {torch.version.cuda})"))
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
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    rows.append(("autotuning", f"{tuning}; results cached by Triton under {cache}"))
    probes = [("CPU float32", torch.empty(1, 1, 1, 8))]
    if cuda:
        probes.append(("CUDA bfloat16", torch.empty(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)))
    for name, x in probes:
        try:
            backend = choose_backend(x)
        except ValueError as e:   # e.g. FLASHATTN_BACKEND names a backend this tensor cannot use
            backend = f"error: {e}"
        rows.append((f"backend, {name}", backend))
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
