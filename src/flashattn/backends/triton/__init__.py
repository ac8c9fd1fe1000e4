"""Launchers for the Triton kernels: forward(...) -> (out, lse) and backward(...) -> (dq, dk, dv).

Tile shapes, warps and pipeline stages are autotuned per (GPU, head dim, dtype, mask kind, GQA group,
seqlen bucket) and the winners are cached on disk by flashattn (`tuning.py`: one JSON file per key,
written atomically, validated when read; default ~/.cache/flashattn/autotune), so a second process does
not re-tune. FLASHATTN_AUTOTUNE=0 (and the interpreter, TRITON_INTERPRET=1) use one known-good config
instead.

FP8 (float8_e4m3fn q, k, v with a (batch, nheads_k, 3) float32 `descale`): the forward kernel's FP8 case,
with its own configurations; the backward (experimental) upcasts in the kernels and returns gradients
in dout's dtype. Varlen and block masks are not combined with FP8 here (the public API refuses them).
"""
from __future__ import annotations

import functools
import os
import zlib
from typing import NamedTuple, Optional, Tuple

import torch
import triton
from triton.runtime.errors import PTXASError

from ... import dropout
from . import kernels as K
from . import tuning

_SUPPORTED = (torch.float16, torch.bfloat16)
FP8_DTYPE = torch.float8_e4m3fn
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

_KEY = ["seq_bucket", "gpu_key", "tma_ok", "HEAD_DIM", "GROUP", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI", "VARLEN", "HAS_SINK", "DROPOUT", "HAS_GLOBAL", "BLOCK_SPARSE"]


def _smem_ok(bm, bn, bd, stages) -> bool:
    # q tile + pipelined k and v tiles, 2 bytes each; leave headroom under Hopper's 227 KiB.
    return 2 * (bm * bd + stages * 2 * bn * bd) <= 200 * 1024


def _smem_bytes(kernel: str, bm: int, bn: int, bd: int, stages: int) -> int:
    """Shared memory of one program, roughly: resident tiles once, streamed tiles once per pipeline stage
    (fwd and dq keep the query-side tiles and stream K/V; dK/dV keeps K/V and streams q and dO)."""
    resident, streamed = {"fwd": (bm, bn), "dq": (2 * bm, bn), "dkdv": (2 * bn, bm)}[kernel]
    return 2 * bd * (resident + stages * 2 * streamed)


# the _tma_level a config flag needs: descriptors 1, the warp-specialized loops 2
_LEVEL_NEEDED = {"TMA": 1, "WS": 2}


def _allowed(flag: str, level: int) -> bool:
    """Whether a config's `flag` (a key of its kwargs) may be used by a launch of this _tma_level."""
    return level >= _LEVEL_NEEDED.get(flag, 0)


def _tma_allowed(configs, named_args):
    """configs without the TMA ones unless the launch allows descriptors, and without the warp-specialized
    ones unless it allows those (the tma_ok argument: _tma_level)."""
    level = named_args.get("tma_ok", 0)
    return [c for c in configs if all(_allowed(f, level) for f, on in c.kwargs.items() if on)]


def _keep_fwd(configs, named_args, **kwargs):
    bd = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"]
    kept = [c for c in _tma_allowed(configs, named_args)
            if _smem_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd, c.num_stages)
            and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4 and bd >= 128)   # spills the accumulator
            and not (bd >= 256 and c.kwargs["BLOCK_N"] > 64)]
    return kept or configs[:1]


def _keep_bwd(configs, named_args, **kwargs):
    bd = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"]
    kept = [c for c in _tma_allowed(configs, named_args)
            if _smem_ok(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd, c.num_stages)
            and not (bd >= 256 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 64)]
    return kept or configs[:1]


def _smem_ok_fp8(bm, bn, bd, stages) -> bool:
    # as _smem_ok with 1-byte q, k, v tiles
    return bm * bd + stages * 2 * bn * bd <= 200 * 1024


