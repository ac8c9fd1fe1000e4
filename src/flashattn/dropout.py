"""Dropout inside attention: one counter-based random function, shared by every backend.

Each score (batch·head bh, query row i, key column j) of a call keeps its probability with chance
1 - dropout_p, decided by hashing (seed, bh, i, j): no random state is stored, so the backward pass
(and any backend, and the reference) regenerates exactly the same mask. The seed is drawn from
torch's default generator per call, so `torch.manual_seed` makes runs reproducible.

`mix32` is written with plain operators on 64-bit integers holding 32-bit values, so that the very
same function runs on torch tensors here and, wrapped by `triton.jit`, inside the kernels.
"""
from __future__ import annotations

import torch

try:   # triton.jit insists that the module of a function it compiles sees triton.language
    import triton.language as tl  # noqa: F401
except ImportError:   # no Triton (e.g. macOS): the PyTorch path needs only the plain functions
    pass

M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (the "lowbias32" mixer): int64 values in [0, 2³²) -> the same range."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x


def threshold(dropout_p: float) -> int:
    """Hash values below this are dropped: P(drop) = dropout_p."""
    return min(int(dropout_p * 2**32), M32)


def row_keys(seed: int, bh, q_idx):
    """Per-row keys: mix32(mix32(seed ^ mix32(bh)) + i). bh and q_idx broadcast (int64 tensors)."""
    base = mix32((mix32(bh) ^ seed) & M32)
    return mix32((base + q_idx) & M32)


def keep_mask(seed: int, bh, q_idx, k_idx, dropout_p: float) -> torch.Tensor:
    """Boolean keep mask of the scores (bh, q_idx, k_idx), broadcast against each other.

    bh: the flat (batch · nheads + head) index of the query head; q_idx, k_idx: positions in the sequence.
    """
    x = mix32(row_keys(seed, bh, q_idx) ^ (k_idx & M32))
    return x >= threshold(dropout_p)


def draw_seed() -> torch.Tensor:
    """A fresh seed from torch's default CPU generator (reproducible under torch.manual_seed)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
