"""The public API: flash_attn-compatible functions and an SDPA-style function.

Argument checks live here and nowhere else; `choose_backend` is the one dispatch point.
"""
from __future__ import annotations

import functools
import math
import numbers
import os

import torch

from . import dropout, masks, ops
from .blocksparse import BlockMask
from .reference import attention_ref

MAX_HEADDIM = 256
MIN_HEADDIM = 8
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_DTYPE = torch.float8_e4m3fn
_FP8_OUT_DTYPES = (torch.bfloat16, torch.float16)
FP8_MIN_CAPABILITY = (8, 9)   # FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) on


# ----------------------------------------------------------------------------------------------
# dispatch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the Triton kernels import (triton installed, the launcher module complete)."""
    try:
        module = ops.backend_module("triton")
    except Exception:   # no triton, or a triton too old for the kernels
        return False
    return callable(getattr(module, "forward", None)) and callable(getattr(module, "backward", None))


def _capability(device: torch.device):
    # get_device_properties, not get_device_capability: torch.compile folds the former into a constant
    p = torch.cuda.get_device_properties(device)
    return p.major, p.minor


def _fp8_capable(device: torch.device) -> bool:
    return _capability(device) >= FP8_MIN_CAPABILITY


def choose_backend(q: torch.Tensor) -> str:
    """The one dispatch point.

    FLASHATTN_BACKEND=reference|torch|triton forces a backend. Otherwise: CUDA tensors in fp16/bf16
    go to the Triton kernels, and so do float8_e4m3fn ones on GPUs with FP8 tensor cores (sm_89+);
    everything else (CPU, other devices, float32/float64, FP8 on older GPUs) to the PyTorch tiled
    path, which computes the same algorithm (for FP8: on the dequantized inputs).
    """
    forced = os.environ.get("FLASHATTN_BACKEND", "").strip().lower()
    if forced:
        if forced not in ops.BACKENDS:
            raise ValueError(f"FLASHATTN_BACKEND={forced!r} is not a backend; expected one of {ops.BACKENDS} "
                             "(or unset it to let flashattn choose)")
        if forced == "triton" and not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("FLASHATTN_BACKEND=triton needs CUDA tensors (or TRITON_INTERPRET=1 to run the "
                             f"kernels on the CPU), got tensors on {q.device}")
        if forced == "triton" and q.dtype == FP8_DTYPE and q.is_cuda and not _fp8_capable(q.device):
            major, minor = _capability(q.device)
            raise ValueError(f"FLASHATTN_BACKEND=triton with float8_e4m3fn inputs needs FP8 tensor cores (sm_89 or "
                             f"newer: Ada, Hopper), this GPU is sm_{major}{minor}; use FLASHATTN_BACKEND=torch (the "
                             "PyTorch path computes FP8 attention on any device) or bf16 inputs")
        return forced
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and triton_available():
        return "triton"
    if q.is_cuda and q.dtype == FP8_DTYPE and triton_available() and _fp8_capable(q.device):
        return "triton"
    return "torch"


# ----------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(name: str, x, layout: str, ndim: int = 4, allow_fp8: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        hint = ""
        if ndim == 4 and x.dim() == 3 and layout.startswith("(batch, seqlen,"):   # the flash_attn layout
            hint = ("; add the missing batch dimension with .unsqueeze(0), or use flash_attn_varlen_func for "
                    "packed (total_tokens, nheads, headdim) batches")
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}{hint}")
    if x.dtype == FP8_DTYPE and allow_fp8:
        return
    if x.dtype == FP8_DTYPE:
        raise TypeError(f"{name} is float8_e4m3fn: FP8 attention is supported by flash_attn_func (dense batches, "
                        "with q_descale/k_descale/v_descale); here convert the inputs to bfloat16 "
                        "(flashattn.fp8.dequantize(x, descale).to(torch.bfloat16))")
    if x.dtype not in _FLOAT_DTYPES:
        fp8 = " (FP8 attention takes float8_e4m3fn: quantize with flashattn.fp8.quantize)" if x.is_floating_point() else ""
        raise TypeError(f"{name} has dtype {x.dtype}; attention needs a floating-point tensor "
                        "(float16, bfloat16, float32 or float64): convert it with .to(torch.bfloat16) or similar"
                        + fp8)


