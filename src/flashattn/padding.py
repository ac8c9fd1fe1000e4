"""Padded batches <-> the packed layout of `flash_attn_varlen_func` (like flash_attn.bert_padding).

A padded batch (batch, seqlen, ...) with an attention_mask (batch, seqlen) (1 = token, 0 = padding)
becomes the kept tokens of every sequence, one sequence after another, (total, ...), with int32
cu_seqlens marking where each sequence starts. Padding may sit anywhere (left, right, in between);
the kept tokens keep their order::

    attention_mask   hidden_states       unpadded               indices    = [1, 2, 3, 4, 5]
    [[0, 1, 1],      [[a0, a1, a2],      [a1, a2, b0, b1, b2]   cu_seqlens = [0, 2, 5]
     [1, 1, 1]]       [b0, b1, b2]]                             max_seqlen = 3

Both directions are one index_select / index_copy, so autograd routes gradients back through the
same indices and torch.compile traces them. unpad_input is data-dependent (the number of tokens
decides the shapes), so it synchronizes with the device once.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def check_attention_mask(attention_mask, shape, name: str = "attention_mask") -> torch.Tensor:
    """Validates a (batch, seqlen) keep-mask against hidden states of shape (batch, seqlen, ...).

    Accepts bool, or integers / floats holding only 0 and 1 (1 = keep). Returns it as bool.
    """
    expected = tuple(shape[:2])
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, seqlen) = {expected}, "
                        f"got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != expected:
        raise ValueError(f"{name} must have shape (batch, seqlen) = {expected} to match hidden states of "
                         f"shape {tuple(shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_complex():
        raise TypeError(f"{name} must be bool or hold 0/1 values, got dtype {attention_mask.dtype}")
    # An additive float mask (0 / -inf) or a count would otherwise be read as "keep" everywhere it is nonzero.
    if not ((attention_mask == 0) | (attention_mask == 1)).all():
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:4].tolist()
        raise ValueError(f"{name} must hold only 1 (keep) and 0 (padding), got values such as {bad}; "
                         "an additive mask (0 = keep, -inf = drop) converts with `mask == 0`")
    return attention_mask != 0


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Packs the kept tokens of a padded batch.

    Arguments:
        hidden_states: (batch, seqlen, ...)
        attention_mask: (batch, seqlen), bool or 0/1 values; 1 (True) = a token to keep.
    Return:
        unpadded: (total, ...), the kept tokens, sequence after sequence, each in its original order.
        indices: (total,) int64, their positions in hidden_states.flatten(0, 1) (for pad_input).
        cu_seqlens: (batch + 1,) int32; sequence b is unpadded[cu_seqlens[b]:cu_seqlens[b + 1]].
        max_seqlen: int, the number of tokens of the longest sequence.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
        got = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
        raise ValueError(f"hidden_states must be a tensor of shape (batch, seqlen, ...), got {got}")
    keep = check_attention_mask(attention_mask, hidden_states.shape)
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    indices = torch.nonzero(keep.flatten()).flatten()   # row-major: sequence by sequence, in order
    max_seqlen = int(seqlens.max()) if seqlens.numel() > 0 else 0
    unpadded = hidden_states.flatten(0, 1).index_select(0, indices)
    return unpadded, indices, cu_seqlens, max_seqlen


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Puts packed tokens back in their padded places (the inverse of unpad_input).

    Arguments:
        hidden_states: (total, ...), packed tokens: unpad_input's output or anything computed from it.
        indices: (total,) integer, unpad_input's indices into the flattened (batch * seqlen) positions.
        batch, seqlen: the padded shape.
    Return:
        (batch, seqlen, ...), the tokens at their positions and zeros at the padding.
    """
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.is_floating_point() \
            or indices.dtype == torch.bool:
        got = f"{indices.dtype} {tuple(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"indices must be a 1-D integer tensor (unpad_input's second output), got {got}")
    if hidden_states.shape[0] != indices.shape[0]:
        raise ValueError(f"hidden_states has {hidden_states.shape[0]} tokens but indices has {indices.shape[0]}; "
                         "pass the indices that unpad_input returned with these tokens")
    rest = hidden_states.shape[1:]
    out = hidden_states.new_zeros((batch * seqlen, *rest))
    # out-of-place index_copy: autograd sends each token's gradient back through the same index
    out = out.index_copy(0, indices.long(), hidden_states)
    return out.view(batch, seqlen, *rest)
