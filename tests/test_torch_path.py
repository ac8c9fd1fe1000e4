"""The PyTorch tiled backend (flashattn.backends.torch_tiled) and the public API around it, on the CPU.

Accuracy is judged with design.md's rule (helpers.check_close), forward and gradients. Cases run
either through the public API (default tiles, the custom op, the dispatch point) or straight through
the backend with small tiles (`blocks`), so that multi-block paths show at small seqlens.
"""
from __future__ import annotations

import itertools
import zlib
from typing import NamedTuple, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flashattn
from flashattn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                       scaled_dot_product_attention)
from flashattn.backends import naive, torch_tiled
from helpers import backend_attention, check_close, make_qkv, reference_results, run_and_compare

fp32, fp16, bf16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # these tests are about the torch path: an inherited FLASHATTN_BACKEND must not redirect them
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


def _slopes(kind: Optional[str], b: int, h: int, seed: int = 0) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.rand((h,) if kind == "h" else (b, h), generator=g) * 0.5 + 0.05


def _fn(blocks: Optional[Tuple[int, int]]):
    if blocks is None:
        return flash_attn_func
    return backend_attention(torch_tiled, block_q=blocks[0], block_k=blocks[1])


class Case(NamedTuple):
    id: str
    b: int = 1
    sq: int = 17
    sk: int = 17
    h: int = 2
    hk: int = 2
    d: int = 32
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None        # None, "h" (nheads,) or "bh" (batch, nheads)
    scale: Optional[float] = None
    dtype: torch.dtype = fp32
    blocks: Optional[Tuple[int, int]] = (16, 32)   # None: the public API with the default tiles


CASES = [
    Case("seqlen-1", sq=1, sk=1),
    Case("q1-k97-causal", sq=1, sk=97, causal=True),
    Case("q97-k1-causal", sq=97, sk=1, causal=True),            # all but the last row see nothing
    Case("17x17-d40", d=40),
    Case("97x97-causal-d64", sq=97, sk=97, d=64, causal=True),
    Case("128x128-causal-d96-bf16", sq=128, sk=128, d=96, causal=True, dtype=bf16),
    Case("257x257-causal-fp16-api", sq=257, sk=257, d=64, causal=True, dtype=fp16, blocks=None),
    Case("257x129-api", sq=257, sk=129, d=40, blocks=None),      # two query tiles of 256
    Case("100x600-api-window", sq=100, sk=600, d=16, window=(300, 40), blocks=None),  # two key tiles of 512
    Case("17x97-causal", sq=17, sk=97, causal=True),
    Case("97x17-causal-empty-rows", sq=97, sk=17, causal=True),
    Case("97x17", sq=97, sk=17),
    Case("window-8-3", sq=65, sk=65, window=(8, 3)),
    Case("window-0-0-sq<sk", sq=40, sk=50, window=(0, 0)),
    Case("window-left-only", sq=70, sk=50, window=(10, -1)),
    Case("window-right-only", sq=50, sk=70, window=(-1, 6)),
    Case("causal+window", sq=80, sk=100, causal=True, window=(12, 7)),
    Case("causal+window-sq>sk", sq=100, sk=40, causal=True, window=(5, -1)),
    Case("gqa-6-2-causal", sq=33, sk=45, h=6, hk=2, causal=True),
    Case("mqa-4-1", sq=50, sk=50, h=4, hk=1),
    Case("mqa-4-1-bf16-window", sq=50, sk=61, h=4, hk=1, window=(7, 2), dtype=bf16),
    Case("softcap", sq=40, sk=60, softcap=5.0, scale=1.0),      # scale 1 so that the cap bites
    Case("softcap-causal-gqa-bf16", sq=45, sk=45, h=4, hk=2, causal=True, softcap=3.0, scale=0.5, dtype=bf16),
    Case("softcap-window-fp16", sq=45, sk=52, softcap=4.0, scale=0.7, window=(9, 9), dtype=fp16),
    Case("alibi-h", sq=50, sk=50, alibi="h"),
    Case("alibi-bh-causal-gqa", b=2, sq=37, sk=53, h=4, hk=2, causal=True, alibi="bh"),
    Case("alibi-softcap-window-fp16", sq=41, sk=41, alibi="h", softcap=5.0, scale=1.0, window=(6, 0), dtype=fp16),
    Case("alibi-api-bf16", sq=64, sk=80, alibi="bh", b=2, causal=True, dtype=bf16, blocks=None),
    Case("d8", d=8, sq=30, sk=30, causal=True),
    Case("d256-fp16", d=256, sq=33, sk=33, dtype=fp16),
    Case("batch-3", b=3, sq=20, sk=31, h=3, hk=1, causal=True),
    Case("scale-0.3", sq=30, sk=40, scale=0.3),
    Case("blocks-1x1", sq=5, sk=7, causal=True, blocks=(1, 1)),
    Case("blocks-7x5", sq=30, sk=23, window=(4, 4), blocks=(7, 5)),
    Case("blocks-bigger-than-seqlen", sq=9, sk=11, causal=True, blocks=(64, 128)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case):
    seed = zlib.crc32(case.id.encode()) % 1000   # stable across runs (str hash() is not)
    q, k, v = make_qkv(case.b, case.sq, case.sk, case.h, case.hk, case.d, case.dtype, seed=seed)
    run_and_compare(_fn(case.blocks), q, k, v, causal=case.causal, window_size=case.window,
                    softmax_scale=case.scale, softcap=case.softcap, alibi_slopes=_slopes(case.alibi, case.b, case.h),
                    name=case.id)


# ---- sweeps (a slice of the cartesian product runs by default; the whole of it with -m slow)

ODD_SEQLENS = [1, 17, 97, 128, 257]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", list(itertools.product(ODD_SEQLENS, ODD_SEQLENS)))
def test_seqlen_sweep(sq, sk, causal):
    q, k, v = make_qkv(1, sq, sk, 2, 1, 32, fp32, seed=sq * 1000 + sk)
    run_and_compare(_fn((32, 64)), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", [fp32, bf16, fp16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("d", [8, 40, 64, 96, 128, 256])
def test_headdim_sweep(d, dtype):
    q, k, v = make_qkv(1, 33, 47, 2, 1, d, dtype, seed=d)
    run_and_compare(_fn((16, 32)), q, k, v, causal=True)


OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(9, 4)),
    "softcap": dict(softcap=4.0, softmax_scale=1.0),
    "alibi": dict(alibi_slopes="h"),
    "everything": dict(causal=True, window_size=(20, -1), softcap=6.0, alibi_slopes="bh"),
}


