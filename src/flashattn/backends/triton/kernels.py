"""FlashAttention-2 in Triton: `_attn_fwd`, `_attn_bwd_preprocess`, `_attn_bwd_dkdv`, `_attn_bwd_dq`.

Layout (batch, seqlen, nheads, headdim) with arbitrary strides except a contiguous last dim; lse and
delta are (batch, nheads, seqlen_q) float32. Scores live in the exp2 domain: s2 = s · log2(e), so the
softmax uses exp2 and the scale is folded into one multiply. Batch/head offsets and row offsets
of whole blocks are int64 so tensors past 2³¹ elements index correctly.

The visibility rule is flashattn.masks' (query i sees key j iff diag(i) - left <= j <= diag(i) + right
with diag(i) = i + seqlen_k - seqlen_q; -1 = unlimited), re-stated in `_visible` and in the block
ranges below; the tests hold the kernels to the reference that uses masks.py. Each loop over blocks
runs in phases: the blocks every row sees whole (no mask, no bounds checks), then the masked
boundary blocks on either side, then (forward, dQ) the blocks of sink keys left of the window;
blocks no row can see are never loaded.

FP8 (constexpr FP8): the forward takes float8 e4m3 q, k, v with per-(batch, kv head) descale factors,
runs q·kᵀ and P·V on FP8 tensor cores (P quantized to e4m3 after scaling by 2^P_LOG2) and writes a
bf16/fp16 output; the backward kernels upcast the FP8 inputs and compute as for bf16 (experimental).
"""
import triton
import triton.language as tl

from ... import dropout

# The dropout hash, the very function the PyTorch path and the reference use (flashattn/dropout.py).
_mix32 = triton.jit(dropout.mix32)

LOG2E = 1.4426950408889634   # 1/ln(2): exp(x) = exp2(x · LOG2E)
LN2 = 0.6931471805599453
# FP8 forward: P (<= 1) is multiplied by 2^P_LOG2 = 256 before its cast to e4m3 (largest finite 448), so
# that probabilities down to 2^-14 stay normal e4m3 numbers (3 significant bits) instead of subnormals.
P_LOG2 = tl.constexpr(8.0)


