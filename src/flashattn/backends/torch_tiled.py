"""FlashAttention in PyTorch ops: the tiled online-softmax loop, forward and backward.

Runs on any torch device; it is the fallback when no kernel applies. Work per step is one
(block_q × block_k) tile for all (batch, head) pairs at once, so the peak extra memory is
O(batch · heads · block_q · block_k) (capped by TILE_BYTES), never O(seqlen²).

Query rows are packed per key/value head: the `group = nheads // nheads_k` query heads that share one
key/value head form the rows of one (group · block_q, block_k) tile (GQA packing), so each key/value
block is read once per group and dK, dV sum over the group inside the matmuls.
Blocks are computed in float32 (float64 for float64 inputs, so the path stays exact enough for gradcheck).

FP8 inputs (float8_e4m3fn with a (b, hk, 3) `descale`) follow the definition: each tile is dequantized
to float32 (stored value × its descale factor) and attended exactly, with no quantization of P; the
output is in `out_dtype`, the gradients (experimental) in dout's dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import dropout, masks
from ..blocksparse import BlockMask
from ..masks import lse_dtype

# Tile sizes. Large tiles amortize Python overhead on the CPU; memory stays O(block_q · block_k).
BLOCK_Q = 256
BLOCK_K = 512
# Cap on one float32 score tile over all (batch, head) pairs: block_q shrinks for big batch · heads so
# that the few tile-sized temporaries stay bounded (64 MiB each) instead of growing with batch · heads.
TILE_BYTES = 64 * 2**20


def _tiles(geo, block_q: Optional[int], block_k: Optional[int]) -> Tuple[int, int]:
    """(block_q, block_k): a block mask's own tiles, else block_q from TILE_BYTES unless given; BLOCK_Q and
    BLOCK_K are read here, at call time, so that tests can shrink the tiles of the public API's calls."""
    if geo.block_mask is not None:
        return geo.block_mask.block_size
    block_k = BLOCK_K if block_k is None else block_k
    if block_q is not None:
        return block_q, block_k
    rows = TILE_BYTES // (4 * geo.b * geo.hk * geo.g * block_k)
    return max(16, min(BLOCK_Q, rows)), block_k


class SoftmaxState(NamedTuple):
    """Running state of one query block: row max m, row sum l (both (..., Bq)), unnormalized acc (..., Bq, d)."""
    m: torch.Tensor
    l: torch.Tensor
    acc: torch.Tensor


class Step(NamedTuple):
    """What one key/value block did to the state (exposed for `flashattn explain`)."""
    state: SoftmaxState
    alpha: torch.Tensor   # exp(m_old - m_new): rescales the old l and acc
    p: torch.Tensor       # exp(s - m_new): this block's unnormalized probabilities


def init_state(shape_rows, headdim: int, device, dtype=torch.float32) -> SoftmaxState:
    return SoftmaxState(
        m=torch.full(shape_rows, float("-inf"), device=device, dtype=dtype),
        l=torch.zeros(shape_rows, device=device, dtype=dtype),
        acc=torch.zeros((*shape_rows, headdim), device=device, dtype=dtype),
    )


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 instead keeps exp() at 0, not NaN.
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def online_softmax_step(state: SoftmaxState, s: torch.Tensor, v: torch.Tensor,
                        overwrite_scores: bool = False, dropout_scale: Optional[torch.Tensor] = None) -> Step:
    """The online-softmax update for one block of scores s (..., Bq, Bk) and values v (..., Bk, d).

    overwrite_scores=True turns s into p in place (one pass less over the tile; the loops use it).
    dropout_scale (like s): keep / (1 - dropout_p); it scales what reaches v, never the row sum l.
    """
    # -- update m: the new running max
    m_new = torch.maximum(state.m, s.amax(dim=-1))
    m_safe = _finite_or_zero(m_new)
    # -- rescale what was accumulated under the old max, add this block
    alpha = torch.exp(state.m - m_safe)
    p = s if overwrite_scores else s.clone()
    p = p.sub_(m_safe[..., None]).exp_()
    l = state.l * alpha + p.sum(dim=-1)
    acc = state.acc * alpha[..., None]
    acc += torch.matmul(p if dropout_scale is None else p * dropout_scale, v)
    return Step(SoftmaxState(m_new, l, acc), alpha, p)