@pytest.mark.parametrize("dtype", [fp32, bf16, fp16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_option_dtype_sweep(option, dtype, heads):
    opts = dict(OPTIONS[option])
    h, hk = heads
    if "alibi_slopes" in opts:
        opts["alibi_slopes"] = _slopes(opts["alibi_slopes"], 2, h)
    q, k, v = make_qkv(2, 45, 61, h, hk, 24, dtype, seed=len(option))
    run_and_compare(_fn((16, 16)), q, k, v, **opts)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [fp32, bf16, fp16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [8, 40, 64, 96, 128, 256])
@pytest.mark.parametrize("sq,sk", list(itertools.product(ODD_SEQLENS, ODD_SEQLENS)))
def test_full_sweep(sq, sk, d, causal, dtype):
    q, k, v = make_qkv(1, sq, sk, 4, 2, d, dtype, seed=sq + sk + d)
    run_and_compare(_fn((64, 64)), q, k, v, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("sq,sk", [(1023, 1025), (1025, 1025)])
def test_long_through_api(sq, sk):
    q, k, v = make_qkv(1, sq, sk, 2, 1, 64, bf16, seed=1)
    run_and_compare(flash_attn_func, q, k, v, causal=True, window_size=(300, -1))


# ---- the online-softmax pieces (also used by `flashattn explain`)


def test_online_softmax_steps_equal_one_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 10, generator=g) * 3
    s[0, 1] = float("-inf")                      # a row that sees nothing
    s[1, 2, :6] = float("-inf")                  # a row that sees nothing in the first block only
    v = torch.randn(2, 10, 5, generator=g)
    s_before = s.clone()
    state = torch_tiled.init_state((2, 3), 5, "cpu")
    for lo, hi in [(0, 4), (4, 6), (6, 10)]:
        step = torch_tiled.online_softmax_step(state, s[..., lo:hi], v[:, lo:hi])
        assert torch.isfinite(step.alpha).all() and torch.isfinite(step.p).all()
        state = step.state
    out, lse = torch_tiled.finish(state)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)    # torch gives NaN for the empty row
    torch.testing.assert_close(out, torch.einsum("bij,bjd->bid", p, v))
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1))
    assert out[0, 1].eq(0).all() and torch.isneginf(lse[0, 1])
    assert torch.equal(s, s_before), "the scores were overwritten without overwrite_scores=True"


# ---- packed inputs


