"""The FLOP count used by every benchmark: the FlashAttention papers' convention.

forward = 4 · batch · nheads · seqlen_q · seqlen_k · headdim (two matmuls of 2·M·N·K each),
halved for causal; backward = 2.5 × forward (five matmuls, counting the recomputation of S).
"""
from __future__ import annotations


def attention_flops(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                    causal: bool = False, mode: str = "fwd") -> float:
    """FLOPs of one attention call; mode is 'fwd', 'bwd' or 'fwd_bwd'."""
    f = 4.0 * batch * nheads * seqlen_q * seqlen_k * headdim
    if causal:
        f /= 2
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {tuple(factor)}, got {mode!r}")
    return f * factor[mode]


def tflops(flops: float, ms: float) -> float:
    """Throughput in TFLOP/s of `flops` done in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
