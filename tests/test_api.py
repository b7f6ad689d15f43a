"""The Python façade (ssbsn.Denoiser, ssbsn.evaluate), the one model configuration
(ssbsn.ModelConfig) and the package's structure (no import circles, nothing imports the CLI)."""
import argparse
import ast
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ssbsn
from ssbsn import Denoiser, ModelConfig, SSBSN, evaluate
from ssbsn.images import read_image, write_image

from helpers import TINY, save_tiny_model

PACKAGE = Path(ssbsn.__file__).parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("w") / "m.safetensors", varied=True)


def _oracle(model, x255, **kw):
    """model.denoise on an (H, W, 3) float image, by hand."""
    t = torch.from_numpy(np.ascontiguousarray(x255.transpose(2, 0, 1), np.float32))[None]
    return model.denoise(t, **kw)[0].numpy().transpose(1, 2, 0)


def _quantize(x):
    return np.clip(np.floor(x.astype(np.float64) + 0.5), 0, 255).astype(np.uint8)


def test_denoise_image_keeps_type_alpha_and_grey(weights):
    d = Denoiser.from_weights(weights, device="cpu")
    model = SSBSN.load(weights).eval()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (20, 18, 4), dtype=np.uint8)
    out = d.denoise_image(rgba)
    assert out.shape == rgba.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 3], rgba[..., 3])
    expect = _quantize(_oracle(model, rgba[..., :3].astype(np.float32)))
    assert np.abs(out[..., :3].astype(int) - expect).max() <= 1
    grey = rng.integers(0, 256, (20, 18), dtype=np.uint8)  # 2-D: through RGB, averaged back
    g = d.denoise_image(grey)
    rgb = _oracle(model, np.repeat(grey[..., None], 3, axis=-1).astype(np.float32))
    assert g.shape == grey.shape
    assert np.abs(g.astype(int) - _quantize(rgb.mean(-1))).max() <= 1
    # options: the constructor's are defaults, a call's override them
    x = rgba[..., :3].astype(np.float32)
    r3 = Denoiser(model, r3=True)
    np.testing.assert_allclose(r3.denoise_array(x), _oracle(model, x, r3=True), atol=1e-4)
    np.testing.assert_allclose(r3.denoise_array(x, r3=False), _oracle(model, x), atol=1e-4)
    assert np.abs(_oracle(model, x, r3=True) - _oracle(model, x)).max() > 0.1
    with pytest.raises(TypeError, match="unknown inference option"):
        d.denoise_image(rgba, bogus=1)


