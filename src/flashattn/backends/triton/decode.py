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
p = leftpad[b] + j, stored in page block_table[b, p // page_size] at row p % page_size. A
contiguous cache (n, seqlen_cache, hk, d) is the same thing with page_size = seqlen_cache and a
one-column block table naming the cache row of each sequence (or, without cache_batch_idx, page b:
PAGE_IS_BATCH), so there is one code path. Pages may be any size (1 … seqlen): the page of each key
row is looked up, not assumed per tile. `_append_kv` writes new tokens through the same addressing,
and `_combine` merges split results (flashattn.combine's formula) in one launch: a decoding step is
three kernels, which matters when the step itself takes microseconds.

The visibility rule and the score modifiers are those of the main forward kernel (`_visible`,
`_scores` in kernels.py, i.e. flashattn.masks); every tile is masked, which costs nothing that
matters in a loop bound by reading K/V.

FP8 caches (constexpr KV_FP8; the bf16/fp16 code is unchanged when it is off): K, V hold float8 e4m3
standing for K · k_descale, V · v_descale, one factor per (sequence, kv head): a program's. Tiles are
loaded as e4m3 (half the bytes) and upcast exactly to q's dtype, k_descale joins the score scale and
v_descale multiplies the output; `_append_kv` quantizes the new tokens (fp8.quantize_with).
"""
import functools
import sys

import torch
import triton
import triton.language as tl

from . import _autotune_enabled, _interpreting, tuning
from .kernels import _scores, _to_e4m3, _visible


@triton.jit
def _page_of(BlockTable, off_b, stride_tb, rows, ok, page_size, PAGE_IS_BATCH: tl.constexpr):
    """(page, row in page) of cache rows `rows` of sequence off_b, as int64."""
    if PAGE_IS_BATCH:
        page = off_b + rows * 0
    else:
        page = tl.load(BlockTable + off_b * stride_tb + rows // page_size, mask=ok, other=0).to(tl.int64)
    return page, (rows % page_size).to(tl.int64)


@triton.jit
def _seq_keys(SeqLens, LeftPad, off_b, s_new, HAS_LEFTPAD: tl.constexpr):
    """(first cache row, number of keys) of sequence off_b: rows leftpad … seqlens + s_new − 1."""
    end = tl.load(SeqLens + off_b) + s_new
    k0 = end * 0
    if HAS_LEFTPAD:
        k0 = tl.load(LeftPad + off_b)
    return k0, end - k0


@triton.jit
def _quantize(x, Descale, off_b, offs_h, h_ok, stride_db, stride_dh, ROUND: tl.constexpr):
    """fp8.quantize_with for rows offs_h (kv heads) of sequence off_b: x / descale[b, h] in fp32 (div_rn:
    correctly rounded, as torch divides), clamped to ±448, rounded to e4m3."""
    ds = tl.load(Descale + off_b * stride_db + offs_h * stride_dh, mask=h_ok, other=1.0)
    x = tl.math.div_rn(x.to(tl.float32), ds[:, None])
    return _to_e4m3(tl.minimum(tl.maximum(x, -448.0), 448.0), ROUND)


@triton.jit
def _append_kv(Knew, Vnew, K, V, BlockTable, SeqLens, KDescale, VDescale,
               stride_nb, stride_nm, stride_nh, stride_vnb, stride_vnm, stride_vnh,
               stride_kp, stride_kr, stride_kh, stride_vp, stride_vr, stride_vh, stride_tb,
               stride_kdb, stride_kdh, stride_vdb, stride_vdh,
               s_new, nheads_k, page_size,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, PAGE_IS_BATCH: tl.constexpr,
               KV_FP8: tl.constexpr, ROUND: tl.constexpr):
    """Grid (batch · s_new,): new token t of sequence b goes to cache row seqlens[b] + t (all heads).

    KV_FP8: K, V are float8 e4m3 caches; the new tokens are quantized with KDescale, VDescale (b, hk) float32
    (through their strides). ROUND (under the interpreter only): see kernels._to_e4m3."""
    off_b = (tl.program_id(0) // s_new).to(tl.int64)
    t = tl.program_id(0) % s_new
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < nheads_k) & (offs_d[None, :] < HEAD_DIM)
    row = tl.load(SeqLens + off_b) + t
    page, prow = _page_of(BlockTable, off_b, stride_tb, row, True, page_size, PAGE_IS_BATCH)
    k = tl.load(Knew + off_b * stride_nb + t * stride_nm + offs_h[:, None] * stride_nh + offs_d[None, :], mask=ok)
    v = tl.load(Vnew + off_b * stride_vnb + t * stride_vnm + offs_h[:, None] * stride_vnh + offs_d[None, :], mask=ok)
    if KV_FP8:
        k = _quantize(k, KDescale, off_b, offs_h, offs_h < nheads_k, stride_kdb, stride_kdh, ROUND)
        v = _quantize(v, VDescale, off_b, offs_h, offs_h < nheads_k, stride_vdb, stride_vdh, ROUND)
    tl.store(K + page * stride_kp + prow * stride_kr + offs_h[:, None] * stride_kh + offs_d[None, :], k, mask=ok)
    tl.store(V + page * stride_vp + prow * stride_vr + offs_h[:, None] * stride_vh + offs_d[None, :], v, mask=ok)


@triton.jit
def _attn_fwd_kvcache(Q, K, V, Out, Lse, BlockTable, SeqLens, LeftPad, Alibi, KDescale, VDescale,
                      stride_qb, stride_qm, stride_qh,
                      stride_kp, stride_kr, stride_kh,
                      stride_vp, stride_vr, stride_vh,
                      stride_os, stride_ob, stride_om, stride_oh,
                      stride_ls, stride_lb, stride_lm, stride_lh,
                      stride_tb, stride_ab, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
                      nheads_k, seqlen_q, s_new, page_size, left, right, num_sink, sm_scale, softcap, num_splits,
                      ctx_bucket, page_bucket,   # unused in the body: autotuning keys
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                      HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
                      PAGE_IS_BATCH: tl.constexpr, KV_FP8: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Grid (cdiv(seqlen_q · GROUP, BLOCK_M), batch · nheads_k, num_splits).

    Q (b, sq, h, d); K, V (pages, page_size, hk, d); Out (splits, b, sq, h, d) and Lse (splits, b, sq, h)
    through their strides (with one split these are the final out and lse); BlockTable (b, pages per
    sequence) int32; SeqLens, LeftPad (b,) int32: sequence b's keys are cache rows
    LeftPad[b] … SeqLens[b] + s_new − 1 (s_new tokens were just appended).
    KV_FP8: K, V are float8 e4m3 standing for K · KDescale[b, hk], V · VDescale[b, hk] ((b, hk) float32
    through their strides; unused otherwise).
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

    k0, seqlen_k = _seq_keys(SeqLens, LeftPad, off_b, s_new, HAS_LEFTPAD)
    q = tl.load(Q + off_b * stride_qb + q_idx[:, None].to(tl.int64) * stride_qm + off_h[:, None] * stride_qh
                + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h, mask=rows_ok, other=0.0)
    if KV_FP8:   # one (sequence, kv head) per program: k's descale joins the score scale, v's scales the output
        sm_scale = sm_scale * tl.load(KDescale + off_b * stride_kdb + off_hk * stride_kdh)
        v_descale = tl.load(VDescale + off_b * stride_vdb + off_hk * stride_vdh)

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
                k_ok = cols < seqlen_k
                page, prow = _page_of(BlockTable, off_b, stride_tb, k0 + cols, k_ok, page_size, PAGE_IS_BATCH)
                kT = tl.load(K + page[None, :] * stride_kp + prow[None, :] * stride_kr + off_hk * stride_kh
                             + offs_d[:, None], mask=d_ok[:, None] & k_ok[None, :], other=0.0)
                if KV_FP8:   # e4m3 -> q's dtype is exact; the descale is in sm_scale
                    kT = kT.to(q.dtype)
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
                if KV_FP8:
                    v = v.to(q.dtype)
                acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
                m_i = m_new

    # -- finish: out = acc / l, lse = m + log l (natural log); a split or row that saw no key: 0 and -inf
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_descale
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = (Out + split.to(tl.int64) * stride_os + off_b * stride_ob + q_idx[:, None].to(tl.int64) * stride_om
              + off_h[:, None] * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(Lse + split.to(tl.int64) * stride_ls + off_b * stride_lb + q_idx.to(tl.int64) * stride_lm
             + off_h * stride_lh, lse, mask=rows_ok)


@triton.jit
def _combine(OutP, LseP, Out, Lse, num_splits, stride_ps, stride_ls, stride_lr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """flashattn.combine's formula for one row per program (grid: rows). OutP (splits, rows, d) float32
    with split stride stride_ps, LseP (splits, rows) float32; Out (rows, d) contiguous, Lse (rows,) at
    stride_lr. BLOCK_S splits are loaded at once (one memory round trip for up to BLOCK_S splits: a
    loop over the splits one by one waits for each load in turn, ~1 µs apiece), merged online across
    chunks when there are more."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.max(tl.full([BLOCK_S], float("-inf"), dtype=tl.float32), 0)
    total = tl.sum(tl.zeros([BLOCK_S], dtype=tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + offs_s
        s_ok = s < num_splits
        lse = tl.load(LseP + s.to(tl.int64) * stride_ls + row, mask=s_ok, other=float("-inf"))
        o = tl.load(OutP + s[:, None].to(tl.int64) * stride_ps + row * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # -inf - -inf would be NaN
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)                                # 0 for empty splits
        total = total * alpha + tl.sum(w, 0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        m = m_new
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)
    tl.store(Out + row * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(Lse + row * stride_lr, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))))


# ------------------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def choose_num_splits(batch: int, nheads_k: int, row_blocks: int, max_seqlen_k: int, device) -> int:
    """Split the keys only when the (batch, kv-head, row-block) programs leave SMs idle: aim at two
    programs per SM, with at least 512 keys per split (fewer make the merge cost more than it saves)."""
    programs = batch * nheads_k * row_blocks
    sms = _sm_count(device.index or 0) if device.type == "cuda" and not _interpreting() else 8
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), max_seqlen_k // 512, 64))


def _cfg(bn, w, s):
    return triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)


