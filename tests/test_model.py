"""SSBSN wrapper: PD, R3, self-ensemble, tiling, configuration."""
import re

import pytest
import torch
import torch.nn.functional as F

from ssbsn import SSBSN
from ssbsn.restore.estimate import inverse_transform, self_ensemble, transform
from ssbsn.pd import pd_down, pd_up


def test_default_model_is_the_papers():
    model = SSBSN()
    assert sum(p.numel() for p in model.parameters()) == 6_410_947
    ss = [m for m in model.modules() if type(m).__name__ == "SSAttention"]
    assert sorted(m.grid for m in ss) == [4, 4, 4, 6, 6, 6]
    assert model.bsn.branch1.body[0].kernel_size == (3, 3)
    assert model.bsn.branch2.body[0].kernel_size == (5, 5)
    assert type(model.bsn.branch1.body[11]).__name__ == "DConvBlock"
    assert type(model.bsn.branch1.body[12]).__name__ == "SSBlock"


@pytest.mark.parametrize("f,pad", [(5, 2), (2, 2), (3, 0), (1, 1)])
def test_pd_is_subimage_tiling_and_inverse(f, pad):
    x = torch.randn(2, 3, 6 * f, 4 * f)
    d = pd_down(x, f, pad)
    h, w = x.shape[-2] // f + 2 * pad, x.shape[-1] // f + 2 * pad
    assert d.shape == (2, 3, f * h, f * w)
    for i in range(f):  # oracle: sub-image (i, j) is x[i::f, j::f], zero-padded, at block (i, j)
        for j in range(f):
            block = d[..., i * h:(i + 1) * h, j * w:(j + 1) * w]
            torch.testing.assert_close(block, F.pad(x[..., i::f, j::f], (pad,) * 4), rtol=0, atol=0)
    assert torch.equal(pd_up(d, f, pad), x)


def test_pd_rejects_sizes_off_the_stride():
    with pytest.raises(ValueError, match="multiples of 5"):
        pd_down(torch.zeros(1, 3, 12, 10), 5, 2)


def tiny(**kw):
    torch.manual_seed(0)
    return SSBSN(base_channels=8, num_modules=1, ss_blocks=0, **kw).eval()


def test_r3_with_p0_and_p1_is_the_bsn_on_the_right_input():
    x = torch.rand(1, 3, 14, 11) * 255
    xp = F.pad(x, (0, 1, 0, 0))  # to a multiple of PD 2
    for p, source in [(0.0, "first"), (1.0, "noisy")]:
        model = tiny(r3_p=p, r3_T=3)
        first = model(xp, pd=2)
        src = first if source == "first" else xp
        expect = model.bsn(F.pad(src, (2, 2, 2, 2), mode="reflect"))[..., 2:-2, 2:-2][..., :14, :11]
        torch.testing.assert_close(model.denoise(x), expect, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(model.denoise(x, r3=False), first[..., :14, :11])


def test_r3_replaces_about_p_of_the_pixels_and_is_seeded():
    from ssbsn.restore.estimate import r3_uniform
    u = r3_uniform(3, 0, (2, 3, 64, 64))
    assert abs((u < 0.16).float().mean().item() - 0.16) < 0.01
    assert torch.equal(u, r3_uniform(3, 0, (2, 3, 64, 64)))
    assert not torch.equal(u, r3_uniform(4, 0, (2, 3, 64, 64)))
    # a window draws what the whole image draws there
    assert torch.equal(r3_uniform(3, 1, (2, 3, 10, 7), (5, 9)), r3_uniform(3, 1, (2, 3, 64, 64))[..., 5:15, 9:16])


@pytest.mark.parametrize("r3,ensemble", [(False, False), (True, False), (True, True)])
def test_tiled_equals_untiled_where_overlap_covers_the_receptive_field(r3, ensemble):
    """Exact away from the image border. Within the receptive radius of the border, PD's
    sub-images see their neighbours' far edges across the pad band (the authors' model does
    too), and those edges are the window's, not the image's."""
    model = tiny(r3_T=1).double()
    # 2×2 tiles of 48 (+ overlap 30 on each side): the seams at 48 lie inside the exact region
    x = torch.rand(1, 3, 96, 90, dtype=torch.float64) * 255
    r = model.receptive_radius()
    whole = model.denoise(x, r3=r3, self_ensemble=ensemble)
    tiles = model.denoise(x, r3=r3, self_ensemble=ensemble, tile=48, overlap=r)
    inner = (..., slice(r, -r), slice(r, -r))
    torch.testing.assert_close(tiles[inner], whole[inner], rtol=1e-12, atol=1e-9)
    assert (tiles - whole).abs().max() < 0.05 * whole.abs().max()
    cut = model.denoise(x, r3=r3, self_ensemble=ensemble, tile=48, overlap=0)
    assert (cut - whole)[inner].abs().max() > 1e-3  # the tiles really are processed apart


def test_tiles_bound_the_working_size():
    model = tiny(r3_T=1)
    seen = []
    model.bsn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:]))
    model.denoise(torch.rand(1, 3, 120, 100) * 255, tile=32, overlap=16)
    assert max(h * w for h, w in seen) <= (2 * (32 + 2 * 16) + 8) ** 2 // 2


