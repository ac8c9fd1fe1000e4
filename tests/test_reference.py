"""The reference (flashattn.reference.attention_ref) against formulations that share no code with it.

1. A per-row float64 numpy loop whose mask is written straight from flash_attn's documentation:
   query i sees key j iff  i + sk - sq - left <= j <= i + sk - sq + right  (and 0 <= j < sk),
   -1 = unlimited on that side, causal = right 0.
2. torch's own scaled_dot_product_attention with an explicit mask built from (1).
3. torch.autograd.gradcheck for the reference's gradients (finite differences).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flashattn import attention_ref
from helpers import make_qkv


def doc_visible(i: int, j: int, sq: int, sk: int, causal: bool, window) -> bool:
    """flash_attn's docstring, literally."""
    left, right = window
    if causal:
        right = 0
    if not 0 <= j < sk:
        return False
    if left != -1 and not (i + sk - sq - left <= j):
        return False
    if right != -1 and not (j <= i + sk - sq + right):
        return False
    return True


def doc_mask(sq, sk, causal, window) -> np.ndarray:
    return np.array([[doc_visible(i, j, sq, sk, causal, window) for j in range(sk)] for i in range(sq)],
                    dtype=bool).reshape(sq, sk)


def loop_attention(q, k, v, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    """Row by row in float64 numpy. Returns out (b, sq, h, d) and lse (b, h, sq)."""
    q, k, v = (x.detach().double().numpy() for x in (q, k, v))
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    al = None if alibi is None else alibi.detach().double().numpy()
    mask = doc_mask(sq, sk, causal, window)
    out = np.zeros((b, sq, h, d))
    lse = np.full((b, h, sq), -np.inf)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hk)            # query head hi reads key/value head hi // group
            slope = None if al is None else (al[hi] if al.ndim == 1 else al[bi, hi])
            for i in range(sq):
                js = [j for j in range(sk) if mask[i, j]]
                if not js:
                    continue                 # no key: out stays 0, lse stays -inf
                s = np.array([scale * float(np.dot(q[bi, i, hi], k[bi, j, kh])) for j in js])
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                if slope is not None:
                    s = s - slope * np.abs(i + sk - sq - np.array(js))
                mx = s.max()
                e = np.exp(s - mx)
                out[bi, i, hi] = (e / e.sum()) @ v[bi, js, kh]
                lse[bi, hi, i] = mx + np.log(e.sum())
    return torch.from_numpy(out), torch.from_numpy(lse)


# (id, batch, sq, sk, nheads, nheads_k, headdim, causal, window, softcap, alibi: None | "h" | "bh")
CASES = [
    ("plain", 2, 7, 7, 2, 2, 8, False, (-1, -1), 0.0, None),
    ("causal-square", 1, 9, 9, 2, 2, 16, True, (-1, -1), 0.0, None),
    ("causal-sq<sk", 1, 4, 11, 2, 2, 8, True, (-1, -1), 0.0, None),
    ("causal-sq>sk", 1, 11, 4, 2, 2, 8, True, (-1, -1), 0.0, None),   # first 7 rows see nothing
    ("noncausal-sq<sk", 2, 3, 13, 1, 1, 8, False, (-1, -1), 0.0, None),
    ("noncausal-sq>sk", 1, 13, 3, 1, 1, 8, False, (-1, -1), 0.0, None),
    ("window-3-2", 1, 12, 12, 2, 2, 8, False, (3, 2), 0.0, None),
    ("window-0-0", 1, 6, 9, 1, 1, 8, False, (0, 0), 0.0, None),
    ("window-left-only", 1, 10, 7, 1, 1, 8, False, (2, -1), 0.0, None),
    ("window-right-only", 1, 7, 10, 1, 1, 8, False, (-1, 1), 0.0, None),
    ("causal+window", 1, 10, 14, 2, 2, 8, True, (3, 5), 0.0, None),    # right ignored under causal
    ("gqa", 2, 6, 8, 6, 2, 8, False, (-1, -1), 0.0, None),
    ("mqa-causal", 1, 8, 8, 4, 1, 8, True, (-1, -1), 0.0, None),
    ("softcap", 1, 7, 9, 2, 2, 8, False, (-1, -1), 2.0, None),
    ("softcap-causal-gqa", 1, 9, 6, 4, 2, 8, True, (-1, -1), 5.0, None),
    ("alibi-h", 1, 7, 10, 3, 3, 8, False, (-1, -1), 0.0, "h"),
    ("alibi-bh-causal", 2, 5, 8, 2, 1, 8, True, (-1, -1), 0.0, "bh"),
    ("alibi-causal-sq>sk", 1, 8, 5, 2, 2, 8, True, (-1, -1), 0.0, "h"),
    ("everything", 2, 9, 12, 4, 2, 16, True, (4, -1), 3.0, "bh"),
]


