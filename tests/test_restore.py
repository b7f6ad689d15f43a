"""The restoration package (ssbsn.restore) and the inference settings' one declaration
(ssbsn.config.InferenceConfig): outputs as before the package existed, the estimate's
wrappers against plain loops, a new step as one module plus one field, and the bounds that
keep a stored or typed setting from hanging a command."""
import ast
import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssbsn import SSBSN, Denoiser
from ssbsn.cli import main
from ssbsn.config import (InferenceConfig, _inf, add_inference_options, check_inference,
                          inference_field_names)
from ssbsn.errors import CheckpointError, ConfigError
from ssbsn.restore import Pipeline
from ssbsn.restore.pipeline import Context
import ssbsn.nn.conv as conv
from ssbsn.restore.estimate import (View, inverse_transform, network_estimate, pd_r3,
                                    self_ensembled, shift_ensembled, tiled_call, transform)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread

DATA = Path(__file__).parent / "data"
# the settings tests/data/restore_outputs.npz holds outputs of (out0, out1, ...), written by the
# implementation before ssbsn.restore existed (SSBSN.denoise of restore_model.safetensors,
# whose own settings are shifts, lowpass 4, blend and debias)
SAVED = [dict(), dict(r3=True, self_ensemble=True, shifts=False, tile=16, overlap=8, seed=3,
                         wiener=True),
         dict(r3=True, shifts=False, lowpass=0.0, blend=False, debias=False),
         dict(pd=3, blend=True, wiener=True, r3=False)]


@pytest.fixture(scope="module")
def saved():
    model = SSBSN.load(DATA / "restore_model.safetensors").eval()
    return model, np.load(DATA / "restore_outputs.npz")


@pytest.mark.parametrize("i", range(len(SAVED)))
def test_saved_model_denoises_as_before(saved, i, monkeypatch):
    """The file's bytes are the oracle: a model saved before the refactor loads and gives the
    outputs it gave then (every step of the pipeline is on in one of the settings); the
    Denoiser and SSBSN.denoise run the same pipeline. The outputs were made with the blend's
    reference at all stride² shifts, since replaced by a Latin square of them
    (test_blend_reference_is_the_latin_square_of_shifts), and with the network's NCHW
    convolutions, since fused with their ReLUs in channels_last on the CPU (a float-rounding
    change that the Wiener stage's block matching turns into up to 0.2 grey levels;
    tests/test_model.py checks the fused path against the plain one): both are put back."""
    full = Context.estimate_at
    monkeypatch.setattr(Context, "estimate_at", lambda self, stride, latin=False: full(self, stride))
    monkeypatch.setattr(conv, "_FUSED_CONV_RELU", False)
    model, ref = saved
    img = ref["image"]
    x = torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None]
    got = model.denoise(x, **SAVED[i])[0].numpy()
    np.testing.assert_allclose(got, ref[f"out{i}"], rtol=0, atol=1e-2)  # float rounding only
    assert np.abs(got - img.transpose(2, 0, 1)).mean() > 1  # it did denoise
    den = Denoiser(model, **SAVED[i]).denoise_array(img.astype(np.float32))
    assert np.array_equal(den.transpose(2, 0, 1), got)


