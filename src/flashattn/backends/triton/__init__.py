"""Launchers for the Triton kernels: forward(...) -> (out, lse) and backward(...) -> (dq, dk, dv).

Tile shapes, warps and pipeline stages are autotuned per (GPU, head dim, dtype, mask kind, GQA group,
seqlen bucket) and the winners are cached on disk by flashattn (`tuning.py`: one JSON file per key,
written atomically, validated when read; default ~/.cache/flashattn/autotune), so a second process does
not re-tune. FLASHATTN_AUTOTUNE=0 (and the interpreter, TRITON_INTERPRET=1) use one known-good config
instead.
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import NamedTuple, Optional, Tuple

import torch
import triton

from ... import dropout
from . import kernels as K
from . import tuning

_SUPPORTED = (torch.float16, torch.bfloat16)
VARLEN_NATIVE = True   # forward/backward take packed batches (cu_seqlens) directly


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_enabled() -> bool:
    return not _interpreting() and os.environ.get("FLASHATTN_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index) if torch.cuda.is_available() else "cpu"


@functools.lru_cache(maxsize=None)
def _gpu_key(device_index: int) -> int:
    """A stable small int naming the GPU model, part of the autotuning key (H100 and H200 tune apart)."""
    if _interpreting() or not torch.cuda.is_available():
        return 0
    p = torch.cuda.get_device_properties(device_index)
    return zlib.crc32(f"{p.name}/{p.multi_processor_count}".encode()) % (2**30) + 2


# ------------------------------------------------------------------------------------------------
# configurations: data, pruned by a small keep() per kernel

_KEY = ["seq_bucket", "gpu_key", "HEAD_DIM", "GROUP", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI", "VARLEN", "HAS_SINK", "DROPOUT", "HAS_GLOBAL", "BLOCK_SPARSE"]


def _smem_ok(bm, bn, bd, stages) -> bool:
    # q tile + pipelined k and v tiles, 2 bytes each; leave headroom under Hopper's 227 KiB.
    return 2 * (bm * bd + stages * 2 * bn * bd) <= 200 * 1024


def _smem_bytes(kernel: str, bm: int, bn: int, bd: int, stages: int) -> int:
    """Shared memory of one program, roughly: resident tiles once, streamed tiles once per pipeline stage
    (fwd and dq keep the query-side tiles and stream K/V; dK/dV keeps K/V and streams q and dO)."""
    resident, streamed = {"fwd": (bm, bn), "dq": (2 * bm, bn), "dkdv": (2 * bn, bm)}[kernel]
    return 2 * bd * (resident + stages * 2 * streamed)


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


# Triton's autotuner only benchmarks; the results are kept by `tuning` (Triton's own disk cache does not
# survive a corrupt file: see tuning.py).
_CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}
_KEEP = {"fwd": _keep_fwd, "dkdv": _keep_bwd, "dq": _keep_bwd}
_plain = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}
_tuned = {name: triton.autotune(_CONFIGS[name], key=_KEY, prune_configs_by={"early_config_prune": _KEEP[name]})(fn)
          for name, fn in _plain.items()}


def _tuning_key(args, meta) -> dict:
    """What a tuned config is chosen per: _KEY's values, the dtype and the GPU model. args start with q and
    end with _tail(...) (seq_bucket, gpu_key)."""
    key = {name: meta[name] for name in _KEY if name in meta}
    key.update(seq_bucket=args[-2], dtype=str(args[0].dtype), gpu=_gpu_name(args[0].device.index or 0))
    return key


# kernel name -> config dict: pins a config (benchmark sweeps and experiments), bypassing autotuning
pinned_configs: dict = {}


def _launch(kernel: str, grid_rows: int, grid_cols: int, args, meta, block_mask=None):
    """Run `kernel` with autotuning, or with the default config when autotuning is off; a block mask
    fixes the tiles to its own block size."""
    block_d = meta["BLOCK_D"]
    if block_mask is not None:
        bq, bk = block_mask.block_size
        cfg = dict(_default(kernel, block_d), BLOCK_M=bq, BLOCK_N=bk)
        if not _interpreting():
            while cfg["num_stages"] > 1 and _smem_bytes(kernel, bq, bk, block_d, cfg["num_stages"]) > 200 * 1024:
                cfg["num_stages"] -= 1
            if bq * bk >= 128 * 64:
                cfg["num_warps"] = 8   # 4 warps would hold a 128-row accumulator in too few registers
        _plain[kernel][(triton.cdiv(grid_rows, bq if kernel != "dkdv" else bk), grid_cols)](*args, **meta, **cfg)
        return
    if kernel not in pinned_configs and _autotune_enabled():
        grid = lambda m: (triton.cdiv(grid_rows, m["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]), grid_cols)
        tuning.run_tuned(kernel, _tuned[kernel], _plain[kernel], grid, args, meta, _tuning_key(args, meta),
                         _KEEP[kernel](_CONFIGS[kernel], {}, **meta), K)
    else:
        cfg = pinned_configs.get(kernel) or _default(kernel, block_d)
        block = cfg["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]
        _plain[kernel][(triton.cdiv(grid_rows, block), grid_cols)](*args, **meta, **cfg)


def _check(q):
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"the Triton backend computes in float16 or bfloat16, got {q.dtype}; "
                        "unset FLASHATTN_BACKEND to run float32 on the PyTorch path, or convert the inputs")


class _Batch(NamedTuple):
    """What the kernels need to know about a batch, dense (b, s, h, d) or packed varlen (total, h, d)."""
    batch: int
    seqlen_q: int      # the longest sequence for varlen
    seqlen_k: int
    nheads: int
    nheads_k: int
    cu_q: Optional[torch.Tensor]
    cu_k: Optional[torch.Tensor]

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    def strides(self, x) -> Tuple[int, int, int]:
        """(batch, row, head) strides; a packed batch has no batch stride (rows start at cu_seqlens)."""
        return (0, x.stride(0), x.stride(1)) if self.varlen else (x.stride(0), x.stride(1), x.stride(2))

    def new_lse(self, like, total_q: int) -> torch.Tensor:
        """lse/Δ storage: (b, h, sq) dense, (h, total_q) packed (flash_attn's layouts)."""
        if self.varlen:   # rows past cu_seqlens[-1] belong to no sequence: -inf, as for rows that see nothing
            return torch.full((self.nheads, total_q), float("-inf"), device=like.device, dtype=torch.float32)
        return torch.empty((self.batch, self.nheads, self.seqlen_q), device=like.device, dtype=torch.float32)

    def new_like(self, x) -> torch.Tensor:
        """An output shaped like x; zeroed for packed batches, whose rows past cu_seqlens[-1] no program writes."""
        return (torch.zeros if self.varlen else torch.empty)(x.shape, device=x.device, dtype=x.dtype)

    def lse_strides(self, lse) -> Tuple[int, int]:
        return (0, lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1))