def _check_qkv(q, k, v, layout: str = "(batch, seqlen, nheads, headdim)", allow_fp8: bool = False) -> None:
    """q: (b, sq, h, d); k, v: (b, sk, hk, d), flash_attn layout."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, layout, allow_fp8=allow_fp8)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                        "convert them to the same dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}; "
                         "move them with .to(device)")
    b, sq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch sizes differ: q has {b}, k has {k.shape[0]}, v has {v.shape[0]}; "
                         "they must be equal")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same seqlen, got k {k.shape[1]} and v {v.shape[1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[2]} and v {v.shape[2]}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"headdim differs: q has {d}, k has {k.shape[3]}, v has {v.shape[3]}; "
                         "q, k and v must share one head dimension")
    if not (MIN_HEADDIM <= d <= MAX_HEADDIM):
        raise ValueError(f"headdim must be between {MIN_HEADDIM} and {MAX_HEADDIM}, got {d}; "
                         "split larger heads or pad smaller ones with zeros")
    hk = k.shape[2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"nheads of q ({h}) must be a multiple of nheads of k/v ({hk}) "
                         "(multi-query / grouped-query attention); choose head counts that divide")
    for name, x in (("q", q), ("k", k), ("v", v)):
        # FP8 v may instead have its seqlen axis contiguous: the layout the FP8 kernel reads (no copy then)
        keys_contiguous = name == "v" and x.dtype == FP8_DTYPE and x.stride(1) == 1
        if x.numel() > 0 and x.stride(-1) != 1 and not keys_contiguous:
            raise ValueError(f"the last dimension (headdim) of {name} must be contiguous (stride 1), got "
                             f"{name}.stride() = {x.stride()}; call {name}.contiguous()")


def _check_options(batch, nheads, headdim, device, dropout_p, softmax_scale, window_size, softcap,
                   alibi_slopes) -> float:
    """Validates the options; returns the softmax scale to use."""
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if softmax_scale is None:
        softmax_scale = masks.default_scale(headdim)
    elif not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")
    elif not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be a finite number, got {softmax_scale!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)
            or any(w < -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1 (-1 = unlimited), "
                         f"got {window_size!r}")
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool) or not (0 <= softcap < math.inf):
        raise ValueError(f"softcap must be a finite number >= 0 (0 disables it), got {softcap!r}")
    if alibi_slopes is not None:
        b, h = batch, nheads
        if not isinstance(alibi_slopes, torch.Tensor):
            raise TypeError(f"alibi_slopes must be a tensor of shape ({h},) or ({b}, {h}), "
                            f"got {type(alibi_slopes).__name__}")
        if tuple(alibi_slopes.shape) not in ((h,), (b, h)):
            raise ValueError(f"alibi_slopes must have shape (nheads,)=({h},) or (batch, nheads)=({b}, {h}), "
                             f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != device:
            raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}; move it")
    return float(softmax_scale)


def _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k) -> int:
    """Validates a packed batch's sequence boundaries; returns the number of sequences."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be an int32 tensor of shape (batch + 1,), got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must have dtype torch.int32, got {cu.dtype}; convert it with .to(torch.int32)")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1, got {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it with .to(q.device)")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries and cu_seqlens_k {cu_seqlens_k.numel()}; "
                         "both must be batch + 1 long")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, numbers.Integral) or isinstance(m, bool) or m < 0:
            raise ValueError(f"{name} must be an int >= 0, got {m!r}")
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return cu_seqlens_q.numel() - 1   # values are not readable while tracing or capturing
    # One small device-to-host read: wrong boundaries would silently give wrong rows.
    for name, cu, total, max_name, m in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
                                         ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)):
        vals = cu.tolist()
        lens = [b - a for a, b in zip(vals, vals[1:])]
        if vals[0] < 0 or min(lens) < 0:
            raise ValueError(f"{name} must start at >= 0 and never decrease (cumulative sequence lengths), got {vals}")
        if vals[-1] > total:
            raise ValueError(f"{name} ends at {vals[-1]} but the packed tensor has only {total} rows")
        if max(lens) > m:
            raise ValueError(f"{max_name}={m} is smaller than the longest sequence ({max(lens)}); pass at least "
                             f"{max(lens)}")
    return cu_seqlens_q.numel() - 1


