"""Inference: attention over a KV cache (contiguous or paged), appended in place; page and streaming caches.

`flash_attn_with_kvcache` has flash_attn's semantics. A cache is a set of pages: a contiguous cache
(batch_cache, seqlen_cache, nheads_k, headdim) is one page per sequence (page_size = seqlen_cache, the
page of sequence b being cache_batch_idx[b], or b); a paged cache (num_pages, page_size, nheads_k,
headdim) is addressed through block_table. Either way sequence b's keys are the cache rows

    cache_leftpad[b] … cache_seqlens[b] + seqlen_new − 1        (rows past cache_seqlens[b]: the new k, v)

and q's last row sits on the last of them (causal masks aligned bottom-right, as in flashattn.masks).

On CUDA the Triton kernel `backends/triton/decode.py` reads the pages in place, packing the query
heads of a GQA group into one tile and splitting long contexts over several programs whose partial
results `flashattn.combine` merges. Elsewhere the keys of each sequence are gathered and the packed
(varlen) forward runs, the same online-softmax loop as everywhere.

FP8 caches: k_cache, v_cache in float8_e4m3fn hold x8 standing for x = x8 · descale, with k_descale,
v_descale fixed per sequence and kv head (or per tensor), chosen by the caller; q, the new k, v and the
output stay bf16/fp16. New tokens are quantized on their way into the cache (fp8.quantize_with), and
attention reads the e4m3 tiles, upcasts them exactly and applies the descales in fp32; the PyTorch path
dequantizes the gathered keys in float32 (the same definition).

`PagedKVCache` allocates pages for sequences that come and go (a minimal allocator for users who do
not bring their own); `StreamingKVCache` keeps the first sink tokens and a sliding window of recent
ones (StreamingLLM) in fixed memory, for generation of any length.
"""
from __future__ import annotations

import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import fp8, masks, ops
from .api import (FP8_DTYPE, MAX_HEADDIM, MIN_HEADDIM, _check_descale, _check_options, _check_tensor, _fp8_capable,
                  choose_backend)
from .rotary import rotate

CACHE_LAYOUT = "(batch_cache, seqlen_cache, nheads_k, headdim), or (num_pages, page_size, nheads_k, headdim) with block_table"


# ----------------------------------------------------------------------------------------------
# the function


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, rotary_cos: Optional[Tensor] = None,
                            rotary_sin: Optional[Tensor] = None, cache_seqlens: Union[int, Tensor, None] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                            causal: bool = False, window_size: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
                            rotary_interleaved: bool = True, alibi_slopes: Optional[Tensor] = None,
                            num_splits: int = 0, return_softmax_lse: bool = False, *, num_sink_tokens: int = 0,
                            validate: bool = True, k_descale: Optional[Tensor] = None,
                            v_descale: Optional[Tensor] = None):
    """Attention of q over a KV cache, after appending the new k, v to it in place (inference: no gradients).

    Args:
        q: (batch, seqlen_q, nheads, headdim); seqlen_q = 1 when decoding, more for chunked prefill.
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), or with block_table
            (num_pages, page_size, nheads_k, headdim) for any page_size >= 1. Written in place when k, v are given.
            q's dtype, or torch.float8_e4m3fn (then q is bf16/fp16; see k_descale).
        k, v: (batch, seqlen_new, nheads_k, headdim) or None: new tokens, stored at cache rows
            cache_seqlens[b] … cache_seqlens[b] + seqlen_new − 1 before the attention (q's dtype; quantized
            for an FP8 cache: k / k_descale clamped to ±448, rounded to e4m3, after the rotary).
        rotary_cos, rotary_sin: (positions, rotary_dim / 2) or None: rotary tables; when given (with k, v),
            the new k is rotated at its cache row index and q at cache_seqlens[b] + i when causal or local
            (window_size != (-1, -1)), else at cache_seqlens[b] for every query (flash_attn's rule).
        cache_seqlens: int or (batch,) int32: the cache rows in use per sequence before the append
            (the end index, leftpad included). None: the whole cache.
        cache_batch_idx: (batch,) int32 or None: the row of a contiguous cache holding sequence b (default b).
        cache_leftpad: (batch,) int32 or None: the first cache row of each sequence (default 0).
        block_table: (batch, max_pages_per_seq) int32 or None: page of each sequence's i-th page_size rows.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as in flash_attn_func.
        rotary_interleaved: pair channels 2i, 2i + 1 (True, flash_attn's default here) or i, i + rotary_dim / 2.
        num_splits: split each sequence's keys over this many programs on the GPU (flash-decoding);
            0 chooses from the shape and the GPU's SM count; 1 never splits. The CPU path ignores it.
        return_softmax_lse: also return lse (batch, nheads, seqlen_q) float32.
        num_sink_tokens: the first keys of each sequence stay visible whatever the window (StreamingLLM).
        validate: check cache_seqlens, cache_batch_idx, cache_leftpad and block_table against the cache
            (one device-to-host read); pass False in a tight decode loop whose inputs are known good.
        k_descale, v_descale: float8_e4m3fn caches only: float32 tensors of shape (batch, nheads_k) (per
            sequence b of this call and kv head) or of one element (per tensor); None = 1. The cache stands
            for k_cache · k_descale: the factors are fixed for a sequence's life (its rows are stored with
            them), chosen by the caller (e.g. fp8.quantize of the prefill's k, v, or a calibration); new
            values beyond 448 · descale saturate.

    Returns: out (batch, seqlen_q, nheads, headdim) [, lse]. On an invalid argument nothing is written.
    """
    p = _prepare(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                 block_table, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits, num_sink_tokens,
                 validate, rotary_interleaved, k_descale, v_descale)
    with torch.no_grad():
        q, k, v = _rotated(p, q, k, v)
        if k is not None:
            _append(k_cache, v_cache, k, v, p)
        out, lse = _attend(q, k_cache, v_cache, p)
    return (out, lse) if return_softmax_lse else out


