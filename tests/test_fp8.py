"""FP8 attention (float8 e4m3 inputs with descale factors): quantization, the Hadamard rotation, the
PyTorch path, the Triton kernels under the interpreter, the argument checks; a GPU tier.

Error bounds (the reference is float64 attention on the *dequantized* inputs x8 · descale, which is
what FP8 inputs mean; so input quantization is no error here, only what the computation adds):

- PyTorch path: it dequantizes exactly in float32 (one rounding of x8 · descale, 2^-24 relative) and
  computes in float32, then rounds to out_dtype. So |ours - ref| <= u_out·|ref| + 1e-5·max(1, max|ref|),
  u_out the unit roundoff of the output (2^-8 bf16, 2^-11 fp16), 1e-5 the float32 slack of
  tests/helpers.py's EPS.
- Triton kernel: as above, plus the quantization of P for the P·V product. The kernel stores
  p̂_j = e4m3(256·p_j)/256 with p_j = exp(s_j - m) <= 1 (m the running max, l = Σ p_j computed from
  the unquantized p). For 256·p_j >= 2^-6 (a normal e4m3 number) rounding to nearest errs by at most
  U = 2^-4 relatively: |p̂_j - p_j| <= U·p_j; below, by at most half the subnormal step:
  |p̂_j - p_j| <= 2^-10 / 256 = 2^-18. The output row is Σ_j p̂_j v_j / l, so
      |ours_ic - ref_ic| <= U · Σ_j (p_j / l)|v_jc| + n_k · 2^-18 · max|v| / l + u_out·|ref_ic| + fp32 slack
  where Σ_j (p_j / l)|v_jc| is the attention of |v| (same probabilities): attention_ref(q, k, |v|).
  l >= 1 (the row max contributes exp(0)), and the running-max rescaling multiplies p̂ and l alike, so
  the bound holds blockwise. It is tight to within the distribution of rounding errors, and a wrong
  descale or a mis-scaled P breaks it by an order of magnitude (uniform instead of peaked rows).
  lse comes from the unquantized sums: float32 accuracy, |ours - ref| <= 1e-5·max(1, |ref|) + 1e-6·d.
- Backward (experimental): q, k, v are upcast exactly to dout's dtype, the products run in that
  dtype with fp32 accumulation, i.e. what the fp16 kernels do on those values; given the exact out and
  lse, it is held to design.md's rule against the naive fp16 computation on the same (fp16-exact)
  values, as every backward here.
"""
import os
import types
import zlib

import pytest
import torch

from helpers import check_close, reference_results

from flashattn import attention_ref, flash_attn_func, flash_attn_varlen_func, fp8, scaled_dot_product_attention
from flashattn.api import choose_backend

ON_GPU = torch.cuda.is_available()
interp = pytest.mark.skipif(ON_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="interpreter tier runs on machines without a GPU")
U_OUT = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
E4M3_MAX = 448.0


