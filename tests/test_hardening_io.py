"""Hardening of images, the Python API's inputs, data safety and progress (issue #34): each
test fails on the behaviour the issue reports and checks the fix against an independent
oracle (Pillow, numpy, a file's bytes, the network's real forward calls)."""
import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from ssbsn import Denoiser, SSBSN
from ssbsn.cli import main
from ssbsn.errors import ImageError, UserError
from ssbsn.images import image_shape, read_image, write_image

from benchmarks.hardening_probe import recorded_bars  # noqa: E402
from helpers import TINY, save_tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("w") / "m.safetensors", varied=True)


@pytest.fixture(scope="module")
def denoiser(weights):
    return Denoiser.from_weights(weights, device="cpu")


def _img(shape, dtype=np.uint8, seed=0):
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape).astype(dtype)


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssbsn: error: "), err
    assert "Traceback" not in err[0] and "internal error" not in err[0]
    return err[0]


# ------------------------------------------------------------------ images

def _cmyk_jpeg(path, shape=(24, 30)):
    from PIL import Image
    rgb = _img(shape + (3,), seed=3)
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        return np.asarray(im.convert("RGB"))  # Pillow's own conversion: the oracle


def test_cmyk_jpeg_is_read_as_pillows_rgb(tmp_path):
    expected = _cmyk_jpeg(tmp_path / "c.jpg")
    a = read_image(tmp_path / "c.jpg")
    assert a.shape == expected.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, expected)
    assert image_shape(tmp_path / "c.jpg") == expected.shape


def test_images_are_read_by_their_content_not_their_suffix(tmp_path):
    """A PNG named .tif and a 16-bit TIFF named .png read as their format's own reader (Pillow,
    tifffile) reads them under their right names, header shape included."""
    from PIL import Image
    rgb, grey16 = _img((20, 24, 3)), _img((18, 22), np.uint16, seed=1)
    Image.fromarray(rgb).save(tmp_path / "png.png")
    tifffile.imwrite(tmp_path / "tif.tif", grey16)
    (tmp_path / "png_named.tif").write_bytes((tmp_path / "png.png").read_bytes())
    (tmp_path / "tif_named.png").write_bytes((tmp_path / "tif.tif").read_bytes())
    for named, oracle in (("png_named.tif", rgb), ("tif_named.png", grey16[..., None])):
        a = read_image(tmp_path / named)
        assert a.dtype == oracle.dtype and image_shape(tmp_path / named) == oracle.shape
        np.testing.assert_array_equal(a, oracle)


@pytest.mark.parametrize("content,says", [
    (b"", "the file is empty"),
    (b"GIF89a" + bytes(40), "not a PNG, JPEG, TIFF or BMP image"),
    (b"hello, not an image", "not a PNG, JPEG, TIFF or BMP image"),
    ("truncated", "cannot read this PNG image, it may be damaged"),
])
def test_an_unreadable_image_says_what_it_is(tmp_path, content, says):
    readers = [read_image, image_shape]  # a truncated file's header still reads
    if content == "truncated":
        write_image(tmp_path / "ok.png", _img((32, 32, 3)))
        content, readers = (tmp_path / "ok.png").read_bytes()[:100], [read_image]
    (tmp_path / "x.png").write_bytes(content)
    for read in readers:
        with pytest.raises(ImageError) as e:
            read(tmp_path / "x.png")
        assert str(e.value) == f"{tmp_path / 'x.png'}: {says}" or str(e.value).startswith(
            f"{tmp_path / 'x.png'}: {says} (")


def test_cmyk_jpeg_everywhere_images_are_read(tmp_path, weights):
    """denoise (3 channels out, not 4), training crops, prep tiles and eval pairs see RGB."""
    from ssbsn.data import open_pairs, open_training_source
    from ssbsn.data.patches import PatchDataset
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _cmyk_jpeg(folder / "c.jpg")
    assert main(["denoise", str(folder / "c.jpg"), "-o", str(tmp_path / "out.png"),
                 "-w", str(weights)]) == 0
    assert read_image(tmp_path / "out.png").shape == expected.shape
    source, _ = open_training_source([str(folder)], "folder")
    crop = PatchDataset(source, 16, 3, augment=False, repeat=1, seed=0)[(0, 0)]
    assert crop.shape == (3, 16, 16)
    assert main(["prep", str(folder), "-o", str(tmp_path / "tiles"), "--size", "16",
                 "--overlap", "0"]) == 0
    tile = read_image(tmp_path / "tiles" / "c_00000_00000.png")
    np.testing.assert_array_equal(tile, expected[:16, :16])
    (tmp_path / "clean").mkdir()
    write_image(tmp_path / "clean" / "c.png", expected)
    names, load = open_pairs(folder, tmp_path / "clean")
    np.testing.assert_array_equal(load(0)[0], expected)


