"""Rotary position embeddings (RoPE), flash_attn's conventions.

A rotary table pair cos, sin has shape (positions, rotary_dim / 2): the angle of position t and
frequency i. `rotary_dim` may be smaller than head_dim (only the first rotary_dim channels rotate,
as in GPT-J and some GPT-NeoX models). Two channel pairings exist and weights trained with one do
not fit the other:

- half-split (``interleaved=False``; GPT-NeoX, Llama in Hugging Face): channel i pairs with
  channel i + rotary_dim/2;
- interleaved (``interleaved=True``; GPT-J, the original RoFormer): channels 2i and 2i + 1 pair.

Each pair (x1, x2) becomes (x1 cos − x2 sin, x1 sin + x2 cos); the arithmetic runs in at least
float32 and the result has x's dtype.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first 2·cos.shape[-1] channels of x by per-position tables already gathered.

    x: (..., seqlen, nheads, head_dim); cos, sin: (..., seqlen, rotary_dim / 2), broadcasting to x
    without its heads dimension (e.g. (seqlen, rotary_dim / 2) or (batch, seqlen, rotary_dim / 2)).
    """
    half = cos.shape[-1]
    if 2 * half > x.shape[-1]:
        raise ValueError(f"rotary tables of {half} frequencies rotate {2 * half} channels, more than head_dim "
                         f"{x.shape[-1]}: pass cos/sin of shape (positions, rotary_dim / 2) with rotary_dim <= head_dim")
    dtype = torch.promote_types(x.dtype, torch.float32)
    xr, rest = x[..., :2 * half].to(dtype), x[..., 2 * half:]
    cos, sin = cos.to(dtype).unsqueeze(-2), sin.to(dtype).unsqueeze(-2)   # broadcast over heads
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1) if rest.shape[-1] else out.to(x.dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0) -> Tensor:
    """flash_attn's ``apply_rotary_emb``: x (batch, seqlen, nheads, head_dim), token t of sequence b at
    position seqlen_offsets[b] + t (an int offset applies to every sequence).

    cos, sin: (positions, rotary_dim / 2), covering every position used.
    """
    b, s = x.shape[0], x.shape[1]
    pos = torch.arange(s, device=x.device)[None, :] + (
        seqlen_offsets.to(x.device, torch.long)[:, None] if isinstance(seqlen_offsets, Tensor)
        else int(seqlen_offsets))
    pos = pos.expand(b, s)
    if s and int(pos.max()) >= cos.shape[0]:
        raise ValueError(f"rotary tables cover positions 0..{cos.shape[0] - 1}, but position {int(pos.max())} "
                         "is needed: pass longer rotary_cos/rotary_sin tables")
    return rotate(x, cos[pos], sin[pos], interleaved)
