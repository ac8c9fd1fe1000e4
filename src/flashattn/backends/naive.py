"""The reference as a backend (FLASHATTN_BACKEND=reference): float64 naive attention, O(N²) memory.

For debugging and for checking the other backends; gradients come from autograd through it.
FP8 inputs (descale given) are dequantized first (flashattn.fp8.dequantize): the definition.
"""
from __future__ import annotations

import torch

from ..masks import lse_dtype
from ..reference import attention_ref


def _positions(flags):
    return None if flags is None else flags.nonzero().flatten()


def _dequantized(q, k, v, descale):
    """float64 q, k, v: FP8 inputs times their descale factors ((b, hk, 3)), other inputs as they are."""
    if descale is None:
        return q.double(), k.double(), v.double()
    from ..fp8 import dequantize
    return tuple(dequantize(x, descale[..., i]).double() for i, x in enumerate((q, k, v)))


def forward(q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, num_sink=0,
            dropout_p=0.0, dropout_seed=0, batch_offset=0, global_flags=None, block_mask=None, descale=None,
            out_dtype=None):
    out, lse = attention_ref(*_dequantized(q, k, v, descale), softmax_scale, False, (window_left, window_right),
                             softcap, alibi_slopes, num_sink_tokens=num_sink, dropout_p=dropout_p,
                             dropout_seed=dropout_seed, batch_offset=batch_offset,
                             global_tokens=_positions(global_flags), block_mask=block_mask)
    return out.to(out_dtype or q.dtype), lse.to(lse_dtype(q.dtype))


def backward(dout, q, k, v, out, lse, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             alibi_slopes=None, num_sink=0, dropout_p=0.0, dropout_seed=0, batch_offset=0, global_flags=None,
             block_mask=None, descale=None):
    # Inside a torch.library custom op autograd records nothing (the kernel runs below the Autograd key),
    # so torch.autograd.grad finds no graph; torch.func.vjp is its own transform and works here.
    def f(q, k, v):
        return attention_ref(q, k, v, softmax_scale, False, (window_left, window_right), softcap, alibi_slopes,
                             num_sink_tokens=num_sink, dropout_p=dropout_p, dropout_seed=dropout_seed,
                             batch_offset=batch_offset, global_tokens=_positions(global_flags),
                             block_mask=block_mask)[0]

    _, vjp = torch.func.vjp(f, *_dequantized(q, k, v, descale))
    dtypes = (q.dtype, k.dtype, v.dtype) if descale is None else (dout.dtype,) * 3
    return tuple(g.to(dt) for g, dt in zip(vjp(dout.double()), dtypes))
