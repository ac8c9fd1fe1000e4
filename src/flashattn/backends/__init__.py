"""Backends: each module offers forward(q, k, v, softmax_scale, window_left, window_right, softcap,
alibi_slopes) -> (out, lse) and backward(dout, q, k, v, out, lse, <same options>) -> (dq, dk, dv),
in the flash_attn layout (batch, seqlen, nheads, headdim)."""
