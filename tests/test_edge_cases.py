"""Numerical edge cases, each with a defined behaviour, on every backend: the PyTorch path (fp32, fp16),
the Triton kernels under the interpreter (fp16, CPU) and on the GPU (`-m gpu`, bf16 and fp16).

- Logits far beyond fp16's range (softmax_scale·|q·k| ~ 1e4 .. 1e5): exp(1e4) overflows every float, so
  only a correct online rescaling gives the right answer; the result equals the reference.
- Rows that see no key (causal with seqlen_q > seqlen_k, a window past the keys, no keys at all, an
  empty sequence of a packed batch, an empty KV cache): out exactly 0, lse -inf, their dq exactly 0,
  and keys nobody sees get dk = dv = 0; never NaN.
- NaN and ±Inf in the inputs: a non-finite value in q row i or k row j makes out/lse non-finite in
  exactly the rows the reference makes non-finite (q: row i; k: the rows that see key j, where the
  score is not -inf); in v row j, in every row that sees key j and possibly other rows of the same
  (batch entry, key/value head) that share a tile with one (0·NaN in a tile's matrix product; the
  reference, one big matmul, poisons all of them), lse unaffected. Rows that stay finite agree with
  the reference, and other batch entries, sequences and key/value head groups are untouched (out and
  gradients bitwise equal to a run without the bad value).
- softmax_scale = 0: uniform attention over the visible keys (out = their mean, lse = log(count)),
  dq = dk = 0 exactly; with ALiBi the bias alone decides.
- seqlen 1 (and 1 against 300), head dim 8 and 256.
- Subnormal inputs and outputs: computed as numbers (CPU: within design.md's rule plus a few
  subnormal units; GPU fp32 math may flush fp32-subnormals to zero: within the smallest normal).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from flashattn import (attention_ref, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, masks)
from flashattn.backends import torch_tiled
from helpers import EPS, check_close, make_qkv, reference_results, run_and_compare

# the interpreter evaluates exp2/matmul in numpy, which warns on the infinities and NaNs these tests feed it
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

ON_GPU = torch.cuda.is_available()
INTERPRETER = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"

_gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")]
BACKENDS = [
    pytest.param(("torch", torch.float32, "cpu"), id="torch-fp32"),
    pytest.param(("torch", torch.float16, "cpu"), id="torch-fp16"),
    pytest.param(("triton", torch.float16, "cpu"), id="triton-interp-fp16",
                 marks=pytest.mark.skipif(not INTERPRETER, reason="interpreter tier: machines without a GPU")),
    pytest.param(("triton", torch.bfloat16, "cuda"), id="triton-gpu-bf16", marks=_gpu),
    pytest.param(("triton", torch.float16, "cuda"), id="triton-gpu-fp16", marks=_gpu),
]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """(dtype, device) with FLASHATTN_BACKEND set; the torch path gets small tiles (16 x 16), as the kernels
    under the interpreter have, so that every case crosses tile boundaries."""
    name, dtype, device = request.param
    monkeypatch.setenv("FLASHATTN_BACKEND", name)
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    monkeypatch.setattr(torch_tiled, "BLOCK_Q", 16)
    monkeypatch.setattr(torch_tiled, "BLOCK_K", 16)
    return dtype, device


def _grads(q, k, v, dout=None, **kw):
    """out, lse, dq, dk, dv of flash_attn_func."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    dout = torch.ones_like(out) if dout is None else dout
    return (out.detach(), lse) + torch.autograd.grad(out, (q, k, v), dout)


# ------------------------------------------------------------------------------------------------
# logits beyond fp16