@triton.jit
def _cdiv_floor(a, b):
    # floor division that is right for negative a (Triton's // truncates toward zero)
    return tl.where(a >= 0, a // b, -((-a + b - 1) // b))


@triton.jit
def _rows(base, n, stride, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A tensor descriptor (TMA) of one sequence's n rows of HEAD_DIM values, row stride `stride`, read in
    (BLOCK, BLOCK_D) tiles; tiles past either end read 0."""
    return tl.make_tensor_descriptor(base, shape=[n, HEAD_DIM], strides=[stride, 1], block_shape=[BLOCK, BLOCK_D])


@triton.jit
def _visible(q_idx, k_idx, seqlen_q, seqlen_k, left, right, num_sink, q_global, k_global, HAS_LEFT: tl.constexpr,
             HAS_RIGHT: tl.constexpr, HAS_SINK: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """masks.visible in tl: q_idx, k_idx (and the global flags of those positions) broadcast to a tile."""
    diag = q_idx + (seqlen_k - seqlen_q)
    in_range = (k_idx < seqlen_k) & (q_idx < seqlen_q)
    ok = in_range
    if HAS_LEFT:
        if HAS_SINK:   # sinks are exempt from the left limit only
            ok = ok & ((k_idx >= diag - left) | (k_idx < num_sink))
        else:
            ok = ok & (k_idx >= diag - left)
    if HAS_RIGHT:
        ok = ok & (k_idx <= diag + right)
    if HAS_GLOBAL:   # global positions see, and are seen by, every position
        ok = ok | (in_range & (q_global | k_global))
    return ok


@triton.jit
def _global_flags(Glob, idx, n):
    """The global-token flags of positions idx (False past n)."""
    return tl.load(Glob + idx, mask=idx < n, other=0) != 0


@triton.jit
def _row_keys(seed, bh, rows):
    """dropout.row_keys in tl: bh the flat query-head index, rows the positions in the sequence."""
    base = _mix32((_mix32(bh) ^ seed) & 0xFFFFFFFF)
    return _mix32((base + rows.to(tl.int64)) & 0xFFFFFFFF)


@triton.jit
def _mix32_u32(x):
    """dropout.mix32 on uint32 values, bit for bit: the products wrap modulo 2³² by themselves, so each
    is one 32-bit multiply instead of an emulated 64-bit one (the int64 form's `& 0xFFFFFFFF`). Once per
    score, three times per training step: the part of dropout's cost that scales with seqlen²."""
    x = x ^ (x >> 16)
    x = x * tl.cast(0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.cast(0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _kept(row_key, cols, threshold):
    """dropout.keep_mask of the scores (rows, cols): row_key int64 values < 2³² (per row, from _row_keys)."""
    return _mix32_u32(row_key.to(tl.uint32) ^ cols.to(tl.uint32)) >= threshold.to(tl.uint32)


@triton.jit
def _dropped(x, row_key, cols, threshold, keep_scale):
    """x where dropout keeps the score (scaled by 1 / (1 - p)), 0 where it drops it (dropout.keep_mask)."""
    return tl.where(_kept(row_key, cols, threshold), x * keep_scale, 0.0)


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _to_e4m3(x, ROUND: tl.constexpr):
    """x (fp32, finite, |x| <= 448) as float8 e4m3, rounded to nearest even.

    ROUND (set under Triton's interpreter only): round on the e4m3 grid in fp32 first, so that the
    cast is exact. triton 3.6's interpreter rounds by adding one to the 3-bit mantissa without carrying
    into the exponent, which halves values whose rounding carries (e.g. 125.1 becomes 64, not 128), and
    it drops the sign of -0; the GPU's cvt.rn.satfinite needs no help. (a + c) - c with
    c = 1.5 · 2^(e + 20) rounds a = |x| to a multiple of 2^(e - 3), e = max(exponent of a, -6) (the
    spacing of e4m3 numbers near a); x's sign bit is then set on the e4m3 bits."""
    if ROUND:
        a = tl.abs(x)
        e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
        c = (((e + 147) << 23) | (1 << 22)).to(tl.float32, bitcast=True)
        bits = ((a + c) - c).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        sign = ((x.to(tl.int32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
        return (bits | sign).to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _scores(qk, q_idx, k_idx, seqlen_q, seqlen_k, sm_scale, softcap, slope,
            SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in the exp2 domain from raw dot products qk; also tanh(.) of the cap for the backward."""
    if SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (sm_scale * 1.4426950408889634)
    if HAS_ALIBI:
        dist = q_idx + (seqlen_k - seqlen_q) - k_idx
        dist = tl.where(dist < 0, -dist, dist)
        s = s - (slope * 1.4426950408889634) * dist.to(tl.float32)
    return s, t


@triton.jit
def _kv_blocks(start_m, seqlen_q, seqlen_k, left, right, num_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SINK: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """Key-block bounds for queries [start_m, start_m + BLOCK_M): sink_hi <= lo <= full_lo <= full_hi <= hi,
    all multiples of BLOCK_N except hi. [lo, hi) holds every key of the window some row may see
    (masks.key_range); [full_lo, full_hi) the blocks every row sees whole (masks.block_is_full);
    [0, sink_hi) the blocks of sink keys left of the window (masks.key_ranges)."""
    off = seqlen_k - seqlen_q
    end_m = tl.minimum(start_m + BLOCK_M, seqlen_q)
    zero = start_m * 0   # keep every bound a tensor, even when the seqlens are specialized constants
    lo = zero
    hi = zero + seqlen_k
    full_lo = zero
    # rows past seqlen_q are harmless (never stored); keys past seqlen_k must be masked
    full_hi = zero + (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(start_m + off - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # the last row has the tightest left edge
        full_lo = tl.cdiv(tl.maximum(end_m - 1 + off - left, 0), BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(end_m - 1 + off + right + 1, seqlen_k)
        hi = tl.maximum(hi, 0)
        # the first row has the tightest right edge
        full_hi = tl.minimum(full_hi, _cdiv_floor(start_m + off + right + 1, BLOCK_N) * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    if HAS_GLOBAL:   # global keys can be anywhere: every block (masks.key_ranges); the window's full blocks
        lo, hi = zero, zero + seqlen_k   # stay full, since global tokens only add visibility
    sink_hi = zero
    if HAS_SINK:
        sink_hi = tl.minimum(tl.cdiv(num_sink, BLOCK_N) * BLOCK_N, lo)
    return sink_hi, lo, full_lo, full_hi, hi


@triton.jit
def _q_blocks(start_n, seqlen_q, seqlen_k, left, right, num_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SINK: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """Query-block bounds for keys [start_n, start_n + BLOCK_N), the mirror of _kv_blocks
    (masks.query_range): key j is seen by rows diag⁻¹(j) - right <= i <= diag⁻¹(j) + left."""
    off = seqlen_k - seqlen_q
    end_n = tl.minimum(start_n + BLOCK_N, seqlen_k)
    zero = start_n * 0
    lo = zero
    hi = zero + seqlen_q
    full_lo = zero
    # keys past seqlen_k only produce rows of dK/dV that are never stored; rows past seqlen_q must be masked
    full_hi = zero + (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = tl.maximum(start_n - off - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(end_n - 1 - off - right, 0), BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        hi = tl.minimum(end_n - 1 - off + left + 1, seqlen_q)
        hi = tl.maximum(hi, 0)
        full_hi = tl.minimum(full_hi, _cdiv_floor(start_n - off + left + 1, BLOCK_M) * BLOCK_M)
        if HAS_SINK:   # a block holding sinks is seen by every later query (masked element by element)
            hi = tl.where(start_n < num_sink, seqlen_q, hi)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    if HAS_GLOBAL:
        lo, hi = zero, zero + seqlen_q
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_tile(LPT: tl.constexpr):
    """This program's query block (forward, dQ). LPT (longest processing time first): program 0 takes the last
    block. Under a causal mask the last query blocks see the most keys; the GPU starts programs roughly in order,
    so launching them first leaves the light blocks for the grid's last wave instead of one heavy block."""
    qb = tl.program_id(0)
    if LPT:
        qb = tl.num_programs(0) - 1 - qb
    return qb


@triton.jit
def _sequence(CuQ, CuK, off_b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(first query row, first key row, seqlen_q, seqlen_k) of batch entry off_b. Packed (varlen)
    batches read them from cu_seqlens; dense ones start at row 0 with the launch's seqlens."""
    if VARLEN:
        q_start = tl.load(CuQ + off_b).to(tl.int64)
        k_start = tl.load(CuK + off_b).to(tl.int64)
        seqlen_q = (tl.load(CuQ + off_b + 1) - q_start).to(tl.int32)
        seqlen_k = (tl.load(CuK + off_b + 1) - k_start).to(tl.int32)
    else:
        q_start = off_b * 0
        k_start = off_b * 0
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _phase_bounds(bounds, phase: tl.constexpr):
    """[lo, hi) of loop phase 0 (the blocks seen whole: no mask), 1 and 2 (the masked edges of the
    window), 3 (the sink blocks left of it), from bounds = (sink_hi, lo, full_lo, full_hi, hi)."""
    sink_hi, lo, full_lo, full_hi, hi = bounds
    p_lo = full_lo if phase == 0 else (lo if phase == 1 else (full_hi if phase == 2 else 0 * lo))
    p_hi = full_hi if phase == 0 else (full_lo if phase == 1 else (hi if phase == 2 else sink_hi))
    return p_lo, p_hi


@triton.jit
def _query_tile_visible(offs_m, cols, seqlen_q, seqlen_k, left, right, num_sink, q_global, Glob, SpTile, tile_pid,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_SINK: tl.constexpr,
                        HAS_GLOBAL: tl.constexpr, BLOCK_SPARSE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) visibility of a tile with query rows offs_m and keys cols (forward and dQ):
    _visible, and for a block mask's partly filled tile (tile_pid >= 0) its element mask (BlockMask.partial)."""
    k_global = cols
    if HAS_GLOBAL:
        k_global = _global_flags(Glob, cols, seqlen_k)
    ok = _visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, left, right, num_sink, q_global[:, None],
                  k_global[None, :], HAS_LEFT, HAS_RIGHT, HAS_SINK, HAS_GLOBAL)
    if BLOCK_SPARSE:
        # a tensor condition (newer interpreters reject a scalar mask)
        has = (tl.arange(0, BLOCK_N)[None, :] * 0 + tile_pid) >= 0
        tile = SpTile + tile_pid.to(tl.int64) * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N
        ok = ok & (tl.load(tile + tl.arange(0, BLOCK_N)[None, :], mask=has, other=1) != 0)
    return ok


@triton.jit
def _query_block(offs_m, seed, bh, Glob, start_m, seqlen_q, seqlen_k, left, right, num_sink,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr):
    """What a query block needs before its key loop (forward and dQ): the dropout row keys, the rows'
    global flags, and the key-block bounds of `_kv_blocks`."""
    row_key = offs_m
    if DROPOUT:
        row_key = _row_keys(seed, bh, offs_m)
    q_global = offs_m
    if HAS_GLOBAL:
        q_global = _global_flags(Glob, offs_m, seqlen_q)
    bounds = _kv_blocks(start_m, seqlen_q, seqlen_k, left, right, num_sink, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                        HAS_SINK, HAS_GLOBAL)
    return row_key, q_global, bounds


# ------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _listed_tile(SpList, SpPid, it, pid_stride, BLOCK: tl.constexpr, SUB: tl.constexpr,
                 BLOCK_SPARSE: tl.constexpr):
    """Tile `it` of a walk over a block mask's list (BlockMask.kernel_lists): the list names mask blocks of
    SUB · BLOCK rows (dK/dV: query rows) or keys (forward, dQ), each walked in SUB tiles of BLOCK.
    Returns (the tile's first row or key, its block's element-mask tile id SpPid[block · pid_stride] or -1
    when BLOCK_SPARSE == 2 (whole tiles), the tile's offset within its block)."""
    block = tl.load(SpList + it // SUB)
    tile_pid = -1
    if BLOCK_SPARSE == 1:
        tile_pid = tl.load(SpPid + block * pid_stride)
    sub = (it % SUB) * BLOCK
    return block * (BLOCK * SUB) + sub, tile_pid, sub


@triton.jit
def _online_softmax(m_i, l_i, s, GUARD: tl.constexpr, FP8: tl.constexpr):
    """-- the online softmax's update of a row's max m_i and sum l_i by one key block's scores s (exp2 domain,
    -inf where masked). Returns (m_new, alpha, p, l_new): alpha = exp2(m_i - m_new) rescales the old l and acc,
    p = exp2(s - m_new) are the block's probabilities (times 2^P_LOG2 with FP8: e4m3's normal range, >= 2^-6,
    then reaches down to p = 2^-14). GUARD (blocks with masked keys): a row that has seen only masked keys keeps
    m = -inf and is shifted by 0 instead, so that -inf - (-inf) never makes a NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if GUARD:
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    if FP8:
        p = tl.math.exp2(s - (m_shift - P_LOG2)[:, None])
    else:
        p = tl.math.exp2(s - m_shift[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K, V, start, end, offs_m, offs_n, offs_d,
                    stride_kn, stride_vn, stride_vd, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap,
                    slope, row_key, drop_threshold, keep_scale, Glob, q_global, SpList, SpPid, SpTile,
                    MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                    BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr, ROUND_P: tl.constexpr, BLOCK_M: tl.constexpr,
                    TMA: tl.constexpr):
    """Online softmax over key blocks [start, end) for one query block; K, V point at key 0.

    TMA: K and V are tensor descriptors of this sequence's (seqlen_k, HEAD_DIM) keys and values (Hopper's
    copy engine loads whole tiles, zero past the ends); otherwise pointers.

    BLOCK_SPARSE: [start, end) walks a list instead: entry it // BLOCK_N of SpList names the key block,
    SpPid[block] its element-mask tile in SpTile (or -1). The list is walked by this innermost loop, so
    Triton's pipeliner prefetches the next block's K/V while this one computes.
    FP8: q, K, V are float8 e4m3 (sm_scale includes their descales). V's key axis is contiguous
    (stride_vn = 1, head-dim stride stride_vd): an FP8 wgmma takes its B operand only K-major, and the K
    of P·V is the keys. P is multiplied by 2^P_LOG2 before its cast to e4m3 (so are l_i and acc; the
    factor cancels in acc / l and is taken out of the lse)."""
    if TMA:   # the descriptors take key offsets; no pointers to carry
        k_ptrs = start
        v_ptrs = start
    else:
        k_ptrs = K + start.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
    if not TMA and FP8:   # a (BLOCK_N, BLOCK_D) tile, keys contiguous (stride_vn = 1)
        # A non-empty [start, end) starts at a multiple of BLOCK_N (_kv_blocks: only hi may be another number).
        # Written as one, the compiler knows it (tl.multiple_of on the loop variable is dropped), so the tile's
        # key rows are 16-byte aligned and load as vectors (cp.async). An empty range must stay empty.
        start_al = (start // BLOCK_N) * BLOCK_N
        end = tl.where(start < end, end, start_al)
        start = start_al
        v_ptrs = V + start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    elif not TMA:
        v_ptrs = V + start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        tile_pid = -1   # no element mask (a block mask's partly filled tile sets it below)
        if BLOCK_SPARSE:
            start_n, tile_pid, _ = _listed_tile(SpList, SpPid, start_n // BLOCK_N, 1, BLOCK_N, 1, BLOCK_SPARSE)
        if BLOCK_SPARSE and not TMA:
            k_ptrs = K + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
            v_ptrs = V + start_n.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * (
                stride_vd if FP8 else 1)
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if TMA:
            kT = tl.trans(K.load([start_n, 0]))
        elif MASK:
            kT = tl.load(k_ptrs, mask=d_ok[:, None] & (cols[None, :] < seqlen_k), other=0.0)
        else:
            kT = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT)
        s, _ = _scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, sm_scale, softcap, slope,
                       SOFTCAP, HAS_ALIBI)
        if MASK:
            ok = _query_tile_visible(offs_m, cols, seqlen_q, seqlen_k, left, right, num_sink, q_global, Glob, SpTile,
                                     tile_pid, HAS_LEFT, HAS_RIGHT, HAS_SINK, HAS_GLOBAL, BLOCK_SPARSE, BLOCK_M,
                                     BLOCK_N)
            s = tl.where(ok, s, float("-inf"))
        m_new, alpha, p, l_i = _online_softmax(m_i, l_i, s, MASK, FP8)
        # -- rescale acc to the new max, add this block
        if TMA:
            v = V.load([start_n, 0])
        elif MASK:
            v = tl.load(v_ptrs, mask=d_ok[None, :] & (cols[:, None] < seqlen_k), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if not FP8:
            acc = acc * alpha[:, None]
        if DROPOUT:   # dropout scales what reaches v; the row sum l keeps every probability
            p = _dropped(p, row_key[:, None], cols[None, :], drop_threshold, keep_scale)
        if FP8:
            # P quantized to e4m3. Each block's product starts from a fresh accumulator and is added to acc in
            # fp32, fused with the rescale: Hopper's FP8 tensor cores keep only about 14 bits while they
            # accumulate (DeepSeek-V3 report, sec. 3.3.2), harmless over BLOCK_N <= 128 keys, not over a row.
            acc = acc * alpha[:, None] + tl.dot(_to_e4m3(p, ROUND_P), v)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
        if not BLOCK_SPARSE and not TMA:
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_ws(acc, l_i, m_i, q, K, V, hi, lim, sm_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The warp-specialized key loop (see _attn_fwd's WS): _attn_fwd_inner's update without its options, on
    descriptors K, V over the key blocks [0, hi) (whole blocks: seqlen_k a multiple of BLOCK_N).
    CAUSAL: key start_n + j is visible to row start_m + i iff j - i <= lim - start_n (lim = start_m +
    seqlen_k - seqlen_q + right, the rule of _visible with the block offsets taken out, since the warp
    specializer mis-splits start_m + tl.arange, see _attn_fwd); applied to every block, as the loop may not
    branch. Every row sees key 0 (seqlen_q <= seqlen_k), so the first block leaves no row at m = -inf."""
    qk_scale = sm_scale * 1.4426950408889634
    dij = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None]
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        s = tl.dot(q, K.load([start_n, 0]).T) * qk_scale
        if CAUSAL:
            s = tl.where(dij <= lim - start_n, s, float("-inf"))
        m_new, alpha, p, l_i = _online_softmax(m_i, l_i, s, False, False)
        acc = tl.dot(p.to(q.dtype), V.load([start_n, 0]), acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Alibi, CuQ, CuK, Glob, SpCnt, SpIdx, SpPid, SpTile, Descale,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh,
              stride_lb, stride_lh, stride_ab, stride_sb, stride_sh, stride_cb, stride_ch, n_qb, n_kb,
              nheads, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap,
              seed, drop_threshold, keep_scale,
              seq_bucket, gpu_key, tma_ok,   # unused in the body: autotuning keys
              GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
              VARLEN: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
              BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr, ROUND_P: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr = False, WS: tl.constexpr = False,
              LPT: tl.constexpr = False):
    """One program: one block of BLOCK_M queries of one (batch, head). Grid (cdiv(max seqlen_q, BLOCK_M), batch·nheads).

    LPT: the query blocks in reverse order (_query_tile).

    Varlen (packed) batches: stride_*b = 0 and each sequence's rows start at cu_seqlens[b].
    FP8: Q, K, V float8 e4m3, V with its key axis contiguous (stride_vn = 1, stride_vd its head-dim
    stride); Descale (batch, nheads_k, 3) float32 holds the q, k, v descale factors of each
    (batch, kv head); Out is bf16 or fp16. stride_vd is unused otherwise (the head dim is contiguous)."""
    qb = _query_tile(LPT)
    start_m = qb * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // nheads).to(tl.int64)
    off_h = off_bh % nheads
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CuQ, CuK, off_b, seqlen_q, seqlen_k, VARLEN)
    if not WS:   # (WS launches are dense: every program has rows; an early return stops warp specialization)
        if start_m >= seqlen_q:   # a shorter sequence of a packed batch
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows_ok = offs_m < seqlen_q
    lse_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + q_start + offs_m
    if WS:
        # Rows relative to start_m: triton 3.6's warp specializer gives the second consumer warpgroup
        # (start_m + 64) + tl.arange(64, 128) for start_m + tl.arange(0, 128), an offset counted twice
        # (seen in the TTGIR; the lse landed 64 rows off). Pointer bases plus a bare arange split right.
        rows_ok = tl.arange(0, BLOCK_M) < seqlen_q - start_m
        lse_ptrs = Lse + off_b * stride_lb + off_h * stride_lh + q_start + start_m + tl.arange(0, BLOCK_M)

    q_base = Q + off_b * stride_qb + off_h * stride_qh + (q_start + start_m) * stride_qm
    if WS:   # the warp specializer wants every load that feeds the loop's products from a descriptor
        q = _rows(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm, seqlen_q, stride_qm, BLOCK_M,
                  BLOCK_D, HEAD_DIM).load([start_m, 0])
    else:
        q = tl.load(q_base + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :],
                    mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    K_bh = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_bh = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    if TMA:   # this sequence's keys and values as (seqlen_k, HEAD_DIM) tensors: tiles past either end read 0
        K_bh = _rows(K_bh, seqlen_k, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
        V_bh = _rows(V_bh, seqlen_k, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h)
    v_descale = 1.0
    if FP8:   # scores are q·k of the stored values times q_descale · k_descale; out scales by v_descale
        ds = Descale + (off_b * (nheads // GROUP) + off_hk) * 3
        sm_scale = sm_scale * tl.load(ds) * tl.load(ds + 1)
        v_descale = tl.load(ds + 2)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_key, q_global, bounds = _query_block(offs_m, seed, off_b * nheads + off_h, Glob, start_m, seqlen_q,
                                             seqlen_k, left, right, num_sink, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                             HAS_SINK, DROPOUT, HAS_GLOBAL)
    if WS:
        # Warp-specialized (Hopper: a producer warpgroup issues the TMA loads, two consumer warpgroups of
        # BLOCK_M / 2 rows compute). Triton 3.6 compiles that only for one key loop without run-time branches
        # in it, so the launcher allows WS only for dense, causal or right-windowed attention without
        # score options (_tma_level).
        hi = tl.cdiv(bounds[4], BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _attn_fwd_ws(acc, l_i, m_i, q, K_bh, V_bh, hi, start_m + seqlen_k - seqlen_q + right,
                                     sm_scale, HAS_RIGHT, BLOCK_M, BLOCK_N)
    elif BLOCK_SPARSE:   # the key blocks the block mask lists for this query block, each masked
        sp = off_b * stride_sb + off_h * stride_sh + qb * n_kb
        count = tl.load(SpCnt + off_b * stride_cb + off_h * stride_ch + qb)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, count * 0, count * BLOCK_N, offs_m,
                                        offs_n, offs_d, stride_kn, stride_vn, stride_vd, seqlen_q, seqlen_k, left,
                                        right, num_sink, sm_scale, softcap, slope, row_key, drop_threshold,
                                        keep_scale, Glob, q_global, SpIdx + sp, SpPid + sp, SpTile, BLOCK_SPARSE == 1, HEAD_DIM,
                                        BLOCK_D, BLOCK_N, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_SINK, DROPOUT,
                                        HAS_GLOBAL, BLOCK_SPARSE, FP8, ROUND_P, BLOCK_M, TMA)
    else:
        # Full blocks first: a row's max then comes from unmasked keys, and the masked edges add little.
        # Then the masked edges of the window, then the sink blocks left of it.
        for phase in tl.static_range(4):
            if phase < 3 or HAS_SINK:
                p_lo, p_hi = _phase_bounds(bounds, phase)
                acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, p_lo, p_hi, offs_m, offs_n, offs_d,
                                                stride_kn, stride_vn, stride_vd, seqlen_q, seqlen_k, left, right,
                                                num_sink, sm_scale, softcap, slope, row_key, drop_threshold, keep_scale,
                                                Glob, q_global, SpIdx, SpPid, SpTile, phase != 0, HEAD_DIM, BLOCK_D,
                                                BLOCK_N, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_SINK, DROPOUT,
                                                HAS_GLOBAL, BLOCK_SPARSE, FP8, ROUND_P, BLOCK_M, TMA)
    # -- finish: out = acc / l, lse = m + log l (natural log); rows that saw no key give 0 and -inf
    empty = l_i == 0.0
    if FP8:   # l_i carries the factor 2^P_LOG2 of p
        out = acc * (v_descale / tl.where(empty, 1.0, l_i))[:, None]
        lse = tl.where(empty, float("-inf"),
                       (m_i + tl.math.log2(tl.where(empty, 1.0, l_i)) - P_LOG2) * 0.6931471805599453)
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_base = Out + off_b * stride_ob + off_h * stride_oh + (q_start + start_m) * stride_om
    tl.store(o_base + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptrs, lse, mask=rows_ok)


# ------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_preprocess(Out, DO, Delta,
                         stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
                         nheads, seqlen_q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Δ = rowsum(dO ∘ O), (batch, nheads, seqlen_q) float32."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // nheads).to(tl.int64)
    off_h = (off_bh % nheads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, Lse, Delta, start, end, offs_n, offs_m, offs_d,
                         stride_qm, stride_dom, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap,
                         slope, seed, bh, drop_threshold, keep_scale, Glob, k_global, SpList, SpPid, pid_stride,
                         SpTile, dp_scale, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr,
                         HAS_GLOBAL: tl.constexpr, BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr,
                         BLOCK_N: tl.constexpr, SUB_M: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end) of one query head.
    TMA: Q and DO are tensor descriptors of the head's (seqlen_q, HEAD_DIM) rows (see _attn_fwd_inner).

    Works on transposed tiles (keys as rows) so that dV += Pᵀ dO and dK += dSᵀ Q need no transposes.
    BLOCK_SPARSE: [start, end) walks the list SpList of query blocks (as in _attn_fwd_inner) in SUB_M
    tiles of BLOCK_M rows per listed block (the mask's blocks have SUB_M · BLOCK_M rows: dK/dV's best
    tiles stream fewer query rows than the forward's); the element-mask tile of query block qb is
    SpPid[qb · pid_stride], its rows SUB_M · BLOCK_M long.
    FP8: q tiles are float8, upcast (exactly) to dO's type; dP is scaled by dp_scale (v's descale).
    """
    if TMA:
        qT_ptrs = start
        do_ptrs = start
    else:
        qT_ptrs = Q + start.to(tl.int64) * stride_qm + offs_m[None, :] * stride_qm + offs_d[:, None]
        do_ptrs = DO + start.to(tl.int64) * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :]
    d_ok = offs_d < HEAD_DIM
    for start_m in range(start, end, BLOCK_M):
        if BLOCK_SPARSE:   # sub_m: this tile's first row within the mask's block
            start_m, tile_pid, sub_m = _listed_tile(SpList, SpPid, start_m // BLOCK_M, pid_stride, BLOCK_M, SUB_M,
                                                    BLOCK_SPARSE)
        if BLOCK_SPARSE and not TMA:
            qT_ptrs = Q + start_m.to(tl.int64) * stride_qm + offs_m[None, :] * stride_qm + offs_d[:, None]
            do_ptrs = DO + start_m.to(tl.int64) * stride_dom + offs_m[:, None] * stride_dom + offs_d[None, :]
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        if TMA:
            qT = tl.trans(Q.load([start_m, 0]))
            do = DO.load([start_m, 0])
        elif MASK:
            qT = tl.load(qT_ptrs, mask=d_ok[:, None] & (rows[None, :] < seqlen_q), other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :] & (rows[:, None] < seqlen_q), other=0.0)
        else:
            qT = tl.load(qT_ptrs, mask=d_ok[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=d_ok[None, :], other=0.0)
        if MASK:
            lse2 = tl.load(Lse + rows, mask=rows < seqlen_q, other=float("inf"))
            delta = tl.load(Delta + rows, mask=rows < seqlen_q, other=0.0)
        else:
            lse2 = tl.load(Lse + rows)
            delta = tl.load(Delta + rows)
        # rows that saw no key (lse = -inf): +inf makes their P exactly 0
        lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2) * 1.4426950408889634
        if FP8:
            qT = qT.to(DO.dtype.element_ty)
        qkT = tl.dot(k, qT)
        sT, tT = _scores(qkT, rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, sm_scale, softcap, slope,
                         SOFTCAP, HAS_ALIBI)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASK:
            q_global = rows
            if HAS_GLOBAL:
                q_global = _global_flags(Glob, rows, seqlen_q)
            ok = _visible(rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, left, right, num_sink, q_global[None, :],
                          k_global[:, None], HAS_LEFT, HAS_RIGHT, HAS_SINK, HAS_GLOBAL)
            if BLOCK_SPARSE:
                has = (offs_m[None, :] * 0 + tile_pid) >= 0
                tile = SpTile + tile_pid.to(tl.int64) * (BLOCK_M * SUB_M * BLOCK_N) + tl.arange(0, BLOCK_N)[:, None]
                ok = ok & (tl.load(tile + (sub_m + offs_m[None, :]) * BLOCK_N, mask=has, other=1) != 0)
            pT = tl.where(ok, pT, 0.0)
        # dP = dO Vᵀ, dS = P ∘ (dP − Δ); with dropout, V saw P ∘ Z and dP passes back through Z
        dpT = tl.dot(v, tl.trans(do))
        if FP8:
            dpT = dpT * dp_scale
        if DROPOUT:   # one mask for both uses (P for dV, dP's way back)
            kept = _kept(_row_keys(seed, bh, rows)[None, :], offs_n[:, None], drop_threshold)
            dv = tl.dot(tl.where(kept, pT * keep_scale, 0.0).to(do.dtype), do, dv)
            dpT = tl.where(kept, dpT * keep_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
        if not BLOCK_SPARSE and not TMA:
            qT_ptrs += BLOCK_M * stride_qm
            do_ptrs += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_ws(dk, dv, k, v, Q, DO, Lse, Delta, lo, hi, lim, sm_scale, CAUSAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK/dV's warp-specialized query loop (see _attn_fwd_ws): _attn_bwd_dkdv_inner without its options, on
    descriptors Q, DO over the query blocks [lo, hi) (whole blocks: seqlen_q a multiple of BLOCK_M; every
    row's lse finite). CAUSAL: key start_n + j is visible to row start_m + i iff j - i <= start_m + lim
    (lim = seqlen_k - seqlen_q + right - start_n)."""
    qk_scale = sm_scale * 1.4426950408889634
    dji = tl.arange(0, BLOCK_N)[:, None] - tl.arange(0, BLOCK_M)[None, :]
    for start_m in tl.range(lo, hi, BLOCK_M, warp_specialize=True):
        qT = Q.load([start_m, 0]).T
        do = DO.load([start_m, 0])
        rows = start_m + tl.arange(0, BLOCK_M)
        pT = tl.math.exp2(tl.dot(k, qT) * qk_scale - (tl.load(Lse + rows) * 1.4426950408889634)[None, :])
        if CAUSAL:
            pT = tl.where(dji <= start_m + lim, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do))
        dv = tl.dot(pT.to(do.dtype), do, dv)
        dsT = pT * (dpT - tl.load(Delta + rows)[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk)
    return dk, dv


@triton.jit
def _attn_bwd_dq_ws(dq, q, do, lse2, delta, K, V, hi, lim, sm_scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """dQ's warp-specialized key loop (see _attn_fwd_ws, whose mask rule and bounds it shares)."""
    qk_scale = sm_scale * 1.4426950408889634
    dij = tl.arange(0, BLOCK_N)[None, :] - tl.arange(0, BLOCK_M)[:, None]
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=True):
        k = K.load([start_n, 0])
        p = tl.math.exp2(tl.dot(q, k.T) * qk_scale - lse2[:, None])
        if CAUSAL:
            p = tl.where(dij <= lim - start_n, p, 0.0)
        ds = p * (tl.dot(do, V.load([start_n, 0]).T) - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, Alibi, CuQ, CuK, Glob, SpCnt, SpIdx, SpPid, SpTile, Descale,
                   stride_qb, stride_qm, stride_qh,
                   stride_kb, stride_kn, stride_kh,
                   stride_vb, stride_vn, stride_vh,
                   stride_dob, stride_dom, stride_doh,
                   stride_dkb, stride_dkn, stride_dkh,
                   stride_dvb, stride_dvn, stride_dvh,
                   stride_lb, stride_lh, stride_ab, stride_sb, stride_sh, stride_cb, stride_ch, n_qb, n_kb,
                   nheads_k, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap,
                   seed, drop_threshold, keep_scale,
                   seq_bucket, gpu_key, tma_ok,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   VARLEN: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                   BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SUB_M: tl.constexpr, TMA: tl.constexpr = False, WS: tl.constexpr = False):
    """One program: one block of BLOCK_N keys of one (batch, kv head), summing over the GROUP query
    heads that share it (GQA) in a fixed order: deterministic. Grid (cdiv(seqlen_k, BLOCK_N), batch·nheads_k).
    SUB_M: with a block mask, its blocks have SUB_M · BLOCK_M query rows (see _attn_bwd_dkdv_inner).
    WS: the warp-specialized query loop _attn_bwd_dkdv_ws (the launcher's conditions: _tma_level).

    FP8 (experimental): Q, K, V float8 e4m3 with Descale (batch, nheads_k, 3) as in the forward, upcast
    to dO's type (bf16/fp16 hold every e4m3 value exactly); gradients of the dequantized inputs."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = (off_bhk // nheads_k).to(tl.int64)
    off_hk = (off_bhk % nheads_k).to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CuQ, CuK, off_b, seqlen_q, seqlen_k, VARLEN)
    if not WS:   # (WS launches are dense; an early return stops warp specialization)
        if start_n >= seqlen_k:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # rows of this block relative to start_n (see _attn_fwd's WS for why not offs_n)
    kv_mask = (tl.arange(0, BLOCK_N)[:, None] < seqlen_k - start_n) & (offs_d[None, :] < HEAD_DIM)
    row_off = (k_start + start_n) + tl.arange(0, BLOCK_N)[:, None]
    if WS:   # the warp specializer wants the loop's operands from descriptors (as q in _attn_fwd)
        k = _rows(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn, seqlen_k, stride_kn, BLOCK_N,
                  BLOCK_D, HEAD_DIM).load([start_n, 0])
        v = _rows(V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn, seqlen_k, stride_vn, BLOCK_N,
                  BLOCK_D, HEAD_DIM).load([start_n, 0])
    else:
        k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + row_off * stride_kn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + row_off * stride_vn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
    s_scale = sm_scale    # multiplies q·k in the scores
    dk_scale = sm_scale   # multiplies dSᵀ Q
    dp_scale = 1.0        # multiplies dO Vᵀ
    if FP8:   # the stored values times their descales are the inputs
        ds = Descale + (off_b * nheads_k + off_hk) * 3
        q_descale = tl.load(ds)
        s_scale = sm_scale * q_descale * tl.load(ds + 1)
        dk_scale = sm_scale * q_descale
        dp_scale = tl.load(ds + 2)
        k = k.to(DO.dtype.element_ty)
        v = v.to(DO.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _q_blocks(start_n, seqlen_q, seqlen_k, left, right, num_sink, BLOCK_M, BLOCK_N,
                                         HAS_LEFT, HAS_RIGHT, HAS_SINK, HAS_GLOBAL)
    k_global = offs_n
    if HAS_GLOBAL:
        k_global = _global_flags(Glob, offs_n, seqlen_k)
    for g in tl.range(GROUP, num_stages=1 if TMA else None):   # (a pipelined loop cannot hold tensormap_create)
        off_h = off_hk * GROUP + g
        Q_bh = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
        DO_bh = DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom
        if TMA:   # this head's query rows (see _attn_fwd)
            Q_bh = _rows(Q_bh, seqlen_q, stride_qm, BLOCK_M, BLOCK_D, HEAD_DIM)
            DO_bh = _rows(DO_bh, seqlen_q, stride_dom, BLOCK_M, BLOCK_D, HEAD_DIM)
        Lse_bh = Lse + off_b * stride_lb + off_h * stride_lh + q_start   # Delta has lse's layout
        Delta_bh = Delta + off_b * stride_lb + off_h * stride_lh + q_start
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + off_b * stride_ab + off_h)
        bh = off_b * nheads_k * GROUP + off_h
        if WS:
            dk, dv = _attn_bwd_dkdv_ws(dk, dv, k, v, Q_bh, DO_bh, Lse_bh, Delta_bh, lo, seqlen_q,
                                       seqlen_k - seqlen_q + right - start_n, s_scale, HAS_RIGHT, BLOCK_M, BLOCK_N)
        elif BLOCK_SPARSE:   # the query blocks the block mask lists for this key block (BlockMask.kernel_lists)
            kb = tl.program_id(0)
            sp = off_b * stride_sb + off_h * stride_sh
            count = tl.load(SpCnt + off_b * stride_cb + off_h * stride_ch + kb)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, Lse_bh, Delta_bh, count * 0, count * (SUB_M * BLOCK_M),
                                          offs_n, offs_m, offs_d, stride_qm, stride_dom, seqlen_q, seqlen_k, left,
                                          right, num_sink, s_scale, softcap, slope, seed, bh, drop_threshold,
                                          keep_scale, Glob, k_global, SpIdx + sp + kb * n_qb, SpPid + sp + kb, n_kb,
                                          SpTile, dp_scale, BLOCK_SPARSE == 1, HEAD_DIM, BLOCK_M, HAS_LEFT, HAS_RIGHT, SOFTCAP,
                                          HAS_ALIBI, HAS_SINK, DROPOUT, HAS_GLOBAL, BLOCK_SPARSE, FP8, BLOCK_N, SUB_M, TMA)
        else:
            for phase in tl.static_range(3):   # unmasked middle, then the two masked edges
                p_lo, p_hi = _phase_bounds((lo * 0, lo, full_lo, full_hi, hi), phase)
                dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, Lse_bh, Delta_bh, p_lo, p_hi, offs_n, offs_m,
                                              offs_d, stride_qm, stride_dom, seqlen_q, seqlen_k, left, right, num_sink,
                                              s_scale, softcap, slope, seed, bh, drop_threshold, keep_scale, Glob,
                                              k_global, SpIdx, SpPid, n_kb, SpTile, dp_scale, phase != 0, HEAD_DIM,
                                              BLOCK_M, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_ALIBI, HAS_SINK, DROPOUT,
                                              HAS_GLOBAL, BLOCK_SPARSE, FP8, BLOCK_N, 1, TMA)
    dk = dk * dk_scale   # dS was taken w.r.t. the scaled scores
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + row_off * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + row_off * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K, V, start, end, offs_m, offs_n, offs_d,
                       stride_kn, stride_vn, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap, slope,
                       row_key, drop_threshold, keep_scale, Glob, q_global, SpList, SpPid, SpTile, dp_scale,
                       MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                       HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                       BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) (a list with BLOCK_SPARSE, as in
    _attn_fwd_inner; TMA: K and V are descriptors, as there).
    FP8: K, V tiles are float8, upcast (exactly) to q's type; dP is scaled by dp_scale (v's descale)."""
    if TMA:
        kT_ptrs = start
        vT_ptrs = start
    else:
        kT_ptrs = K + start.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
        vT_ptrs = V + start.to(tl.int64) * stride_vn + offs_n[None, :] * stride_vn + offs_d[:, None]
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        tile_pid = -1   # no element mask (a block mask's partly filled tile sets it below)
        if BLOCK_SPARSE:
            start_n, tile_pid, _ = _listed_tile(SpList, SpPid, start_n // BLOCK_N, 1, BLOCK_N, 1, BLOCK_SPARSE)
        if BLOCK_SPARSE and not TMA:
            kT_ptrs = K + start_n.to(tl.int64) * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None]
            vT_ptrs = V + start_n.to(tl.int64) * stride_vn + offs_n[None, :] * stride_vn + offs_d[:, None]
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASK:
            kv_mask = d_ok[:, None] & (cols[None, :] < seqlen_k)
        else:
            kv_mask = d_ok[:, None]
        if TMA:
            kT = tl.trans(K.load([start_n, 0]))
            vT = tl.trans(V.load([start_n, 0]))
        else:
            kT = tl.load(kT_ptrs, mask=kv_mask, other=0.0)
            vT = tl.load(vT_ptrs, mask=kv_mask, other=0.0)
        if FP8:
            kT = kT.to(q.dtype)
            vT = vT.to(q.dtype)
        qk = tl.dot(q, kT)
        s, t = _scores(qk, offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, sm_scale, softcap, slope,
                       SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            ok = _query_tile_visible(offs_m, cols, seqlen_q, seqlen_k, left, right, num_sink, q_global, Glob, SpTile,
                                     tile_pid, HAS_LEFT, HAS_RIGHT, HAS_SINK, HAS_GLOBAL, BLOCK_SPARSE, BLOCK_M,
                                     BLOCK_N)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT)
        if FP8:
            dp = dp * dp_scale
        if DROPOUT:
            dp = _dropped(dp, row_key[:, None], cols[None, :], drop_threshold, keep_scale)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq)
        if not BLOCK_SPARSE and not TMA:
            kT_ptrs += BLOCK_N * stride_kn
            vT_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Alibi, CuQ, CuK, Glob, SpCnt, SpIdx, SpPid, SpTile, Descale,
                 stride_qb, stride_qm, stride_qh,
                 stride_kb, stride_kn, stride_kh,
                 stride_vb, stride_vn, stride_vh,
                 stride_dob, stride_dom, stride_doh,
                 stride_dqb, stride_dqm, stride_dqh,
                 stride_lb, stride_lh, stride_ab, stride_sb, stride_sh, stride_cb, stride_ch, n_qb, n_kb,
                 nheads, seqlen_q, seqlen_k, left, right, num_sink, sm_scale, softcap,
                 seed, drop_threshold, keep_scale,
                 seq_bucket, gpu_key, tma_ok,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 VARLEN: tl.constexpr, HAS_SINK: tl.constexpr, DROPOUT: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                 BLOCK_SPARSE: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 TMA: tl.constexpr = False, WS: tl.constexpr = False, LPT: tl.constexpr = False):
    """One program: dQ of one block of BLOCK_M queries of one (batch, head); no atomics.
    Grid (cdiv(seqlen_q, BLOCK_M), batch·nheads). FP8 (experimental): as in _attn_bwd_dkdv. LPT: as in _attn_fwd.
    WS: the warp-specialized key loop _attn_bwd_dq_ws (the launcher's conditions: _tma_level)."""
    qb = _query_tile(LPT)
    start_m = qb * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // nheads).to(tl.int64)
    off_h = off_bh % nheads
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    q_start, k_start, seqlen_q, seqlen_k = _sequence(CuQ, CuK, off_b, seqlen_q, seqlen_k, VARLEN)
    if not WS:   # (as in _attn_fwd)
        if start_m >= seqlen_q:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # rows relative to start_m (see _attn_fwd's WS)
    rows_ok = tl.arange(0, BLOCK_M) < seqlen_q - start_m
    mask = rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    row_off = (q_start + start_m) + tl.arange(0, BLOCK_M)[:, None]
    lse_base = off_b * stride_lb + off_h * stride_lh + q_start   # Delta has lse's layout
    if WS:
        # Every operand from a descriptor: the warp specializer fails (an assertion in WSLowerToken) on a
        # pointer load of rows it splits between the consumers; lse and delta come as 1-D tiles. WS launches
        # have whole query tiles and finite lse (_tma_level).
        q = _rows(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm, seqlen_q, stride_qm, BLOCK_M,
                  BLOCK_D, HEAD_DIM).load([start_m, 0])
        do = _rows(DO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom, seqlen_q, stride_dom, BLOCK_M,
                   BLOCK_D, HEAD_DIM).load([start_m, 0])
        lse2 = tl.make_tensor_descriptor(Lse + lse_base, shape=[seqlen_q], strides=[1],
                                         block_shape=[BLOCK_M]).load([start_m]) * 1.4426950408889634
        delta = tl.make_tensor_descriptor(Delta + lse_base, shape=[seqlen_q], strides=[1],
                                          block_shape=[BLOCK_M]).load([start_m])
    else:
        q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + row_off * stride_qm + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row_off * stride_dom + offs_d[None, :],
                     mask=mask, other=0.0)
    s_scale = sm_scale    # multiplies q·k in the scores
    dq_scale = sm_scale   # multiplies dS K
    dp_scale = 1.0        # multiplies dO Vᵀ
    if FP8:   # the stored values times their descales are the inputs
        ds = Descale + (off_b * (nheads // GROUP) + off_hk) * 3
        k_descale = tl.load(ds + 1)
        s_scale = sm_scale * tl.load(ds) * k_descale
        dq_scale = sm_scale * k_descale
        dp_scale = tl.load(ds + 2)
        q = q.to(DO.dtype.element_ty)
    if not WS:
        lse_off = lse_base + start_m + tl.arange(0, BLOCK_M)
        lse = tl.load(Lse + lse_off, mask=rows_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(Delta + lse_off, mask=rows_ok, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b * stride_ab + off_h)
    K_bh = K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn
    V_bh = V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn
    if TMA:   # as in _attn_fwd
        K_bh = _rows(K_bh, seqlen_k, stride_kn, BLOCK_N, BLOCK_D, HEAD_DIM)
        V_bh = _rows(V_bh, seqlen_k, stride_vn, BLOCK_N, BLOCK_D, HEAD_DIM)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_key, q_global, bounds = _query_block(offs_m, seed, off_b * nheads + off_h, Glob, start_m, seqlen_q,
                                             seqlen_k, left, right, num_sink, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                             HAS_SINK, DROPOUT, HAS_GLOBAL)
    if WS:
        dq = _attn_bwd_dq_ws(dq, q, do, lse2, delta, K_bh, V_bh, tl.cdiv(bounds[4], BLOCK_N) * BLOCK_N,
                             start_m + seqlen_k - seqlen_q + right, s_scale, HAS_RIGHT, BLOCK_M, BLOCK_N)
    elif BLOCK_SPARSE:   # as in the forward
        sp = off_b * stride_sb + off_h * stride_sh + qb * n_kb
        count = tl.load(SpCnt + off_b * stride_cb + off_h * stride_ch + qb)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_bh, V_bh, count * 0, count * BLOCK_N, offs_m,
                                offs_n, offs_d, stride_kn, stride_vn, seqlen_q, seqlen_k, left, right, num_sink,
                                s_scale, softcap, slope, row_key, drop_threshold, keep_scale, Glob, q_global,
                                SpIdx + sp, SpPid + sp, SpTile, dp_scale, BLOCK_SPARSE == 1, HEAD_DIM, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                SOFTCAP, HAS_ALIBI, HAS_SINK, DROPOUT, HAS_GLOBAL, BLOCK_SPARSE, FP8, BLOCK_M, TMA)
    else:
        for phase in tl.static_range(4):   # the forward's order: unmasked middle, masked edges, sinks
            if phase < 3 or HAS_SINK:
                p_lo, p_hi = _phase_bounds(bounds, phase)
                dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_bh, V_bh, p_lo, p_hi, offs_m, offs_n, offs_d,
                                        stride_kn, stride_vn, seqlen_q, seqlen_k, left, right, num_sink, s_scale,
                                        softcap, slope, row_key, drop_threshold, keep_scale, Glob, q_global, SpIdx,
                                        SpPid, SpTile, dp_scale, phase != 0, HEAD_DIM, BLOCK_N, HAS_LEFT, HAS_RIGHT,
                                        SOFTCAP, HAS_ALIBI, HAS_SINK, DROPOUT, HAS_GLOBAL, BLOCK_SPARSE, FP8, BLOCK_M, TMA)
    dq = dq * dq_scale
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row_off * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)
