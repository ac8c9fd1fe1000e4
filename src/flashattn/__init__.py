"""flashattn: exact attention computed the FlashAttention way (tiled, online softmax, recomputing backward).

    from flashattn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)        # q, k, v: (batch, seqlen, nheads, headdim)
"""
from .api import (
    choose_backend,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    scaled_dot_product_attention,
)
from . import fp8, nn, padding, rotary
from .blocksparse import BlockMask
from .combine import flash_attn_combine
from .kvcache import PagedKVCache, StreamingKVCache, flash_attn_with_kvcache
from .padding import pad_input, unpad_input
from .reference import attention_ref

__version__ = "0.1.0"

__all__ = [
    "BlockMask",
    "attention_ref",
    "choose_backend",
    "flash_attn_combine",
    "flash_attn_with_kvcache",
    "PagedKVCache",
    "StreamingKVCache",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "fp8",
    "nn",
    "pad_input",
    "padding",
    "scaled_dot_product_attention",
    "unpad_input",
]
