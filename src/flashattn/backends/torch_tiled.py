"""FlashAttention in PyTorch ops: the tiled online-softmax loop, forward and backward.

Runs on any torch device; it is the fallback when no kernel applies. Work per step is one
(block_q × block_k) tile for all (batch, head) pairs at once, so the peak extra memory is
O(batch · heads · block_q · block_k), never O(seqlen²).

Internally tensors are viewed (without copies) as (batch, nheads_k, group, seqlen, headdim) so that
the `group = nheads // nheads_k` query heads sharing one key/value head broadcast against it (GQA).
Blocks are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import masks

# Tile sizes. Large tiles amortize Python overhead on the CPU; memory stays O(block_q · block_k).
BLOCK_Q = 256
BLOCK_K = 512


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


def online_softmax_step(state: SoftmaxState, s: torch.Tensor, v: torch.Tensor) -> Step:
    """The online-softmax update for one block of scores s (..., Bq, Bk) and values v (..., Bk, d)."""
    # -- update m: the new running max
    m_new = torch.maximum(state.m, s.amax(dim=-1))
    m_safe = _finite_or_zero(m_new)
    # -- rescale what was accumulated under the old max, add this block
    alpha = torch.exp(state.m - m_safe)
    p = torch.exp(s - m_safe[..., None])
    l = state.l * alpha + p.sum(dim=-1)
    acc = state.acc * alpha[..., None] + torch.matmul(p, v)
    return Step(SoftmaxState(m_new, l, acc), alpha, p)


def finish(state: SoftmaxState) -> Tuple[torch.Tensor, torch.Tensor]:
    """out = acc / l and lse = m + log l; rows that saw no key give 0 and -inf."""
    l = state.l
    out = state.acc / torch.where(l == 0, torch.ones_like(l), l)[..., None]
    lse = _finite_or_zero(state.m) + torch.log(l)
    return out, lse


class _Geometry(NamedTuple):
    b: int
    sq: int
    sk: int
    hk: int
    g: int
    d: int
    left: int
    right: int


def _geometry(q, k, window_left, window_right) -> _Geometry:
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    return _Geometry(b, sq, sk, hk, h // hk, d, window_left, window_right)


def _split_q(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(b, s, h, d) -> (b, hk, g, s, d), a view whenever the strides allow."""
    return x.reshape(geo.b, x.shape[1], geo.hk, geo.g, x.shape[-1]).permute(0, 2, 3, 1, 4)


def _split_kv(x: torch.Tensor) -> torch.Tensor:
    """(b, s, hk, d) -> (b, hk, 1, s, d) view."""
    return x.permute(0, 2, 1, 3).unsqueeze(2)


