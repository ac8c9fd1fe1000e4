"""Hybrid (Ulysses × ring, "unified sequence parallelism") attention.

The W ranks of a group (rank p = its rank in the group) form a grid of W / U Ulysses groups of U
consecutive ranks (p // U equal: ring index) and U ring groups of W / U ranks (p % U equal: Ulysses
index); U = ulysses_degree. Each rank holds its shard of the W-rank layout. Inside its Ulysses group an
all-to-all (ulysses.py) trades the sequence split for a head split: the group's U shards together are
shard (p // U) of the same layout over W / U ranks (layout.group_permutation), so after it each rank
holds that ring-level shard for nheads / U heads. Ring attention (ring.py) over the ring group, whose
members hold the other ring-level shards for the same heads, computes them exactly; the reverse
all-to-all brings out back to the sequence split. U = 1 is ring attention, U = W is Ulysses.
The all-to-all moves U · (3 inputs + 1 output) per pass among U ranks (keep a Ulysses group inside a
node); the ring moves k/v between W / U ranks, overlapped with the compute.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from .layout import group_permutation
from .ring import RingAttention
from .ulysses import head_parallel


class HybridGroups(NamedTuple):
    """This rank's process groups for method='hybrid' (from hybrid_groups): `ulysses`, the U ranks whose
    group rank p has the same p // U; `ring`, the W / U ranks with the same p % U."""
    ulysses: Any
    ring: Any


def hybrid_groups(ulysses_degree: int, group=None) -> Optional[HybridGroups]:
    """Create the Ulysses and ring groups of method='hybrid' over `group` (default: the whole world).

    A collective of the WHOLE job, because torch.distributed.new_group is: every process calls it, in
    the same order relative to its other new_group calls, with the same ulysses_degree, passing the
    group it will run attention on (processes outside it pass what dist.new_group returned to them,
    or a group of their own: each distinct group gets its grid). It makes W / U + U groups per distinct
    group. Make it once and pass it as groups= to ring_flash_attn_func / ring_flash_attn_varlen_func.

    Returns HybridGroups(ulysses, ring) for a member of `group`, None for a process outside it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                           "first (backend 'nccl' for CUDA tensors, 'gloo' for CPU tensors)")
    mine = dist.get_process_group_ranks(_or_world(group)) if dist.get_rank(group) >= 0 else None
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (ulysses_degree, mine))   # every process sees every request: all raise alike
    degrees = [u for u, _ in every]
    if len(set(map(repr, degrees))) > 1:
        shown = ", ".join(f"process {r}: {u!r}" for r, u in enumerate(degrees))
        raise ValueError(f"hybrid_groups: ulysses_degree differs across the processes ({shown}); every process "
                         "must pass the same ulysses_degree")
    parents = []
    for _, ranks in every:
        if ranks is not None and ranks not in parents:
            parents.append(ranks)
    for ranks in parents:
        check_degree(ulysses_degree, len(ranks))
    me, found = dist.get_rank(), None
    for ranks in parents:   # the same new_group calls, in the same order, on every process
        u = ulysses_degree
        ulysses = [dist.new_group(ranks[g * u:(g + 1) * u]) for g in range(len(ranks) // u)]
        ring = [dist.new_group(ranks[j::u]) for j in range(u)]
        if ranks == mine:
            p = ranks.index(me)
            found = HybridGroups(ulysses[p // u], ring[p % u])
    return found


def _or_world(group):
    return group if group is not None else dist.group.WORLD


def check_degree(ulysses_degree, world: int) -> None:
    if not isinstance(ulysses_degree, int) or isinstance(ulysses_degree, bool) or ulysses_degree < 1:
        raise ValueError(f"ulysses_degree must be a positive int (the number of ranks of a Ulysses group), "
                         f"got {ulysses_degree!r}")
    if world % ulysses_degree:
        divisors = [u for u in range(1, world + 1) if world % u == 0]
        raise ValueError(f"ulysses_degree ({ulysses_degree}) must divide the world size ({world}): the ranks form "
                         f"world_size / ulysses_degree ring groups of ulysses_degree ranks each; use one of "
                         f"{divisors}")


def check_groups(groups, group, ulysses_degree: Optional[int]) -> int:
    """ValueError unless `groups` is hybrid_groups(U, group) for this rank, U = ulysses_degree if given
    (local checks only). Returns U, the size of its Ulysses group."""
    if not isinstance(groups, HybridGroups):
        raise ValueError(f"groups must be the HybridGroups that hybrid_groups(ulysses_degree, group) returns, "
                         f"got {type(groups).__name__}")
    got = tuple(None if g is None or dist.get_rank(g) < 0 else dist.get_process_group_ranks(g) for g in groups)
    parent = dist.get_process_group_ranks(_or_world(group))
    u = len(got[0] or ())
    if ulysses_degree is not None and ulysses_degree != u:
        raise ValueError(f"ulysses_degree ({ulysses_degree}) differs from the size of groups.ulysses ({u}); pass "
                         f"one of them, or groups=hybrid_groups({ulysses_degree}, group)")
    p = parent.index(dist.get_rank())
    want = (parent[p // u * u:(p // u + 1) * u], parent[p % u::u]) if u and len(parent) % u == 0 else None
    if got != want:
        raise ValueError(f"groups do not match group (global ranks {parent}): this rank (global {parent[p]}) "
                         f"has Ulysses group {got[0]} and ring group {got[1]}, which is not the grid that "
                         f"hybrid_groups(ulysses_degree, group) makes for this group; make groups with it, for "
                         "the same group")
    return u


_CACHE: dict = {}


def cached_groups(ulysses_degree: int, group=None) -> HybridGroups:
    """hybrid_groups(ulysses_degree, group) made on the first call and kept (group must be the whole world)."""
    key = (_or_world(group), ulysses_degree)
    if key not in _CACHE:
        _CACHE[key] = hybrid_groups(ulysses_degree, group)
    return _CACHE[key]


def hybrid_attention(q, k, v, lengths: Sequence[int], layout: str, scale: float, left: int, right: int,
                     world: int, groups: HybridGroups):
    """Packed shards q (total_local, h, d), k, v (total_local, hk, d) of sequences of full `lengths` in the
    `world`-rank layout; h, hk divisible by U. Returns out (total_local, h, d) and lse (h, total_local)."""
    u = dist.get_world_size(groups.ulysses)
    perm = group_permutation(layout, world, u, dist.get_rank(groups.ring), lengths, q.device)

    def attend(qf, kf, vf):   # the ring-level shard (U · total_local rows), h / U heads
        return RingAttention.apply(qf, kf, vf, tuple(lengths), layout, scale, left, right, groups.ring)

    return head_parallel(q, k, v, perm, groups.ulysses, attend)