def test_blend_reference_is_the_latin_square_of_shifts(saved):
    """With the shifted-PD ensemble on, the blend's reference at the training stride s is the
    mean of the estimates at the s shifts (i, (s − i) mod s), each PD phase of a row and of a
    column once, written out here from the model's forward; the output estimate keeps all s²."""
    model, ref = saved
    x = torch.from_numpy(ref["image"].transpose(2, 0, 1).astype(np.float32))[None][..., :23, :29]
    s, H, W = 3, 23, 29
    p = Pipeline(model)
    config = p.settings(shifts=True, lowpass=0.0, blend=True, wiener=False, debias=False, pd=2)
    ctx = Context(model, x, config, [])
    acc = 0
    for dy, dx in [(0, 0), (1, 2), (2, 1)]:
        xs = F.pad(x, (dx, 0, dy, 0), mode="reflect")
        xp = F.pad(xs, (0, (-xs.shape[-1]) % s, 0, (-xs.shape[-2]) % s))
        with torch.no_grad():
            acc = acc + model(xp, pd=s)[..., dy:dy + H, dx:dx + W]
    torch.testing.assert_close(ctx.estimate_at(s, latin=True), acc / 3, rtol=0, atol=1e-4)
    assert model.pd_train == s and not torch.equal(ctx.estimate_at(s, latin=True),
                                                   Context(model, x, config, []).estimate_at(s))
    calls, forward = [], model.forward
    model.forward = lambda xp, pd=None: (calls.append(pd), forward(xp, pd=pd))[1]
    try:
        p(x, shifts=True, lowpass=0.0, blend=True, wiener=False, debias=False, pd=2)
    finally:
        del model.forward
    assert calls == [2] * 4 + [3] * 3


def test_denoiser_checks_its_options_when_given(saved):
    model, _ = saved
    with pytest.raises(ConfigError, match=r"inference setting tile must be .*8\.\.65536, got 3"):
        Denoiser(model, tile=3)
    d = Denoiser(model)
    with pytest.raises(ConfigError, match=r"lowpass must be a number 0\.\.128"):
        d.denoise_array(np.zeros((16, 16, 3), np.float32), lowpass=float("nan"))


# ------------------------------------------------------------------ the estimate's wrappers

def _tiny(**kw):
    torch.manual_seed(0)
    return SSBSN(base_channels=8, num_modules=1, ss_blocks=0, **kw).eval()


@torch.no_grad()
def test_wrappers_compose_as_plain_loops():
    """Self-ensemble inside the shifted-PD ensemble: the average over the 4 shifts and 8
    orientations of the network at PD 2, written as a plain loop."""
    model = _tiny()
    x = torch.rand(1, 3, 16, 20, dtype=torch.float32) * 255
    want = torch.zeros_like(x)
    for dy in range(2):
        for dx in range(2):
            xs = F.pad(x, (dx, 0, dy, 0), mode="reflect")
            for k in range(8):
                t = transform(xs, k)
                t = F.pad(t, (0, t.shape[-1] % 2, 0, t.shape[-2] % 2))
                y = model(t, pd=2)[..., :transform(xs, k).shape[-2], :transform(xs, k).shape[-1]]
                want += inverse_transform(y, k)[..., dy:dy + 16, dx:dx + 20] / 32
    f = shift_ensembled(self_ensembled(pd_r3(model, 2, r3=False, seed=0)), 2)
    torch.testing.assert_close(f(x, View()), want, rtol=1e-5, atol=1e-3)
    cfg = InferenceConfig(r3=False, self_ensemble=True, shifts=True)
    assert torch.equal(network_estimate(model, x, 2, cfg), f(x, View()))


@torch.no_grad()
def test_tiles_pass_their_global_origin_to_r3():
    """R3's field is a function of the global position: a model without reach across pixels
    (PD 1, a 1×1 network would be needed for exactness, so compare against the untiled call on
    the windows' cores away from the border) draws the same replacements in a tile as in the
    whole image, which only holds if each tile's view carries its own origin."""
    model = _tiny(r3_T=2)
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 255
    model = model.double()
    r = model.receptive_radius()
    f = pd_r3(model, 2, r3=True, seed=5)
    whole = f(x, View())
    tiles = tiled_call(f, 32, r, multiple=2)(x, View())
    inner = (..., slice(r, -r), slice(r, -r))
    torch.testing.assert_close(tiles[inner], whole[inner], rtol=1e-12, atol=1e-9)
    wrong = tiled_call(lambda w, v: f(w, View()), 32, r, multiple=2)(x, View())
    assert (wrong - whole)[inner].abs().max() > 1e-3  # origin (0, 0) in every tile differs


# ------------------------------------------------------------------ a new step

