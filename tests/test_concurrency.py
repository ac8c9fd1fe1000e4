"""Calls from several threads at once (and, on the GPU, on several CUDA streams) give bitwise the results of
the same calls made one after another: dense, packed (varlen) and KV-cache attention, forward and
backward. The autotune cache's own concurrency (threads tuning one key, processes writing one file) is
tested in test_autotune_cache.py.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashattn.backends.triton import tuning

ON_GPU = torch.cuda.is_available()
INTERPRETER = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"


def _problems(dtype, device, scale=1):
    """Eight different calls (shapes, options, layouts), each a function of no arguments returning tensors."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def dense(b, sq, sk, h, hk, d, **kw):
        q, k, v, do = rand(b, sq, h, d), rand(b, sk, hk, d), rand(b, sk, hk, d), rand(b, sq, h, d)

        def call():
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out = flash_attn_func(qq, kk, vv, **kw)
            return (out.detach(),) + torch.autograd.grad(out, (qq, kk, vv), do)
        return call

    def varlen(lens, h, hk, d, **kw):
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        n = sum(lens)
        q, k, v, do = rand(n, h, d), rand(n, hk, d), rand(n, hk, d), rand(n, h, d)

        def call():
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            out = flash_attn_varlen_func(qq, kk, vv, cu, cu, max(lens), max(lens), **kw)
            return (out.detach(),) + torch.autograd.grad(out, (qq, kk, vv), do)
        return call

    def kvcache(b, h, hk, d, cache_len, **kw):
        q, kc, vc, kn, vn = rand(b, 1, h, d), rand(b, cache_len, hk, d), rand(b, cache_len, hk, d), \
            rand(b, 1, hk, d), rand(b, 1, hk, d)
        lens = torch.randint(0, cache_len, (b,), generator=g, dtype=torch.int32).to(device)

        def call():
            k_cache, v_cache = kc.clone(), vc.clone()
            out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, kn, vn, cache_seqlens=lens, return_softmax_lse=True,
                                               **kw)
            return out, lse, k_cache
        return call

    s = scale
    return [dense(2, 33 * s, 40 * s, 4, 2, 32, causal=True), dense(1, 17 * s, 17 * s, 2, 2, 64, window_size=(5, 3)),
            dense(2, 9 * s, 50 * s, 6, 2, 16, softcap=5.0), dense(1, 40 * s, 12 * s, 3, 1, 40, causal=True),
            varlen([5 * s, 0, 30 * s, 11 * s], 4, 2, 32, causal=True), varlen([20 * s, 7 * s], 2, 1, 16),
            kvcache(3, 4, 2, 32, 40 * s, causal=True), kvcache(2, 8, 1, 64, 30 * s)]


def _check_concurrent(calls, workers=4, rounds=3, before=None):
    """Run every call serially, then from `workers` threads at once, each thread running every call `rounds`
    times in its own rotated order (each thread's `before()` context first, e.g. its own CUDA stream);
    every result must equal the serial one bitwise."""
    serial = [call() for call in calls]
    if torch.cuda.is_available():
        torch.cuda.synchronize()   # the inputs and serial results are complete before other streams read them
    barrier = threading.Barrier(workers)

    def worker(i):
        with before() if before else contextlib.nullcontext():
            barrier.wait()   # start together
            results = [(idx, calls[idx]()) for r in range(rounds)
                       for idx in ((j + i + r) % len(calls) for j in range(len(calls)))]
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()
        return results

    with ThreadPoolExecutor(workers) as pool:
        per_thread = list(pool.map(worker, range(workers)))
    for results in per_thread:
        assert len(results) == len(calls) * rounds
        for idx, res in results:
            for a, b in zip(res, serial[idx]):
                assert torch.equal(a, b), f"call {idx}: a concurrent result differs from the serial one"


@pytest.fixture
def no_forced_backend(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


def test_threads_torch_path(no_forced_backend):
    _check_concurrent(_problems(torch.float32, "cpu"))


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter tier runs on machines without a GPU")
def test_threads_triton_interpreter(monkeypatch):
    """The interpreter itself is not thread-safe (it patches triton.language module-wide); the launchers
    serialize it (tuning.serialized_under_interpreter), so threads get the serial results."""
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    calls = _problems(torch.float16, "cpu")
    _check_concurrent([calls[1], calls[5], calls[7]], workers=2, rounds=1)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("streams", [False, True], ids=["default-stream", "one-stream-per-thread"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_threads_and_streams(no_forced_backend, dtype, streams, tmp_path, monkeypatch):
    """Autotuning on (a fresh cache): the serial pass tunes, the threads reuse; with streams=True each thread
    launches on its own CUDA stream."""
    monkeypatch.setenv("FLASHATTN_AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "1")
    tuning.forget()
    calls = _problems(dtype, "cuda", scale=8)
    _check_concurrent(calls, workers=4, rounds=3,
                      before=(lambda: torch.cuda.stream(torch.cuda.Stream())) if streams else None)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
def test_gpu_threads_tune_concurrently(no_forced_backend, tmp_path, monkeypatch):
    """Cold start: four threads on four streams hit untuned keys at once. Tuning runs once per key (under
    a lock), every thread finishes, and a later serial call (same configs) agrees bitwise."""
    monkeypatch.setenv("FLASHATTN_AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "1")
    tuning.forget()
    calls = _problems(torch.bfloat16, "cuda", scale=8)[:4]

    def worker(i):
        with torch.cuda.stream(torch.cuda.Stream()):
            res = calls[i]()
            torch.cuda.current_stream().synchronize()
        return res

    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(worker, range(4)))
    for call, res in zip(calls, concurrent):
        for a, b in zip(res, call()):
            assert torch.equal(a, b)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".json")]) >= 3