def _png_header_only(path, w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4)) + chunk(b"IEND", b""))


def _tiff_header_only(path, h, w):
    """A TIFF whose header claims h×w RGB pixels and holds none of them (the file is cut
    after the header)."""
    tifffile.imwrite(path, shape=(h, w, 3), dtype="uint8", photometric="rgb")
    with open(path, "r+b") as f:
        f.truncate(4096)
    with tifffile.TiffFile(path) as t:  # the header still says so
        assert t.pages[0].shape == (h, w, 3)


@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_image_bombs_are_refused_as_too_large_before_decoding(tmp_path, kind, monkeypatch):
    import tracemalloc
    path = tmp_path / ("bomb.png" if kind == "png" else "bomb.tif")
    if kind == "png":
        _png_header_only(path, 30000, 30000)
    else:
        _tiff_header_only(path, 100000, 100000)
    for f in (read_image, image_shape):
        tracemalloc.start()
        with pytest.raises(ImageError, match=r"too large.*megapixels") as e:
            f(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(path) in str(e.value) and "unknown error" not in str(e.value)
        assert peak < 64 << 20  # nothing near the image's size was allocated


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_tiff_comes_back_in_its_own_type(tmp_path, weights, dtype):
    a = np.random.default_rng(1).random((20, 24, 3)).astype(dtype)
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    b = read_image(tmp_path / "f.tif")
    assert b.dtype == dtype
    np.testing.assert_array_equal(a, b)
    assert main(["denoise", str(tmp_path / "f.tif"), "-o", str(tmp_path / "o.tif"),
                 "-w", str(weights)]) == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as t:
        assert t.pages[0].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype,shape", [(np.uint16, (20, 24, 3)), (np.uint16, (20, 24)),
                                         (np.float32, (20, 24, 3))])
def test_output_type_that_cannot_hold_the_samples_is_refused_before_the_work(
        tmp_path, weights, monkeypatch, capsys, dtype, shape):
    if dtype == np.uint16:
        a = _img(shape, np.uint16)
    else:
        a = np.random.default_rng(0).random(shape).astype(dtype)
    tifffile.imwrite(tmp_path / "in.tif", a, photometric="rgb" if len(shape) == 3 else None)
    out = tmp_path / ("o.jpg" if dtype == np.uint16 else "o.png")
    calls = []
    monkeypatch.setattr(Denoiser, "denoise_image", lambda *a, **k: calls.append(1))
    assert main(["denoise", str(tmp_path / "in.tif"), "-o", str(out), "-w", str(weights)]) == 1
    line = _one_error_line(capsys)
    assert f"{out}:" in line and ".tmp" not in line and ".tif" in line
    assert calls == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


# ------------------------------------------------------------------ the Python API's inputs

@pytest.mark.parametrize("image,what", [
    (np.random.default_rng(0).random((20, 20, 3)) * 255, "outside 0..1"),  # float 0..255
    (np.full((20, 20, 3), 7, np.int32), "int32"),
    (np.full((20, 20, 3), -3, np.int8), "int8"),
    (np.ones((20, 20, 3), bool), "boolean"),
    (np.full((20, 20, 3), np.nan, np.float32), "NaN"),
    (np.zeros((0, 20, 3), np.uint8), "empty"),
    (np.zeros((1, 20, 20, 3), np.uint8), "shape"),
    (np.zeros((20, 20, 7), np.uint8), "7 channels"),
    (np.zeros((4, 20, 3), np.uint8), "too small"),
    ([[0, 1], [2, 3]], "numpy array, got list"),
    (torch.zeros(20, 20, 3), "numpy array, got torch.Tensor"),
    (np.zeros((3, 20, 24), np.uint8), r"shape \(3, 20, 24\).*\(a \(C, H, W\) array\? transpose"),
])
def test_denoise_image_refuses_what_a_file_could_not_hold(denoiser, image, what):
    with pytest.raises(UserError, match=what):
        denoiser.denoise_image(image)


