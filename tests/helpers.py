"""Shared test helpers: random inputs, the accuracy rule of design.md, and a run-and-compare driver.

Imported as ``from helpers import ...``: tests/conftest.py puts this directory on sys.path, so it
works whatever pytest's import mode (and from the Triton-kernel tests too).

The accuracy rule (from flash-attention's own tests)::

    max|ours - ref| <= 2 * max|pt - ref| + eps

``ref`` is the float64 reference, ``pt`` the same naive math in the inputs' dtype
(``attention_ref(..., compute_dtype=None)``; for gradients, autograd through it). A fast path may be
at most twice as wrong as the naive computation at the inputs' precision.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from flashattn.reference import attention_ref

# eps, the absolute slack of the rule, per dtype; multiplied by max(1, max|ref|) so that it is a
# relative slack for large values (gradients can reach tens) and an absolute one near 0.
# It exists for the cases where `pt` happens to be (nearly) exact, e.g. seqlen_k = 1 (out = v) or a
# tiny row: then 2·max|pt − ref| ≈ 0, yet `ours` must still round the exact result to its output
# dtype (up to u·|x|, u the unit roundoff) and may sum the row in another order (tiles).
#   float16:  u = 2^-11 ≈ 4.9e-4  -> 1e-3 ≈ 2u: one rounding of the output plus one more.
#   bfloat16: u = 2^-8  ≈ 3.9e-3  -> 8e-3 ≈ 2u, same reasoning.
#   float32:  u ≈ 6e-8; 1e-5 covers a different summation order over rows of thousands of keys
#             (error ~ sqrt(n)·u·|x|) with margin, and is still far below any real bug (a wrong
#             mask, scale or rescale shows up at 1e-2 .. 1).
#   float64:  1e-10, for the same reasons at double precision.
EPS: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 8e-3,
}


def make_qkv(batch: int, seqlen_q: int, seqlen_k: int, nheads: int, nheads_k: int, headdim: int,
             dtype: torch.dtype = torch.float32, device="cpu", requires_grad: bool = False,
             seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh standard-normal q (b, sq, h, d), k and v (b, sk, hk, d), flash_attn layout.

    Drawn in float32 on the CPU from a private generator (`seed`, or a random one) and then cast, so
    one seed gives the same values (up to rounding) for every dtype and device.
    """
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))

    def rand(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    q = rand(batch, seqlen_q, nheads, headdim)
    k = rand(batch, seqlen_k, nheads_k, headdim)
    v = rand(batch, seqlen_k, nheads_k, headdim)
    return q, k, v


def _fail(msg: str) -> None:
    raise AssertionError(msg)


def check_close(name: str, ours: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor,
                atol: Optional[float] = None, dtype: Optional[torch.dtype] = None,
                scale: Optional[float] = None) -> Tuple[float, float]:
    """Assert design.md's rule ``max|ours − ref| ≤ 2·max|pt − ref| + eps``; return (error, bound).

    ref: the float64 reference; pt: the naive math in the inputs' dtype.
    atol: eps to use; by default EPS[dtype] · max(1, scale), with dtype the precision the rule is
        judged at (default: pt's dtype, i.e. the inputs' dtype) and scale the magnitude of the
        computation (default: max|ref|; run_and_compare passes the largest gradient for gradients).
    Infinities (lse of rows that see no key) must sit at the same positions with the same sign in
    ours and ref; the finite ones are compared. A NaN in ours (or anywhere) always fails.
    """
    if tuple(ours.shape) != tuple(ref.shape) or tuple(pt.shape) != tuple(ref.shape):
        _fail(f"{name}: shapes differ: ours {tuple(ours.shape)}, ref {tuple(ref.shape)}, pt {tuple(pt.shape)}")
    o, r, p = (x.detach().to("cpu", torch.float64) for x in (ours, ref, pt))
    if torch.isnan(r).any():
        _fail(f"{name}: the reference has {int(torch.isnan(r).sum())} NaN(s): the test itself is broken")
    if torch.isnan(o).any():
        idx = tuple(torch.nonzero(torch.isnan(o))[0].tolist())
        _fail(f"{name}: ours has {int(torch.isnan(o).sum())} NaN(s) out of {o.numel()}, first at {idx}")
    inf_r, inf_o = torch.isinf(r), torch.isinf(o)
    same_inf = (inf_r == inf_o) & (~inf_r | (torch.sign(r) == torch.sign(o)))
    if not same_inf.all():
        idx = tuple(torch.nonzero(~same_inf)[0].tolist())
        _fail(f"{name}: infinities differ at {int((~same_inf).sum())} position(s), first at {idx}: "
              f"ours={o[idx].item()!r}, ref={r[idx].item()!r} (rows that see no key must give lse = -inf "
              "in both, and only those)")
    finite = ~inf_r
    if not finite.any():
        return 0.0, 0.0
    if not torch.isfinite(p[finite]).all():
        _fail(f"{name}: the baseline pt (naive math in the input dtype) is not finite where ref is: the "
              "rule would be vacuous; use smaller inputs for this test")
    diff = torch.where(finite, (o - r).abs(), torch.zeros_like(r))
    err = diff.max().item()
    pt_err = torch.where(finite, (p - r).abs(), torch.zeros_like(r)).max().item()
    ref_max = r[finite].abs().max().item()
    if atol is None:
        dt = dtype or pt.dtype
        atol = EPS.get(dt, 1e-5) * max(1.0, ref_max if scale is None else scale)
    bound = 2.0 * pt_err + atol
    if not err <= bound:   # `not <=` so that a NaN error also fails
        idx = tuple(torch.nonzero(diff == err)[0].tolist())
        _fail(f"{name}: max|ours - ref| = {err:.3e} > 2*max|pt - ref| + eps = 2*{pt_err:.3e} + {atol:.1e} "
              f"= {bound:.3e}; worst at index {idx}: ours={o[idx].item():.6g}, ref={r[idx].item():.6g}, "
              f"pt={p[idx].item():.6g}; max|ref| = {ref_max:.3g}, shape {tuple(r.shape)}")
    return err, bound


# ------------------------------------------------------------------------------------------------
# A flash_attn_func-like function from a backend module (forward/backward with explicit tile sizes).


def backend_attention(module, **block_kwargs) -> Callable:
    """flash_attn_func-like callable running `module.forward` / `module.backward` directly.

    block_kwargs (e.g. block_q=16, block_k=32) are passed to both, to exercise multi-block paths that
    the default tile sizes would reach only at large seqlens. Bypasses the public API's checks and
    the custom op (those have their own tests).
    """

    class _Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, scale, left, right, softcap, alibi):
            out, lse = module.forward(q, k, v, scale, left, right, softcap, alibi, **block_kwargs)
            ctx.save_for_backward(q, k, v, out, lse, alibi)
            ctx.opts = (scale, left, right, softcap)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse, alibi = ctx.saved_tensors
            dq, dk, dv = module.backward(dout, q, k, v, out, lse, *ctx.opts, alibi, **block_kwargs)
            return dq, dk, dv, None, None, None, None, None

    def attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  alibi_slopes=None, deterministic=False, return_attn_probs=False):
        assert dropout_p == 0.0
        scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
        left, right = window_size
        if causal:
            right = 0
        out, lse = _Attention.apply(q, k, v, scale, left, right, float(softcap), alibi_slopes)
        return (out, lse, None) if return_attn_probs else out

    return attention


