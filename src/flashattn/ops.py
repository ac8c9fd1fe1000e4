"""torch.library custom ops: `flashattn::fwd` and `flashattn::bwd`, with fake (meta) kernels and autograd.

Every public function ends here, so torch.compile sees one opaque op per attention call (no graph
break) and autograd recomputes instead of storing probabilities. `backend` names the module in
`flashattn.backends` that does the work; the public API's dispatch point chooses it.

Two layouts share the ops. Dense: q (b, sq, h, d), k, v (b, sk, hk, d), lse (b, h, sq).
Packed variable-length ("varlen", cu_seqlens given): q (total_q, h, d), k, v (total_k, hk, d),
sequence i occupying rows cu_seqlens[i]:cu_seqlens[i+1], lse (h, total_q) — flash_attn's layouts.
Backends with `VARLEN_NATIVE = True` take the packed batch whole; the others run sequence by sequence.

FP8 (dense layout only): q, k, v float8_e4m3fn with `descale` (b, hk, 3) float32, the q, k, v descale
factors of each batch entry and kv head; out in `out_dtype`; `flashattn::bwd` with the same descale
returns gradients of the dequantized inputs in dout's dtype. The public API builds descale and
refuses gradients that autograd would have to cast to float8 (flashattn.fp8.attention trains instead).
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .blocksparse import BlockMask
from .masks import lse_dtype

BACKENDS = ("triton", "torch", "reference")
_MODULES = {"triton": "flashattn.backends.triton", "torch": "flashattn.backends.torch_tiled",
            "reference": "flashattn.backends.naive"}


def backend_module(name: str):
    return importlib.import_module(_MODULES[name])


def _lse_shape(q: Tensor, varlen: bool):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _sequences(cu_q: Tensor, cu_k: Tensor):
    """(index, q0, q1, k0, k1) of each sequence of a packed batch."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        yield i, cq[i], cq[i + 1], ck[i], ck[i + 1]


def _slopes_of(alibi_slopes: Optional[Tensor], i: int) -> Optional[Tensor]:
    return alibi_slopes[i:i + 1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else alibi_slopes


def _forward_each(module, q, k, v, options, alibi_slopes, cu_q, cu_k, extra):
    """A packed batch through a dense backend, one sequence at a time."""
    out = q.new_zeros(q.shape)
    lse = q.new_full(_lse_shape(q, True), float("-inf"), dtype=lse_dtype(q.dtype))
    for i, q0, q1, k0, k1 in _sequences(cu_q, cu_k):
        if q1 > q0 and k1 > k0:   # an empty sequence, or one with no keys: zeros and -inf as allocated
            o, l = module.forward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], *options, _slopes_of(alibi_slopes, i),
                                  batch_offset=i, **extra)
            out[q0:q1], lse[:, q0:q1] = o[0], l[0]
    return out, lse


def _backward_each(module, dout, q, k, v, out, lse, options, alibi_slopes, cu_q, cu_k, extra):
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for i, q0, q1, k0, k1 in _sequences(cu_q, cu_k):
        if q1 > q0 and k1 > k0:
            g = module.backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], out[None, q0:q1],
                                lse[None, :, q0:q1], *options, _slopes_of(alibi_slopes, i), batch_offset=i, **extra)
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def _fp8_extra(descale: Optional[Tensor], out_dtype: Optional[torch.dtype] = None, forward: bool = True) -> dict:
    """Keyword options of FP8 inputs, none otherwise (backends see FP8 keywords only for FP8 inputs)."""
    if descale is None:
        return {}
    return {"descale": descale, "out_dtype": out_dtype} if forward else {"descale": descale}


def _out_dtype(q: Tensor, out_dtype: Optional[torch.dtype]) -> torch.dtype:
    return q.dtype if out_dtype is None else out_dtype


def _extra(q, k, num_sink: int, dropout_p: float, dropout_seed: Optional[Tensor], global_flags: Optional[Tensor],
           block_mask_tensors) -> dict:
    """Keyword options every backend takes: sinks, dropout with its seed as a Python int, global tokens,
    and a block mask, rebuilt from its three tensors (an op's arguments must be tensors or scalars)."""
    extra = {"num_sink": num_sink}
    if global_flags is not None:
        extra["global_flags"] = global_flags
    layout, partial_id, partial = block_mask_tensors
    if layout is not None:
        extra["block_mask"] = BlockMask(layout, partial_id, partial, tuple(partial.shape[1:]), q.shape[-3],
                                        k.shape[-3])
    if dropout_p > 0.0:
        extra.update(dropout_p=dropout_p, dropout_seed=int(dropout_seed))
    return extra


