"""flash_attn_combine / merge: attention over a union of key sets from the parts (the block-merge formula)."""
import pytest
import torch

from flashattn import attention_ref
from flashattn.combine import flash_attn_combine, merge


def _parts(q, k, v, bounds):
    outs, lses = [], []
    for lo, hi in bounds:
        o, l = attention_ref(q, k[:, lo:hi], v[:, lo:hi]) if hi > lo else (
            torch.zeros_like(q), torch.full(q.shape[:1] + (q.shape[2], q.shape[1]), float("-inf"), dtype=q.dtype))
        outs.append(o)
        lses.append(l.transpose(1, 2))       # (b, h, s) -> (b, s, h): out's shape without headdim
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("bounds", [[(0, 7), (7, 20), (20, 33)], [(0, 33)], [(0, 0), (0, 10), (10, 10), (10, 33)]],
                         ids=["three", "one", "with-empty-splits"])
def test_combine_equals_full_attention(bounds):
    torch.manual_seed(0)
    q = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    k, v = torch.randn(2, 33, 3, 16, dtype=torch.float64), torch.randn(2, 33, 3, 16, dtype=torch.float64)
    out_p, lse_p = _parts(q, k, v, bounds)
    out, lse = flash_attn_combine(out_p, lse_p, return_lse=True)
    ref, ref_lse = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse.transpose(1, 2))
    run_out, run_lse = None, None
    for o, l in zip(out_p, lse_p):
        run_out, run_lse = merge(run_out, run_lse, o, l)
    torch.testing.assert_close(run_out, ref)
    torch.testing.assert_close(run_lse, ref_lse.transpose(1, 2))


def test_all_splits_empty_gives_zero_and_neg_inf():
    out_p = torch.randn(3, 2, 4, 8)
    lse_p = torch.full((3, 2, 4), float("-inf"))
    out, lse = flash_attn_combine(out_p, lse_p, return_lse=True)
    assert torch.equal(out, torch.zeros(2, 4, 8)) and torch.isneginf(lse).all()
    o, l = merge(None, None, out_p[0], lse_p[0])
    o, l = merge(o, l, out_p[1], lse_p[1])
    assert torch.equal(o, torch.zeros(2, 4, 8)) and torch.isneginf(l).all()


def test_out_dtype_and_shape_errors():
    out_p, lse_p = torch.randn(2, 3, 8, dtype=torch.float32), torch.randn(2, 3)
    assert flash_attn_combine(out_p, lse_p, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="lse_partial must have out_partial's shape"):
        flash_attn_combine(out_p, torch.randn(2, 8))


@pytest.mark.parametrize("splits", [1, 3, 6, 70])   # 70: more splits than one load takes (merged online)
def test_triton_combine_kernel_matches(splits):
    """The one-launch kernel that flash_attn_combine uses on CUDA, here under the interpreter (or on the GPU)."""
    from flashattn.backends.triton.decode import combine
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(splits)
    out_p = torch.randn(splits, 2, 3, 5, 40, generator=g).to(device)
    lse_p = (torch.randn(splits, 2, 3, 5, generator=g) * 3).to(device)
    lse_p[0, 0, 0, :] = float("-inf")         # a split that saw nothing for some rows
    lse_p[:, 1, 2, 1] = float("-inf")         # a row no split saw
    out, lse = combine(out_p, lse_p, torch.float16)
    want, want_lse = flash_attn_combine(out_p.cpu().double(), lse_p.cpu().double(), return_lse=True)
    torch.testing.assert_close(out.cpu().double(), want, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.cpu().double(), want_lse, atol=1e-5, rtol=1e-5)
    assert out.dtype == torch.float16 and torch.equal(out[1, 2, 1].cpu(), torch.zeros(40, dtype=torch.float16))
