"""HBM traffic of attention, from the IO model of the FlashAttention paper (Dao et al. 2022, §3.2).

Counts are bytes read + written in the GPU's main memory (HBM) by one call, for
q (batch, seqlen_q, nheads, headdim) and k, v (batch, seqlen_k, nheads_k, headdim). They are
estimates of what the algorithm must move, not measurements: caches (L2) can serve a re-read, and
small O(seqlen)-sized passes that an implementation adds are not counted unless said below.
Per (batch, head), with N_q = seqlen_q, N_k = seqlen_k, d = headdim, in elements:

Standard attention (`standard_attention_traffic`; the paper's Algorithms 0 and 3): S = QKᵀ and
P = softmax(S) are written to HBM and read back.
    forward   read Q, K, write S | read S, write P | read P, V, write O
              = 2·N_q·d + 2·N_k·d + 4·N_q·N_k                       (4Nd + 4N² for N_q = N_k = N)
    backward  read P, dO, write dV | read dO, V, write dP | read P, dP, write dS |
              read dS, K, write dQ | read dS, Q, write dK
              = 4·N_q·d + 4·N_k·d + 7·N_q·N_k                       (8Nd + 7N²)
    each extra elementwise pass over S (a mask, a scale applied to S) adds 2·N_q·N_k to each
    direction (read + write; autograd's backward of it is another such pass).
This is the seeds' Θ(Nd + N²): at N = 1024, d = 64 the N² terms are 94% of it.

FlashAttention (`flash_attention_traffic`): nothing of size N_q × N_k reaches HBM; what the tile
loops of our Triton kernels (flashattn/backends/triton/kernels.py) read and write:
    forward   per query block of B_m rows: read Q_i once, read every K, V row the block may see
              (masks.key_range, whole B_n tiles), write O_i and lse_i (fp32).
              K and V are re-read once per query block: N_q / B_m passes over them, so
              ≈ 2·N_q·d + 2·N_k·d·⌈N_q / B_m⌉ (non-causal; causal reads about half the K/V tiles).
    backward  preprocess: read O, dO, write Δ = rowsum(dO ∘ O) (fp32);
              dK/dV kernel, per key block of B_n rows (per kv head): read K_j, V_j once, stream the
              Q, dO rows that see it (masks.query_range) with their lse and Δ, write dK_j, dV_j;
              dQ kernel, per query block of B_m rows: read Q_i, dO_i, lse_i, Δ_i, stream the K, V
              rows it sees, write dQ_i.
With the largest tiles SRAM allows (B ≈ M / 4d, M the SRAM per SM in elements) the passes are
N·4d / M, each moving Θ(Nd): Θ(N²d²/M), the paper's Theorem 2 (`flash_theta_bound`). It is not
O(Nd), as one of the seeds says: K and V are re-read once per query block. Real kernels' tiles are
bounded by registers (64-128 rows), not by M, so the tile-loop count is the estimate to compare
with measured time; the Θ bound, with its constant set to 1, only shows the order of growth.

Caches. The tile-loop count assumes every load goes to HBM. It is an upper bound: K and V of one
head (256 KiB at N = 1024, d = 64, bf16) are re-read by the query blocks of that head running at the
same time, and an H100's 50 MiB L2 serves most of those re-reads. `compulsory_traffic` (each input
read once, each output written once: what any exact attention must move) is the lower bound; the
truth for FlashAttention lies between the two, and measured time tells which end it is near (bytes /
time above the copy bandwidth means L2 hits). Standard attention's S and P are far larger than L2
(2 GiB each for GPT-2 medium's 1024 heads), written by one kernel and read by the next: its count
is close to what HBM sees.

`atomic_dq=True` models a FlashAttention-2 style backward in one kernel over key blocks (torch
SDPA's flash backend): no dQ kernel; each key block instead reads and writes the fp32 dQ
accumulator of every query tile it visits, and a final pass converts it (read fp32, write dQ).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from . import masks

__all__ = ["Traffic", "Tiles", "SRAM_PER_SM", "score_matrix_bytes", "compulsory_traffic",
           "standard_attention_traffic", "flash_attention_traffic", "flash_theta_bound", "sram_per_sm"]

KIB = 1024
# Shared memory + L1 per SM ("SRAM" in the paper's sense). A100: 192 KB per SM (108 SMs, as the seeds
# say); H100/H200: 256 KiB L1 of which up to 228 KiB is shared memory (227 KiB for one thread block).
SRAM_PER_SM = {"A100": 192 * KIB, "H100": 228 * KIB, "H200": 228 * KIB}


@dataclass(frozen=True)
class Traffic:
    """HBM bytes (read + written) of the forward and of the backward of one call."""
    fwd: int
    bwd: int

    @property
    def fwd_bwd(self) -> int:
        return self.fwd + self.bwd

    def of(self, mode: str) -> int:
        """mode: 'fwd', 'bwd' or 'fwd_bwd' (the names of flops.attention_flops)."""
        if mode not in ("fwd", "bwd", "fwd_bwd"):
            raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
        return getattr(self, mode)


@dataclass(frozen=True)
class Tiles:
    """(BLOCK_M, BLOCK_N) of each kernel: query rows × key rows of one tile. The defaults are the
    kernels' FLASHATTN_AUTOTUNE=0 configs for headdim ≤ 64 (backends/triton/__init__.py `_default`)."""
    fwd: Tuple[int, int] = (64, 64)
    dkdv: Tuple[int, int] = (64, 64)
    dq: Tuple[int, int] = (64, 64)


