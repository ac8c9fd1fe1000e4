"""Where a benchmark ran: device, library versions, date, exact command line, source revision."""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed (sys.argv) when it ends with `argv`; else `flashattn bench <argv>`."""
    args = list(sys.argv)
    if argv is not None:
        argv = list(argv)
        tail = args[len(args) - len(argv):] if 0 < len(argv) <= len(args) else ([] if args else None)
        if tail != argv:
            args = ["flashattn", "bench", *argv]
    return " ".join(shlex.quote(a) for a in args)


def _cudnn_version() -> Optional[str]:
    import torch
    try:
        v = torch.backends.cudnn.version()
    except Exception:
        return None
    if not v:
        return None
    # cuDNN >= 9 encodes major*10000 + minor*100 + patch, cuDNN 8 major*1000 + minor*100 + patch.
    if v >= 90000:
        return f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    return f"{v // 1000}.{v // 100 % 10}.{v % 100}"


def _git_revision() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        return None


def cpu_name() -> str:
    """The CPU model, for headers and `flashattn info`."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def triton_cache_dir() -> str:
    """Where Triton caches compiled kernels and (with cache_results=True) autotuning results, found the
    way Triton finds it: triton.knobs.cache.dir (Triton >= 3.4: TRITON_CACHE_DIR, else
    $TRITON_HOME/.triton/cache, TRITON_HOME defaulting to ~), triton.runtime.cache.default_cache_dir()
    on older Triton, the same rule by hand without Triton."""
    try:
        from triton import knobs
        return str(knobs.cache.dir)
    except Exception:
        pass
    try:
        from triton.runtime import cache
        if os.environ.get("TRITON_CACHE_DIR"):
            return os.environ["TRITON_CACHE_DIR"]
        return str(cache.default_cache_dir())
    except Exception:
        pass
    if os.environ.get("TRITON_CACHE_DIR"):
        return os.environ["TRITON_CACHE_DIR"]
    return os.path.join(os.environ.get("TRITON_HOME") or os.path.expanduser("~"), ".triton", "cache")


def describe(device: str, argv: Optional[Sequence[str]] = None) -> dict:
    import torch

    import flashattn

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "flashattn": getattr(flashattn, "__version__", None),
        "git": _git_revision(),
        # settings that change what is measured
        "env_vars": {k: os.environ[k] for k in ("FLASHATTN_BACKEND", "FLASHATTN_AUTOTUNE", "TRITON_INTERPRET",
                                                 "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS") if k in os.environ},
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    env["triton_cache_dir"] = triton_cache_dir()
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update({
            "gpu": torch.cuda.get_device_name(0),
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "sm_count": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(),
        })
    else:
        env.update({"cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()})
    return env


def flashattn_backend(device: str, dtype) -> tuple:
    """(backend name flashattn dispatches to for these inputs, a warning when it is not the expected one)."""
    import torch

    from flashattn import api, ops
    q = torch.zeros(1, 1, 1, 64, device=device, dtype=dtype)
    try:
        name = api.choose_backend(q)
    except Exception as e:   # e.g. FLASHATTN_BACKEND set to something that does not apply
        return None, f"choose_backend failed: {type(e).__name__}: {e}"
    warning = None
    if device == "cuda" and name != "triton":
        why = ""
        try:
            ops.backend_module("triton")
        except Exception as e:
            why = f" (importing flashattn.backends.triton failed: {type(e).__name__}: {str(e).splitlines()[0]})"
        warning = (f"flashattn dispatches these CUDA {str(dtype).replace('torch.', '')} inputs to the '{name}' "
                   f"backend, not the Triton kernels{why}; its numbers are not the kernels' numbers")
    return name, warning