def finish(state: SoftmaxState) -> Tuple[torch.Tensor, torch.Tensor]:
    """out = acc / l and lse = m + log l; rows that saw no key give 0 and -inf."""
    l = state.l
    out = state.acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
    lse = _finite_or_zero(state.m) + torch.log(l)
    return out, lse


class _Geometry(NamedTuple):
    ct: torch.dtype   # compute dtype
    b: int
    sq: int
    sk: int
    hk: int
    g: int
    d: int
    left: int
    right: int
    num_sink: int
    dropout_p: float
    seed: int
    batch_offset: int   # index of batch entry 0 in the dropout hash (a sequence of a packed batch)
    global_flags: Optional[torch.Tensor]
    block_mask: Optional[BlockMask]


def _descales(descale: Optional[torch.Tensor], geo: _Geometry):
    """The q, k, v descale factors of FP8 inputs as (b, hk, 1, 1) tensors in the compute dtype (they
    broadcast against the (b, hk, rows, d) tiles), or three Nones."""
    if descale is None:
        return None, None, None
    d = descale.to(geo.ct)
    return tuple(d[..., i, None, None] for i in range(3))


def _scaled(x: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
    return x if factor is None else x * factor


def _geometry(q, k, window_left, window_right, num_sink=0, dropout_p=0.0, seed=0, batch_offset=0,
              global_flags=None, block_mask=None) -> _Geometry:
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _Geometry(ct, b, sq, sk, hk, h // hk, d, window_left, window_right, num_sink, dropout_p, seed,
                     batch_offset, global_flags, block_mask)


def _q_rows(x: torch.Tensor, q0: int, q1: int, geo: _Geometry) -> torch.Tensor:
    """Rows [q0, q1) of a (b, s, h, d) tensor in the compute dtype as (b, hk, g·(q1-q0), d): the query heads that
    share one key/value head are stacked as rows of one tile (GQA packing), head-major.
    May be a view of x: never modify it in place."""
    blk = x[:, q0:q1].to(geo.ct).reshape(geo.b, q1 - q0, geo.hk, geo.g, x.shape[-1])
    return blk.permute(0, 2, 3, 1, 4).reshape(geo.b, geo.hk, geo.g * (q1 - q0), x.shape[-1])


def _rows_to_heads(x: torch.Tensor, geo: _Geometry, n: int) -> torch.Tensor:
    """(b, hk, g·n, ...) -> (b, n, h, ...): the inverse of _q_rows' packing."""
    x = x.reshape(geo.b, geo.hk, geo.g, n, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim())).reshape(geo.b, n, geo.hk * geo.g, *x.shape[4:])


