"""Hugging Face transformers backend: ``attn_implementation="fattn"``.

    from flashattn.integrations.transformers import register
    register()                      # once per process, before building or switching a model
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fattn")
    model.set_attn_implementation("fattn")                 # or switch an existing model

The name must not contain "flash": transformers treats every such name as a flash_attn package or
Hub kernel to import (and raises when it finds none).

Works for the models built on transformers' AttentionInterface (Llama, Qwen2, Mistral, GPT-2, ...):

- causal or bidirectional self-attention; ``generate()`` with a KV cache (a few queries against a long
  cache is flashattn's bottom-right causal alignment);
- GQA/MQA as they are (k/v heads are not repeated);
- the model's ``scaling``, ``softcap`` and ``sliding_window`` (transformers' window w lets a query see
  itself and the w - 1 tokens before it: flashattn's ``window_size=(w - 1, w - 1)``, right folded to 0
  when causal);
- padded batches (left or right padding): the padding mask gives each sequence's real tokens, which
  run through ``flash_attn_varlen_func`` without the pads; pad positions output 0;
- packed sequences (no attention_mask; ``position_ids`` restarting at each sequence, or transformers'
  ``cu_seq_lens_q/k`` and ``max_length_q/k`` kwargs) through varlen.

Masks. transformers builds the mask that the registered name asks for. The name is registered with
`padding_mask`, so the attention function gets ``None`` (no padding) or the 2D boolean padding mask
(batch, kv_length), never a seqlen² tensor. A 4D mask (batch, 1, q_len, kv_len) (passed by the user,
or built by transformers < 4.53, which has no AttentionMaskInterface) is accepted when it is exactly
a causal / sliding-window mask over left-padded sequences; anything else raises NotImplementedError,
never a silently different result.

Attention dropout applies in training mode (flashattn's in-kernel dropout).
Not supported (NotImplementedError): attention sinks (``s_aux``), masks that flashattn cannot express (``or_mask_function``/``and_mask_function`` overlays,
arbitrary 4D masks). ``output_attentions`` returns None for the weights, like transformers' sdpa.
"""
from __future__ import annotations

import torch

from .. import masks
from ..api import flash_attn_func, flash_attn_varlen_func
from ..padding import pad_input, unpad_input


def register(name: str = "fattn") -> str:
    """Register flashattn with transformers under `name` (attention function and mask format); returns it."""
    if "flash" in name:
        raise ValueError(f"name={name!r}: transformers takes every attention name containing 'flash' for the "
                         "flash_attn package or a Hub kernel and fails to load it; choose another, e.g. 'fattn'")
    from transformers import AttentionInterface
    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:   # transformers < 4.53 builds a 4D mask itself; attention_forward reads it
        return name
    AttentionMaskInterface.register(name, padding_mask)
    return name


