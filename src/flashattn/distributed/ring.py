"""Ring attention: key/value shards travel around a ring of ranks while each rank attends its queries.

World size W. Rank r keeps its query shard; at step t = 0 … W-1 it holds the key/value shard of rank
src = (r - t) mod W, attends its queries to it with the local kernels (flashattn::fwd), and merges the
partial result into a running (out, lse) with the block-merge formula (flashattn.combine.merge). The
shard for step t + 1 is sent (to r + 1) and received (from r - 1) with asynchronous point-to-point ops
launched *before* step t's attention, so the transfer overlaps the compute.

Backward: the same ring once more. Each block's gradient is flashattn::bwd with the GLOBAL out and lse
(P = exp(S − lse) is then the block of the full softmax, and Δ = rowsum(dO ∘ O) the full row's), so
the blocks' dQ simply add up. dK/dV of a shard are summed as they travel: at step t rank r receives from
r - 1 the sums for shard r - t, adds its own block, and passes them on; after W steps they reach the
shard's owner. Sums run in a fixed order: the backward is deterministic.

Work per step: a sequence's score matrix, cut by the layout into (query piece × key piece) blocks, is
attended block by block; each block is trimmed to its visible pairs (masks.visible_box) and given the
window that restates the full mask inside it (masks.block_window), so invisible blocks cost nothing.
Blocks of one step with the same window go into one packed (varlen) call: sequences of the call are the
blocks, with empty sequences covering the rows and keys between them.
All tensors here are packed: q (total, nheads, headdim), k, v (total, nheads_k, headdim), this rank's
shard of sequences whose full lengths are `lengths` (layout.py: sequence i starts at row
sum(lengths[:i]) / W); lse (nheads, total).
"""
from __future__ import annotations

import functools
import itertools
from typing import List, NamedTuple, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import masks, ops
from ..api import choose_backend
from ..combine import merge
from .layout import pieces

# Benchmarks set this to False to measure the exposed communication: each transfer then completes
# before the step's attention starts.
OVERLAP = True


