"""Block-sparse attention: BlockMask from a mask_mod or a layout; the PyTorch path skips absent tiles
and masks partial ones element by element, so it equals the reference with mask_mod on every pair."""
import pytest
import torch
from helpers import make_qkv, run_and_compare

import flashattn
from flashattn import BlockMask, flash_attn_func, flash_attn_varlen_func
from flashattn.backends import torch_tiled

DOCS = torch.tensor([[0] * 40 + [1] * 60, [0] * 70 + [1] * 30])

MASK_MODS = {
    "causal": (lambda b, h, q, kv: q >= kv, None, None),
    "documents-causal": (lambda b, h, q, kv: (DOCS[b, q] == DOCS[b, kv]) & (q >= kv), 2, None),
    "per-head-band": (lambda b, h, q, kv: (q - kv).abs() <= 8 * (h + 1), None, 4),
    "strided": (lambda b, h, q, kv: (kv % 32) < 8, None, None),
}


def _direct(mask_mod, nb, nh, sq, sk):
    b = torch.arange(nb or 1).view(-1, 1, 1, 1)
    h = torch.arange(nh or 1).view(1, -1, 1, 1)
    q, kv = torch.arange(sq).view(1, 1, -1, 1), torch.arange(sk).view(1, 1, 1, -1)
    return mask_mod(b, h, q, kv).expand(nb or 1, nh or 1, sq, sk)


@pytest.mark.parametrize("name", list(MASK_MODS))
@pytest.mark.parametrize("block_size", [(16, 16), (32, 16), (16, 64)])
def test_from_mask_mod_holds_exactly_the_mask(name, block_size):
    mask_mod, nb, nh = MASK_MODS[name]
    bm = BlockMask.from_mask_mod(mask_mod, nb, nh, 100, 100, block_size)
    direct = _direct(mask_mod, nb, nh, 100, 100)
    assert torch.equal(bm.dense(), direct)
    # the layout is exactly "the tile holds a visible pair", and partial tiles are the not-full ones
    bq, bk = block_size
    for qb in range(bm.layout.shape[2]):
        for kb in range(bm.layout.shape[3]):
            t = direct[..., qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
            assert torch.equal(bm.layout[..., qb, kb], t.flatten(-2).any(-1))
            assert torch.equal(bm.partial_id[..., qb, kb] >= 0, t.flatten(-2).any(-1) & ~t.flatten(-2).all(-1))


def test_from_layout():
    layout = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)[None, None]
    bm = BlockMask.from_layout(layout, (16, 16), 30, 40)
    expect = layout[0, 0].repeat_interleave(16, 0).repeat_interleave(16, 1)[:30, :40]
    assert torch.equal(bm.dense()[0, 0], expect) and bm.partial.shape[0] == 0
    assert abs(bm.density() - 0.5) < 1e-9
    with pytest.raises(ValueError, match=r"layout must have shape .*\(batch or 1, heads or 1, 2, 3\)"):
        BlockMask.from_layout(layout[..., :2], (16, 16), 30, 40)


@pytest.mark.parametrize("name", list(MASK_MODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path_matches_reference(name, dtype):
    mask_mod, nb, nh = MASK_MODS[name]
    bm = BlockMask.from_mask_mod(mask_mod, nb, nh, 100, 100, (16, 32))
    q, k, v = make_qkv(2, 100, 100, 4, 2, 16, dtype, seed=len(name))
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, name=name)


def test_combines_with_causal_and_gqa():
    bm = BlockMask.from_mask_mod(MASK_MODS["per-head-band"][0], None, 4, 70, 90, (16, 16))
    q, k, v = make_qkv(2, 70, 90, 4, 1, 16, torch.float32, seed=2)
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, causal=True)


def test_absent_tiles_are_never_computed(monkeypatch):
    """Only the tiles present in the layout (for some batch entry and head) reach the score matmul."""
    layout = torch.eye(8, dtype=torch.bool)[None, None]          # 8 of 64 tiles
    bm = BlockMask.from_layout(layout, (16, 16), 128, 128)
    seen = []
    real = torch_tiled._scores

    def counting(qs, kb, q0, q1, k0, k1, *args):
        seen.append((q0, k0))
        return real(qs, kb, q0, q1, k0, k1, *args)

    monkeypatch.setattr(torch_tiled, "_scores", counting)
    q, k, v = make_qkv(1, 128, 128, 2, 2, 16, torch.float32, seed=3)
    flash_attn_func(q, k, v, block_mask=bm)
    assert sorted(seen) == [(16 * i, 16 * i) for i in range(8)]