def _rand(*shape, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


def _qkv(b, sq, sk, h, hk, d, seed, device="cpu"):
    return (_rand(b, sq, h, d, seed=seed, device=device), _rand(b, sk, hk, d, seed=seed + 1, device=device),
            _rand(b, sk, hk, d, seed=seed + 2, device=device))


def _dequantized(x: fp8.QuantizedQKV):
    return tuple(fp8.dequantize(t, ds).double() for t, ds in zip(x[:3], x[3:]))


# ------------------------------------------------------------------------------------------------
# quantization and rotation


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_quantize_round_trip(granularity):
    """|dequantize(quantize(x)) - x| <= max(U·|x|, half the subnormal step · descale), elementwise."""
    b, s, h, d = 2, 33, 4, 16
    x = _rand(b, s, h, d, seed=1) * torch.exp(_rand(b, s, h, d, seed=2) * 2)   # values over many binades
    x[1, :, 3] *= 50.0                                                             # one loud head
    x8, descale = fp8.quantize(x, granularity, nheads_k=2)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape and descale.dtype == torch.float32
    assert descale.shape == ((1,) if granularity == "tensor" else (b, 2))
    ds_elem = (descale.expand(b, s, h, d) if granularity == "tensor"
               else descale[:, None, :, None, None].expand(b, s, 2, 2, d).reshape(b, s, h, d))
    err = (fp8.dequantize(x8, descale) - x).abs()
    bound = torch.maximum(fp8.U_E4M3 * x.abs(), fp8.E4M3_SUBNORMAL_STEP / 2 * ds_elem) * (1 + 1e-6)
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"
    # the largest element of each group maps to 448 exactly (the full range is used, nothing saturates)
    mags = x8.float().abs()
    if granularity == "tensor":
        assert mags.max().item() == E4M3_MAX
    else:
        assert (mags.reshape(b, s, 2, 2, d).amax(dim=(1, 3, 4)) == E4M3_MAX).all()
    # per-head scaling keeps the quiet heads precise: their error does not grow with the loud head
    if granularity == "head":
        quiet = (fp8.dequantize(x8, descale) - x)[0].abs().max().item()
        assert quiet <= fp8.U_E4M3 * x[0].abs().max().item()


def test_quantize_zero_and_errors():
    x8, ds = fp8.quantize(torch.zeros(1, 4, 2, 8), "head")
    assert (ds == 1).all() and (x8.float() == 0).all()
    with pytest.raises(ValueError, match="granularity"):
        fp8.quantize(torch.zeros(1, 4, 2, 8), "channel")
    with pytest.raises(ValueError, match="nheads_k"):
        fp8.quantize(torch.zeros(1, 4, 6, 8), "head", nheads_k=4)
    with pytest.raises(ValueError, match=r"\(batch, seqlen, nheads, headdim\)"):
        fp8.quantize(torch.zeros(4, 8))


def test_hadamard_is_orthogonal_and_keeps_qk():
    for n in (1, 2, 64, 256):
        r = fp8.hadamard_matrix(n, seed=5, dtype=torch.float64)
        torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        assert torch.allclose(r.abs(), torch.full_like(r, n ** -0.5))
    assert not torch.equal(fp8.hadamard_matrix(64, 1), fp8.hadamard_matrix(64, 2))   # the seed draws the signs
    q, k = _rand(2, 9, 4, 64, seed=3).double(), _rand(2, 11, 2, 64, seed=4).double()
    qr, kr = fp8.hadamard_rotate(q, k, seed=7)
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2))
    sr = torch.einsum("bihd,bjhd->bhij", qr, kr.repeat_interleave(2, 2))
    torch.testing.assert_close(sr, s, atol=1e-12, rtol=1e-12)
    assert qr.dtype == q.dtype and not torch.allclose(qr, q)
    # an outlier channel is spread over all channels: amax drops by sqrt(d)
    one_hot = torch.zeros(1, 1, 1, 64, dtype=torch.float64)
    one_hot[..., 5] = 100.0
    spread, _ = fp8.hadamard_rotate(one_hot, one_hot, seed=0)
    assert spread.abs().max().item() == pytest.approx(100.0 / 8)
    with pytest.raises(ValueError, match="power-of-two"):
        fp8.hadamard_matrix(96)


def test_rotation_lowers_error_with_outlier_channels(use_backend):
    """Outlier channels in q and k (size 50, as in LLM activations) set the quantization step of every
    channel; rotated, they are spread and the FP8 error (of the definition, the PyTorch path) drops."""
    use_backend("torch")
    b, s, h, d = 1, 128, 2, 64
    q, k, v = _qkv(b, s, s, h, h, d, seed=20)
    q[..., :2] *= 50.0
    k[..., :2] *= 50.0
    ref = attention_ref(q.double(), k.double(), v.double(), softmax_scale=0.02)[0]
    errs = {}
    for rotate in (False, True):
        x = fp8.quantize_qkv(q, k, v, "head", rotate=rotate, seed=1)
        out = flash_attn_func(x.q, x.k, x.v, softmax_scale=0.02, out_dtype=torch.float16, **x.descales())
        errs[rotate] = ((out.double() - ref).norm() / ref.norm()).item()
    assert errs[True] < 0.5 * errs[False], errs


# ------------------------------------------------------------------------------------------------
# the PyTorch path (the definition) and the reference backend


TORCH_CASES = {   # b, sq, sk, h, hk, d, causal, window
    "s1": (1, 1, 1, 1, 1, 64, False, (-1, -1)),
    "s97-d64-causal-gqa": (2, 97, 97, 4, 2, 64, True, (-1, -1)),
    "q40-k130-d128": (1, 40, 130, 2, 1, 128, False, (-1, -1)),
    "q130-k40-d256-causal-empty-rows": (1, 130, 40, 2, 2, 256, True, (-1, -1)),
    "window": (1, 70, 60, 2, 1, 64, False, (7, 3)),
}


def _check_definition(out, lse, ref, rlse, out_dtype, name):
    assert out.dtype == out_dtype and lse.dtype == torch.float32
    bound = U_OUT[out_dtype] * ref.abs() + 1e-5 * max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{name}: out error {err.max().item():.3g} over its bound"
    check_close(f"{name}: lse", lse, rlse, rlse, atol=1e-5 * max(1.0, rlse[torch.isfinite(rlse)].abs().max().item()))


