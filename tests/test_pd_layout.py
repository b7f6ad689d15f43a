"""PD's two layouts: the tiled map (the authors') and the batch of sub-images.

The tiled map puts the same position of two neighbouring sub-images one sub-image period apart,
and those two pixels are one pixel apart in the image; their camera noise is correlated. The
tests measure, by autograd, how much of a pixel's prediction comes from its image neighbours
at distance ≤ 2 (where demosaicking correlates the noise), in each layout.
"""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ssbsn import SSBSN
from ssbsn.attention_map import attention_maps
from ssbsn.pd import pd_down, pd_down_batch, pd_up_batch

NEAR = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]


@pytest.mark.parametrize("f,pad", [(2, 0), (3, 0), (3, 2), (5, 1)])
def test_batch_layout_is_the_maps_sub_images(f, pad):
    x = torch.randn(2, 3, 6 * f, 4 * f, dtype=torch.float64)
    sub = pd_down_batch(x, f, pad)
    assert sub.shape == (2 * f * f, 3, 6 + 2 * pad, 4 + 2 * pad)
    tiled = pd_down(x, f, pad)
    hs, ws = 6 + 2 * pad, 4 + 2 * pad
    for b in range(2):
        for i in range(f):
            for j in range(f):
                torch.testing.assert_close(sub[b * f * f + i * f + j],
                                           tiled[b, :, i * hs:(i + 1) * hs, j * ws:(j + 1) * ws],
                                           rtol=0, atol=0)
                # and sub-image (i, j) holds the image pixels (i + f·u, j + f·v)
                inner = sub[b * f * f + i * f + j, :, pad:hs - pad, pad:ws - pad]
                torch.testing.assert_close(inner, x[b, :, i::f, j::f], rtol=0, atol=0)
    torch.testing.assert_close(pd_up_batch(sub, f, pad), x, rtol=0, atol=0)


def test_batch_layout_needs_multiples_of_the_stride():
    with pytest.raises(ValueError, match="multiples of 3"):
        pd_down_batch(torch.zeros(1, 3, 10, 9), 3)
    with pytest.raises(ValueError, match="multiple of 9"):
        pd_up_batch(torch.zeros(4, 3, 5, 5), 3)


def near_share(model, size, pixels, seed=0):
    """Per pixel: |∂out(p)/∂in(p)| summed over channels, and the share of the whole gradient
    that falls on the image neighbours within 2 pixels."""
    torch.manual_seed(seed)
    x = (torch.rand(1, 3, size, size, dtype=torch.float64) * 200).requires_grad_(True)
    y = model(x)
    out = []
    for r, c in pixels:
        g, = torch.autograd.grad(y[0, :, r, c].sum(), x, retain_graph=True)
        a = g[0].abs().sum(0)
        near = sum(a[r + dy, c + dx] for dy, dx in NEAR)
        out.append((float(a[r, c]), float(near / a.sum())))
    return out


PIXELS = [(21, 21), (10, 20), (30, 31), (17, 23)]


@pytest.mark.parametrize("ss_blocks", [0, 1])
def test_batch_layout_never_reads_the_image_neighbours(ss_blocks):
    torch.manual_seed(3)
    kw = dict(base_channels=8, num_modules=2, ss_blocks=ss_blocks, pd_train=3, pd_pad=0)
    tiled = SSBSN(**kw).double()
    batch = SSBSN(**kw, pd_layout="batch").double()
    batch.load_state_dict(tiled.state_dict())
    for (own_t, near_t), (own_b, near_b) in zip(near_share(tiled, 42, PIXELS),
                                                near_share(batch, 42, PIXELS)):
        assert near_b == 0.0  # nothing within 2 pixels of p reaches p's output
        assert own_b <= 1e-6 * own_t + 1e-12 or own_b < 1e-7  # the LayerNorm leak at most
    # the tiled map at 14-px sub-images: the same weights do read them
    shares = [s for _, s in near_share(tiled, 42, PIXELS)]
    if ss_blocks:  # SS-Attention's groups span the whole map: every pixel
        assert min(shares) > 0
    else:  # the d = 3 branch's receptive field (±14) reaches the next sub-image's pixel
        assert max(shares) > 0


