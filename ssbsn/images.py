"""Reading and writing images: PNG/JPEG/BMP through imageio (its Pillow plugin), 16-bit colour
PNG through :mod:`ssbsn.png` (Pillow reduces it to 8 bits), TIFF through tifffile (16-bit
colour and float samples), EXIF orientation and ICC profiles through Pillow.

Images are numpy arrays of shape (H, W, C), C = 1 (grey) or 3 (RGB), optionally followed by an
alpha channel (C = 2 or 4) that :func:`split_alpha` sets aside. Supported sample types:
uint8, uint16 (16-bit PNG and TIFF, grey or colour) and float TIFF (values 0..1; a float image
with samples outside 0..1 is refused rather than clipped).
The model works on floats 0..255: :func:`to_model_range` / :func:`from_model_range` convert
and restore the original bit depth (16-bit: ×255/65535 and back, rounded).

Orientation and colour: an EXIF orientation tag (JPEG, PNG) is applied on read, so the pixels
are upright and outputs are written without the tag; :func:`icc_profile` reads an image's
embedded ICC colour profile and :func:`write_image` embeds one (PNG, JPEG, TIFF).

Every write goes to a temporary file in the destination folder that is renamed into place, so
a crash never leaves a half-written image under the final name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both orders
FLOAT_TYPES = (np.float16, np.float32, np.float64)  # kept as read: written back in the same type
MIN_SIDE = 8
ORIENTATION_TAG = 0x0112  # EXIF/TIFF Orientation
ICC_TAG = 34675  # TIFF InterColorProfile


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def is_tiff(path) -> bool:
    """Whether ``path`` holds a TIFF (classic or BigTIFF), from its first bytes: files are read
    by their content, whatever their suffix says."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return Path(path).suffix.lower() in TIFF_SUFFIXES  # the reader reports the error
    return head in TIFF_MAGIC


def _png_header(path: Path) -> dict | None:
    """The IHDR fields of a PNG (:func:`ssbsn.png.read_header`), or None if it is not one."""
    from .png import read_header
    try:
        return read_header(path)
    except (ValueError, OSError):
        return None


def _png16_colour(path: Path) -> bool:
    """Whether ``path`` is a 16-bit RGB, RGBA or grey + alpha PNG: Pillow would reduce its
    samples to 8 bits, so :mod:`ssbsn.png` reads (and writes) it."""
    header = _png_header(path)
    return (header is not None and header["bit_depth"] == 16
            and header["colour_type"] in (2, 4, 6))


def max_pixels() -> int:
    """The most pixels an image may have: Pillow's decompression-bomb limit (twice
    ``PIL.Image.MAX_IMAGE_PIXELS``), for every format, TIFF included."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    return 2 * int(limit) if limit else 2 * 89_478_485


def _too_large(path, h: int, w: int) -> ImageError:
    return ImageError(f"{path}: image too large ({w}×{h} = {h * w / 1e6:.0f} megapixels; at "
                      f"most {max_pixels() / 1e6:.0f} megapixels are read)")


def _no_bomb_warning(read):
    """Run ``read`` without Pillow's DecompressionBombWarning: :func:`max_pixels` is the
    limit here, and an image under it is read without a warning."""
    import functools
    import warnings

    @functools.wraps(read)
    def wrapper(*args, **kwargs):
        from PIL import Image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return read(*args, **kwargs)
    return wrapper


def _check_pixels(path, shape) -> None:
    if len(shape) >= 2 and int(shape[0]) * int(shape[1]) > max_pixels():
        raise _too_large(path, int(shape[0]), int(shape[1]))


# Pillow modes whose samples are not RGB: converted to RGB on read (Pillow's own conversion),
# so that a CMYK JPEG is never taken for RGB + alpha
CONVERT_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")


def _pil_probe(path: Path) -> tuple[int, str | None]:
    """(EXIF orientation 1..8, Pillow mode) of a JPEG/PNG/BMP file; (1, None) when Pillow
    cannot open it (the decoder then reports the damage). An image over :func:`max_pixels`
    is refused here, before anything is decoded."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > max_pixels():
                raise _too_large(path, h, w)
            mode = im.mode
            try:
                value = im.getexif().get(ORIENTATION_TAG, 1)
            except Exception:  # no readable EXIF
                value = 1
    except Image.DecompressionBombError:
        raise _too_large(path, *_header_size(path)) from None
    except ImageError:
        raise
    except Exception:
        return 1, None
    return (value if isinstance(value, int) and 1 <= value <= 8 else 1), mode