def _kv(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(b, sk, hk, d) -> contiguous (b, hk, sk, d) in the compute dtype, once per call (O(seqlen · d) memory)."""
    return x.to(geo.ct).transpose(1, 2).contiguous()


def _row_slopes(alibi_slopes: Optional[torch.Tensor], geo: _Geometry) -> Optional[torch.Tensor]:
    """ALiBi slopes as (b or 1, hk, g, 1): broadcast against a tile's (g, rows) layout."""
    if alibi_slopes is None:
        return None
    s = alibi_slopes.to(geo.ct)
    s = s[None] if s.dim() == 1 else s
    return s.view(s.shape[0], geo.hk, geo.g, 1)


def _scores(qs, kb, q0, q1, k0, k1, geo: _Geometry, softcap, slopes):
    """Capped, biased and masked scores of one tile from pre-scaled query rows qs (b, hk, g·bq, d).

    Returns s (b, hk, g·bq, bk) and, with softcap, tanh of the cap (for its derivative).
    """
    s = torch.matmul(qs, kb.transpose(-1, -2))
    t = None
    if softcap != 0.0:
        t = torch.tanh(s.div_(softcap))
        s = t * softcap
    qi = torch.arange(q0, q1, device=qs.device)[:, None]
    kj = torch.arange(k0, k1, device=qs.device)[None, :]
    if slopes is not None:   # (b|1, hk, g, 1, 1) · (bq, bk) -> (b|1, hk, g·bq, bk)
        bias = masks.alibi_bias(slopes.squeeze(-1), qi, kj, geo.sq, geo.sk)
        s = s + bias.reshape(bias.shape[0], geo.hk, geo.g * (q1 - q0), k1 - k0)
    # global tokens only add visibility: a tile the window sees whole stays whole
    if not masks.block_is_full(q0, q1, k0, k1, geo.sq, geo.sk, geo.left, geo.right):
        hidden = ~masks.visible(qi, kj, geo.sq, geo.sk, geo.left, geo.right, geo.num_sink, geo.global_flags)
        s = s.masked_fill_(hidden.repeat(geo.g, 1), float("-inf"))
    if geo.block_mask is not None:   # tiles are the block mask's own: (q0, k0) is one of its tiles
        bq, bk = geo.block_mask.block_size
        tile = geo.block_mask.tile(q0 // bq, k0 // bk)[..., :q1 - q0, :k1 - k0]          # (B|1, H|1, bq, bk)
        tile = tile.expand(geo.b, geo.hk * geo.g, q1 - q0, k1 - k0).reshape(geo.b, geo.hk, geo.g * (q1 - q0), k1 - k0)
        s = s.masked_fill_(~tile, float("-inf"))
    return s, t


def _dropout_scale(q0, q1, k0, k1, geo: _Geometry, device) -> Optional[torch.Tensor]:
    """keep / (1 - dropout_p) of one tile, (b, hk, g·bq, bk) like the scores; None without dropout."""
    if geo.dropout_p == 0.0:
        return None
    ar = lambda n: torch.arange(n, device=device)   # noqa: E731
    # flat query-head index (batch · nheads + head) of each row block, head = hk · g + group member
    bh = ((geo.batch_offset + ar(geo.b))[:, None, None] * (geo.hk * geo.g) + ar(geo.hk)[None, :, None] * geo.g
          + ar(geo.g)[None, None, :])[..., None, None]
    keep = dropout.keep_mask(geo.seed, bh, ar(q1)[q0:, None], ar(k1)[None, k0:], geo.dropout_p)
    return keep.reshape(geo.b, geo.hk, geo.g * (q1 - q0), k1 - k0).to(geo.ct) / (1.0 - geo.dropout_p)


def _key_blocks(q0: int, q1: int, geo: _Geometry, block_k: int):
    """[k0, k1) tiles of the keys queries [q0, q1) may see (masks.key_ranges: sinks, then the window;
    with a block mask, its tiles present for some batch entry and head)."""
    if geo.block_mask is not None:
        bq, bk = geo.block_mask.block_size
        present = geo.block_mask.layout[:, :, q0 // bq].flatten(0, 1).any(0)
        for kb in present.nonzero().flatten().tolist():
            yield kb * bk, min(kb * bk + bk, geo.sk)
        return
    for lo, hi in masks.key_ranges(q0, q1, geo.sq, geo.sk, geo.left, geo.right, geo.num_sink,
                                   geo.global_flags is not None):
        for k0 in range(lo, hi, block_k):
            yield k0, min(k0 + block_k, hi)


def forward(q, k, v, softmax_scale: float, window_left: int = -1, window_right: int = -1,
            softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, num_sink: int = 0,
            dropout_p: float = 0.0, dropout_seed: int = 0, batch_offset: int = 0,
            global_flags: Optional[torch.Tensor] = None, block_mask: Optional[BlockMask] = None,
            block_q: Optional[int] = None, block_k: Optional[int] = None, descale: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q: (b, sq, h, d); k, v: (b, sk, hk, d). Returns out (b, sq, h, d) in q.dtype, lse (b, h, sq) float32
    (float64 for float64 inputs).

    block_q defaults to BLOCK_Q, smaller when batch · heads would make a tile exceed TILE_BYTES.
    FP8: q, k, v float8_e4m3fn, descale (b, hk, 3) float32 (q, k, v factors per batch entry and kv head),
    out in out_dtype."""
    geo = _geometry(q, k, window_left, window_right, num_sink, dropout_p, dropout_seed, batch_offset, global_flags,
                    block_mask)
    block_q, block_k = _tiles(geo, block_q, block_k)
    qd, kd, vd = _descales(descale, geo)
    kh, vh = _scaled(_kv(k, geo), kd), _scaled(_kv(v, geo), vd)
    slopes = _row_slopes(alibi_slopes, geo)
    if descale is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty((geo.b, geo.sq, geo.hk * geo.g), device=q.device, dtype=lse_dtype(q.dtype))
    for q0 in range(0, geo.sq, block_q):
        q1 = min(q0 + block_q, geo.sq)
        # the scale folded into q (never in place: may be a view of q)
        qs = _q_rows(q, q0, q1, geo) * (softmax_scale if qd is None else qd * softmax_scale)
        state = init_state(qs.shape[:-1], geo.d, q.device, geo.ct)
        for k0, k1 in _key_blocks(q0, q1, geo, block_k):   # blocks no query here can see are never touched
            s, _ = _scores(qs, kh[:, :, k0:k1], q0, q1, k0, k1, geo, softcap, slopes)
            state = online_softmax_step(state, s, vh[:, :, k0:k1], overwrite_scores=True,
                                        dropout_scale=_dropout_scale(q0, q1, k0, k1, geo, q.device)).state
        o, l = finish(state)
        out[:, q0:q1] = _rows_to_heads(o, geo, q1 - q0)
        lse[:, q0:q1] = _rows_to_heads(l, geo, q1 - q0)
    return out, lse.transpose(1, 2).contiguous()


def backward(dout, q, k, v, out, lse, softmax_scale: float, window_left: int = -1, window_right: int = -1,
             softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None, num_sink: int = 0,
             dropout_p: float = 0.0, dropout_seed: int = 0, batch_offset: int = 0,
             global_flags: Optional[torch.Tensor] = None, block_mask: Optional[BlockMask] = None,
             block_q: Optional[int] = None, block_k: Optional[int] = None,
             descale: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients by recomputation: P = exp(S - lse) tile by tile, never stored whole.

    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP − Δ) with Δ = rowsum(dO ∘ O);  dQ = dS K · scale;  dK = dSᵀ Q · scale.
    With GQA rows packed per key/value head, the matmuls for dK and dV also sum over the group.
    Returns dq, dk, dv in the inputs' dtypes and shapes. Deterministic (a fixed loop order).
    FP8 inputs (descale given): the gradients of the dequantized inputs, in dout's dtype.
    """
    geo = _geometry(q, k, window_left, window_right, num_sink, dropout_p, dropout_seed, batch_offset, global_flags,
                    block_mask)
    block_q, block_k = _tiles(geo, block_q, block_k)
    qd, kd, vd = _descales(descale, geo)
    kh, vh = _scaled(_kv(k, geo), kd), _scaled(_kv(v, geo), vd)
    grad_dtypes = (q.dtype, k.dtype, v.dtype) if descale is None else (dout.dtype,) * 3
    slopes = _row_slopes(alibi_slopes, geo)
    # per-row statistics in (b, s, h, 1) so that _q_rows packs them like q
    lse_rows = _finite_or_zero(lse.transpose(1, 2))[..., None]   # rows with lse = -inf have P = 0 anyway
    delta_rows = (dout.to(geo.ct) * out.to(geo.ct)).sum(dim=-1, keepdim=True)
    dq = torch.empty((geo.b, geo.sq, geo.hk * geo.g, geo.d), device=q.device, dtype=grad_dtypes[0])
    dk = torch.zeros((geo.b, geo.hk, geo.sk, geo.d), device=q.device, dtype=geo.ct)
    dv = torch.zeros_like(dk)
    for q0 in range(0, geo.sq, block_q):
        q1 = min(q0 + block_q, geo.sq)
        qb, dob = _scaled(_q_rows(q, q0, q1, geo), qd), _q_rows(dout, q0, q1, geo)
        qs = qb * softmax_scale
        lse_b, delta_b = _q_rows(lse_rows, q0, q1, geo), _q_rows(delta_rows, q0, q1, geo)
        dq_acc = torch.zeros_like(qb)
        for k0, k1 in _key_blocks(q0, q1, geo, block_k):
            kb, vb = kh[:, :, k0:k1], vh[:, :, k0:k1]
            s, t = _scores(qs, kb, q0, q1, k0, k1, geo, softcap, slopes)
            p = s.sub_(lse_b).exp_()
            z = _dropout_scale(q0, q1, k0, k1, geo, q.device)
            dv[:, :, k0:k1] += torch.matmul((p if z is None else p * z).transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            if z is not None:
                dp = dp.mul_(z)   # the gradient reaching P passes the same dropout mask
            ds = dp.sub_(delta_b).mul_(p)   # dS = P ∘ (dP − Δ)
            if t is not None:
                ds = ds.mul_(1.0 - t * t)   # d(softcap·tanh(x/softcap))/dx
            dq_acc += torch.matmul(ds, kb)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)
        dq[:, q0:q1] = _rows_to_heads(dq_acc.mul_(softmax_scale), geo, q1 - q0)
    dk = dk.mul_(softmax_scale).transpose(1, 2).to(grad_dtypes[1], memory_format=torch.contiguous_format)
    return dq, dk, dv.transpose(1, 2).to(grad_dtypes[2], memory_format=torch.contiguous_format)