def _batch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> _Batch:
    if cu_seqlens_q is None:
        return _Batch(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], None, None)
    return _Batch(cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, q.shape[1], k.shape[1],
                  cu_seqlens_q, cu_seqlens_k)


def _common_meta(bt: _Batch, d, window_left, window_right, softcap, alibi_slopes, num_sink, dropout_p, global_flags,
                 block_mask):
    return dict(GROUP=bt.nheads // bt.nheads_k, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap != 0.0,
                HAS_ALIBI=alibi_slopes is not None, VARLEN=bt.varlen, HAS_SINK=num_sink > 0 and window_left >= 0,
                DROPOUT=dropout_p > 0.0, HAS_GLOBAL=global_flags is not None, BLOCK_SPARSE=block_mask is not None)


def _sparse_args(q, block_mask, lists: str):
    """(pointers, ints) of the block-mask lists a kernel walks: 'kv' (forward, dQ) or 'q' (dK/dV)."""
    if block_mask is None:
        return (q, q, q, q), (0, 0, 0, 0, 0, 0)
    kv_count, kv_index, q_count, q_index, partial_id, tiles = block_mask.kernel_lists()
    count, index = (kv_count, kv_index) if lists == "kv" else (q_count, q_index)
    nb, nh, nqb, nkb = partial_id.shape
    # broadcast (batch or head of size 1): stride 0
    strides = (nh * nqb * nkb if nb > 1 else 0, nqb * nkb if nh > 1 else 0,
               count.shape[1] * count.shape[2] if nb > 1 else 0, count.shape[2] if nh > 1 else 0)
    return (count, index, partial_id, tiles if tiles.numel() else partial_id), (*strides, nqb, nkb)


def _alibi_args(q, alibi_slopes):
    if alibi_slopes is None:
        return q, 0   # any pointer: never read
    a = alibi_slopes.contiguous()
    return a, (a.stride(0) if a.dim() == 2 else 0)


