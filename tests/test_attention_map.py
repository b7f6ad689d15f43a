"""attention-map: the O(N) attention row against the full N×N reference, and the PD coordinate
mapping against pd_down itself."""
import math

import numpy as np
import pytest
import torch

from ssbsn import SSBSN
from ssbsn.attention.module import SSAttention
from ssbsn.attention.common import NORM_EPS
from ssbsn.attention.common import layer_norm, padded_size, to_groups
from ssbsn.attention_map import attention_maps, attention_row, image_to_map, map_to_image
from ssbsn.pd import pd_down


@pytest.mark.parametrize("H,W,f,p", [(8, 10, 2, 2), (15, 10, 5, 2), (6, 6, 3, 0)])
def test_coordinate_mapping_matches_pd_down(H, W, f, p):
    idx = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W)
    m = pd_down(idx, f, p, value=-1.0)[0, 0].numpy()
    for y in range(H):
        for x in range(W):
            r, c = image_to_map(y, x, H, W, f, p)
            assert m[r, c] == y * W + x
    rr, cc = np.mgrid[0:m.shape[0], 0:m.shape[1]]
    ys, xs, valid = map_to_image(rr.ravel(), cc.ravel(), H, W, f, p)
    np.testing.assert_array_equal(valid, m.ravel() >= 0)
    np.testing.assert_array_equal((ys * W + xs)[valid], m.ravel()[valid])


def _full_attention(x, attn):
    """The reference's N×N matrices, (B·g², N, N), float64."""
    g = attn.grid
    y = layer_norm(x, g, attn.group_stats)
    q = to_groups(y, g) @ attn.wqk.detach().double()
    q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + NORM_EPS)
    return torch.softmax((1 + q @ q.transpose(1, 2)) / math.sqrt(q.shape[-1]), dim=-1)


@pytest.mark.parametrize("group_stats", [False, True])
@pytest.mark.parametrize("r,c", [(0, 0), (5, 9), (13, 6)])
def test_attention_row_equals_the_full_matrix_row(group_stats, r, c):
    torch.manual_seed(1)
    C, H, W, g = 6, 14, 11, 4
    attn = SSAttention(C, g, group_stats=group_stats).double()
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    rows, cols, w, pad_share = attention_row(x, attn, r, c)
    A = _full_attention(x, attn)
    Wg = padded_size(W, g) // g
    full = A[(r % g) * g + (c % g), (r // g) * Wg + c // g]  # this token's row
    keys = (rows // g) * Wg + cols // g
    np.testing.assert_allclose(w, full[keys].numpy(), rtol=1e-10, atol=1e-14)
    assert pad_share == pytest.approx(float(full.sum() - full[keys].sum()), abs=1e-12)
    assert w.sum() + pad_share == pytest.approx(1.0, abs=1e-12)
    # and the module's own output at (r, c) is x + Σ_k w_k x(key_k)
    out = attn(x)
    mixed = (torch.from_numpy(w) * x[0][:, rows, cols]).sum(-1)
    torch.testing.assert_close(out[0, :, r, c] - x[0, :, r, c], mixed)


def test_attention_maps_keys_share_the_query_grid_phase():
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1).eval()
    img = np.random.default_rng(0).random((13, 18, 3)).astype(np.float32) * 255
    pixel = (7, 4)
    maps = attention_maps(model, img, pixel)
    assert [(m["dilation"], m["grid"]) for m in maps] == [(2, 4), (3, 6)]
    Hp, Wp = 14, 18  # padded to multiples of pd_test = 2
    r0, c0 = image_to_map(*pixel, Hp, Wp, 2, 2)
    for m in maps:
        g = m["grid"]
        assert m["weights"].sum() + m["pad_share"] == pytest.approx(1.0, abs=1e-9)
        assert len(m["ys"]) > 1 and (m["ys"] < 13).all() and (m["xs"] < 18).all()
        r, c = zip(*(image_to_map(y, x, Hp, Wp, 2, 2) for y, x in zip(m["ys"], m["xs"])))
        assert (np.array(r) % g == r0 % g).all() and (np.array(c) % g == c0 % g).all()
        assert any(y == pixel[0] and x == pixel[1] for y, x in zip(m["ys"], m["xs"]))