def test_denoise_files_writes_what_denoise_image_returns(weights, tmp_path, caplog):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        write_image(src / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    d = Denoiser.from_weights(weights, device="cpu")
    with caplog.at_level(logging.INFO, logger="ssbsn"):
        plan = d.denoise_files([src], tmp_path / "out")
    assert [dst.name for _, dst in plan] == ["a.png", "b.png"]
    for s, dst in plan:
        np.testing.assert_array_equal(read_image(dst), d.denoise_image(read_image(s)))
    assert sum("->" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ssbsn.UserError, match="exists; use --overwrite"):
        d.denoise_files([src], tmp_path / "out")


def test_evaluate_rows_and_means_against_skimage(weights, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    rng = np.random.default_rng(2)
    (tmp_path / "noisy").mkdir()
    (tmp_path / "clean").mkdir()
    for i in range(2):
        clean = rng.integers(60, 190, (16, 16, 3), dtype=np.uint8)
        noisy = np.clip(clean + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
        write_image(tmp_path / "noisy" / f"{i}.png", noisy)
        write_image(tmp_path / "clean" / f"{i}.png", clean)
    d = Denoiser.from_weights(weights, device="cpu")
    seen = []
    report = evaluate(d, tmp_path, on_row=seen.append)
    assert len(report["images"]) == 2 and seen == report["images"]
    for i, row in enumerate(report["images"]):
        noisy = read_image(tmp_path / "noisy" / f"{i}.png")
        clean = read_image(tmp_path / "clean" / f"{i}.png")
        out = d.denoise_image(noisy)
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(clean, out, data_range=255))
        assert row["ssim"] == pytest.approx(
            structural_similarity(clean, out, channel_axis=-1, data_range=255))
        assert row["psnr_noisy"] == pytest.approx(
            peak_signal_noise_ratio(clean, noisy, data_range=255))
    assert report["mean"]["psnr"] == pytest.approx(np.mean([r["psnr"] for r in report["images"]]))


# ------------------------------------------------------------------ one configuration

def test_model_config_is_the_model_the_checkpoint_and_the_options():
    cfg = ModelConfig(**TINY, gamma=3, backend="reference", deterministic=True)
    torch.manual_seed(0)
    a = SSBSN(cfg)
    torch.manual_seed(0)
    b = SSBSN(**TINY, gamma=3, backend="reference", deterministic=True)
    assert a.config == b.config == cfg
    attn = [m for m in a.modules() if isinstance(m, ssbsn.SSAttention)]
    assert attn and all(m.backend == "reference" and m.deterministic and m.grid in (6, 9)
                        for m in attn)
    assert a.config["fused"] is False and SSBSN(**TINY, fused=True).config.backend == "fused"
    # the command-line options: one per field, default and help from the declaration
    p = argparse.ArgumentParser()
    ssbsn.config.add_model_options(p)
    helps = {a.dest: a.help for a in p._actions}
    for f in ssbsn.config.model_fields():
        default = ({True: "on", False: "off"}[f.default] if isinstance(f.default, bool)
                   else f.default)
        assert helps[f.name] == f"{f.metadata['help']} (default {default})"
    args = p.parse_args(["--channels", "16", "--deterministic", "--backend", "sdpa"])
    assert (args.base_channels, args.deterministic, args.backend) == (16, True, "sdpa")


def test_checkpoint_schema_is_the_field_declarations(tmp_path):
    from safetensors.torch import save_file
    model = SSBSN(**TINY)
    for f in ssbsn.config.model_fields():
        if f.metadata["check"] is None or f.name in ("in_channels", "base_channels",
                                                     "num_modules", "ss_blocks"):
            continue  # (bools have no range; shape fields are checked against the weights)
        bad = {"str": "nope", "int": 10 ** 6, "float": 2.5}[str(f.type)]
        path = tmp_path / f"{f.name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
                  metadata={"ssbsn_config": f'{{"{f.name}": {bad!r}}}'.replace("'", '"')})
        with pytest.raises(ssbsn.CheckpointError, match=f"{f.name}.*{f.metadata['expected']}"):
            SSBSN.load(path)


def test_deterministic_reaches_the_attention_calls_in_training(tmp_path, monkeypatch):
    from ssbsn.cli import main
    import ssbsn.attention.module as module
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    data.mkdir()
    write_image(data / "x.png", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    calls = []
    real = module.ss_attention

    def spy(*a, **kw):
        calls.append((kw["backend"], kw["deterministic"]))
        return real(*a, **kw)
    monkeypatch.setattr(module, "ss_attention", spy)
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--steps", "1", "--crop", "20",
                 "--channels", "8", "--modules", "1", "--ss-blocks", "1", "--batch", "1",
                 "--deterministic", "--backend", "sdpa", "--no-progress",
                 "--device", "cpu"]) == 0
    assert calls and set(calls) == {("sdpa", True)}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["deterministic"] is True and saved["backend"] == "sdpa" and "fused" not in saved


def test_old_configuration_with_fused_reads_as_backend(tmp_path):
    from ssbsn.train import TrainConfig, read_config
    (tmp_path / "c.yaml").write_text("fused: false\nbase_channels: 8\n")
    cfg = read_config(tmp_path / "c.yaml")
    assert cfg.backend == "reference" and cfg.model_config().backend == "reference"
    assert TrainConfig(fused=True).backend == "fused"