class Double:
    """A step defined here: doubles the result so far."""
    stage = "output"

    def __call__(self, ctx, image, value):
        return image * 2


class Offset:
    """A step defined here: adds its setting's value."""
    stage = "output"

    def __call__(self, ctx, image, value):
        return image + value


@dataclass
class Extended(InferenceConfig):
    double: bool = field(default=False, metadata=_inf(
        "double the result", "--double", step=f"{__name__}:Double"))
    offset: float = field(default=0.0, metadata=_inf(
        "add a constant", "--offset", lambda v: -10 <= v <= 10, "a number -10..10",
        step=f"{__name__}:Offset", metavar="V"))


def test_a_new_step_is_one_module_plus_one_field():
    """Two steps declared by fields of a subclass run after the built-in ones, in field
    order (2·base + 5, not 2·(base + 5)); their flags and their checks come from the same
    declarations."""
    model = _tiny(r3_T=1)
    x = torch.rand(1, 3, 24, 20) * 255
    base = Pipeline(model)(x, r3=False, blend=True)
    ext = Pipeline(model, Extended)
    assert torch.equal(ext(x, r3=False, blend=True), base)  # off by default
    got = ext(x, r3=False, blend=True, double=True, offset=5.0)
    torch.testing.assert_close(got, 2 * base + 5, rtol=0, atol=1e-4)
    assert not torch.allclose(got, 2 * (base + 5))
    with pytest.raises(ConfigError, match=r"offset must be a number -10\.\.10, got 50"):
        ext(x, offset=50.0)
    import argparse
    p = argparse.ArgumentParser()
    add_inference_options(p, Extended)
    a = p.parse_args(["--double", "--offset", "2.5", "--no-blend"])
    assert (a.double, a.offset, a.blend, a.r3) == (True, 2.5, False, None)
    assert check_inference({"offset": 1}, Extended, partial=True) == {"offset": 1.0}


# ------------------------------------------------------------------ one declaration

def test_cli_flags_come_from_the_declaration(capsys):
    with pytest.raises(SystemExit):
        main(["denoise", "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(InferenceConfig):
        flag = f.metadata["flag"]
        assert flag in text, flag
        if f.type == "bool":
            assert f"--no-{flag[2:]}" in text, flag
    assert set(inference_field_names()) == {f.name for f in dataclasses.fields(InferenceConfig)}


def test_presets_and_checkpoints_store_the_declared_fields(tmp_path):
    from ssbsn.presets import QUICK
    stored = InferenceConfig.stored_names()
    assert tuple(QUICK["inference"]) == stored
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=0, inference=QUICK["inference"])
    model.save(tmp_path / "m.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["ssbsn_inference"])
    assert meta == QUICK["inference"] and set(meta) == set(stored)
    # the call-only settings are not part of the stored schema
    with pytest.raises(ValueError, match="unknown inference settings: pd"):
        SSBSN(base_channels=8, num_modules=1, ss_blocks=0, inference=dict(pd=2))


def _with_inference(tmp_path, text):
    from safetensors.torch import save_file
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=0)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata=dict(ssbsn_config=json.dumps(model.config.to_dict(stored=True)),
                            ssbsn_inference=text))
    return path


@pytest.mark.parametrize("text,msg", [
    ('{"tile": 1}', r"tile must be a non-negative integer: 0 \(the whole image\) or 8\.\.65536"),
    ('{"lowpass": Infinity}', r"lowpass must be a number 0\.\.128 \(0 = off\), got inf"),
    ('{"lowpass": NaN}', r"lowpass must be a number 0\.\.128"),
    ('{"lowpass": 1e308}', r"lowpass must be a number 0\.\.128"),
    ('{"overlap": 100000}', r"overlap must be a non-negative integer 0\.\.4096"),
])
def test_metadata_that_would_hang_is_refused_naming_file_key_and_range(tmp_path, text, msg):
    path = _with_inference(tmp_path, text)
    with pytest.raises(CheckpointError, match=msg) as e:
        SSBSN.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("flag,value", [("--tile", "1"), ("--tile", "-1"), ("--lowpass", "inf"),
                                        ("--lowpass", "nan"), ("--lowpass", "1e308"),
                                        ("--pd-test", "0"), ("--overlap", "-2"),
                                        ("--seed", str(2 ** 70))])
