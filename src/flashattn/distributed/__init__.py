"""Attention over sequences sharded across ranks (context parallelism): ring, Ulysses and hybrid.

    from flashattn.distributed import ring_flash_attn_func, zigzag_shard
    q_local = zigzag_shard(q, rank, world_size)          # (batch, seqlen / world_size, nheads, headdim)
    out_local = ring_flash_attn_func(q_local, k_local, v_local, causal=True)

Modules: layout.py (who holds which tokens), ring.py (the ring, an autograd.Function), ulysses.py
(all-to-all), hybrid.py (Ulysses groups × ring groups), api.py (the public functions and their checks).
"""
from .api import ring_flash_attn_func, ring_flash_attn_varlen_func
from .hybrid import HybridGroups, hybrid_groups
from .layout import LAYOUTS, shard, unshard, zigzag_shard, zigzag_unshard

__all__ = ["LAYOUTS", "HybridGroups", "hybrid_groups", "ring_flash_attn_func", "ring_flash_attn_varlen_func", "shard",
           "unshard", "zigzag_shard", "zigzag_unshard"]
