"""Which rank holds which tokens: the contiguous and zigzag layouts of a sequence sharded over ranks.

A sequence of `length` tokens is split over `world_size` ranks, each holding `length / world_size` of
them, stored in increasing position order:

    contiguous: rank r holds chunk r of world_size equal chunks.
    zigzag:     the sequence is cut into 2·world_size chunks; rank r holds chunks r and 2·world_size-1-r.
                With causal attention every rank then has the same work (one early and one late chunk):

                    world_size = 2, 4 chunks:   rank 0: [c0 | c3]   rank 1: [c1 | c2]

Packed (varlen) batches shard every sequence on its own: with cu_seqlens the cumulative lengths of the
full sequences, rank r's packed shard holds sequence i's tokens at rows cu_seqlens[i] / world_size onward.
`pieces` is the one definition; shard/unshard and ring attention read it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

LAYOUTS = ("zigzag", "contiguous")


def chunks_per_rank(layout: str) -> int:
    """How many chunks of a sequence one rank holds: every length must divide by world_size times this."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def pieces(layout: str, rank: int, world_size: int, length: int) -> List[Tuple[int, int, int]]:
    """The runs of consecutive positions rank `rank` holds of a sequence of `length` tokens, as
    (global start, local start, count) in local order; length must divide by world_size · chunks_per_rank."""
    n = chunks_per_rank(layout)
    c = length // (n * world_size)
    starts = [rank] if n == 1 else [rank, 2 * world_size - 1 - rank]
    return [(s * c, i * c, c) for i, s in enumerate(starts) if c > 0]


def check_lengths(layout: str, world_size: int, lengths: Sequence[int], what: str = "the sequence") -> None:
    """ValueError unless every length divides into the layout's chunks."""
    unit = chunks_per_rank(layout) * world_size
    for i, n in enumerate(lengths):
        if n % unit:
            name = what if len(lengths) == 1 else f"sequence {i} of the batch"
            raise ValueError(f"{name} has {n} tokens, which does not divide into layout={layout!r}'s "
                             f"{unit} chunks ({chunks_per_rank(layout)} per rank x world_size {world_size}); "
                             f"pad every sequence to a multiple of {unit}")


def _lengths(x: torch.Tensor, dim: int, cu_seqlens) -> List[int]:
    if cu_seqlens is None:
        return [x.shape[dim]]
    cu = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    return [b - a for a, b in zip(cu, cu[1:])]


def permutation(layout: str, world_size: int, lengths: Sequence[int], device=None) -> torch.Tensor:
    """(total,) int64: entry p is the global row of row p of the rank-ordered concatenation of all shards
    (rank 0's shard, then rank 1's, ...), for sequences of the given lengths packed one after another."""
    check_lengths(layout, world_size, lengths)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    parts = [torch.arange(starts[i] + g, starts[i] + g + c)
             for r in range(world_size) for i, n in enumerate(lengths) for g, _, c in pieces(layout, r, world_size, n)]
    perm = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    return perm.to(device)


def group_permutation(layout: str, world_size: int, ulysses_degree: int, ring_rank: int, lengths: Sequence[int],
                      device=None) -> torch.Tensor:
    """Where the tokens of a Ulysses group go in its ring-level shard (method='hybrid').

    The world_size ranks form ring_size = world_size / ulysses_degree Ulysses groups of consecutive
    ranks: group g holds ranks g·U … g·U + U - 1 (U = ulysses_degree). In either layout the union of
    their shards is exactly shard g of the same layout over ring_size ranks (zigzag: chunks g·U + j
    and 2·world_size-1-g·U-j of 2·world_size, j < U, are chunks g and 2·ring_size-1-g of
    2·ring_size), so a ring over the groups sees an ordinary zigzag or contiguous layout.

    Returns (U · total / world_size,) int64: entry p is the row, in shard `ring_rank` of the
    ring_size-rank layout, of row p of the rank-ordered concatenation of the group's shards.
    ulysses_degree = world_size gives `permutation`; ulysses_degree = 1 the identity."""
    ring_size = world_size // ulysses_degree
    check_lengths(layout, world_size, lengths)
    held = permutation(layout, world_size, lengths)          # global rows, rank after rank
    target = permutation(layout, ring_size, lengths)
    per_group = held.numel() // ring_size
    span = slice(ring_rank * per_group, (ring_rank + 1) * per_group)
    row = torch.full((held.numel(),), -1, dtype=torch.long)
    row[target[span]] = torch.arange(per_group)
    perm = row[held[span]]
    if (perm < 0).any():   # the union argument above failed: a bug, not a caller's error
        raise RuntimeError(f"Ulysses group {ring_rank} of {layout!r} does not hold ring shard {ring_rank}")
    return perm.to(device)


def shard(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 1,
          cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rank `rank`'s shard of the full sequence(s) x along `dim` (a copy; differentiable).

    x: e.g. (batch, seqlen, nheads, headdim) with dim=1, or packed (total, nheads, headdim) with dim=0
        and cu_seqlens (batch + 1,) the full sequences' cumulative lengths (each sequence sharded on
        its own). Returns x with dim of size seqlen / world_size (total / world_size).
    """
    lengths = _lengths(x, dim, cu_seqlens)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    perm = permutation(layout, world_size, lengths, x.device)
    per_rank = perm.numel() // world_size
    return x.index_select(dim, perm[rank * per_rank:(rank + 1) * per_rank])


def unshard(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 1,
            cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The full sequence(s) from every rank's shard, in rank order (e.g. from all_gather); differentiable.

    shards: world_size tensors shaped like `shard`'s result. cu_seqlens: the full sequences' cumulative
    lengths for packed shards (dim=0), as given to `shard`.
    """
    world_size = len(shards)
    cat = torch.cat(list(shards), dim)
    lengths = _lengths(cat, dim, cu_seqlens)
    perm = permutation(layout, world_size, lengths, cat.device)
    return cat.index_select(dim, torch.argsort(perm))


def zigzag_shard(x: torch.Tensor, rank: int, world_size: int, dim: int = 1,
                 cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`shard` in the zigzag layout: rank r gets chunks r and 2·world_size-1-r of 2·world_size."""
    return shard(x, rank, world_size, "zigzag", dim, cu_seqlens)


def zigzag_unshard(shards: Sequence[torch.Tensor], dim: int = 1,
                   cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`unshard` of zigzag shards: the full sequence(s) back in position order."""
    return unshard(shards, "zigzag", dim, cu_seqlens)