def _keep_fwd_fp8(configs, named_args, **kwargs):
    bd = named_args["BLOCK_D"] if "BLOCK_D" in named_args else kwargs["BLOCK_D"]
    kept = [c for c in configs
            if _smem_ok_fp8(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd, c.num_stages)
            and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4 and bd >= 128)]   # spills the accumulator
    return kept or configs[:1]


def _cfg(bm, bn, w, s, tma=False, ws=False):
    return triton.Config(dict({"BLOCK_M": bm, "BLOCK_N": bn}, **({"TMA": True} if tma else {}),
                              **({"WS": True} if ws else {})), num_warps=w, num_stages=s)


def _tma_level(kernel: str, meta, seqlen_q: int, seqlen_k: int, tma_ok: bool) -> int:
    """What `kernel` may use (its tma_ok argument, part of the tuning key): 0: pointer loads only. 1: tensor
    descriptors (TMA), where the tensors allow them (tma_ok: _tma_ok). 2: also its warp-specialized loop
    (kernels._attn_fwd_ws and the backward's: one loop, no score options): dense, no left window/sinks/global
    tokens/block mask, no softcap/ALiBi/dropout, seqlen_k a multiple of 128 (every key tile whole); causal or a
    right window only with seqlen_q <= seqlen_k (every row then sees key 0). The backward's loops read whole
    query tiles too (dQ: lse and delta as 1-D tiles), and triton 3.6 specializes dK/dV's only outside the GQA
    group loop (GROUP == 1)."""
    if not tma_ok:
        return 0
    plain = not any(meta[f] for f in ("VARLEN", "HAS_LEFT", "HAS_SINK", "HAS_GLOBAL", "BLOCK_SPARSE",
                                      "FP8", "SOFTCAP", "HAS_ALIBI", "DROPOUT"))
    plain = plain and (not meta["HAS_RIGHT"] or seqlen_q <= seqlen_k) and seqlen_k % 128 == 0
    if kernel != "fwd":
        plain = plain and seqlen_q % 128 == 0 and (kernel == "dq" or meta["GROUP"] == 1)
    return 2 if plain else 1


def _tma_ok(*tensors) -> bool:
    """Whether the tensors allow descriptors: a Hopper or newer GPU (or Triton's interpreter), fp16/bf16,
    16-byte aligned base addresses and strides, rows of at least 16 bytes. FLASHATTN_TMA=0: never."""
    if os.environ.get("FLASHATTN_TMA", "1") == "0":
        return False
    if not _interpreting() and torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    return all(t.dtype in _SUPPORTED and t.data_ptr() % 16 == 0 and t.shape[-1] * t.element_size() >= 16
               and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1]) for t in tensors)


# Small on purpose: each config costs a compile (~1.5 s) per (head dim, mask kind, dtype). The lists hold
# the winners of the H200 sweep in benchmarks/NOTES.md plus close neighbours.
# TMA variants (tensor-descriptor loads, Hopper): shapes whose TMA build did not crash ptxas (it does for some
# with 8 warps, e.g. fwd 128x128, dQ 128x64: the tuner skips a config that fails to compile). WS: the
# warp-specialized forward (4 warps per consumer warpgroup, two of them, plus a producer).
FWD_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 8, 4),
               _cfg(64, 32, 4, 3), _cfg(64, 32, 8, 2),
               _cfg(128, 64, 8, 3, tma=True), _cfg(64, 64, 4, 3, tma=True), _cfg(128, 64, 8, 4, tma=True),
               _cfg(128, 128, 4, 2, tma=True, ws=True), _cfg(128, 64, 4, 2, tma=True, ws=True)]
DKDV_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3), _cfg(64, 128, 8, 2), _cfg(32, 128, 8, 2),
                _cfg(32, 64, 4, 2),
                _cfg(32, 64, 4, 3, tma=True), _cfg(64, 64, 4, 3, tma=True),
                _cfg(64, 128, 4, 2, tma=True, ws=True), _cfg(32, 128, 4, 2, tma=True, ws=True)]
