"""Public functions of flashattn.distributed: checks, the comparison across ranks, dispatch to ring, Ulysses
or hybrid."""
from __future__ import annotations

import numbers
import struct
import zlib
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import masks
from ..api import _check_options, _check_qkv, _check_tensor
from .hybrid import cached_groups, check_degree, check_groups, hybrid_attention
from .layout import LAYOUTS, check_lengths
from .ring import RingAttention
from .ulysses import ulysses_attention

METHODS = ("ring", "ulysses", "hybrid")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# What every rank of the group must agree on, in the order of the signature; how to show a value.
_FIELDS: List[Tuple[str, Callable[[int], str]]] = [
    ("batch size (number of sequences)", str),
    ("local seqlen (rows of q)", str),
    ("nheads of q", str),
    ("nheads of k/v", str),
    ("headdim", str),
    ("dtype", lambda i: str(_DTYPES[i]) if 0 <= i < len(_DTYPES) else "?"),
    ("causal", lambda i: str(bool(i))),
    ("window_size[0]", str),
    ("window_size[1]", str),
    ("layout", lambda i: repr(LAYOUTS[i])),
    ("method", lambda i: repr(METHODS[i])),
    ("ulysses_degree (0: not hybrid)", str),
    ("softmax_scale", lambda i: repr(struct.unpack("<d", struct.pack("<q", i))[0])),
    ("cu_seqlens (crc32 of the values)", hex),
]


def _group_info(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group(...) "
                           "first (backend 'nccl' for CUDA tensors, 'gloo' for CPU tensors)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of `group`: call ring attention only on the ranks of the "
                         "group, or pass the group this rank belongs to")
    return rank, dist.get_world_size(group)


def _check_common(q, softmax_scale, window_size, layout, method, batch: int) -> float:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} (how the caller's shards were cut: zigzag_shard or "
                         f"contiguous chunks), got {layout!r}")
    if method not in METHODS:
        raise ValueError(f"method must be 'ring' (key/value shards travel around the ranks), 'ulysses' "
                         f"(all-to-all between the sequence and the head split) or 'hybrid' (Ulysses groups of "
                         f"ulysses_degree ranks, a ring between them), got {method!r}")
    return _check_options(batch, q.shape[-2], q.shape[-1], q.device, 0.0, softmax_scale, window_size, 0.0, None)


def _check_hybrid(method: str, ulysses_degree, groups, group, world: int) -> int:
    """The Ulysses degree U of a hybrid call (checked; groups, if given, checked against it), 0 otherwise."""
    if method != "hybrid":
        for name, x in (("ulysses_degree", ulysses_degree), ("groups", groups)):
            if x is not None:
                raise ValueError(f"{name} is for method='hybrid', but method={method!r}; pass method='hybrid' "
                                 f"or leave {name} out")
        return 0
    if ulysses_degree is None and groups is None:
        raise ValueError("method='hybrid' needs ulysses_degree=U (ranks per Ulysses group, dividing the world "
                         "size and the head counts) or groups=hybrid_groups(U, group)")
    if ulysses_degree is not None:
        check_degree(ulysses_degree, world)
    if groups is not None:
        return check_groups(groups, group, ulysses_degree)
    if world != dist.get_world_size():
        raise ValueError("method='hybrid' on a subgroup needs groups=hybrid_groups(ulysses_degree, group), made "
                         "on every process of the job (dist.new_group is collective over all of them); with "
                         "ulysses_degree alone the groups are made on the first call, which works only when "
                         "group is the whole world")
    return ulysses_degree


def _check_heads(method: str, nheads: int, nheads_k: int, world: int, degree: int) -> None:
    if method == "hybrid":
        if nheads % degree:
            raise ValueError(f"method='hybrid' gives each rank nheads / ulysses_degree heads, but nheads of q "
                             f"({nheads}) is not divisible by ulysses_degree ({degree}); use a ulysses_degree "
                             f"that divides it, or method='ring'")
        if nheads_k % degree:
            raise ValueError(f"method='hybrid' gives each rank nheads_k / ulysses_degree key/value heads, but nheads "
                             f"of k/v ({nheads_k}) is not divisible by ulysses_degree ({degree}); use a "
                             f"ulysses_degree that divides it, or repeat the k/v heads "
                             f"(k.repeat_interleave(r, dim=-2), v likewise) to a multiple of ulysses_degree")
        return
    if method != "ulysses":
        return
    if nheads % world:
        raise ValueError(f"method='ulysses' gives each rank nheads / world_size heads, but nheads of q ({nheads}) is "
                         f"not divisible by the world size ({world}); use method='ring', or a head count that divides")
    if nheads_k % world:
        raise ValueError(f"method='ulysses' gives each rank nheads_k / world_size key/value heads, but nheads of k/v "
                         f"({nheads_k}) is not divisible by the world size ({world}); use method='ring', or repeat "
                         "the k/v heads (k.repeat_interleave(r, dim=-2), v likewise) to a multiple of the world size "
                         f"that divides nheads ({nheads})")