# Few on purpose (each is a compile): tile width, warps and pipeline depth for a loop that streams K/V.
DECODE_CONFIGS = [_cfg(64, 4, 3), _cfg(64, 4, 4), _cfg(128, 4, 3), _cfg(128, 8, 3), _cfg(64, 8, 4), _cfg(32, 4, 4)]


def _keep(configs, named_args, **kwargs):
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if not (bd >= 256 and c.kwargs["BLOCK_N"] > 64)]
    return kept or configs[:1]


_KEY = ["ctx_bucket", "page_bucket", "GROUP", "HEAD_DIM", "BLOCK_M", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI",
        "PAGE_IS_BATCH", "KV_FP8"]
# benchmarks only; flashattn's tuning module keeps the results on disk (see tuning.py)
_tuned = triton.autotune(DECODE_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _keep})(_attn_fwd_kvcache)


def _default_cfg(headdim: int) -> dict:
    if _interpreting():   # small tiles: tiny test shapes still cross tile and page boundaries
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    return dict(BLOCK_N=64 if headdim <= 128 else 32, num_warps=4, num_stages=3)


def _descales(k_cache, k_descale, v_descale, placeholder):
    """(KDescale, VDescale, their 4 strides) kernel arguments: for a float8 cache the (b, hk) float32 views
    (a per-tensor factor expanded: strides 0); otherwise a pointer that is never read."""
    if k_cache.dtype != torch.float8_e4m3fn:
        return placeholder, placeholder, 0, 0, 0, 0
    if k_descale is None or v_descale is None:
        raise ValueError("a float8_e4m3fn cache needs k_descale and v_descale, (batch, nheads_k) float32 views")
    return k_descale, v_descale, *k_descale.stride(), *v_descale.stride()


