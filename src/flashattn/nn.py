"""torch.nn modules computed by flashattn: a drop-in `MultiheadAttention` and a Llama-style `SelfAttention`.

Neither ever materializes the (seqlen_q, seqlen_k) attention matrix. Padded batches go through
`unpad_input` -> `flash_attn_varlen_func` -> `pad_input`, so padding costs no attention work.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import flash_attn_func, flash_attn_varlen_func
from .padding import check_attention_mask, pad_input, unpad_input
from .rotary import rotate


# ----------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention


class MultiheadAttention(nn.Module):
    """Drop-in for torch.nn.MultiheadAttention, computed by flashattn.

    Same constructor, attributes and parameters as torch's module, so state dicts load both ways:
    in_proj_weight (3E, E) and in_proj_bias (3E,), or q_proj_weight (E, E), k_proj_weight (E, kdim),
    v_proj_weight (E, vdim) when kdim or vdim differ from embed_dim (E), and out_proj (Linear(E, E)).

    Differences from torch (each raises rather than computing something else):
      - need_weights defaults to False, and True raises ValueError: the weights are never materialized.
      - attn_mask raises NotImplementedError: use is_causal=True for the causal mask.
      - is_causal=True applies the causal mask by itself (torch wants attn_mask as well and treats
        is_causal as a hint). With L != S it is aligned to the bottom-right corner, flashattn's
        convention: query i sees the keys j <= i + S - L.
      - key_padding_mask must be bool (True = ignore the key). Queries that see no key (every key
        of their batch element ignored) get attention output 0, so attn_output = out_proj.bias there
        (torch gives NaN). Combined with is_causal the ignored keys must be leading ones (left
        padding), else NotImplementedError: packing the keys would move the causal diagonal.
      - dropout applies to the attention probabilities in training mode (flashattn's in-kernel dropout,
        reproducible under torch.manual_seed), not in eval mode, like torch's module.
      - add_bias_kv and add_zero_attn raise NotImplementedError.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError(f"add_bias_kv={add_bias_kv}, add_zero_attn={add_zero_attn}: extra key/value "
                                      "rows are not supported by flashattn.nn.MultiheadAttention; leave both False")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.bias_k = self.bias_v = None     # torch's attributes for add_bias_kv, always off here
        self.add_zero_attn = False
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialization, so a freshly built module is statistically the same as torch's
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, None]:
        """Attention of query over key/value, then the output projection.

        Arguments (E = embed_dim, N = batch, L = target length, S = source length):
            query: (L, N, E), or (N, L, E) with batch_first, or (L, E) unbatched.
            key: (S, N, kdim), value: (S, N, vdim); batch_first and unbatched alike.
            key_padding_mask: (N, S) bool, or (S,) unbatched; True = ignore this key.
            need_weights: must be False. average_attn_weights: ignored (it only shapes the weights).
            attn_mask: must be None. is_causal: apply the (bottom-right aligned) causal mask.
        Return:
            (attn_output, None): attn_output shaped like query, in its dtype.
        """
        if need_weights:
            raise ValueError("need_weights=True: flashattn never materializes the attention weights; pass "
                             "need_weights=False (torch's default is True, this module's is False)")
        if attn_mask is not None:
            raise NotImplementedError("attn_mask is not supported: a dense mask would materialize L x S elements; "
                                      "use is_causal=True for a causal mask and key_padding_mask for padding")
        batched = query.dim() == 3
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.dim() != query.dim() or x.dim() not in (2, 3) or x.shape[-1] != dim:
                raise ValueError(f"{name} must have shape {self._layout(name, batched)} with last dimension {dim}, "
                                 f"got {tuple(x.shape)}")

        def to_batch_first(x):   # every layout -> (N, seq, features)
            return x.unsqueeze(0) if not batched else x if self.batch_first else x.transpose(0, 1)

        query, key, value = to_batch_first(query), to_batch_first(key), to_batch_first(value)
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(f"key and value must share (batch, S) and the batch of query, got query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} "
                             "(batch-first view)")

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        heads = (self.num_heads, self.head_dim)
        q = F.linear(query, w_q, b_q).unflatten(-1, heads)   # (N, L, H, D), flashattn's layout
        k = F.linear(key, w_k, b_k).unflatten(-1, heads)     # (N, S, H, D)
        v = F.linear(value, w_v, b_v).unflatten(-1, heads)

        keep = None
        if key_padding_mask is not None:
            keep = ~self._check_key_padding_mask(key_padding_mask, key.shape[:2], batched)
        if keep is not None and not bool(keep.all()):
            out = self._attend_padded(q, k, v, keep, is_causal, self._dropout_p())
        else:
            out = flash_attn_func(q, k, v, causal=is_causal, dropout_p=self._dropout_p())
        out = self.out_proj(out.flatten(-2))   # (N, L, E)
        out = out.squeeze(0) if not batched else out if self.batch_first else out.transpose(0, 1)
        return out, None

    def _layout(self, name: str, batched: bool) -> str:
        seq = "L" if name == "query" else "S"
        if not batched:
            return f"({seq}, features)"
        return f"(N, {seq}, features)" if self.batch_first else f"({seq}, N, features)"

    @staticmethod
    def _check_key_padding_mask(mask, batch_and_s, batched: bool) -> Tensor:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"key_padding_mask must be a bool tensor (True = ignore that key), got {got}; "
                            "a float additive mask (0 / -inf) converts with `mask != 0`")
        if not batched:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != tuple(batch_and_s):
            expected = f"(N, S) = {tuple(batch_and_s)}" if batched else f"(S,) = ({batch_and_s[1]},)"
            raise ValueError(f"key_padding_mask must have shape {expected}, got {tuple(mask.shape)}")
        return mask

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    @staticmethod
    def _attend_padded(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, causal: bool, dropout_p: float) -> Tensor:
        """q (N, L, H, D), k, v (N, S, H, D), keep (N, S) bool -> (N, L, H, D), over the kept keys only."""
        if causal and bool((keep[:, :-1] & ~keep[:, 1:]).any()):
            # Packed keys are numbered among the kept ones; the causal diagonal (bottom-right) stays where it
            # was only if every ignored key comes before every kept one.
            raise NotImplementedError("is_causal=True with a key_padding_mask that ignores keys after a kept key "
                                      "(right or inner padding) is not supported: packing the keys would move "
                                      "the causal diagonal. Left-pad the keys, or for padded self-attention use "
                                      "flashattn.nn.SelfAttention with an attention_mask")
        n, seqlen_q = q.shape[:2]
        k_packed, indices, cu_seqlens_k, max_seqlen_k = unpad_input(k, keep)
        v_packed = v.flatten(0, 1).index_select(0, indices)   # the same tokens as k
        # every query stays: sequence b's queries are rows b*L .. (b+1)*L - 1
        cu_seqlens_q = torch.arange(0, (n + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(q.flatten(0, 1), k_packed, v_packed, cu_seqlens_q, cu_seqlens_k,
                                         seqlen_q, max_seqlen_k, causal=causal, dropout_p=dropout_p)
        return out.unflatten(0, (n, seqlen_q))


# ----------------------------------------------------------------------------------------------
# rotary position embeddings


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, half-split convention (GPT-NeoX, Llama in Hugging Face): channel i is
    paired with channel i + head_dim/2 (flashattn.rotary has both conventions and partial rotary dims).

    x: (..., seqlen, nheads, head_dim), e.g. (batch, seqlen, nheads, head_dim) or (total, nheads, head_dim).
    cos, sin: (seqlen, head_dim // 2), or any shape broadcasting to x's (..., seqlen, head_dim // 2).
    Returns a tensor like x; the rotation runs in at least float32.
    """
    return rotate(x, cos, sin, interleaved=False)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of rotary embeddings: position t, frequency i -> angle t · base^(-2i / head_dim).

    Tables for `max_seqlen` positions are computed once (in float64, stored in float32) as
    non-persistent buffers, so they follow .to(device) (and .to(dtype), like any float buffer) and
    stay out of state dicts; longer sequences get tables computed on the fly.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, max_seqlen: int = 2048, device=None) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 2 != 0:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        self.head_dim, self.base = head_dim, float(base)
        cos, sin = self._tables(max_seqlen, device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, seqlen: int, device) -> Tuple[Tensor, Tensor]:
        # float64 angles on the CPU: t · freq loses digits in float32 at large t
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim)
        angles = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv_freq)
        return angles.cos().float().to(device), angles.sin().float().to(device)

    def forward(self, seqlen: int) -> Tuple[Tensor, Tensor]:
        """cos, sin for positions 0 .. seqlen-1, each (seqlen, head_dim // 2) float32."""
        if seqlen <= self.cos.shape[0]:
            return self.cos[:seqlen], self.sin[:seqlen]
        return self._tables(seqlen, self.cos.device)


# ----------------------------------------------------------------------------------------------
# a modern self-attention block


class SelfAttention(nn.Module):
    """Multi-head self-attention as in Llama-style models: q/k/v/out projections, grouped-query
    attention (n_kv_heads key/value heads shared by n_heads query heads), rotary embeddings, flashattn.

    Parameters: q_proj (dim -> n_heads·head_dim), k_proj and v_proj (dim -> n_kv_heads·head_dim),
    out_proj (n_heads·head_dim -> dim), head_dim = dim // n_heads; `rotary` holds the cos/sin tables.
    causal: each token attends to itself and the tokens before it.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: Optional[int] = None, rotary: bool = True,
                 rope_base: float = 10000.0, causal: bool = True, bias: bool = False) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim <= 0 or n_heads <= 0 or dim % n_heads != 0:
            raise ValueError(f"dim must be a positive multiple of n_heads, got dim={dim}, n_heads={n_heads}")
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.causal = causal
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.rotary = RotaryEmbedding(self.head_dim, rope_base) if rotary else None

    def forward(self, x: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """x: (batch, seqlen, dim); attention_mask: (batch, seqlen), bool or 0/1, 1 = token, 0 = padding.

        Returns (batch, seqlen, dim). With padding, each sequence is its kept tokens in order (padding
        may sit anywhere): they get rotary positions 0, 1, 2, ... and attend among themselves only;
        padded positions of the output are 0. With attention_mask=None the call has no data-dependent
        step, so torch.compile(fullgraph=True) and torch.export trace it; a mask costs one host sync
        (is there padding, how many tokens) and a graph break under torch.compile.
        """
        if attention_mask is not None:
            keep = check_attention_mask(attention_mask, x.shape)
            if not bool(keep.all()):
                return self._forward_padded(x, keep)
        cos_sin = self.rotary(x.shape[1]) if self.rotary is not None else None   # (seqlen, head_dim/2) each
        q, k, v = self._qkv(x, cos_sin)
        out = flash_attn_func(q, k, v, causal=self.causal)
        return self.out_proj(out.flatten(-2))

    def _forward_padded(self, x: Tensor, keep: Tensor) -> Tensor:
        batch, seqlen = keep.shape
        x_packed, indices, cu_seqlens, max_seqlen = unpad_input(x, keep)   # (total, dim)
        cos_sin = None
        if self.rotary is not None:
            # a token's position is its rank among its sequence's kept tokens
            positions = (keep.cumsum(dim=1) - 1).flatten().index_select(0, indices)
            cos, sin = self.rotary(max_seqlen)
            cos_sin = cos[positions], sin[positions]   # (total, head_dim/2) each
        q, k, v = self._qkv(x_packed, cos_sin)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=self.causal)
        return pad_input(self.out_proj(out.flatten(-2)), indices, batch, seqlen)

    def _qkv(self, x: Tensor, cos_sin: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor, Tensor]:
        """x (..., dim) -> q (..., n_heads, head_dim), k and v (..., n_kv_heads, head_dim), rotary applied."""
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if cos_sin is not None:
            q, k = apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
        return q, k, v