def _signature(batch, rows, q, k, causal, left, right, layout, method, degree, scale,
               cu: Optional[List[int]]) -> List[int]:
    return [batch, rows, q.shape[-2], k.shape[-2], q.shape[-1], _DTYPES.index(q.dtype), int(causal), left, right,
            LAYOUTS.index(layout), METHODS.index(method), degree, struct.unpack("<q", struct.pack("<d", scale))[0],
            0 if cu is None else zlib.crc32(str(cu).encode())]


def _agree(local: Callable[[], Tuple[List[int], tuple]], group, fn: str, validate: bool) -> tuple:
    """Run the local checks, which return (signature, checked values); with validate, also compare the
    signature across the ranks of the group with one small all_gather, so that a rank's bad argument
    raises on every rank instead of leaving the others waiting. Returns the checked values."""
    if not validate:
        return local()[1]
    try:
        (sig, values), err = local(), None
    except (TypeError, ValueError) as e:
        sig, values, err = [0] * len(_FIELDS), None, e
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([int(err is not None)] + sig, dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    rows = [t.tolist() for t in every]
    if err is not None:
        raise err
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"rank(s) {failed} of the group rejected their arguments to {fn} (their error says why); "
                         "every rank must pass valid shards")
    for i, (name, show) in enumerate(_FIELDS):
        seen = [row[1 + i] for row in rows]
        if len(set(seen)) > 1:
            shown = ", ".join(f"rank {r}: {show(x)}" for r, x in enumerate(seen))
            raise ValueError(f"{name} differs across the ranks of the group ({shown}); every rank must call {fn} "
                             "with its shard of the same batch, of the same shapes, and the same options")
    return values


def _run(q, k, v, cu: List[int], scale, causal, left, right, layout, method, deterministic, group, degree, groups):
    lengths = tuple(b - a for a, b in zip(cu, cu[1:]))
    if method == "ring":
        return RingAttention.apply(q, k, v, lengths, layout, scale, left, right, group)
    if method == "hybrid":
        groups = groups if groups is not None else cached_groups(degree, group)
        return hybrid_attention(q, k, v, lengths, layout, scale, left, right, dist.get_world_size(group), groups)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=q.device)
    return ulysses_attention(q, k, v, cu_t, lengths, layout, scale, causal, (left, right), deterministic, group)