@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("case", list(TORCH_CASES))
def test_torch_path_is_attention_of_dequantized_inputs(case, granularity, use_backend):
    b, sq, sk, h, hk, d, causal, window = TORCH_CASES[case]
    use_backend("torch")
    x = fp8.quantize_qkv(*_qkv(b, sq, sk, h, hk, d, seed=zlib.crc32(case.encode()) % 1000), granularity)
    out_dtype = torch.float16 if granularity == "head" else torch.bfloat16
    out, lse, _ = flash_attn_func(x.q, x.k, x.v, causal=causal, window_size=window, return_attn_probs=True,
                                  out_dtype=out_dtype, **x.descales())
    ref, rlse = attention_ref(*_dequantized(x), causal=causal, window_size=window)
    _check_definition(out, lse, ref, rlse, out_dtype, case)


def test_reference_backend_and_default_out_dtype(use_backend):
    use_backend("reference")
    x = fp8.quantize_qkv(*_qkv(1, 30, 30, 2, 1, 64, seed=3), "head")
    out = flash_attn_func(x.q, x.k, x.v, causal=True, **x.descales())
    assert out.dtype == torch.bfloat16   # the default out_dtype
    ref = attention_ref(*_dequantized(x), causal=True)[0]
    assert ((out.double() - ref).abs() <= U_OUT[torch.bfloat16] * ref.abs() + 1e-6).all()


def test_descale_none_means_one(use_backend):
    use_backend("torch")
    q, k, v = (t.clamp(-400, 400).to(torch.float8_e4m3fn) for t in _qkv(1, 20, 20, 2, 2, 32, seed=4))
    ones = torch.ones(1)
    a = flash_attn_func(q, k, v, causal=True)
    b = flash_attn_func(q, k, v, causal=True, q_descale=ones, k_descale=ones, v_descale=ones)
    assert torch.equal(a, b)


def test_v_with_contiguous_keys_is_accepted(use_backend):
    """FP8 v may come with its seqlen axis contiguous (the layout the kernel reads); same result."""
    use_backend("torch")
    x = fp8.quantize_qkv(*_qkv(1, 33, 33, 2, 1, 64, seed=5), "head")
    vt = x.v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert vt.stride(1) == 1 and torch.equal(vt.float(), x.v.float())
    a = flash_attn_func(x.q, x.k, x.v, causal=True, **x.descales())
    assert torch.equal(flash_attn_func(x.q, x.k, vt, causal=True, **x.descales()), a)


def test_training_entry_point_is_straight_through(use_backend):
    """fp8.attention: gradients of the dequantized (rotated) inputs, mapped back through Rᵀ.
    Tolerance: out is bf16 and enters Δ = rowsum(dO ∘ O); dO is rounded to bf16 in both computations, so
    the gradients differ by a few bf16 roundings relative to their size: 4·2^-8·max|g|."""
    use_backend("torch")
    q, k, v = _qkv(2, 30, 30, 4, 2, 64, seed=6)
    w = _rand(2, 30, 4, 64, seed=9).to(torch.bfloat16)
    for rotate in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fp8.attention(*leaves, causal=True, rotate=rotate, seed=3)
        assert out.dtype == torch.bfloat16
        grads = torch.autograd.grad(out, leaves, w)
        assert all(g.dtype == torch.float32 for g in grads)
        x = fp8.quantize_qkv(q, k, v, "head", rotate=rotate, seed=3)
        ref_leaves = [t.requires_grad_() for t in _dequantized(x)]
        ref_out = attention_ref(*ref_leaves, causal=True)[0]
        expected = list(torch.autograd.grad(ref_out, ref_leaves, w.double()))
        if rotate:
            r = fp8.hadamard_matrix(64, 3, dtype=torch.float64)
            expected[0], expected[1] = expected[0] @ r.T, expected[1] @ r.T
        for name, g, e in zip("qkv", grads, expected):
            err = (g.double() - e).abs().max().item()
            assert err <= 4 * 2 ** -8 * e.abs().max().item(), (rotate, name, err)


def test_custom_op_opcheck_fp8():
    x = fp8.quantize_qkv(*_qkv(1, 19, 23, 4, 2, 32, seed=7), "head")
    descale = torch.stack([x.q_descale, x.k_descale, x.v_descale], -1).contiguous()
    args = (x.q, x.k, x.v, 0.2, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch",
            descale, torch.float16)
    torch.library.opcheck(torch.ops.flashattn.fwd.default, args, test_utils=("test_faketensor",))
    out, lse = torch.ops.flashattn.fwd(*args)
    dout = _rand(*out.shape, seed=8).to(torch.float16)
    bargs = (dout, x.q, x.k, x.v, out, lse, 0.2, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None,
             None, "torch", descale)
    torch.library.opcheck(torch.ops.flashattn.bwd.default, bargs, test_utils=("test_faketensor",))
    assert all(g.dtype == torch.float16 for g in torch.ops.flashattn.bwd(*bargs))


