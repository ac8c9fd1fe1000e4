"""The one definition of "may query i see key j", and of the score modifiers.

Every backend follows these rules: the reference and the PyTorch path call these functions; the
Triton kernels re-state the same two inequalities in `tl` code (they cannot call Python) and are
tested against the reference, which uses this module.

Geometry (flash_attn's convention). Query i of a sequence of ``seqlen_q`` queries sits on the
*diagonal* key ``diag(i) = i + seqlen_k - seqlen_q``: the causal mask is aligned to the
bottom-right corner of the (seqlen_q, seqlen_k) score matrix. A window ``(left, right)`` lets query
i see the keys j with ``diag(i) - left <= j <= diag(i) + right``; ``-1`` means unlimited on that
side. Causal attention is the window ``(left, 0)``. Attention sinks (StreamingLLM): the first
``num_sink`` keys are exempt from the left limit (still subject to the right one, so a causal
query never sees a future sink). Global tokens (Longformer/BigBird): a query at a global position
sees every key and a key at a global position is seen by every query (bidirectional models only)::

    causal, seqlen_q = 2, seqlen_k = 5      causal, seqlen_q = 5, seqlen_k = 2
        1 1 1 1 0                               0 0     <- rows that see no key
        1 1 1 1 1                               0 0        return 0 and lse = -inf
                                                0 0
                                                1 0
                                                1 1
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

UNLIMITED = -1


def window_bounds(causal: bool, window_size: Tuple[int, int]) -> Tuple[int, int]:
    """(left, right) after folding ``causal`` in: causal forces right = 0, as flash_attn does."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0
    return left, right


