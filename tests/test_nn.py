"""flashattn.padding and flashattn.nn: unpad/pad, the drop-in MultiheadAttention against torch's, the
SelfAttention block against a plain PyTorch reference written here, and torch.compile / torch.export.

Everything runs in float32 on the CPU, compared at ~1e-5 with torch's module (same float32 math, other
order) or with the float64 reference.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from flashattn.nn import MultiheadAttention, RotaryEmbedding, SelfAttention, apply_rotary
from flashattn.padding import pad_input, unpad_input

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# keep-masks (1 = token) of 3 sequences of length 7, padding at different places
MASKS = {
    "right": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]],
    "left": [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]],
    "inner": [[1, 0, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0, 1]],
    "empty-row": [[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]],
}


def keep_mask(name):
    return torch.tensor(MASKS[name], dtype=torch.bool)


# ---- padding


@pytest.mark.parametrize("name", list(MASKS))
def test_unpad_pad_round_trip(name):
    keep = keep_mask(name)
    h = torch.randn(3, 7, 2, 5, generator=_gen(0))
    unpadded, indices, cu_seqlens, max_seqlen = unpad_input(h, keep)
    lengths = keep.sum(1)
    assert unpadded.shape == (int(lengths.sum()), 2, 5)
    assert torch.equal(unpadded, h[keep])   # boolean indexing is row-major: sequence by sequence, in order
    assert indices.dtype == torch.int64 and torch.equal(indices, keep.flatten().nonzero().flatten())
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, *lengths.cumsum(0).tolist()]
    assert isinstance(max_seqlen, int) and max_seqlen == int(lengths.max())
    assert torch.equal(pad_input(unpadded, indices, 3, 7), h * keep[:, :, None, None])


@pytest.mark.parametrize("mask", [torch.tensor(MASKS["inner"]), torch.tensor(MASKS["inner"]).float()],
                         ids=["int64", "float32"])
def test_unpad_accepts_01_masks(mask):
    h = torch.randn(3, 7, 4, generator=_gen(1))
    ours, ref = unpad_input(h, mask), unpad_input(h, mask.bool())
    assert all(torch.equal(a, b) for a, b in zip(ours[:3], ref[:3])) and ours[3] == ref[3]


def test_unpad_pad_gradients():
    keep = keep_mask("inner")
    h = torch.randn(3, 7, 4, generator=_gen(2), dtype=torch.float64, requires_grad=True)

    def f(h):
        unpadded, indices, _, _ = unpad_input(h, keep)
        return pad_input(unpadded.sin(), indices, 3, 7)

    assert torch.autograd.gradcheck(f, (h,))
    # padding receives no gradient, kept tokens all of it
    (g,) = torch.autograd.grad(unpad_input(h, keep)[0].sum(), h)
    assert torch.equal(g, keep[:, :, None].double().expand_as(h))


def test_padding_errors():
    h = torch.randn(3, 7, 4)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seqlen\) = \(3, 7\).*\(3, 6\)"):
        unpad_input(h, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attention_mask must hold only 1 \(keep\) and 0.*2"):
        unpad_input(h, torch.full((3, 7), 2))
    with pytest.raises(ValueError, match=r"additive mask.*mask == 0"):
        unpad_input(h, torch.zeros(3, 7).masked_fill(~keep_mask("left"), float("-inf")))
    with pytest.raises(TypeError, match=r"attention_mask must be a torch.Tensor.*list"):
        unpad_input(h, MASKS["left"])
    with pytest.raises(TypeError, match=r"attention_mask must be bool.*complex"):
        unpad_input(h, torch.ones(3, 7, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"hidden_states must be a tensor of shape \(batch, seqlen, ...\)"):
        unpad_input(torch.randn(7), torch.ones(7, dtype=torch.bool))
    unpadded, indices, _, _ = unpad_input(h, keep_mask("right"))
    with pytest.raises(ValueError, match=r"hidden_states has 14 tokens but indices has 13"):
        pad_input(unpadded, indices[:-1], 3, 7)
    with pytest.raises(TypeError, match=r"indices must be a 1-D integer tensor.*torch.float32"):
        pad_input(unpadded, indices.float(), 3, 7)


# ---- MultiheadAttention against torch.nn.MultiheadAttention


def mha_pair(embed_dim=32, num_heads=2, seed=0, **kwargs):
    """(torch's module, ours) with the same weights, loaded through load_state_dict."""
    torch.manual_seed(seed)
    theirs = torch.nn.MultiheadAttention(embed_dim, num_heads, **kwargs)
    if kwargs.get("bias", True):   # torch zeroes the biases at init: make them count
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    ours = MultiheadAttention(embed_dim, num_heads, **kwargs)
    ours.load_state_dict(theirs.state_dict())   # strict: the same keys and shapes
    assert set(ours.state_dict()) == set(theirs.state_dict())
    return theirs, ours


def mha_inputs(batch, seqlen_q, seqlen_k, embed_dim=32, kdim=None, vdim=None, batch_first=False, seed=0):
    g = _gen(seed)

    def x(s, d):
        t = torch.randn(batch, s, d, generator=g)
        return (t if batch_first else t.transpose(0, 1).contiguous()).requires_grad_()

    return x(seqlen_q, embed_dim), x(seqlen_k, kdim or embed_dim), x(seqlen_k, vdim or embed_dim)


def causal_attn_mask(seqlen_q, seqlen_k):
    """torch's bool attn_mask (True = masked) for flashattn's bottom-right causal: query i sees keys j <= i + S - L."""
    return torch.ones(seqlen_q, seqlen_k, dtype=torch.bool).triu(seqlen_k - seqlen_q + 1)


def grads(out, module, inputs, dout):
    """Gradients of <out, dout> w.r.t. the inputs and every parameter (by name)."""
    names, params = zip(*module.named_parameters())
    gs = torch.autograd.grad(out, (*inputs, *params), dout)
    return dict(zip(("query", "key", "value", *names), gs))


def assert_same_grads(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], **TOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("kvdim", [None, (24, 40)], ids=["same-dims", "kdim-vdim"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(9, 9), (5, 11)], ids=["L=S", "L<S"])
def test_mha_matches_torch(batch_first, kvdim, causal, seqlens):
    kdim, vdim = kvdim or (None, None)
    theirs, ours = mha_pair(kdim=kdim, vdim=vdim, batch_first=batch_first)
    L, S = seqlens
    inputs = mha_inputs(2, L, S, kdim=kdim, vdim=vdim, batch_first=batch_first)
    out, weights = ours(*inputs, is_causal=causal)
    assert weights is None
    mask = causal_attn_mask(L, S) if causal else None
    ref, _ = theirs(*inputs, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn(ref.shape, generator=_gen(1))
    assert_same_grads(grads(out, ours, inputs, dout), grads(ref, theirs, inputs, dout))


def test_mha_self_attention_without_bias_and_unbatched():
    theirs, ours = mha_pair(bias=False)
    x = torch.randn(6, 32, generator=_gen(2))   # (L, E): torch's unbatched layout
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x, need_weights=False)[0], **TOL)
    # and the state dict loads the other way too
    back = torch.nn.MultiheadAttention(32, 2, bias=False)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x, x, x, need_weights=False)[0], ours(x, x, x)[0], **TOL)