def test_torch_compile_fullgraph_fp8(use_backend):
    """The custom op with its descale tensor traces without graph breaks (the PyTorch path here)."""
    use_backend("torch")
    try:
        probe = torch.compile(lambda t: torch.sin(t) * 2 + 1, fullgraph=True)
        assert torch.allclose(probe(torch.ones(4)), torch.sin(torch.ones(4)) * 2 + 1)
    except Exception:   # no C++ toolchain for inductor, or similar: not what this test is about
        pytest.skip("torch.compile does not work on this machine")
    torch._dynamo.reset()
    x = fp8.quantize_qkv(*_qkv(1, 20, 20, 4, 2, 32, seed=16), "head")

    def f(q, k, v, qd, kd, vd):
        return flash_attn_func(q, k, v, causal=True, q_descale=qd, k_descale=kd, v_descale=vd) * 2

    assert torch.equal(torch.compile(f, fullgraph=True)(*x), f(*x))


# ------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter

INTERP_CASES = {   # b, sq, sk, h, hk, d, causal, window, softcap, alibi
    "s33-d64-causal-mqa": (1, 33, 33, 2, 1, 64, True, (-1, -1), 0.0, False),
    "q17-k40-d32-gqa": (2, 17, 40, 4, 2, 32, False, (-1, -1), 0.0, False),
    "q40-k17-causal-empty-rows": (1, 40, 17, 2, 2, 64, True, (-1, -1), 0.0, False),
    "s20-d128": (1, 20, 20, 2, 2, 128, True, (-1, -1), 0.0, False),
    "s16-d256": (1, 16, 16, 1, 1, 256, False, (-1, -1), 0.0, False),
    "d40-window-softcap-alibi": (1, 37, 45, 2, 1, 40, False, (9, 4), 5.0, True),
}


def _score_error(x) -> float:
    """Bound on |score error| from FP8 tensor cores that keep ~14 bits while accumulating (Hopper; DeepSeek-V3
    report, sec. 3.3.2): each of the <= 8 wgmma steps of q·kᵀ (k = 32 each, head dim <= 256) may lose
    2^-13 (14 bits kept) of the partial sum, itself <= Σ_d |q_d k_d|: 8 · 2^-13 · scale · max_ij Σ_d |q_id| |k_jd|."""
    qq, kk, _ = _dequantized(x)
    group = qq.shape[2] // kk.shape[2]
    sums = torch.einsum("bihd,bjhd->bhij", qq.abs(), kk.abs().repeat_interleave(group, 2))
    return 8 * 2.0 ** -13 * qq.shape[-1] ** -0.5 * sums.max().item()


def _p_quantization_bound(x, ref, out_dtype, sk, tensor_cores=False, **opts):
    """Elementwise bound of the module docstring: U · attention(|v|) + underflow + output rounding + slack.
    tensor_cores (GPU): the probabilities also carry the score error e (factor exp(±e) <= 1 ± 2e) and each
    block's P·V product (<= 4 wgmma steps) loses <= 4 · 2^-13 of its partial sums: (U + 2e + 2^-11) · attention(|v|).
    opts: the attention_ref options of the call (masks, softcap, ALiBi)."""
    qq, kk, vv = _dequantized(x)
    p_abs_v = attention_ref(qq, kk, vv.abs(), **opts)[0]
    vmax = vv.abs().max().item()
    rel = fp8.U_E4M3 + ((2 * _score_error(x) + 2.0 ** -11) if tensor_cores else 0.0)
    return rel * p_abs_v + sk * 2.0 ** -18 * vmax + U_OUT[out_dtype] * ref.abs() + 1e-5 * vmax


@interp
@pytest.mark.parametrize("case", list(INTERP_CASES))
def test_interpreter_fp8_forward(case, use_backend):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi = INTERP_CASES[case]
    use_backend("triton")
    seed = zlib.crc32(case.encode()) % 1000
    x = fp8.quantize_qkv(*_qkv(b, sq, sk, h, hk, d, seed=seed), "head" if hk > 1 else "tensor")
    slopes = torch.rand(h, generator=torch.Generator().manual_seed(seed)) * 0.3 if alibi else None
    out, lse, _ = flash_attn_func(x.q, x.k, x.v, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes, return_attn_probs=True, out_dtype=torch.float16,
                                  **x.descales())
    ref, rlse = attention_ref(*_dequantized(x), causal=causal, window_size=window, softcap=softcap,
                              alibi_slopes=slopes)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    bound = _p_quantization_bound(x, ref, torch.float16, sk, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), (f"{case}: {(err > bound).sum().item()} elements over the bound; worst "
                                  f"excess {(err - bound).max().item():.3g}, max error {err.max().item():.3g}")
    assert err.max() > 0   # P is quantized: the kernel is not the definition
    check_close(f"{case}: lse", lse, rlse, rlse, atol=1e-5 * max(1.0, rlse[torch.isfinite(rlse)].abs().max().item()))