def score_matrix_bytes(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, itemsize: int = 2) -> int:
    """Size of one materialized score matrix S (or P), (batch, nheads, seqlen_q, seqlen_k)."""
    return batch * nheads * seqlen_q * seqlen_k * itemsize


def compulsory_traffic(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int, itemsize: int = 2,
                       *, nheads_k: Optional[int] = None, stat_itemsize: int = 4) -> Traffic:
    """HBM bytes that any exact attention moves at least: each tensor of the call read or written once.

    forward: read q, k, v, write out and lse; backward: read q, k, v, out, dout and lse, write dq, dk, dv.
    """
    hk = nheads if nheads_k is None else nheads_k
    q_bytes = batch * nheads * seqlen_q * headdim * itemsize          # q, out, dout, dq
    kv_bytes = batch * hk * seqlen_k * headdim * itemsize             # k, v, dk, dv
    lse_bytes = batch * nheads * seqlen_q * stat_itemsize
    fwd = 2 * q_bytes + 2 * kv_bytes + lse_bytes
    bwd = 4 * q_bytes + 4 * kv_bytes + lse_bytes
    return Traffic(fwd, bwd)


def standard_attention_traffic(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                               itemsize: int = 2, *, score_itemsize: Optional[int] = None,
                               elementwise_passes: int = 0) -> Traffic:
    """HBM bytes of attention that materializes S and P (module docstring: Algorithms 0 and 3).

    itemsize: bytes per element of q, k, v, o and their gradients; score_itemsize: of S, P, dP, dS
    (default itemsize; 4 for an implementation that upcasts them to fp32); elementwise_passes:
    extra read-modify-write passes over S in the forward (e.g. 1 for a causal masked_fill), each
    mirrored by one in the backward.
    """
    s_item = itemsize if score_itemsize is None else score_itemsize
    heads = batch * nheads
    nd_q, nd_k, nn = seqlen_q * headdim, seqlen_k * headdim, seqlen_q * seqlen_k
    fwd = heads * ((2 * nd_q + 2 * nd_k) * itemsize + (4 + 2 * elementwise_passes) * nn * s_item)
    bwd = heads * ((4 * nd_q + 4 * nd_k) * itemsize + (7 + 2 * elementwise_passes) * nn * s_item)
    return Traffic(fwd, bwd)


