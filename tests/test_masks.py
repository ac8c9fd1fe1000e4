"""flashattn.masks: visible, mask_matrix, key_range, query_range, block_is_full, visible_box and block_window against a brute-force
definition, exhaustively over a small grid (cheap: every combination runs in a few seconds).

Brute force, from flash_attn's docstring: query i sees key j iff 0 <= j < sk and
i + sk - sq - left <= j <= i + sk - sq + right, with -1 = unlimited on that side.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from flashattn import masks

SEQLENS = range(0, 7)
WINDOWS = [-1, 0, 1, 2, 5]


def brute(sq, sk, left, right) -> np.ndarray:
    m = np.zeros((sq, sk), dtype=bool)
    for i in range(sq):
        for j in range(sk):
            m[i, j] = ((left == -1 or j >= i + sk - sq - left) and (right == -1 or j <= i + sk - sq + right))
    return m


def grid():
    return itertools.product(SEQLENS, SEQLENS, WINDOWS, WINDOWS)


def test_mask_matrix_and_visible_values_match_brute_force():
    for sq, sk, left, right in grid():
        expected = brute(sq, sk, left, right)
        got = masks.mask_matrix(sq, sk, left, right)
        assert got.dtype == torch.bool
        # values only (broadcast to the full shape): the shape has its own test below
        assert np.array_equal(np.broadcast_to(got.numpy(), (sq, sk)), expected), (sq, sk, left, right)
        if sq and sk:
            i = torch.arange(sq)[None, :, None]             # (1, sq, 1)
            j = torch.arange(sk)[None, None, :]             # (1, 1, sk)
            vis = masks.visible(i, j, sq, sk, left, right).numpy()
            assert np.array_equal(np.broadcast_to(vis, (1, sq, sk))[0], expected), (sq, sk, left, right)
            for qi, kj in [(0, 0), (sq - 1, sk - 1), (sq // 2, sk // 3)]:
                v = masks.visible(torch.tensor(qi), torch.tensor(kj), sq, sk, left, right)
                assert bool(v) == expected[qi, kj], (sq, sk, left, right, qi, kj)


@pytest.mark.parametrize("left,right", [(-1, -1), (2, -1), (-1, 0), (1, 1)])
@pytest.mark.parametrize("sq,sk", [(3, 4), (0, 4), (4, 0), (0, 0)])
def test_mask_matrix_has_shape_seqlen_q_by_seqlen_k(sq, sk, left, right):
    # the docstring promises a (seqlen_q, seqlen_k) matrix, and visible() the broadcast shape of its
    # indices, whatever the window (an unlimited window must not drop the query dimension)
    assert tuple(masks.mask_matrix(sq, sk, left, right).shape) == (sq, sk)
    qi, kj = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
    assert tuple(masks.visible(qi, kj, sq, sk, left, right).shape) == (sq, sk)


def test_visible_rejects_out_of_range_keys():
    # keys outside [0, sk) are never visible, even with an unlimited window (the kernels' padding)
    j = torch.tensor([-2, -1, 5, 6])
    assert not masks.visible(torch.tensor(2), j, 4, 5, -1, -1).any()
    assert masks.visible(torch.tensor(2), torch.tensor([0, 4]), 4, 5, -1, -1).all()


def test_key_range_is_the_exact_span_of_visible_keys():
    for sq, sk, left, right in grid():
        m = brute(sq, sk, left, right)
        for q_lo in range(sq):
            for q_hi in range(q_lo + 1, sq + 1):
                k_lo, k_hi = masks.key_range(q_lo, q_hi, sq, sk, left, right)
                cols = np.nonzero(m[q_lo:q_hi].any(axis=0))[0]
                where = (sq, sk, left, right, q_lo, q_hi, (k_lo, k_hi))
                if len(cols) == 0:
                    assert k_lo >= k_hi, where
                else:
                    # never skips a visible key (correctness) and loads no block it need not (tight)
                    assert (k_lo, k_hi) == (cols[0], cols[-1] + 1), where
                    # the union of the rows' spans is contiguous, so the range holds no gap
                    assert len(cols) == k_hi - k_lo, where


def test_query_range_is_the_exact_span_of_queries_that_see_a_key():
    for sq, sk, left, right in grid():
        m = brute(sq, sk, left, right)
        for k_lo in range(sk):
            for k_hi in range(k_lo + 1, sk + 1):
                q_lo, q_hi = masks.query_range(k_lo, k_hi, sq, sk, left, right)
                rows = np.nonzero(m[:, k_lo:k_hi].any(axis=1))[0]
                where = (sq, sk, left, right, k_lo, k_hi, (q_lo, q_hi))
                if len(rows) == 0:
                    assert q_lo >= q_hi, where
                else:
                    assert (q_lo, q_hi) == (rows[0], rows[-1] + 1), where
                    assert len(rows) == q_hi - q_lo, where


def test_block_is_full_iff_every_pair_is_visible():
    for sq, sk, left, right in grid():
        m = brute(sq, sk, left, right)
        for q_lo, q_hi in itertools.combinations(range(sq + 1), 2):
            for k_lo, k_hi in itertools.combinations(range(sk + 1), 2):
                got = masks.block_is_full(q_lo, q_hi, k_lo, k_hi, sq, sk, left, right)
                assert got == bool(m[q_lo:q_hi, k_lo:k_hi].all()), (sq, sk, left, right, q_lo, q_hi, k_lo, k_hi)


def test_block_is_full_past_the_last_key():
    # a tile that sticks out past seqlen_k (padding in a kernel) is never "full"
    assert masks.block_is_full(0, 4, 0, 4, 4, 4, -1, -1)
    assert not masks.block_is_full(0, 4, 0, 8, 4, 4, -1, -1)


def test_visible_box_and_block_window_restate_the_mask_of_a_sub_block():
    """Ring attention's cut: a block of the score matrix attended as a sequence of its own. The box holds
    every visible pair of the block, and inside it the block's own window gives exactly the parent's mask."""
    for sq, sk, left, right in itertools.product(range(1, 6), range(1, 6), [-1, 0, 1, 3], [-1, 0, 1, 3]):
        m = brute(sq, sk, left, right)
        for q_lo, q_hi in itertools.combinations(range(sq + 1), 2):
            for k_lo, k_hi in itertools.combinations(range(sk + 1), 2):
                where = (sq, sk, left, right, q_lo, q_hi, k_lo, k_hi)
                block = m[q_lo:q_hi, k_lo:k_hi]
                box = masks.visible_box(q_lo, q_hi, k_lo, k_hi, sq, sk, left, right)
                if box is None:
                    assert not block.any(), where
                    continue
                a, b, c, d = box
                assert q_lo <= a < b <= q_hi and k_lo <= c < d <= k_hi, where
                assert block.sum() == m[a:b, c:d].sum(), where                 # nothing visible left outside
                assert m[a:b, c:d].any(axis=1).all() and m[a:b, c:d].any(axis=0).all(), where   # tight
                lw, rw = masks.block_window(a, b, c, d, sq, sk, left, right)
                assert (lw == -1) == (left == -1) and (rw == -1) == (right == -1), where
                assert np.array_equal(brute(b - a, d - c, lw, rw), m[a:b, c:d]), where


def test_block_window_refuses_an_untrimmed_block():
    # causal, rows 4..5 against keys 0..5: keys past the last row's diagonal need right < 0 without trimming
    with pytest.raises(ValueError, match="visible_box"):
        masks.block_window(0, 2, 0, 6, 6, 6, -1, 0)


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (2, 3), (4, 4), (3, 8)])
def test_tiling_with_ranges_and_full_blocks_covers_the_mask(block_q, block_k):
    """What the tiled loops do: for each query block, the key blocks in key_range, masked unless full.
    Reassembled, it must be the mask exactly: no visible pair skipped, no hidden pair let through."""
    for sq, sk, left, right in itertools.product(range(0, 11), range(0, 11), WINDOWS, WINDOWS):
        m = brute(sq, sk, left, right)
        seen = np.zeros((sq, sk), dtype=bool)
        for q0 in range(0, sq, block_q):
            q1 = min(q0 + block_q, sq)
            k_lo, k_hi = masks.key_range(q0, q1, sq, sk, left, right)
            for k0 in range(k_lo, k_hi, block_k):
                k1 = min(k0 + block_k, k_hi)
                if masks.block_is_full(q0, q1, k0, k1, sq, sk, left, right):
                    tile = np.ones((q1 - q0, k1 - k0), dtype=bool)
                else:
                    tile = masks.mask_matrix(sq, sk, left, right)[q0:q1, k0:k1].numpy()
                assert not seen[q0:q1, k0:k1].any()
                seen[q0:q1, k0:k1] = tile
        assert np.array_equal(seen, m), (sq, sk, left, right, block_q, block_k)


def test_window_bounds_folds_causal():
    assert masks.window_bounds(False, (-1, -1)) == (-1, -1)
    assert masks.window_bounds(True, (-1, -1)) == (-1, 0)
    assert masks.window_bounds(True, (3, 7)) == (3, 0)
    assert masks.window_bounds(False, (3, 7)) == (3, 7)
    assert masks.window_bounds(False, [2, -1]) == (2, -1)


def test_causal_pictures_of_the_docstring():
    # seqlen_q = 2, seqlen_k = 5 and the transpose shapes, bottom-right aligned
    left, right = masks.window_bounds(True, (-1, -1))
    assert masks.mask_matrix(2, 5, left, right).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert masks.mask_matrix(5, 2, left, right).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_alibi_bias():
    slopes = torch.tensor([[0.5, 2.0]])                     # (b=1, h=2)
    sq, sk = 3, 5
    qi = torch.arange(sq)[:, None]
    kj = torch.arange(sk)[None, :]
    bias = masks.alibi_bias(slopes, qi, kj, sq, sk)
    assert bias.shape == (1, 2, sq, sk)
    for h, s in enumerate((0.5, 2.0)):
        for i in range(sq):
            for j in range(sk):
                assert bias[0, h, i, j].item() == pytest.approx(-s * abs(i + sk - sq - j))


def test_softcap():
    x = torch.linspace(-40, 40, 81, dtype=torch.float64)
    assert masks.apply_softcap(x, 0.0) is x
    capped = masks.apply_softcap(x, 5.0)
    torch.testing.assert_close(capped, 5.0 * torch.tanh(x / 5.0))
    assert capped.abs().max() < 5.0


def test_default_scale():
    assert masks.default_scale(64) == pytest.approx(0.125)
    assert masks.default_scale(40) == pytest.approx(1 / math.sqrt(40))