try:   # a kernel applying the forward's P cast (the interpreter runs it with the module's globals)
    import triton
    import triton.language as tl

    from flashattn.backends.triton.kernels import _to_e4m3

    @triton.jit
    def _cast_p(X, Y, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(Y + r, _to_e4m3(tl.load(X + r), True))
except ImportError:   # no triton: the interpreter tests skip
    pass


@interp
def test_interpreter_fp8_forward_sinks(use_backend):
    """Sliding window with attention sinks (the fourth loop phase) in the FP8 case."""
    use_backend("triton")
    x = fp8.quantize_qkv(*_qkv(1, 50, 50, 2, 1, 32, seed=17), "tensor")
    opts = dict(causal=True, window_size=(8, 0), num_sink_tokens=4)
    out = flash_attn_func(x.q, x.k, x.v, out_dtype=torch.float16, **opts, **x.descales())
    ref = attention_ref(*_dequantized(x), **opts)[0]
    assert ((out.double() - ref).abs() <= _p_quantization_bound(x, ref, torch.float16, 50, **opts)).all()


@interp
def test_interpreter_p_cast_rounds_to_nearest_even():
    """kernels._to_e4m3 under the interpreter (ROUND_P) equals torch's float32 -> e4m3 cast on
    P's range [0, 256]: normals, subnormals, ties, values that round up into the next binade."""
    grid = torch.tensor([0.0, 2.0 ** -10, 2.0 ** -9, 3 * 2.0 ** -10, 2.0 ** -6, 125.1, 126.0, 127.9, 240.0, 248.0,
                         255.9, 256.0, 17.0, 19.0, 0.99999994])
    x = torch.cat([grid, torch.rand(4096 - grid.numel(), generator=torch.Generator().manual_seed(0)) ** 6 * 256])
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    _cast_p[(1,)](x, y, N=x.numel())
    assert torch.equal(y.float(), x.to(torch.float8_e4m3fn).float())


@interp
def test_interpreter_fp8_small_probabilities_keep_precision(use_backend):
    """A row whose mass sits on many equal small probabilities (p = 0.0035 of the row max): as e4m3
    subnormals (spacing 2^-9) they would all round to 0.0039, +12% each, the same way; P is scaled by
    256 before its cast so that they are normal numbers (0.896 -> 0.875, -2.3%), within the bound."""
    use_backend("triton")
    b, sq, sk, h, d = 1, 16, 256, 1, 32
    g = torch.Generator().manual_seed(21)
    q = torch.zeros(b, sq, h, d)
    q[..., 0] = 1.0
    k = torch.zeros(b, sk, h, d)
    k[:, 1:, :, 0] = -5.655   # exp(-5.655) = 0.0035; key 0 (score 0) is the row max, in the first block
    v = 1.0 + 0.05 * torch.randn(b, sk, h, d, generator=g)
    v[:, 0] = 0.0   # so that attention(|v|), hence the bound, is not inflated by key 0
    x = fp8.quantize_qkv(q, k, v, "tensor")
    out = flash_attn_func(x.q, x.k, x.v, softmax_scale=1.0, out_dtype=torch.float16, **x.descales())
    qq, kk, vv = _dequantized(x)
    ref = attention_ref(qq, kk, vv, softmax_scale=1.0)[0]
    bound = (fp8.U_E4M3 * attention_ref(qq, kk, vv.abs(), softmax_scale=1.0)[0] + sk * 2.0 ** -18 * vv.abs().max()
             + U_OUT[torch.float16] * ref.abs() + 1e-5 * vv.abs().max())
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.min().item():.3g}"