def padding_mask(kv_length=None, attention_mask=None, use_vmap=False, **kwargs):
    """The mask format of `attention_forward`: None, or the (batch, kv_length) boolean padding mask.

    transformers' mask builders call this with the 2D padding mask (batch, past + q_length); the
    causal and sliding-window structure is not materialized: flashattn applies it from `is_causal`
    and `sliding_window`.
    """
    if use_vmap:   # set by transformers when the model overlays or_mask_function / and_mask_function
        raise NotImplementedError("this model combines the causal mask with a custom mask function, which "
                                  "flashattn cannot express; use attn_implementation='sdpa' or 'eager' for it")
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].bool()   # a sliding-window cache keeps only the last kv_length
    if mask.shape[-1] == kv_length and bool(mask.all()):
        return None
    return mask


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, **kwargs):
    """transformers' attention-function protocol.

    query: (batch, nheads, q_len, headdim); key, value: (batch, nheads_k, kv_len, headdim).
    attention_mask: None, the 2D padding mask of `padding_mask`, or a 4D mask (see the module docstring).
    Returns (attn_output (batch, q_len, nheads, headdim), None).
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by flashattn yet; "
                                  "use attn_implementation='eager' for this model")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    w = sliding_window - 1 if sliding_window else -1
    opts = dict(softmax_scale=scaling, causal=causal, window_size=(w, w), softcap=softcap or 0.0,
                dropout_p=dropout if module.training else 0.0)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))   # flash_attn layout (batch, seq, heads, dim)
    batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]

    if attention_mask is None:
        packed = _packed_sequences(kwargs, batch, q_len, kv_len)
        if packed is None:
            return flash_attn_func(q, k, v, **opts), None
        out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *packed, **opts)
        return out.view(q.shape), None

    if attention_mask.dim() == 2:
        q_valid, k_valid = _tokens_from_padding_mask(attention_mask.bool(), q_len, kv_len, causal)
    elif attention_mask.dim() == 4:
        q_valid, k_valid = _tokens_from_4d_mask(attention_mask, q_len, kv_len, *masks.window_bounds(causal, (w, w)))
    else:
        raise ValueError(f"attention_mask must be 2D (batch, kv_len) or 4D (batch, 1, q_len, kv_len), "
                         f"got shape {tuple(attention_mask.shape)}")
    if bool(q_valid.all()) and bool(k_valid.all()):
        return flash_attn_func(q, k, v, **opts), None
    return _varlen(q, k, v, q_valid, k_valid, opts), None


def _varlen(q, k, v, q_valid, k_valid, opts):
    """Attention over the real tokens of each sequence only; pad query positions get 0."""
    q_unpad, q_indices, cu_seqlens_q, max_seqlen_q = unpad_input(q, q_valid)
    k_unpad, k_indices, cu_seqlens_k, max_seqlen_k = unpad_input(k, k_valid)
    v_unpad = v.flatten(0, 1)[k_indices]
    out = flash_attn_varlen_func(q_unpad, k_unpad, v_unpad, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 **opts)
    return pad_input(out, q_indices, q.shape[0], q.shape[1])


def _tokens_from_padding_mask(mask, q_len, kv_len, causal):
    """(q_valid (batch, q_len), k_valid (batch, kv_len)) from a (batch, L) padding mask, True = real token.

    The mask covers past + current tokens; the queries are its last q_len. A static cache has
    kv_len > L slots, the ones past the mask still empty; a sliding cache keeps the last kv_len.
    """
    if not causal and q_len != kv_len:   # cross-attention: the mask describes the keys only
        q_valid = torch.ones(mask.shape[0], q_len, dtype=torch.bool, device=mask.device)
    else:
        q_valid = mask[:, -q_len:]       # the queries are the newest tokens
    if kv_len > mask.shape[1]:
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)
    return q_valid, mask[:, -kv_len:]


def _tokens_from_4d_mask(mask, q_len, kv_len, left, right):
    """(q_valid, k_valid) from a 4D mask (batch, 1, q_len, >= kv_len): bool (True = attend) or additive
    float (0 = attend, a large negative number = masked). Raises NotImplementedError unless the mask is
    exactly flashattn's mask over each sequence's real tokens, with the real tokens those that see /
    are seen by something."""
    if mask.shape[1] != 1 or mask.shape[2] != q_len or mask.shape[3] < kv_len:
        raise NotImplementedError(f"a 4D attention_mask of shape {tuple(mask.shape)}: flashattn reads only masks of "
                                  f"shape (batch, 1, {q_len}, >= {kv_len}); pass the 2D padding mask instead")
    mask = mask[:, 0, :, :kv_len]
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        if not bool((keep | (mask <= torch.finfo(mask.dtype).min / 2)).all()):
            raise NotImplementedError("a float attention_mask with biases other than 0 / -inf cannot be expressed "
                                      "by flashattn; use attn_implementation='sdpa' or 'eager'")
    q_valid, k_valid = keep.any(dim=2), keep.any(dim=1)
    # what flashattn computes after dropping the pads: `visible` on positions among the real tokens
    q_pos, k_pos = q_valid.cumsum(1) - 1, k_valid.cumsum(1) - 1
    n_q, n_k = q_valid.sum(1)[:, None, None], k_valid.sum(1)[:, None, None]
    expected = masks.visible(q_pos[:, :, None], k_pos[:, None, :], n_q, n_k, left, right)
    expected &= q_valid[:, :, None] & k_valid[:, None, :]
    if not torch.equal(expected, keep):
        raise NotImplementedError(
            "this 4D attention_mask is not a causal / sliding-window mask over padded sequences (right padding "
            "in a causal 4D mask is not either: the pad queries see the real tokens), so flashattn cannot run "
            "it exactly; pass the 2D padding mask (batch, seq_len) instead, or use attn_implementation='sdpa'")
    return q_valid, k_valid


def _packed_sequences(kwargs, batch, q_len, kv_len):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of sequences packed into the rows, or None.

    Given by transformers' flash kwargs (e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=True)),
    or read from position_ids: a position that does not count up by 1 starts a new sequence (as
    transformers' mask builder sees packing). The latter reads the positions on the host in every layer.
    """
    given = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if all(x is not None for x in given):
        return given[0].to(torch.int32), given[1].to(torch.int32), int(given[2]), int(given[3])
    position_ids = kwargs.get("position_ids")
    if position_ids is None or q_len != kv_len or q_len == 1:   # no positions, or a cache: not packed
        return None
    pos = position_ids.expand(batch, q_len)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if int(starts.sum()) == batch:   # one sequence per row
        return None
    begin = starts.flatten().nonzero().flatten()
    cu_seqlens = torch.cat([begin, begin.new_full((1,), batch * q_len)]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens, cu_seqlens, max_seqlen, max_seqlen
