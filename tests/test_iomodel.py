"""The IO model (flashattn/iomodel.py): the seeds' worked numbers, and the tile-loop counts against
closed forms derived by hand."""
import math

import pytest

from flashattn import iomodel
from flashattn.iomodel import Tiles, flash_attention_traffic, standard_attention_traffic

MiB = 2 ** 20


@pytest.mark.parametrize("seqlen, nbytes", [
    (1024, 2 * MiB),            # the seeds' table: 1M elements, 2MB in fp16
    (2048, 8 * MiB),            # 2048 × 2048 = 4,194,304 elements, "about 8MB"
    (4096, 32 * MiB),
    (8192, 134_217_728),        # "134MB" (decimal megabytes)
    (16384, 536_870_912),       # "536MB"
])
def test_score_matrix_matches_the_seeds_table(seqlen, nbytes):
    assert iomodel.score_matrix_bytes(1, 1, seqlen, seqlen, itemsize=2) == nbytes
    assert math.isclose(nbytes / 1e6, {1024: 2.1, 2048: 8.4, 4096: 33.6, 8192: 134.2, 16384: 536.9}[seqlen],
                        abs_tol=0.05)


def test_standard_forward_is_the_seeds_step_list():
    # Seed 001, n = 2048, d = 64: load Q, K (Nd each), write S (N²); read S, write P (2N²);
    # load P and V (N² + Nd), write O (Nd): Θ(Nd + N²) = 4Nd + 4N² elements.
    n, d = 2048, 64
    steps = (2 * n * d + n * n) + (2 * n * n) + (n * n + n * d) + (n * d)
    t = standard_attention_traffic(1, 1, n, n, d, itemsize=2)
    assert t.fwd == 2 * steps == 2 * (4 * n * d + 4 * n * n)
    # S and P in fp16 at n = 2048: the seed's "16MB of intermediate storage" is 2 of the 4 N² terms
    assert 2 * iomodel.score_matrix_bytes(1, 1, n, n, 2) == 16 * MiB


def test_standard_backward_and_options():
    b, h, sq, sk, d = 2, 3, 40, 56, 16
    t = standard_attention_traffic(b, h, sq, sk, d, itemsize=2)
    # dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum), dQ = dS K, dK = dSᵀ Q
    per_head = (sq * sk + sq * d + sk * d) + (sq * d + sk * d + sq * sk) + 3 * sq * sk \
        + (sq * sk + sk * d + sq * d) + (sq * sk + sq * d + sk * d)
    assert t.bwd == b * h * 2 * per_head
    assert t.fwd_bwd == t.fwd + t.bwd == t.of("fwd_bwd")
    # fp32 scores double only the N² terms; one elementwise pass adds a read + write of S each way
    t32 = standard_attention_traffic(b, h, sq, sk, d, itemsize=2, score_itemsize=4)
    assert t32.fwd - t.fwd == b * h * 4 * sq * sk * 2
    t_mask = standard_attention_traffic(b, h, sq, sk, d, itemsize=2, elementwise_passes=1)
    assert t_mask.fwd - t.fwd == t_mask.bwd - t.bwd == b * h * 2 * sq * sk * 2
    with pytest.raises(ValueError, match="mode"):
        t.of("both")


def test_flash_non_causal_rereads_kv_once_per_query_block():
    b, h, n, d, bm = 2, 4, 1000, 64, 128          # 1000 rows: the last query block is partial
    t = flash_attention_traffic(b, h, n, n, d, itemsize=2, tiles=Tiles(fwd=(bm, 64), dkdv=(32, 64), dq=(128, 32)))
    row = d * 2
    passes = math.ceil(n / bm)                    # N / B_r passes over K and V
    assert t.fwd == b * h * (2 * n * row + 2 * n * row * passes + 4 * n)
    bwd = (2 * n * row + 4 * n)                                      # preprocess: O, dO, Δ
    bwd += 4 * n * row + math.ceil(n / 64) * n * (2 * row + 8)       # dK/dV: K, V, dK, dV; Q, dO, lse, Δ per key block
    bwd += 3 * n * row + 8 * n + 2 * n * row * math.ceil(n / 128)    # dQ: Q, dO, dQ, lse, Δ; K, V per query block
    assert t.bwd == b * h * bwd