@interp
def test_interpreter_fp8_forward_v_keys_contiguous_and_gqa_descale(use_backend):
    """v given with its keys contiguous (no copy in the launcher) gives the same bits; the kernel reads
    the descale of each (batch, kv head): different factors per head are honoured."""
    use_backend("triton")
    q, k, v = _qkv(2, 24, 24, 4, 2, 64, seed=11)
    k[:, :, 1] *= 30.0
    v[1] *= 0.01
    x = fp8.quantize_qkv(q, k, v, "head")
    assert x.k_descale[0, 1] > 10 * x.k_descale[0, 0] and x.v_descale[1, 0] < 0.1 * x.v_descale[0, 0]
    out = flash_attn_func(x.q, x.k, x.v, causal=True, out_dtype=torch.float16, **x.descales())
    vt = x.v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(flash_attn_func(x.q, x.k, vt, causal=True, out_dtype=torch.float16, **x.descales()), out)
    ref = attention_ref(*_dequantized(x), causal=True)[0]
    bound = _p_quantization_bound(x, ref, torch.float16, 24, causal=True)
    assert ((out.double() - ref).abs() <= bound).all()


@interp
@pytest.mark.parametrize("case", [(2, 24, 40, 4, 2, 64), (1, 33, 17, 2, 2, 32)], ids=["gqa", "odd"])
def test_interpreter_fp8_forward_v_as_given(case, use_backend, monkeypatch):
    """fp8_v_copy = False: v read as it is (head dim contiguous, tiles transposed on chip) gives the bits of the
    keys-contiguous copy."""
    from flashattn.backends import triton as tb
    use_backend("triton")
    b, sq, sk, h, hk, d = case
    x = fp8.quantize_qkv(*_qkv(b, sq, sk, h, hk, d, seed=sq), "head")
    out = flash_attn_func(x.q, x.k, x.v, causal=True, out_dtype=torch.float16, **x.descales())
    monkeypatch.setattr(tb, "fp8_v_copy", False)
    read = []
    monkeypatch.setattr(tb, "_v_keys_contiguous", lambda v: read.append(v) or v)
    assert torch.equal(flash_attn_func(x.q, x.k, x.v, causal=True, out_dtype=torch.float16, **x.descales()), out)
    assert not read   # no copy was made


@interp
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_interpreter_fp8_backward(causal, use_backend):
    """The FP8 backward kernels (experimental), given the exact out and lse, against the rule of
    design.md with the naive fp16 computation on the same values as baseline. The descales are powers
    of two, so that the dequantized inputs are exactly fp16 numbers and that baseline is well defined."""
    use_backend("triton")
    b, s, h, hk, d = 1, 40, 4, 2, 64
    x = fp8.quantize_qkv(*_qkv(b, s, s, h, hk, d, seed=12), "head")
    pow2 = [torch.exp2(torch.ceil(torch.log2(t))) for t in x[3:]]   # >= the descale: nothing exceeds 448
    x8 = [(fp8.dequantize(t, ds) / p.repeat_interleave(t.shape[2] // p.shape[1], 1)[:, None, :, None]).to(
        torch.float8_e4m3fn) for t, ds, p in zip(x[:3], x[3:], pow2)]
    exact = [fp8.dequantize(t, p) for t, p in zip(x8, pow2)]
    dout = _rand(b, s, h, d, seed=13).to(torch.float16)
    opts = dict(causal=causal, dout=dout)
    ref = reference_results(*exact, compute_dtype=torch.float64, **opts)
    pt = reference_results(*(t.to(torch.float16) for t in exact), compute_dtype=None, **opts)
    assert all(torch.equal(t.to(torch.float16).float(), t) for t in exact)   # fp16-exact inputs
    from flashattn.backends import triton as triton_backend
    descale = torch.stack([p.expand(b, hk) for p in pow2], -1).contiguous()
    out, lse = ref["out"].to(torch.float16), ref["lse"].float()
    dq, dk, dv = triton_backend.backward(dout, *x8, out, lse, d ** -0.5, -1, 0 if causal else -1, descale=descale)
    scale = max(ref[g].abs().max().item() for g in ("dq", "dk", "dv"))
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert g.dtype == torch.float16
        check_close(name, g, ref[name], pt[name], dtype=torch.float16, scale=scale)


# ------------------------------------------------------------------------------------------------
# errors and dispatch


def _fp8_inputs():
    return fp8.quantize_qkv(*_qkv(2, 8, 8, 4, 2, 32, seed=14), "head")


def test_errors_name_the_argument_and_the_fix():
    x = _fp8_inputs()
    q, k, v = _qkv(2, 8, 8, 4, 2, 32, seed=14)
    with pytest.raises(ValueError, match="q_descale is given but q, k, v are torch.float32.*fp8.quantize"):
        flash_attn_func(q, k, v, q_descale=torch.ones(1))
    with pytest.raises(ValueError, match="out_dtype=torch.float16 applies to float8_e4m3fn inputs"):
        flash_attn_func(q, k, v, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_dtype must be torch.bfloat16 or torch.float16"):
        flash_attn_func(x.q, x.k, x.v, out_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"k_descale must have shape \(1,\).*\(2, 2\).*got \(4,\)"):
        flash_attn_func(x.q, x.k, x.v, k_descale=torch.ones(4))
    with pytest.raises(ValueError, match=r"q_descale must have shape"):
        flash_attn_func(x.q, x.k, x.v, q_descale=torch.ones(2, 4))   # per query head: FA3 wants per kv head
    with pytest.raises(TypeError, match=r"v_descale must have dtype torch.float32.*\.float\(\)"):
        flash_attn_func(x.q, x.k, x.v, v_descale=torch.ones(1, dtype=torch.float64))
    with pytest.raises(TypeError, match="v_descale must be a float32 tensor"):
        flash_attn_func(x.q, x.k, x.v, v_descale=0.5)
    with pytest.raises(TypeError, match="must share one dtype"):
        flash_attn_func(x.q, k, v)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        flash_attn_func(*(t.float().to(torch.float8_e5m2) for t in x[:3]))
    for kwargs, what in ((dict(dropout_p=0.1), "dropout_p"), (dict(global_tokens=[0]), "global_tokens")):
        with pytest.raises(NotImplementedError, match=f"{what}.*float8_e4m3fn"):
            flash_attn_func(x.q, x.k, x.v, **kwargs)
    q8 = x.q.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"requires grad.*flashattn.fp8.attention"):
        flash_attn_func(q8, x.k, x.v)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    with pytest.raises(TypeError, match="q is float8_e4m3fn: FP8 attention is supported by flash_attn_func"):
        flash_attn_varlen_func(x.q.flatten(0, 1), x.k.flatten(0, 1), x.v.flatten(0, 1), cu, cu, 8, 8)
    with pytest.raises(TypeError, match="query is float8_e4m3fn"):
        scaled_dot_product_attention(x.q.transpose(1, 2), x.k.transpose(1, 2), x.v.transpose(1, 2), enable_gqa=True)


def test_dispatch_needs_fp8_tensor_cores(monkeypatch):
    """CUDA float8 tensors: Triton on sm_89+, the PyTorch path below; forcing Triton there names the fix."""
    import flashattn.api as api

    fake = types.SimpleNamespace(is_cuda=True, dtype=torch.float8_e4m3fn, device=torch.device("cuda", 0))
    monkeypatch.setattr(api, "triton_available", lambda: True)
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(major=9, minor=0))
    assert choose_backend(fake) == "triton"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(major=8, minor=0))
    assert choose_backend(fake) == "torch"
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    with pytest.raises(ValueError, match="sm_89 or newer.*sm_80.*FLASHATTN_BACKEND=torch"):
        choose_backend(fake)