def _global_flags(global_tokens, causal, length: int, device):
    """int8 flags (length,) from the positions of global tokens, checked; None when there are none."""
    if global_tokens is None:
        return None
    if causal:
        raise ValueError("global_tokens are bidirectional (Longformer/BigBird: they see and are seen by every "
                         "position), which causal=True forbids; for keys every causal query sees, use num_sink_tokens")
    pos = torch.as_tensor(global_tokens)
    if pos.dtype in (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64) or pos.dim() != 1:
        raise ValueError(f"global_tokens must be a 1-D sequence of integer positions, got {global_tokens!r}")
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= length):
        raise ValueError(f"global_tokens must be positions in [0, {length}) (the longest sequence), got "
                         f"{pos.tolist()}")
    return masks.global_flags(pos.to(device), length, device)


def _block_mask_tensors(block_mask, q, k, varlen: bool):
    """(layout, partial_id, partial) of a checked BlockMask, or three Nones."""
    if block_mask is None:
        return None, None, None
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask must be a flashattn.BlockMask (BlockMask.from_mask_mod or .from_layout), "
                        f"got {type(block_mask).__name__}")
    if varlen:
        raise NotImplementedError("block_mask with a packed (varlen) batch is not supported yet; use the padded "
                                  "flash_attn_func, or express the sequence boundaries in mask_mod")
    block_mask.check_for(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    if block_mask.layout.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.layout.device} but q is on {q.device}; "
                         "use block_mask.to(q.device)")
    return block_mask.layout, block_mask.partial_id, block_mask.partial


def _fp8_descale(q, k, v, descales, out_dtype, dropout_p, global_tokens, block_mask):
    """Checks FP8 inputs and their options; returns the op's descale tensor (b, hk, 3) float32 (q, k, v
    factors, ones where None was given) and the output dtype, or (None, None) for other inputs."""
    names = ("q_descale", "k_descale", "v_descale")
    if q.dtype != FP8_DTYPE:
        for name, d in zip(names, descales):
            if d is not None:
                raise ValueError(f"{name} is given but q, k, v are {q.dtype}: descale factors apply to float8_e4m3fn "
                                 f"inputs only; drop {name}, or quantize the inputs with flashattn.fp8.quantize")
        if out_dtype is not None and out_dtype != q.dtype:
            raise ValueError(f"out_dtype={out_dtype} applies to float8_e4m3fn inputs; with {q.dtype} inputs the "
                             "output has their dtype: drop out_dtype and cast the result")
        return None, None
    if out_dtype is None:
        out_dtype = torch.bfloat16
    if out_dtype not in _FP8_OUT_DTYPES:
        raise ValueError(f"out_dtype must be torch.bfloat16 or torch.float16 for float8 inputs, got {out_dtype!r}")
    for what, bad in (("dropout_p > 0", dropout_p > 0.0), ("global_tokens", global_tokens is not None),
                      ("block_mask", block_mask is not None)):
        if bad:
            raise NotImplementedError(f"{what} is not supported with float8_e4m3fn inputs yet; run these in "
                                      "bfloat16 (flashattn.fp8.dequantize(x, descale).to(torch.bfloat16))")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("float8_e4m3fn q, k or v requires grad: autograd would round its gradient to float8. "
                         "For FP8 training call flashattn.fp8.attention(q, k, v, ...) on the bf16 tensors (it "
                         "quantizes inside and returns bf16 gradients), or pass detached FP8 inputs")
    b, hk = k.shape[0], k.shape[2]
    factors = [_check_descale(name, d, b, hk, q.device) for name, d in zip(names, descales)]
    return torch.stack(factors, dim=-1).contiguous(), out_dtype


