"""Merging attention results computed over disjoint sets of keys: the seeds' block-merge formula.

If O_i = softmax(S_i) V_i over key set i with log-sum-exp L_i, then attention over the union is

    L = log Σ_i exp(L_i)          O = Σ_i exp(L_i − L) · O_i

(the online-softmax update applied once per part instead of once per block). Split-KV decoding
(`flash_attn_with_kvcache`, num_splits > 1) and ring attention (`flashattn.distributed`) both end
here. A part that saw no key has L_i = −inf and weight 0; if no part saw a key the row is 0 with
L = −inf, never NaN (design.md's rule for empty rows).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor


def merge(out: Optional[Tensor], lse: Optional[Tensor], out_i: Tensor, lse_i: Tensor) -> Tuple[Tensor, Tensor]:
    """Merge one more part into a running (out, lse); out, lse may be None for the first part.

    out, out_i: (..., rows, headdim), any float dtype (the result is float32 or float64);
    lse, lse_i: (..., rows), the same leading shape as out without headdim. Used by loops that
    receive parts one at a time (ring attention); `flash_attn_combine` does all parts at once.
    """
    acc = torch.float64 if out_i.dtype == torch.float64 else torch.float32
    if out is None:
        return out_i.to(acc), lse_i.to(acc)
    new = torch.logaddexp(lse, lse_i.to(acc))
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)   # −inf − −inf would be NaN
    out = torch.exp(lse - safe).unsqueeze(-1) * out + torch.exp(lse_i - safe).unsqueeze(-1) * out_i.to(acc)
    return out, new


def flash_attn_combine(out_partial: Tensor, lse_partial: Tensor, out_dtype: Optional[torch.dtype] = None,
                       return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Combine `num_splits` partial attention results over disjoint key sets into the full result.

    Args:
        out_partial: (num_splits, *rows, headdim), e.g. (num_splits, batch, seqlen, nheads, headdim),
            each split's normalised output over its own keys.
        lse_partial: (num_splits, *rows), e.g. (num_splits, batch, seqlen, nheads): each split's
            log-sum-exp of scaled scores (−inf where the split saw no key).
        out_dtype: dtype of the result (default: out_partial's dtype).
        return_lse: also return the combined lse, (*rows), float32 (float64 for float64 input).

    Returns: out (*rows, headdim) [, lse (*rows)].
    """
    if not isinstance(out_partial, Tensor) or not isinstance(lse_partial, Tensor):
        raise TypeError("out_partial and lse_partial must be tensors, got "
                        f"{type(out_partial).__name__} and {type(lse_partial).__name__}")
    if out_partial.dim() < 2 or lse_partial.shape != out_partial.shape[:-1]:
        raise ValueError(f"lse_partial must have out_partial's shape without its last (headdim) dimension: "
                         f"out_partial {tuple(out_partial.shape)} needs lse_partial {tuple(out_partial.shape[:-1])}, "
                         f"got {tuple(lse_partial.shape)}")
    if not (out_partial.is_floating_point() and lse_partial.is_floating_point()):
        raise TypeError(f"out_partial and lse_partial must be floating point, got {out_partial.dtype} and "
                        f"{lse_partial.dtype}")
    if out_partial.is_cuda and out_partial.dtype == torch.float32 and out_partial.shape[0] > 0:
        from .api import triton_available
        if triton_available():   # one kernel launch instead of a dozen elementwise ops
            from .backends.triton.decode import combine
            out, lse = combine(out_partial.contiguous(), lse_partial.float().contiguous(),
                               out_dtype or out_partial.dtype)
            return (out, lse) if return_lse else out
    acc = torch.float64 if out_partial.dtype == torch.float64 else torch.float32
    lse_partial = lse_partial.to(acc)
    lse = torch.logsumexp(lse_partial, dim=0)                      # −inf where every split is −inf
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_partial - safe)                        # 0 for empty splits and empty rows
    out = (weights.unsqueeze(-1) * out_partial.to(acc)).sum(dim=0).to(out_dtype or out_partial.dtype)
    return (out, lse) if return_lse else out
