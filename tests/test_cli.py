"""The ``ssbsn`` command: outputs against direct model calls and skimage metrics, and every kind
of bad input → one clear line on stderr, non-zero exit, nothing written, inputs untouched."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import tifffile
import torch

from ssbsn import SSBSN
from ssbsn.cli import main
from ssbsn.images import read_image, write_image
from ssbsn.metrics import psnr, quantize, ssim

from helpers import TINY, save_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def model(weights):
    return SSBSN.load(weights, fused=True).eval()


def _img(shape, dtype=np.uint8, seed=0):
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape).astype(dtype)


def _denoise(model, x255, **kw):
    t = torch.from_numpy(np.ascontiguousarray(x255.transpose(2, 0, 1), dtype=np.float32))[None]
    return model.denoise(t, **kw)[0].numpy().transpose(1, 2, 0).astype(np.float64)


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ help and entry points

def test_help_of_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    top = capsys.readouterr().out
    for cmd in ("demo", "train", "denoise", "eval", "attention-map", "submit", "prep"):
        assert cmd in top
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert len(capsys.readouterr().out) > 300


def test_every_option_and_argument_is_explained():
    """Every option and positional argument of every command has a help text."""
    import argparse

    from ssbsn.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [(name, a.option_strings or a.dest) for name, p in sub.choices.items()
            for a in p._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert not bare, bare


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "ssbsn", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ssbsn ")


# ------------------------------------------------------------------ denoise

@pytest.mark.parametrize("name,shape,dtype", [
    ("rgb.png", (20, 22, 3), np.uint8), ("grey.png", (20, 22), np.uint8),
    ("rgb16.tif", (20, 22, 3), np.uint16), ("grey16.tif", (21, 23), np.uint16),
    ("rgba.png", (20, 22, 4), np.uint8)])
def test_denoise_formats_match_the_model(tmp_path, weights, model, name, shape, dtype):
    src = tmp_path / "in" / name
    src.parent.mkdir()
    a = _img(shape, dtype)
    write_image(src, a)
    out = tmp_path / "out"
    r3 = name == "rgb.png"  # R3 once; the other formats without it (faster)
    assert main(["denoise", str(src), "-o", str(out), "-w", str(weights), "--device", "cpu"]
                + ([] if r3 else ["--no-r3"])) == 0
    got = read_image(out / name)
    assert got.dtype == dtype and got.shape == read_image(src).shape
    a3 = a.reshape(got.shape)
    colour = a3[..., :3] if a3.shape[-1] >= 3 else a3[..., :1]
    scale = np.iinfo(dtype).max / 255.0
    x = colour / scale
    if x.shape[-1] == 1:  # grey through an RGB model: replicated, then averaged
        y = _denoise(model, np.repeat(x, 3, axis=-1), r3=r3).mean(axis=-1, keepdims=True)
    else:
        y = _denoise(model, x, r3=r3)
    expected = np.clip(np.floor(y * scale + 0.5), 0, np.iinfo(dtype).max)
    np.testing.assert_allclose(got[..., :colour.shape[-1]], expected, atol=1)
    assert np.mean(got[..., :colour.shape[-1]] == expected) > 0.99
    if a3.shape[-1] == 4:
        np.testing.assert_array_equal(got[..., 3], a3[..., 3])  # alpha untouched


def test_denoise_folder_and_authors_checkpoint(tmp_path, weights, model):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    write_image(d / "a.png", _img((16, 18, 3), seed=1))
    write_image(d / "sub" / "b.png", _img((18, 16, 3), seed=2))
    before = _digest(d)
    # the authors' layout: {"model_weight": {"denoiser": {"bsn.<key>": ...}}} with X.wqk keys
    state = {"bsn." + k.replace(".attn.wqk", ".wqk"): v for k, v in model.bsn.state_dict().items()}
    pth = tmp_path / "authors.pth"
    torch.save({"model_weight": {"denoiser": state}}, pth)
    assert main(["denoise", str(d), "-o", str(tmp_path / "o1"), "-w", str(weights), "--no-r3"]) == 0
    assert main(["denoise", str(d), "-o", str(tmp_path / "o2"), "-w", str(pth), "--no-r3"]) == 0
    for rel in ("a.png", "sub/b.png"):
        a = read_image(tmp_path / "o1" / rel)
        np.testing.assert_array_equal(a, read_image(tmp_path / "o2" / rel))
        y = _denoise(model, read_image(d / rel).astype(np.float64), r3=False)
        assert np.abs(a.astype(np.float64) - y).max() <= 0.5 + 1e-3
    assert _digest(d) == before


def test_denoise_self_ensemble_and_tiles(tmp_path, weights, model):
    src = tmp_path / "a.png"
    write_image(src, _img((16, 18, 3), seed=3))
    assert main(["denoise", str(src), "-o", str(tmp_path / "o"), "-w", str(weights), "--no-r3",
                 "--self-ensemble", "--tile", "10", "--overlap", "4", "--seed", "3"]) == 0
    y = _denoise(model, read_image(src).astype(np.float64), r3=False, self_ensemble=True,
                 tile=10, overlap=4, seed=3)
    got = read_image(tmp_path / "o" / "a.png").astype(np.float64)
    assert np.abs(got - y).max() <= 0.5 + 1e-3


def test_denoise_single_file_to_file_and_overwrite_rules(tmp_path, weights, capsys):
    src = tmp_path / "x.png"
    write_image(src, _img((16, 16, 3)))
    before = src.read_bytes()
    assert main(["denoise", str(src), "-o", str(tmp_path / "y.png"), "-w", str(weights)]) == 0
    assert (tmp_path / "y.png").is_file()
    capsys.readouterr()
    # refuses to replace an existing output, and an input above all, unless told
    assert main(["denoise", str(src), "-o", str(tmp_path / "y.png"), "-w", str(weights)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["denoise", str(src), "-o", str(src), "-w", str(weights)]) == 1
    assert "is an input" in capsys.readouterr().err
    assert src.read_bytes() == before
    assert main(["denoise", str(src), "-o", str(src), "-w", str(weights), "--overwrite"]) == 0
    assert src.read_bytes() != before


def test_weights_may_be_the_run_folder(tmp_path, weights, capsys):
    """-w RUN reads RUN/model.safetensors, the file 'ssbsn train' prints; a folder without it
    is one line, and nothing is written."""
    import shutil
    src = tmp_path / "x.png"
    write_image(src, _img((16, 16, 3)))
    (tmp_path / "run").mkdir()
    shutil.copy(weights, tmp_path / "run" / "model.safetensors")
    assert main(["denoise", str(src), "-o", str(tmp_path / "a.png"), "-w", str(weights)]) == 0
    assert main(["denoise", str(src), "-o", str(tmp_path / "b.png"),
                 "-w", str(tmp_path / "run")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    capsys.readouterr()
    (tmp_path / "unfinished" / "ckpt").mkdir(parents=True)
    assert main(["denoise", str(src), "-o", str(tmp_path / "c.png"),
                 "-w", str(tmp_path / "unfinished")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssbsn: error: ") and err.count("\n") == 1
    assert "folder without model.safetensors" in err
    assert not (tmp_path / "c.png").exists()


def test_several_images_to_one_image_name_are_refused(tmp_path, weights, capsys):
    """An output with an image suffix names one file: several images, or a folder of them,
    are refused (one line, nothing written) instead of filling a folder named like an image;
    a folder that exists under such a name still receives them."""
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        write_image(tmp_path / "in" / name, _img((16, 16, 3)))
    out = tmp_path / "clean.png"
    for inputs in ([tmp_path / "in" / "a.png", tmp_path / "in" / "b.png"], [tmp_path / "in"]):
        code = main(["denoise", *map(str, inputs), "-o", str(out), "-w", str(weights)])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("ssbsn: error: ") and err.count("\n") == 1, err
        assert "names one image file" in err and not out.exists()
    (tmp_path / "in" / "b.png").unlink()
    assert main(["denoise", str(tmp_path / "in"), "-o", str(out), "-w", str(weights)]) == 1
    assert "the folder" in capsys.readouterr().err and not out.exists()
    out.mkdir()
    assert main(["denoise", str(tmp_path / "in"), "-o", str(out), "-w", str(weights)]) == 0
    assert _digest(out).keys() == {Path("a.png")}


def test_one_image_to_a_name_with_another_suffix(tmp_path, weights, capsys):
    """One image to ``x.webp`` or ``out.txt`` is refused with one line (it used to become a
    folder of that name holding a PNG); a name ending in / or an existing folder is a folder
    whatever its suffix."""
    src = tmp_path / "a.png"
    write_image(src, _img((16, 16, 3)))
    for name in ("x.webp", "out.txt", "v2.0"):
        code = main(["denoise", str(src), "-o", str(tmp_path / name), "-w", str(weights)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "cannot write" in err, err
        assert not (tmp_path / name).exists()
    assert main(["denoise", str(src), "-o", str(tmp_path / "v1.0") + "/", "-w",
                 str(weights)]) == 0
    (tmp_path / "v2.0").mkdir()
    assert main(["denoise", str(src), "-o", str(tmp_path / "v2.0"), "-w", str(weights)]) == 0
    assert _digest(tmp_path / "v1.0") == _digest(tmp_path / "v2.0") != {}


# ------------------------------------------------------------------ bad input

def _bad_input(tmp_path, case):
    """(argv, folder of inputs that must stay untouched, outputs that must not appear)."""
    inp = tmp_path / "in"
    inp.mkdir()
    out = tmp_path / "out"
    good = inp / "good.png"
    write_image(good, _img((16, 16, 3)))
    argv = None
    if case == "truncated":
        bad = inp / "bad.png"
        write_image(bad, _img((32, 32, 3)))
        bad.write_bytes(bad.read_bytes()[:80])
    elif case == "empty_folder":
        (inp / "empty").mkdir()
        argv = ["denoise", str(inp / "empty"), "-o", str(out)]
    elif case == "one_pixel":
        write_image(inp / "tiny.png", _img((1, 1, 3)))
    elif case == "channels":
        tifffile.imwrite(inp / "five.tif", _img((16, 16, 5)), photometric="minisblack",
                         planarconfig="contig")
    elif case == "nan":
        a = np.full((16, 16, 3), 0.5, np.float32)
        a[2, 2, 0] = np.inf
        tifffile.imwrite(inp / "nan.tif", a, photometric="rgb")
    elif case == "not_writable":
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "out"  # a folder under a regular file: never writable
    elif case == "readonly_dir":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        out.mkdir()
        out.chmod(0o500)
    return argv or ["denoise", str(inp), "-o", str(out)], inp, out


BAD_CASES = ["truncated", "empty_folder", "one_pixel", "channels", "nan", "not_writable",
             "readonly_dir"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_no_output(tmp_path, weights, capsys, case):
    argv, inp, out = _bad_input(tmp_path, case)
    before = _digest(inp)
    code = main(argv + ["-w", str(weights)])
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssbsn: error: "), err
    assert "Traceback" not in err
    assert _digest(inp) == before
    if out.is_dir():
        assert not [p for p in out.rglob("*") if p.is_file()]
    assert not list(inp.rglob("*.tmp*"))


def test_bad_input_in_a_real_process(tmp_path, weights):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    r = subprocess.run([sys.executable, "-m", "ssbsn", "denoise", str(bad), "-o",
                        str(tmp_path / "o"), "-w", str(weights)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("ssbsn: error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_checkpoint_errors(tmp_path, capsys):
    img = tmp_path / "x.png"
    write_image(img, _img((16, 16, 3)))
    other = SSBSN(base_channels=16, num_modules=2, ss_blocks=1)
    state = {"bsn." + k: v for k, v in other.bsn.state_dict().items()}
    state.pop("bsn.tail.0.bias")
    torch.save({"model_weight": {"denoiser": state}}, tmp_path / "partial.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    torch.save({"model_weight": {"denoiser": {"x": [1, 2]}}}, tmp_path / "lists.pth")
    for ckpt, msg in (("partial.pth", "does not match"), ("junk.safetensors", "cannot read"),
                      ("missing.pth", "not found"), ("lists.pth", "")):
        code = main(["denoise", str(img), "-o", str(tmp_path / "o"), "-w", str(tmp_path / ckpt)])
        err = capsys.readouterr().err
        assert code == 1 and err.startswith("ssbsn: error: ") and msg in err, err
        assert err.count("\n") == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_rgb_image_through_grey_model_is_refused(tmp_path, capsys):
    w = tmp_path / "grey.safetensors"
    SSBSN(in_channels=1, **TINY).save(w)
    img = tmp_path / "x.png"
    write_image(img, _img((16, 16, 3)))
    assert main(["denoise", str(img), "-o", str(tmp_path / "o"), "-w", str(w)]) == 1
    assert "1-channel" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# ------------------------------------------------------------------ eval

def test_eval_folder_pairs_report(tmp_path, weights, model, capsys):
    for sub in ("noisy", "clean"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    clean = [rng.integers(60, 200, (18, 20, 3)).astype(np.uint8) for _ in range(2)]
    for i, c in enumerate(clean):
        write_image(tmp_path / "pairs" / "clean" / f"{i}.png", c)
        write_image(tmp_path / "pairs" / "noisy" / f"{i}.png",
                    np.clip(c + rng.normal(0, 15, c.shape), 0, 255).astype(np.uint8))
    report = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "pairs"), "-w", str(weights), "--json", str(report),
                 "--no-r3"]) == 0
    out = capsys.readouterr().out
    assert "mean over 2 images" in out
    r = json.loads(report.read_text())
    assert len(r["images"]) == 2
    for i, row in enumerate(r["images"]):
        noisy = read_image(tmp_path / "pairs" / "noisy" / f"{i}.png").astype(np.float64)
        den = quantize(_denoise(model, noisy, r3=False))
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity
        assert row["psnr"] == pytest.approx(
            peak_signal_noise_ratio(clean[i].astype(np.float64), den.astype(np.float64),
                                    data_range=255), abs=0.05)
        assert row["ssim"] == pytest.approx(
            structural_similarity(clean[i].astype(np.float64), den.astype(np.float64),
                                  channel_axis=-1, data_range=255), abs=2e-3)
        assert row["psnr_noisy"] == pytest.approx(psnr(noisy, clean[i]), rel=1e-12)
    assert r["mean"]["psnr"] == pytest.approx(np.mean([x["psnr"] for x in r["images"]]))


def test_eval_sidd_validation_mat(tmp_path, weights, model):
    rng = np.random.default_rng(1)
    gt = rng.integers(50, 200, (2, 2, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(gt + rng.normal(0, 10, gt.shape), 0, 255).astype(np.uint8)
    scipy.io.savemat(tmp_path / "ValidationNoisyBlocksSrgb.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})
    report = tmp_path / "val.json"
    assert main(["eval", str(tmp_path), "-w", str(weights), "--json", str(report),
                 "--limit", "3", "--no-r3"]) == 0
    rows = json.loads(report.read_text())["images"]
    assert [r["image"] for r in rows] == ["00_00", "00_01", "01_00"]
    den = quantize(_denoise(model, noisy[1, 0].astype(np.float64), r3=False))
    assert rows[2]["psnr"] == pytest.approx(psnr(den, gt[1, 0]), abs=0.05)
    assert rows[2]["ssim"] == pytest.approx(ssim(den, gt[1, 0]), abs=2e-3)


def test_eval_mat_without_expected_key(tmp_path, weights, capsys):
    scipy.io.savemat(tmp_path / "ValidationNoisyBlocksSrgb.mat", {"wrong": np.zeros((1, 1, 8, 8, 3), np.uint8)})
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": np.zeros((1, 1, 8, 8, 3), np.uint8)})
    assert main(["eval", str(tmp_path / "ValidationNoisyBlocksSrgb.mat"), "-w", str(weights),
                 "--json", str(tmp_path / "r.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssbsn: error: ") and "no variable 'ValidationNoisyBlocksSrgb'" in err
    assert not (tmp_path / "r.json").exists()


def test_train_mat_without_expected_key(tmp_path, capsys):
    scipy.io.savemat(tmp_path / "BenchmarkNoisyBlocksSrgb.mat", {"x": np.zeros((1, 1, 8, 8, 3), np.uint8)})
    assert main(["train", str(tmp_path / "BenchmarkNoisyBlocksSrgb.mat"), "--out",
                 str(tmp_path / "run"), "--steps", "1", "--no-progress"]) == 1
    assert "no variable 'BenchmarkNoisyBlocksSrgb'" in capsys.readouterr().err


# ------------------------------------------------------------------ submissions

def test_submit_sidd(tmp_path, weights, model):
    blocks = np.random.default_rng(2).integers(0, 256, (2, 3, 16, 16, 3)).astype(np.uint8)
    scipy.io.savemat(tmp_path / "BenchmarkNoisyBlocksSrgb.mat", {"BenchmarkNoisyBlocksSrgb": blocks})
    out = tmp_path / "SubmitSrgb.mat"
    assert main(["submit", "sidd", str(tmp_path / "BenchmarkNoisyBlocksSrgb.mat"), "-o", str(out),
                 "-w", str(weights), "--no-r3"]) == 0
    cells = scipy.io.loadmat(out)["DenoisedBlocksSrgb"]
    assert cells.shape == (2, 3)
    expected = quantize(_denoise(model, blocks[1, 2].astype(np.float64), r3=False))
    assert np.abs(cells[1, 2].astype(int) - expected.astype(int)).max() <= 1


def test_submit_dnd(tmp_path, weights, model):
    from helpers import make_dnd
    images, boxes = make_dnd(tmp_path / "dnd", n_images=2, n_boxes=2)
    out = tmp_path / "bundle"
    assert main(["submit", "dnd", str(tmp_path / "dnd"), "-o", str(out), "-w", str(weights),
                 "--no-r3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0001.mat", "0002.mat"]
    m = scipy.io.loadmat(out / "0002.mat")
    cells = m["Idenoised"].reshape(-1)
    r0, c0, r1, c1 = boxes[1][1].astype(int)
    x = images[1][r0 - 1:r1, c0 - 1:c1] * np.float32(255)
    expected = quantize(_denoise(model, x, r3=False)) / 255.0
    assert cells[1].dtype == np.float32 and cells[1].shape == expected.shape
    assert np.abs(cells[1] - expected).max() <= 1 / 255 + 1e-6
    assert m["eval_version"].item() == "1.0"


# ------------------------------------------------------------------ prep, attention map, demo

def test_prep_tiles(tmp_path):
    from ssbsn.images import icc_profile
    a = _img((30, 41, 3))
    write_image(tmp_path / "big.png", a, icc_profile=b"not really a profile")
    assert main(["prep", str(tmp_path / "big.png"), "-o", str(tmp_path / "t"), "--size", "16",
                 "--overlap", "4"]) == 0
    tiles = sorted((tmp_path / "t").iterdir())
    # rows start at 0, 12, 14 (last flush with the border); columns at 0, 12, 24, 25
    assert len(tiles) == 3 * 4
    np.testing.assert_array_equal(read_image(tmp_path / "t" / "big_00014_00025.png"),
                                  a[14:30, 25:41])
    assert icc_profile(tmp_path / "t" / "big_00014_00025.png") == b"not really a profile"
    # the overlap defaults to a quarter of the size (the authors' 128 for 512), so a small
    # --size alone works: here the same tiles as overlap 4
    assert main(["prep", str(tmp_path / "big.png"), "-o", str(tmp_path / "q"), "--size",
                 "16"]) == 0
    assert _digest(tmp_path / "q") == _digest(tmp_path / "t")


def test_attention_map_command(tmp_path, weights, capsys):
    write_image(tmp_path / "x.png", _img((24, 26, 3)))
    out = tmp_path / "attn.png"
    assert main(["attention-map", str(tmp_path / "x.png"), "--pixel", "5", "7", "-w",
                 str(weights), "-o", str(out)]) == 0
    assert read_image(out).shape[-1] in (3, 4)
    lines = capsys.readouterr().out.splitlines()
    blocks = [ln for ln in lines if "x uniform" in ln]  # one line per SS-Block
    assert len(blocks) == 2 and "grid 4" in blocks[0] and "grid 6" in blocks[1], lines
    assert main(["attention-map", str(tmp_path / "x.png"), "--pixel", "30", "7", "-w",
                 str(weights), "-o", str(tmp_path / "b.png")]) == 1
    assert "outside" in capsys.readouterr().err


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out), "--device", "cpu"]) == 0
    text, err = capsys.readouterr()
    assert "PSNR gain" in text and "\rtrain:" not in err  # --quick: no training bar
    report = json.loads((out / "report.json").read_text())
    # three steps have not taught it to denoise: the training check says so as every warning
    assert report["check"]["ok"] is False and "training failed" not in text
    assert err.splitlines() == ["ssbsn: " + report["check"]["message"]], err
    for row in report["images"]:
        clean = read_image(out / "clean" / f"{row['image']}.png")
        noisy = read_image(out / "noisy" / f"{row['image']}.png")
        den = read_image(out / "denoised" / f"{row['image']}.png")
        assert row["psnr_noisy"] == pytest.approx(psnr(noisy, clean), rel=1e-9)
        assert row["psnr_denoised"] == pytest.approx(psnr(den, clean), rel=1e-9)
        assert psnr(noisy, clean) < 40  # the noise is real
    assert (out / "run" / "model.safetensors").is_file()
    assert main(["demo", "--quick", "-o", str(out)]) == 1  # never overwrites an earlier demo
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--quick", "-o", str(out), "--overwrite", "--progress"]) == 0
    assert "\rtrain:" in capsys.readouterr().err  # the bar, asked for


def test_non_finite_output_is_never_written(tmp_path, capsys):
    torch.manual_seed(0)
    m = SSBSN(**TINY)
    with torch.no_grad():  # finite weights whose output overflows float32
        for p in m.parameters():
            p.fill_(1e5)
    w = tmp_path / "huge.safetensors"
    m.save(w)
    img = tmp_path / "x.png"
    write_image(img, _img((16, 16, 3)))
    out = tmp_path / "o"
    assert main(["denoise", str(img), "-o", str(out), "-w", str(w), "--no-r3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssbsn: error: ") and "NaN or Inf" in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_overwrite_keeps_a_normal_files_permissions(tmp_path, weights):
    old = os.umask(0o022)
    try:
        src = tmp_path / "x.png"
        write_image(src, _img((16, 16, 3)))
        assert main(["denoise", str(src), "-o", str(tmp_path / "y.png"), "-w", str(weights),
                     "--no-r3"]) == 0
        assert os.stat(tmp_path / "y.png").st_mode & 0o777 == 0o644
        os.chmod(src, 0o644)
        assert main(["denoise", str(src), "-o", str(src), "-w", str(weights), "--no-r3",
                     "--overwrite"]) == 0
        assert os.stat(src).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


def test_denoise_keeps_orientation_and_colour_profile(tmp_path, weights, model):
    from PIL import Image, ImageCms
    from ssbsn.images import icc_profile
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a = _img((16, 24, 3), seed=4)
    src = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(src, exif=exif, icc_profile=icc, quality=95)
    out = tmp_path / "o"
    assert main(["denoise", str(src), "-o", str(out), "-w", str(weights), "--no-r3"]) == 0
    got = read_image(out / "photo.jpg")
    assert got.shape == (24, 16, 3)  # upright, and no tag left to turn it again
    with Image.open(out / "photo.jpg") as im:
        assert im.getexif().get(0x0112, 1) == 1
    assert icc_profile(out / "photo.jpg") == icc
    y = _denoise(model, read_image(src).astype(np.float64), r3=False)
    assert psnr(got, np.clip(y, 0, 255)) > 30


def test_progress_per_tile_and_r3_round(tmp_path, weights, model, capsys):
    src = tmp_path / "big.png"
    write_image(src, _img((16, 24, 3), seed=6))
    base = ["denoise", str(src), "-w", str(weights), "--tile", "8", "--overlap", "2"]
    assert main(base + ["-o", str(tmp_path / "a.png"), "--progress"]) == 0
    err = capsys.readouterr().err
    # 2×3 tiles, each one pass plus T=8 R3 rounds = 54 passes through the network
    assert "/54 [" in err and "big.png" in err and "<" in err, err  # total and ETA
    calls = []
    h = model.bsn.register_forward_hook(lambda *_: calls.append(1) and None)
    try:
        _denoise(model, read_image(src).astype(np.float64), tile=8, overlap=2)
    finally:
        h.remove()
    assert len(calls) == 54  # the bar's total is the work done
    assert main(base + ["-o", str(tmp_path / "b.png"), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), read_image(tmp_path / "b.png"))


# ------------------------------------------------------------------ start-up, usage errors, crashes

def test_help_does_not_import_torch():
    code = ("import sys\nfrom ssbsn.cli import main\n"
            "for argv in (['--help'], ['denoise', '--help'], ['eval', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("argv", [["train", "--lr", "x"], ["denoise"], ["bogus"],
                                  ["denoise", "a.png", "-o", "b", "-w", "c", "--tile"]])
def test_usage_errors_are_one_line_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ssbsn: error: ") and err.count("\n") == 1, err


def test_library_warnings_are_one_line_each(tmp_path, weights, monkeypatch, capsys):
    """A multi-line warning from a library (torch's DataLoader says a paragraph) is its first
    line after 'ssbsn: warning:', once however often it is raised; --debug keeps Python's
    format with the file and line. The work itself goes on."""
    import warnings

    import ssbsn.api as api
    src = tmp_path / "x.png"
    write_image(src, _img((16, 16, 3)))
    real = api.denoise_array

    def warns(*a, **k):
        for _ in range(2):
            warnings.warn("This DataLoader will create 4 worker processes in total.\nPlease be "
                          "aware that ...", UserWarning)
        return real(*a, **k)
    monkeypatch.setattr(api, "denoise_array", warns)
    argv = ["denoise", str(src), "-o", str(tmp_path / "a.png"), "-w", str(weights)]
    assert main(argv) == 0 and (tmp_path / "a.png").is_file()
    assert capsys.readouterr().err.splitlines() == [
        "ssbsn: warning: This DataLoader will create 4 worker processes in total."]
    argv[3] = str(tmp_path / "b.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--debug"] + argv) == 0
    assert len(caught) == 2 and caught[0].filename == __file__
    assert "ssbsn: warning" not in capsys.readouterr().err


@pytest.mark.parametrize("exc,msg", [
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1440000 bytes."),
     "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "out of memory"),
    (MemoryError("Unable to allocate 3.1 GiB for an array"), "out of memory"),
    (TypeError("unsupported operand"), "internal error"),
])
def test_crashes_are_one_line_without_debug(tmp_path, weights, monkeypatch, capsys, exc, msg):
    import ssbsn.api as api
    src = tmp_path / "x.png"
    write_image(src, _img((16, 16, 3)))

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(api, "denoise_array", boom)
    argv = ["denoise", str(src), "-o", str(tmp_path / "o"), "-w", str(weights)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ssbsn: error: {msg}") and err.count("\n") == 1, err
    assert "Traceback" not in err
    if msg == "out of memory":
        assert err.startswith("ssbsn: error: out of memory: try --tile N")
    with pytest.raises(type(exc)):
        main(["--debug"] + argv)


def test_float_tiff_outside_0_1_is_refused(tmp_path, weights, capsys):
    a = np.full((16, 16, 3), 0.5, np.float32)
    a[3, 4, 1] = 1.7
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    out = tmp_path / "o"
    assert main(["denoise", str(tmp_path / "f.tif"), "-o", str(out), "-w", str(weights)]) == 1
    err = capsys.readouterr().err
    assert "outside 0..1" in err and err.count("\n") == 1, err
    assert not out.exists() or not any(out.iterdir())


def test_eval_finds_sidd_variables_in_renamed_files(tmp_path, weights, model, capsys):
    rng = np.random.default_rng(1)
    gt = rng.integers(50, 200, (1, 2, 16, 16, 3)).astype(np.uint8)
    noisy = np.clip(gt + rng.normal(0, 10, gt.shape), 0, 255).astype(np.uint8)
    scipy.io.savemat(tmp_path / "val_n.mat", {"ValidationNoisyBlocksSrgb": noisy})
    scipy.io.savemat(tmp_path / "val_c.mat", {"ValidationGtBlocksSrgb": gt})
    report = tmp_path / "r.json"
    assert main(["eval", str(tmp_path / "val_n.mat"), str(tmp_path / "val_c.mat"), "-w",
                 str(weights), "--json", str(report), "--no-r3"]) == 0
    rows = json.loads(report.read_text())["images"]
    den = quantize(_denoise(model, noisy[0, 1].astype(np.float64), r3=False))
    assert rows[1]["psnr"] == pytest.approx(psnr(den, gt[0, 1]), abs=0.05)
    # without CLEAN: the SIDD clean file beside it is found by name
    scipy.io.savemat(tmp_path / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt})
    assert main(["eval", str(tmp_path / "val_n.mat"), "-w", str(weights), "--no-r3"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("case", ["text", "no_sidd_variable", "no_clean"])
def test_eval_mat_messages_say_what_is_wrong(tmp_path, weights, capsys, case):
    p = tmp_path / "blocks.mat"
    if case == "text":
        p.write_text("this is a text file, not MATLAB\n")
        expect = "cannot read MATLAB file"
    elif case == "no_sidd_variable":
        scipy.io.savemat(p, {"x": np.zeros((1, 1, 8, 8, 3), np.uint8)})
        expect = "ValidationNoisyBlocksSrgb"
    else:
        scipy.io.savemat(p, {"ValidationNoisyBlocksSrgb": np.zeros((1, 1, 8, 8, 3), np.uint8)})
        expect = "give CLEAN"
    assert main(["eval", str(p), "-w", str(weights)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssbsn: error: ") and expect in err and err.count("\n") == 1, err
    assert "expected " + str(p) not in err  # never "expected <the same file>"