def _check_descale(name: str, d, batch: int, nheads_k: int, device) -> torch.Tensor:
    """A descale factor as FlashAttention-3 takes it: None (= 1), or a float32 tensor of one element (per
    tensor) or of shape (batch, nheads_k) (per batch entry and kv head). Returns a (batch, nheads_k) view."""
    if d is None:
        d = torch.ones(1, device=device)
    elif not isinstance(d, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor of shape (1,) or (batch, nheads_k)=({batch}, {nheads_k}), "
                        f"got {type(d).__name__}; wrap a number as torch.tensor([x], device=q.device)")
    elif d.dtype != torch.float32:
        raise TypeError(f"{name} must have dtype torch.float32, got {d.dtype}; convert it with .float()")
    elif d.numel() != 1 and tuple(d.shape) != (batch, nheads_k):
        hint = "; q's is per kv head too" if name == "q_descale" else ""
        raise ValueError(f"{name} must have shape (1,) (per tensor) or (batch, nheads_k)=({batch}, {nheads_k}) (per "
                         f"batch entry and kv head{hint}), got {tuple(d.shape)}")
    elif d.device != device:
        raise ValueError(f"{name} is on {d.device} but q is on {device}; move it with .to(q.device)")
    return d.reshape(()).expand(batch, nheads_k) if d.numel() == 1 else d


def _op_args(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, num_sink_tokens=0,
             global_tokens=None, block_mask=None, descales=(None, None, None), out_dtype=None) -> tuple:
    """Checked inputs -> the arguments of ops.fwd. Dense (b, s, h, d) inputs, or packed (total, h, d) ones
    with cu_seqlens; FP8 inputs (dense only) with descales = (q_descale, k_descale, v_descale)."""
    if cu_seqlens_q is None:
        _check_qkv(q, k, v, allow_fp8=True)
        batch = q.shape[0]
        longest = max(q.shape[1], k.shape[1])
    else:
        layout = "(total_tokens, nheads, headdim)"
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_tensor(name, x, layout, ndim=3)
        _check_qkv(q[None], k[None], v[None])
        batch = _check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
        longest = max(int(max_seqlen_q), int(max_seqlen_k))
    scale = _check_options(batch, q.shape[-2], q.shape[-1], q.device, dropout_p, softmax_scale, window_size,
                           softcap, alibi_slopes)
    if not isinstance(num_sink_tokens, numbers.Integral) or isinstance(num_sink_tokens, bool) or num_sink_tokens < 0:
        raise ValueError(f"num_sink_tokens must be an int >= 0, got {num_sink_tokens!r}")
    left, right = masks.window_bounds(bool(causal), window_size)
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.float()
    # sinks only widen a window's left limit: without one every key is visible already
    num_sink = int(num_sink_tokens) if left >= 0 else 0
    flags = _global_flags(global_tokens, bool(causal), longest, q.device)
    blocks = _block_mask_tensors(block_mask, q, k, cu_seqlens_q is not None)
    descale, out_dtype = _fp8_descale(q, k, v, descales, out_dtype, dropout_p, global_tokens, block_mask)
    seed = dropout.draw_seed() if dropout_p > 0.0 else None
    return (q, k, v, scale, left, right, float(softcap), alibi_slopes, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
            int(max_seqlen_k), num_sink, float(dropout_p), seed, flags, *blocks, choose_backend(q), descale, out_dtype)


