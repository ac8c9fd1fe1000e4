"""Ulysses (DeepSpeed-Ulysses) attention: trade the sequence split for a head split with all-to-all.

World size W, nheads and nheads_k divisible by W. Each rank holds a shard of every sequence with all
heads; one all_to_all gives each rank the full sequences for nheads / W heads (head group r goes to rank
r), local attention runs there with flashattn's normal function, and the reverse all_to_all brings the
output back to the sequence split. The backward pass of an all-to-all is the reverse all-to-all.
Communication is three inputs and one output per pass (not overlapped with compute); compute is one
ordinary attention call per rank, so the causal work is balanced whatever the layout.

Tensors are packed as in ring.py: (total, nheads, headdim) shards of sequences of full `lengths`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..api import flash_attn_varlen_func
from .layout import permutation


def all_to_all(x: torch.Tensor, to_heads: bool, perm: torch.Tensor, group) -> torch.Tensor:
    """to_heads: this rank's shard x (total_local, h, d) -> the group's rows (total, h / W, d) of head
    group `rank` (W = the group's size, total = W · total_local), row perm[p] holding row p of the
    rank-ordered shards. Otherwise the reverse: (total, g, d) -> (total_local, g·W, d).
    perm: layout.permutation (Ulysses: the full sequences in position order) or layout.group_permutation
    (hybrid: the ring-level shard)."""
    world = dist.get_world_size(group)
    x = x.contiguous()
    if to_heads:
        t, h, d = x.shape
        send = x.view(t, world, h // world, d).transpose(0, 1).contiguous()   # block j: head group j, to rank j
        recv = torch.empty_like(send)                                         # block j: rank j's rows
        dist.all_to_all_single(recv, send, group=group)
        full = torch.empty((world * t, h // world, d), dtype=x.dtype, device=x.device)
        return full.index_copy_(0, perm, recv.view(world * t, h // world, d))
    total, g, d = x.shape
    send = x.index_select(0, perm)                          # rank-ordered: block j holds rank j's rows
    recv = torch.empty_like(send)                           # block j: head group j of this rank's rows
    dist.all_to_all_single(recv, send, group=group)
    return recv.view(world, total // world, g, d).transpose(0, 1).reshape(total // world, world * g, d)


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, to_heads, perm, group):
        ctx.args = (to_heads, perm, group)
        return all_to_all(x, to_heads, perm, group)

    @staticmethod
    def backward(ctx, grad):
        to_heads, perm, group = ctx.args
        return all_to_all(grad, not to_heads, perm, group), None, None, None


def head_parallel(q, k, v, perm: torch.Tensor, group, attend):
    """All-to-all over `group` (size W) from a sequence split to a head split, attend(qf, kf, vf) on
    nheads / W heads of the group's rows, all-to-all back. q (total_local, h, d), k, v (total_local, hk, d);
    attend gets (W · total_local, h / W, d) and (…, hk / W, d) in perm's order and returns out and lse
    (h / W, W · total_local). Returns out (total_local, h, d), differentiable, and lse (h, total_local)."""
    qf, kf, vf = (AllToAll.apply(x, True, perm, group) for x in (q, k, v))
    out, lse = attend(qf, kf, vf)
    out = AllToAll.apply(out, False, perm, group)
    with torch.no_grad():   # lse (h / W, total) -> (h, total_local), as a (total, h / W, 1) tensor
        lse = all_to_all(lse.t().unsqueeze(-1), False, perm, group).squeeze(-1).t().contiguous()
    return out, lse


def ulysses_attention(q, k, v, cu_seqlens: torch.Tensor, lengths: Sequence[int], layout: str, scale: float,
                      causal: bool, window_size, deterministic: bool, group):
    """Packed shards q (total_local, h, d), k, v (total_local, hk, d); cu_seqlens the full sequences'
    (batch + 1,) int32 on q's device. Returns out (total_local, h, d) and lse (h, total_local)."""
    world = dist.get_world_size(group)
    perm = permutation(layout, world, lengths, q.device)
    longest = max(lengths)

    def attend(qf, kf, vf):
        out, lse, _ = flash_attn_varlen_func(qf, kf, vf, cu_seqlens, cu_seqlens, longest, longest,
                                             softmax_scale=scale, causal=causal, window_size=window_size,
                                             deterministic=deterministic, return_attn_probs=True)
        return out, lse

    return head_parallel(q, k, v, perm, group, attend)
