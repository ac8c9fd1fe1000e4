"""Property tests: the torch path equals the reference (design.md's rule, float32, forward and
gradients) over shapes and options drawn by hypothesis.

Examples per run: the 'ci' profile of conftest.py (100); HYPOTHESIS_PROFILE=slow for many more.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from flashattn import flash_attn_func
from flashattn.backends import torch_tiled
from helpers import backend_attention, make_qkv, run_and_compare


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


window_side = st.one_of(st.just(-1), st.integers(0, 20))


@st.composite
def problems(draw):
    nheads_k = draw(st.sampled_from([1, 2]))
    return dict(
        batch=draw(st.integers(1, 2)),
        seqlen_q=draw(st.integers(0, 80)),
        seqlen_k=draw(st.integers(0, 80)),
        nheads_k=nheads_k,
        nheads=nheads_k * draw(st.integers(1, 3)),
        headdim=draw(st.sampled_from([8, 16, 24, 40, 64])),
        causal=draw(st.booleans()),
        window=(draw(window_side), draw(window_side)),
        softcap=draw(st.sampled_from([0.0, 5.0])),
        block_q=draw(st.sampled_from([5, 16, 32, 64])),
        block_k=draw(st.sampled_from([7, 16, 32, 64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _run(p, fn):
    note(repr(p))
    q, k, v = make_qkv(p["batch"], p["seqlen_q"], p["seqlen_k"], p["nheads"], p["nheads_k"], p["headdim"],
                       torch.float32, seed=p["seed"])
    # with softcap, a larger scale so that the cap actually changes the scores
    scale = 1.0 if p["softcap"] else None
    run_and_compare(fn, q, k, v, causal=p["causal"], window_size=p["window"], softcap=p["softcap"],
                    softmax_scale=scale, seed=p["seed"])


# always tried, whatever hypothesis draws: no key at all; many empty rows with GQA and a cap; a gradient
# that vanishes exactly (one key per row); one query
EXAMPLES = [
    dict(batch=1, seqlen_q=3, seqlen_k=0, nheads_k=1, nheads=1, headdim=8, causal=False, window=(-1, -1),
         softcap=0.0, block_q=5, block_k=7, seed=0),
    dict(batch=1, seqlen_q=80, seqlen_k=9, nheads_k=2, nheads=6, headdim=40, causal=True, window=(3, -1),
         softcap=5.0, block_q=5, block_k=7, seed=1),
    dict(batch=2, seqlen_q=24, seqlen_k=70, nheads_k=2, nheads=2, headdim=40, causal=True, window=(0, -1),
         softcap=5.0, block_q=5, block_k=7, seed=0),
    dict(batch=1, seqlen_q=1, seqlen_k=80, nheads_k=1, nheads=3, headdim=64, causal=False, window=(-1, -1),
         softcap=0.0, block_q=16, block_k=16, seed=2),
]


def with_examples(test):
    for e in reversed(EXAMPLES):
        test = example(e)(test)
    return test


@given(problems())
@with_examples
def test_torch_path_matches_reference(p):
    """The backend itself with small, odd tiles: many blocks, ragged last blocks, skipped blocks."""
    _run(p, backend_attention(torch_tiled, block_q=p["block_q"], block_k=p["block_k"]))


@given(problems())
@with_examples
def test_public_api_matches_reference(p):
    """The same through flash_attn_func: argument handling, the custom op, empty-input shortcuts."""
    _run(p, flash_attn_func)