DQ_CONFIGS = [_cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2),
              _cfg(64, 32, 4, 2),
              _cfg(128, 32, 4, 3, tma=True), _cfg(64, 64, 4, 3, tma=True),
              _cfg(128, 64, 4, 2, tma=True, ws=True), _cfg(128, 128, 4, 2, tma=True, ws=True)]
# FP8 forward: not yet measured on a GPU. Halved operand bytes allow deeper pipelines and wider key
# tiles; BLOCK_N >= 32 (the K of an FP8 wgmma for P·V). Triton's FP8 tutorial runs 128x128, 8 warps.
# The FP8 loop holds two fp32 (BLOCK_M, BLOCK_D) tiles (acc and one block's product, see _attn_fwd_inner):
# at head dim 256 the 128-row tiles spill registers on sm_90 (0.6-1.3 KB, `compile_check.py --fp8 --regs`),
# 64 rows on 8 warps do not; the tuner times both.
FWD_FP8_CONFIGS = [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 4), _cfg(128, 64, 8, 4),
                   _cfg(128, 128, 8, 2), _cfg(64, 64, 8, 3), _cfg(64, 128, 8, 2)]


def _default(kernel: str, block_d: int, tma_ok: int = 0, causal: bool = False):
    """One known-good config per kernel (FLASHATTN_AUTOTUNE=0): the H200 sweep's winners, with TMA where
    the H100 measured it faster (benchmarks/NOTES.md); small tiles under the interpreter so that tiny test
    shapes still cross block boundaries, with TMA whenever the inputs allow it (the tests cover both paths)."""
    if _interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, **({"TMA": True} if tma_ok else {}),
                    **({"WS": True} if tma_ok >= 2 else {}))
    if kernel == "fwd_fp8":   # a guess until measured (benchmarks/bench_fp8.py): no register spills on sm_90
        bm, bn, w, s = (128, 128, 8, 3) if block_d <= 128 else (64, 64, 8, 3)
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
    if block_d <= 64:
        table = {"fwd": (64, 64, 4, 3), "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3)}
    elif block_d <= 128:
        table = {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 4, 3), "dq": (128, 32, 4, 3)}
    else:   # head dims up to 256: smaller tiles keep q, k, v and the accumulator within shared memory/registers
        table = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
    # warp-specialized where it measured faster (NOTES.md, 2026-12-05): forward 1.31x non-causal, causal 1.06-1.19x on
    # the benchmark grid (H100, two runs; 0.93x on one H200 shape of 512 programs, b1 s4096 h16); backward dQ
    # 1.04-1.09x, dK/dV with it 1.05-1.14x non-causal; not at hdim 64
    ws = {("fwd", False): (128, 128), ("fwd", True): (128, 128), ("dq", False): (128, 64), ("dq", True): (128, 64),
          ("dkdv", False): (64, 128)}
    if tma_ok >= 2 and block_d == 128 and (kernel, causal) in ws:
        bm, bn = ws[(kernel, causal)]
        return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, TMA=True, WS=True)
    bm, bn, w, s = table[kernel]
    tma = tma_ok >= 1 and (kernel, block_d) in _TMA_DEFAULTS
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, **({"TMA": True} if tma else {}))


# (kernel, BLOCK_D) whose default config reads through TMA when it may (H100 sweep, NOTES.md)
_TMA_DEFAULTS = {("fwd", 16), ("fwd", 32), ("fwd", 64), ("dkdv", 64), ("dkdv", 128), ("dq", 64), ("dq", 128)}


# Triton's autotuner only benchmarks; the results are kept by `tuning` (Triton's own disk cache does not
# survive a corrupt file: see tuning.py).
_CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS, "fwd_fp8": FWD_FP8_CONFIGS}
_KEEP = {"fwd": _keep_fwd, "dkdv": _keep_bwd, "dq": _keep_bwd, "fwd_fp8": _keep_fwd_fp8}
_plain = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq, "fwd_fp8": K._attn_fwd}
_tuned = {name: triton.autotune(_CONFIGS[name], key=_KEY, prune_configs_by={"early_config_prune": _KEEP[name]})(fn)
          for name, fn in _plain.items()}