@tuning.serialized_under_interpreter
def append_kv(k_cache, v_cache, k, v, block_table, cache_seqlens, k_descale=None, v_descale=None) -> None:
    """Write k, v (b, s_new, hk, d) into the caches at rows cache_seqlens[b] + t (block_table None: page b).
    Float8 e4m3 caches: k, v are quantized with k_descale, v_descale ((b, hk) float32, any strides) on the way
    (fp8.quantize_with)."""
    b, s_new, hk, d = k.shape
    table = block_table if block_table is not None else cache_seqlens
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    ds = _descales(k_cache, k_descale, v_descale, cache_seqlens)
    _append_kv[(b * s_new,)](
        k, v, k_cache, v_cache, table, cache_seqlens, *ds[:2], *k.stride()[:3], *v.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0), *ds[2:], s_new, hk, k_cache.shape[1],
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_H=triton.next_power_of_2(hk),
        PAGE_IS_BATCH=block_table is None, KV_FP8=kv_fp8, ROUND=kv_fp8 and _interpreting())


@tuning.serialized_under_interpreter
def combine(out_partial, lse_partial, out_dtype):
    """out_partial (splits, *rows, d) float32 contiguous, lse_partial (splits, *rows) float32 contiguous
    -> out (*rows, d) in out_dtype, lse (*rows) float32."""
    splits, d = out_partial.shape[0], out_partial.shape[-1]
    rows = lse_partial[0].numel()
    out = torch.empty(out_partial.shape[1:], device=out_partial.device, dtype=out_dtype)
    lse = torch.empty(lse_partial.shape[1:], device=out_partial.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    block_s = max(2, min(triton.next_power_of_2(splits), 64 if block_d <= 128 else 32))
    if rows:
        _combine[(rows,)](out_partial, lse_partial, out, lse, splits, out_partial.stride(0), lse_partial.stride(0), 1,
                          HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=block_s)
    return out, lse


@tuning.serialized_under_interpreter
def forward_kvcache(q, k_cache, v_cache, block_table, cache_seqlens, leftpad, s_new: int, max_seqlen_k: int,
                    softmax_scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                    alibi_slopes=None, num_sink: int = 0, num_splits: int = 0, k_descale=None, v_descale=None):
    """Attention of q (b, sq, h, d) over caches k_cache, v_cache (pages, page_size, hk, d).

    block_table (b, pages per sequence) int32, or None for a contiguous cache whose page b is sequence b;
    cache_seqlens (b,) int32 (rows in use before the s_new appended ones), leftpad (b,) int32 or None:
    sequence b's keys are its rows leftpad[b] … cache_seqlens[b] + s_new − 1 (causal-aligned bottom-right).
    max_seqlen_k bounds the number of keys (for choosing num_splits and the tuning bucket).
    Float8 e4m3 caches (q bf16/fp16) stand for k_cache · k_descale, v_cache · v_descale: (b, hk) float32,
    any strides (a per-tensor factor expanded).
    Returns out like q and lse (b, h, sq) float32.
    """
    b, sq, h, d = q.shape
    hk = k_cache.shape[2]
    group = h // hk
    block_m = 16 if _interpreting() else min(64, max(16, triton.next_power_of_2(sq * group)))
    row_blocks = triton.cdiv(sq * group, block_m)
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hk, row_blocks, max_seqlen_k, q.device)
    if num_splits == 1:
        out = torch.empty((b, sq, h, d), device=q.device, dtype=q.dtype)
        lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
        o_strides = (0, *out.stride()[:3])
        l_strides = (0, lse.stride(0), lse.stride(2), lse.stride(1))
    else:
        out = torch.empty((num_splits, b, sq, h, d), device=q.device, dtype=torch.float32)
        lse = torch.empty((num_splits, b, sq, h), device=q.device, dtype=torch.float32)
        o_strides, l_strides = out.stride()[:4], lse.stride()
    alibi = alibi_slopes.contiguous() if alibi_slopes is not None else q
    stride_ab = alibi.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    table = block_table if block_table is not None else cache_seqlens
    ds = _descales(k_cache, k_descale, v_descale, cache_seqlens)
    args = (q, k_cache, v_cache, out, lse, table, cache_seqlens, leftpad if leftpad is not None else cache_seqlens,
            alibi, *ds[:2], q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *o_strides, *l_strides, table.stride(0), stride_ab, *ds[2:],
            hk, sq, s_new, k_cache.shape[1], max(window_left, 0), max(window_right, 0), num_sink,
            float(softmax_scale), float(softcap) if softcap else 1.0, num_splits,
            triton.next_power_of_2(max(1, max_seqlen_k // num_splits)), min(256, triton.next_power_of_2(k_cache.shape[1])))
    meta = dict(GROUP=group, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap != 0.0,
                HAS_ALIBI=alibi_slopes is not None, HAS_SINK=num_sink > 0 and window_left >= 0,
                HAS_LEFTPAD=leftpad is not None, PAGE_IS_BATCH=block_table is None,
                KV_FP8=k_cache.dtype == torch.float8_e4m3fn, BLOCK_M=block_m)
    grid = (row_blocks, b * hk, num_splits)
    if not _autotune_enabled():
        _attn_fwd_kvcache[grid](*args, **meta, **_default_cfg(d))
    else:   # args end with (ctx_bucket, page_bucket)
        key = dict({name: meta[name] for name in _KEY if name in meta}, ctx_bucket=args[-2], page_bucket=args[-1],
                   dtype=str(q.dtype), gpu=_gpu_name(q.device.index or 0))
        tuning.run_tuned("decode", _tuned, _attn_fwd_kvcache, lambda m: grid, args, meta, key,
                         _keep(DECODE_CONFIGS, {}, **meta), sys.modules[__name__])
    if num_splits > 1:
        out, lse = combine(out, lse, q.dtype)
        lse = lse.transpose(1, 2)
    return out, lse
