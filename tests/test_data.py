"""Image I/O, metrics and dataset loaders, each on tiny files written here in the exact layout."""
import os
import stat

import h5py
import numpy as np
import pytest
import scipy.io
import tifffile
import torch

from ssbsn.data import (DNDBoxes, PatchDataset, dihedral, list_images, load_sidd_blocks,
                        open_training_source, paired_images, read_dnd_boxes, read_dnd_crop,
                        scan_sidd_medium, write_dnd_bundle, write_sidd_submission)
from ssbsn.data.patches import ArraySource, FileSource
from ssbsn.data.sidd import DataError
from ssbsn.images import (ImageError, from_model_range, image_shape, read_image,
                           to_model_range, write_image)
from ssbsn.restore.estimate import transform
from ssbsn.metrics import psnr, quantize, ssim

from helpers import make_dnd, write_png16_colour


def _rand(shape, dtype=np.uint8, seed=0):
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape).astype(dtype)


# ------------------------------------------------------------------ image I/O

@pytest.mark.parametrize("name,shape,dtype", [
    ("rgb.png", (9, 11, 3), np.uint8), ("grey.png", (9, 11), np.uint8),
    ("grey16.png", (9, 11), np.uint16), ("rgb16.tif", (9, 11, 3), np.uint16),
    ("grey16.tiff", (9, 11), np.uint16), ("rgb8.tif", (9, 11, 3), np.uint8),
    ("rgba.png", (9, 11, 4), np.uint8)])
def test_image_round_trip_keeps_values_and_bit_depth(tmp_path, name, shape, dtype):
    a = _rand(shape, dtype)
    write_image(tmp_path / name, a)
    b = read_image(tmp_path / name)
    assert b.dtype == dtype
    np.testing.assert_array_equal(b, a.reshape(b.shape))
    assert image_shape(tmp_path / name) == b.shape
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp files left


def test_jpeg_round_trip_is_close(tmp_path):
    yy, xx = np.mgrid[0:32, 0:40]
    a = np.stack([yy * 6, xx * 5, (yy + xx) * 3], axis=-1).astype(np.uint8)
    write_image(tmp_path / "x.jpg", a)
    b = read_image(tmp_path / "x.jpg")
    assert b.dtype == np.uint8 and b.shape == a.shape
    assert psnr(b, a) > 35


