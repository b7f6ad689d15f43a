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
from ssbsn.attention_map import (attention_maps, attention_row, concentration, image_to_map,
                                 map_to_image, ss_blocks_of)
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


def test_attention_maps_of_a_model_with_a_bounded_scope():
    """The quick preset's models attend within windows (and run on the CPU in strips, which
    compute windowed attention without calling the modules): each row covers the pixel's
    window of the PD map only, and equals the row of a model that sees the whole map when the
    window covers it."""
    torch.manual_seed(0)
    cfg = dict(base_channels=8, num_modules=2, ss_blocks=1)
    windowed = SSBSN(**cfg, attention_window=8).eval()
    img = np.random.default_rng(0).random((40, 44, 3)).astype(np.float32) * 255
    pixel = (17, 30)
    r0, c0 = image_to_map(*pixel, 40, 44, 2, 2)
    for m in attention_maps(windowed, img, pixel):
        side = -(-8 // m["grid"]) * m["grid"]  # the window's side in map pixels
        r, c = map(np.array, zip(*(image_to_map(y, x, 40, 44, 2, 2)
                                   for y, x in zip(m["ys"], m["xs"]))))
        assert (r // side == r0 // side).all() and (c // side == c0 // side).all()
        assert 1 < len(r) <= (side // m["grid"]) ** 2
        assert m["weights"].sum() + m["pad_share"] == pytest.approx(1.0, abs=1e-9)
    # oracle: each SS-Attention's own output at the pixel's map position is x + Σ_k w_k x(key_k)
    seen = []
    hooks = [a.register_forward_hook(lambda mod, i, o: seen.append((i[0], o)))
             for _, _, a in ss_blocks_of(windowed)]
    windowed.bsn.strips = False
    with torch.no_grad():
        windowed.bsn(pd_down(torch.from_numpy(img.transpose(2, 0, 1).copy())[None], 2, 2))
    for h in hooks:
        h.remove()
    for m, (x, out) in zip(attention_maps(windowed, img, pixel), seen):
        r, c = zip(*(image_to_map(y, x_, 40, 44, 2, 2) for y, x_ in zip(m["ys"], m["xs"])))
        mixed = (torch.from_numpy(m["weights"]).float() * x[0][:, list(r), list(c)]).sum(-1)
        torch.testing.assert_close(out[0, :, r0, c0] - x[0, :, r0, c0], mixed,
                                   rtol=1e-4, atol=1e-4)


def test_concentration_against_scipy_and_its_limits():
    from scipy.stats import entropy
    w = np.random.default_rng(3).random(37) * 0.02  # not normalised: pad keys took the rest
    peak, ent = concentration(w)
    assert peak == pytest.approx(w.max() / w.mean(), rel=1e-12)
    assert ent == pytest.approx(entropy(w) / math.log(len(w)), rel=1e-12)  # scipy normalises
    assert concentration(np.full(9, 0.05)) == pytest.approx((1.0, 1.0))
    one_hot = np.zeros(9)
    one_hot[4] = 0.3
    assert concentration(one_hot) == pytest.approx((9.0, 0.0), abs=1e-12)
    assert concentration(np.array([0.4])) == (1.0, 1.0)


def test_concentration_of_a_row_at_the_cosine_logits_bound():
    """A query whose key direction is opposite to every other key's uses the whole band of the
    cosine logits (2/√E): its row is e^{2/√E} on itself against 1 on the n − 1 others, so
    peak = n·e^a/(e^a + n − 1) with a = 2/√E, and no row can be more concentrated."""
    C, g, H, W = 4, 4, 16, 20
    attn = SSAttention(C, g).double()
    with torch.no_grad():
        attn.wqk.copy_(torch.eye(C))
    v = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)  # zero mean over channels
    x = (-v).view(1, C, 1, 1).repeat(1, 1, H, W)
    r, c = 9, 6
    x[0, :, r, c] = v
    rows, cols, w, pad_share = attention_row(x, attn, r, c)
    n, ea = len(w), math.exp(2 / math.sqrt(C))
    assert pad_share == 0.0 and n == (H // g) * (W // g)
    peak, ent = concentration(w)
    assert peak == pytest.approx(n * ea / (ea + n - 1), rel=1e-7)  # the eps terms: 1e-8
    p = np.array([ea] + [1.0] * (n - 1)) / (ea + n - 1)
    assert ent == pytest.approx(-(p * np.log(p)).sum() / math.log(n), rel=1e-7)


def test_attention_maps_report_rows_within_the_cosine_logits_bound():
    """For any features, a row's heaviest weight is at most e^{2/√E} times the uniform one; the
    reported numbers are those of the returned weights."""
    img = np.random.default_rng(1).random((20, 22, 3)).astype(np.float32) * 255
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1).eval()
    bound = math.exp(2 / math.sqrt(8))  # E = C = 8
    for m in attention_maps(model, img, (9, 5)):
        assert 1.0 <= m["peak"] <= bound
        assert 0.0 < m["entropy"] <= 1.0 + 1e-12
        assert (m["peak"], m["entropy"]) == pytest.approx(concentration(m["weights"]))


@pytest.mark.parametrize("group_stats", [False, True])
@pytest.mark.parametrize("r,c", [(0, 0), (5, 9), (13, 10), (17, 3), (18, 7), (20, 10)])
def test_attention_row_within_its_window(group_stats, r, c):
    """With a bounded scope the row covers the token's window only (ragged last windows and
    padded keys included), and the module's windowed output at (r, c) is x + Σ_k w_k x(key_k)."""
    torch.manual_seed(2)
    C, H, W, g = 6, 21, 11, 4
    attn = SSAttention(C, g, group_stats=group_stats, backend="reference", window=8).double()
    x = torch.randn(1, C, H, W, dtype=torch.float64)
    rows, cols, w, pad_share = attention_row(x, attn, r, c)
    assert (rows // 8 == r // 8).all() and (cols // 8 == c // 8).all()  # one 8-px window
    assert ((rows - r) % g == 0).all() and ((cols - c) % g == 0).all()
    assert w.sum() + pad_share == pytest.approx(1.0, abs=1e-12)
    # H = 21 pads row 21 + 4k: the last windows' groups of phases 1-3 have a padded key
    assert (pad_share > 0) == (r >= 16 and r % g != 0)
    out = attn(x)
    mixed = (torch.from_numpy(w) * x[0][:, rows, cols]).sum(-1)
    torch.testing.assert_close(out[0, :, r, c] - x[0, :, r, c], mixed)