def test_bad_flags_are_usage_errors(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["denoise", "in.png", "-o", str(tmp_path / "o"), "-w", "m.safetensors", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssbsn: error: argument " + flag) and "allowed" in err, err
    assert "\n" not in err


@pytest.mark.parametrize("cfg,given,msg", [
    (dict(pd_test=64), {}, r"pd=64 with the model's pd_pad=2 is too large for a 48×64 image"),
    (dict(pd_pad=64), {}, r"pd=2 with the model's pd_pad=64 is too large.*pd_pad 0\.\.\d+ at "),
    ({}, dict(tile=8), r"tile=8 with overlap=64 would process the 48×64 image 48 times over"),
    ({}, dict(tile=8, overlap=2, pd=64), r"pd=64"),
])
def test_settings_that_would_hang_on_this_image_are_refused_at_once(cfg, given, msg):
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=0, **cfg).eval()
    calls = []
    model.bsn.register_forward_hook(lambda *_: calls.append(1) and None)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=msg):
        model.denoise(torch.rand(1, 3, 48, 64) * 255, **given)
    assert calls == [] and time.perf_counter() - t0 < 5
    if not cfg:  # sound settings still run
        model.denoise(torch.rand(1, 3, 48, 64) * 255, tile=16, overlap=8, pd=2, r3=False)


def test_tiny_images_still_denoise_at_the_models_stride():
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=0).eval()
    for h, w in ((1, 1), (2, 3), (5, 4)):
        assert model.denoise(torch.rand(1, 3, h, w) * 255).shape == (1, 3, h, w)


# ------------------------------------------------------------------ noise statistics

def _lowest_in_bins_by_sorting(v, idx, n, fraction):
    """The selection written as sorts: by v (stable), then by bin (stable), rank in the bin."""
    order = torch.argsort(v, stable=True)
    order = order[torch.argsort(idx[order], stable=True)]
    count = torch.bincount(idx, minlength=n)
    start = torch.cumsum(count, 0) - count
    sorted_bins = idx[order]
    rank = torch.arange(v.numel()) - start[sorted_bins]
    keep = rank < (count[sorted_bins] * fraction).ceil()
    mask = torch.zeros_like(keep)
    mask[order] = keep
    return mask


@pytest.mark.parametrize("ties", [False, True])
def test_lowest_in_bins_selects_what_sorting_selects(ties):
    from ssbsn.restore.stats import lowest_in_bins
    g = torch.Generator().manual_seed(1)
    for size in (1, 7, 1000, 50_000):
        v = torch.rand(size, generator=g, dtype=torch.float64)
        if ties:
            v = (v * 5).floor()  # a handful of values: ties at every threshold
        idx = torch.randint(0, 16, (size,), generator=g)
        idx[idx == 3] = 4  # an empty bin
        for fraction in (0.0, 0.2, 0.5, 0.999, 1.0):
            want = _lowest_in_bins_by_sorting(v, idx, 16, fraction)
            assert torch.equal(lowest_in_bins(v, idx, 16, fraction), want), (size, fraction)
        assert want.any()


# ------------------------------------------------------------------ the package's shape

def test_no_private_names_cross_the_package_and_no_import_of_the_model():
    """The steps share the noise statistics through public names; ssbsn.restore runs
    without importing ssbsn.model (which imports it)."""
    root = Path(__file__).parent.parent / "ssbsn" / "restore"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"
                assert node.module != "model" and not (node.level == 2 and node.module
                                                        in ("model", "api")), path.name
    code = ("import sys, ssbsn.restore, ssbsn.restore.blend, ssbsn.restore.wiener, "
            "ssbsn.restore.debias; print('ssbsn.model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, check=True)
    assert out.stdout.strip() == "False"