# ------------------------------------------------------------------------------------------------
# run a candidate and compare it with the reference


def _grads(out, inputs: Sequence[torch.Tensor], dout) -> Tuple[torch.Tensor, ...]:
    if not out.requires_grad:   # e.g. empty inputs the candidate short-circuits
        return tuple(torch.zeros_like(x) for x in inputs)
    gs = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs))


def reference_results(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, softcap=0.0,
                      alibi_slopes=None, dout=None, compute_dtype: Optional[torch.dtype] = torch.float64,
                      num_sink_tokens: int = 0, global_tokens=None, block_mask=None,
                      **ref_kwargs) -> Dict[str, torch.Tensor]:
    """out, lse (and dq, dk, dv when dout is given) of attention_ref in `compute_dtype` (None = inputs' dtype).
    ref_kwargs: further attention_ref options (e.g. dropout_p, dropout_seed)."""
    dt = compute_dtype or q.dtype
    leaves = [x.detach().to(dt).requires_grad_(dout is not None) for x in (q, k, v)]
    with torch.enable_grad():
        out, lse = attention_ref(*leaves, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                 softcap=softcap, alibi_slopes=alibi_slopes, compute_dtype=compute_dtype,
                                 num_sink_tokens=num_sink_tokens, global_tokens=global_tokens,
                                 block_mask=block_mask, **ref_kwargs)
        res = {"out": out.detach(), "lse": lse.detach()}
        if dout is not None:
            res["dq"], res["dk"], res["dv"] = (g.detach() for g in _grads(out, leaves, dout.to(dt)))
    return res