def _fwd_impl(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, window_left: int, window_right: int,
        softcap: float, alibi_slopes: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
        cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, num_sink: int,
        dropout_p: float, dropout_seed: Optional[Tensor], global_flags: Optional[Tensor],
        block_layout: Optional[Tensor], block_partial_id: Optional[Tensor], block_partial: Optional[Tensor],
        backend: str, descale: Optional[Tensor] = None,
        out_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """-> out (like q, contiguous; in out_dtype if given) and lse, float32 (float64 for float64 inputs),
    in the layouts above."""
    varlen = cu_seqlens_q is not None
    lse_shape, lse_dt = _lse_shape(q, varlen), lse_dtype(q.dtype)
    out_dt = _out_dtype(q, out_dtype)
    if q.numel() == 0:                       # nothing to compute; kernels need not handle empty grids
        return q.new_empty(q.shape, dtype=out_dt), q.new_empty(lse_shape, dtype=lse_dt)
    if k.shape[-3] == 0:                     # no key at all: every row sees nothing
        return q.new_zeros(q.shape, dtype=out_dt), q.new_full(lse_shape, float("-inf"), dtype=lse_dt)
    module = backend_module(backend)
    options = (softmax_scale, window_left, window_right, softcap)
    extra = _extra(q, k, num_sink, dropout_p, dropout_seed, global_flags,
                   (block_layout, block_partial_id, block_partial))
    extra.update(_fp8_extra(descale, out_dt))
    if not varlen:
        out, lse = module.forward(q, k, v, *options, alibi_slopes, **extra)
    elif getattr(module, "VARLEN_NATIVE", False):
        out, lse = module.forward(q, k, v, *options, alibi_slopes, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, **extra)
    else:
        out, lse = _forward_each(module, q, k, v, options, alibi_slopes, cu_seqlens_q, cu_seqlens_k, extra)
    return out.contiguous(), lse.contiguous()   # the layout the fake kernel promises (torch.compile checks it)


fwd = torch.library.custom_op("flashattn::fwd", mutates_args=())(_fwd_impl)


@fwd.register_fake
def _fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, cu_seqlens_q,
              cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_sink, dropout_p, dropout_seed, global_flags,
              block_layout, block_partial_id, block_partial, backend, descale=None, out_dtype=None):
    return (q.new_empty(q.shape, dtype=_out_dtype(q, out_dtype)),
            q.new_empty(_lse_shape(q, cu_seqlens_q is not None), dtype=lse_dtype(q.dtype)))


def _bwd_impl(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_scale: float,
        window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
        cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
        num_sink: int, dropout_p: float, dropout_seed: Optional[Tensor], global_flags: Optional[Tensor],
        block_layout: Optional[Tensor], block_partial_id: Optional[Tensor], block_partial: Optional[Tensor],
        backend: str, descale: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients dq, dk, dv (shapes and dtypes of q, k, v; dout's dtype for FP8 inputs) from dout (like out)
    and the saved out, lse."""
    if q.numel() == 0 or k.numel() == 0:
        return tuple(x.new_zeros(x.shape, dtype=_grad_dtype(x, dout, descale)) for x in (q, k, v))
    module = backend_module(backend)
    options = (softmax_scale, window_left, window_right, softcap)
    extra = _extra(q, k, num_sink, dropout_p, dropout_seed, global_flags,
                   (block_layout, block_partial_id, block_partial))
    extra.update(_fp8_extra(descale, forward=False))
    if cu_seqlens_q is None:
        dq, dk, dv = module.backward(dout, q, k, v, out, lse, *options, alibi_slopes, **extra)
    elif getattr(module, "VARLEN_NATIVE", False):
        dq, dk, dv = module.backward(dout, q, k, v, out, lse, *options, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, **extra)
    else:
        dq, dk, dv = _backward_each(module, dout, q, k, v, out, lse, options, alibi_slopes, cu_seqlens_q,
                                    cu_seqlens_k, extra)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _grad_dtype(x: Tensor, dout: Tensor, descale: Optional[Tensor]) -> torch.dtype:
    return x.dtype if descale is None else dout.dtype


bwd = torch.library.custom_op("flashattn::bwd", mutates_args=())(_bwd_impl)


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, alibi_slopes,
              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_sink, dropout_p, dropout_seed, global_flags,
              block_layout, block_partial_id, block_partial, backend, descale=None):
    # contiguous whatever the inputs' strides (empty_like would copy a transposed input's strides)
    return tuple(x.new_empty(x.shape, dtype=_grad_dtype(x, dout, descale)) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    (q, k, v, scale, left, right, softcap, alibi_slopes, cu_q, cu_k, max_q, max_k, num_sink, dropout_p,
     dropout_seed, global_flags, block_layout, block_partial_id, block_partial, backend, descale, _out_dtype) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, cu_q, cu_k, dropout_seed, global_flags, block_layout,
                          block_partial_id, block_partial, descale)
    ctx.options = (scale, left, right, softcap)
    ctx.max_seqlens = (max_q, max_k)
    ctx.num_sink = num_sink
    ctx.dropout_p = dropout_p
    ctx.backend = backend


def _grads(ctx, dout, bwd_fn):
    """dq, dk, dv from what _setup_context saved, then a None for each non-tensor input. bwd_fn: the
    custom op `bwd` (traced calls) or its implementation (eager calls)."""
    # lse is returned for inspection and for merging partial results; gradients flow through out only.
    q, k, v, out, lse, alibi_slopes, cu_q, cu_k, seed, global_flags, *block_mask, descale = ctx.saved_tensors
    dq, dk, dv = bwd_fn(dout, q, k, v, out, lse, *ctx.options, alibi_slopes, cu_q, cu_k, *ctx.max_seqlens,
                        ctx.num_sink, ctx.dropout_p, seed, global_flags, *block_mask, ctx.backend, descale)
    return (dq, dk, dv) + (None,) * 19


def _backward(ctx, dout, dlse):
    return _grads(ctx, dout, bwd)


fwd.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The same forward and backward as the custom ops, without their dispatch machinery: in eager mode
    torch.library's custom-op layer costs hundreds of microseconds of host time per call (measured on
    the H200: benchmarks/profile_host.py), more than the GPU time of a small attention."""

    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _fwd_impl(*inputs)
        _setup_context(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _grads(ctx, dout, _bwd_impl)


def attention(*inputs) -> Tuple[Tensor, Tensor]:
    """(out, lse) for `fwd`'s arguments, differentiable: the custom op while torch.compile/export traces
    (one opaque node, no graph break), a plain autograd.Function otherwise (the same code, less overhead)."""
    if torch.compiler.is_compiling():
        return fwd(*inputs)
    return _Eager.apply(*inputs)