# ------------------------------------------------------------------------------------------------
# the accuracy report


def test_accuracy_report_on_cpu(tmp_path):
    """benchmarks/fp8_accuracy.py at a small size on the PyTorch path: it runs, writes its JSON, and its
    numbers have the expected order (3 mantissa bits against bf16's 8; the rotation helps outliers)."""
    import json

    from flashattn.bench import fp8_accuracy

    path = tmp_path / "fp8.json"
    assert fp8_accuracy.main(["--device", "cpu", "--backend", "torch", "--seqlen", "128", "--heads", "2", "--hdim",
                              "64", "--json", str(path)]) == 0
    (run,) = json.loads(path.read_text())["runs"]
    fwd, bwd = run["forward"], run["backward"]
    for kind in fp8_accuracy.DATA:
        assert 3 * fwd[kind]["bf16"] < fwd[kind]["fp8 head"] < 1.0, (kind, fwd[kind])
    assert fwd["outlier channels"]["fp8 head + rot"] < 0.5 * fwd["outlier channels"]["fp8 head"]
    assert set(bwd) == {"bf16", "fp8 head", "fp8 head + rot", "fp8 head vs bf16"}
    assert all(3 * bwd["bf16"][g] < bwd["fp8 head"][g] < 1.0 for g in ("dq", "dk", "dv")), bwd
    kv = run["kvcache"]   # decoding over an FP8 cache: e4m3's error on K and V only
    assert all(3 * kv["bf16"] < kv[c] < 0.2 for c in ("fp8 tensor", "fp8 head")), kv


def test_bench_fp8_accuracy_option_runs_the_report(monkeypatch):
    from flashattn import bench
    from flashattn.bench import fp8_accuracy

    seen = []
    monkeypatch.setattr(fp8_accuracy, "main", lambda argv: seen.append(argv) or 0)
    assert bench.main(["--fp8-accuracy", "--device", "cpu", "--json", "x.json"]) == 0
    assert seen == [["--device", "cpu", "--seed", "0", "--json", "x.json"]]