def _huge_logits(dtype, device, sign_flip=True):
    """q, k whose scores with softmax_scale = 10 range over ~9000 .. 10000 along the keys: each key's score
    is ~14 above the previous one, so the last key dominates (first key for the rows with q negated)."""
    b, sq, sk, h, d = 1, 24, 70, 2, 16
    q = torch.zeros(b, sq, h, d)
    q[..., 0] = 100.0
    if sign_flip:
        q[:, ::2, :, 0] = -100.0            # even rows: the first key has the largest score
    q[..., 1:] = torch.randn(b, sq, h, d - 1, generator=torch.Generator().manual_seed(0)) * 0.1
    k = torch.zeros(b, sk, h, d)
    k[..., 0] = torch.linspace(9.0, 10.0, sk)[None, :, None]
    k[..., 1:] = torch.randn(b, sk, h, d - 1, generator=torch.Generator().manual_seed(1)) * 0.1
    v = torch.randn(b, sk, h, d, generator=torch.Generator().manual_seed(2))
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_logits_beyond_fp16_range(backend, causal):
    dtype, device = backend
    q, k, v = _huge_logits(dtype, device)
    scale = 10.0
    ref = reference_results(q, k, v, softmax_scale=scale, causal=causal)
    assert ref["lse"].abs().max() > 8000          # the scores really are ~1e4: exp() overflows without rescaling
    # baseline: the naive math in float32 (in fp16 the naive scores are fine here, but exp() is not);
    # dq, dk are nearly 0 and ill-conditioned (see _one_hot_grad_bound): judged by that bound instead
    run_and_compare(flash_attn_func, q, k, v, softmax_scale=scale, causal=causal, name="huge logits", check_grads=False)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)
    ref = reference_results(q, k, v, softmax_scale=scale, causal=causal, dout=dout)
    pt32 = reference_results(q, k, v, softmax_scale=scale, causal=causal, dout=dout, compute_dtype=torch.float32)
    out, lse, *grads = _grads(q, k, v, dout, softmax_scale=scale, causal=causal)
    assert all(torch.isfinite(x).all() for x in (out, lse, *grads))
    check_close("dv", grads[2], ref["dv"], pt32["dv"], dtype=dtype)
    _check_one_hot_grads(q, k, v, dout, scale, grads[0], grads[1], ref)
    # the rows that see the last key copy its value (the next key is e^-14 behind), the others the first key's;
    # in bf16 (spacing 1/16 near 10) neighbouring keys round to one value, and the right answer is then a
    # softmax over the tied keys (weighted by the small other coordinates): the comparison with the
    # reference above covers that case
    if torch.unique(k[0, :, 0, 0]).numel() < k.shape[1]:
        return
    last, first = v[0, -1].float(), v[0, 0].float()
    odd = out[0, 1::2].float()
    if not causal:   # causal rows see keys 0 .. 46 + i: not the last key
        torch.testing.assert_close(odd, last.expand_as(odd), atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(out[0, 0::2].float(), first.expand_as(out[0, 0::2]).float(), atol=2e-3, rtol=1e-2)


def test_logits_beyond_fp16_range_where_the_naive_math_overflows(backend):
    """softmax_scale·|q·k| up to 1e5 > 65504: the scores do not even exist in fp16. The kernels keep them in
    fp32: the result is the float64 reference's, judged against the naive math in float32."""
    dtype, device = backend
    q, k, v = _huge_logits(dtype, device)
    scale = 100.0
    ref = reference_results(q, k, v, softmax_scale=scale, dout=torch.ones_like(q))
    pt32 = reference_results(q, k, v, softmax_scale=scale, dout=torch.ones_like(q), compute_dtype=torch.float32)
    assert ref["lse"].abs().max() > 80000
    out, lse, dq, dk, dv = _grads(q, k, v, softmax_scale=scale)
    for name, ours in (("out", out), ("lse", lse)):
        check_close(name, ours, ref[name], pt32[name], dtype=dtype)
    # dv = Pᵀ dO with P = exp(S − L) recomputed in float32 from S, L ~ 1e5: a few units in the last place of
    # 1e5 in the exponent (the kernels also convert L between natural and base-2 logs) is a relative error
    # of a few u·|S| in P. The naive float32 math is exact here only because its S − max(S) cancels exactly.
    u, s_max = 2.0 ** -24, ref["lse"].abs().max().item() * 1.4426950408889634
    dv_slack = 4 * u * s_max * ref["dv"].abs().max().item()
    check_close("dv", dv, ref["dv"], pt32["dv"], dtype=dtype, atol=EPS[dtype] * ref["dv"].abs().max().item() + dv_slack)
    _check_one_hot_grads(q, k, v, torch.ones_like(q), scale, dq, dk, ref)


def _check_one_hot_grads(q, k, v, dout, scale, dq, dk, ref):
    """dq, dk where every row's softmax is one-hot: the exact dS = P∘(dP − Δ) is ~0, so they are pure
    cancellation error, judged by its bound rather than design.md's eps.

    The naive autograd gets ~0 by structure; FlashAttention computes Δ = rowsum(dO∘O) from the stored
    output O, rounded to its dtype (unit roundoff u_out: 2^-8 bf16, 2^-11 fp16), and dP = dO·v in float32:
    for the dominant key dP − Δ = dO·(v − O) is up to d·|dO|·|v|·(u_out + 2u) (u = 2^-24 for the two
    float32 dot products), and dq = scale·dS·K, dk = scale·dSᵀQ multiply it by scale·|k| and scale·|q|
    (flash_attn's backward shares this: its Δ also reads the rounded output)."""
    u, u_out = 2.0 ** -24, {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(q.dtype, 2.0 ** -24)
    dots = q.shape[-1] * dout.abs().max().item() * v.abs().max().item() * (u_out + 2 * u)
    # terms: dq sums dS over the keys, of which ~one per row has P ≠ 0 (2 for slack); dk over the sq rows
    for name, ours, other, terms in (("dq", dq, k, 2), ("dk", dk, q, q.shape[1])):
        bound = dots * scale * other.abs().max().item() * terms
        err = (ours.double().cpu() - ref[name].cpu()).abs().max().item()
        assert torch.isfinite(ours).all() and err <= bound, f"{name}: {err:.3e} > {bound:.3e}"


def test_tied_maxima_in_different_tiles(backend):
    """Two keys with the same huge score, one in the first tile and one in the last: out is their mean."""
    dtype, device = backend
    d = 16
    q = torch.zeros(1, 3, 1, d)
    q[..., 0] = 50.0
    k = torch.zeros(1, 70, 1, d)
    k[0, :, 0, 0] = 1.0
    k[0, 3, 0, 0] = k[0, 66, 0, 0] = 9.0      # scores 50·9·scale vs 50·1·scale: the rest are e^-3200 behind
    v = torch.randn(1, 70, 1, d, generator=torch.Generator().manual_seed(3))
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=8.0, return_attn_probs=True)
    mean = (v[0, 3, 0].double() + v[0, 66, 0].double()) / 2
    torch.testing.assert_close(out[0, :, 0].double(), mean.expand(3, d), atol=4 * EPS[dtype], rtol=0)
    torch.testing.assert_close(lse.double(), torch.full_like(lse.double(), 3600 + math.log(2)), atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------------------
# rows that see no key

EMPTY_ROW_CASES = {
    # name: (seqlen_q, seqlen_k, causal, window, softcap, alibi)
    "causal-q40-k10": (40, 10, True, (-1, -1), 0.0, False),
    "window-past-the-keys": (50, 20, False, (5, 2), 0.0, False),
    "causal-window-softcap-alibi": (40, 10, True, (3, -1), 5.0, True),
    "no-keys": (17, 0, False, (-1, -1), 0.0, False),
}


@pytest.mark.parametrize("case", list(EMPTY_ROW_CASES))
def test_rows_that_see_no_key(backend, case):
    dtype, device = backend
    sq, sk, causal, window, softcap, alibi = EMPTY_ROW_CASES[case]
    q, k, v = make_qkv(2, sq, sk, 4, 2, 16, dtype, device=device, seed=5)
    slopes = torch.rand(4, device=device) if alibi else None
    left, right = masks.window_bounds(causal, window)
    seen = masks.mask_matrix(sq, sk, left, right, device=device)          # (sq, sk)
    empty_rows, unseen_keys = ~seen.any(1), ~seen.any(0)
    assert empty_rows.any()
    dout = torch.randn(2, sq, 4, 16, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    out, lse, dq, dk, dv = _grads(q, k, v, dout, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes)
    for name, x in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(x).any(), f"{case}: NaN in {name}"
    assert (out[:, empty_rows] == 0).all() and (dq[:, empty_rows] == 0).all()
    assert torch.isneginf(lse[:, :, empty_rows]).all() and torch.isfinite(lse[:, :, ~empty_rows]).all()
    assert (dk[:, unseen_keys] == 0).all() and (dv[:, unseen_keys] == 0).all()
    if sk:
        run_and_compare(flash_attn_func, q, k, v, causal=causal, window_size=window, softcap=softcap,
                        alibi_slopes=slopes, dout=dout, name=case)


def test_empty_sequences_in_a_packed_batch(backend):
    dtype, device = backend
    lens_q, lens_k = [5, 0, 9, 7], [0, 6, 12, 3]
    cu_q = torch.tensor([0, 5, 5, 14, 21], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 0, 6, 18, 21], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(n, 2, 16, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for n in (21, 21, 21))
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                         return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    # sequence 0 has no keys; in sequence 3 (7 queries, 3 keys, causal) the first 4 rows see nothing
    empty = torch.zeros(21, dtype=torch.bool, device=device)
    empty[0:5] = True
    empty[14:18] = True
    assert (out[empty] == 0).all() and torch.isneginf(lse[:, empty]).all() and (dq[empty] == 0).all()
    assert torch.isfinite(lse[:, ~empty]).all()
    assert all(not torch.isnan(x).any() for x in (out, dq, dk, dv))


def test_empty_kv_cache(backend):
    dtype, device = backend
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 3, 4, 16, generator=g).to(device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(2, 20, 2, 16, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([0, 5], dtype=torch.int32,
                                                                                         device=device),
                                       causal=True, return_softmax_lse=True)
    assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(lse[1]).all()


# ------------------------------------------------------------------------------------------------
# NaN and Inf in the inputs


def _bad_rows(x, dims):
    """Boolean (b, s, h) of the rows of x (b, s, h, d) that hold a non-finite value."""
    return ~torch.isfinite(x).all(dims)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_finite_inputs(backend, which, value):
    """One bad element in batch entry 0, query/key row 10, head 0 (GQA 4/2: kv head 0 serves q heads 0, 1),
    causal with a left window of 5 so that many rows do not see key 10."""
    dtype, device = backend
    q, k, v = make_qkv(2, 40, 40, 4, 2, 16, dtype, device=device, seed=11)
    opts = dict(causal=True, window_size=(5, -1))
    dout = torch.randn(2, 40, 4, 16, generator=torch.Generator().manual_seed(12)).to(device=device, dtype=dtype)
    clean = _grads(q, k, v, dout, **opts)
    x = {"q": q, "k": k, "v": v}[which]
    x[0, 10, 0, 3] = value
    out, lse, dq, dk, dv = _grads(q, k, v, dout, **opts)
    ref_out, ref_lse = attention_ref(q, k, v, **opts)

    bad_out, bad_ref = _bad_rows(out, -1), _bad_rows(ref_out, -1)           # (b, sq, h)
    bad_lse, bad_ref_lse = ~torch.isfinite(lse), ~torch.isfinite(ref_lse)
    seen = masks.mask_matrix(40, 40, 5, 0, device=device)[:, 10]             # rows that see key 10
    if which in "qk":
        assert torch.equal(bad_out, bad_ref), f"non-finite rows differ from the reference's: " \
            f"ours {bad_out.nonzero().tolist()[:6]}, ref {bad_ref.nonzero().tolist()[:6]}"
        assert torch.equal(bad_lse, bad_ref_lse)
        assert bad_out.any()
        if which == "q":
            assert bad_out.sum() == 1 and bad_out[0, 10, 0]
        elif value != value:   # NaN in k: exactly the rows that see key 10, both query heads of kv head 0
            assert torch.equal(bad_out[0, :, 0], seen) and torch.equal(bad_out[0, :, 1], seen)
        # rows that stay finite agree with the reference (an Inf key may drop out of a row: score -inf)
        keep = ~bad_ref
        ref, pt = reference_results(q, k, v, **opts), reference_results(q, k, v, **opts, compute_dtype=None)
        check_close("finite rows out", out[keep], ref["out"][keep], pt["out"][keep])
    else:
        # v: at least every row that sees key 10 (in both query heads of kv head 0), at most the reference's
        # (all rows of batch 0, heads 0 and 1); lse untouched
        assert bad_out[0, :, 0][seen].all() and bad_out[0, :, 1][seen].all()
        assert not (bad_out & ~bad_ref).any()
        assert torch.equal(lse, clean[1])
    # rows that stay finite were never touched by the bad value: bitwise the clean run's
    # (except with an infinite key: a row whose score for it is -inf legitimately drops it, as the reference does)
    fin = ~bad_out
    if not (which == "k" and math.isinf(value)):
        assert torch.equal(out[fin], clean[0][fin])
    # other batch entries and the other key/value head group: out and all gradients bitwise unchanged
    for name, ours, ref_ in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), clean):
        assert torch.equal(ours[1], ref_[1]), f"{name}: batch entry 1 changed"
        head_dim = 0 if name == "lse" else 1   # lse (b, h, s); the others (b, s, h, d)
        other_group = (slice(None),) * head_dim + (slice(2, 4) if name in ("out", "lse", "dq") else slice(1, 2),)
        assert torch.equal(ours[0][other_group], ref_[0][other_group]), f"{name}: kv head group 1 changed"


def test_non_finite_values_stay_in_their_sequence(backend):
    """A NaN in one sequence of a packed batch touches no other sequence, forward or backward."""
    dtype, device = backend
    cu = torch.tensor([0, 13, 30, 41], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(13)
    base = [torch.randn(41, 2, 16, generator=g).to(device=device, dtype=dtype) for _ in range(3)]

    def run(poison):
        q, k, v = (x.clone() for x in base)
        if poison:
            k[20, 1, 0] = float("nan")
            v[25, 0, 5] = float("nan")
            q[15, 0, 2] = float("nan")
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        out = flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, causal=True)
        return (out.detach(),) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    clean, bad = run(False), run(True)
    assert not torch.isfinite(bad[0][13:30]).all()
    for c, b in zip(clean, bad):
        assert torch.equal(c[:13], b[:13]) and torch.equal(c[30:], b[30:])


# ------------------------------------------------------------------------------------------------
# softmax_scale = 0, seqlen 1, head dims at the limits


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(causal=True, window_size=(4, -1), softcap=3.0),
                                  dict(alibi=True)], ids=["full", "causal", "window-softcap", "alibi"])