class _Plan:
    """The checked, normalised arguments: every cache as pages (see the module docstring)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _int_tensor(name: str, x, batch: int, device, allow_int: bool = False) -> Tensor:
    if allow_int and isinstance(x, numbers.Integral) and not isinstance(x, bool):
        return torch.full((batch,), int(x), dtype=torch.int32, device=device)
    if not isinstance(x, Tensor) or x.dtype not in (torch.int32, torch.int64) or tuple(x.shape) != (batch,):
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be an int32 tensor of shape (batch,)=({batch},){' or an int' * allow_int}, "
                         f"got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; move it with .to(q.device)")
    return x.to(torch.int32)


def _prepare(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
             block_table, softmax_scale, causal, window_size, softcap, alibi_slopes, num_splits, num_sink,
             validate, rotary_interleaved, k_descale, v_descale) -> _Plan:
    _check_tensor("q", q, "(batch, seqlen_q, nheads, headdim)", allow_fp8=True)
    _check_tensor("k_cache", k_cache, CACHE_LAYOUT, allow_fp8=True)
    _check_tensor("v_cache", v_cache, CACHE_LAYOUT, allow_fp8=True)
    b, sq, h, d = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    pages, page_size, hk, dk = k_cache.shape
    kv_fp8 = k_cache.dtype == FP8_DTYPE
    if kv_fp8 != (v_cache.dtype == FP8_DTYPE):
        raise TypeError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}: an FP8 cache has both in "
                        f"float8_e4m3fn (with k_descale, v_descale), any other both in q's dtype ({q.dtype})")
    if q.dtype == FP8_DTYPE:
        raise TypeError("q is float8_e4m3fn: flash_attn_with_kvcache takes bfloat16 or float16 q (the cache may be "
                        "float8_e4m3fn, with k_descale and v_descale); pass q in bfloat16 "
                        "(flashattn.fp8.dequantize(q, q_descale).to(torch.bfloat16))")
    if kv_fp8 and q.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"q has dtype {q.dtype} but the cache is float8_e4m3fn: an FP8 cache is read with bfloat16 or "
                        "float16 q (the new k, v and the output have q's dtype); convert q (and k, v) with "
                        ".to(torch.bfloat16)")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype and not kv_fp8:
            raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; the cache and q must share one dtype")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move one of them")
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"the last dimension (headdim) of {name} must be contiguous, got strides {x.stride()}")
    if dk != d:
        raise ValueError(f"headdim differs: q has {d}, the cache {dk}")
    if hk == 0 or h % hk != 0:
        raise ValueError(f"nheads of q ({h}) must be a multiple of the cache's nheads_k ({hk})")
    if not (MIN_HEADDIM <= d <= MAX_HEADDIM):
        raise ValueError(f"headdim must be between {MIN_HEADDIM} and {MAX_HEADDIM}, got {d}")
    scale = _check_options(b, h, d, q.device, 0.0, softmax_scale, window_size, softcap, alibi_slopes)
    descales = (None, None)
    if kv_fp8:
        descales = tuple(_check_descale(n, x, b, hk, q.device) for n, x in (("k_descale", k_descale),
                                                                            ("v_descale", v_descale)))
    else:
        for name, x in (("k_descale", k_descale), ("v_descale", v_descale)):
            if x is not None:
                raise ValueError(f"{name} is given but the cache is {k_cache.dtype}: descale factors apply to a "
                                 f"float8_e4m3fn cache only; drop {name}, or allocate the cache as torch.float8_e4m3fn")
    backend = _backend(q, kv_fp8)
    if not isinstance(num_sink, numbers.Integral) or isinstance(num_sink, bool) or num_sink < 0:
        raise ValueError(f"num_sink_tokens must be an int >= 0, got {num_sink!r}")
    if not isinstance(num_splits, numbers.Integral) or isinstance(num_splits, bool) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = choose automatically), got {num_splits!r}")
    # -- new tokens
    if (k is None) != (v is None):
        raise ValueError("pass both k and v (the new tokens) or neither")
    s_new = 0
    if k is not None:
        _check_tensor("k", k, "(batch, seqlen_new, nheads_k, headdim)")
        _check_tensor("v", v, "(batch, seqlen_new, nheads_k, headdim)")
        if k.shape != v.shape or tuple(k.shape[:1] + k.shape[2:]) != (b, hk, d):
            raise ValueError(f"k and v must have shape (batch, seqlen_new, nheads_k, headdim) = ({b}, *, {hk}, {d}), "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
            raise TypeError(f"k and v must match q's dtype {q.dtype} and device {q.device}, got "
                            f"{k.dtype}/{k.device} and {v.dtype}/{v.device}")
        s_new = k.shape[1]
    # -- pages
    paged = block_table is not None
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx is for contiguous caches; with block_table, the table says where each "
                             "sequence's pages are")
        if (not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
                or block_table.shape[0] != b or block_table.shape[1] == 0):
            got = (f"{block_table.dtype} tensor of shape {tuple(block_table.shape)}" if isinstance(block_table, Tensor)
                   else type(block_table).__name__)
            raise ValueError(f"block_table must be an int32 tensor of shape (batch, max_pages_per_seq)=({b}, n >= 1), "
                             f"got {got}")
        if block_table.device != q.device:
            raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}; move it")
        table, capacity = block_table, block_table.shape[1] * page_size
    else:   # a contiguous cache: page b (table None), or the cache row cache_batch_idx[b]
        table = (_int_tensor("cache_batch_idx", cache_batch_idx, b, q.device)[:, None] if cache_batch_idx is not None
                 else None)
        if cache_batch_idx is None and pages < b:
            raise ValueError(f"k_cache holds {pages} sequences but q has batch {b}; pass cache_batch_idx or a larger "
                             "cache")
        capacity = page_size
    seqlens = (_int_tensor("cache_seqlens", cache_seqlens, b, q.device, allow_int=True) if cache_seqlens is not None
               else torch.full((b,), capacity - s_new, dtype=torch.int32, device=q.device))
    leftpad = _int_tensor("cache_leftpad", cache_leftpad, b, q.device) if cache_leftpad is not None else None
    # -- rotary
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin rotate the new k and q; they need k and v (new tokens) too. "
                             "Rotate q yourself (flashattn.rotary.apply_rotary_emb) when appending nothing")
        if (rotary_cos.dim() != 2 or rotary_cos.shape != rotary_sin.shape or 2 * rotary_cos.shape[1] > d
                or rotary_cos.shape[1] == 0):
            raise ValueError(f"rotary_cos and rotary_sin must have one shape (positions, rotary_dim / 2) with "
                             f"rotary_dim <= headdim {d}, got {tuple(rotary_cos.shape)} and {tuple(rotary_sin.shape)}")
    local = causal or tuple(window_size) != (-1, -1)
    capturing = torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing())
    max_seqlen_k = capacity
    if validate and not capturing:
        max_seqlen_k = _validate(seqlens, leftpad, table, s_new, capacity, page_size, pages, paged, rotary_cos, sq,
                                 local, cache_batch_idx)
    left, right = masks.window_bounds(causal, window_size)
    return _Plan(paged=paged, table=table, page_size=page_size, seqlens=seqlens, leftpad=leftpad, s_new=s_new,
                 scale=scale, left=left, right=right, softcap=float(softcap), alibi=alibi_slopes, num_sink=int(num_sink),
                 num_splits=int(num_splits), cos=rotary_cos, sin=rotary_sin, interleaved=rotary_interleaved,
                 local=local, max_seqlen_k=max_seqlen_k, backend=backend, k_descale=descales[0],
                 v_descale=descales[1])


def _backend(q: Tensor, kv_fp8: bool) -> str:
    """choose_backend(q), except that the Triton kernel reads an FP8 cache only on sm_89+ (Triton has no
    float8 e4m3 before Ada): on older GPUs the PyTorch path dequantizes it."""
    backend = choose_backend(q)
    if backend == "triton" and kv_fp8 and q.is_cuda and not _fp8_capable(q.device):
        if os.environ.get("FLASHATTN_BACKEND", "").strip():
            raise ValueError("FLASHATTN_BACKEND=triton with a float8_e4m3fn KV cache needs sm_89 or newer (Ada, "
                             "Hopper); use FLASHATTN_BACKEND=torch (the PyTorch path dequantizes the cache) or a "
                             "bfloat16 cache")
        return "torch"
    return backend


def _validate(seqlens, leftpad, table, s_new, capacity, page_size, pages, paged, rotary_cos, sq, local,
              cache_batch_idx) -> int:
    """Host-side checks of the index arguments (one transfer); returns the longest key sequence."""
    sl = seqlens.tolist()
    lp = leftpad.tolist() if leftpad is not None else [0] * len(sl)
    for i, (n, pad) in enumerate(zip(sl, lp)):
        if n < 0 or pad < 0 or pad > n:
            raise ValueError(f"sequence {i}: need 0 <= cache_leftpad <= cache_seqlens, got cache_leftpad {pad} and "
                             f"cache_seqlens {n}")
        if n + s_new > capacity:
            what = "max_pages_per_seq · page_size" if paged else "seqlen_cache"
            raise ValueError(f"sequence {i}: cache_seqlens {n} + {s_new} new tokens = {n + s_new} rows, but the cache "
                             f"holds {capacity} ({what}); nothing was written. Use a larger cache (or more pages)")
    if paged:
        rows = table.tolist()
        for i, (n, pad) in enumerate(zip(sl, lp)):
            end = n + s_new
            used = rows[i][pad // page_size: -(-end // page_size)] if end > pad else []
            bad = [p for p in used if not 0 <= p < pages]
            if bad:
                raise ValueError(f"block_table[{i}] names page {bad[0]} among the pages its {end} rows use, but the "
                                 f"cache has pages 0..{pages - 1}; nothing was written")
    elif cache_batch_idx is not None:
        idx = table[:, 0].tolist()
        if any(not 0 <= r < pages for r in idx):
            raise ValueError(f"cache_batch_idx must be rows of the cache, in [0, {pages}), got {idx}")
        if s_new and len(set(idx)) != len(idx):
            raise ValueError(f"cache_batch_idx {idx} names a cache row twice; two sequences cannot append to one row")
    if rotary_cos is not None:
        last = max(n + s_new for n in sl) - 1 if sl else 0
        if last >= rotary_cos.shape[0]:
            raise ValueError(f"rotary tables cover positions 0..{rotary_cos.shape[0] - 1}, but cache row {last} is "
                             "rotated: pass longer rotary_cos/rotary_sin")
    return max((n + s_new - pad for n, pad in zip(sl, lp)), default=0)


def _rotated(p: _Plan, q: Tensor, k: Optional[Tensor], v: Optional[Tensor]):
    """q and the new k rotated at their positions (cache row indices), when rotary tables are given."""
    if p.cos is None:
        return q, k, v
    start = p.seqlens.long()[:, None]                                          # (b, 1)
    pos_k = start + torch.arange(k.shape[1], device=q.device)[None, :]
    pos_q = start + torch.arange(q.shape[1], device=q.device)[None, :] if p.local else start.expand(-1, q.shape[1])
    q = rotate(q, p.cos[pos_q], p.sin[pos_q], p.interleaved)
    k = rotate(k, p.cos[pos_k], p.sin[pos_k], p.interleaved)
    return q, k, v


def _table(p: _Plan, b: int, device) -> Tensor:
    """The (b, n) page table; a contiguous cache without cache_batch_idx has page b for sequence b."""
    return p.table if p.table is not None else torch.arange(b, dtype=torch.int32, device=device)[:, None]


def _append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, p: _Plan) -> None:
    """Write new token t of sequence b at cache row seqlens[b] + t (in its page); quantized for an FP8 cache."""
    if p.backend == "triton":
        from .backends.triton.decode import append_kv
        return append_kv(k_cache, v_cache, k, v, p.table, p.seqlens, p.k_descale, p.v_descale)
    if p.k_descale is not None:
        k = fp8.quantize_with(k, p.k_descale[:, None, :, None])
        v = fp8.quantize_with(v, p.v_descale[:, None, :, None])
    b, s_new = k.shape[:2]
    rows = p.seqlens.long()[:, None] + torch.arange(s_new, device=k.device)[None, :]        # (b, s_new)
    page = torch.gather(_table(p, b, k.device).long().expand(b, -1), 1, rows // p.page_size)
    slot = rows % p.page_size
    k_cache[page, slot] = k
    v_cache[page, slot] = v


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, p: _Plan) -> Tuple[Tensor, Tensor]:
    if p.backend == "triton":
        from .backends.triton.decode import forward_kvcache
        return forward_kvcache(q, k_cache, v_cache, p.table, p.seqlens, p.leftpad, p.s_new, p.max_seqlen_k, p.scale,
                               p.left, p.right, p.softcap, p.alibi, p.num_sink, p.num_splits, p.k_descale,
                               p.v_descale)
    return _attend_gathered(q, k_cache, v_cache, p)


def gather_pages(k_cache: Tensor, v_cache: Tensor, table: Tensor, start: Tensor, length: Tensor):
    """Sequence b's cache rows start[b] … start[b] + length[b] − 1, read through its page table row, packed
    one sequence after another: k, v (sum(length), nheads_k, headdim) and cu_seqlens (b + 1,) int32.
    k_cache, v_cache: (pages, page_size, nheads_k, headdim); table (b, pages per sequence)."""
    b, page_size = table.shape[0], k_cache.shape[1]
    seq = torch.repeat_interleave(torch.arange(b, device=table.device), length.long())       # (total,)
    cu = torch.zeros(b + 1, dtype=torch.int32, device=table.device)
    cu[1:] = torch.cumsum(length, 0)
    row = start.long()[seq] + torch.arange(seq.numel(), device=table.device) - cu[:-1].long()[seq]
    page = table.long()[seq, row // page_size]
    slot = row % page_size
    return k_cache[page, slot], v_cache[page, slot], cu


def _attend_gathered(q, k_cache, v_cache, p: _Plan) -> Tuple[Tensor, Tensor]:
    """The portable path: gather each sequence's keys into a packed batch, run the varlen forward. An FP8
    cache is dequantized (x8 · descale of the key's sequence and head) and attended in float32."""
    b, sq, h, d = q.shape
    leftpad = p.leftpad if p.leftpad is not None else torch.zeros_like(p.seqlens)
    k_len = p.seqlens + p.s_new - leftpad
    lens = k_len.tolist()
    k, v, cu_k = gather_pages(k_cache, v_cache, _table(p, b, q.device), leftpad, k_len)   # (total_k, hk, d)
    out_dtype = q.dtype
    if p.k_descale is not None:
        rows = k_len.long()                                                                # descales per key row
        k = k.float() * torch.repeat_interleave(p.k_descale, rows, dim=0, output_size=k.shape[0])[:, :, None]
        v = v.float() * torch.repeat_interleave(p.v_descale, rows, dim=0, output_size=v.shape[0])[:, :, None]
        q = q.float()
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    out, lse = ops.fwd(q.reshape(b * sq, h, d), k, v, p.scale, p.left, p.right, p.softcap, p.alibi, cu_q, cu_k, sq,
                       max(lens, default=0), p.num_sink, 0.0, None, None, None, None, None, choose_backend(q))
    return out.view(b, sq, h, d).to(out_dtype), lse.view(h, b, sq).transpose(0, 1)


# ----------------------------------------------------------------------------------------------
# caches


class PagedKVCache:
    """A pool of fixed-size pages shared by sequences that come and go, for every layer of a model.

    k[layer], v[layer]: (num_pages, page_size, nheads_k, headdim). A decoding step::

        block_table, cache_seqlens = cache.reserve(seq_ids, n)   # pages for n more tokens each
        for layer in ...:                                         # writes the new k, v, attends
            out = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, cache_seqlens=cache_seqlens,
                                          block_table=block_table, causal=True)
        cache.commit(seq_ids, n)                                  # the n tokens now count as cached

    `free(seq_id)` returns a finished sequence's pages to the pool.
    """

    def __init__(self, num_pages: int, page_size: int, nheads_k: int, headdim: int, num_layers: int = 1,
                 dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        for name, x in (("num_pages", num_pages), ("page_size", page_size), ("nheads_k", nheads_k),
                        ("headdim", headdim), ("num_layers", num_layers)):
            if not isinstance(x, numbers.Integral) or x < 1:
                raise ValueError(f"{name} must be an int >= 1, got {x!r}")
        shape = (num_pages, page_size, nheads_k, headdim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size = page_size
        self._free: List[int] = list(range(num_pages - 1, -1, -1))   # pop() hands out page 0 first
        self._pages: Dict[int, List[int]] = {}
        self._lengths: Dict[int, int] = {}
        self._next_id = 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def add_sequence(self) -> int:
        """A new, empty sequence; returns its id."""
        sid, self._next_id = self._next_id, self._next_id + 1
        self._pages[sid], self._lengths[sid] = [], 0
        return sid

    def length(self, seq_id: int) -> int:
        return self._lengths[self._known(seq_id)]

    def _known(self, seq_id: int) -> int:
        if seq_id not in self._pages:
            raise KeyError(f"sequence {seq_id!r} is not in this cache (add_sequence() creates one; free() removes it)")
        return seq_id

    def reserve(self, seq_ids: Sequence[int], num_new: int) -> Tuple[Tensor, Tensor]:
        """Make room for num_new more tokens in each sequence; returns (block_table, cache_seqlens) for
        flash_attn_with_kvcache: (batch, max_pages) and (batch,) int32 on the cache's device. All or nothing:
        if the pool is too small no page is taken."""
        ids = [self._known(s) for s in seq_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"seq_ids {list(seq_ids)} names a sequence twice")
        need = [max(0, -(-(self._lengths[s] + num_new) // self.page_size) - len(self._pages[s])) for s in ids]
        if sum(need) > len(self._free):
            raise RuntimeError(f"the KV cache needs {sum(need)} more pages but has {len(self._free)} free; free "
                               "finished sequences (free(seq_id)) or create the cache with more pages")
        for s, n in zip(ids, need):
            self._pages[s].extend(self._free.pop() for _ in range(n))
        width = max(1, max(len(self._pages[s]) for s in ids))
        table = [self._pages[s] + [0] * (width - len(self._pages[s])) for s in ids]   # padding: never read
        device = self.k[0].device
        return (torch.tensor(table, dtype=torch.int32, device=device),
                torch.tensor([self._lengths[s] for s in ids], dtype=torch.int32, device=device))

    def commit(self, seq_ids: Sequence[int], num_new: int) -> None:
        """Count num_new appended tokens as cached (after the layers have written them)."""
        for s in seq_ids:
            s = self._known(s)
            if self._lengths[s] + num_new > len(self._pages[s]) * self.page_size:
                raise ValueError(f"sequence {s} has room for {len(self._pages[s]) * self.page_size} tokens, not "
                                 f"{self._lengths[s] + num_new}: call reserve() before writing")
            self._lengths[s] += num_new

    def free(self, seq_id: int) -> None:
        """Return a sequence's pages to the pool."""
        self._free.extend(reversed(self._pages.pop(self._known(seq_id))))
        del self._lengths[seq_id]


class StreamingKVCache:
    """StreamingLLM's cache: the first `num_sink` tokens and the most recent `window` tokens of each sequence,
    in fixed memory, for generation of any length.

    Attention through it equals attention over the whole history with ``causal=True,
    window_size=(window - 1, 0), num_sink_tokens=num_sink``: query t sees tokens 0 … num_sink − 1 and
    t − window + 1 … t. Keys keep the positions they were given (rotate q and k yourself at the true
    positions `position()` reports, e.g. with flashattn.rotary.apply_rotary_emb). Each sequence's buffer
    holds num_sink + window − 1 + max_new rows; when a step would overflow it, the last window − 1 tokens
    are moved down behind the sinks (one copy of window rows every max_new tokens). A step::

        cache_seqlens = cache.prepare(n)                          # room for n <= max_new new tokens
        for layer in ...:
            out = cache.attend(layer, q, k, v, cache_seqlens)     # flash_attn_with_kvcache with the window
        cache.commit(n)
    """

    def __init__(self, batch: int, num_sink: int, window: int, nheads_k: int, headdim: int, num_layers: int = 1,
                 max_new: Optional[int] = None, dtype: torch.dtype = torch.bfloat16, device=None) -> None:
        max_new = window if max_new is None else max_new
        for name, x, lo in (("batch", batch, 1), ("num_sink", num_sink, 0), ("window", window, 1),
                            ("max_new", max_new, 1), ("num_layers", num_layers, 1)):
            if not isinstance(x, numbers.Integral) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")
        self.num_sink, self.window, self.max_new = num_sink, window, max_new
        self.capacity = num_sink + window - 1 + max_new
        shape = (batch, self.capacity, nheads_k, headdim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._length = [0] * batch    # rows in use
        self._dropped = [0] * batch   # tokens evicted so far (rows past the sinks sit at position row + dropped)

    def position(self) -> Tensor:
        """(batch,) int64: the position of each sequence's next token (for rotary tables)."""
        return torch.tensor([n + d for n, d in zip(self._length, self._dropped)], device=self.k[0].device)

    def prepare(self, num_new: int) -> Tensor:
        """Make room for num_new tokens per sequence (evicting old ones); returns cache_seqlens (batch,) int32."""
        if not 1 <= num_new <= self.max_new:
            raise ValueError(f"num_new must be in [1, max_new={self.max_new}], got {num_new}; feed longer prompts in "
                             "chunks or create the cache with a larger max_new")
        keep = self.window - 1   # the keys the next queries may still see, besides the sinks
        for b, n in enumerate(self._length):
            if n + num_new > self.capacity:
                src = max(self.num_sink, n - keep)
                for buf in self.k + self.v:
                    buf[b, self.num_sink:self.num_sink + n - src] = buf[b, src:n].clone()
                self._dropped[b] += src - self.num_sink
                self._length[b] = self.num_sink + n - src
        return torch.tensor(self._length, dtype=torch.int32, device=self.k[0].device)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor, **kwargs) -> Tensor:
        """flash_attn_with_kvcache over this layer's buffers with the sink + window mask; q, k, v as there."""
        return flash_attn_with_kvcache(q, self.k[layer], self.v[layer], k, v, cache_seqlens=cache_seqlens, causal=True,
                                       window_size=(self.window - 1, 0), num_sink_tokens=self.num_sink, **kwargs)

    def commit(self, num_new: int) -> None:
        self._length = [n + num_new for n in self._length]