def _tail(bt: _Batch, q, window_left, window_right, num_sink, softmax_scale, softcap, dropout_p, dropout_seed):
    return (bt.seqlen_q, bt.seqlen_k, max(window_left, 0), max(window_right, 0), num_sink, float(softmax_scale),
            float(softcap) if softcap else 1.0, dropout_seed, dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            triton.next_power_of_2(max(bt.seqlen_q, bt.seqlen_k)), _gpu_key(q.device.index or 0))


@tuning.serialized_under_interpreter
def forward(q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, num_sink=0, dropout_p=0.0,
            dropout_seed=0, global_flags=None, block_mask=None):
    """fp16/bf16 attention. Dense: q (b, sq, h, d), k, v (b, sk, hk, d) -> out like q, lse (b, h, sq).
    Varlen: q (total_q, h, d), k, v (total_k, hk, d), cu_seqlens int32 (b + 1,) -> out like q, lse (h, total_q).
    lse is float32."""
    _check(q)
    bt = _batch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = bt.new_like(q)
    lse = bt.new_lse(q, q.shape[0])
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if bt.varlen else (q, q)   # any pointer when dense
    glob = q if global_flags is None else global_flags   # any pointer when there are none
    sp_ptrs, sp_ints = _sparse_args(q, block_mask, "kv")
    args = (q, k, v, out, lse, alibi, cu_q, cu_k, glob, *sp_ptrs, *bt.strides(q), *bt.strides(k), *bt.strides(v),
            *bt.strides(out), *bt.lse_strides(lse), stride_ab, *sp_ints, bt.nheads,
            *_tail(bt, q, window_left, window_right, num_sink, softmax_scale, softcap, dropout_p, dropout_seed))
    _launch("fwd", bt.seqlen_q, bt.batch * bt.nheads, args,
            _common_meta(bt, q.shape[-1], window_left, window_right, softcap, alibi_slopes, num_sink, dropout_p,
                         global_flags, block_mask), block_mask)
    return out, lse


@tuning.serialized_under_interpreter
def backward(dout, q, k, v, out, lse, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, num_sink=0,
             dropout_p=0.0, dropout_seed=0, global_flags=None, block_mask=None):
    """Gradients dq, dk, dv (dtypes and shapes of q, k, v); deterministic: no atomics anywhere."""
    _check(q)
    bt = _batch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    d = q.shape[-1]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    meta = _common_meta(bt, d, window_left, window_right, softcap, alibi_slopes, num_sink, dropout_p, global_flags,
                        block_mask)
    glob = q if global_flags is None else global_flags
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    # Δ = rowsum(dO ∘ O) row by row: a packed batch is one long sequence here, whose Δ has lse's layout
    o4, do4, d3 = (out, dout, delta) if not bt.varlen else (out[None], dout[None], delta[None])
    rows, pre_block = o4.shape[1], (16 if _interpreting() else 64)
    K._attn_bwd_preprocess[(triton.cdiv(rows, pre_block), o4.shape[0] * bt.nheads)](
        o4, do4, d3, o4.stride(0), o4.stride(1), o4.stride(2), do4.stride(0), do4.stride(1), do4.stride(2),
        bt.nheads, rows, HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    dq, dk, dv = bt.new_like(q), bt.new_like(k), bt.new_like(v)
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if bt.varlen else (q, q)
    tail = _tail(bt, q, window_left, window_right, num_sink, softmax_scale, softcap, dropout_p, dropout_seed)
    inputs = (*bt.strides(q), *bt.strides(k), *bt.strides(v), *bt.strides(dout))
    q_ptrs, q_ints = _sparse_args(q, block_mask, "q")
    kv_ptrs, kv_ints = _sparse_args(q, block_mask, "kv")
    _launch("dkdv", bt.seqlen_k, bt.batch * bt.nheads_k,
            (q, k, v, dout, lse, delta, dk, dv, alibi, cu_q, cu_k, glob, *q_ptrs, *inputs, *bt.strides(dk),
             *bt.strides(dv), *bt.lse_strides(lse), stride_ab, *q_ints, bt.nheads_k, *tail), meta, block_mask)
    _launch("dq", bt.seqlen_q, bt.batch * bt.nheads,
            (q, k, v, dout, lse, delta, dq, alibi, cu_q, cu_k, glob, *kv_ptrs, *inputs, *bt.strides(dq),
             *bt.lse_strides(lse), stride_ab, *kv_ints, bt.nheads, *tail), meta, block_mask)
    return dq, dk, dv