def _merge_q(x: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """(b, hk, g, s, d) -> (b, s, h, d)."""
    return x.permute(0, 3, 1, 2, 4).reshape(geo.b, x.shape[3], geo.hk * geo.g, x.shape[-1])


def _alibi(alibi_slopes: Optional[torch.Tensor], geo: _Geometry) -> Optional[torch.Tensor]:
    if alibi_slopes is None:
        return None
    s = alibi_slopes.float()
    s = s[None] if s.dim() == 1 else s
    return s.view(s.shape[0], geo.hk, geo.g)


def _scores(qb, kb, q0, q1, k0, k1, geo: _Geometry, scale, softcap, slopes):
    """Scaled, capped, biased and masked scores of one tile; also tanh of the cap (for its derivative)."""
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
    t = None
    if softcap != 0.0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    qi = torch.arange(q0, q1, device=qb.device)[:, None]
    kj = torch.arange(k0, k1, device=qb.device)[None, :]
    if slopes is not None:
        s = s + masks.alibi_bias(slopes, qi, kj, geo.sq, geo.sk)
    if not masks.block_is_full(q0, q1, k0, k1, geo.sq, geo.sk, geo.left, geo.right):
        s = s.masked_fill(~masks.visible(qi, kj, geo.sq, geo.sk, geo.left, geo.right), float("-inf"))
    return s, t


def forward(q, k, v, softmax_scale: float, window_left: int = -1, window_right: int = -1,
            softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
            block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Tuple[torch.Tensor, torch.Tensor]:
    """q: (b, sq, h, d); k, v: (b, sk, hk, d). Returns out (b, sq, h, d) in q.dtype, lse (b, h, sq) float32."""
    geo = _geometry(q, k, window_left, window_right)
    qh, kh, vh = _split_q(q, geo), _split_kv(k), _split_kv(v)
    slopes = _alibi(alibi_slopes, geo)
    out = torch.empty((geo.b, geo.hk, geo.g, geo.sq, geo.d), device=q.device, dtype=q.dtype)
    lse = torch.empty((geo.b, geo.hk, geo.g, geo.sq), device=q.device, dtype=torch.float32)
    for q0 in range(0, geo.sq, block_q):
        q1 = min(q0 + block_q, geo.sq)
        qb = qh[..., q0:q1, :].float()
        state = init_state((geo.b, geo.hk, geo.g, q1 - q0), geo.d, q.device)
        k_lo, k_hi = masks.key_range(q0, q1, geo.sq, geo.sk, geo.left, geo.right)
        for k0 in range(k_lo, k_hi, block_k):   # blocks no query here can see are never touched
            k1 = min(k0 + block_k, k_hi)
            s, _ = _scores(qb, kh[..., k0:k1, :].float(), q0, q1, k0, k1, geo, softmax_scale, softcap, slopes)
            state = online_softmax_step(state, s, vh[..., k0:k1, :].float()).state
        o, l = finish(state)
        out[..., q0:q1, :] = o
        lse[..., q0:q1] = l
    return _merge_q(out, geo), lse.reshape(geo.b, geo.hk * geo.g, geo.sq)


def backward(dout, q, k, v, out, lse, softmax_scale: float, window_left: int = -1, window_right: int = -1,
             softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
             block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients by recomputation: P = exp(S - lse) tile by tile, never stored whole.

    dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P ∘ (dP − Δ) with Δ = rowsum(dO ∘ O);  dQ = dS K · scale;  dK = dSᵀ Q · scale.
    Returns dq, dk, dv in the inputs' dtypes and shapes. Deterministic (a fixed loop order).
    """
    geo = _geometry(q, k, window_left, window_right)
    qh, kh, vh = _split_q(q, geo), _split_kv(k), _split_kv(v)
    doh = _split_q(dout, geo)
    slopes = _alibi(alibi_slopes, geo)
    lse_h = lse.reshape(geo.b, geo.hk, geo.g, geo.sq)
    lse_h = _finite_or_zero(lse_h)   # rows with lse = -inf saw no key: their P is all zeros anyway
    delta = (doh.float() * _split_q(out, geo).float()).sum(dim=-1)   # (b, hk, g, sq)
    dq = torch.zeros((geo.b, geo.hk, geo.g, geo.sq, geo.d), device=q.device, dtype=torch.float32)
    dk = torch.empty((geo.b, geo.sk, geo.hk, geo.d), device=q.device, dtype=k.dtype)
    dv = torch.empty_like(dk, dtype=v.dtype)
    for k0 in range(0, geo.sk, block_k):
        k1 = min(k0 + block_k, geo.sk)
        kb, vb = kh[..., k0:k1, :].float(), vh[..., k0:k1, :].float()
        dk_acc = torch.zeros((geo.b, geo.hk, geo.g, k1 - k0, geo.d), device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        q_lo, q_hi = masks.query_range(k0, k1, geo.sq, geo.sk, geo.left, geo.right)
        for q0 in range(q_lo, q_hi, block_q):
            q1 = min(q0 + block_q, q_hi)
            qb, dob = qh[..., q0:q1, :].float(), doh[..., q0:q1, :].float()
            s, t = _scores(qb, kb, q0, q1, k0, k1, geo, softmax_scale, softcap, slopes)
            p = torch.exp(s - lse_h[..., q0:q1, None])
            dv_acc += torch.matmul(p.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2))
            ds = p * (dp - delta[..., q0:q1, None])
            if t is not None:
                ds = ds * (1.0 - t * t)   # d(softcap·tanh(x/softcap))/dx
            ds = ds * softmax_scale
            dq[..., q0:q1, :] += torch.matmul(ds, kb)
            dk_acc += torch.matmul(ds.transpose(-1, -2), qb)
        # the g query heads of a group share this key/value head: their gradients add up
        dk[:, k0:k1] = dk_acc.sum(dim=2).permute(0, 2, 1, 3)
        dv[:, k0:k1] = dv_acc.sum(dim=2).permute(0, 2, 1, 3)
    return _merge_q(dq, geo).to(q.dtype), dk, dv
