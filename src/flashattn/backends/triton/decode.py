"""Attention over a KV cache, contiguous or paged, with split-KV ("flash-decoding"): `_attn_fwd_kvcache`.

One kernel serves decoding (seqlen_q = 1) and chunked prefill (seqlen_q > 1). Its program owns

- one key/value head of one sequence, and BLOCK_M *packed rows*: row r is query r // GROUP of
  query head hk·GROUP + r % GROUP, so the GROUP query heads sharing a K/V head read each K/V tile
  once (decoding has one query per head; without packing, a 16-row tile would be 15/16 empty);
- one share of the sequence's keys (split-KV): with NUM_SPLITS > 1 the programs of one row block
  split the key range, each writes its normalised partial output and lse, and
  `flashattn.combine.flash_attn_combine` merges them. That fills the GPU when batch · kv-heads is
  small and the context long.

Keys are addressed through a page table: logical key j of sequence b is cache row
p = k_start[b] + j, stored in page block_table[b, p // page_size] at row p % page_size. A
contiguous cache (n, seqlen_cache, hk, d) is the same thing with page_size = seqlen_cache and a
one-column block table naming the cache row of each sequence, so there is one code path. Pages
may be any size (1 … seqlen): the page of each key row is looked up, not assumed per tile.

The visibility rule and the score modifiers are those of the main forward kernel (`_visible`,
`_scores` in kernels.py, i.e. flashattn.masks); every tile is masked, which costs nothing that
matters in a loop bound by reading K/V.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from ...combine import flash_attn_combine
from .kernels import _scores, _visible


@triton.jit
def _kv_tile_rows(BlockTable, b_table, k0, cols, seqlen_k, page_size):
    """Cache (page, row-in-page) of logical keys `cols` of one sequence, as int64 page indices."""
    phys = k0 + cols
    ok = cols < seqlen_k
    page = tl.load(BlockTable + b_table + phys // page_size, mask=ok, other=0).to(tl.int64)
    return page, (phys % page_size).to(tl.int64), ok


@triton.jit
def _attn_fwd_kvcache(Q, K, V, Out, Lse, BlockTable, KStart, KLen, Alibi,
                      stride_qb, stride_qm, stride_qh,
                      stride_kp, stride_kr, stride_kh,
                      stride_vp, stride_vr, stride_vh,
                      stride_os, stride_ob, stride_om, stride_oh,
                      stride_ls, stride_lb, stride_lm, stride_lh,
                      stride_tb, stride_ab,
                      nheads_k, seqlen_q, page_size, left, right, num_sink, sm_scale, softcap, num_splits,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(seqlen_q · GROUP, BLOCK_M), batch · nheads_k, num_splits).

    Q (b, sq, h, d); K, V (pages, page_size, hk, d); Out (splits, b, sq, h, d) and Lse (splits, b, sq, h)
    through their strides (with one split these are the final out and lse); BlockTable (b, pages per
    sequence) int32; KStart, KLen (b,) int32: a sequence's keys are cache rows KStart[b] … KStart[b] + KLen[b] − 1.
    """
    pid_m = tl.program_id(0)
    off_b = (tl.program_id(1) // nheads_k).to(tl.int64)
    off_hk = (tl.program_id(1) % nheads_k).to(tl.int64)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP
    off_h = off_hk * GROUP + (rows % GROUP)
    rows_ok = q_idx < seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    seqlen_k = tl.load(KLen + off_b)
    k0 = tl.load(KStart + off_b)
    b_table = off_b * stride_tb
    q = tl.load(Q + off_b * stride_qb + q_idx[:, None].to(tl.int64) * stride_qm + off_h[:, None] * stride_qh
                + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h, mask=rows_ok, other=0.0)

    # -- the keys some row of this block may see (masks.key_range), then this split's share of them
    off = seqlen_k - seqlen_q
    q_first = (pid_m * BLOCK_M) // GROUP
    q_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // GROUP, seqlen_q - 1)
    lo = q_first * 0
    hi = lo + seqlen_k
    if HAS_LEFT:
        lo = (tl.maximum(q_first + off - left, 0) // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.maximum(tl.minimum(q_last + off + right + 1, seqlen_k), 0)
    hi = tl.maximum(hi, lo)
    share = tl.cdiv(tl.cdiv(hi - lo, num_splits), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(lo + split * share, hi)
    s_hi = tl.minimum(s_lo + share, hi)
    sink_hi = lo * 0
    if HAS_SINK:   # sink keys left of the window: split 0 takes them
        sink_hi = tl.where(split == 0, tl.minimum(tl.cdiv(num_sink, BLOCK_N) * BLOCK_N, lo), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for phase in tl.static_range(2):
        if phase == 0 or HAS_SINK:
            p_lo = s_lo if phase == 0 else sink_hi * 0
            p_hi = s_hi if phase == 0 else sink_hi
            for start_n in range(p_lo, p_hi, BLOCK_N):
                cols = start_n + offs_n
                page, prow, k_ok = _kv_tile_rows(BlockTable, b_table, k0, cols, seqlen_k, page_size)
                kT = tl.load(K + page[None, :] * stride_kp + prow[None, :] * stride_kr + off_hk * stride_kh
                             + offs_d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
                qk = tl.dot(q, kT)
                s, _ = _scores(qk, q_idx[:, None], cols[None, :], seqlen_q, seqlen_k, sm_scale, softcap,
                               slope[:, None], SOFTCAP, HAS_ALIBI)
                ok = _visible(q_idx[:, None], cols[None, :], seqlen_q, seqlen_k, left, right, num_sink,
                              rows_ok[:, None], k_ok[None, :], HAS_LEFT, HAS_RIGHT, HAS_SINK, False)
                s = tl.where(ok, s, float("-inf"))
                # -- online softmax: rows that have seen only masked keys shift by 0, not -inf
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.math.exp2(m_i - m_shift)
                p = tl.math.exp2(s - m_shift[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + page[:, None] * stride_vp + prow[:, None] * stride_vr + off_hk * stride_vh
                            + offs_d[None, :], mask=d_ok[None, :] & k_ok[:, None], other=0.0)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new

    # -- finish: out = acc / l, lse = m + log l (natural log); a split or row that saw no key: 0 and -inf
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (Out + split.to(tl.int64) * stride_os + off_b * stride_ob + q_idx[:, None].to(tl.int64) * stride_om
              + off_h[:, None] * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(Lse + split.to(tl.int64) * stride_ls + off_b * stride_lb + q_idx.to(tl.int64) * stride_lm
             + off_h * stride_lh, lse, mask=rows_ok)


# ------------------------------------------------------------------------------------------------
# launcher

@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    if not torch.cuda.is_available():
        return 8   # the interpreter: any small number
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch: int, nheads_k: int, row_blocks: int, max_seqlen_k: int, device) -> int:
    """Split the keys only when the (batch, kv-head, row-block) programs leave SMs idle: aim at two
    programs per SM, with at least 512 keys per split (fewer make the merge cost more than it saves)."""
    programs = batch * nheads_k * row_blocks
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_seqlen_k // 512, 64))


def _config(rows: int, headdim: int, interpreting: bool) -> dict:
    if interpreting:   # small tiles: tiny test shapes still cross tile and page boundaries
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_M=min(64, max(16, triton.next_power_of_2(rows))), BLOCK_N=64 if headdim <= 128 else 32,
                num_warps=4, num_stages=3)


def forward_kvcache(q, k_cache, v_cache, block_table, k_start, k_len, max_seqlen_k: int, softmax_scale: float,
                    window_left: int = -1, window_right: int = -1, softcap: float = 0.0, alibi_slopes=None,
                    num_sink: int = 0, num_splits: int = 0):
    """Attention of q (b, sq, h, d) over paged caches k_cache, v_cache (pages, page_size, hk, d).

    block_table (b, pages per sequence) int32; k_start, k_len (b,) int32: sequence b's keys are its cache
    rows k_start[b] … k_start[b] + k_len[b] − 1 (logical positions 0 … k_len[b] − 1, causal-aligned
    bottom-right). max_seqlen_k bounds k_len (for choosing num_splits; 0 = choose 1).
    Returns out like q and lse (b, h, sq) float32.
    """
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    b, sq, h, d = q.shape
    hk = k_cache.shape[2]
    group = h // hk
    cfg = _config(sq * group, d, interpreting)
    row_blocks = triton.cdiv(sq * group, cfg["BLOCK_M"])
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hk, row_blocks, max_seqlen_k, q.device)
    if num_splits == 1:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, lse.stride(0), lse.stride(2), lse.stride(1))
    else:
        out = torch.empty((num_splits, b, sq, h, d), device=q.device, dtype=torch.float32)
        lse = torch.empty((num_splits, b, sq, h), device=q.device, dtype=torch.float32)
        o_strides, l_strides = out.stride()[:4], lse.stride()
    alibi = alibi_slopes.contiguous() if alibi_slopes is not None else q
    stride_ab = alibi.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    grid = (row_blocks, b * hk, num_splits)
    _attn_fwd_kvcache[grid](
        q, k_cache, v_cache, out, lse, block_table, k_start, k_len, alibi,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *o_strides, *l_strides, block_table.stride(0), stride_ab,
        hk, sq, k_cache.shape[1], max(window_left, 0), max(window_right, 0), num_sink, float(softmax_scale),
        float(softcap) if softcap else 1.0, num_splits,
        GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap != 0.0,
        HAS_ALIBI=alibi_slopes is not None, HAS_SINK=num_sink > 0 and window_left >= 0, **cfg)
    if num_splits > 1:
        out, lse = flash_attn_combine(out, lse, out_dtype=q.dtype, return_lse=True)
        lse = lse.transpose(1, 2)
    return out, lse