def test_transforms_are_the_eight_distinct_symmetries():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    outs = [transform(x, k) for k in range(8)]
    assert len({tuple(o.shape) + tuple(o.flatten().tolist()) for o in outs}) == 8
    for k in range(8):
        assert torch.equal(inverse_transform(transform(x, k), k), x)


def test_self_ensemble_of_equivariant_function_is_that_function():
    x = torch.randn(2, 3, 9, 7)
    conv = torch.nn.Conv2d(3, 3, 1)
    blur = lambda t: F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="replicate"), 3, 1)  # noqa: E731
    for fn in (lambda t, k: conv(t) ** 2, lambda t, k: blur(t)):
        with torch.no_grad():
            torch.testing.assert_close(self_ensemble(fn, x), fn(x, 0))
    shift = lambda t, k: torch.roll(t, 1, dims=-1)  # noqa: E731  not equivariant
    assert not torch.allclose(self_ensemble(shift, x), shift(x, 0))


def test_any_size_and_tiny_images_denoise():
    model = tiny(r3_T=2)
    for h, w in [(1, 1), (2, 3), (17, 5)]:
        y = model.denoise(torch.rand(1, 3, h, w) * 255, self_ensemble=True)
        assert y.shape == (1, 3, h, w) and torch.isfinite(y).all()


def test_training_forward_shape_and_bad_input():
    model = tiny()
    assert model(torch.rand(2, 3, 20, 15)).shape == (2, 3, 20, 15)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(2, 1, 20, 15))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.randint(0, 255, (2, 3, 20, 15)))


@pytest.mark.parametrize("kw,says", [
    (dict(r3_p=1.5), "r3_p=1.5 out of range"), (dict(num_modules=0), "num_modules=0 out of"),
    (dict(base_channels=7), "even"), (dict(pd_train=0), "pd_train=0 out of range"),
    (dict(ss_blocks=4, num_modules=3), "ss_blocks=4 exceeds num_modules=3"),
    (dict(pd_layout="grid"), "pd_layout='grid'"), (dict(num_modules=2.5), "an integer")])
def test_a_bad_configuration_is_one_error_naming_the_field(kw, says):
    """ModelConfig checks every field against its declaration whoever builds it: SSBSN(...),
    ModelConfig(...) or dataclasses.replace (a ValueError naming the field, not a failure
    deep inside the network's constructor)."""
    import dataclasses

    from ssbsn import ModelConfig
    for build in (lambda: SSBSN(**kw), lambda: ModelConfig(**kw),
                  lambda: dataclasses.replace(ModelConfig(), **kw)):
        with pytest.raises(ValueError, match=f"model configuration .*{re.escape(says)}"):
            build()


@pytest.mark.parametrize("window", [None, 8])
def test_cpu_inference_path_fuses_conv_relu_in_channels_last(window):
    """Without autograd on the CPU the BSN runs in channels_last with every convolution that
    a ReLU follows fused with it (one oneDNN call, no ReLU op). Oracle: the same weights
    through the plain path (NCHW, convolution then ReLU) with autograd on."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import ssbsn.nn.conv as conv
    if not conv._FUSED_CONV_RELU:
        pytest.skip("this torch has no oneDNN fused convolution")

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, attention_window=window).eval()
    x = torch.rand(2, 3, 30, 36) * 255
    expected = model.bsn(x).detach()  # autograd on: the plain path
    ops = Ops()
    with torch.no_grad(), ops:
        got = model.bsn(x)
    assert got.is_contiguous() and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fused = ops.names.count("mkldnn._convolution_pointwise")
    relus = [n for n in model.bsn.modules() if isinstance(n, torch.nn.ReLU)]
    # every ReLU module of the network plus the two inside each D-Conv/SS block's body
    blocks = sum(type(m).__name__ in ("DConvBlock", "SSBlock") for m in model.bsn.modules())
    assert fused == len(relus) + 2 * blocks
    assert not {"aten.relu", "aten.relu_", "aten.clamp_min"} & set(ops.names)
