"""Launchers for the Triton kernels: forward(...) -> (out, lse) and backward(...) -> (dq, dk, dv).

Tile shapes, warps and pipeline stages are autotuned per (GPU, head dim, dtype, mask kind, GQA group,
seqlen bucket) and the winners are cached on disk by Triton (`cache_results=True`, under
TRITON_CACHE_DIR, default ~/.triton/cache), so a second process does not re-tune.
FLASHATTN_AUTOTUNE=0 (and the interpreter, TRITON_INTERPRET=1) use one known-good config instead.
"""
from __future__ import annotations

import functools
import os
import zlib

import torch
import triton

from . import kernels as K

_SUPPORTED = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled() -> bool:
    return not _interpreting() and os.environ.get("FLASHATTN_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _gpu_key(device_index: int) -> int:
    """A stable small int naming the GPU model, part of the autotuning key (H100 and H200 tune apart)."""
    if _interpreting() or not torch.cuda.is_available():
        return 0
    p = torch.cuda.get_device_properties(device_index)
    return zlib.crc32(f"{p.name}/{p.multi_processor_count}".encode()) % (2**30) + 2


# ------------------------------------------------------------------------------------------------
# configurations: data, pruned by a small keep() per kernel

_KEY = ["seq_bucket", "gpu_key", "HEAD_DIM", "GROUP", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI"]


def _smem_ok(bm, bn, bd, stages) -> bool:
    # q tile + pipelined k and v tiles, 2 bytes each; leave headroom under Hopper's 227 KiB.
    return 2 * (bm * bd + stages * 2 * bn * bd) <= 200 * 1024


def _keep_fwd(configs, named_args, **kwargs):
    bd = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"]
    kept = [c for c in configs
            if _smem_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd, c.num_stages)
            and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4 and bd >= 128)   # spills the accumulator
            and not (bd >= 256 and c.kwargs["BLOCK_N"] > 64)]
    return kept or configs[:1]


def _keep_bwd(configs, named_args, **kwargs):
    bd = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"]
    kept = [c for c in configs
            if _smem_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd, c.num_stages)
            and not (bd >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return kept or configs[:1]


def _cfg(bm, bn, w, s):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)


# Small on purpose: each config costs a compile (~1.5 s) per (head dim, mask kind, dtype). The lists hold
# the winners of the H200 sweep in benchmarks/NOTES.md plus close neighbours.
FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4),
               _cfg(64, 32, 4, 3), _cfg(64, 32, 8, 2)]
DKDV_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 128, 8, 2),
                _cfg(32, 64, 4, 2)]
DQ_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2),
              _cfg(64, 32, 4, 2)]


def _default(kernel: str, block_d: int):
    """One known-good config per kernel (FLASHATTN_AUTOTUNE=0): the H200 sweep's winners; small
    tiles under the interpreter so that tiny test shapes still cross block boundaries."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if block_d <= 64:
        table = {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3)}
    elif block_d <= 128:
        table = {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 4, 3), "dq": (128, 32, 4, 3)}
    else:   # head dims up to 256: smaller tiles keep q, k, v and the accumulator within shared memory/registers
        table = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
    bm, bn, w, s = table[kernel]
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)


_tuned = {
    "fwd": triton.autotune(FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _keep_fwd},
                           cache_results=True)(K._attn_fwd),
    "dkdv": triton.autotune(DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _keep_bwd},
                            cache_results=True)(K._attn_bwd_dkdv),
    "dq": triton.autotune(DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _keep_bwd},
                          cache_results=True)(K._attn_bwd_dq),
}
_plain = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}


# kernel name -> config dict: pins a config (benchmark sweeps and experiments), bypassing autotuning
pinned_configs: dict = {}


def _launch(kernel: str, grid_rows: int, grid_cols: int, args, meta):
    """Run `kernel` with autotuning, or with the default config when autotuning is off."""
    block_d = meta["BLOCK_D"]
    if kernel not in pinned_configs and _autotune_enabled():
        fn = _tuned[kernel]
        grid = lambda m: (triton.cdiv(grid_rows, m["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]), grid_cols)
        fn[grid](*args, **meta)
    else:
        cfg = pinned_configs.get(kernel) or _default(kernel, block_d)
        block = cfg["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]
        _plain[kernel][(triton.cdiv(grid_rows, block), grid_cols)](*args, **meta, **cfg)


def _check(q):
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"the Triton backend computes in float16 or bfloat16, got {q.dtype}; "
                        "unset FLASHATTN_BACKEND to run float32 on the PyTorch path, or convert the inputs")


def _common_meta(q, k, window_left, window_right, softcap, alibi_slopes):
    d = q.shape[-1]
    return dict(GROUP=q.shape[2] // k.shape[2], HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap != 0.0,
                HAS_ALIBI=alibi_slopes is not None)


def _alibi_args(q, alibi_slopes):
    if alibi_slopes is None:
        return q, 0   # any pointer: never read
    a = alibi_slopes.contiguous()
    return a, (a.stride(0) if a.dim() == 2 else 0)


def _tail(q, k, window_left, window_right, softmax_scale, softcap):
    return (max(window_left, 0), max(window_right, 0), float(softmax_scale), float(softcap) if softcap else 1.0,
            triton.next_power_of_2(max(q.shape[1], k.shape[1])), _gpu_key(q.device.index or 0))


def forward(q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None):
    """q: (b, sq, h, d); k, v: (b, sk, hk, d) fp16/bf16 -> out (b, sq, h, d), lse (b, h, sq) float32."""
    _check(q)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out = torch.empty((b, sq, h, d), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    left, right, scale, cap, bucket, gpu = _tail(q, k, window_left, window_right, softmax_scale, softcap)
    args = (q, k, v, out, lse, alibi,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), stride_ab,
            h, sq, sk, left, right, scale, cap, bucket, gpu)
    _launch("fwd", sq, b * h, args, _common_meta(q, k, window_left, window_right, softcap, alibi_slopes))
    return out, lse


def backward(dout, q, k, v, out, lse, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             alibi_slopes=None):
    """Gradients dq, dk, dv (dtypes and shapes of q, k, v); deterministic: no atomics anywhere."""
    _check(q)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    meta = _common_meta(q, k, window_left, window_right, softcap, alibi_slopes)
    delta = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    pre_block = 16 if _interpreting() else 64
    K._attn_bwd_preprocess[(triton.cdiv(sq, pre_block), b * h)](
        out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
        dout.stride(2), h, sq, HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    lse = lse.contiguous()
    dq = torch.empty((b, sq, h, d), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, sk, hk, d), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, sk, hk, d), device=q.device, dtype=v.dtype)
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    left, right, scale, cap, bucket, gpu = _tail(q, k, window_left, window_right, softmax_scale, softcap)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _launch("dkdv", sk, b * hk,
            (q, k, v, dout, lse, delta, dk, dv, alibi, *strides,
             dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), stride_ab,
             hk, sq, sk, left, right, scale, cap, bucket, gpu), meta)
    _launch("dq", sq, b * h,
            (q, k, v, dout, lse, delta, dq, alibi, *strides,
             dq.stride(0), dq.stride(1), dq.stride(2), stride_ab,
             h, sq, sk, left, right, scale, cap, bucket, gpu), meta)
    return dq, dk, dv