# ------------------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")

GPU_CASES = [(2, s, s, 8, 2, d, causal) for s in (1, 17, 128, 1000) for d in (64, 128, 256) for causal in (False, True)]
GPU_CASES += [(1, 4096, 4096, 4, 4, 128, True), (1, 113, 1025, 4, 1, 64, True), (1, 1025, 113, 4, 1, 256, True)]


@gpu
@needs_cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_gpu_fp8_forward(case, out_dtype, use_backend):
    b, sq, sk, h, hk, d, causal = case
    use_backend("triton")
    x = fp8.quantize_qkv(*_qkv(b, sq, sk, h, hk, d, seed=sq + d, device="cuda"), "head")
    assert choose_backend(x.q) == "triton"
    out, lse, _ = flash_attn_func(x.q, x.k, x.v, causal=causal, return_attn_probs=True, out_dtype=out_dtype,
                                  **x.descales())
    ref, rlse = attention_ref(*_dequantized(x), causal=causal)
    bound = _p_quantization_bound(x, ref, out_dtype, sk, tensor_cores=True, causal=causal)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{(err > bound).sum().item()} over the bound, worst excess {(err - bound).max():.3g}"
    lse_tol = _score_error(x) + 1e-5 * max(1.0, rlse[torch.isfinite(rlse)].abs().max().item())
    check_close("lse", lse, rlse, rlse, atol=lse_tol)


@gpu
@needs_cuda
def test_gpu_fp8_keys_contiguous_v_and_compile(use_backend):
    use_backend("triton")
    x = fp8.quantize_qkv(*_qkv(2, 1000, 1000, 8, 2, 128, seed=1, device="cuda"), "head")
    out = flash_attn_func(x.q, x.k, x.v, causal=True, **x.descales())
    vt = x.v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert torch.equal(flash_attn_func(x.q, x.k, vt, causal=True, **x.descales()), out)
    compiled = torch.compile(lambda q, k, v, a, b, c: flash_attn_func(q, k, v, causal=True, q_descale=a, k_descale=b,
                                                                          v_descale=c), fullgraph=True)
    assert torch.equal(compiled(x.q, x.k, x.v, *x[3:]), out)


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fp8_v_as_given(d, use_backend, monkeypatch):
    """fp8_v_copy = False (V tiles transposed on chip) against the reference, as test_gpu_fp8_forward."""
    from flashattn.backends import triton as tb
    use_backend("triton")
    monkeypatch.setattr(tb, "fp8_v_copy", False)
    x = fp8.quantize_qkv(*_qkv(2, 1000, 1024, 8, 2, d, seed=d, device="cuda"), "head")
    out = flash_attn_func(x.q, x.k, x.v, causal=True, **x.descales())
    ref = attention_ref(*_dequantized(x), causal=True)[0]
    bound = _p_quantization_bound(x, ref, torch.bfloat16, 1024, tensor_cores=True, causal=True)
    err = (out.double() - ref).abs()
    assert (err <= bound).all(), f"{(err > bound).sum().item()} over the bound, worst excess {(err - bound).max():.3g}"


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_fp8_backward(d, use_backend):
    """As the interpreter test: exact out and lse, power-of-two descales, design.md's rule vs fp16."""
    use_backend("triton")
    b, s, h, hk = 2, 1000, 4, 2
    x = fp8.quantize_qkv(*_qkv(b, s, s, h, hk, d, seed=d, device="cuda"), "tensor")
    p2 = [torch.exp2(torch.ceil(torch.log2(t))) for t in x[3:]]
    x8 = [(fp8.dequantize(t, ds) / p).to(torch.float8_e4m3fn) for t, ds, p in zip(x[:3], x[3:], p2)]
    exact = [fp8.dequantize(t, p) for t, p in zip(x8, p2)]
    dout = _rand(b, s, h, d, seed=3, device="cuda").to(torch.float16)
    ref = reference_results(*exact, causal=True, dout=dout, compute_dtype=torch.float64)
    pt = reference_results(*(t.to(torch.float16) for t in exact), causal=True, dout=dout, compute_dtype=None)
    from flashattn.backends import triton as triton_backend
    descale = torch.stack([p.expand(b, hk) for p in p2], -1).contiguous()
    grads = triton_backend.backward(dout, *x8, ref["out"].to(torch.float16), ref["lse"].float(), d ** -0.5, -1, 0,
                                    descale=descale)
    scale = max(ref[g].abs().max().item() for g in ("dq", "dk", "dv"))
    for name, g in zip(("dq", "dk", "dv"), grads):
        check_close(name, g, ref[name], pt[name], dtype=torch.float16, scale=scale)