def _rows_read(lo: int, hi: int, block: int, length: int) -> int:
    """Rows a kernel loads to cover [lo, hi): whole tiles from lo rounded down, masked at `length`."""
    if hi <= lo:
        return 0
    start = lo // block * block
    return min(length, start + -(-(hi - start) // block) * block) - start


def flash_attention_traffic(batch: int, nheads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                            itemsize: int = 2, *, nheads_k: Optional[int] = None, causal: bool = False,
                            window_size: Tuple[int, int] = (-1, -1), tiles: Tiles = Tiles(),
                            atomic_dq: bool = False, stat_itemsize: int = 4) -> Traffic:
    """HBM bytes of the FlashAttention tile loops (module docstring), counted tile by tile.

    tiles: the (BLOCK_M, BLOCK_N) each kernel ran with (the autotuner's choice, see
    benchmarks/gpt2_medium_io.py); causal / window_size: which key tiles are skipped, as the kernels
    decide it (masks.key_range, masks.query_range); nheads_k: GQA/MQA (K/V heads; default nheads);
    stat_itemsize: bytes of lse and Δ (fp32).
    """
    hk = nheads if nheads_k is None else nheads_k
    if nheads % hk:
        raise ValueError(f"nheads ({nheads}) must be a multiple of nheads_k ({hk})")
    left, right = masks.window_bounds(bool(causal), window_size)
    row = headdim * itemsize                                  # bytes of one row of q, k, v, o or a gradient

    def kv_rows_seen(block_m: int, block_n: int) -> Tuple[int, int]:
        """(query rows, K/V rows loaded) summed over the query blocks of one head."""
        total = 0
        for q_lo in range(0, seqlen_q, block_m):
            k_lo, k_hi = masks.key_range(q_lo, min(q_lo + block_m, seqlen_q), seqlen_q, seqlen_k, left, right)
            total += _rows_read(k_lo, k_hi, block_n, seqlen_k)
        return seqlen_q, total

    # forward, per (batch, query head): Q once, K and V per query block, O and lse written
    _, kv = kv_rows_seen(*tiles.fwd)
    fwd = nheads * (2 * seqlen_q * row + 2 * kv * row + seqlen_q * stat_itemsize)

    # backward preprocess, per query head: read O and dO, write Δ
    bwd = nheads * (2 * seqlen_q * row + seqlen_q * stat_itemsize)
    # dK/dV, per (batch, kv head): K_j, V_j read and dK_j, dV_j written once; per query head of the
    # group, the Q and dO rows (and their lse, Δ) that see the key block are streamed
    block_m, block_n = tiles.dkdv
    q_streamed = 0
    for k_lo in range(0, seqlen_k, block_n):
        q_lo, q_hi = masks.query_range(k_lo, min(k_lo + block_n, seqlen_k), seqlen_q, seqlen_k, left, right)
        q_streamed += _rows_read(q_lo, q_hi, block_m, seqlen_q)
    bwd += hk * 4 * seqlen_k * row
    bwd += nheads * q_streamed * (2 * row + 2 * stat_itemsize)
    if atomic_dq:
        # the fp32 dQ accumulator tile of every visited query tile, read and written per key block,
        # then one pass converting it to dQ
        acc_row = headdim * 4
        bwd += nheads * (q_streamed * 2 * acc_row + seqlen_q * (acc_row + row))
    else:
        # dQ, per (batch, query head): Q_i, dO_i, lse_i, Δ_i read and dQ_i written once, K and V streamed
        _, kv = kv_rows_seen(*tiles.dq)
        bwd += nheads * (3 * seqlen_q * row + 2 * seqlen_q * stat_itemsize + 2 * kv * row)
    return Traffic(batch * fwd, batch * bwd)


def flash_theta_bound(batch: int, nheads: int, seqlen: int, headdim: int, sram_bytes: int,
                      itemsize: int = 2) -> int:
    """The paper's Θ(N²d²/M) with its constant set to 1, in bytes, for all heads (M in elements =
    sram_bytes / itemsize). An order of growth, not a prediction: see the module docstring."""
    m_elems = sram_bytes / itemsize
    return int(batch * nheads * seqlen * seqlen * headdim * headdim / m_elems * itemsize)


def sram_per_sm(device_name: str) -> Optional[int]:
    """SRAM per SM in bytes for a device name containing A100, H100 or H200; None otherwise."""
    for key, nbytes in SRAM_PER_SM.items():
        if key in device_name.upper():
            return nbytes
    return None
