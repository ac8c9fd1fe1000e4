"""Block-sparse attention: which (query block, key block) tiles exist, and the exact mask inside the rest.

A `BlockMask` describes an arbitrary mask at two levels, as FlexAttention's BlockMask does:
- `layout` (B|1, H|1, n_q_blocks, n_k_blocks) bool: tiles with at least one visible (query, key)
  pair. Absent tiles are never loaded, so the work is proportional to the number of tiles present.
- `partial_id` (same shape, int64): -1 for absent or full tiles, else an index into `partial`
  (n_partial, block_q, block_k) bool, the element mask of a tile that is only partly visible.
Build it from a boolean `layout` (every present tile full) or from a FlexAttention-style
`mask_mod(b, h, q_idx, kv_idx) -> bool tensor`, evaluated with broadcasting index tensors
(b: (B,1,1,1), h: (1,H,1,1), q_idx: (1,1,Bq,1), kv_idx: (1,1,1,seqlen_k)), one query block at a time,
so building it needs O(B·H·block_q·seqlen_k) memory, never seqlen².
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


class BlockMask:
    """A block-sparse mask for attention of seqlen_q queries over seqlen_k keys; see the module docstring."""

    def __init__(self, layout: torch.Tensor, partial_id: torch.Tensor, partial: torch.Tensor,
                 block_size: Tuple[int, int], seqlen_q: int, seqlen_k: int):
        self.layout, self.partial_id, self.partial = layout, partial_id, partial
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.seqlen_q, self.seqlen_k = int(seqlen_q), int(seqlen_k)

    # -------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_layout(cls, layout: torch.Tensor, block_size: Tuple[int, int], seqlen_q: int,
                    seqlen_k: int) -> "BlockMask":
        """layout: (B|1, H|1, ceil(seqlen_q / block_q), ceil(seqlen_k / block_k)) bool; present tiles are full."""
        bq, bk = _check_block_size(block_size)
        expect = (-(-seqlen_q // bq), -(-seqlen_k // bk))
        if not isinstance(layout, torch.Tensor) or layout.dim() != 4 or tuple(layout.shape[2:]) != expect:
            shape = tuple(layout.shape) if isinstance(layout, torch.Tensor) else type(layout).__name__
            raise ValueError(f"layout must have shape (batch or 1, heads or 1, {expect[0]}, {expect[1]}) for "
                             f"seqlen_q={seqlen_q}, seqlen_k={seqlen_k} and block_size={block_size}, got {shape}")
        layout = layout.bool()
        return cls(layout, torch.full(layout.shape, -1, dtype=torch.long, device=layout.device),
                   torch.zeros((0, bq, bk), dtype=torch.bool, device=layout.device), (bq, bk), seqlen_q, seqlen_k)

    @classmethod
    def from_mask_mod(cls, mask_mod: Callable, batch: Optional[int], nheads: Optional[int], seqlen_q: int,
                      seqlen_k: int, block_size: Tuple[int, int] = (128, 64), device=None) -> "BlockMask":
        """Evaluate mask_mod(b, h, q_idx, kv_idx) on every (query, key) pair, one query block at a time.

        batch / nheads: None when mask_mod does not depend on b / h (the layout then broadcasts).
        """
        if not callable(mask_mod):
            raise TypeError(f"mask_mod must be a callable mask_mod(b, h, q_idx, kv_idx), got {type(mask_mod).__name__}")
        bq, bk = _check_block_size(block_size)
        nb, nh = batch or 1, nheads or 1
        nqb, nkb = -(-seqlen_q // bq), -(-seqlen_k // bk)
        b = torch.arange(nb, device=device).view(nb, 1, 1, 1)
        h = torch.arange(nh, device=device).view(1, nh, 1, 1)
        kv = torch.arange(nkb * bk, device=device).view(1, 1, 1, nkb * bk)
        layout = torch.zeros((nb, nh, nqb, nkb), dtype=torch.bool, device=device)
        partial_id = torch.full((nb, nh, nqb, nkb), -1, dtype=torch.long, device=device)
        tiles, n_partial = [], 0
        for qb in range(nqb):
            q = torch.arange(qb * bq, qb * bq + bq, device=device).view(1, 1, bq, 1)
            valid = (q < seqlen_q) & (kv < seqlen_k)
            m = torch.as_tensor(mask_mod(b, h, q.clamp(max=seqlen_q - 1), kv.clamp(max=seqlen_k - 1)), device=device)
            try:
                m = m.bool().expand(nb, nh, bq, nkb * bk) & valid
            except RuntimeError:
                raise ValueError(f"mask_mod(b, h, q_idx, kv_idx) must return a tensor that broadcasts with its "
                                 f"index arguments to (batch, nheads, block_q, keys) = {(nb, nh, bq, nkb * bk)}, "
                                 f"got shape {tuple(m.shape)}; build it from b, h, q_idx and kv_idx elementwise") from None
            m = m.view(nb, nh, bq, nkb, bk).transpose(2, 3)                        # (nb, nh, nkb, bq, bk)
            filled = (m | ~valid.view(1, 1, bq, nkb, bk).transpose(2, 3)).flatten(-2).all(-1)
            present = m.flatten(-2).any(-1)
            layout[:, :, qb] = present
            part = present & ~filled
            idx = part.nonzero(as_tuple=True)
            if idx[0].numel():
                partial_id[idx[0], idx[1], qb, idx[2]] = torch.arange(n_partial, n_partial + idx[0].numel(),
                                                                      device=device)
                n_partial += idx[0].numel()
                tiles.append(m[idx])
        partial = torch.cat(tiles) if tiles else torch.zeros((0, bq, bk), dtype=torch.bool, device=device)
        return cls(layout, partial_id, partial, (bq, bk), seqlen_q, seqlen_k)

    # -------------------------------------------------------------------------------------------
    # reading

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.layout.shape)

    def density(self) -> float:
        """The fraction of tiles present (the fraction of dense attention's work that remains)."""
        return self.layout.float().mean().item()

    def tile(self, qb: int, kb: int) -> torch.Tensor:
        """(B|1, H|1, block_q, block_k) bool: the element mask of tile (qb, kb), positions past the
        sequences included (the caller slices them off)."""
        bq, bk = self.block_size
        present = self.layout[:, :, qb, kb]
        pid = self.partial_id[:, :, qb, kb]
        out = present[..., None, None].expand(*present.shape, bq, bk).clone()
        has = pid >= 0
        if has.any():
            out[has] = self.partial[pid[has]]
        return out

    def dense(self) -> torch.Tensor:
        """(B|1, H|1, seqlen_q, seqlen_k) bool: the whole mask (O(seqlen²): for the reference and tests)."""
        bq, bk = self.block_size
        nqb, nkb = self.layout.shape[2:]
        rows = [torch.cat([self.tile(qb, kb) for kb in range(nkb)], dim=-1) for qb in range(nqb)]
        return torch.cat(rows, dim=-2)[..., :self.seqlen_q, :self.seqlen_k]

    def check_for(self, batch: int, nheads: int, seqlen_q: int, seqlen_k: int) -> None:
        """ValueError unless this mask fits an attention call of these sizes."""
        if (seqlen_q, seqlen_k) != (self.seqlen_q, self.seqlen_k):
            raise ValueError(f"block_mask was built for seqlen_q={self.seqlen_q}, seqlen_k={self.seqlen_k}, but the "
                             f"inputs have seqlen_q={seqlen_q}, seqlen_k={seqlen_k}; build it for these lengths")
        nb, nh = self.layout.shape[:2]
        if nb not in (1, batch) or nh not in (1, nheads):
            raise ValueError(f"block_mask has (batch, heads) = ({nb}, {nh}); expected 1 or {batch} and 1 or {nheads}")

    def kernel_lists(self):
        """The index lists the Triton kernels walk (int32, contiguous):
        kv_count (B|1, H|1, nqb) and kv_index (B|1, H|1, nqb, nkb): the present key blocks of each query
        block, first kv_count entries; q_count (B|1, H|1, nkb) and q_index (B|1, H|1, nkb, nqb): the
        query blocks of each key block (for dK/dV); partial_id (B|1, H|1, nqb, nkb) and the partial
        tiles as int8 (n_partial, block_q, block_k)."""
        if getattr(self, "_lists", None) is not None:   # one argsort per mask, not per kernel launch
            return self._lists

        def lists(present):   # present blocks first, in increasing order
            order = torch.argsort((~present).to(torch.int8), dim=-1, stable=True)
            return present.sum(-1).to(torch.int32).contiguous(), order.to(torch.int32).contiguous()
        kv_count, kv_index = lists(self.layout)
        q_count, q_index = lists(self.layout.transpose(-1, -2))
        self._lists = (kv_count, kv_index, q_count, q_index, self.partial_id.to(torch.int32).contiguous(),
                       self.partial.to(torch.int8).contiguous())
        return self._lists

    def to(self, device) -> "BlockMask":
        return BlockMask(self.layout.to(device), self.partial_id.to(device), self.partial.to(device),
                         self.block_size, self.seqlen_q, self.seqlen_k)

    def __repr__(self) -> str:
        return (f"BlockMask(shape={self.shape}, block_size={self.block_size}, seqlen_q={self.seqlen_q}, "
                f"seqlen_k={self.seqlen_k}, density={self.density():.3f}, partial_tiles={self.partial.shape[0]})")


def _check_block_size(block_size) -> Tuple[int, int]:
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(x, int) and x >= 16 and x & (x - 1) == 0 for x in block_size)):
        raise ValueError(f"block_size must be a pair of powers of two >= 16 (block_q, block_k), got {block_size!r}")
    return int(block_size[0]), int(block_size[1])
