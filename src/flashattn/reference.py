"""The specification: naive O(N²) attention, materializing the full score matrix.

Slow and memory-hungry on purpose: it is what every fast path is tested against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import dropout, masks


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = torch.float64,
    num_sink_tokens: int = 0,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
    batch_offset: int = 0,
    return_probs: bool = False,
    global_tokens=None,
    block_mask=None,
):
    """softmax(q kᵀ · scale) v, the plain way.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), with
    nheads % nheads_k == 0 (query head h uses key/value head h // (nheads // nheads_k)).
    alibi_slopes: (nheads,) or (batch, nheads).
    num_sink_tokens: the first keys that every query sees regardless of the window's left limit.
    dropout_p, dropout_seed: drop probabilities with flashattn.dropout's mask for this seed (batch
        entry b counts as batch_offset + b there) and rescale the kept ones by 1 / (1 - dropout_p).
    global_tokens: positions (ints) that see every key and are seen by every query.
    block_mask: a flashattn.BlockMask; its mask is ANDed with the others.
    return_probs: also return the probabilities (b, h, sq, sk) as they multiply v: dropped ones 0.
    compute_dtype: float64 (the oracle), float32, or None to compute in the inputs' own dtype (the
    "same naive math in the input dtype" of the tolerance rule).
    Returns out (batch, seqlen_q, nheads, headdim) and lse (batch, nheads, seqlen_q), both in the
    compute dtype; lse is the natural log-sum-exp of the scaled scores. Rows that see no key give
    out = 0 and lse = -inf. Differentiable with autograd (gradients of the oracle).
    """
    dt = compute_dtype or q.dtype
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = masks.default_scale(d) if softmax_scale is None else softmax_scale
    if sk == 0:   # no key at all (amax over an empty row would raise)
        res = (q.new_zeros((b, sq, h, v.shape[-1]), dtype=dt), q.new_full((b, h, sq), float("-inf"), dtype=dt))
        return res + (q.new_zeros((b, h, sq, 0), dtype=dt),) if return_probs else res
    qh = q.to(dt).transpose(1, 2)                                          # (b, h, sq, d)
    kh = k.to(dt).transpose(1, 2).repeat_interleave(h // hk, dim=1)         # (b, h, sk, d)
    vh = v.to(dt).transpose(1, 2).repeat_interleave(h // hk, dim=1)
    s = torch.matmul(qh, kh.transpose(-1, -2)) * scale                     # (b, h, sq, sk)
    s = masks.apply_softcap(s, softcap)
    qi = torch.arange(sq, device=q.device)[:, None]
    kj = torch.arange(sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt)
        slopes = slopes[None] if slopes.dim() == 1 else slopes             # (1 or b, h)
        s = s + masks.alibi_bias(slopes, qi, kj, sq, sk)
    left, right = masks.window_bounds(causal, window_size)
    flags = None if global_tokens is None else masks.global_flags(global_tokens, max(sq, sk), q.device)
    keep = masks.visible(qi, kj, sq, sk, left, right, num_sink_tokens, flags)
    if block_mask is not None:
        keep = keep & block_mask.dense().to(q.device)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)                # empty rows: exp(-inf - 0) = 0
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l == 0, torch.ones_like(l), l)
    if dropout_p > 0.0:
        bh = ((batch_offset + torch.arange(b, device=q.device))[:, None] * h + torch.arange(h, device=q.device))
        keep = dropout.keep_mask(dropout_seed, bh[:, :, None, None], qi, kj, dropout_p)
        p = p * keep / (1.0 - dropout_p)
    out = torch.matmul(p, vh).transpose(1, 2)                              # (b, sq, h, d)
    lse = (m + torch.log(l)).squeeze(-1)                                   # log 0 = -inf for empty rows
    return (out, lse, p) if return_probs else (out, lse)