def _header_size(path: Path) -> tuple[int, int]:
    """(H, W) from a PNG header, (0, 0) if unknown (only for the "too large" message)."""
    header = _png_header(path)
    return (header["height"], header["width"]) if header else (0, 0)


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W, ...) pixels stored with EXIF ``orientation`` upright (what a viewer shows)."""
    if orientation in (5, 6, 7, 8):
        arr = np.swapaxes(arr, 0, 1)  # transpose, then the flip that completes the turn
        flip = {5: None, 6: 1, 7: (0, 1), 8: 0}[orientation]
    else:
        flip = {1: None, 2: 1, 3: (0, 1), 4: 0}[orientation]
    return np.flip(arr, flip) if flip is not None else arr


def icc_profile(path) -> bytes | None:
    """The ICC colour profile embedded in an image file (PNG, JPEG, TIFF), or None."""
    path = Path(path)
    try:
        if is_tiff(path):
            import tifffile
            with tifffile.TiffFile(path) as tif:
                tag = tif.pages[0].tags.get(ICC_TAG)
                return bytes(tag.value) if tag is not None else None
        from PIL import Image
        with Image.open(path) as im:
            return im.info.get("icc_profile") or None
    except Exception:
        return None


# the first bytes of the image formats the readers know
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
                *((magic, "TIFF") for magic in TIFF_MAGIC))


def _unreadable(path: Path, e: Exception) -> ImageError:
    """One line for a file the decoders refused: empty, a damaged image of a known format
    (with the decoder's reason), or not an image of any format read here."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as err:
        return ImageError(f"{path}: cannot read image ({err.strerror or err})")
    if not head:
        return ImageError(f"{path}: the file is empty")
    kind = next((k for magic, k in _IMAGE_MAGIC if head.startswith(magic)), None)
    if kind is None:
        return ImageError(f"{path}: not a PNG, JPEG, TIFF or BMP image")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ImageError(f"{path}: cannot read this {kind} image, it may be damaged ({msg})")


@_no_bomb_warning
def read_image(path) -> np.ndarray:
    """Read an image as (H, W, C) uint8, uint16 or float16/32/64 (float only from TIFF, in the
    file's own float type). CMYK (and other non-RGB colour) JPEG/PNG files are converted to
    RGB by Pillow.

    Raises :class:`ImageError` with one clear message for anything unusable: a missing,
    unreadable or truncated file, more than one page/frame, an unsupported sample type or
    channel count, NaN or Inf samples, more than :func:`max_pixels` pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        if is_tiff(path):
            import tifffile
            with tifffile.TiffFile(path) as tif:
                if len(tif.series) != 1 or len(tif.pages) != 1:
                    raise ImageError(f"{path}: multi-page TIFF files are not supported")
                page = tif.pages[0]
                _check_pixels(path, page.shape[1:] if page.planarconfig == 2
                              and len(page.shape) == 3 else page.shape)
                arr = page.asarray()
                if arr.ndim == 3 and page.planarconfig == 2:  # separate planes: (C, H, W)
                    arr = np.moveaxis(arr, 0, -1)
        else:
            import imageio.v3 as iio
            orientation, mode = _pil_probe(path)
            if _png16_colour(path):
                from .png import read_png
                arr = orient(read_png(path), orientation)
            else:
                kwargs = {"mode": "RGB"} if mode in CONVERT_TO_RGB else {}
                arr = orient(np.asarray(iio.imread(path, plugin="pillow", **kwargs)),
                             orientation)
    except ImageError:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise _unreadable(path, e) from None
    return validate_samples(np.asarray(arr), path)


@_no_bomb_warning
def image_shape(path) -> tuple[int, int, int]:
    """(H, W, C) from the file header, without decoding the pixels (a truncated file passes
    here and fails in :func:`read_image`)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    try:
        if is_tiff(path):
            import tifffile
            with tifffile.TiffFile(path) as tif:
                if len(tif.pages) != 1:
                    raise ImageError(f"{path}: multi-page TIFF files are not supported")
                page = tif.pages[0]
                shape = page.shape
                if len(shape) == 3 and page.planarconfig == 2:
                    shape = shape[1:] + shape[:1]
                _check_pixels(path, shape)
        else:
            import imageio.v3 as iio
            orientation, mode = _pil_probe(path)
            if _png16_colour(path):
                from .png import CHANNELS, read_header
                head = read_header(path)
                shape = (head["height"], head["width"], CHANNELS[head["colour_type"]])
            else:
                shape = tuple(iio.improps(path, plugin="pillow").shape)
            if mode in CONVERT_TO_RGB:  # read as RGB (see read_image)
                shape = shape[:2] + (3,)
            if orientation >= 5 and len(shape) >= 2:  # turned by 90°
                shape = (shape[1], shape[0]) + shape[2:]
    except ImageError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from None
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        shape = shape + (1,)
    if len(shape) != 3 or shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{path}: unsupported image shape {shape}; expected (H, W) or "
                         "(H, W, C) with 1 (grey) or 3 (RGB) channels, optionally with alpha")
    return shape