# ------------------------------------------------------------------ structure and errors

def _imports(path: Path) -> set[str]:
    """Absolute names of the ssbsn modules ``path`` imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    pkg = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("ssbsn")}


def test_nothing_imports_the_cli_and_checkpoint_does_not_import_the_model():
    files = [p for p in PACKAGE.rglob("*.py") if "kernels" not in p.parts]
    for path in files:
        if path.name in ("cli.py", "__main__.py"):
            continue
        assert "ssbsn.cli" not in _imports(path), path
    assert not {"ssbsn.model", "ssbsn.model.SSBSN"} & _imports(PACKAGE / "checkpoint.py")
    assert "ssbsn.cli" not in _imports(PACKAGE / "demo.py")


def test_main_reports_own_errors_as_one_line_and_bugs_as_internal(weights, tmp_path,
                                                                  monkeypatch, capsys):
    import ssbsn.api as api
    from ssbsn.cli import main
    src = tmp_path / "x.png"
    write_image(src, np.zeros((16, 16, 3), np.uint8))
    for exc, expect in ((ssbsn.ImageError("bad pixels"), "ssbsn: error: bad pixels"),
                        (KeyError("head.0.weight"), "ssbsn: error: internal error (KeyError"),
                        (RuntimeError("CUDA error: device-side assert"),
                         "ssbsn: error: internal error (RuntimeError")):
        def boom(*a, _e=exc, **k):
            raise _e
        monkeypatch.setattr(api, "denoise_array", boom)
        assert main(["denoise", str(src), "-o", str(tmp_path / "o"), "-w", str(weights)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(expect) and err.count("\n") == 1, err


@pytest.mark.parametrize("n,size,step", [(40, 16, 12), (41, 16, 12), (16, 16, 8), (100, 33, 7)])
def test_tile_origins_cover_the_image_and_end_at_its_edge(n, size, step):
    from ssbsn.data import tile_origins
    starts = tile_origins(n, size, step)
    covered = np.zeros(n, bool)
    for s in starts:
        assert 0 <= s and s + size <= n
        covered[s:s + size] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + size == n
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))


def test_denoise_files_decodes_each_input_once(weights, tmp_path, monkeypatch):
    import ssbsn.images as images
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_image(tmp_path / "in" / name, rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    reads = []
    real = images.read_image

    def counting(path):
        reads.append(Path(path).name)
        return real(path)
    monkeypatch.setattr(images, "read_image", counting)
    d = Denoiser.from_weights(weights, device="cpu")
    d.denoise_files([tmp_path / "in"], tmp_path / "out")
    assert sorted(reads) == ["a.png", "b.png", "c.png"]
    monkeypatch.setattr(ssbsn.api, "KEEP_DECODED_BYTES", 0)  # over the budget: read again
    reads.clear()
    d.denoise_files([tmp_path / "in"], tmp_path / "out2")
    assert sorted(reads) == sorted(["a.png", "b.png", "c.png"] * 2)


@pytest.mark.parametrize("options", [dict(), dict(blend=False), dict(shifts=False, tile=24),
                                     dict(r3=True, shifts=False)])
def test_network_passes_counts_every_pass(options):
    """The progress bar's total is the number of BSN forward calls denoise really makes,
    the blend's second estimate at the training stride included (the quick preset: 4 + 9)."""
    from ssbsn.api import network_passes
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_train=3, pd_test=2, pd_pad=0,
                  r3_T=2, inference=dict(r3=False, shifts=True, blend=True)).eval()
    calls = []
    handle = model.bsn.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(1, 3, 40, 52) * 255
    with torch.no_grad():
        model.denoise(x, **options)
    handle.remove()
    assert network_passes(model, (40, 52), **options) == len(calls) > 1
