"""Global tokens (Longformer/BigBird): global positions see every key and are seen by every query.

The rule (flashattn.masks) by brute force; then the PyTorch path and the Triton kernels (interpreter
on the CPU, natively on the GPU tier) against the float64 reference; varlen; bad input.
"""
import itertools

import pytest
import torch
from helpers import make_qkv, run_and_compare

from flashattn import flash_attn_func, flash_attn_varlen_func, masks

ON_GPU = torch.cuda.is_available()

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, window, global positions)
CASES = {
    "window-3-3": (40, 40, 2, 1, 16, (3, 3), [0, 17]),
    "left-window-q-shorter": (33, 50, 2, 2, 16, (4, 0), [1, 45]),
    "q-longer": (50, 20, 2, 1, 32, (2, 5), [49]),
    "no-window": (30, 30, 2, 2, 16, (-1, -1), [5]),
}


@pytest.mark.parametrize("sq,sk", [(6, 6), (4, 7), (7, 4)])
@pytest.mark.parametrize("left,right", [(0, 0), (1, 1), (2, -1)])
@pytest.mark.parametrize("positions", [[0], [2, 5], []])
def test_rule_matches_brute_force(sq, sk, left, right, positions):
    flags = masks.global_flags(positions, max(sq, sk))
    m = masks.mask_matrix(sq, sk, left, right, global_flags=flags)
    off = sk - sq
    for i, j in itertools.product(range(sq), range(sk)):
        base = (left < 0 or j >= i + off - left) and (right < 0 or j <= i + off + right)
        assert bool(m[i, j]) == (base or i in positions or j in positions), (i, j)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path(case, dtype):
    sq, sk, h, hk, d, window, positions = CASES[case]
    q, k, v = make_qkv(2, sq, sk, h, hk, d, dtype, seed=sq + len(positions))
    run_and_compare(flash_attn_func, q, k, v, window_size=window, global_tokens=positions, name=case)


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreter(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    sq, sk, h, hk, d, window, positions = CASES[case]
    q, k, v = make_qkv(1, sq, sk, h, hk, d, torch.float16, seed=sq + len(positions))
    run_and_compare(flash_attn_func, q, k, v, window_size=window, global_tokens=positions, name=case)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_gpu(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    sq, sk, h, hk, d, window, positions = CASES[case]
    q, k, v = make_qkv(2, sq * 20, sk * 20, h * 4, hk * 4, 64, torch.bfloat16, device="cuda", seed=sq)
    run_and_compare(flash_attn_func, q, k, v, window_size=tuple(w * 20 if w >= 0 else -1 for w in window),
                    global_tokens=[p * 20 for p in positions], name=case)


def test_varlen_positions_are_per_sequence():
    cu = torch.tensor([0, 12, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 2, 16) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, 18, 18, window_size=(2, 2), global_tokens=[0, 11])
    for a, b in ((0, 12), (12, 30)):
        ref = flash_attn_func(q[None, a:b], k[None, a:b], v[None, a:b], window_size=(2, 2), global_tokens=[0, 11])
        torch.testing.assert_close(out[a:b], ref[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(causal=True, global_tokens=[0]), "bidirectional"),
    (dict(global_tokens=[10]), r"positions in \[0, 10\)"),
    (dict(global_tokens=[-1]), r"positions in \[0, 10\)"),
    (dict(global_tokens=[1.5]), "integer positions"),
    (dict(global_tokens=[[1]]), "1-D"),
])
def test_bad_global_tokens(kwargs, match):
    q, k, v = make_qkv(1, 10, 10, 1, 1, 8, torch.float32, seed=1)
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, window_size=(1, 1), **kwargs)
