"""The memory-efficient SS-Attention path is the default (API, load, authors' checkpoints, CLI),
and a trained model carries its inference settings (R3, shifts, self-ensemble, tile, overlap,
PD stride at test) in its safetensors metadata; explicit options override them."""
import json

import numpy as np
import pytest
import torch

from ssbsn import SSBSN
from ssbsn.cli import main
from ssbsn.images import read_image, write_image
from ssbsn.metrics import quantize

from helpers import TINY


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def _backends(model):
    return {m.backend for m in model.modules() if type(m).__name__ == "SSAttention"}


def test_default_model_uses_the_efficient_path_and_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = SSBSN(**TINY).eval()
    ref = SSBSN(**TINY, backend="reference").eval()
    ref.load_state_dict(model.state_dict())
    assert _backends(model) == {"fused"} and _backends(ref) == {"reference"}
    assert model.config["fused"] is True and ref.config["fused"] is False
    x = torch.rand(1, 3, 40, 36) * 255
    expect = ref.denoise(x, r3=False)
    # the default path never builds the N×N matrix: the reference function must not be called
    import ssbsn.attention.functional as fn

    def boom(*a, **k):
        raise AssertionError("the reference SS-Attention ran on the default path")
    monkeypatch.setattr(fn, "ss_attention_reference", boom)
    got = model.denoise(x, r3=False)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-3)
    # training forward and gradients too
    x.requires_grad_(False)
    loss = (model(x[..., :36, :36], pd=3) - x[..., :36, :36]).abs().mean()
    loss.backward()
    monkeypatch.undo()
    loss_ref = (ref(x[..., :36, :36], pd=3) - x[..., :36, :36]).abs().mean()
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_load_and_from_official_default_to_the_efficient_path(tmp_path):
    torch.manual_seed(0)
    old = SSBSN(**TINY, fused=False)  # a file written by a run that used the reference
    p = tmp_path / "m.safetensors"
    old.save(p)
    assert _backends(SSBSN.load(p)) == {"fused"}
    assert _backends(SSBSN.load(p, backend="reference")) == {"reference"}
    state = {f"bsn.{k}": v for k, v in old.bsn.state_dict().items()}
    off = SSBSN.from_official(state)
    assert _backends(off) == {"fused"}
    assert _backends(SSBSN.from_official(state, backend="reference")) == {"reference"}
    # the authors' layout stays bit-compatible whichever backend runs
    for k, v in off.bsn.state_dict().items():
        assert torch.equal(v, old.bsn.state_dict()[k])
    from ssbsn.api import load_model
    assert _backends(load_model(p, "cpu")) == {"fused"}
    assert _backends(load_model(p, "cpu", "reference")) == {"reference"}


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="backend='nope' out of range .*'reference'"):
        SSBSN(**TINY, backend="nope")


SETTINGS = dict(r3=False, shifts=True, self_ensemble=False, tile=24, overlap=16, lowpass=4.0,
                blend=True, wiener=True, debias=True)


@pytest.fixture(scope="module")
def carried(tmp_path_factory):
    torch.manual_seed(1)
    model = SSBSN(**TINY, pd_test=3, inference=SETTINGS)
    with torch.no_grad():  # outputs around mid-grey, so that 8-bit results can differ
        model.bsn.tail[-1].bias.fill_(128.0)
        model.bsn.tail[-1].weight.mul_(200.0)
    path = tmp_path_factory.mktemp("w") / "carried.safetensors"
    model.save(path)
    return model.eval(), path


def test_inference_settings_travel_in_the_metadata(carried):
    model, path = carried
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ssbsn_inference"]) == SETTINGS
    loaded = SSBSN.load(path).eval()
    assert loaded.inference == SETTINGS and loaded.pd_test == 3
    x = torch.rand(1, 3, 30, 33) * 255
    explicit = model.denoise(x, r3=False, shifts=True, self_ensemble=False, tile=24,
                             overlap=16, pd=3, lowpass=4.0, blend=True, wiener=True,
                             debias=True)
    # the oracle: the same settings spelled out on a model with the paper's defaults
    paper = SSBSN(**TINY).eval()
    paper.load_state_dict(model.state_dict())
    assert paper.inference == dict(r3=True, shifts=False, self_ensemble=False, tile=0,
                                   overlap=64, lowpass=0.0, blend=False, wiener=False,
                                   debias=False)
    spelled = paper.denoise(x, r3=False, shifts=True, tile=24, overlap=16, pd=3, lowpass=4.0,
                            blend=True, wiener=True, debias=True)
    torch.testing.assert_close(loaded.denoise(x), explicit)
    torch.testing.assert_close(spelled, explicit)
    # and the settings change the result (the test could fail)
    assert not torch.allclose(paper.denoise(x), explicit)
    # overrides at load time merge with the carried settings
    assert SSBSN.load(path, inference=dict(r3=True)).inference == {**SETTINGS, "r3": True}


def test_bad_inference_settings_are_refused():
    with pytest.raises(ValueError, match="inference setting r3"):
        SSBSN(**TINY, inference=dict(r3="yes"))
    with pytest.raises(ValueError, match="unknown inference settings"):
        SSBSN(**TINY, inference=dict(foo=1))
    with pytest.raises(ValueError, match="non-negative"):
        SSBSN(**TINY).denoise(torch.zeros(1, 3, 8, 8), tile=-1)


def test_cli_denoise_uses_the_models_settings_and_flags_override(carried, tmp_path):
    model, path = carried
    rng = np.random.default_rng(0)
    write_image(tmp_path / "in.png", rng.integers(0, 256, (30, 33, 3), dtype=np.uint8))
    x = read_image(tmp_path / "in.png").astype(np.float32)
    t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "a.png"),
                 "-w", str(path), "--device", "cpu"]) == 0
    expect = quantize(model.denoise(t)[0].numpy().transpose(1, 2, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), expect)
    # flags override: R3 on, no shifts, whole image, PD 2
    assert main(["denoise", str(tmp_path / "in.png"), "-o", str(tmp_path / "b.png"),
                 "-w", str(path), "--device", "cpu", "--r3", "--no-shifts", "--tile", "0",
                 "--pd-test", "2", "--lowpass", "0", "--no-blend", "--no-wiener",
                 "--no-debias"]) == 0
    expect_b = quantize(model.denoise(t, r3=True, shifts=False, tile=0, pd=2, lowpass=0,
                                      blend=False, wiener=False, debias=False
                                      )[0].numpy().transpose(1, 2, 0))
    np.testing.assert_array_equal(read_image(tmp_path / "b.png"), expect_b)
    assert not np.array_equal(expect, expect_b)


def test_lowpass_keeps_the_noisy_low_frequencies():
    """restore_low_frequencies against scipy's Gaussian filter (the oracle), and the mean."""
    from scipy import ndimage

    from ssbsn.restore.lowpass import gaussian_lowpass, restore_low_frequencies
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 52, generator=g, dtype=torch.float64) * 255
    y = x + 7.0 + torch.randn(1, 3, 40, 52, generator=g, dtype=torch.float64)
    for sigma in (2.0, 5.0):
        want = np.stack([ndimage.gaussian_filter(c, sigma, mode="mirror", truncate=3.0)
                         for c in x[0].numpy()])
        got = gaussian_lowpass(x, sigma)[0].numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=0.3)  # kernel radius rounding
    out = restore_low_frequencies(x, y, 8.0)
    # the constant +7 brightness drift is gone; high frequencies are y's
    assert abs((out - x).mean().item()) < 0.05
    assert torch.equal(restore_low_frequencies(x, y, 0.0), y)