def test_float_tiff_and_model_range(tmp_path):
    a = np.random.default_rng(0).random((6, 7, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    b = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(to_model_range(b), a * 255, rtol=1e-6)
    u16 = np.array([[0, 257, 65535, 1000]], dtype=np.uint16)[..., None]
    np.testing.assert_allclose(to_model_range(u16)[..., 0], [[0, 1, 255, 1000 * 255 / 65535]],
                               rtol=1e-6)
    # 16-bit → model range → 16-bit is lossless
    v = _rand((5, 5, 3), np.uint16)
    np.testing.assert_array_equal(from_model_range(to_model_range(v), np.uint16), v)


@pytest.mark.parametrize("case", ["truncated", "garbage", "nan", "five_channels", "multipage",
                                  "png16_interlaced", "missing"])
def test_bad_images_raise_one_clear_error(tmp_path, case):
    p = tmp_path / "x.png"
    if case == "truncated":
        write_image(p, _rand((32, 32, 3)))
        p.write_bytes(p.read_bytes()[:60])
    elif case == "garbage":
        p.write_bytes(b"this is not a picture")
    elif case == "nan":
        p = tmp_path / "x.tif"
        a = np.ones((8, 8, 3), np.float32)
        a[3, 3, 1] = np.nan
        tifffile.imwrite(p, a, photometric="rgb")
    elif case == "five_channels":
        p = tmp_path / "x.tif"
        tifffile.imwrite(p, _rand((8, 8, 5)), photometric="minisblack", planarconfig="contig")
    elif case == "multipage":
        p = tmp_path / "x.tif"
        tifffile.imwrite(p, _rand((2, 8, 8)))
    elif case == "png16_interlaced":
        write_png16_colour(p, _rand((4, 5, 3), np.uint16), interlace=1)
    with pytest.raises(ImageError) as e:
        read_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_write_failure_leaves_nothing(tmp_path):
    with pytest.raises(ImageError):
        write_image(tmp_path / "f.png", np.zeros((4, 4, 3), np.float32))  # float needs TIFF
    with pytest.raises(ImageError):
        write_image(tmp_path / "c16.jpg", np.zeros((4, 4, 3), np.uint16))  # 16-bit JPEG
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ metrics

def test_metrics_against_numpy_and_skimage():
    from skimage.metrics import structural_similarity
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    img = np.clip(ref + rng.normal(0, 10, ref.shape), 0, 255)
    mse = np.mean((img - ref) ** 2)
    assert psnr(img, ref) == pytest.approx(10 * np.log10(255 ** 2 / mse), rel=1e-12)
    assert ssim(img, ref) == pytest.approx(
        np.mean([structural_similarity(ref[..., c], img[..., c], data_range=255)
                 for c in range(3)]), rel=1e-12)
    np.testing.assert_array_equal(quantize([-3.0, 0.49, 0.5, 254.5, 300.0]), [0, 0, 1, 255, 255])


# ------------------------------------------------------------------ folders

def test_list_images_and_pairs(tmp_path):
    (tmp_path / "noisy" / "sub").mkdir(parents=True)
    (tmp_path / "clean" / "sub").mkdir(parents=True)
    for rel in ("b.png", "a.png", "sub/c.png"):
        write_image(tmp_path / "noisy" / rel, _rand((8, 8, 3)))
        write_image(tmp_path / "clean" / rel.replace(".png", ".tif"), _rand((8, 8, 3)))
    (tmp_path / "noisy" / "notes.txt").write_text("x")
    top = list_images(tmp_path / "noisy")
    assert [p.name for p in top] == ["a.png", "b.png"]
    assert len(list_images(tmp_path / "noisy", recursive=True)) == 3
    pairs = paired_images(tmp_path / "noisy", tmp_path / "clean")
    assert [(n.stem, c.stem) for n, c in pairs] == [("a", "a"), ("b", "b"), ("c", "c")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ImageError, match="not an image"):
        list_images(tmp_path / "noisy" / "notes.txt")
    with pytest.raises(ImageError, match="no such"):
        list_images(tmp_path / "nope")
    (tmp_path / "clean" / "a.tif").unlink()
    with pytest.raises(ImageError, match="no clean image"):
        paired_images(tmp_path / "noisy", tmp_path / "clean")


# ------------------------------------------------------------------ SIDD

def make_sidd_medium(root, scenes=2, size=24):
    data = root / "Data"
    out = []
    for s in range(scenes):
        prefix = f"{s + 1:04d}"
        d = data / f"{prefix}_00{s + 1}_S6_00100_00060_3200_L"
        d.mkdir(parents=True)
        for idx in ("010", "011"):
            n, g = _rand((size, size + 4, 3), seed=2 * s), _rand((size, size + 4, 3), seed=9)
            write_image(d / f"{prefix}_NOISY_SRGB_{idx}.PNG", n)
            write_image(d / f"{prefix}_GT_SRGB_{idx}.PNG", g)
            out.append((d / f"{prefix}_NOISY_SRGB_{idx}.PNG", d / f"{prefix}_GT_SRGB_{idx}.PNG"))
    return out


def test_sidd_medium_scan_and_training_source(tmp_path):
    expected = make_sidd_medium(tmp_path / "SIDD_Medium_Srgb")
    assert scan_sidd_medium(tmp_path / "SIDD_Medium_Srgb") == expected
    assert scan_sidd_medium(tmp_path / "SIDD_Medium_Srgb" / "Data") == expected
    src, desc = open_training_source(tmp_path / "SIDD_Medium_Srgb")
    assert "SIDD Medium" in desc and len(src) == 4
    np.testing.assert_array_equal(src.load(1), read_image(expected[1][0]).astype(np.float32))
    with pytest.raises(DataError, match="no SIDD Medium"):
        scan_sidd_medium(tmp_path)


def write_mat73(path, key, arr):
    """A MATLAB v7.3 file: HDF5 with the MATLAB header in its user block, axes reversed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        f[key] = np.ascontiguousarray(arr.transpose())
    header = b"MATLAB 7.3 MAT-file, written by a test".ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM"
    with open(path, "r+b") as f:
        f.write(header)


def test_sidd_blocks_load(tmp_path):
    blocks = _rand((2, 3, 16, 16, 3))
    p = tmp_path / "ValidationNoisyBlocksSrgb.mat"
    scipy.io.savemat(p, {"ValidationNoisyBlocksSrgb": blocks})
    np.testing.assert_array_equal(load_sidd_blocks(p), blocks)
    src, _ = open_training_source(p)
    assert len(src) == 6
    np.testing.assert_array_equal(src.load(4), blocks[1, 1].astype(np.float32))
    # v7.3 (HDF5) files too
    p73 = tmp_path / "BenchmarkNoisyBlocksSrgb.mat"
    write_mat73(p73, "BenchmarkNoisyBlocksSrgb", blocks)
    np.testing.assert_array_equal(load_sidd_blocks(p73), blocks)


def test_sidd_blocks_errors(tmp_path):
    p = tmp_path / "ValidationNoisyBlocksSrgb.mat"
    scipy.io.savemat(p, {"SomethingElse": _rand((2, 2, 4, 4, 3))})
    with pytest.raises(DataError, match="no variable 'ValidationNoisyBlocksSrgb'.*SomethingElse"):
        load_sidd_blocks(p)
    scipy.io.savemat(p, {"ValidationNoisyBlocksSrgb": np.zeros((2, 4, 4, 3), np.float64)})
    with pytest.raises(DataError, match="should be uint8"):
        load_sidd_blocks(p)
    p.write_bytes(b"junk")
    with pytest.raises(DataError, match="cannot read"):
        load_sidd_blocks(p)


def test_sidd_submission_layout(tmp_path):
    blocks = _rand((3, 4, 8, 8, 3))
    out = tmp_path / "SubmitSrgb.mat"
    write_sidd_submission(out, blocks, time_mp=1.5)
    m = scipy.io.loadmat(out)
    cells = m["DenoisedBlocksSrgb"]
    assert cells.shape == (3, 4) and cells.dtype == object
    for i in range(3):
        for j in range(4):
            assert cells[i, j].dtype == np.uint8
            np.testing.assert_array_equal(cells[i, j], blocks[i, j])
    assert m["TimeMPSrgb"].item() == 1.5
    assert "MethodName" in m["OptionalData"].dtype.names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SubmitSrgb.mat"]


# ------------------------------------------------------------------ DND


def test_dnd_boxes_crops_and_source(tmp_path):
    images, boxes = make_dnd(tmp_path / "dnd")
    got = read_dnd_boxes(tmp_path / "dnd" / "info.mat")
    np.testing.assert_array_equal(got, np.stack(boxes).astype(np.int64))
    r0, c0, r1, c1 = boxes[1][2].astype(int)
    crop = read_dnd_crop(tmp_path / "dnd" / "images_srgb" / "0002.mat", boxes[1][2])
    np.testing.assert_array_equal(crop, images[1][r0 - 1:r1, c0 - 1:c1])
    assert crop.shape == (16, 16, 3)
    dnd = DNDBoxes(tmp_path / "dnd")
    assert len(dnd) == 6 and dnd.entries[4][:2] == (2, 2)
    src, desc = open_training_source(tmp_path / "dnd")
    assert "DND" in desc and len(src) == 6 and src.shape(0) == (16, 16, 3)
    np.testing.assert_allclose(src.load(5), crop * 255, rtol=1e-6)


def test_dnd_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dnd_boxes(tmp_path / "info.mat")
    with h5py.File(tmp_path / "info.mat", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DataError, match="boundingboxes"):
        read_dnd_boxes(tmp_path / "info.mat")
    with h5py.File(tmp_path / "img.mat", "w") as f:
        f["Inoisy"] = np.zeros((3, 8, 8))
    with pytest.raises(DataError, match="InoisySRGB"):
        read_dnd_crop(tmp_path / "img.mat", [1, 1, 4, 4])


def test_dnd_bundle_layout(tmp_path):
    rng = np.random.default_rng(1)
    results = {i: [rng.random((16, 16, 3)).astype(np.float32) for _ in range(3)] for i in (1, 2)}
    files = write_dnd_bundle(tmp_path / "bundled", results)
    assert [f.name for f in files] == ["0001.mat", "0002.mat"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundled"]
    m = scipy.io.loadmat(tmp_path / "bundled" / "0002.mat")
    cells = m["Idenoised"].reshape(-1)
    assert len(cells) == 3
    for k in range(3):
        assert cells[k].dtype == np.float32
        np.testing.assert_array_equal(cells[k], results[2][k])
    assert not m["israw"].item() and m["eval_version"].item() == "1.0"
    with pytest.raises(DataError, match="not an empty folder"):
        write_dnd_bundle(tmp_path / "bundled", results)


# ------------------------------------------------------------------ crops and augmentation

def test_dihedral_matches_inference_transform():
    a = np.arange(5 * 7 * 2).reshape(5, 7, 2)
    for k in range(8):
        t = transform(torch.from_numpy(a.transpose(2, 0, 1).copy()), k).numpy().transpose(1, 2, 0)
        np.testing.assert_array_equal(dihedral(a, k), t)
    assert len({dihedral(a, k).tobytes() for k in range(8)}) == 8


def _find_patch(img, patch, crop):
    for y in range(img.shape[0] - crop + 1):
        for x in range(img.shape[1] - crop + 1):
            for k in range(8):
                if np.array_equal(dihedral(img[y:y + crop, x:x + crop], k), patch):
                    return y, x, k
    return None


def test_patch_dataset_crops_are_deterministic_and_real_crops():
    imgs = [_rand((14, 17, 3), seed=s) for s in range(3)]
    ds = PatchDataset(ArraySource(imgs), crop=10, channels=3, repeat=2, seed=5)
    assert len(ds) == 6
    p = ds[4].numpy().transpose(1, 2, 0)
    assert _find_patch(imgs[1].astype(np.float32), p, 10) is not None
    again = PatchDataset(ArraySource(imgs), crop=10, channels=3, repeat=2, seed=5)
    torch.testing.assert_close(ds[4], again[4], rtol=0, atol=0)
    ds.set_epoch(1)
    positions = {_find_patch(imgs[1].astype(np.float32), ds[i].numpy().transpose(1, 2, 0), 10)
                 for i in (1, 4)}
    ds.set_epoch(0)
    positions0 = {_find_patch(imgs[1].astype(np.float32), ds[i].numpy().transpose(1, 2, 0), 10)
                  for i in (1, 4)}
    assert positions != positions0 or len(positions) == 2


def test_patch_dataset_channels_and_sizes():
    grey = [_rand((12, 12), seed=1)]
    ds = PatchDataset(ArraySource(grey), crop=10, channels=3, augment=False)
    x = ds[0]
    assert x.shape == (3, 10, 10)
    torch.testing.assert_close(x[0], x[2])
    with pytest.raises(ImageError, match="smaller than the 20×20"):
        PatchDataset(ArraySource(grey), crop=20)
    with pytest.raises(ImageError, match="channels do not fit"):
        PatchDataset(ArraySource([_rand((12, 12, 3))]), crop=10, channels=1)
    with pytest.raises(DataError):
        PatchDataset(ArraySource([]), crop=10)


def test_file_crops_are_the_whole_image_crops_and_decoded_once(tmp_path, monkeypatch):
    """FileSource.crop (the crop converted alone, from a cached decode or a TIFF memory map)
    equals cropping the whole converted image, for every sample type and layout."""
    import ssbsn.data.patches as P
    rng = np.random.default_rng(3)
    arrays = {"rgba.png": rng.integers(0, 256, (21, 19, 4), dtype=np.uint8),
              "grey.png": rng.integers(0, 256, (20, 23), dtype=np.uint8),
              "rgb16.tif": rng.integers(0, 65536, (22, 18, 3), dtype=np.uint16),
              "float.tif": rng.random((19, 20, 3)).astype(np.float32)}
    for name, a in arrays.items():
        write_image(tmp_path / name, a)
    tifffile.imwrite(tmp_path / "planar.tif", rng.integers(0, 65536, (3, 18, 17), dtype=np.uint16),
                     planarconfig="separate", photometric="rgb")
    paths = [tmp_path / n for n in [*arrays, "planar.tif"]]
    decodes = []
    real_read = P.read_image
    monkeypatch.setattr(P, "read_image", lambda p: decodes.append(p) or real_read(p))
    src = FileSource(paths)
    for i, path in enumerate(paths):
        whole = to_model_range(read_image(path)[..., :3] if path.name == "rgba.png" else
                               read_image(path))
        for y, x in [(0, 0), (3, 5), (whole.shape[0] - 7, whole.shape[1] - 7)]:
            crop = src.crop(i, y, x, 7)
            assert crop.dtype == np.float32
            np.testing.assert_array_equal(crop, whole[y:y + 7, x:x + 7])
    # decoded once each; the uncompressed integer TIFFs are memory-mapped, never decoded
    assert sorted(p.name for p in decodes) == ["float.tif", "grey.png", "rgba.png"]
    assert isinstance(src.native(2), np.memmap) and isinstance(src.native(4), np.memmap)


def test_decoded_cache_keeps_the_recent_images_within_its_budget():
    from ssbsn.data.patches import DecodedCache
    cache = DecodedCache(budget=3000)
    for k in range(4):
        cache.put(k, np.zeros(1000, np.uint8))
    assert cache.get(0) is None and cache.used == 3000  # the oldest went
    cache.get(1)  # now the most recent
    cache.put(9, np.zeros(1000, np.uint8))
    assert cache.get(2) is None and cache.get(1) is not None
    cache.put("big", np.zeros(5000, np.uint8))  # larger than the budget: not kept
    assert cache.get("big") is None and cache.used <= 3000


# ------------------------------------------------------------------ file permissions

@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path, umask):
    from ssbsn import SSBSN
    from ssbsn.atomic import write_text_atomic
    for mask in (0o022, 0o027, 0o002):
        umask(mask)
        d = tmp_path / f"m{mask:o}"
        d.mkdir()
        (d / "plain").write_text("x")  # what open() gives under this umask
        want = _mode(d / "plain")
        assert want == 0o666 & ~mask
        write_image(d / "a.png", _rand((8, 8, 3)))
        write_image(d / "a.tif", _rand((8, 8, 3), np.uint16))
        write_text_atomic(d / "c.yaml", "a: 1\n")
        SSBSN(base_channels=8, num_modules=1, ss_blocks=1).save(d / "m.safetensors")
        write_sidd_submission(d / "SubmitSrgb.mat", _rand((1, 2, 8, 8, 3)))
        write_dnd_bundle(d / "bundle", {1: [np.zeros((4, 4, 3), np.float32)]})
        for name in ("a.png", "a.tif", "c.yaml", "m.safetensors", "SubmitSrgb.mat",
                     "bundle/0001.mat"):
            assert _mode(d / name) == want, (name, oct(_mode(d / name)))
        assert _mode(d / "bundle") == 0o777 & ~mask
    # replacing a file keeps its mode, as writing into it would
    umask(0o022)
    p = tmp_path / "keep.png"
    write_image(p, _rand((8, 8, 3)))
    os.chmod(p, 0o604)
    write_image(p, _rand((8, 8, 3), seed=1))
    assert _mode(p) == 0o604


# ------------------------------------------------------------------ orientation and colour profile

def _srgb_icc():
    ImageCms = pytest.importorskip("PIL.ImageCms")
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_is_applied_on_read(tmp_path, orientation):
    from PIL import Image, ImageOps
    a = np.zeros((16, 24, 3), np.uint8)
    a[:8, :8] = 255  # a corner marker, so every orientation differs
    a[..., 1] = np.arange(24, dtype=np.uint8) * 10
    p = tmp_path / "o.png"  # PNG keeps the pixels exact (its eXIf chunk holds the tag)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(p, exif=exif)
    with Image.open(p) as im:
        upright = np.asarray(ImageOps.exif_transpose(im))  # Pillow as the oracle
    got = read_image(p)
    np.testing.assert_array_equal(got, upright)
    assert image_shape(p) == got.shape


def test_jpeg_orientation_6_and_icc_profile_survive_a_round_trip(tmp_path):
    from PIL import Image
    from ssbsn.images import icc_profile
    icc = _srgb_icc()
    yy, xx = np.mgrid[0:16, 0:24]
    a = np.stack([yy * 12, xx * 9, (yy + xx) * 5], -1).astype(np.uint8)
    p = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: a viewer rotates 90° clockwise
    Image.fromarray(a).save(p, exif=exif, icc_profile=icc, quality=98)
    got = read_image(p)
    assert got.shape == (24, 16, 3)
    assert psnr(got, np.rot90(a, -1)) > 30  # upright pixels
    assert icc_profile(p) == icc
    for name in ("out.jpg", "out.png", "out.tif"):
        write_image(tmp_path / name, got, icc_profile=icc)
        assert icc_profile(tmp_path / name) == icc
        with Image.open(tmp_path / name) as im:
            assert im.getexif().get(0x0112, 1) == 1  # written upright, without a turn
    tifffile.imwrite(tmp_path / "t.tif", a, photometric="rgb", iccprofile=icc)
    assert icc_profile(tmp_path / "t.tif") == icc
    assert icc_profile(tmp_path / "out.png") == icc


def test_sidd_blocks_found_in_a_renamed_file(tmp_path):
    blocks = _rand((1, 2, 8, 8, 3))
    scipy.io.savemat(tmp_path / "val.mat", {"ValidationNoisyBlocksSrgb": blocks})
    np.testing.assert_array_equal(load_sidd_blocks(tmp_path / "val.mat"), blocks)
    write_mat73(tmp_path / "bench.mat", "BenchmarkNoisyBlocksSrgb", blocks)
    np.testing.assert_array_equal(load_sidd_blocks(tmp_path / "bench.mat"), blocks)
    with pytest.raises(DataError, match="no variable 'ValidationGtBlocksSrgb'.*found: "
                                        "ValidationNoisyBlocksSrgb"):
        load_sidd_blocks(tmp_path / "val.mat", ("ValidationGtBlocksSrgb",))


def test_float_image_outside_0_1_is_refused_not_clipped(tmp_path):
    a = np.full((8, 8, 3), 0.25, np.float32)
    a[0, 0, 0] = -0.5
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    with pytest.raises(ImageError, match=r"outside 0\.\.1 \(min -0\.5"):
        read_image(tmp_path / "f.tif")