def test_flash_causal_reads_the_lower_triangle_of_tiles():
    h, n, d, blk = 1, 1024, 64, 128
    t_tiles = n // blk
    t = flash_attention_traffic(1, h, n, n, d, itemsize=2, causal=True, tiles=Tiles((blk, blk), (blk, blk), (blk, blk)))
    row = d * 2
    tri = blk * t_tiles * (t_tiles + 1) // 2      # query block i reads key blocks 0..i
    assert t.fwd == 2 * n * row + 2 * tri * row + 4 * n
    full = flash_attention_traffic(1, h, n, n, d, itemsize=2, tiles=Tiles((blk, blk), (blk, blk), (blk, blk)))
    assert full.fwd - t.fwd == 2 * (n * t_tiles - tri) * row
    # a window of 128 keys left of the diagonal touches at most 2 key tiles per query block
    w = flash_attention_traffic(1, h, n, n, d, itemsize=2, causal=True, window_size=(blk, 0),
                                tiles=Tiles((blk, blk), (blk, blk), (blk, blk)))
    assert w.fwd <= 2 * n * row + 2 * (2 * n) * row + 4 * n < t.fwd


def test_flash_gqa_reads_kv_once_per_kv_head_in_dkdv():
    kw = dict(itemsize=2, tiles=Tiles((64, 64), (64, 64), (64, 64)))
    mha = flash_attention_traffic(1, 8, 256, 256, 32, **kw)
    gqa = flash_attention_traffic(1, 8, 256, 256, 32, nheads_k=2, **kw)
    row = 32 * 2
    assert mha.fwd == gqa.fwd                                      # the forward grid is per query head
    assert mha.bwd - gqa.bwd == (8 - 2) * 4 * 256 * row            # K, V, dK, dV once per kv head
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_traffic(1, 8, 64, 64, 32, nheads_k=3)


def test_atomic_dq_replaces_the_dq_kernel():
    n, d = 512, 64
    kw = dict(itemsize=2, tiles=Tiles((128, 128), (128, 128), (128, 128)))
    split = flash_attention_traffic(1, 1, n, n, d, **kw)
    atomic = flash_attention_traffic(1, 1, n, n, d, atomic_dq=True, **kw)
    dq_kernel = 3 * n * d * 2 + 8 * n + 2 * n * d * 2 * (n // 128)
    accum = (n // 128) * n * 2 * d * 4 + n * (d * 4 + d * 2)
    assert atomic.bwd - split.bwd == accum - dq_kernel
    assert atomic.fwd == split.fwd


def test_gpt2_medium_standard_against_flash_bounds():
    # the seeds' GPT-2 medium measurement: seq 1024, hdim 64, 16 heads, batch 64, bf16
    shape = (64, 16, 1024, 1024, 64)
    std = standard_attention_traffic(*shape, itemsize=2)
    low = iomodel.compulsory_traffic(*shape, itemsize=2)
    fa = flash_attention_traffic(*shape, itemsize=2, tiles=Tiles((128, 64), (64, 64), (64, 64)))
    heads, nd = 64 * 16, 1024 * 64
    assert std.fwd_bwd == heads * (11 * 1024 ** 2 + 12 * nd) * 2            # 11 N² + 12 Nd elements per head
    assert low.fwd_bwd == heads * (12 * nd * 2 + 2 * 1024 * 4)              # 12 Nd, lse read and written
    assert low.fwd_bwd < fa.fwd_bwd < std.fwd_bwd
    assert std.fwd_bwd / low.fwd_bwd > 15
    # with 64-row tiles at d = 64 the tile loop re-reads K and V 16 times: without L2 reuse it would
    # move half of what standard attention moves (the module docstring: an upper bound)
    assert 0.4 < fa.fwd_bwd / std.fwd_bwd < 0.6


def test_theta_bound_is_the_growth_of_the_tile_loop_with_sram_sized_tiles():
    # tiles of B = M / 4d rows (the paper's B_c): K/V traffic of the forward -> 8 × N²d²/M as N grows
    d, sram = 64, iomodel.SRAM_PER_SM["H100"]
    blk = (sram // 2) // (4 * d)
    ratios = []
    for n in (2 ** 14, 2 ** 17):
        t = flash_attention_traffic(1, 1, n, n, d, itemsize=2, tiles=Tiles((blk, blk), (blk, blk), (blk, blk)))
        ratios.append(t.fwd / iomodel.flash_theta_bound(1, 1, n, d, sram, itemsize=2))
    assert ratios[1] == pytest.approx(8.0, rel=0.02) and abs(ratios[1] - 8) < abs(ratios[0] - 8)
    assert iomodel.sram_per_sm("NVIDIA H200") == 228 * 1024 and iomodel.sram_per_sm("Tesla T4") is None