@pytest.mark.parametrize("causal", [False, True])
def test_qkvpacked_gradient_flows_into_packed_tensor(causal):
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 37, 3, 4, 32, generator=g).requires_grad_()
    out, lse, _ = flash_attn_qkvpacked_func(qkv, causal=causal, return_attn_probs=True)
    dout = torch.randn(out.shape, generator=g)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert dqkv.shape == qkv.shape
    q, k, v = qkv.detach().unbind(2)
    ref = reference_results(q, k, v, causal=causal, dout=dout)
    pt = reference_results(q, k, v, causal=causal, dout=dout, compute_dtype=None)
    check_close("out", out, ref["out"], pt["out"])
    check_close("lse", lse, ref["lse"], pt["lse"])
    for i, name in enumerate(("dq", "dk", "dv")):
        check_close(name, dqkv[:, :, i], ref[name], pt[name])


def test_kvpacked_gqa_gradient_flows_into_packed_tensor():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 29, 6, 16, generator=g).requires_grad_()
    kv = torch.randn(2, 41, 2, 2, 16, generator=g).requires_grad_()
    out = flash_attn_kvpacked_func(q, kv, causal=True, window_size=(10, -1), softcap=3.0)
    dout = torch.randn(out.shape, generator=g)
    dq, dkv = torch.autograd.grad(out, (q, kv), dout)
    assert dkv.shape == kv.shape
    k, v = kv.detach().unbind(2)
    opts = dict(causal=True, window_size=(10, -1), softcap=3.0, dout=dout)
    ref = reference_results(q.detach(), k, v, **opts)
    pt = reference_results(q.detach(), k, v, compute_dtype=None, **opts)
    check_close("out", out, ref["out"], pt["out"])
    check_close("dq", dq, ref["dq"], pt["dq"])
    check_close("dk", dkv[:, :, 0], ref["dk"], pt["dk"])
    check_close("dv", dkv[:, :, 1], ref["dv"], pt["dv"])


# ---- the SDPA-style function against torch's own


@pytest.mark.parametrize("sq,sk,h,hk,is_causal,scale", [
    (33, 33, 4, 4, False, None),
    (33, 33, 4, 4, True, None),
    (20, 57, 2, 2, False, 0.3),
    (57, 20, 2, 2, False, None),
    (40, 40, 6, 2, True, None),       # enable_gqa
    (40, 64, 4, 1, False, 1.5),       # MQA with a scale
])
def test_sdpa_matches_torch(sq, sk, h, hk, is_causal, scale):
    g = torch.Generator().manual_seed(sq + sk)
    query = torch.randn(2, h, sq, 32, generator=g).requires_grad_()
    key = torch.randn(2, hk, sk, 32, generator=g).requires_grad_()
    value = torch.randn(2, hk, sk, 32, generator=g).requires_grad_()
    gqa = h != hk
    out = scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    assert out.shape == (2, h, sq, 32) and out.dtype == query.dtype
    dout = torch.randn(out.shape, generator=g)
    ours = (out, *torch.autograd.grad(out, (query, key, value), dout))

    def torch_sdpa(dtype):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (query, key, value)]
        o = F.scaled_dot_product_attention(*leaves, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        return (o, *torch.autograd.grad(o, leaves, dout.to(dtype)))

    ref, pt = torch_sdpa(torch.float64), torch_sdpa(torch.float32)
    for name, a, r, p in zip(("out", "dq", "dk", "dv"), ours, ref, pt):
        check_close(name, a, r, p)


# ---- strides, views and the inputs themselves


def test_non_contiguous_slices_of_packed_qkv():
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(2, 45, 3, 4, 32, generator=g)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    before = qkv.clone()
    run_and_compare(flash_attn_func, q, k, v, causal=True)
    run_and_compare(_fn((16, 16)), q, k, v, causal=True)
    assert torch.equal(qkv, before), "the inputs were written to"


def test_non_contiguous_transposed_and_strided_views():
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 39, 32, generator=g).transpose(1, 2)               # (b, s, h, d) view of (b, h, s, d)
    k = torch.randn(2, 2, 100, 32, generator=g).transpose(1, 2)[:, ::2]      # every other position
    v = torch.randn(2, 50, 2, 64, generator=g)[..., 16:48]                   # a slice of a wider headdim
    assert not any(x.is_contiguous() for x in (q, k, v)) and all(x.stride(-1) == 1 for x in (q, k, v))
    run_and_compare(flash_attn_func, q, k, v, window_size=(7, 3))


