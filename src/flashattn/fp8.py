"""FP8 attention: quantizing q, k, v to float8 e4m3 with descale factors, the Hadamard rotation that
spreads outliers before quantizing, and an (experimental) training entry point.

The FP8 forward itself is `flash_attn_func(q8, k8, v8, q_descale=..., k_descale=..., v_descale=...)`
with float8_e4m3fn inputs (FlashAttention-3's names): the input stands for `x8.float() * descale`,
with descale float32 of shape (1,) (per tensor) or (batch, nheads_k) (per batch entry and kv head;
q's is per kv head too: the query heads of a GQA group share it).

    from flashattn import flash_attn_func, fp8
    x = fp8.quantize_qkv(q, k, v, granularity="head", rotate=True)
    out = flash_attn_func(x.q, x.k, x.v, causal=True, **x.descales())      # bf16 out

e4m3 numbers: 1 sign, 4 exponent, 3 mantissa bits; largest finite 448; normal numbers from 2^-6
with relative spacing 2^-3 (so rounding to nearest errs by at most 2^-4 relatively, the unit
roundoff U_E4M3); subnormals down to 2^-9 with absolute spacing 2^-9.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
U_E4M3 = 2.0 ** -4          # unit roundoff: |round(x) - x| <= U_E4M3 · |x| for normal x
E4M3_MIN_NORMAL = 2.0 ** -6
E4M3_SUBNORMAL_STEP = 2.0 ** -9

GRANULARITIES = ("tensor", "head")


def _check_bshd(name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (batch, seqlen, nheads, headdim) tensor, got {shape}")
    if not x.is_floating_point() or x.dtype == E4M3:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor to quantize, got {x.dtype}")


def quantize(x: torch.Tensor, granularity: str = "tensor",
             nheads_k: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x (batch, seqlen, nheads, headdim), any float dtype -> (x_fp8, descale).

    x_fp8: float8_e4m3fn, same shape; descale: float32, (1,) for granularity="tensor", (batch, nheads_k)
    for "head", such that x ≈ x_fp8.float() * descale (broadcast over the heads of a group).
    descale = amax / 448, amax the largest |x| of the tensor or of the (batch entry, head group), so
    the largest element maps to 448 and nothing saturates; an all-zero group gets descale 1.
    nheads_k: for q under grouped-query attention, the number of key/value heads: the
    nheads // nheads_k query heads of a group share one factor, as the kernels read one q descale
    per (batch, kv head). Default nheads (one factor per head).
    """
    _check_bshd("x", x)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    b, s, h, d = x.shape
    hk = h if nheads_k is None else nheads_k
    if not isinstance(hk, int) or hk <= 0 or h % hk:
        raise ValueError(f"nheads_k must be a positive divisor of nheads ({h}), got {nheads_k!r}")
    xf = x.detach().float()
    if granularity == "tensor":
        amax = xf.abs().amax().reshape(1) if xf.numel() else xf.new_zeros(1)
    else:   # one factor per (batch entry, kv head): over the seqlen, the heads of the group, the head dim
        xf = xf.reshape(b, s, hk, h // hk, d)
        amax = xf.abs().amax(dim=(1, 3, 4)) if xf.numel() else xf.new_zeros(b, hk)
    descale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    x8 = quantize_with(xf, descale if granularity == "tensor" else descale[:, None, :, None, None])
    return x8.reshape(x.shape), descale


def quantize_with(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """x (any shape, any float dtype) and a float32 descale broadcasting to it -> float8_e4m3fn x / descale,
    computed in float32, clamped to ±448 (values beyond 448 · descale saturate) and rounded to nearest even.
    The one definition of quantizing with a given descale: `quantize` (descale from amax) and the FP8 KV
    cache's append (descales fixed per sequence and kv head; `_append_kv` restates it in Triton)."""
    return (x.float() / descale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def dequantize(x8: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    """x_fp8 (batch, seqlen, nheads, headdim) and its descale ((1,) or (batch, nheads_k)) -> float32
    x_fp8 · descale: what the FP8 inputs stand for (the definition the PyTorch path computes with)."""
    b, s, h, d = x8.shape
    x = x8.float()
    if descale.numel() == 1:
        return x * descale.float().reshape(())
    hk = descale.shape[-1]
    return (x.reshape(b, s, hk, h // hk, d) * descale.float()[:, None, :, None, None]).reshape(b, s, h, d)


def hadamard_matrix(n: int, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """A random orthogonal (n, n) matrix R = diag(signs) · H_n / sqrt(n): H_n the Sylvester Hadamard
    matrix (entries ±1), signs ±1 drawn from `seed`. n must be a power of two.

    Rotating q and k by the same R leaves q kᵀ unchanged (R Rᵀ = I) but mixes every channel into
    every other with weights ±1/sqrt(n): an outlier channel of size a becomes n channels of size
    a/sqrt(n), which lowers amax (the quantization step) for everything else (FlashAttention-3's
    "incoherent processing")."""
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head dim (1, 2, 4, ..., 256), got {n}; "
                         "quantize without rotate=True, or pad the head dim with zeros to a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return (signs[:, None] * h / math.sqrt(n)).to(device=device, dtype=dtype)


def hadamard_rotate(q: torch.Tensor, k: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q R, k R) for the random orthogonal R = hadamard_matrix(headdim, seed): q kᵀ is unchanged (up to
    rounding), outlier channels are spread over all channels. q (b, sq, h, d), k (b, sk, hk, d); the
    results keep the inputs' dtypes (computed in float32, float64 for float64 inputs)."""
    _check_bshd("q", q)
    _check_bshd("k", k)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share one head dim, got {q.shape[-1]} and {k.shape[-1]}")
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    r = hadamard_matrix(q.shape[-1], seed, q.device, ct)
    return (q.to(ct) @ r).to(q.dtype), (k.to(ct) @ r).to(k.dtype)


class QuantizedQKV(NamedTuple):
    """q, k, v in float8_e4m3fn and their float32 descale factors ((1,) or (batch, nheads_k) each)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_descale: torch.Tensor
    k_descale: torch.Tensor
    v_descale: torch.Tensor

    def descales(self) -> dict:
        """{"q_descale": ..., "k_descale": ..., "v_descale": ...}, keyword arguments of flash_attn_func."""
        return {"q_descale": self.q_descale, "k_descale": self.k_descale, "v_descale": self.v_descale}


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, granularity: str = "tensor",
                 rotate: bool = False, seed: int = 0) -> QuantizedQKV:
    """Quantize q (b, sq, h, d), k, v (b, sk, hk, d) for the FP8 forward.

    granularity: "tensor" (descales of shape (1,)) or "head" ((batch, nheads_k); q's per kv-head group).
    rotate: first rotate q and k by hadamard_matrix(headdim, seed) (q kᵀ, hence the attention, is
    unchanged; v is not rotated, so the output needs no un-rotation).
    """
    _check_bshd("k", k)
    if rotate:
        q, k = hadamard_rotate(q.float() if q.dtype != torch.float64 else q,
                               k.float() if k.dtype != torch.float64 else k, seed)
    hk = k.shape[2]
    q8, qd = quantize(q, granularity, nheads_k=hk)
    k8, kd = quantize(k, granularity)
    v8, vd = quantize(v, granularity)
    return QuantizedQKV(q8, k8, v8, qd, kd, vd)


# ------------------------------------------------------------------------------------------------
# training (experimental)


class _FP8Attention(torch.autograd.Function):
    """Straight-through FP8 attention: forward with the FP8 inputs, gradients of the dequantized
    (rotated) inputs passed to the high-precision ones (the quantizer counts as the identity)."""

    @staticmethod
    def forward(ctx, q, k, v, options: dict):
        from . import api, ops

        x = quantize_qkv(q, k, v, options["granularity"], options["rotate"], options["seed"])
        # the public API's checks and dispatch, then the custom op (as flash_attn_func would call it)
        args = api._op_args(x.q, x.k, x.v, 0.0, options["softmax_scale"], options["causal"], options["window_size"],
                            options["softcap"], options["alibi_slopes"], num_sink_tokens=options["num_sink_tokens"],
                            descales=(x.q_descale, x.k_descale, x.v_descale), out_dtype=options["out_dtype"])
        out, lse = ops.fwd(*args)
        ctx.save_for_backward(x.q, x.k, x.v, out, lse)
        ctx.options = args[3:21]   # softmax_scale ... backend, descale: the tail of flashattn::bwd's arguments
        ctx.rotation = (q.shape[-1], options["seed"]) if options["rotate"] else None
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        from . import ops

        q8, k8, v8, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.bwd(dout.to(out.dtype), q8, k8, v8, out, lse, *ctx.options)
        if ctx.rotation is not None:   # q_rot = q R, so dL/dq = dL/dq_rot · Rᵀ (and likewise for k)
            r = hadamard_matrix(*ctx.rotation, device=dq.device)
            dq, dk = dq.float() @ r.T, dk.float() @ r.T
        return dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: Optional[float] = None,
              causal: bool = False, window_size=(-1, -1), softcap: float = 0.0, alibi_slopes=None,
              num_sink_tokens: int = 0, granularity: str = "head", rotate: bool = False, seed: int = 0,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """FP8 attention for training (EXPERIMENTAL): q (b, sq, h, d), k, v (b, sk, hk, d) in bf16/fp16/fp32,
    quantized here (quantize_qkv with granularity, rotate, seed), attended by the FP8 forward; returns
    out (b, sq, h, d) in out_dtype (default bf16).

    Backward: dq, dk, dv of the dequantized (and rotated) inputs, computed by the backward kernels
    reading the FP8 q, k, v (upcast exactly, fp32 accumulation) and the forward's out and lse,
    passed straight through the quantizer (and back through the rotation) to q, k, v, in their dtypes.
    It differs from the bf16 backward on the same data by the quantization of q, k, v and of P in the
    forward (README, FP8 section, for measured errors).
    """
    options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                   alibi_slopes=alibi_slopes, num_sink_tokens=num_sink_tokens, granularity=granularity,
                   rotate=rotate, seed=seed, out_dtype=out_dtype)
    return _FP8Attention.apply(q, k, v, options)