@pytest.mark.parametrize("img,what", [
    (np.full((20, 20, 3), np.nan, np.float32), "NaN or Inf"),
    (np.full((20, 20, 3), np.inf, np.float32), "NaN or Inf"),
    (np.full((20, 20, 3), 1e30, np.float32), "outside 0..255"),
    (np.full((20, 20, 3), -1.0, np.float32), "outside 0..255"),
    (np.zeros((0, 0, 3), np.float32), "empty"),
    (np.zeros((1, 20, 20, 3), np.float32), r"\(H, W, C\).*shape \(1, 20, 20, 3\)"),
    (np.zeros((3, 20, 24), np.float32), r"\(C, H, W\) array\? transpose"),
    (np.zeros((20, 20), np.float32), r"\(H, W, C\)"),
    (np.zeros((20, 20, 3), np.complex64), "complex64"),
    (np.zeros((20, 20, 3), bool), "bool"),
    (np.zeros((20, 20, 3)).tolist(), "numpy array, got list"),
    (torch.zeros(20, 20, 3), r"numpy array, got torch.Tensor \(use tensor.cpu\(\).numpy\(\)\)"),
])
def test_denoise_array_refuses_bad_arrays_with_one_message(denoiser, img, what):
    with pytest.raises(UserError, match=what):
        denoiser.denoise_array(img)


def test_denoise_image_still_takes_every_valid_type(denoiser):
    """The checks refuse nothing a file could hold: uint8, uint16, float16/32/64 in 0..1,
    grey (2-D) and alpha, each returned in its own type and shape."""
    rng = np.random.default_rng(0)
    for image in (_img((20, 22, 3)), _img((20, 22), np.uint16), _img((20, 22, 4)),
                  rng.random((20, 22, 3)).astype(np.float16), rng.random((20, 22, 1))):
        out = denoiser.denoise_image(image)
        assert out.dtype == image.dtype and out.shape == image.shape


# ------------------------------------------------------------------ models that do not denoise

def _black_model(path):
    """A model whose output is far below 0 everywhere: clipped, an all-black image."""
    torch.manual_seed(0)
    model = SSBSN(**TINY, inference=dict(r3=False))
    with torch.no_grad():
        model.bsn.tail[-1].bias.fill_(-1e4)
        model.bsn.tail[-1].weight.zero_()
    model.save(path)
    return model


def test_constant_output_of_a_non_constant_image_is_an_error(tmp_path, capsys):
    model = _black_model(tmp_path / "black.safetensors")
    x = _img((20, 22, 3))
    # the oracle: the model's own output, clipped to the image range, is one value
    y = model.denoise(torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32))[None])
    assert y.clamp(0, 255).unique().numel() == 1
    with pytest.raises(UserError, match="constant"):
        Denoiser(model).denoise_image(x)
    write_image(tmp_path / "x.png", x)
    assert main(["denoise", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "-w", str(tmp_path / "black.safetensors")]) == 1
    assert "constant" in _one_error_line(capsys) and not (tmp_path / "o.png").exists()
    # a constant image may come out constant
    flat = np.full((20, 22, 3), 90, np.uint8)
    assert (Denoiser(model).denoise_image(flat) == 0).all()