def _attention(*args, **kwargs):
    """Checked inputs -> (out, lse, dropout seed); the arguments of _op_args."""
    op_args = _op_args(*args, **kwargs)
    out, lse = ops.attention(*op_args)
    return out, lse, op_args[14]


def _result(out, lse, return_attn_probs, probs=None):
    # flash_attn returns (out, softmax_lse, S_dmask); probabilities are materialized only for dropout tests.
    return (out, lse, probs) if return_attn_probs else out


# ----------------------------------------------------------------------------------------------
# flash_attn-compatible API


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, num_sink_tokens=0,
                    global_tokens=None, block_mask=None, q_descale=None, k_descale=None, v_descale=None,
                    out_dtype=None):
    """Exact attention softmax(q kᵀ · softmax_scale) v, computed tile by tile.

    Arguments:
        q: (batch, seqlen_q, nheads, headdim)
        k: (batch, seqlen_k, nheads_k, headdim)
        v: (batch, seqlen_k, nheads_k, headdim)
            nheads must be a multiple of nheads_k (MQA/GQA: query head i uses key/value head
            i // (nheads // nheads_k)). headdim between 8 and 256. Only the last dim need be contiguous.
        dropout_p: float in [0, 1). Dropout on the attention probabilities, from a counter-based hash
            of (seed, batch·head, query, key) (flashattn.dropout); the seed is drawn from torch's
            default generator, so torch.manual_seed makes it reproducible; the backward pass
            regenerates the same mask. Pass 0.0 at evaluation time, as with flash_attn.
        softmax_scale: float. Default 1 / sqrt(headdim).
        causal: bool. Causal mask aligned to the bottom-right corner of the score matrix, as in
            flash_attn >= 2.1. With seqlen_q = 2 and seqlen_k = 5 (1 = keep, 0 = masked):
                1 1 1 1 0
                1 1 1 1 1
            With seqlen_q = 5 and seqlen_k = 2:
                0 0
                0 0
                0 0
                1 0
                1 1
            Rows that see no key output 0 (and lse = -inf).
        window_size: (left, right). If not (-1, -1), sliding-window (local) attention: query i sees
            keys j with i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right.
            -1 = unlimited on that side. With causal=True the right side is 0.
        softcap: float. > 0 applies softcap · tanh(score / softcap) before the softmax.
        alibi_slopes: (nheads,) or (batch, nheads), fp32. Adds -slope · |i + seqlen_k - seqlen_q - j|.
        deterministic: bool. Accepted for compatibility; every backward here is deterministic.
        return_attn_probs: bool. If True, also return the log-sum-exp, and, with dropout_p > 0, the
            (batch, nheads, seqlen_q, seqlen_k) probabilities as they multiplied v (dropped ones 0, kept
            ones scaled by 1/(1 - dropout_p)), materialized for testing; None without dropout.
        num_sink_tokens: int. Attention sinks (StreamingLLM): the first num_sink_tokens keys are
            exempt from the window's left limit, so with window_size=(w, 0) and causal=True each
            query sees the sinks plus its last w + 1 keys. No effect without a left limit.
        global_tokens: 1-D integer positions (shared by the batch) of global tokens (Longformer/
            BigBird): they see every key and every query sees them, on top of the window. Not with
            causal=True. Today they switch block skipping off (the cost of full attention).
        block_mask: a flashattn.BlockMask (from a FlexAttention-style mask_mod(b, h, q_idx, kv_idx) or
            a boolean block layout), ANDed with the other masks; absent tiles are skipped (on the GPU
            the kernels' tiles are the mask's block_size). Not with varlen batches.
        q_descale, k_descale, v_descale: FP8 only (q, k, v in torch.float8_e4m3fn, e.g. from
            flashattn.fp8.quantize_qkv): float32 tensors of shape (1,) or (batch, nheads_k) (q's too:
            one factor per kv-head group), None = 1; the inputs stand for x_fp8 · descale. Computed
            with fp32 accumulation; P is quantized to e4m3 (times 256) for the P·V product on the
            GPU; the PyTorch path computes on the dequantized inputs. No dropout, global tokens or
            block masks with FP8; no autograd through FP8 tensors (see flashattn.fp8.attention).
        out_dtype: FP8 only: torch.bfloat16 (default) or torch.float16.
    Return:
        out: (batch, seqlen_q, nheads, headdim), dtype of q (out_dtype for FP8 inputs).
        softmax_lse [if return_attn_probs]: (batch, nheads, seqlen_q), float32, natural log of the
            softmax denominator of each row (scaled scores).
        S_dmask [if return_attn_probs]: the probabilities above, or None.
    """
    out, lse, seed = _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                num_sink_tokens=num_sink_tokens, global_tokens=global_tokens, block_mask=block_mask,
                                descales=(q_descale, k_descale, v_descale), out_dtype=out_dtype)
    probs = None
    if return_attn_probs and seed is not None:   # for testing: the (b, h, sq, sk) matrix that multiplied v
        with torch.no_grad():
            probs = attention_ref(q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, torch.float32,
                                  num_sink_tokens, dropout_p, int(seed), return_probs=True,
                                  global_tokens=global_tokens, block_mask=block_mask)[2]
    return _result(out, lse, return_attn_probs, probs)