def validate_samples(arr: np.ndarray, path) -> np.ndarray:
    """``arr`` as (H, W, C) when its shape, type and sample range are what an image may hold
    (read from a file or given to the API); else :class:`ImageError` naming ``path``."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageError(f"{path}: expected a single 2-D image, got an array of shape {arr.shape}")
    if arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{path}: {arr.shape[-1]} channels; expected 1 (grey) or 3 (RGB), "
                         "optionally with alpha")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ImageError(f"{path}: contains NaN or Inf samples")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0.0 or hi > 1.0:  # never clip silently: the output would not be the input's
            raise ImageError(f"{path}: float samples outside 0..1 (min {lo:g}, max {hi:g}); "
                             "float images must hold values in 0..1 — rescale it first")
        if arr.dtype not in FLOAT_TYPES:
            raise ImageError(f"{path}: unsupported sample type {arr.dtype} "
                             "(expected float16, float32 or float64)")
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"{path}: unsupported sample type {arr.dtype} "
                         "(expected 8- or 16-bit unsigned, or float)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{path}: empty image")
    return arr


def split_alpha(arr: np.ndarray):
    """(colour (H, W, 1|3), alpha (H, W, 1) or None)."""
    if arr.shape[-1] in (2, 4):
        return arr[..., :-1], arr[..., -1:]
    return arr, None


def check_size(arr: np.ndarray, path="image", min_side: int = MIN_SIDE) -> None:
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(f"{path}: {h}×{w} image is too small (at least {min_side}×{min_side} "
                         "pixels)")


def max_value(dtype) -> float:
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    return 1.0  # float images: 0..1


def to_model_range(arr: np.ndarray) -> np.ndarray:
    """Samples → float32 in 0..255 (the model's range)."""
    return (arr.astype(np.float64) * (255.0 / max_value(arr.dtype))).astype(np.float32)


def from_model_range(x: np.ndarray, dtype) -> np.ndarray:
    """Float 0..255 → ``dtype`` (rounded and clipped for integer types, 0..1 for float)."""
    dtype = np.dtype(dtype)
    scaled = np.asarray(x, dtype=np.float64) * (max_value(dtype) / 255.0)
    if not np.isfinite(scaled).all():
        raise ImageError("refusing to write an image holding NaN or Inf samples")
    if dtype.kind == "f":
        return np.clip(scaled, 0.0, 1.0).astype(dtype)
    return np.clip(np.floor(scaled + 0.5), 0, max_value(dtype)).astype(dtype)


def check_writable_as(path, dtype, channels: int) -> None:
    """Refuse (:class:`ImageError` naming ``path``) an output file whose type cannot hold
    samples of ``dtype`` with ``channels`` channels (alpha included): float only as TIFF,
    16-bit only as TIFF or PNG. Called before any work is done."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageError(f"{path}: unknown image type {suffix!r} "
                         f"(use one of {', '.join(IMAGE_SUFFIXES)})")
    if suffix in TIFF_SUFFIXES:
        return
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        raise ImageError(f"{path}: float images can only be written as TIFF (use a .tif output)")
    if dtype == np.uint16 and suffix != ".png":
        raise ImageError(f"{path}: 16-bit images can only be written as PNG or TIFF "
                         "(use a .png or .tif output)")


def _encode(path: Path, arr: np.ndarray, suffix: str, quality: int, icc: bytes | None) -> None:
    if suffix in TIFF_SUFFIXES:
        import tifffile
        data = arr[..., 0] if arr.shape[-1] == 1 else arr
        photometric = "minisblack" if data.ndim == 2 or data.shape[-1] == 2 else "rgb"
        extras = ["unassalpha"] if arr.shape[-1] in (2, 4) else None
        tifffile.imwrite(path, data, photometric=photometric, extrasamples=extras,
                         iccprofile=icc)
        return
    if suffix == ".png" and arr.dtype == np.uint16 and arr.shape[-1] > 1:
        from .png import write_png  # Pillow has no 16-bit colour mode
        write_png(path, arr, icc_profile=icc)
        return
    import imageio.v3 as iio
    data = arr[..., 0] if arr.shape[-1] == 1 else arr
    kwargs = {"quality": quality} if suffix in (".jpg", ".jpeg") else {}
    if icc and suffix in (".png", ".jpg", ".jpeg"):
        kwargs["icc_profile"] = icc
    if suffix in (".jpg", ".jpeg") and arr.shape[-1] in (2, 4):
        data = arr[..., :-1] if arr.shape[-1] == 4 else arr[..., 0]
    iio.imwrite(path, data, plugin="pillow", extension=suffix, **kwargs)


def write_image(path, arr: np.ndarray, quality: int = 95, icc_profile: bytes | None = None) -> None:
    """Write (H, W, C) ``arr`` atomically (temp file in the same folder, then rename), upright
    (no orientation tag), with ``icc_profile`` embedded where the format holds one (PNG, JPEG,
    TIFF)."""
    path = Path(path)
    suffix = path.suffix.lower()
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    check_writable_as(path, arr.dtype, arr.shape[-1])
    try:
        with atomic_path(path, ".tmp" + suffix) as tmp:
            _encode(tmp, arr, suffix, quality, icc_profile)
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"{path}: cannot write image ({e.strerror or e})") from None
    except Exception as e:
        raise ImageError(f"{path}: cannot write image ({e})") from None