def _tuning_key(args, meta) -> dict:
    """What a tuned config is chosen per: _KEY's values, the dtype and the GPU model. args start with q and
    end with _tail(...) (seq_bucket, gpu_key) and tma_ok."""
    key = {name: meta[name] for name in _KEY if name in meta}
    key.update(seq_bucket=args[-3], tma_ok=args[-1], dtype=str(args[0].dtype), gpu=_gpu_name(args[0].device.index or 0))
    return key


# kernel name -> config dict: pins a config (benchmark sweeps and experiments), bypassing autotuning
pinned_configs: dict = {}
# kernel -> the config of its last autotuned launch (launch_config); (kernel, BLOCK_D, pinned, interpreted) -> the
# config that last ran without autotuning (a default depends on the inputs too: _tma_level)
_last: dict = {}
_last_default: dict = {}


def _scratch(size: int, alignment: int, stream):
    """Global scratch for kernels that build tensor descriptors on the device (128 bytes per program)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Triton asks an allocator for the device-side descriptors' scratch; its default raises. The allocator
    is a ContextVar (per thread), so it is set on every launch that may need it, keeping one set by the user."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


_ptxas_failed: set = set()   # (kernel, meta, config) whose descriptor build ptxas could not compile


def _run(kernel: str, grid, args, meta, cfg: dict) -> dict:
    """Launch `kernel` with cfg. ptxas (triton 3.6's bundled one) crashes on a few TMA builds (NOTES.md); such a
    config falls back to pointer loads, remembered per variant so the failing compile is not retried.
    Returns the config that ran."""
    key = (kernel, tuple(sorted(meta.items())), tuple(sorted(cfg.items())))
    if key in _ptxas_failed:
        cfg = {k: v for k, v in cfg.items() if k not in ("TMA", "WS")}
    try:
        _plain[kernel][grid](*args, **meta, **cfg)
    except PTXASError:
        if not (cfg.get("TMA") or cfg.get("WS")):
            raise
        _ptxas_failed.add(key)
        cfg = {k: v for k, v in cfg.items() if k not in ("TMA", "WS")}
        _plain[kernel][grid](*args, **meta, **cfg)
    return cfg


def _launch(kernel: str, grid_rows: int, grid_cols: int, args, meta, block_mask=None):
    """Run `kernel` with autotuning, or with the default config when autotuning is off; a block mask
    fixes the tiles to its own block size."""
    block_d = meta["BLOCK_D"]
    tma_ok = args[-1]   # _tail's last
    if tma_ok:
        _ensure_allocator()
    if block_mask is not None:
        bq, bk = block_mask.block_size
        # pointer loads: the block-sparse speed-ups were measured with them (descriptors untimed here)
        cfg = dict(_default(kernel, block_d, 0), BLOCK_M=bq, BLOCK_N=bk)
        if kernel == "dkdv":
            # dK/dV streams the query rows of each listed block in its own, shorter tiles (SUB_M per block):
            # at 128x64 blocks, one 128-row tile made dK/dV 3.6x slower than its 32-row tiles (NOTES.md)
            sub_m = max(1, bq // min(bq, _default(kernel, block_d)["BLOCK_M"]))
            cfg["BLOCK_M"], meta = bq // sub_m, dict(meta, SUB_M=sub_m)
        if kernel == "fwd":
            # the K/V addresses come from the block list (an indirect load), which shortens the pipeliner's
            # prefetch distance: 5 stages ran 3.13x dense vs 2.89x with the dense default's 3 (NOTES.md)
            cfg["num_stages"] = 5
        if not _interpreting():
            while cfg["num_stages"] > 1 and _smem_bytes(kernel, cfg["BLOCK_M"], bk, block_d,
                                                         cfg["num_stages"]) > 200 * 1024:
                cfg["num_stages"] -= 1
            if (bk if kernel == "dkdv" else cfg["BLOCK_M"]) >= 128:
                cfg["num_warps"] = 8   # 4 warps would hold a 128-row accumulator (dK/dV: 128 keys) in too few registers
        # a pinned config's warps and stages apply (experiments); the tiles stay the mask's
        cfg.update({k: v for k, v in pinned_configs.get(kernel, {}).items() if k in ("num_warps", "num_stages")})
        _run(kernel, (triton.cdiv(grid_rows, bq if kernel != "dkdv" else bk), grid_cols), args, meta, cfg)
        return
    if kernel not in pinned_configs and _autotune_enabled():
        grid = lambda m: (triton.cdiv(grid_rows, m["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]), grid_cols)
        config = tuning.run_tuned(kernel, _tuned[kernel], _plain[kernel], grid, args, meta, _tuning_key(args, meta),
                                  _KEEP[kernel](_CONFIGS[kernel], {"tma_ok": tma_ok}, **meta), K)
        _last[kernel] = dict(config["kwargs"], num_warps=config["num_warps"], num_stages=config["num_stages"])
    else:
        cfg = pinned_configs.get(kernel) or _default(kernel, block_d, tma_ok, bool(meta["HAS_RIGHT"]))
        # a pinned config asking for more than these inputs allow (TMA: level 1, WS: 2) runs without it
        cfg = {k: v for k, v in cfg.items() if _allowed(k, tma_ok)}
        block = cfg["BLOCK_M" if kernel != "dkdv" else "BLOCK_N"]
        ran = _run(kernel, (triton.cdiv(grid_rows, block), grid_cols), args, meta, cfg)
        _last_default[(kernel, block_d, kernel in pinned_configs, _interpreting())] = ran


def launch_config(kernel: str, block_d: int) -> dict:
    """The config (BLOCK_M, BLOCK_N, num_warps, num_stages) `kernel` ("fwd", "dkdv" or "dq") ran with at
    its last dense launch in this process, and where it came from ("source": "pinned", "autotuned" or
    "default"). For autotuned kernels it is the autotuner's choice for the last key it saw, so read it
    right after the call of interest; {"source": "not launched yet"} before any. Block-mask launches
    use the mask's block size instead (see _launch)."""
    if kernel in pinned_configs:
        return dict(pinned_configs[kernel], source="pinned")
    if not _autotune_enabled():
        # the default depends on the inputs too (descriptors or not): the last one run at this head dim
        return dict(_last_default.get((kernel, block_d, False, _interpreting())) or _default(kernel, block_d),
                    source="default")
    if kernel not in _last:
        return {"source": "not launched yet"}
    return dict(_last[kernel], source="autotuned")


def _check(q, descale=None):
    if q.dtype == FP8_DTYPE:
        if descale is None:
            raise ValueError("float8_e4m3fn inputs need their descale factors (the public API passes ones when "
                             "none are given)")
        return
    if q.dtype not in _SUPPORTED:
        raise TypeError(f"the Triton backend computes in float16 or bfloat16 (or float8_e4m3fn), got {q.dtype}; "
                        "unset FLASHATTN_BACKEND to run float32 on the PyTorch path, or convert the inputs")


# FP8 forward: True copies v keys-contiguous before the launch unless it comes so (measured: the copy costs 5-20%
# of the FP8 forward, NOTES.md). False (an experiment, not yet timed) passes v as it is: the kernel then reads
# head-dim-contiguous V tiles and Triton transposes them on chip (compiled for sm_90: still e4m3 wgmma for P·V,
# with byte permutes and a smaller shared-memory pipeline for V). Autotuned configs are shared by both layouts.
fp8_v_copy = True


def _v_keys_contiguous(v):
    """v (b, sk, hk, d) with its key axis contiguous (stride 1), as the FP8 forward reads it (an FP8 wgmma
    takes P·V's B operand only K-major, keys contiguous): v itself if it is so already, else a copy whose
    head-dim stride is padded to a multiple of 16 bytes (aligned rows load as vectors; the padding is never read)."""
    if v.stride(1) == 1:
        return v
    b, sk, hk, d = v.shape
    buf = torch.empty((b, hk, d, sk + (-sk) % 16), device=v.device, dtype=v.dtype)
    buf[..., :sk] = v.permute(0, 2, 3, 1)
    return buf[..., :sk].permute(0, 3, 1, 2)


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
                 block_mask, fp8=False):
    # an FP8 wgmma's K is 32: the head dim of q·kᵀ is padded to at least that
    return dict(GROUP=bt.nheads // bt.nheads_k, HEAD_DIM=d, BLOCK_D=max(32 if fp8 else 16, triton.next_power_of_2(d)),
                HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap != 0.0,
                HAS_ALIBI=alibi_slopes is not None, VARLEN=bt.varlen, HAS_SINK=num_sink > 0 and window_left >= 0,
                DROPOUT=dropout_p > 0.0, HAS_GLOBAL=global_flags is not None,
                BLOCK_SPARSE=_sparse_mode(bt, window_left, window_right, global_flags, block_mask), FP8=fp8)