def _valid_rows(kpm, seqlen_q, causal):
    """(N, L) bool: the query rows that see at least one key that key_padding_mask (True = ignore) keeps."""
    seqlen_k = kpm.shape[1]
    sees = ~causal_attn_mask(seqlen_q, seqlen_k) if causal else torch.ones(seqlen_q, seqlen_k, dtype=torch.bool)
    return (sees[None] & ~kpm[:, None, :]).any(-1)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq-first", "batch-first"])
@pytest.mark.parametrize("pattern", ["right", "inner"])
def test_mha_key_padding_mask_matches_torch(batch_first, pattern):
    theirs, ours = mha_pair(kdim=24, vdim=40, batch_first=batch_first)
    kpm = ~keep_mask(pattern)   # torch's convention: True = ignore
    inputs = mha_inputs(3, 5, 7, kdim=24, vdim=40, batch_first=batch_first, seed=3)
    out, _ = ours(*inputs, key_padding_mask=kpm)
    ref, _ = theirs(*inputs, key_padding_mask=kpm, need_weights=False)
    torch.testing.assert_close(out, ref, **TOL)
    dout = torch.randn(ref.shape, generator=_gen(4))
    assert_same_grads(grads(out, ours, inputs, dout), grads(ref, theirs, inputs, dout))


