"""Every bad input raises ValueError / TypeError (NotImplementedError for unsupported options) with a
message that names the argument and what was given. Each `match` holds the argument's name and the
offending value, so a check that raises the right type for the wrong reason fails too."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from flashattn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                       scaled_dot_product_attention)
from helpers import make_qkv


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


def qkv(b=2, sq=5, sk=6, h=4, hk=2, d=16, dtype=torch.float32):
    return make_qkv(b, sq, sk, h, hk, d, dtype, seed=0)


# ---- shapes


@pytest.mark.parametrize("which,shape", [("q", (5, 4, 16)), ("k", (2, 6, 2, 16, 1)), ("v", (16,))])
def test_wrong_rank(which, shape):
    args = dict(zip("qkv", qkv()))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"{which} must have 4 dimensions.*{re.escape(str(shape))}"):
        flash_attn_func(args["q"], args["k"], args["v"])


def test_wrong_rank_3d_hints_unsqueeze():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions.*unsqueeze\(0\)"):
        flash_attn_func(q[0], k, v)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"batch.*q has 2, k has 1"):
        flash_attn_func(q, k[:1], v)
    with pytest.raises(ValueError, match=r"batch.*v has 1"):
        flash_attn_func(q, k, v[:1])


def test_seqlen_mismatch_between_k_and_v():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"seqlen.*k 6 and v 4"):
        flash_attn_func(q, k, v[:, :4])


def test_nheads_mismatch_between_k_and_v():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"heads.*k 2 and v 1"):
        flash_attn_func(q, k, v[:, :, :1])


@pytest.mark.parametrize("which", ["k", "v"])
def test_headdim_mismatch(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which][..., :8]
    with pytest.raises(ValueError, match=rf"headdim.*q has 16.*{which} has 8"):
        flash_attn_func(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("h,hk", [(3, 2), (4, 3), (2, 4)])
def test_nheads_not_divisible(h, hk):
    q, k, v = qkv(h=h, hk=hk)
    with pytest.raises(ValueError, match=rf"nheads of q \({h}\).*nheads of k/v \({hk}\)"):
        flash_attn_func(q, k, v)


def test_zero_kv_heads():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"nheads of q \(4\).*\(0\)"):
        flash_attn_func(q, k[:, :, :0], v[:, :, :0])


@pytest.mark.parametrize("d", [4, 7, 257, 512])
def test_headdim_out_of_range(d):
    q, k, v = qkv(d=d)
    with pytest.raises(ValueError, match=rf"headdim.*between 8 and 256.*got {d}"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("d", [8, 256])
def test_headdim_at_the_limits_is_accepted(d):
    q, k, v = qkv(d=d, sq=3, sk=4)
    out = flash_attn_func(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()


# ---- dtypes and types


def test_mixed_dtypes():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"dtype.*q torch.float32, k torch.float16, v torch.float32"):
        flash_attn_func(q, k.half(), v)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.bool, torch.complex64])
def test_non_float_dtypes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"q has dtype {re.escape(str(dtype))}"):
        flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype))


@pytest.mark.parametrize("bad", [[[1.0]], np.zeros((2, 5, 4, 16), dtype=np.float32), None, 3.0],
                         ids=["list", "ndarray", "None", "float"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_tensor_inputs(which, bad):
    args = dict(zip("qkv", qkv()))
    args[which] = bad
    with pytest.raises(TypeError, match=rf"{which} must be a torch.Tensor.*got {type(bad).__name__}"):
        flash_attn_func(args["q"], args["k"], args["v"])


def test_devices_mismatch():
    # the meta device stands in for a second device on a machine without a GPU
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"one device.*q cpu, k meta, v cpu"):
        flash_attn_func(q, k.to("meta"), v)


# ---- strides


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_dim_not_contiguous(which):
    args = dict(zip("qkv", qkv()))
    args[which] = args[which].repeat_interleave(5, dim=-1)[..., ::5]   # same values, stride(-1) = 5
    assert args[which].stride(-1) == 5
    with pytest.raises(ValueError, match=r"last dimension.*contiguous.*stride"):
        flash_attn_func(args["q"], args["k"], args["v"])


def test_last_dim_not_contiguous_error_names_the_offending_input():
    # design.md: errors name the argument and what was given. Which of q, k, v was it, with which stride?
    messages = {}
    for which in "qkv":
        args = dict(zip("qkv", qkv()))
        args[which] = args[which].repeat_interleave(5, dim=-1)[..., ::5]
        with pytest.raises(ValueError) as info:
            flash_attn_func(args["q"], args["k"], args["v"])
        messages[which] = str(info.value)
        assert "5" in messages[which], f"the given stride (5) is not in the message: {messages[which]!r}"
    assert len(set(messages.values())) == 3, f"the message does not say which input is at fault: {messages}"


def test_other_strides_are_fine():
    q, k, v = qkv()
    out = flash_attn_func(q.transpose(0, 1).contiguous().transpose(0, 1), k[:, ::1], v)
    assert torch.isfinite(out).all()


# ---- options


@pytest.mark.parametrize("window", [(-2, 0), (0, -5), (1.5, 2), (1,), (1, 2, 3), "ab", None, 3, (True, 0),
                                    (torch.tensor(2), "x")],
                         ids=["left-2", "right-5", "float", "len1", "len3", "str", "None", "int", "bool", "junk"])
def test_bad_window_size(window):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"window_size.*got {re.escape(repr(window))}"):
        flash_attn_func(q, k, v, window_size=window)


def test_window_size_as_list_is_accepted():
    q, k, v = qkv()
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=[2, 1]),
                               flash_attn_func(q, k, v, window_size=(2, 1)))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1", None])
def test_dropout_out_of_range(p):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"dropout_p.*\[0, 1\).*got {re.escape(repr(p))}"):
        flash_attn_func(q, k, v, dropout_p=p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_dropout_in_range_is_accepted(p):
    q, k, v = qkv()
    out = flash_attn_func(q, k, v, dropout_p=p)
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("cap", [-1.0, -1e-6, "5", None])
def test_bad_softcap(cap):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"softcap.*>= 0.*got {re.escape(repr(cap))}"):
        flash_attn_func(q, k, v, softcap=cap)


@pytest.mark.parametrize("scale", ["0.5", True, [0.5]])
def test_bad_softmax_scale(scale):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=rf"softmax_scale.*got {re.escape(repr(scale))}"):
        flash_attn_func(q, k, v, softmax_scale=scale)


@pytest.mark.parametrize("kwargs", [dict(softcap=float("nan")), dict(softmax_scale=float("nan")),
                                    dict(softmax_scale=float("inf")), dict(softmax_scale=float("-inf"))],
                         ids=["softcap-nan", "scale-nan", "scale-inf", "scale-neg-inf"])
def test_non_finite_options_raise(kwargs):
    # accepted today, and the output is silently all NaN ("never compute something different silently")
    q, k, v = qkv()
    (name, value), = kwargs.items()
    with pytest.raises((ValueError, TypeError), match=rf"{name}.*{value}"):
        flash_attn_func(q, k, v, **kwargs)


def test_infinite_softcap_raises_or_means_no_cap():
    # softcap·tanh(s/softcap) -> s as softcap -> inf; computing inf·tanh(0) = NaN is the one wrong answer
    q, k, v = qkv()
    try:
        out = flash_attn_func(q, k, v, softcap=float("inf"))
    except (ValueError, TypeError) as e:
        assert "softcap" in str(e)
    else:
        torch.testing.assert_close(out, flash_attn_func(q, k, v))


@pytest.mark.parametrize("shape", [(3,), (5,), (2, 3), (4, 2), (1, 4, 1), (2, 4, 1), ()])
def test_alibi_slopes_wrong_shape(shape):
    q, k, v = qkv()   # batch 2, nheads 4: accepted shapes are (4,) and (2, 4)
    with pytest.raises(ValueError, match=rf"alibi_slopes.*\(4,\).*\(2, 4\).*got {re.escape(str(shape))}"):
        flash_attn_func(q, k, v, alibi_slopes=torch.rand(shape))


def test_alibi_slopes_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"alibi_slopes must be a tensor.*got list"):
        flash_attn_func(q, k, v, alibi_slopes=[0.5] * 4)


def test_alibi_slopes_on_another_device():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"alibi_slopes is on meta but q is on cpu"):
        flash_attn_func(q, k, v, alibi_slopes=torch.rand(4, device="meta"))


# ---- packed functions


@pytest.mark.parametrize("shape", [(2, 5, 2, 4, 16), (2, 5, 4, 16), (2, 5, 4, 3, 16)])
def test_qkvpacked_bad_shape(shape):
    with pytest.raises(ValueError, match=rf"qkv must have shape \(batch, seqlen, 3, nheads, headdim\).*"
                                         rf"got {re.escape(str(shape))}"):
        flash_attn_qkvpacked_func(torch.randn(shape))


def test_qkvpacked_not_a_tensor():
    with pytest.raises((TypeError, ValueError), match=r"qkv.*list"):
        flash_attn_qkvpacked_func([1.0])


@pytest.mark.parametrize("shape", [(2, 6, 3, 2, 16), (2, 6, 2, 16)])
def test_kvpacked_bad_shape(shape):
    q, _, _ = qkv()
    with pytest.raises(ValueError, match=rf"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\).*"
                                         rf"got {re.escape(str(shape))}"):
        flash_attn_kvpacked_func(q, torch.randn(shape))


# ---- SDPA-style


def sdpa_inputs(b=2, h=4, hk=4, sq=5, sk=5, d=16):
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float32, seed=1)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def test_sdpa_attn_mask_not_implemented():
    q, k, v = sdpa_inputs()
    with pytest.raises(NotImplementedError, match="attn_mask"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_sdpa_is_causal_with_different_lengths_not_implemented():
    q, k, v = sdpa_inputs(sq=3, sk=7)
    with pytest.raises(NotImplementedError, match=r"is_causal=True with seqlen_q=3 != seqlen_k=7"):
        scaled_dot_product_attention(q, k, v, is_causal=True)
    out = scaled_dot_product_attention(q, k, v, is_causal=False)   # fine without the mask
    assert out.shape == q.shape


def test_sdpa_head_mismatch_needs_enable_gqa():
    q, k, v = sdpa_inputs(h=4, hk=2)
    with pytest.raises(ValueError, match=r"query has 4 heads but key has 2.*enable_gqa=True"):
        scaled_dot_product_attention(q, k, v)
    assert scaled_dot_product_attention(q, k, v, enable_gqa=True).shape == q.shape


@pytest.mark.parametrize("which", ["query", "key", "value"])
def test_sdpa_wrong_rank_names_the_argument(which):
    args = dict(zip(("query", "key", "value"), sdpa_inputs()))
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"{which} must have 4 dimensions \(batch, nheads, seqlen, headdim\)"):
        scaled_dot_product_attention(args["query"], args["key"], args["value"])


def test_sdpa_dropout_is_applied():
    q, k, v = sdpa_inputs()
    torch.manual_seed(0)
    a = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert a.shape == q.shape and (a - scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3


def test_sdpa_non_tensor():
    _, k, v = sdpa_inputs()
    with pytest.raises(TypeError, match=r"query must be a torch.Tensor.*got list"):
        scaled_dot_product_attention([[1.0]], k, v)