def run_and_compare(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    window_size=(-1, -1), softmax_scale: Optional[float] = None, softcap: float = 0.0,
                    alibi_slopes: Optional[torch.Tensor] = None, num_sink_tokens: int = 0, global_tokens=None,
                    block_mask=None, check_grads: bool = True,
                    dout: Optional[torch.Tensor] = None, seed: int = 0, name: str = "",
                    **fn_kwargs) -> Dict[str, torch.Tensor]:
    """Run ``fn(q, k, v, ..., return_attn_probs=True) -> (out, lse[, probs])`` and check out, lse and
    (with check_grads) dq, dk, dv against the float64 reference with design.md's rule.

    fn: flash_attn_func, or anything with its signature (e.g. `backend_attention(module, block_q=16)`).
    q, k, v: inputs in the flash_attn layout, any strides (views are kept as they are: only their
        values are used for the reference).
    dout: the upstream gradient; by default standard normal from `seed`.
    fn_kwargs: passed to fn as they are.
    Also checks shapes and dtypes: out like q, lse (b, h, sq) float32 (float64 for float64 inputs), each gradient like its input.
    Returns our results {"out", "lse", "dq", "dk", "dv"}.
    """
    tag = f"{name}: " if name else ""
    # detach() keeps the strides: a non-contiguous view stays one
    qd, kd, vd = (x.detach().requires_grad_(check_grads) for x in (q, k, v))
    if num_sink_tokens:
        fn_kwargs = dict(fn_kwargs, num_sink_tokens=num_sink_tokens)
    if global_tokens is not None:
        fn_kwargs = dict(fn_kwargs, global_tokens=global_tokens)
    if block_mask is not None:
        fn_kwargs = dict(fn_kwargs, block_mask=block_mask)
    res = fn(qd, kd, vd, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
             alibi_slopes=alibi_slopes, return_attn_probs=True, **fn_kwargs)
    out, lse = res[0], res[1]
    b, sq, h, _ = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype, \
        f"{tag}out is {tuple(out.shape)} {out.dtype}, expected {tuple(q.shape)} {q.dtype}"
    lse_dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    assert tuple(lse.shape) == (b, h, sq) and lse.dtype == lse_dt, \
        f"{tag}lse is {tuple(lse.shape)} {lse.dtype}, expected {(b, h, sq)} {lse_dt}"

    if check_grads and dout is None:
        g = torch.Generator().manual_seed(seed + 1)
        dout = torch.randn(out.shape, generator=g, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    opts = dict(causal=causal, window_size=window_size, softmax_scale=softmax_scale, softcap=softcap,
                alibi_slopes=alibi_slopes, dout=dout if check_grads else None, num_sink_tokens=num_sink_tokens,
                global_tokens=global_tokens, block_mask=block_mask)
    ref = reference_results(q, k, v, compute_dtype=torch.float64, **opts)
    pt = reference_results(q, k, v, compute_dtype=None, **opts)

    ours = {"out": out.detach(), "lse": lse.detach()}
    if check_grads:
        grads = _grads(out, (qd, kd, vd), dout)
        for gname, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype, \
                f"{tag}{gname} is {tuple(g.shape)} {g.dtype}, expected {tuple(x.shape)} {x.dtype}"
            ours[gname] = g.detach()
    # eps of a gradient is relative to the largest of the three gradients, not to its own size: a gradient
    # can vanish exactly (dk when seqlen_k = 1, dq when each row sees one key: the softmax is constant),
    # and then the naive autograd gets an exact 0 by structure while P∘(dP − Δ) subtracts two equal
    # inner products of size |dO|·|V|, summed in different orders. Measured: 1.1e-5 in float32 at
    # seqlen 16, headdim 64, for a gradient that is exactly 0.
    grad_scale = max((ref[g].abs().max().item() for g in ("dq", "dk", "dv") if g in ref and ref[g].numel()),
                     default=None)
    for key in ours:
        # lse is float32 in ours but judged at the inputs' precision, like everything else
        check_close(f"{tag}{key}", ours[key], ref[key], pt[key], dtype=q.dtype,
                    scale=grad_scale if key.startswith("d") else None)
    return ours
