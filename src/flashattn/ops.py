"""torch.library custom ops: `flashattn::fwd` and `flashattn::bwd`, with fake (meta) kernels and autograd.

Every public function ends here, so torch.compile sees one opaque op per attention call (no graph
break) and autograd recomputes instead of storing probabilities. `backend` names the module in
`flashattn.backends` that does the work; the public API's dispatch point chooses it.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .masks import lse_dtype

BACKENDS = ("triton", "torch", "reference")
_MODULES = {"triton": "flashattn.backends.triton", "torch": "flashattn.backends.torch_tiled",
            "reference": "flashattn.backends.naive"}


def backend_module(name: str):
    return importlib.import_module(_MODULES[name])


@torch.library.custom_op("flashattn::fwd", mutates_args=())
def fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, window_left: int, window_right: int,
        softcap: float, alibi_slopes: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """q: (b, sq, h, d); k, v: (b, sk, hk, d) -> out (b, sq, h, d) in q.dtype, lse (b, h, sq) float32
    (float64 for float64 inputs)."""
    lse_shape, lse_dt = (q.shape[0], q.shape[2], q.shape[1]), lse_dtype(q.dtype)
    if q.shape[0] == 0 or q.shape[1] == 0:   # nothing to compute; kernels need not handle empty grids
        return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=lse_dt)
    if k.shape[1] == 0:                      # no key at all: every row sees nothing
        return q.new_zeros(q.shape), q.new_full(lse_shape, float("-inf"), dtype=lse_dt)
    out, lse = backend_module(backend).forward(q, k, v, softmax_scale, window_left, window_right, softcap,
                                               alibi_slopes)
    return out.contiguous(), lse.contiguous()   # the layout the fake kernel promises (torch.compile checks it)


@fwd.register_fake
def _fwd_fake(q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, backend):
    b, sq, h, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, h, sq), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("flashattn::bwd", mutates_args=())
def bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, softmax_scale: float,
        window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
        backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients dq, dk, dv (shapes and dtypes of q, k, v) from dout (b, sq, h, d) and the saved out, lse."""
    if q.numel() == 0 or k.numel() == 0:
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    dq, dk, dv = backend_module(backend).backward(dout, q, k, v, out, lse, softmax_scale, window_left,
                                                  window_right, softcap, alibi_slopes)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, softmax_scale, window_left, window_right, softcap, alibi_slopes, backend):
    # contiguous whatever the inputs' strides (empty_like would copy a transposed input's strides)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, window_left, window_right, softcap, alibi_slopes, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.options = (softmax_scale, window_left, window_right, softcap)
    ctx.backend = backend


def _backward(ctx, dout, dlse):
    # lse is returned for inspection and for merging partial results; gradients flow through out only.
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    scale, left, right, softcap = ctx.options
    dq, dk, dv = bwd(dout, q, k, v, out, lse, scale, left, right, softcap, alibi_slopes, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


fwd.register_autograd(_backward, setup_context=_setup_context)
