"""16-bit colour PNG (ssbsn.png), which Pillow reduces to 8 bits. Oracles: Pillow's own
decoding of the PNG files it writes (8 bits, its adaptive filters) and of ours (8-bit colour
and 16-bit grey, every filter type), a minimal unfiltered writer of the test's own, and the
same image through 16-bit TIFF (tifffile)."""
import zlib

import numpy as np
import pytest
import skimage.data
import tifffile
from PIL import Image

from ssbsn.cli import main
from ssbsn.errors import ImageError
from ssbsn.images import icc_profile, image_shape, read_image, write_image
from ssbsn.png import AVERAGE, PAETH, SUB, UP, _chunks, read_png, unfilter, write_png

from helpers import save_tiny_model, write_png16_colour


def _photo(channels):
    rgb = skimage.data.astronaut()[::2, ::2]
    return {1: rgb[..., :1], 2: rgb[..., :2], 3: rgb, 4: np.dstack([rgb, rgb[..., 1]])}[channels]


def _kinds(path, bpp):
    """The scanline filters a PNG file uses."""
    data = path.read_bytes()
    h, w = Image.open(path).size[::-1]
    idat = b"".join(p for k, p in _chunks(data) if k == b"IDAT")
    return set(unfilter(zlib.decompress(idat), h, w, bpp)[1].tolist())


@pytest.mark.parametrize("channels,mode", [(1, "L"), (2, "LA"), (3, "RGB"), (4, "RGBA")])
def test_reads_pillows_png_as_pillow_does(tmp_path, channels, mode):
    a = _photo(channels)
    Image.fromarray(a[..., 0] if channels == 1 else a, mode).save(tmp_path / "p.png")
    assert {SUB, UP, PAETH} <= _kinds(tmp_path / "p.png", channels)  # Pillow's own choices
    expected = np.asarray(Image.open(tmp_path / "p.png")).reshape(a.shape)
    np.testing.assert_array_equal(read_png(tmp_path / "p.png"), expected)


@pytest.mark.parametrize("kind", [0, SUB, UP, AVERAGE, PAETH, None])
def test_every_filter_decodes_as_pillow_and_round_trips_at_16_bits(tmp_path, kind):
    """Each filter type alone (None: the writer's per-row choice) on 8-bit RGB, read back by
    Pillow; 16-bit grey, read by Pillow; 16-bit RGBA and grey + alpha, read back here."""
    a8 = _photo(3)
    kinds = None if kind is None else np.full(a8.shape[0], kind)
    write_png(tmp_path / "c8.png", a8, kinds=kinds)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "c8.png")), a8)
    np.testing.assert_array_equal(read_png(tmp_path / "c8.png"), a8)
    if kind is None:
        assert len(_kinds(tmp_path / "c8.png", 3)) >= 3
    rng = np.random.default_rng(kind or 0)
    grey = (a8[..., :1].astype(np.uint16) * 257 + rng.integers(0, 257, a8.shape[:2] + (1,))
            ).astype(np.uint16)
    write_png(tmp_path / "g16.png", grey, kinds=kinds)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "g16.png")), grey[..., 0])
    for c in (2, 4):
        a16 = (_photo(c).astype(np.uint16) * 257 + rng.integers(0, 257, _photo(c).shape)
               ).astype(np.uint16)
        write_png(tmp_path / "c16.png", a16, kinds=kinds)
        np.testing.assert_array_equal(read_png(tmp_path / "c16.png"), a16)


def test_images_read_and_write_16_bit_colour_png(tmp_path):
    """read_image takes a 16-bit RGB PNG whole (it used to be refused), as written by a minimal
    unfiltered writer; write_image writes one (ICC profile kept) that reads back the same."""
    a = np.random.default_rng(1).integers(0, 65536, (21, 34, 3)).astype(np.uint16)
    write_png16_colour(tmp_path / "m.png", a)
    b = read_image(tmp_path / "m.png")
    assert b.dtype == np.uint16 and image_shape(tmp_path / "m.png") == a.shape
    np.testing.assert_array_equal(b, a)
    rgba = np.dstack([a, a[..., :1]])
    write_image(tmp_path / "w.png", rgba, icc_profile=b"not really a profile")
    np.testing.assert_array_equal(read_image(tmp_path / "w.png"), rgba)
    assert icc_profile(tmp_path / "w.png") == b"not really a profile"
    assert image_shape(tmp_path / "w.png") == rgba.shape


def test_damage_is_one_clear_error(tmp_path):
    a = np.random.default_rng(2).integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    write_image(tmp_path / "ok.png", a)
    data = (tmp_path / "ok.png").read_bytes()
    for name, bad in (("crc.png", data[:60] + bytes([data[60] ^ 1]) + data[61:]),
                      ("cut.png", data[:len(data) - 20])):
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(ImageError, match="damaged|truncated") as e:
            read_image(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_denoise_a_16_bit_colour_png_as_its_tiff(tmp_path):
    """The command keeps a 16-bit RGB PNG at 16 bits, and its result equals the same photo's
    through 16-bit TIFF (tifffile: an independent reader and writer)."""
    w = save_tiny_model(tmp_path / "m.safetensors", varied=True)
    a = (_photo(3)[:40, :44].astype(np.uint16) * 257 + 100).astype(np.uint16)
    write_image(tmp_path / "x.png", a)
    tifffile.imwrite(tmp_path / "x.tif", a, photometric="rgb")
    for name in ("x.png", "x.tif"):
        assert main(["denoise", str(tmp_path / name), "-o", str(tmp_path / ("o_" + name)),
                     "-w", str(w), "--no-progress"]) == 0
    png, tif = read_image(tmp_path / "o_x.png"), tifffile.imread(tmp_path / "o_x.tif")
    assert png.dtype == np.uint16 and (png % 257 != 0).mean() > 0.5  # not 8 bits scaled up
    np.testing.assert_array_equal(png, tif)