def _check_packed(name: str, x, n: int, layout: str, ndim: int = 5):
    if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.shape[ndim - 3] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {layout}, got {shape}")


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              num_sink_tokens=0, global_tokens=None):
    """Self-attention with q, k, v packed in one tensor.

    qkv: (batch, seqlen, 3, nheads, headdim). Other arguments and the return as in flash_attn_func.
    The gradient flows back into qkv without a copy of the inputs.
    """
    _check_packed("qkv", qkv, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs, num_sink_tokens,
                           global_tokens)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             num_sink_tokens=0, global_tokens=None):
    """Attention with k and v packed in one tensor.

    q: (batch, seqlen_q, nheads, headdim); kv: (batch, seqlen_k, 2, nheads_k, headdim).
    Other arguments and the return as in flash_attn_func.
    """
    _check_packed("kv", kv, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, num_sink_tokens, global_tokens)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, num_sink_tokens=0,
                           global_tokens=None, block_mask=None):
    """Attention over a packed batch of sequences of different lengths (no padding).

    Arguments:
        q: (total_q, nheads, headdim), the queries of all sequences one after another.
        k, v: (total_k, nheads_k, headdim).
        cu_seqlens_q: (batch + 1,) int32, cumulative lengths: sequence i is rows
            cu_seqlens_q[i]:cu_seqlens_q[i+1] of q. Zero-length sequences are allowed.
        cu_seqlens_k: (batch + 1,) int32, the same for k and v.
        max_seqlen_q, max_seqlen_k: int, at least the longest sequence (sizes the launch grid).
        alibi_slopes: (nheads,) or (batch, nheads).
        block_table: (batch, max_pages_per_seq) int32 or None. With it, k and v are page pools
            (num_pages, page_size, nheads_k, headdim), any page_size >= 1, and sequence i's keys are the
            first cu_seqlens_k[i+1] - cu_seqlens_k[i] rows of its pages block_table[i, 0], [i, 1], ...
            They are gathered into a packed batch first (gradients flow back into the pools); for
            decoding, flash_attn_with_kvcache reads pages in place.
        The other arguments as in flash_attn_func; masks apply within each sequence (causal aligned
        bottom-right per sequence). The boundaries are checked, which reads cu_seqlens on the host once.
    Return:
        out: (total_q, nheads, headdim); rows past cu_seqlens_q[-1] are 0.
        softmax_lse [if return_attn_probs]: (nheads, total_q) float32; S_dmask: None.
    """
    if block_table is not None:
        k, v = _paged_to_packed(k, v, block_table, cu_seqlens_k, q)
    out, lse, _ = _attention(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num_sink_tokens, global_tokens,
                             block_mask)
    return _result(out, lse, return_attn_probs)