def ring_flash_attn_func(q, k, v, group=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                         deterministic=False, return_lse=False, layout="zigzag", method="ring", validate=True,
                         ulysses_degree=None, groups=None):
    """Exact attention over a sequence sharded across the ranks of a process group (context parallelism).

    Every rank calls it with its shard; the result is each rank's shard of flash_attn_func over the full
    sequence. World size W (of `group`).

    Arguments:
        q: (batch, seqlen_local, nheads, headdim), this rank's shard of the queries:
            seqlen_local = seqlen / W tokens of every sequence of the batch, in `layout`.
        k, v: (batch, seqlen_local, nheads_k, headdim), the shards of the same positions
            (self-attention: one sequence sharded one way). nheads a multiple of nheads_k (GQA).
        group: the torch.distributed process group (default: the whole world); any size.
        softmax_scale: default 1 / sqrt(headdim).
        causal, window_size: as in flash_attn_func, over the FULL sequence's positions (causal aligned
            bottom-right, which for one sequence of q and k is the ordinary causal mask).
        deterministic: accepted; the ring sums in a fixed order, so the backward is deterministic.
        return_lse: also return the log-sum-exp (batch, nheads, seqlen_local), float32 (float64 for float64).
        layout: 'zigzag' (rank r holds chunks r and 2W-1-r of 2W: balanced causal work; cut with
            flashattn.distributed.zigzag_shard) or 'contiguous' (rank r holds chunk r of W).
        method: 'ring' (key/value shards travel around the ranks, send/recv overlapping the compute),
            'ulysses' (all-to-all to nheads / W heads over the full sequence; nheads and nheads_k
            divisible by W) or 'hybrid' (Ulysses all-to-all inside groups of U = ulysses_degree
            consecutive ranks, then the ring over the W / U groups on nheads / U heads; U = 1 is 'ring',
            U = W is 'ulysses'; nheads and nheads_k divisible by U).
        validate: compare shapes and options across the ranks (one small all_gather, which waits for
            the device); an inconsistent call then raises ValueError on every rank instead of hanging.
            Pass False once a set-up is known to be right.
        ulysses_degree: U for method='hybrid', dividing W. Alone, the first call makes the groups
            (hybrid_groups(U, group), a new_group collective; group must then be the whole world) and
            keeps them for later calls.
        groups: for method='hybrid', the HybridGroups from hybrid_groups(U, group), made beforehand
            (needed on a subgroup); ulysses_degree then defaults to its Ulysses groups' size.
    Return:
        out: (batch, seqlen_local, nheads, headdim), this rank's shard of the output; and lse if asked.
    """
    _, world = _group_info(group)
    causal = bool(causal)

    def local():
        _check_qkv(q, k, v)
        b, s, h, _ = q.shape
        if k.shape[1] != s:
            raise ValueError(f"k and v must have q's local seqlen ({s}): ring attention shards one sequence for "
                             f"q, k and v alike, got {k.shape[1]}")
        scale = _check_common(q, softmax_scale, window_size, layout, method, b)
        check_lengths(layout, world, [s * world], what=f"the full sequence (seqlen_local {s} x world_size {world})")
        degree = _check_hybrid(method, ulysses_degree, groups, group, world)
        _check_heads(method, h, k.shape[2], world, degree)
        left, right = masks.window_bounds(causal, window_size)
        sig = _signature(b, s, q, k, causal, left, right, layout, method, degree, scale, None)
        return sig, (scale, left, right, degree)

    scale, left, right, degree = _agree(local, group, "ring_flash_attn_func", validate)
    b, s, h, d = q.shape
    cu = [i * s * world for i in range(b + 1)]
    out, lse = _run(q.reshape(b * s, h, d), k.reshape(b * s, k.shape[2], d), v.reshape(b * s, k.shape[2], d), cu,
                    scale, causal, left, right, layout, method, deterministic, group, degree, groups)
    out = out.view(b, s, h, d)
    lse = lse.view(h, b, s).transpose(0, 1).contiguous()
    return (out, lse) if return_lse else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, group=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), deterministic=False, return_lse=False, layout="zigzag",
                                method="ring", validate=True, ulysses_degree=None, groups=None):
    """`ring_flash_attn_func` for a packed batch of sequences of different lengths.

    Arguments:
        q: (total_local, nheads, headdim): this rank's shard of every sequence, sequence after sequence:
            sequence i's length_i / W tokens start at row cu_seqlens[i] / W (what
            flashattn.distributed.shard(x, rank, W, layout, dim=0, cu_seqlens=cu_seqlens) gives).
        k, v: (total_local, nheads_k, headdim), the same rows.
        cu_seqlens: (batch + 1,) int32 on q's device, the cumulative lengths of the FULL sequences (the
            same on every rank), starting at 0; each length divisible by W ('contiguous') or 2W ('zigzag').
        max_seqlen: int, at least the longest full sequence.
        Other arguments as in ring_flash_attn_func; masks apply within each sequence.
    Return:
        out: (total_local, nheads, headdim); lse (nheads, total_local) if return_lse.
    """
    _, world = _group_info(group)
    causal = bool(causal)
    cu_list: List[int] = []

    def local():
        layout3 = "(total_local, nheads, headdim)"
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, x, layout3, ndim=3)
        _check_qkv(q[None], k[None], v[None])
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k and v must have q's rows ({q.shape[0]}): ring attention shards one packed batch "
                             f"for q, k and v alike, got {k.shape[0]}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
                or cu_seqlens.numel() < 2:
            got = (f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}" if isinstance(cu_seqlens, torch.Tensor)
                   else type(cu_seqlens).__name__)
            raise TypeError(f"cu_seqlens must be an int32 tensor of shape (batch + 1,), got {got}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; move it with .to(q.device)")
        cu_list[:] = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(cu_list, cu_list[1:])]
        if cu_list[0] != 0 or min(lengths) < 0:
            raise ValueError(f"cu_seqlens must start at 0 and never decrease (cumulative lengths of the full "
                             f"sequences), got {cu_list}")
        if cu_list[-1] != q.shape[0] * world:
            raise ValueError(f"cu_seqlens ends at {cu_list[-1]} tokens, but this rank's shard q has {q.shape[0]} rows "
                             f"and world_size is {world}: cu_seqlens describes the FULL sequences, of "
                             f"{q.shape[0] * world} tokens in all")
        check_lengths(layout, world, lengths)
        if not isinstance(max_seqlen, numbers.Integral) or isinstance(max_seqlen, bool) or max_seqlen < max(lengths):
            raise ValueError(f"max_seqlen must be an int at least the longest full sequence ({max(lengths)}), "
                             f"got {max_seqlen!r}")
        scale = _check_common(q, softmax_scale, window_size, layout, method, len(lengths))
        degree = _check_hybrid(method, ulysses_degree, groups, group, world)
        _check_heads(method, q.shape[1], k.shape[1], world, degree)
        left, right = masks.window_bounds(causal, window_size)
        sig = _signature(len(lengths), q.shape[0], q, k, causal, left, right, layout, method, degree, scale,
                         cu_list)
        return sig, (scale, left, right, degree)

    scale, left, right, degree = _agree(local, group, "ring_flash_attn_varlen_func", validate)
    out, lse = _run(q, k, v, cu_list, scale, causal, left, right, layout, method, deterministic, group, degree,
                    groups)
    return (out, lse) if return_lse else out