def test_backward_is_deterministic():
    q, k, v = make_qkv(2, 70, 90, 4, 2, 32, fp32, requires_grad=True, seed=7)
    dout = torch.randn(2, 70, 4, 32)
    g1 = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    g2 = torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_return_attn_probs():
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, fp32, seed=8)
    out = flash_attn_func(q, k, v)
    assert isinstance(out, torch.Tensor)
    res = flash_attn_func(q, k, v, return_attn_probs=True)
    assert len(res) == 3 and res[2] is None and torch.equal(res[0], out)


def test_float64_inputs_get_float64_accuracy():
    q, k, v = make_qkv(1, 20, 30, 2, 2, 16, torch.float64, seed=9)
    run_and_compare(flash_attn_func, q, k, v, causal=True)


# ---- empty sequences


@pytest.mark.parametrize("b,sq,sk", [(2, 0, 5), (2, 0, 0), (0, 4, 5), (0, 0, 0), (2, 3, 0)])
def test_empty(b, sq, sk):
    q, k, v = make_qkv(b, sq, sk, 4, 2, 16, fp32, requires_grad=True, seed=10)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (b, sq, 4, 16) and out.dtype == fp32
    assert lse.shape == (b, 4, sq) and lse.dtype == fp32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out == 0).all() and torch.isneginf(lse).all()    # vacuous when empty; the rule when sk = 0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()


def test_no_keys_gives_zeros_and_neg_inf():
    q, k, v = make_qkv(2, 6, 0, 2, 1, 8, bf16, seed=11)
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == bf16 and (out == 0).all()
    assert lse.shape == (2, 2, 6) and torch.isneginf(lse).all()


@pytest.mark.parametrize("blocks", [None, (4, 4)])
def test_all_rows_masked_out_gives_zeros_and_finite_grads(blocks):
    # window (0, 0) with seqlen_q > seqlen_k: only the last seqlen_k rows see their diagonal key
    q, k, v = make_qkv(1, 12, 3, 2, 2, 8, fp32, seed=12)
    res = run_and_compare(_fn(blocks), q, k, v, window_size=(0, 0))
    assert (res["out"][:, :9] == 0).all() and torch.isneginf(res["lse"][..., :9]).all()
    assert (res["dq"][:, :9] == 0).all()


# ---- the custom op: opcheck, torch.compile


