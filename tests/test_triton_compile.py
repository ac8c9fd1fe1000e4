"""The Triton kernels compile for Hopper (sm_90) with wgmma, checked on any machine, GPU or not.

Runs benchmarks/compile_check.py in a subprocess without TRITON_INTERPRET (this test session runs the
kernels under the interpreter, where they are Python functions and are never compiled).
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_with_wgmma(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")   # compile for real, not from a cache
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--quick"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK ") == 3 and "wgmma: True" in res.stdout, res.stdout


def test_warp_specialized_loops_are_specialized(tmp_path):
    """Triton's warp specializer declines a loop silently (the kernel then runs unspecialized, and slower): every
    WS variant the launcher runs must come out specialized."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), "--ws"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("OK ") == 7 and "0 failed" in res.stdout, res.stdout