def test_zero_softmax_scale(backend, opts):
    dtype, device = backend
    opts = dict(opts)
    sq, sk = 20, 33
    q, k, v = make_qkv(2, sq, sk, 4, 2, 16, dtype, device=device, seed=14)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(4, device=device) * 0.5
    run_and_compare(flash_attn_func, q, k, v, softmax_scale=0.0, name="scale 0", **opts)
    out, lse, dq, dk, dv = _grads(q, k, v, softmax_scale=0.0, **opts)
    assert (dq == 0).all() and (dk == 0).all()     # the scores do not depend on q or k at all
    if "alibi_slopes" not in opts:                 # uniform over the visible keys
        left, right = masks.window_bounds(opts.get("causal", False), opts.get("window_size", (-1, -1)))
        seen = masks.mask_matrix(sq, sk, left, right, device=device).double()           # (sq, sk)
        count = seen.sum(1)
        mean = torch.einsum("qk,bkhd->bqhd", seen / count[:, None], v.double().repeat_interleave(2, dim=2))
        torch.testing.assert_close(lse.double(), count.log().expand_as(lse), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.double(), mean, atol=4 * EPS[dtype], rtol=0)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 300), (300, 1)])
@pytest.mark.parametrize("d", [8, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_seqlen_one_and_headdim_limits(backend, sq, sk, d, causal):
    dtype, device = backend
    if device == "cpu" and os.environ["FLASHATTN_BACKEND"] == "triton" and max(sq, sk) * d > 300 * 8:
        pytest.skip("the interpreter is slow: 300 x 256 runs on the GPU tier")
    q, k, v = make_qkv(2, sq, sk, 2, 1, d, dtype, device=device, seed=sq + sk + d)
    run_and_compare(flash_attn_func, q, k, v, causal=causal, name=f"q{sq} k{sk} d{d}")
    if sk == 1 and (not causal or sq == 1):   # one key: out is v exactly, dk = 0 up to rounding
        out = flash_attn_func(q, k, v, causal=causal)
        assert torch.equal(out, v.expand_as(out))


# ------------------------------------------------------------------------------------------------
# subnormals


def test_subnormal_inputs(backend):
    """v (and q, k) scaled into the subnormal range of the dtype: the outputs are subnormal too and must be
    right to a few subnormal units, beyond what design.md's eps (relative to max(1, |ref|)) could see."""
    dtype, device = backend
    fi = torch.finfo(dtype)
    q, k, v = make_qkv(1, 24, 33, 2, 1, 16, torch.float32, seed=15)
    # fp16's subnormals are normal numbers in the fp32 math of every backend; bf16's are fp32-subnormal
    tiny = fi.tiny
    qs, ks, vs = ((x * tiny * 4).to(device=device, dtype=dtype) for x in (q, k, v))
    assert ((vs != 0) & (vs.abs() < tiny)).float().mean() > 0.1           # really subnormal
    out, lse, _ = flash_attn_func(qs, ks, vs, causal=True, return_attn_probs=True)
    ref, ref_lse = attention_ref(qs, ks, vs, causal=True)
    pt, _ = attention_ref(qs, ks, vs, causal=True, compute_dtype=None)
    sub_unit = tiny * fi.eps            # the spacing of subnormals
    flush_ok = device == "cuda" and dtype == torch.bfloat16   # fp32-subnormal math may flush to zero there
    atol = tiny if flush_ok else 4 * sub_unit
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * (pt.double() - ref).abs().max().item() + atol, (err, atol)
    assert torch.isfinite(lse).all() and (lse.double() - ref_lse).abs().max() < 1e-3
    assert out.abs().max() < 64 * tiny and (flush_ok or (out != 0).any())