def _sparse_mode(bt: _Batch, window_left, window_right, global_flags, block_mask) -> int:
    """BLOCK_SPARSE: 0 without a block mask; 2 when every present tile is seen whole (no partly filled tile,
    no other mask, seqlens multiples of the tiles), so the kernels skip all masking (FlexAttention's "full
    blocks"); 1 otherwise (every present tile masked element by element)."""
    if block_mask is None:
        return 0
    bq, bk = block_mask.block_size
    whole = (block_mask.partial.shape[0] == 0 and window_left < 0 and window_right < 0 and global_flags is None
             and bt.seqlen_q % bq == 0 and bt.seqlen_k % bk == 0 and not bt.varlen)
    return 2 if whole else 1


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
    """The kernels' trailing scalar arguments, up to gpu_key (the launchers append tma_ok: _tma_level)."""
    return (bt.seqlen_q, bt.seqlen_k, max(window_left, 0), max(window_right, 0), num_sink, float(softmax_scale),
            float(softcap) if softcap else 1.0, dropout_seed, dropout.threshold(dropout_p), 1.0 / (1.0 - dropout_p),
            triton.next_power_of_2(max(bt.seqlen_q, bt.seqlen_k)), _gpu_key(q.device.index or 0))


@tuning.serialized_under_interpreter
def forward(q, k, v, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, num_sink=0, dropout_p=0.0,
            dropout_seed=0, global_flags=None, block_mask=None, descale=None, out_dtype=None):
    """fp16/bf16 attention. Dense: q (b, sq, h, d), k, v (b, sk, hk, d) -> out like q, lse (b, h, sq).
    Varlen: q (total_q, h, d), k, v (total_k, hk, d), cu_seqlens int32 (b + 1,) -> out like q, lse (h, total_q).
    lse is float32.
    FP8 (dense): q, k, v float8_e4m3fn, descale (b, hk, 3) float32 (the q, k, v descale factors of each
    batch entry and kv head), out in out_dtype (bf16 or fp16). v may have its key axis contiguous
    instead of its head dim: it is then read as it is, without the copy made otherwise."""
    _check(q, descale)
    fp8 = q.dtype == FP8_DTYPE
    bt = _batch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if fp8:
        out = torch.empty(q.shape, device=q.device, dtype=out_dtype)
        v = _v_keys_contiguous(v) if fp8_v_copy else v
        descale = descale.float().contiguous()
    else:
        out = bt.new_like(q)
        descale = q   # any pointer: never read
    lse = bt.new_lse(q, q.shape[0])
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if bt.varlen else (q, q)   # any pointer when dense
    glob = q if global_flags is None else global_flags   # any pointer when there are none
    sp_ptrs, sp_ints = _sparse_args(q, block_mask, "kv")
    meta = _common_meta(bt, q.shape[-1], window_left, window_right, softcap, alibi_slopes, num_sink, dropout_p,
                        global_flags, block_mask, fp8)
    args = (q, k, v, out, lse, alibi, cu_q, cu_k, glob, *sp_ptrs, descale, *bt.strides(q), *bt.strides(k),
            *bt.strides(v), v.stride(-1), *bt.strides(out), *bt.lse_strides(lse), stride_ab, *sp_ints, bt.nheads,
            *_tail(bt, q, window_left, window_right, num_sink, softmax_scale, softcap, dropout_p, dropout_seed),
            _tma_level("fwd", meta, bt.seqlen_q, bt.seqlen_k, _tma_ok(q, k, v)))
    meta["ROUND_P"] = fp8 and _interpreting()   # see kernels._to_e4m3
    _launch("fwd_fp8" if fp8 else "fwd", bt.seqlen_q, bt.batch * bt.nheads, args, meta, block_mask)
    return out, lse


