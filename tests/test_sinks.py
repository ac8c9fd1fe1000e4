"""Attention sinks (StreamingLLM): the first num_sink_tokens keys are exempt from the window's left limit.

One rule in flashattn.masks; checked here by brute force, then on the PyTorch path and on the Triton
kernels (interpreter on the CPU, natively on the GPU tier) against the float64 reference.
"""
import itertools

import pytest
import torch
from helpers import backend_attention, make_qkv, run_and_compare

from flashattn import flash_attn_func, flash_attn_varlen_func, masks
from flashattn.backends import torch_tiled

ON_GPU = torch.cuda.is_available()

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, num_sink)
CASES = {
    "streaming-causal": (40, 40, 2, 1, 16, True, (5, 0), 4),
    "decode-like-q-shorter": (33, 70, 2, 2, 16, True, (8, -1), 20),
    "bidirectional-window": (50, 50, 2, 2, 16, False, (3, 3), 17),
    "q-longer-than-k": (70, 33, 2, 1, 32, True, (2, 0), 1),
}


def _brute(sq, sk, left, right, sink):
    off = sk - sq
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for i, j in itertools.product(range(sq), range(sk)):
        ok_left = left < 0 or j >= i + off - left or j < sink
        ok_right = right < 0 or j <= i + off + right
        m[i, j] = ok_left and ok_right
    return m


@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (9, 5)])
@pytest.mark.parametrize("left,right", [(0, 0), (2, 0), (1, 3), (2, -1)])
@pytest.mark.parametrize("sink", [0, 1, 3])
def test_rule_and_ranges_match_brute_force(sq, sk, left, right, sink):
    m = masks.mask_matrix(sq, sk, left, right, num_sink=sink)
    assert torch.equal(m, _brute(sq, sk, left, right, sink))
    for q_lo, q_hi in ((0, sq), (1, 3), (sq - 2, sq)):
        covered = torch.zeros(sk, dtype=torch.bool)
        for lo, hi in masks.key_ranges(q_lo, q_hi, sq, sk, left, right, sink):
            covered[lo:hi] = True
        assert not (m[q_lo:q_hi].any(0) & ~covered).any(), "a visible key lies outside key_ranges"
    for k_lo, k_hi in ((0, 2), (2, 4), (sk - 2, sk)):
        q_lo, q_hi = masks.query_range(k_lo, k_hi, sq, sk, left, right, sink)
        seen_by = m[:, k_lo:k_hi].any(1).nonzero().flatten()
        assert all(q_lo <= i < q_hi for i in seen_by.tolist())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path(case, dtype):
    sq, sk, h, hk, d, causal, window, sink = CASES[case]
    q, k, v = make_qkv(2, sq, sk, h, hk, d, dtype, seed=sq + sink)
    run_and_compare(flash_attn_func, q, k, v, causal=causal, window_size=window, num_sink_tokens=sink, name=case)


def test_torch_path_small_tiles():
    # tiles of 8 keys: the sink range, the window's masked edges and its full middle are separate tiles
    q, k, v = make_qkv(1, 64, 64, 2, 1, 16, torch.float32, seed=3)

    def attention(q, k, v, **kw):
        sink = kw.pop("num_sink_tokens")
        fn = backend_attention(_WithSinks(sink), block_q=8, block_k=8)
        return fn(q, k, v, **kw)

    run_and_compare(attention, q, k, v, causal=True, window_size=(20, 0), num_sink_tokens=5)


class _WithSinks:
    """torch_tiled with a fixed num_sink, in the shape backend_attention expects."""

    def __init__(self, num_sink):
        self.num_sink = num_sink

    def forward(self, *args, **kw):
        return torch_tiled.forward(*args, num_sink=self.num_sink, **kw)

    def backward(self, *args, **kw):
        return torch_tiled.backward(*args, num_sink=self.num_sink, **kw)


def test_varlen_sinks_per_sequence():
    lens = [30, 12]
    cu = torch.tensor([0, 30, 42], dtype=torch.int32)
    q, k, v = (torch.randn(42, 2, 16) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True, window_size=(4, 0), num_sink_tokens=3)
    for a, b in ((0, 30), (30, 42)):
        ref = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, window_size=(4, 0),
                              num_sink_tokens=3)
        torch.testing.assert_close(out[a:b], ref[0], rtol=1e-6, atol=1e-6)


def test_sinks_without_window_change_nothing():
    q, k, v = make_qkv(1, 20, 20, 2, 2, 16, torch.float32, seed=4)
    torch.testing.assert_close(flash_attn_func(q, k, v, causal=True, num_sink_tokens=4),
                               flash_attn_func(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_num_sink_tokens(bad):
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, torch.float32, seed=5)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        flash_attn_func(q, k, v, window_size=(2, 0), num_sink_tokens=bad)


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreter(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    sq, sk, h, hk, d, causal, window, sink = CASES[case]
    q, k, v = make_qkv(1, sq, sk, h, hk, d, torch.float16, seed=sq + sink)
    run_and_compare(flash_attn_func, q, k, v, causal=causal, window_size=window, num_sink_tokens=sink, name=case)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("sq,sk,window,sink", [(1000, 1000, (100, 0), 4), (64, 3000, (255, 0), 16),
                                               (2048, 2048, (300, 300), 130)])
def test_triton_gpu(sq, sk, window, sink, monkeypatch):
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    q, k, v = make_qkv(2, sq, sk, 8, 2, 128, torch.bfloat16, device="cuda", seed=sink)
    run_and_compare(flash_attn_func, q, k, v, causal=window[1] == 0, window_size=window, num_sink_tokens=sink)