def test_layouts_agree_where_no_receptive_field_crosses_a_sub_image():
    """Without SS-Blocks and with a pad wider than the receptive field the two layouts compute
    the same map, up to the padding's own convolution outputs that the tiled map carries."""
    torch.manual_seed(4)
    kw = dict(base_channels=8, num_modules=1, ss_blocks=0, pd_train=2)
    tiled = SSBSN(**kw, pd_pad=20).double()
    batch = SSBSN(**kw, pd_pad=0, pd_layout="batch").double()
    batch.load_state_dict(tiled.state_dict())
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 255
    # image pixels 28..35 are sub-image pixels 14..17 of 32: more than the receptive radius
    # (8 for one module) from every sub-image border, so both read only real pixels
    yt, yb = tiled(x), batch(x)
    torch.testing.assert_close(yt[..., 28:36, 28:36], yb[..., 28:36, 28:36])
    assert not torch.allclose(yt, yb)  # at the borders zero padding and the pad band differ


def test_layout_is_stored_with_the_weights_and_old_files_read_as_the_map(tmp_path):
    m = SSBSN(base_channels=8, num_modules=1, ss_blocks=1, pd_layout="batch")
    m.save(tmp_path / "b.safetensors")
    assert SSBSN.load(tmp_path / "b.safetensors").pd_layout == "batch"
    # a file written before the layout existed has no pd_layout in its configuration
    SSBSN(base_channels=8, num_modules=1, ss_blocks=1).save(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["ssbsn_config"])
    assert config.pop("pd_layout") == "mosaic"
    save_file(tensors, tmp_path / "old.safetensors", {**meta, "ssbsn_config": json.dumps(config)})
    assert SSBSN.load(tmp_path / "old.safetensors").pd_layout == "mosaic"
    with pytest.raises(Exception, match="pd_layout"):
        SSBSN(base_channels=8, pd_layout="tiles")


def test_denoise_runs_in_the_batch_layout_and_matches_a_manual_pd():
    torch.manual_seed(5)
    m = SSBSN(base_channels=8, num_modules=1, ss_blocks=1, pd_pad=0, pd_layout="batch").eval()
    x = torch.rand(1, 3, 20, 22) * 255
    with torch.no_grad():
        y = m.denoise(x, r3=False, shifts=False, lowpass=0, blend=False, wiener=False,
                      debias=False)
        manual = pd_up_batch(m.bsn(pd_down_batch(x, 2)), 2)
    torch.testing.assert_close(y, manual)


def test_attention_map_keys_stay_in_the_pixels_sub_image():
    torch.manual_seed(6)
    img = np.random.default_rng(1).random((40, 44, 3)).astype(np.float32) * 255
    kw = dict(base_channels=8, num_modules=2, ss_blocks=1)
    pixel = (13, 17)
    tiled = attention_maps(SSBSN(**kw).eval(), img, pixel)
    batch = attention_maps(SSBSN(**kw, pd_layout="batch").eval(), img, pixel)
    for t, b in zip(tiled, batch):
        assert b["weights"].sum() + b["pad_share"] == pytest.approx(1.0, abs=1e-9)
        # every key is in the pixel's own PD phase (its sub-image), the pixel among them
        assert ((b["ys"] % 2) == pixel[0] % 2).all() and ((b["xs"] % 2) == pixel[1] % 2).all()
        assert any(y == pixel[0] and x == pixel[1] for y, x in zip(b["ys"], b["xs"]))
        assert (b["ys"] < 40).all() and (b["xs"] < 44).all()
        # the tiled map's groups take keys from the other sub-images too
        assert len(set(zip(t["ys"] % 2, t["xs"] % 2))) > 1