def test_errors():
    q, k, v = make_qkv(1, 32, 32, 2, 2, 16, torch.float32, seed=4)
    bm = BlockMask.from_mask_mod(MASK_MODS["causal"][0], None, None, 32, 32, (16, 16))
    with pytest.raises(TypeError, match="block_mask must be a flashattn.BlockMask"):
        flash_attn_func(q, k, v, block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="built for seqlen_q=32, seqlen_k=32"):
        flash_attn_func(q[:, :20], k, v, block_mask=bm)
    with pytest.raises(ValueError, match="block_size must be a pair of powers of two"):
        BlockMask.from_mask_mod(MASK_MODS["causal"][0], None, None, 32, 32, (24, 16))
    with pytest.raises(TypeError, match="mask_mod must be a callable"):
        BlockMask.from_mask_mod(None, None, None, 32, 32)
    cu = torch.tensor([0, 32], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="block_mask with a packed"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 32, 32, block_mask=bm)
    assert "BlockMask" in flashattn.__all__


ON_GPU = torch.cuda.is_available()


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("block_size", [(16, 32), (32, 16)])   # 32 query rows: dK/dV walks 2 sub-tiles per block
@pytest.mark.parametrize("name", list(MASK_MODS))
def test_triton_interpreter_matches_reference(name, block_size, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    mask_mod, nb, nh = MASK_MODS[name]
    bm = BlockMask.from_mask_mod(mask_mod, nb, nh, 100, 100, block_size)
    q, k, v = make_qkv(2, 100, 100, 4, 2, 16, torch.float16, seed=len(name))
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, name=name)


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
def test_triton_interpreter_layout_with_causal(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    layout = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)[None, None]
    bm = BlockMask.from_layout(layout, (16, 16), 40, 60)
    q, k, v = make_qkv(1, 40, 60, 2, 1, 16, torch.float16, seed=6)
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, causal=True)


@pytest.mark.parametrize("per_head", [False, True])
def test_triton_whole_tiles_path(per_head, monkeypatch):
    """A layout-only mask (no partly filled tile) on seqlens that are multiples of the tiles, no other mask:
    the kernels take their unmasked path (BLOCK_SPARSE = 2) and must still equal the reference."""
    import flashattn.backends.triton as T
    if not ON_GPU:
        monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    modes = []
    real = T._sparse_mode
    monkeypatch.setattr(T, "_sparse_mode", lambda *a: modes.append(real(*a)) or modes[-1])
    g = torch.Generator().manual_seed(9)
    bq, bk = (32, 16) if not ON_GPU else (128, 64)   # dK/dV: 2 (interpreter) or 4 sub-tiles per mask block
    n = 4 * bq
    layout = torch.rand(2 if per_head else 1, 3 if per_head else 1, n // bq, n // bk, generator=g) < 0.4
    layout[..., 0, 0] = True
    bm = BlockMask.from_layout(layout.to("cuda" if ON_GPU else "cpu"), (bq, bk), n, n)
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    q, k, v = make_qkv(2, n, n, 3, 3, 16 if not ON_GPU else 64, dtype, device="cuda" if ON_GPU else "cpu", seed=9)
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, softcap=3.0, name="whole tiles")
    assert modes and set(modes) == {2}


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", list(MASK_MODS))
def test_triton_gpu_matches_reference(name):
    mask_mod, nb, nh = MASK_MODS[name]
    docs = DOCS.repeat_interleave(10, dim=1).cuda()

    def scaled(b, h, q, kv):   # the same patterns at 10x the length
        if name == "documents-causal":
            return (docs[b, q] == docs[b, kv]) & (q >= kv)
        return mask_mod(b, h, q, kv)

    bm = BlockMask.from_mask_mod(scaled, nb, nh, 1000, 1000, (128, 64), device="cuda")
    q, k, v = make_qkv(2, 1000, 1000, 4, 2, 64, torch.bfloat16, device="cuda", seed=len(name))
    run_and_compare(flash_attn_func, q, k, v, block_mask=bm, name=name)