class Ring:
    """Point-to-point exchange with the ring neighbours of a process group: send to rank + 1, receive
    from rank - 1 (ranks within the group; the ops address global ranks)."""

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.world)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.world)

    def start(self, tensors: Sequence[torch.Tensor]):
        """Launch sending `tensors` (contiguous) to the next rank and receiving as many from the previous one."""
        if self.world == 1:
            return tuple(tensors), [], ()
        bufs = tuple(torch.empty_like(t) for t in tensors)
        p2p = ([dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
               + [dist.P2POp(dist.irecv, b, self.prev, self.group) for b in bufs])
        pending = bufs, dist.batch_isend_irecv(p2p), tuple(tensors)   # the sent tensors stay alive until finish
        return pending if OVERLAP else (self.finish(pending), [], ())

    @staticmethod
    def finish(pending) -> Tuple[torch.Tensor, ...]:
        """Wait for an exchange started by `start`; returns the received tensors."""
        bufs, works, _ = pending
        for w in works:
            w.wait()
        return bufs


class Call(NamedTuple):
    """One packed attention call of a ring step: its sequences are blocks sharing one window."""
    left: int
    right: int
    cu_q: Tuple[int, ...]        # cumulative rows of q per sequence of the call (blocks and gaps)
    cu_k: Tuple[int, ...]
    max_q: int
    max_k: int
    q_span: Tuple[int, int]      # rows of q the call's blocks cover
    k_span: Tuple[int, int]      # rows of k and v


def _call(window: Tuple[int, int], blocks: List[Tuple[int, int, int, int]]) -> Call:
    cu_q, cu_k = [0], [0]
    for q_lo, q_hi, k_lo, k_hi in blocks:   # increasing in both q and k rows
        if q_lo > cu_q[-1]:   # rows between blocks: a sequence with no keys (out 0, lse -inf: merges as nothing)
            cu_q.append(q_lo)
            cu_k.append(cu_k[-1])
        if k_lo > cu_k[-1]:   # keys between blocks: a sequence with no queries
            cu_q.append(cu_q[-1])
            cu_k.append(k_lo)
        cu_q.append(q_hi)
        cu_k.append(k_hi)
    max_q = max(b - a for a, b in zip(cu_q, cu_q[1:]))
    max_k = max(b - a for a, b in zip(cu_k, cu_k[1:]))
    return Call(window[0], window[1], tuple(cu_q), tuple(cu_k), max_q, max_k, (blocks[0][0], blocks[-1][1]),
                (blocks[0][2], blocks[-1][3]))


def _coalesce_full(blocks):
    """Join fully visible blocks of one sequence that share their rows and have adjacent keys (or share their
    keys and have adjacent rows): one larger call instead of two (zigzag causal: every step but the first
    then makes one call of c x 2c or 2c x c instead of two of c x c)."""
    blocks = list(blocks)
    joined = True
    while joined:
        joined = False
        for i, j in itertools.permutations(range(len(blocks)), 2):
            (wi, qa, qb, ka, kb), (wj, qc, qd, kc, kd) = blocks[i], blocks[j]
            if wi == wj == (-1, -1) and (((qa, qb) == (qc, qd) and kb == kc) or ((ka, kb) == (kc, kd) and qb == qc)):
                blocks[i] = (wi, min(qa, qc), max(qb, qd), min(ka, kc), max(kb, kd))
                del blocks[j]
                joined = True
                break
    return blocks


@functools.lru_cache(maxsize=1024)
def step_calls(lengths: Tuple[int, ...], rank: int, src: int, world_size: int, layout: str, left: int,
               right: int) -> Tuple[Call, ...]:
    """The attention calls of rank `rank`'s queries against rank `src`'s keys, for sequences of full
    `lengths` in `layout`, under the window (left, right) of the full sequences (-1 = unlimited)."""
    blocks = []   # (window, q_lo, q_hi, k_lo, k_hi) in local rows
    base = 0      # first local row of the sequence
    for n in lengths:
        mine = []
        for gq, lq, cq in pieces(layout, rank, world_size, n):
            for gk, lk, ck in pieces(layout, src, world_size, n):
                box = masks.visible_box(gq, gq + cq, gk, gk + ck, n, n, left, right)
                if box is None:
                    continue
                a, b, c, d = box
                if masks.block_is_full(a, b, c, d, n, n, left, right):
                    window = (-1, -1)
                else:
                    window = masks.block_window(a, b, c, d, n, n, left, right)
                mine.append((window, base + lq + a - gq, base + lq + b - gq, base + lk + c - gk, base + lk + d - gk))
        blocks += _coalesce_full(mine)
        base += n // world_size
    chains: List[Tuple[Tuple[int, int], List[Tuple[int, int, int, int]]]] = []
    for window, *box in sorted(blocks):   # by window, then by first row: first fit into increasing chains
        for w, chain in chains:
            if w == window and chain[-1][1] <= box[0] and chain[-1][3] <= box[2]:
                chain.append(tuple(box))
                break
        else:
            chains.append((window, [tuple(box)]))
    return tuple(_call(w, chain) for w, chain in chains)


def _on_device(calls: Sequence[Call], device) -> List[Tuple[Call, torch.Tensor, torch.Tensor]]:
    return [(c, torch.tensor(c.cu_q, dtype=torch.int32, device=device),
             torch.tensor(c.cu_k, dtype=torch.int32, device=device)) for c in calls]


def _fwd(q, k, v, scale, call: Call, cu_q, cu_k, backend):
    return ops.fwd(q, k, v, scale, call.left, call.right, 0.0, None, cu_q, cu_k, call.max_q, call.max_k, 0, 0.0,
                   None, None, None, None, None, backend)


def _bwd(dout, q, k, v, out, lse, scale, call: Call, cu_q, cu_k, backend):
    return ops.bwd(dout, q, k, v, out, lse, scale, call.left, call.right, 0.0, None, cu_q, cu_k, call.max_q,
                   call.max_k, 0, 0.0, None, None, None, None, None, backend)


class RingAttention(torch.autograd.Function):
    """(q, k, v, lengths, layout, scale, left, right, group) -> (out (total, h, d), lse (h, total))."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, layout, scale, left, right, group):
        ring = Ring(group)
        backend = choose_backend(q)
        k, v = k.contiguous(), v.contiguous()   # they travel
        plan = [_on_device(step_calls(lengths, ring.rank, (ring.rank - t) % ring.world, ring.world, layout, left,
                                      right), q.device) for t in range(ring.world)]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape, dtype=acc, device=q.device)                    # (total, h, d)
        lse = torch.full(q.shape[:2], float("-inf"), dtype=acc, device=q.device)  # (total, h)
        kv = (k, v)
        for t in range(ring.world):
            pending = ring.start(kv) if t + 1 < ring.world else None   # next shard travels during this step
            for call, cu_q, cu_k in plan[t]:
                o, l = _fwd(q, kv[0], kv[1], scale, call, cu_q, cu_k, backend)
                lo, hi = call.q_span
                out[lo:hi], lse[lo:hi] = merge(out[lo:hi], lse[lo:hi], o[lo:hi], l[:, lo:hi].t())
            if pending is not None:
                kv = ring.finish(pending)
        out = out.to(q.dtype)
        lse = lse.t().contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup = (ring, plan, scale, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # lse is returned for inspection and merging; gradients flow through out only (as in flashattn::fwd)
        q, k, v, out, lse = ctx.saved_tensors
        ring, plan, scale, backend = ctx.setup
        dout = dout.contiguous()
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv, dkv_pending = (k, v), None
        for t in range(ring.world):
            pending = ring.start(kv) if t + 1 < ring.world else None
            dk = torch.zeros(k.shape, dtype=acc, device=k.device)   # this step's shard: rank (r - t)'s
            dv = torch.zeros(v.shape, dtype=acc, device=v.device)
            for call, cu_q, cu_k in plan[t]:
                gq, gk, gv = _bwd(dout, q, kv[0], kv[1], out, lse, scale, call, cu_q, cu_k, backend)
                (a, b), (c, d) = call.q_span, call.k_span
                dq[a:b] += gq[a:b]
                dk[c:d] += gk[c:d]
                dv[c:d] += gv[c:d]
            if dkv_pending is not None:   # the sums for this shard from the ranks before, sent last step
                dk_before, dv_before = ring.finish(dkv_pending)
                dk += dk_before
                dv += dv_before
            dkv_pending = ring.start((dk, dv))
            if pending is not None:
                kv = ring.finish(pending)
        dk, dv = ring.finish(dkv_pending)   # the last send brings every shard's sums home
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