def _alibi(kind, b, h, seed=0):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    shape = (h,) if kind == "h" else (b, h)
    return torch.rand(shape, generator=g, dtype=torch.float32) + 0.1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_matches_row_loop(case):
    _, b, sq, sk, h, hk, d, causal, window, softcap, alibi_kind = case
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float64, seed=1)
    alibi = _alibi(alibi_kind, b, h)
    out, lse = attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi)
    exp_out, exp_lse = loop_attention(q, k, v, causal=causal, window=window, softcap=softcap, alibi=alibi)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
    # -inf exactly where the loop found no key; assert_close treats equal infinities as equal
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exp_lse))
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-12)


def test_softmax_scale_is_used():
    q, k, v = make_qkv(1, 5, 6, 2, 2, 8, torch.float64, seed=2)
    out, lse = attention_ref(q, k, v, softmax_scale=0.7)
    exp_out, exp_lse = loop_attention(q, k, v, scale=0.7)
    torch.testing.assert_close(out, exp_out)
    torch.testing.assert_close(lse, exp_lse)
    other, _ = attention_ref(q, k, v)   # default 1/sqrt(8) differs from 0.7
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("case", [c for c in CASES if c[9] == 0.0], ids=[c[0] for c in CASES if c[9] == 0.0])
def test_lse_is_logsumexp_of_masked_scaled_scores(case):
    _, b, sq, sk, h, hk, d, causal, window, _, alibi_kind = case
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float64, seed=3)
    alibi = _alibi(alibi_kind, b, h)
    _, lse = attention_ref(q, k, v, causal=causal, window_size=window, alibi_slopes=alibi)
    kk = k.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) / math.sqrt(d)
    if alibi is not None:
        sl = alibi.double().reshape(-1 if alibi.dim() == 2 else 1, h)[:, :, None, None]
        i = torch.arange(sq)[:, None]
        j = torch.arange(sk)[None, :]
        s = s - sl * (i + sk - sq - j).abs()
    mask = torch.from_numpy(doc_mask(sq, sk, causal, window))
    expected = torch.logsumexp(s.masked_fill(~mask, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected)


# torch's SDPA with an explicit mask: a second, independent opinion (cases where every row sees a key,
# since torch's handling of fully masked rows is its own business).
SDPA_CASES = ["plain", "causal-square", "causal-sq<sk", "noncausal-sq>sk", "window-3-2", "window-left-only",
              "causal+window", "gqa", "mqa-causal", "alibi-h", "alibi-bh-causal"]


@pytest.mark.parametrize("case_id", SDPA_CASES)
def test_reference_matches_torch_sdpa(case_id):
    _, b, sq, sk, h, hk, d, causal, window, softcap, alibi_kind = next(c for c in CASES if c[0] == case_id)
    mask = torch.from_numpy(doc_mask(sq, sk, causal, window))
    assert mask.any(dim=1).all(), "pick a case where every row sees a key"
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float64, requires_grad=True, seed=4)
    alibi = _alibi(alibi_kind, b, h)
    out, _ = attention_ref(q, k, v, causal=causal, window_size=window, alibi_slopes=alibi)

    bias = torch.zeros(1, 1, sq, sk, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    if alibi is not None:
        sl = alibi.double().reshape(-1 if alibi.dim() == 2 else 1, h)[:, :, None, None]
        dist = (torch.arange(sq)[:, None] + sk - sq - torch.arange(sk)[None, :]).abs()
        bias = bias - sl * dist
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=bias, enable_gqa=(h != hk)).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    dout = torch.randn_like(out)
    g_ours = torch.autograd.grad(out, (q, k, v), dout)
    g_torch = torch.autograd.grad(expected, (q, k, v), dout)
    for name, a, e in zip(("dq", "dk", "dv"), g_ours, g_torch):
        torch.testing.assert_close(a, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case_id", ["plain", "causal-sq>sk", "window-0-0", "gqa", "softcap-causal-gqa",
                                     "alibi-bh-causal", "everything"])
