"""The blind spot, by autograd: ∂out(p)/∂in(p) of the BSN (no PD)."""
import pytest
import torch

from ssbsn.nn import BSN


def pixel_gradient(bsn, shape, p):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    out = bsn(x)
    out[0, :, p[0], p[1]].sum().backward()
    g = x.grad[0].abs().sum(0)  # (H, W): summed over input channels
    centre = g[p].item()
    g[p] = 0
    return centre, g


@pytest.mark.parametrize("p", [(20, 18), (3, 35), (40, 0)])
@pytest.mark.parametrize("ss_blocks,group_stats", [(0, False), (2, True)])
def test_exact_blind_spot(ss_blocks, group_stats, p):
    torch.manual_seed(1)
    bsn = BSN(base_channels=16, num_modules=3, ss_blocks=ss_blocks, group_stats=group_stats).double()
    centre, neighbours = pixel_gradient(bsn, (1, 3, 41, 37), p)
    assert centre == 0.0
    assert neighbours.max() > 0
    # the receptive field is wide: many neighbours contribute
    assert (neighbours > 0).sum() > 100


def test_image_wide_statistics_leak_is_tiny():
    torch.manual_seed(2)
    bsn = BSN(base_channels=16, num_modules=3, ss_blocks=2).double()
    centre, neighbours = pixel_gradient(bsn, (1, 3, 41, 37), (20, 18))
    assert neighbours.max() > 0
    # non-zero (LayerNorm's image statistics) and about 1e-8 of the largest neighbour, as the
    # README says: 6.0e-9 here; 0.9e-9 to 1.3e-8 over seeds 2-4 and three pixels each
    assert 0 < centre <= 3e-8 * neighbours.max()


def test_masked_conv_centre_takes_no_part():
    torch.manual_seed(3)
    bsn = BSN(base_channels=8, num_modules=1, ss_blocks=0)
    conv = bsn.branch1.body[0]
    with torch.no_grad():
        conv.weight.fill_(1.0)  # even a non-zero centre weight must not matter
    x = torch.randn(1, 8, 9, 9, requires_grad=True)
    y = conv(x)
    y[0, :, 4, 4].sum().backward()
    assert x.grad[0, :, 4, 4].abs().max() == 0
    assert x.grad[0, :, 3, 4].abs().max() > 0
    x2 = torch.randn(1, 8, 9, 9)
    conv(x2).sum().backward()
    k = conv.weight.shape[-1] // 2
    assert conv.weight.grad[:, :, k, k].abs().max() == 0
    assert conv.weight.grad.abs().sum() > 0
