"""pytest configuration shared by every test file.

- Puts this directory on sys.path so that test files (and the Triton-kernel tests) can write
  ``from helpers import make_qkv, check_close, run_and_compare`` whatever pytest's import mode.
- One intra-op thread (FLASHATTN_TEST_THREADS to change it): the tests run thousands of tiny ops,
  where a second OpenMP thread gains nothing and, on a busy 2-core CI machine (another job, or
  pytest-xdist), makes every op wait for a scheduler slice: measured 12 ms instead of 10 us per matmul.
- Hypothesis profiles: 'ci' (the default: a modest number of examples drawn the same way on every run,
  no deadline since the first call of an attention path is slow) and 'slow' (many more, fresh draws). Pick one with HYPOTHESIS_PROFILE=slow.
"""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# Without a GPU the Triton kernels run under Triton's interpreter. It must be switched on before
# anything imports the kernels (a kernel decorated outside interpreter mode stays compiled-only).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(int(os.environ.get("FLASHATTN_TEST_THREADS", "1")))

# 'ci' draws the same examples on every run (derandomize): a CI result then depends on the code alone.
settings.register_profile("ci", max_examples=100, deadline=None, print_blob=True, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend(name): route flashattn's calls to backend `name` ('torch', 'triton', 'reference') for
    this test, with autotuning off (the interpreter and small GPU tests use the default tiles)."""
    def use(name):
        monkeypatch.setenv("FLASHATTN_BACKEND", name)
        monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    return use