def test_reference_gradients_gradcheck(case_id):
    _, b, sq, sk, h, hk, d, causal, window, softcap, alibi_kind = next(c for c in CASES if c[0] == case_id)
    q, k, v = make_qkv(1, min(sq, 6), min(sk, 6), h, hk, 8, torch.float64, requires_grad=True, seed=5)
    alibi = _alibi(alibi_kind, 1, h)

    def f(q, k, v):
        return attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("sq,sk,causal,window", [
    (5, 2, True, (-1, -1)),      # rows 0..2 see nothing (bottom-right causal)
    (6, 3, False, (0, 0)),       # rows 0..2 see nothing
    (4, 9, False, (0, -1)),      # nothing empty: a control
    (5, 8, False, (1, 0)),       # diag(i) = i + 3: every row sees its diagonal
])
def test_rows_without_keys_give_zero_and_neg_inf(sq, sk, causal, window):
    q, k, v = make_qkv(2, sq, sk, 2, 1, 8, torch.float64, requires_grad=True, seed=6)
    out, lse = attention_ref(q, k, v, causal=causal, window_size=window)
    empty = ~torch.from_numpy(doc_mask(sq, sk, causal, window)).any(dim=1)   # (sq,)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert (out[:, empty] == 0).all()
    assert (out[:, ~empty].abs().sum(-1) > 0).all()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[:, empty] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compute_dtype(dtype):
    q, k, v = make_qkv(1, 9, 11, 2, 1, 16, dtype, seed=7)
    exact, exact_lse = attention_ref(q, k, v, causal=True)
    assert exact.dtype == torch.float64
    f32, f32_lse = attention_ref(q, k, v, causal=True, compute_dtype=torch.float32)
    assert f32.dtype == torch.float32 and f32_lse.dtype == torch.float32
    torch.testing.assert_close(f32.double(), exact, rtol=1e-5, atol=1e-6)
    native, native_lse = attention_ref(q, k, v, causal=True, compute_dtype=None)
    assert native.dtype == dtype and native_lse.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(native.double(), exact, rtol=tol, atol=tol)
    if dtype != torch.float32:
        # the "pt" baseline of the accuracy rule must actually carry the low-precision error
        assert (native.double() - exact).abs().max() > (f32.double() - exact).abs().max()


@pytest.mark.parametrize("sq,sk,b", [(0, 5, 1), (3, 0, 1), (0, 0, 1), (3, 4, 0)])
def test_empty_sequences(sq, sk, b):
    q, k, v = make_qkv(b, sq, sk, 2, 2, 8, torch.float64, seed=8)
    out, lse = attention_ref(q, k, v)
    assert out.shape == (b, sq, 2, 8) and lse.shape == (b, 2, sq)
    assert (out == 0).all() and torch.isneginf(lse).all()


# ---- the accuracy rule itself (helpers.check_close / run_and_compare): it must be able to fail


def test_check_close_accepts_within_and_rejects_beyond_the_bound():
    from helpers import check_close
    ref = torch.linspace(-2, 2, 50, dtype=torch.float64)
    pt = ref + 1e-3                                 # baseline error 1e-3 -> bound 2e-3 + eps
    check_close("x", ref + 1.9e-3, ref, pt, atol=0.0)
    with pytest.raises(AssertionError, match=r"x: max\|ours - ref\| = 2\.100e-03 > .*2\.000e-03"):
        check_close("x", ref + 2.1e-3, ref, pt, atol=0.0)
    # default eps: relative to max|ref| at the dtype's precision
    check_close("x", ref.float() + 1e-5, ref, ref.float())
    with pytest.raises(AssertionError):
        check_close("x", ref.float() + 1e-4, ref, ref.float())


def test_check_close_nan_never_passes():
    from helpers import check_close
    ref = torch.zeros(4, dtype=torch.float64)
    ours = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    with pytest.raises(AssertionError, match="NaN"):
        check_close("out", ours, ref, ref.float() + 1e9, atol=1e9)


def test_check_close_infinities_must_match():
    from helpers import check_close
    ref = torch.tensor([float("-inf"), 1.0, 2.0], dtype=torch.float64)
    check_close("lse", torch.tensor([float("-inf"), 1.0, 2.0]), ref, ref.float())
    for bad in ([0.0, 1.0, 2.0], [float("-inf"), float("-inf"), 2.0], [float("inf"), 1.0, 2.0]):
        with pytest.raises(AssertionError, match="infinities differ"):
            check_close("lse", torch.tensor(bad), ref, ref.float())
    with pytest.raises(AssertionError, match="baseline"):   # a vacuous rule is an error, not a pass
        check_close("lse", ref.float(), ref, torch.tensor([float("-inf"), float("inf"), 2.0]))


def test_run_and_compare_catches_a_wrong_candidate():
    from helpers import run_and_compare

    def wrong_scale(q, k, v, softmax_scale=None, **kw):
        out, lse = attention_ref(q, k, v, softmax_scale=0.9 / math.sqrt(q.shape[-1]),
                                 causal=kw["causal"], window_size=kw["window_size"], compute_dtype=torch.float32)
        return out.to(q.dtype), lse.float(), None

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong_dq(q, k, v, softmax_scale=None, **kw):
        out, lse = attention_ref(WrongGrad.apply(q), k, v, causal=kw["causal"], window_size=kw["window_size"],
                                 compute_dtype=torch.float32)
        return out, lse.float(), None

    def right(q, k, v, softmax_scale=None, **kw):
        out, lse = attention_ref(q, k, v, causal=kw["causal"], window_size=kw["window_size"],
                                 compute_dtype=torch.float32)
        return out, lse.float(), None

    q, k, v = make_qkv(1, 9, 12, 2, 1, 16, torch.float32, seed=9)
    run_and_compare(right, q, k, v, causal=True)
    with pytest.raises(AssertionError, match="out"):
        run_and_compare(wrong_scale, q, k, v, causal=True)
    with pytest.raises(AssertionError, match="dq"):
        run_and_compare(wrong_dq, q, k, v, causal=True)