def _paged_to_packed(k_pages, v_pages, block_table, cu_seqlens_k, q):
    """Checked page pools and table -> packed (total_k, nheads_k, headdim) k, v, flash_attn's paged varlen."""
    from .kvcache import gather_pages
    for name, x in (("k", k_pages), ("v", v_pages)):
        _check_tensor(name, x, "(num_pages, page_size, nheads_k, headdim) with block_table")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"with block_table, k and v are page pools of one shape, got {tuple(k_pages.shape)} and "
                         f"{tuple(v_pages.shape)}")
    if (not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2
            or not isinstance(cu_seqlens_k, torch.Tensor) or block_table.shape[0] != cu_seqlens_k.numel() - 1):
        raise ValueError("block_table must be an int32 tensor of shape (batch, max_pages_per_seq) with batch = "
                         f"len(cu_seqlens_k) - 1, got {getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")
    if block_table.device != q.device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {q.device}; move it")
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    page_size, pages = k_pages.shape[1], k_pages.shape[0]
    if not torch.compiler.is_compiling():
        n, rows = lens.tolist(), block_table.tolist()
        for i, (length, row) in enumerate(zip(n, rows)):
            if length > len(row) * page_size:
                raise ValueError(f"sequence {i} has {length} keys but block_table gives it {len(row)} pages of "
                                 f"{page_size} rows")
            bad = [p for p in row[:-(-length // page_size)] if not 0 <= p < pages]
            if bad:
                raise ValueError(f"block_table[{i}] names page {bad[0]}, outside the {pages} pages of k and v")
    k, v, _ = gather_pages(k_pages, v_pages, block_table, torch.zeros_like(lens), lens)
    return k, v


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, num_sink_tokens=0):
    """Packed self-attention with q, k, v in one tensor qkv: (total, 3, nheads, headdim)."""
    _check_packed("qkv", qkv, 3, "(total_tokens, 3, nheads, headdim)", ndim=4)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, None, num_sink_tokens)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False,
                                    num_sink_tokens=0):
    """Packed attention with k and v in one tensor kv: (total_k, 2, nheads_k, headdim)."""
    _check_packed("kv", kv, 2, "(total_tokens, 2, nheads_k, headdim)", ndim=4)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, None, num_sink_tokens)


# ----------------------------------------------------------------------------------------------
# torch-style API


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention (same layout and arguments).

    query: (batch, nheads, seqlen_q, headdim); key, value: (batch, nheads_k, seqlen_k, headdim).
    nheads_k may differ from nheads only with enable_gqa=True, as in torch.
    attn_mask: must be None for now (NotImplementedError): an arbitrary dense mask would bring back
        the seqlen² memory this library avoids.
    is_causal: torch's causal mask is aligned to the top-left corner; it equals flashattn's
        bottom-right one when seqlen_q == seqlen_k. With seqlen_q != seqlen_k it raises
        NotImplementedError: use flash_attn_func(causal=True) for the bottom-right convention.
    Returns (batch, nheads, seqlen_q, headdim) in the dtype of query.
    """
    layout = "(batch, nheads, seqlen, headdim)"
    for name, x in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, x, layout)
    if attn_mask is not None:
        raise NotImplementedError("attn_mask is not supported: a dense mask would materialize seqlen² elements; "
                                  "use is_causal=True, or flash_attn_func with causal/window_size")
    if is_causal and query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"is_causal=True with seqlen_q={query.shape[2]} != seqlen_k={key.shape[2]}: torch aligns this mask "
            "top-left, flashattn bottom-right; call flash_attn_func(causal=True) if bottom-right is what you want")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has {query.shape[1]} heads but key has {key.shape[1]}; "
                         "pass enable_gqa=True for grouped-query attention")
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          dropout_p=dropout_p, softmax_scale=scale, causal=is_causal)
    return out.transpose(1, 2)
