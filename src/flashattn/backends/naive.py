"""The reference as a backend (FLASHATTN_BACKEND=reference): float64 naive attention, O(N²) memory.

For debugging and for checking the other backends; gradients come from autograd through it.
"""
from __future__ import annotations

import torch

from ..reference import attention_ref


def forward(q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    out, lse = attention_ref(q, k, v, softmax_scale, False, (window_left, window_right), softcap, alibi_slopes)
    return out.to(q.dtype), lse.float()


def backward(dout, q, k, v, out, lse, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             alibi_slopes=None):
    with torch.enable_grad():
        leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        ref, _ = attention_ref(*leaves, softmax_scale, False, (window_left, window_right), softcap, alibi_slopes)
        grads = torch.autograd.grad(ref, leaves, dout.double())
    return tuple(g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