def visible(q_idx, k_idx, seqlen_q: int, seqlen_k: int, left: int, right: int, num_sink: int = 0,
            global_flags: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean tensor: may query ``q_idx`` see key ``k_idx``? Indices broadcast against each other.

    q_idx, k_idx: integer tensors of positions within the sequence (e.g. shapes (M, 1) and (1, N)).
    global_flags: (n,) bool or int8, n >= max(seqlen_q, seqlen_k): True at global positions.
    """
    diag = q_idx + (seqlen_k - seqlen_q)
    in_range = (k_idx >= 0) & (k_idx < seqlen_k) & (q_idx >= 0) & (q_idx < seqlen_q)   # broadcast over both
    ok = in_range
    if left >= 0:
        ok_left = k_idx >= diag - left
        ok = ok & (ok_left | (k_idx < num_sink) if num_sink > 0 else ok_left)
    if right >= 0:
        ok = ok & (k_idx <= diag + right)
    if global_flags is not None:
        g = global_flags.bool()
        last = g.numel() - 1
        ok = ok | (in_range & (g[q_idx.clamp(0, last)] | g[k_idx.clamp(0, last)]))
    return ok


def global_flags(positions, length: int, device=None) -> torch.Tensor:
    """(length,) int8 flags, 1 at the given global positions."""
    flags = torch.zeros(length, dtype=torch.int8, device=device)
    flags[torch.as_tensor(positions, dtype=torch.long, device=device)] = 1
    return flags


def mask_matrix(seqlen_q: int, seqlen_k: int, left: int, right: int, device=None, num_sink: int = 0,
                global_flags: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(seqlen_q, seqlen_k) boolean matrix of `visible`."""
    qi = torch.arange(seqlen_q, device=device)[:, None]
    kj = torch.arange(seqlen_k, device=device)[None, :]
    return visible(qi, kj, seqlen_q, seqlen_k, left, right, num_sink, global_flags)


def key_range(q_lo: int, q_hi: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> Tuple[int, int]:
    """Half-open range [k_lo, k_hi) of keys that some query in [q_lo, q_hi) may see.

    Blocks of keys outside it are skipped without being loaded. Empty when k_lo >= k_hi.
    """
    off = seqlen_k - seqlen_q
    k_lo = 0 if left < 0 else max(0, q_lo + off - left)
    k_hi = seqlen_k if right < 0 else min(seqlen_k, q_hi - 1 + off + right + 1)
    return k_lo, max(k_lo, k_hi)


def key_ranges(q_lo: int, q_hi: int, seqlen_q: int, seqlen_k: int, left: int, right: int,
               num_sink: int = 0, has_global: bool = False) -> List[Tuple[int, int]]:
    """The non-empty key ranges some query in [q_lo, q_hi) may see: the sinks left of the window, then
    `key_range`. Global tokens can be anywhere: then every key (no skipping yet)."""
    if has_global:
        return [(0, seqlen_k)] if seqlen_k > 0 else []
    k_lo, k_hi = key_range(q_lo, q_hi, seqlen_q, seqlen_k, left, right)
    sink_hi = min(num_sink, k_lo, k_hi)
    return [(lo, hi) for lo, hi in ((0, sink_hi), (k_lo, k_hi)) if hi > lo]


def query_range(k_lo: int, k_hi: int, seqlen_q: int, seqlen_k: int, left: int, right: int,
                num_sink: int = 0) -> Tuple[int, int]:
    """Half-open range [q_lo, q_hi) of queries that may see some key in [k_lo, k_hi) (backward pass)."""
    if k_lo < num_sink:   # a sink is seen by every later query: no left limit for this range
        left = -1
    off = seqlen_k - seqlen_q
    # key j is seen by query i iff  j - off - right <= i <= j - off + left
    q_lo = 0 if right < 0 else max(0, k_lo - off - right)
    q_hi = seqlen_q if left < 0 else min(seqlen_q, k_hi - 1 - off + left + 1)
    return q_lo, max(q_lo, q_hi)


def block_is_full(q_lo: int, q_hi: int, k_lo: int, k_hi: int, seqlen_q: int, seqlen_k: int,
                  left: int, right: int) -> bool:
    """True when every query of [q_lo, q_hi) sees every key of [k_lo, k_hi): no mask needed."""
    off = seqlen_k - seqlen_q
    ok_left = left < 0 or k_lo >= (q_hi - 1) + off - left   # the last query has the tightest left edge
    ok_right = right < 0 or (k_hi - 1) <= q_lo + off + right  # the first query has the tightest right edge
    return ok_left and ok_right and k_hi <= seqlen_k


def visible_box(q_lo: int, q_hi: int, k_lo: int, k_hi: int, seqlen_q: int, seqlen_k: int, left: int,
                right: int) -> Optional[Tuple[int, int, int, int]]:
    """The smallest sub-block (q_lo', q_hi', k_lo', k_hi') of the block [q_lo, q_hi) × [k_lo, k_hi) that holds
    every visible pair of it, or None when no pair is visible (no sinks or global tokens).

    Every row of the box sees some key of it and every key is seen by some row (the window is a band),
    which is what makes `block_window` of the box a valid window. Ring attention cuts a sequence's
    score matrix into such blocks, one per pair of shards.
    """
    a, b = key_range(q_lo, q_hi, seqlen_q, seqlen_k, left, right)
    a, b = max(a, k_lo), min(b, k_hi)
    if a >= b:
        return None
    c, d = query_range(a, b, seqlen_q, seqlen_k, left, right)
    c, d = max(c, q_lo), min(d, q_hi)
    return (c, d, a, b) if c < d else None


def block_window(q_lo: int, q_hi: int, k_lo: int, k_hi: int, seqlen_q: int, seqlen_k: int, left: int,
                 right: int) -> Tuple[int, int]:
    """The window (left', right') that gives the block [q_lo, q_hi) × [k_lo, k_hi), attended as a sequence
    of its own (seqlen q_hi - q_lo by k_hi - k_lo, diagonal bottom-right aligned), the visibility it has
    inside the (seqlen_q, seqlen_k) matrix.

    Row i' of the block is row q_lo + i'; key j' is key k_lo + j'. The parent's condition
    j >= i + (seqlen_k - seqlen_q) - left becomes j' >= i' + (k_hi - k_lo) - (q_hi - q_lo) - left' with
    left' = left + k_hi - q_hi - (seqlen_k - seqlen_q); the right side likewise. -1 stays unlimited. Both
    are >= 0 for a `visible_box` (its last row sees a key, its last key is seen), which is required: the
    window of the API cannot express a negative limit.
    """
    off = seqlen_k - seqlen_q
    new_left = -1 if left < 0 else left + k_hi - q_hi - off
    new_right = -1 if right < 0 else right + q_hi - k_hi + off
    if new_left < -1 or new_right < -1 or (left >= 0 and new_left < 0) or (right >= 0 and new_right < 0):
        raise ValueError(f"block [{q_lo}, {q_hi}) x [{k_lo}, {k_hi}) needs window ({new_left}, {new_right}): "
                         "trim it with visible_box first")
    return new_left, new_right


def alibi_bias(slopes: torch.Tensor, q_idx, k_idx, seqlen_q: int, seqlen_k: int) -> torch.Tensor:
    """ALiBi bias ``-slope * |diag(i) - j|`` (flash_attn's definition), broadcast as slopes[..., None, None]."""
    dist = (q_idx + (seqlen_k - seqlen_q) - k_idx).abs()
    return -slopes[..., None, None] * dist


def apply_softcap(scores: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma-2 style logit soft-capping ``softcap * tanh(s / softcap)``; 0 disables it."""
    if softcap == 0.0:
        return scores
    return softcap * torch.tanh(scores / softcap)


def default_scale(headdim: int) -> float:
    return 1.0 / math.sqrt(headdim)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the returned log-sum-exp: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32
