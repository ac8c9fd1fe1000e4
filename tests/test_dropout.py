"""Dropout inside attention (dropout_p > 0) on every backend.

The mask is a function of (seed, batch·head, query, key) (flashattn.dropout), so the reference given the
same seed must match each backend exactly up to rounding, forward and gradients; its statistics
must be those of independent Bernoulli draws; torch.manual_seed makes a call reproducible.
"""
import math

import pytest
import torch
from helpers import check_close, make_qkv, reference_results

from flashattn import attention_ref, dropout, flash_attn_func, flash_attn_varlen_func

ON_GPU = torch.cuda.is_available()

# (seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, dropout_p)
CASES = {
    "gqa-causal-p0.3": (37, 37, 4, 2, 16, True, (-1, -1), 0.3),
    "mqa-q-shorter-p0.5": (20, 45, 2, 1, 32, False, (-1, -1), 0.5),
    "causal-q-longer-p0.1": (45, 20, 2, 2, 16, True, (-1, -1), 0.1),
    "window-p0.2": (40, 40, 2, 2, 16, False, (6, 3), 0.2),
}


def _compare_with_reference(case, dtype, device):
    sq, sk, h, hk, d, causal, window, p = CASES[case]
    q, k, v = make_qkv(2, sq, sk, h, hk, d, dtype, device=device, requires_grad=True, seed=sq + hk)
    torch.manual_seed(7)
    out = flash_attn_func(q, k, v, dropout_p=p, causal=causal, window_size=window)
    torch.manual_seed(7)
    seed = int(dropout.draw_seed())   # the seed that call drew
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    opts = dict(causal=causal, window_size=window, dout=dout, dropout_p=p, dropout_seed=seed)
    ref, pt = reference_results(q, k, v, **opts), reference_results(q, k, v, compute_dtype=None, **opts)
    for name, ours in zip(("out", "dq", "dk", "dv"), (out,) + grads):
        check_close(f"{case} {name}", ours, ref[name], pt[name])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_matches_reference_with_the_same_mask(case, dtype):
    _compare_with_reference(case, dtype, "cpu")


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreter_matches_reference(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    _compare_with_reference(case, torch.float16, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_gpu_matches_reference(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    _compare_with_reference(case, torch.bfloat16, "cuda")


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    """The hash behaves like Bernoulli(1 - p): the kept fraction is within 5 sigma, and neighbouring
    rows, heads and seeds are uncorrelated (agreement p² + (1-p)², within 5 sigma)."""
    n = 64
    bh = torch.arange(8)[:, None, None]
    i, j = torch.arange(n)[None, :, None], torch.arange(n)[None, None, :]
    keep = dropout.keep_mask(1234, bh, i, j, p).float()
    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    same = p * p + (1 - p) * (1 - p)
    sigma2 = math.sqrt(same * (1 - same) / (count // 2))
    for other in (keep[:, 1:], keep[1:], dropout.keep_mask(1235, bh, i, j, p).float()):
        a = keep[..., : other.shape[-2], :][: other.shape[0]]
        agreement = (a == other).float().mean().item()
        assert abs(agreement - same) < 5 * sigma2


def test_returned_probabilities_show_the_dropout():
    q, k, v = make_qkv(1, 30, 30, 2, 2, 16, torch.float32, seed=2)
    p = 0.4
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert probs.shape == (1, 2, 30, 30)
    visible = torch.ones(30, 30, dtype=torch.bool).tril()
    kept = (probs > 0)[..., visible]
    assert abs(kept.float().mean().item() - (1 - p)) < 0.06   # 930 visible scores
    assert (probs[..., ~visible] == 0).all()
    # the probabilities are what multiplied v
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", probs, v), rtol=1e-5, atol=1e-5)


def test_reproducible_under_manual_seed_and_deterministic_backward():
    q, k, v = make_qkv(2, 25, 25, 2, 1, 16, torch.float32, requires_grad=True, seed=3)
    torch.manual_seed(11)
    a = flash_attn_func(q, k, v, dropout_p=0.3)
    torch.manual_seed(11)
    b = flash_attn_func(q, k, v, dropout_p=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = flash_attn_func(q, k, v, dropout_p=0.3)   # the next seed: a different mask
    assert (a - c).abs().max() > 1e-3
    dout = torch.randn_like(a)
    g1 = torch.autograd.grad(a, (q, k, v), dout, retain_graph=True)
    g2 = torch.autograd.grad(a, (q, k, v), dout)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))


def test_varlen_dropout_per_sequence():
    """Sequence i of a packed batch draws the mask of batch entry i of a dense call with the same seed."""
    lens = [9, 14]
    cu = torch.tensor([0, 9, 23], dtype=torch.int32)
    q, k, v = (torch.randn(23, 2, 16) for _ in range(3))
    torch.manual_seed(5)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 14, 14, dropout_p=0.3, causal=True)
    torch.manual_seed(5)
    seed = int(dropout.draw_seed())
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        ref, _ = attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal=True, dropout_p=0.3,
                               dropout_seed=seed, batch_offset=i)
        torch.testing.assert_close(out[a:b].double(), ref[0], rtol=1e-5, atol=1e-5)
    assert lens == [9, 14]



import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flashattn.backends.triton.kernels import _mix32_u32  # noqa: E402


@triton.jit
def _hash_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < n, other=0)
    tl.store(Y + offs, _mix32_u32(x.to(tl.uint32)).to(tl.int64), mask=offs < n)


def test_kernel_hash_uint32_equals_int64_hash():
    """The kernels' per-score hash (uint32 arithmetic) is dropout.mix32 (int64 arithmetic) bit for bit."""
    from flashattn import dropout as D
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, 2**32, (1000,), generator=g, dtype=torch.int64),
                   torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)]).to(device)
    y = torch.empty_like(x)
    _hash_kernel[(1,)](x, y, x.numel(), BLOCK=1024)
    assert torch.equal(y.cpu(), D.mix32(x.cpu()))
