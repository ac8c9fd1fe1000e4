"""flashattn.rotary against complex multiplication: a rotation by angle θ is multiplication by e^{iθ}."""
import pytest
import torch

from flashattn.rotary import apply_rotary_emb, rotate


def _angles(positions, half):
    return torch.outer(positions.double(), 1.0 / (100.0 ** (torch.arange(half, dtype=torch.float64) / half)))


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rotary_dim", [8, 16])
def test_rotation_is_complex_multiplication(interleaved, rotary_dim):
    x = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    offsets = torch.tensor([0, 7])
    ang = _angles(torch.arange(20), rotary_dim // 2)
    out = apply_rotary_emb(x, ang.cos(), ang.sin(), interleaved, seqlen_offsets=offsets)
    for b in range(2):
        theta = ang[offsets[b] + torch.arange(5)][:, None, :]                       # (5, 1, half)
        xr = x[b, ..., :rotary_dim]
        pairs = (xr[..., 0::2], xr[..., 1::2]) if interleaved else xr.chunk(2, dim=-1)
        z = torch.complex(*pairs) * torch.exp(1j * theta)
        want = (torch.stack((z.real, z.imag), -1).flatten(-2) if interleaved else torch.cat((z.real, z.imag), -1))
        torch.testing.assert_close(out[b, ..., :rotary_dim], want)
        torch.testing.assert_close(out[b, ..., rotary_dim:], x[b, ..., rotary_dim:])   # untouched channels


def test_errors():
    x = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="covers positions|cover positions"):
        apply_rotary_emb(x, torch.ones(3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="more than head_dim"):
        rotate(x, torch.ones(4, 8), torch.zeros(4, 8))