@pytest.mark.parametrize("seqlens", [(7, 7), (4, 7)], ids=["L=S", "L<S"])
def test_mha_causal_with_left_padding_matches_torch(seqlens):
    L, S = seqlens
    theirs, ours = mha_pair(batch_first=True)
    kpm = ~keep_mask("left")
    inputs = mha_inputs(3, L, S, batch_first=True, seed=5)
    out, _ = ours(*inputs, key_padding_mask=kpm, is_causal=True)
    ref, _ = theirs(*inputs, key_padding_mask=kpm, attn_mask=causal_attn_mask(L, S), need_weights=False)
    rows = _valid_rows(kpm, L, causal=True)
    assert not rows.all()   # some queries see no key: torch gives NaN there, we the attention output 0
    torch.testing.assert_close(out[rows], ref[rows], **TOL)
    torch.testing.assert_close(out[~rows], ours.out_proj.bias.expand_as(out[~rows]), **TOL)


def test_mha_fully_masked_batch_element_gives_bias():
    theirs, ours = mha_pair(batch_first=True)
    kpm = ~keep_mask("empty-row")
    inputs = [x.detach() for x in mha_inputs(3, 5, 7, batch_first=True, seed=6)]
    out, _ = ours(*inputs, key_padding_mask=kpm)
    ref, _ = theirs(*inputs, key_padding_mask=kpm, need_weights=False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], ours.out_proj.bias.expand(5, -1), **TOL)
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], **TOL)


