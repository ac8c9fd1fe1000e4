"""No leaks: repeated forward+backward calls keep memory flat.

CPU (every run): 2,000 small calls on the PyTorch path (dense, packed varlen with backward, KV-cache
decode), after a warm-up. Measured between the first and the second 1,000 calls, so that one-time
caches (lru caches, allocator pools) are excluded:
- the number of live Python objects the garbage collector tracks (tensors included) does not grow
  (a per-call leak of one object would add 1,000);
- with the collector switched off during the loop, no tensor ends up in an unreachable reference cycle
  (memory held until a collection, never freed by reference counting);
- the process's resident memory grows by less than 16 MiB (each call's tensors are 64 KiB or more: one
  leaked per call would be 64 MiB or more).
GPU (`-m "gpu and slow"`): 10,000 calls of each kind keep torch.cuda.memory_allocated exactly flat.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

ON_GPU = torch.cuda.is_available()


def _calls(device, dtype):
    """One callable per call kind; each allocates and frees its inputs, outputs and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 128, 2, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0, 50, 128], dtype=torch.int32, device=device)
    k_cache, v_cache = (torch.randn(2, 128, 2, 64, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    k_new, v_new = (torch.randn(2, 1, 2, 64, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    lens = torch.tensor([10, 100], dtype=torch.int32, device=device)

    def dense():
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        flash_attn_func(qq, kk, vv, causal=True).backward(torch.ones_like(qq))

    def varlen():
        qq, kk, vv = (x[0].clone().requires_grad_() for x in (q, k, v))
        out, lse, _ = flash_attn_varlen_func(qq, kk, vv, cu, cu, 78, 78, window_size=(16, 0), return_attn_probs=True)
        out.backward(torch.ones_like(out))

    def kvcache():
        flash_attn_with_kvcache(q[0, :2, None], k_cache, v_cache, k_new, v_new, cache_seqlens=lens, causal=True)

    return [dense, varlen, kvcache]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc (Linux)")
def test_cpu_calls_keep_memory_flat(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)
    calls = _calls("cpu", torch.float32)

    def run(n):
        for i in range(n):
            calls[i % len(calls)]()

    run(300)   # warm-up: caches and allocator pools fill here
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)   # what a collection finds unreachable stays inspectable in gc.garbage
    try:
        run(999)
        objects_1, rss_1 = len(gc.get_objects()), _rss()
        run(999)
        objects_2, rss_2 = len(gc.get_objects()), _rss()
        gc.collect()
        cyclic_tensors = sum(isinstance(o, torch.Tensor) for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
    assert objects_2 - objects_1 < 100, f"live objects grew by {objects_2 - objects_1} over 999 calls"
    assert cyclic_tensors == 0, f"{cyclic_tensors} tensors were held by reference cycles"
    assert rss_2 - rss_1 < 16 * 2**20, f"resident memory grew by {(rss_2 - rss_1) / 2**20:.1f} MiB over 999 calls"


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_10k_calls_keep_memory_flat(backend, monkeypatch):
    """10,000 calls of each kind (Triton kernels in bf16; the PyTorch path on CUDA in fp32): the bytes
    allocated by torch's CUDA allocator are the same before and after, to the byte."""
    monkeypatch.setenv("FLASHATTN_BACKEND", backend)
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    calls = _calls("cuda", torch.bfloat16 if backend == "triton" else torch.float32)
    for call in calls:   # warm-up: compile, allocate the allocator's pools
        for _ in range(10):
            call()
    torch.cuda.synchronize()
    gc.collect()
    before = torch.cuda.memory_allocated()
    for i in range(10_000 * len(calls)):
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    gc.collect()
    after = torch.cuda.memory_allocated()
    assert after == before, f"torch.cuda.memory_allocated grew by {after - before} bytes over 10,000 calls of each kind"