def test_a_model_whose_training_check_failed_is_refused_without_force(tmp_path, capsys):
    """Two training steps leave a network that has not learned (its check fails, as
    test_health shows); its weights file says so wherever it is copied, and denoise refuses it
    unless --force (then its all-black output is still refused)."""
    import json
    import shutil

    from helpers import noisy_folder
    from ssbsn.health import CHECK_KEY, stored_check
    imgs = noisy_folder(tmp_path / "imgs", 2, 48, 48)
    assert main(["train", str(imgs), "--channels", "8", "--modules", "1", "--ss-blocks", "0",
                 "--pd-train", "3", "--pd-pad", "0", "--crop", "24", "--batch", "2",
                 "--no-progress", "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    saved = json.loads((tmp_path / "run" / "check.json").read_text())
    assert saved["ok"] is False
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[CHECK_KEY]) == saved
    shutil.copy(tmp_path / "run" / "model.safetensors", tmp_path / "copied.safetensors")
    assert stored_check(tmp_path / "copied.safetensors") == saved
    write_image(tmp_path / "x.png", _img((24, 24, 3)))
    for w in (tmp_path / "run" / "model.safetensors", tmp_path / "copied.safetensors",
              tmp_path / "run"):
        assert main(["denoise", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                     "-w", str(w)]) == 1
        line = _one_error_line(capsys)
        assert "failed its training check" in line and "--force" in line and str(w) in line
        assert not (tmp_path / "o.png").exists()
    code = main(["denoise", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "-w", str(tmp_path / "copied.safetensors"), "--force"])
    err = capsys.readouterr().err
    assert "failed its training check" in err  # the warning, on stderr
    if code == 0:  # the network's output varies: written, with the warning
        assert read_image(tmp_path / "o.png").shape == (24, 24, 3)
    else:
        assert "constant" in err and not (tmp_path / "o.png").exists()


def _with_failed_check(weights, path):
    """A copy of ``weights`` whose metadata records a failed training check, as 'ssbsn train'
    stores one."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ssbsn.health import CHECK_KEY
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    check = dict(ratio=[1.5, 1.4, 1.6], ok=False, message="warning: training failed: ...")
    save_file(load_file(weights), str(path), metadata={**meta, CHECK_KEY: json.dumps(check)})
    return path


@pytest.mark.parametrize("name", ["failed.SAFETENSORS", "model.bin", "weights.pth"])
def test_a_failed_check_travels_with_a_renamed_file(tmp_path, weights, capsys, name):
    """The check is read from the file's content, as the weights are: a copy renamed .bin or
    .SAFETENSORS is refused as the original is, and --force warns once, in one line."""
    from ssbsn.health import stored_check
    w = _with_failed_check(weights, tmp_path / name)
    assert stored_check(w)["ok"] is False
    write_image(tmp_path / "x.png", _img((24, 24, 3)))
    args = ["denoise", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"), "-w", str(w)]
    assert main(args) == 1
    line = _one_error_line(capsys)
    assert "failed its training check" in line and "--force" in line and str(w) in line
    assert not (tmp_path / "o.png").exists()
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"ssbsn: warning: {w}: this model failed its training check (blind-spot loss "
                   "1.50 / 1.40 / 1.60 of the 8-neighbour mean's, above 1.1): it has not learned "
                   "to denoise and its outputs are not denoised images; train it again"], err
    assert read_image(tmp_path / "o.png").shape == (24, 24, 3)


def test_a_model_without_a_recorded_check_loads_quietly(weights, tmp_path, capsys):
    from ssbsn.health import stored_check
    assert stored_check(weights) is None
    write_image(tmp_path / "x.png", _img((24, 24, 3)))
    assert main(["denoise", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "-w", str(weights)]) == 0
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------ data safety

def test_denoise_skip_existing_continues_a_stopped_batch(tmp_path, weights, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_image(inp / f"{i}.png", _img((16, 18, 3), seed=i))
    out = tmp_path / "out"
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights)]) == 0
    full = _digest(out)
    (out / "1.png").unlink()  # as if stopped before the second image
    (out / "2.png").write_bytes(b"kept as it is")  # an existing output is never touched
    capsys.readouterr()
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights)]) == 1
    line = _one_error_line(capsys)
    assert "exists" in line and "--skip-existing" in line and "--overwrite" in line
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights),
                 "--skip-existing"]) == 0
    after = _digest(out)
    assert after[Path("0.png")] == full[Path("0.png")]
    assert after[Path("1.png")] == full[Path("1.png")]  # the missing one, as the first run
    assert (out / "2.png").read_bytes() == b"kept as it is"
    with pytest.raises(SystemExit) as e:  # a usage error
        main(["denoise", str(inp), "-o", str(out), "-w", str(weights), "--skip-existing",
              "--overwrite"])
    assert e.value.code == 2 and "not allowed with" in _one_error_line(capsys)


def test_denoise_into_a_folder_inside_its_input_folder(tmp_path, weights, capsys):
    """The outputs in OUT (inside the input folder) are never read as inputs: a second run
    with --skip-existing denoises nothing again and writes no OUT/OUT/..."""
    inp = tmp_path / "photos"
    inp.mkdir()
    for i in range(2):
        write_image(inp / f"{i}.png", _img((16, 18, 3), seed=i))
    out = inp / "den"
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights)]) == 0
    first = _digest(inp)
    assert sorted(str(p) for p in first) == ["0.png", "1.png", "den/0.png", "den/1.png"]
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights),
                 "--skip-existing"]) == 0
    assert _digest(inp) == first
    assert main(["denoise", str(inp), "-o", str(out), "-w", str(weights), "--overwrite"]) == 0
    assert _digest(inp) == first  # the same outputs again, none denoised twice
    only = tmp_path / "only"
    (only / "den").mkdir(parents=True)
    write_image(only / "den" / "0.png", _img((16, 18, 3)))
    capsys.readouterr()
    assert main(["denoise", str(only), "-o", str(only / "den"), "-w", str(weights)]) == 1
    assert "no images found in this folder outside the output folder" in _one_error_line(capsys)


def test_demo_never_replaces_its_files_without_overwrite(tmp_path, capsys):
    """Any file the demo writes (not only its run folder) stops it before any work."""
    out = tmp_path / "demo"
    for name in ("report.json", "denoised/rocket.png"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("precious")
        assert main(["demo", "--quick", "-o", str(out)]) == 1
        line = _one_error_line(capsys)
        assert "holds an earlier demo" in line and name.split("/")[-1] in line
        assert "--overwrite" in line
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) \
            == [name]
        (out / name).unlink()
    from ssbsn.demo import demo_outputs
    names = [p.relative_to(out).as_posix() for p in demo_outputs(out)]
    assert {"run", "report.json", "side_by_side.png", "noisy/astronaut.png",
            "denoised/rocket.png"} <= set(names)


def test_eval_json_and_save_dir_need_overwrite(tmp_path, weights, capsys):
    for seed, sub in enumerate(("noisy", "clean")):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
        write_image(tmp_path / "pairs" / sub / "a.png", _img((16, 16, 3), seed=seed))
    report, saved = tmp_path / "r.json", tmp_path / "saved"
    report.write_text("precious")
    args = ["eval", str(tmp_path / "pairs"), "-w", str(weights)]
    assert main([*args, "--json", str(report)]) == 1
    assert "--overwrite" in _one_error_line(capsys) and report.read_text() == "precious"
    saved.mkdir()
    (saved / "0000_a.png").write_bytes(b"precious")
    assert main([*args, "--save-dir", str(saved)]) == 1
    line = _one_error_line(capsys)
    assert "0000_a.png exists" in line and (saved / "0000_a.png").read_bytes() == b"precious"
    assert main([*args, "--json", str(report), "--save-dir", str(saved), "--overwrite"]) == 0
    assert report.read_text() != "precious"
    assert read_image(saved / "0000_a.png").shape == (16, 16, 3)


def test_prep_checks_every_name_before_writing_and_never_replaces(tmp_path, capsys):
    a = _img((20, 20, 3), seed=1)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    write_image(tmp_path / "x" / "p.png", a)
    write_image(tmp_path / "y" / "p.png", _img((20, 20, 3), seed=2))
    out = tmp_path / "t"
    args = ["--size", "16", "--overlap", "8"]
    # two inputs of the same name would write the same tiles
    assert main(["prep", str(tmp_path / "x"), str(tmp_path / "y"), "-o", str(out), *args]) == 1
    assert "same file name" in _one_error_line(capsys) and not out.exists()
    # a truncated second input: the first's tiles are not left behind
    write_image(tmp_path / "y" / "q.png", _img((24, 24, 3), seed=3))
    (tmp_path / "y" / "q.png").write_bytes((tmp_path / "y" / "q.png").read_bytes()[:100])
    (tmp_path / "y" / "p.png").unlink()
    assert main(["prep", str(tmp_path / "x"), str(tmp_path / "y"), "-o", str(out), *args]) == 1
    assert "q.png" in _one_error_line(capsys)
    assert not out.exists() or [p.name for p in out.iterdir()] == []
    # existing tiles are replaced only with --overwrite
    assert main(["prep", str(tmp_path / "x"), "-o", str(out), *args]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 4 tiles to {out}"
    tiles = _digest(out)
    assert len(tiles) == 4  # what it reports is what is there
    np.testing.assert_array_equal(read_image(out / "p_00004_00004.png"), a[4:20, 4:20])
    (out / "p_00000_00000.png").write_bytes(b"precious")
    assert main(["prep", str(tmp_path / "x"), "-o", str(out), *args]) == 1
    assert "--overwrite" in _one_error_line(capsys)
    assert (out / "p_00000_00000.png").read_bytes() == b"precious"
    assert main(["prep", str(tmp_path / "x"), "-o", str(out), *args, "--overwrite"]) == 0
    assert _digest(out) == tiles


def test_prep_output_inside_its_input_is_not_tiled_again(tmp_path, capsys):
    src = tmp_path / "photos"
    src.mkdir()
    write_image(src / "p.png", _img((20, 20, 3)))
    out = src / "tiles"
    args = ["prep", str(src), "-o", str(out), "--size", "16", "--overlap", "8"]
    assert main(args) == 0
    first = _digest(out)
    assert main([*args, "--overwrite"]) == 0
    assert _digest(out) == first  # the same 4 tiles, none cut from a tile
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote 4 tiles to {out}"


def test_submit_dnd_checks_the_value_range_and_honours_overwrite(tmp_path, weights, capsys):
    import h5py
    import scipy.io

    from helpers import make_dnd
    make_dnd(tmp_path / "dnd", n_images=1, n_boxes=2)
    out = tmp_path / "bundle"
    args = ["submit", "dnd", str(tmp_path / "dnd"), "-o", str(out), "-w", str(weights)]
    assert main(args) == 0
    first = scipy.io.loadmat(out / "0001.mat")["Idenoised"].reshape(-1)[0]
    assert main(args) == 1
    assert "--overwrite" in _one_error_line(capsys)
    (out / "0001.mat").write_bytes(b"old")
    assert main([*args, "--overwrite"]) == 0
    again = scipy.io.loadmat(out / "0001.mat")["Idenoised"].reshape(-1)[0]
    np.testing.assert_array_equal(again, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "dnd"]  # no leftovers
    # a folder holding anything else is never replaced
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 1
    assert "notes.txt" in _one_error_line(capsys) and (out / "notes.txt").read_text() == "mine"
    # noisy data in 0..255 instead of 0..1: refused before anything is written
    path = tmp_path / "dnd" / "images_srgb" / "0001.mat"
    with h5py.File(path, "r+") as f:
        f["InoisySRGB"][...] = f["InoisySRGB"][...] * 255
    assert main([*args[:-2], "-o", str(tmp_path / "b2"), "-w", str(weights)]) == 1
    line = _one_error_line(capsys)
    assert "outside 0..1" in line and "0001.mat" in line and not (tmp_path / "b2").exists()


def test_a_second_train_into_a_locked_run_folder_fails_with_one_line(tmp_path, capsys):
    """While another process holds the run folder (as a running 'ssbsn train' does), a train
    into it fails at once and writes nothing; once it is free, training works and leaves the
    folder free again."""
    import subprocess
    import sys

    from helpers import noisy_folder
    imgs = noisy_folder(tmp_path / "imgs", 2, 24, 24)
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
         "print('held', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["train", str(imgs), "--channels", "8", "--modules", "1", "--ss-blocks", "0",
                "--crop", "10", "--batch", "2", "--no-progress", "--steps", "2",
                "--out", str(run)]
        assert main(args) == 1
        line = _one_error_line(capsys)
        assert "in use by another 'ssbsn train'" in line and f"process {holder.pid}" in line
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0
    assert (run / "model.safetensors").is_file()
    probe = subprocess.run(
        [sys.executable, "-c", "import fcntl, os\n"
         f"fd = os.open({str(run / '.lock')!r}, os.O_RDWR)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)"])
    assert probe.returncode == 0  # released when the run ended


# ------------------------------------------------------------------ progress

def _quick_like(**inference):
    torch.manual_seed(0)
    return SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_train=3, pd_test=2, pd_pad=0,
                 r3_T=2, inference=dict(r3=False, shifts=True, blend=True, **inference)).eval()


COMBOS = [dict(tile=t, shifts=sh, blend=bl, r3=r3, self_ensemble=False)
          for t in (0, 12) for sh in (False, True) for bl in (False, True) for r3 in (False, True)]
COMBOS += [dict(tile=16, shifts=True, blend=True, r3=False, self_ensemble=True),
           dict(tile=0, shifts=False, blend=True, r3=True, self_ensemble=True, pd=3),
           dict(tile=20, overlap=5, shifts=True, blend=False, r3=False, pd=1),
           dict(tile=100, shifts=True, blend=True, r3=True)]


@pytest.mark.parametrize("options", COMBOS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_progress_total_is_the_network_calls_and_the_steps_after_them(options):
    """Every forward call of the network (hooked) is one pass of the bar's count, tiles,
    shifts, R3 rounds, self-ensemble and the blend's second estimate included; the bar ends
    exactly at its total, which adds the steps after the network."""
    import ssbsn.api as api
    model = _quick_like(wiener=False, lowpass=2.0)
    calls = []
    handle = model.bsn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    img = np.random.default_rng(0).random((33, 47, 3)).astype(np.float32) * 255
    try:
        with recorded_bars() as bars:
            api.denoise_array(model, img, progress=True, **options)
    finally:
        handle.remove()
    passes = api.network_passes(model, img.shape, **{k: v for k, v in options.items()
                                                     if k != "overlap"})
    after = api.after_network_work(model, img.shape, **{k: options[k] for k in options
                                                        if k in ("tile", "overlap", "pd",
                                                                 "blend")})
    assert passes == len(calls)
    # each pass weighed by the pixels the network gets (PD's sub-images side by side in the
    # batch; the shifts' and PD's padding are not counted)
    costs = api.pass_costs(model, img.shape, **options)
    seen = [s[0] * s[-2] * s[-1] for s in calls]
    assert len(costs) == passes
    assert sum(costs) / api.pass_cost(model) == pytest.approx(sum(seen), rel=0.2)
    assert after >= 1  # the lowpass (and the blend) are counted
    n, total = bars[-1]
    assert total == passes + after and n == total


def test_tile_window_area_is_what_the_network_sees():
    """The mean window area that weighs the steps after the network against a tiled pass is
    the mean area of the windows the network really gets (stride 1: no PD padding)."""
    from ssbsn.api import _window_area
    model = _quick_like()
    areas = []
    handle = model.bsn.register_forward_hook(lambda m, i, o: areas.append(
        i[0].shape[-2] * i[0].shape[-1]))
    x = torch.rand(1, 3, 45, 61) * 255
    try:
        for tile, overlap in ((16, 4), (20, 0), (9, 7), (64, 8)):
            areas.clear()
            with torch.no_grad():
                model.denoise(x, tile=tile, overlap=overlap, pd=1, shifts=False, blend=False,
                              r3=False, wiener=False, debias=False, lowpass=0.0)
            assert _window_area((45, 61), tile, overlap, 1) == pytest.approx(np.mean(areas))
    finally:
        handle.remove()


def test_the_steps_after_the_network_weigh_as_their_cost_says():
    """Wiener, blend, debias and lowpass add work in proportion to the image's area over a
    pass's (tiles make each pass smaller, so the same steps weigh more passes); a model with
    more weights makes them weigh fewer passes; all off adds nothing."""
    from ssbsn.api import after_network_work, pass_cost
    small, big = _quick_like(), SSBSN(base_channels=32, num_modules=2, ss_blocks=1, pd_train=3,
                                      pd_test=2, pd_pad=0, inference=dict(blend=True))
    assert pass_cost(big) > pass_cost(small)
    off = dict(wiener=False, blend=False, debias=False, lowpass=0.0)
    assert after_network_work(small, (300, 400), **off) == 0
    on = dict(wiener=True, blend=True, debias=True, lowpass=8.0)
    whole = after_network_work(small, (300, 400), **on)
    assert whole > after_network_work(small, (300, 400), **{**on, "wiener": False}) >= 1
    assert after_network_work(big, (300, 400), **on) < whole
    tiled = after_network_work(small, (300, 400), tile=64, overlap=16, **on)
    assert tiled == pytest.approx(whole * 300 * 400 / (96 * 96), rel=0.35)


def _true_remaining(profile, after):
    """The times at which each pass of ``profile`` (seconds per pass) ends and the end of the
    run (the steps after the network take ``after`` seconds)."""
    ends = list(np.cumsum(profile))
    return ends, ends[-1] + after


@pytest.mark.parametrize("warmup", [2.0, 1.3, 1.0])
@pytest.mark.parametrize("kind", ["untiled", "blend-cheaper", "tiles", "fewer-shifts"])
def test_the_eta_holds_within_30_percent_once_shown(kind, warmup):
    """Driven by a fake clock: passes whose real time is their estimated cost times one
    speed (a different one per case), the first pass ``warmup`` times as slow as the others,
    and the steps after the network taking their estimated share: no estimate until the
    second pass ends (the first pass's time does not predict the others'), then the reported
    remaining time is within 30 % of the true one at every update."""
    from ssbsn.api import PassEta
    costs = {"untiled": [1.0] * 13,                      # PD 2 × 4 shifts, PD 3 × 9 shifts
             "blend-cheaper": [1.0] * 4 + [0.93] * 9,     # the PD-3 passes a little cheaper
             "tiles": [1.0, 0.6, 1.0, 0.6, 0.36] * 4,     # tile windows of different sizes
             "fewer-shifts": [1.0] * 4 + [1.0] * 3}[kind]  # the blend with 3 of the 9 shifts
    after = 4.0 * sum(costs) / len(costs)                 # the Wiener & co. in pass units
    speed = {"untiled": 20.0, "blend-cheaper": 7.0, "tiles": 0.5, "fewer-shifts": 3.0}[kind]
    profile = [c * speed for c in costs]
    profile[0] *= warmup
    now = [0.0]
    eta = PassEta(costs, after, clock=lambda: now[0])
    ends, end = _true_remaining(profile, after * speed)
    assert eta.seconds_left() is None                      # no estimate before a pass ends
    for i, t in enumerate(ends):
        now[0] = t
        eta.tick()
        left, true = eta.seconds_left(), end - t
        if i == 0:
            assert left is None
            continue
        assert left == pytest.approx(true, rel=0.3), (kind, t, left, true)
        now[0] = t + 0.1 * profile[-1]                     # between updates it counts down
        assert eta.seconds_left() == pytest.approx(max(0.0, left - 0.1 * profile[-1]))


def test_the_bar_shows_the_eta_of_its_estimate(capsys):
    """The bar's remaining time is the :class:`PassEta`'s (a fake clock), "?" before the second
    pass ends, and the bar still counts every pass."""
    from ssbsn.api import PassEta, network_progress
    model = _quick_like()
    now = [0.0]
    eta = PassEta([1.0] * 3, 3.0, clock=lambda: now[0])
    x = torch.rand(1, 3, 12, 12)
    with network_progress(model, 3 + 1, "eta", True, eta=eta) as bar:
        assert bar.format_dict["rate"] == 0                # shown as "?"
        for t in (30.0, 50.0, 70.0):
            now[0] = t
            with torch.no_grad():
                model.bsn(x)
            if t == 30.0:
                assert bar.n == 1 and bar.format_dict["rate"] == 0
        # after the third pass: 20 s per unit of cost, 3 units left
        assert bar.n == 3 and (bar.total - bar.n) / bar.format_dict["rate"] == pytest.approx(60)
        bar.update(1)
    assert "?" in capsys.readouterr().err


def test_an_image_under_the_pixel_limit_is_read_without_a_warning(tmp_path, monkeypatch):
    """Between Pillow's warning level and the limit (here lowered to keep the image small) an
    image is read quietly: the limit, not a Python warning, is the rule."""
    import warnings

    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # warns above 300, the limit is 600
    a = _img((20, 25, 3))  # 500 pixels
    write_image(tmp_path / "a.png", a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "a.png"), a)
        assert image_shape(tmp_path / "a.png") == a.shape
    write_image(tmp_path / "b.png", _img((25, 25, 3)))  # 625 pixels: over the limit
    with pytest.raises(ImageError, match="too large"):
        read_image(tmp_path / "b.png")