def test_mha_all_false_key_padding_mask_is_no_mask():
    _, ours = mha_pair(batch_first=True)
    inputs = mha_inputs(2, 5, 7, batch_first=True, seed=7)
    a, _ = ours(*inputs, key_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    torch.testing.assert_close(a, ours(*inputs)[0], rtol=0, atol=0)


def test_mha_dropout_only_in_training():
    theirs, ours = mha_pair(dropout=0.3, batch_first=True)
    inputs = mha_inputs(2, 5, 5, batch_first=True, seed=8)
    torch.manual_seed(3)
    a = ours(*inputs)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(ours(*inputs)[0], a, rtol=0, atol=0)   # reproducible under the seed
    ours.eval(), theirs.eval()
    assert (ours(*inputs)[0] - a).abs().max() > 1e-3                   # and really dropped something
    torch.testing.assert_close(ours(*inputs)[0], theirs(*inputs, need_weights=False)[0], **TOL)


def test_mha_errors():
    _, ours = mha_pair(batch_first=True)
    q, k, v = mha_inputs(2, 5, 7, batch_first=True)
    with pytest.raises(ValueError, match=r"need_weights=True.*never materializes.*need_weights=False"):
        ours(q, k, v, need_weights=True)
    with pytest.raises(NotImplementedError, match=r"attn_mask is not supported.*is_causal=True"):
        ours(q, k, v, attn_mask=causal_attn_mask(5, 7))
    for option in ("add_bias_kv", "add_zero_attn"):
        with pytest.raises(NotImplementedError, match=rf"{option}=True"):
            MultiheadAttention(32, 2, **{option: True})
    with pytest.raises(ValueError, match=r"embed_dim must be a positive multiple of num_heads.*30.*4"):
        MultiheadAttention(30, 4)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a bool tensor.*torch.float32.*mask != 0"):
        ours(q, k, v, key_padding_mask=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(N, S\) = \(2, 7\), got \(2, 5\)"):
        ours(q, k, v, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"key must have shape \(N, S, features\) with last dimension 32.*"
                                         r"\(2, 7, 16\)"):
        ours(q, k[..., :16], v)
    with pytest.raises(NotImplementedError, match=r"is_causal=True with a key_padding_mask.*Left-pad"):
        ours(q, k, v, key_padding_mask=~keep_mask("right")[:2], is_causal=True)


# ---- SelfAttention against a plain PyTorch reference


def reference_self_attention(m: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """One sequence x (n, dim) -> (n, dim), plain math in x's dtype: explicit rotary (as a complex
    rotation of the pairs (i, i + head_dim/2)), repeated kv heads, softmax over a dense masked score matrix."""
    n, h, hk, d = x.shape[0], m.n_heads, m.n_kv_heads, m.head_dim
    q = m.q_proj(x).view(n, h, d).transpose(0, 1)    # (h, n, d)
    k = m.k_proj(x).view(n, hk, d).transpose(0, 1)   # (hk, n, d)
    v = m.v_proj(x).view(n, hk, d).transpose(0, 1)
    if m.rotary is not None:
        freq = m.rotary.base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        turn = torch.polar(torch.ones(n, d // 2, dtype=torch.float64), torch.arange(n)[:, None] * freq)

        def rotate(t):
            z = torch.complex(t[..., : d // 2].double(), t[..., d // 2:].double()) * turn
            return torch.cat((z.real, z.imag), dim=-1).to(t.dtype)

        q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(h // hk, dim=0), v.repeat_interleave(h // hk, dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if m.causal:
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(dim=-1) @ v                 # (h, n, d)
    return m.out_proj(out.transpose(0, 1).reshape(n, h * d))


def self_attention_pair(seed=0, **kwargs):
    """(ours in float32, a float64 copy for the reference)."""
    torch.manual_seed(seed)
    m = SelfAttention(**{"dim": 64, "n_heads": 4, **kwargs})
    if kwargs.get("bias"):
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.normal_()
    return m, copy.deepcopy(m).double()


def param_grads(m):
    return {name: p.grad for name, p in m.named_parameters()}


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rotary", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_self_attention_matches_reference(n_kv_heads, rotary, causal):
    m, m64 = self_attention_pair(n_kv_heads=n_kv_heads, rotary=rotary, causal=causal, bias=not causal)
    x = torch.randn(2, 11, 64, generator=_gen(9), requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = m(x)
    ref = torch.stack([reference_self_attention(m64, x64[b]) for b in range(2)])
    torch.testing.assert_close(out, ref.float(), **TOL)
    dout = torch.randn(out.shape, generator=_gen(10))
    out.backward(dout)
    ref.backward(dout.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), **TOL)
    ours, theirs = param_grads(m), param_grads(m64)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].float(), **TOL, msg=lambda s: f"grad of {name}: {s}")


@pytest.mark.parametrize("pattern", list(MASKS))
def test_self_attention_with_padding_matches_reference(pattern):
    """Each sequence is its kept tokens, in order, with rotary positions 0, 1, ...; padded outputs are 0."""
    keep = keep_mask(pattern)
    m, m64 = self_attention_pair(n_kv_heads=2, seed=1)
    x = torch.randn(3, 7, 64, generator=_gen(11), requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    out = m(x, attention_mask=keep.long())   # 0/1 integers, as tokenizers return them
    assert (out[~keep] == 0).all()
    dout = torch.randn(out.shape, generator=_gen(12))
    out.backward(dout)
    for b in range(3):
        if keep[b].any():
            ref = reference_self_attention(m64, x64[b][keep[b]])
            torch.testing.assert_close(out[b][keep[b]], ref.float(), **TOL)
            ref.backward(dout[b][keep[b]].double())
    torch.testing.assert_close(x.grad, x64.grad.float(), **TOL)
    ours, theirs = param_grads(m), param_grads(m64)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name].float(), **TOL, msg=lambda s: f"grad of {name}: {s}")


def test_self_attention_all_ones_mask_is_no_mask():
    m, _ = self_attention_pair()
    x = torch.randn(2, 7, 64, generator=_gen(13))
    torch.testing.assert_close(m(x, attention_mask=torch.ones(2, 7)), m(x), rtol=0, atol=0)


def test_rotary_tables_past_the_cache_and_relative_positions():
    rope = RotaryEmbedding(16, max_seqlen=8)
    cos, sin = rope(20)   # computed on the fly past the 8 cached positions
    assert cos.shape == (20, 8) and torch.equal(cos[:8], rope(8)[0]) and torch.equal(sin[:8], rope(8)[1])
    # rotary scores depend on the distance of the positions only: <R_a q, R_b k> = <R_(a+t) q, R_(b+t) k>
    q, k = torch.randn(2, 1, 16, generator=_gen(14)).unbind(0)

    def score(a, b):
        return (apply_rotary(q, cos[a:a + 1], sin[a:a + 1]) * apply_rotary(k, cos[b:b + 1], sin[b:b + 1])).sum()

    torch.testing.assert_close(score(3, 1), score(17, 15), **TOL)


def test_self_attention_errors():
    with pytest.raises(ValueError, match=r"dim must be a positive multiple of n_heads.*dim=60, n_heads=8"):
        SelfAttention(60, 8)
    with pytest.raises(ValueError, match=r"n_heads \(8\) must be a multiple of n_kv_heads \(3\)"):
        SelfAttention(64, 8, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"rotary embeddings need an even head_dim, got 9"):
        SelfAttention(72, 8)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seqlen\) = \(2, 7\)"):
        SelfAttention(64, 4)(torch.randn(2, 7, 64), attention_mask=torch.ones(2, 6))


# ---- torch.compile and torch.export


class TinyBlock(torch.nn.Module):
    """A pre-norm transformer block: both attention modules, then an MLP."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_heads=4, n_kv_heads=2)
        self.mha = MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        x = x + self.mha(h, h, h, is_causal=True)[0]
        return x + self.mlp(x)


def _inductor_works() -> bool:
    try:
        f = torch.compile(lambda t: torch.sin(t) * 2 + 1, fullgraph=True)
        t = torch.randn(8)
        return torch.allclose(f(t), torch.sin(t) * 2 + 1)
    except Exception:   # no C++ toolchain for inductor: not what these tests are about
        return False


def test_compile_fullgraph_matches_eager():
    if not _inductor_works():
        pytest.skip("torch.compile's inductor backend does not work on this machine (C++ toolchain)")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyBlock()
    x = torch.randn(2, 9, 32, generator=_gen(15), requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)   # fullgraph: a graph break fails the test
    out_c, out_e = compiled(x), model(x)
    torch.testing.assert_close(out_c, out_e, **TOL)
    params = list(model.parameters())
    dout = torch.randn(out_e.shape, generator=_gen(16))
    for a, b in zip(torch.autograd.grad(out_c, [x, *params], dout), torch.autograd.grad(out_e, [x, *params], dout)):
        torch.testing.assert_close(a, b, **TOL)


def test_export_matches_eager():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    x = torch.randn(2, 9, 32, generator=_gen(17))
    exported = torch.export.export(model, (x,))
    assert any("flashattn" in str(node.target) for node in exported.graph.nodes)   # our op, not a fallback
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), **TOL)