@tuning.serialized_under_interpreter
def backward(dout, q, k, v, out, lse, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, num_sink=0,
             dropout_p=0.0, dropout_seed=0, global_flags=None, block_mask=None, descale=None):
    """Gradients dq, dk, dv (dtypes and shapes of q, k, v); deterministic: no atomics anywhere.
    FP8 (experimental; q, k, v float8_e4m3fn with descale as in forward): the kernels upcast q, k, v to
    dout's dtype and return the gradients of the dequantized inputs in that dtype."""
    _check(q, descale)
    fp8 = q.dtype == FP8_DTYPE
    bt = _batch(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    d = q.shape[-1]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if fp8:
        v = v if v.stride(-1) == 1 else v.contiguous()   # the backward reads v along its head dim
        descale = descale.float().contiguous()
    else:
        descale = q   # any pointer: never read
    meta = _common_meta(bt, d, window_left, window_right, softcap, alibi_slopes, num_sink, dropout_p, global_flags,
                        block_mask, fp8)
    glob = q if global_flags is None else global_flags
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    # Δ = rowsum(dO ∘ O) row by row: a packed batch is one long sequence here, whose Δ has lse's layout
    o4, do4, d3 = (out, dout, delta) if not bt.varlen else (out[None], dout[None], delta[None])
    rows, pre_block = o4.shape[1], (16 if _interpreting() else 64)
    K._attn_bwd_preprocess[(triton.cdiv(rows, pre_block), o4.shape[0] * bt.nheads)](
        o4, do4, d3, o4.stride(0), o4.stride(1), o4.stride(2), do4.stride(0), do4.stride(1), do4.stride(2),
        bt.nheads, rows, HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_block)
    if fp8:
        dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=dout.dtype) for x in (q, k, v))
    else:
        dq, dk, dv = bt.new_like(q), bt.new_like(k), bt.new_like(v)
    alibi, stride_ab = _alibi_args(q, alibi_slopes)
    cu_q, cu_k = (cu_seqlens_q, cu_seqlens_k) if bt.varlen else (q, q)
    tail = _tail(bt, q, window_left, window_right, num_sink, softmax_scale, softcap, dropout_p, dropout_seed)
    tma_ok = _tma_ok(q, k, v, dout)
    dkdv_level, dq_level = (_tma_level(kn, meta, bt.seqlen_q, bt.seqlen_k, tma_ok) for kn in ("dkdv", "dq"))
    inputs = (*bt.strides(q), *bt.strides(k), *bt.strides(v), *bt.strides(dout))
    q_ptrs, q_ints = _sparse_args(q, block_mask, "q")
    kv_ptrs, kv_ints = _sparse_args(q, block_mask, "kv")
    _launch("dkdv", bt.seqlen_k, bt.batch * bt.nheads_k,
            (q, k, v, dout, lse, delta, dk, dv, alibi, cu_q, cu_k, glob, *q_ptrs, descale, *inputs, *bt.strides(dk),
             *bt.strides(dv), *bt.lse_strides(lse), stride_ab, *q_ints, bt.nheads_k, *tail, dkdv_level), dict(meta, SUB_M=1),
            block_mask)
    _launch("dq", bt.seqlen_q, bt.batch * bt.nheads,
            (q, k, v, dout, lse, delta, dq, alibi, cu_q, cu_k, glob, *kv_ptrs, descale, *inputs, *bt.strides(dq),
             *bt.lse_strides(lse), stride_ab, *kv_ints, bt.nheads, *tail, dq_level), meta, block_mask)
    return dq, dk, dv