def _opcheck_args():
    q, k, v = make_qkv(2, 19, 27, 4, 2, 16, fp32, seed=13)
    alibi = _slopes("h", 2, 4)
    return {
        "plain": (q, k, v, 0.25, -1, -1, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch"),
        "mha-causal": (q, k[:, :, [0, 0, 1, 1]].contiguous(), v[:, :, [0, 0, 1, 1]].contiguous(),
                       0.25, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch"),
        "gqa-window-softcap-alibi-grad": (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(),
                                          0.4, 5, 2, 3.0, alibi, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch"),
        "reference-backend": (q, k, v, 0.25, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "reference"),
    }


@pytest.mark.parametrize("which", ["plain", "mha-causal", "gqa-window-softcap-alibi-grad", "reference-backend"])
def test_opcheck_fwd(which):
    torch.library.opcheck(torch.ops.flashattn.fwd.default, _opcheck_args()[which])


def _bwd_args(q, k, v):
    out, lse = torch.ops.flashattn.fwd(q, k, v, 0.25, -1, -1, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(14))
    return (dout, q, k, v, out, lse, 0.25, -1, -1, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "torch")


@pytest.mark.parametrize("hk", [1, 2])
def test_opcheck_bwd(hk):
    q, k, v = make_qkv(1, 17, 23, 4, hk, 16, fp32, seed=14)
    torch.library.opcheck(torch.ops.flashattn.bwd.default, _bwd_args(q, k, v))


def test_opcheck_bwd_with_transposed_inputs():
    # what the SDPA-style API saves for backward: (b, s, h, d) views of (b, h, s, d) tensors
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).transpose(1, 2) for n in (17, 23, 23))
    torch.library.opcheck(torch.ops.flashattn.bwd.default, _bwd_args(q, k, v))


def _compile_works() -> bool:
    try:
        f = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
        x = torch.randn(8)
        return torch.allclose(f(x), torch.sin(x) * 2 + 1)
    except Exception:   # no C++ toolchain for inductor, or similar: not what this test is about
        return False


@pytest.mark.parametrize("api", ["flash_attn_func", "sdpa"])
def test_torch_compile_fullgraph_matches_eager(api):
    if not _compile_works():
        pytest.skip("torch.compile does not work on this machine (CPU toolchain)")
    torch._dynamo.reset()
    if api == "flash_attn_func":
        def f(q, k, v):
            return flash_attn_func(q, k, v, causal=True, window_size=(8, -1)) * 2.0

        q, k, v = make_qkv(1, 21, 30, 4, 2, 16, fp32, requires_grad=True, seed=15)
    else:
        def f(q, k, v):
            return scaled_dot_product_attention(q, k, v, enable_gqa=True) * 2.0

        q, k, v = (x.detach().transpose(1, 2).requires_grad_()
                   for x in make_qkv(1, 21, 30, 4, 2, 16, fp32, seed=15))
    compiled = torch.compile(f, fullgraph=True)
    out_c = compiled(q, k, v)
    out_e = f(q, k, v)
    torch.testing.assert_close(out_c, out_e)
    dout = torch.randn_like(out_e)
    for a, b in zip(torch.autograd.grad(out_c, (q, k, v), dout), torch.autograd.grad(out_e, (q, k, v), dout)):
        torch.testing.assert_close(a, b)


# ---- the dispatch point


def _spy(monkeypatch):
    calls = {"torch": 0, "reference": 0}
    for name, mod in (("torch", torch_tiled), ("reference", naive)):
        orig = mod.forward

        def spy(*a, _orig=orig, _name=name, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(mod, "forward", spy)
    return calls


@pytest.mark.parametrize("env,expected", [(None, "torch"), ("torch", "torch"), ("reference", "reference"),
                                          (" Reference ", "reference")])
def test_backend_choice(monkeypatch, env, expected):
    if env is not None:
        monkeypatch.setenv("FLASHATTN_BACKEND", env)
    calls = _spy(monkeypatch)
    q, k, v = make_qkv(1, 10, 12, 2, 2, 8, fp32, seed=16)
    assert flashattn.choose_backend(q) == expected
    run_and_compare(flash_attn_func, q, k, v, causal=True)
    assert calls[expected] == 1 and sum(calls.values()) == 1, calls


def test_reference_backend_is_float64_exact(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "reference")
    q, k, v = make_qkv(1, 10, 12, 2, 1, 8, torch.float64, seed=17)
    out, lse, _ = flash_attn_func(q, k, v, softcap=2.0, return_attn_probs=True)
    exp_out, exp_lse = flashattn.attention_ref(q, k, v, softcap=2.0)
    torch.testing.assert_close(out, exp_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-12, atol=1e-12)   # float64 inputs: float64 lse


@pytest.mark.parametrize("value", ["bogus", "cuda", "naive"])
def test_bogus_backend_raises(monkeypatch, value):
    monkeypatch.setenv("FLASHATTN_BACKEND", value)
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, fp32, seed=18)
    with pytest.raises(ValueError, match=f"FLASHATTN_BACKEND.*{value}"):
        flash_attn_func(q, k, v)


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_qkv(1, 4, 4, 1, 1, 8, fp32, seed=19)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        flash_attn_func(q, k, v)


# ---- memory: nothing of size seqlen_q × seqlen_k


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def test_memory_detector_catches_the_naive_path():
    # the detector below must be able to fail: the reference materializes sq × sk scores
    n = 512
    q, k, v = make_qkv(1, n, n, 1, 1, 64, fp32, seed=20)
    with _LargestTensor() as probe:
        naive.forward(q, k, v, 0.125)
    assert probe.numel >= n * n


def test_torch_path_never_materializes_seqlen_squared():
    n = 4096
    q, k, v = make_qkv(1, n, n, 1, 1, 64, fp32, seed=21)
    limit = n * n // 16    # the default tiles are 256 × 512 = n² / 128 here
    with _LargestTensor() as probe:
        out, lse = torch_tiled.forward(q, k, v, 0.125, -1, 0)
    assert probe.numel <= limit, f"forward made a tensor of {probe.numel} elements ({probe.op}); n² = {n * n}"
    dout = torch.randn_like(out)
    with _LargestTensor() as probe:
        torch_tiled.backward(dout, q, k, v, out, lse, 0.125, -1, 0)
    assert probe.numel <= limit, f"backward made a tensor of {probe.numel} elements ({probe.op}); n² = {n * n}"


@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(3, 2), softcap=3.0),
                                  dict(alibi_slopes="rand")], ids=["causal", "window-softcap", "alibi"])
def test_gradcheck_float64(opts):
    """The hand-written backward against finite differences (float64 runs the torch path in float64)."""
    q, k, v = make_qkv(1, 9, 11, 2, 1, 8, torch.float64, requires_grad=True, seed=21)
    if opts.get("alibi_slopes") == "rand":
        opts = dict(alibi_slopes=torch.rand(2, dtype=torch.float64).float())
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, **opts), (q, k, v))
