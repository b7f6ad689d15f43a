"""PNG pixels at 16 bits per sample in colour, which Pillow reduces to 8 bits: a reader and a
writer of non-interlaced PNG (the PNG specification, ISO/IEC 15948), in numpy and zlib.

Reading undoes the five scanline filters. None, Sub and Up are vectorised; Average and Paeth
predict each byte from its decoded left, upper and upper-left neighbours, so the image is
decoded one anti-diagonal at a time (a wavefront: every byte of a diagonal depends only on the
diagonals before it), H + W - 1 vector steps for an H×W image. Writing chooses each row's
filter as libpng does (the smallest sum of the filtered bytes read as signed values).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> channels (grey, RGB, grey + alpha, RGBA; palettes are Pillow's business)
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}
NONE, SUB, UP, AVERAGE, PAETH = range(5)


def read_header(path) -> dict:
    """IHDR of a PNG file: width, height, bit_depth, colour_type, interlace (ValueError if the
    file does not start as a PNG does)."""
    with open(path, "rb") as f:
        head = f.read(29)
    if len(head) < 29 or not head.startswith(SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", head[16:29])
    return dict(width=w, height=h, bit_depth=depth, colour_type=ctype, interlace=interlace)


def _chunks(data: bytes):
    """(type, payload) of every chunk, CRC checked, up to IEND."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    pos = len(SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated PNG file (no IEND chunk)")
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + n
        if end + 4 > len(data):
            raise ValueError(f"truncated PNG file (in a {kind.decode('latin-1')} chunk)")
        payload = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"damaged PNG file (CRC of a {kind.decode('latin-1')} chunk)")
        yield kind, payload
        if kind == b"IEND":
            return
        pos = end + 4


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    a, b, c = (v.astype(np.int16) for v in (a, b, c))
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c)).astype(np.uint8)


def _prediction(kind: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Filter ``kind``'s prediction of each byte from its left (a), upper (b) and upper-left
    (c) neighbours. Filtered bytes are the bytes minus it, modulo 256."""
    if kind == SUB:
        return a
    if kind == UP:
        return b
    if kind == AVERAGE:
        return ((a.astype(np.uint16) + b) >> 1).astype(np.uint8)
    if kind == PAETH:
        return _paeth(a, b, c)
    return np.zeros_like(a)


def _predict(kind: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:func:`_prediction` with a filter per byte: ``kind`` broadcasts against a, b and c."""
    pred = np.zeros_like(a)
    for k in (SUB, UP, AVERAGE, PAETH):
        pred = np.where(kind == k, _prediction(k, a, b, c), pred)
    return pred


def unfilter(stream: bytes, height: int, width: int, bpp: int) -> tuple[np.ndarray, np.ndarray]:
    """The (height, width·bpp) bytes of the image and each row's filter type, from the
    decompressed IDAT stream (a filter-type byte before each row; ``bpp`` bytes per pixel)."""
    stride = width * bpp
    rows = np.frombuffer(stream, np.uint8)
    if rows.size != height * (stride + 1):
        raise ValueError(f"damaged PNG file ({rows.size} bytes of pixels where "
                         f"{height * (stride + 1)} were expected)")
    rows = rows.reshape(height, stride + 1)
    kinds, filt = rows[:, 0].copy(), rows[:, 1:].reshape(height, width, bpp)
    if (kinds > PAETH).any():
        raise ValueError("damaged PNG file (unknown scanline filter)")
    # decoded bytes with a zero row above and a zero pixel to the left (the specification's
    # value for neighbours outside the image)
    out = np.zeros((height + 1, width + 1, bpp), np.uint8)
    flat, src = out.reshape(-1, bpp), filt.reshape(-1, bpp)
    if (kinds <= UP).all():  # no filter needs its decoded left neighbour: a row at a time
        for y in range(height):
            row = filt[y]
            if kinds[y] == SUB:
                row = np.cumsum(row, axis=0, dtype=np.uint8)  # wraps modulo 256
            elif kinds[y] == UP:
                row = row + out[y, 1:]
            out[y + 1, 1:] = row
        return out[1:, 1:].reshape(height, stride), kinds
    up = width + 1
    for d in range(height + width - 1):
        ys = np.arange(max(0, d - width + 1), min(height, d + 1))
        xs = d - ys
        at = (ys + 1) * up + xs + 1
        kind = kinds[ys][:, None]
        flat[at] = src[ys * width + xs] + _predict(kind, flat[at - 1], flat[at - up],
                                                   flat[at - up - 1])
    return out[1:, 1:].reshape(height, stride), kinds


def read_png(path) -> np.ndarray:
    """(H, W, C) uint8 or uint16 pixels of a non-interlaced grey, RGB, grey + alpha or RGBA
    PNG of 8 or 16 bits per sample."""
    data = Path(path).read_bytes()
    header, idat = None, []
    for kind, payload in _chunks(data):
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", payload[:13])
        elif kind == b"IDAT":
            idat.append(payload)
    if header is None or not idat:
        raise ValueError("damaged PNG file (no IHDR or IDAT chunk)")
    w, h, depth, ctype, _, _, interlace = header
    if ctype not in CHANNELS or depth not in (8, 16):
        raise ValueError(f"PNG colour type {ctype} at {depth} bits is read by Pillow, not here")
    if interlace:
        raise ValueError("interlaced (Adam7) 16-bit colour PNG is not supported; save it "
                         "without interlacing or as a 16-bit TIFF")
    c, size = CHANNELS[ctype], depth // 8
    try:
        stream = zlib.decompress(b"".join(idat))
    except zlib.error as e:
        raise ValueError(f"damaged PNG file ({e})") from None
    pixels, _ = unfilter(stream, h, w, c * size)
    if size == 1:
        return pixels.reshape(h, w, c)
    return pixels.reshape(h, w * c * 2).view(">u2").reshape(h, w, c).astype(np.uint16)


def _neighbours(px: np.ndarray):
    """The left, upper and upper-left bytes of (H, W, bpp) pixels (zeros outside)."""
    a, b, c = np.zeros_like(px), np.zeros_like(px), np.zeros_like(px)
    a[:, 1:], b[1:], c[1:, 1:] = px[:, :-1], px[:-1], px[:-1, :-1]
    return a, b, c


def filter_rows(pixels: np.ndarray, kinds: np.ndarray | None, bpp: int) -> np.ndarray:
    """The filtered (H, 1 + W·bpp) rows of (H, W·bpp) bytes, row y with filter ``kinds[y]``;
    None: per row, the filter whose output has the smallest sum of bytes read as signed
    values (libpng's heuristic)."""
    h, stride = pixels.shape
    px = pixels.reshape(h, -1, bpp)
    a, b, c = _neighbours(px)
    wanted = range(5) if kinds is None else sorted(set(np.asarray(kinds).tolist()))
    # the predictions use the unfiltered bytes, so every row of a kind is one vector step
    each = {k: (px - _prediction(k, a, b, c)).reshape(h, stride) for k in wanted}
    if kinds is None:
        costs = np.stack([np.abs(each[k].view(np.int8).astype(np.int32)).sum(axis=1)
                          for k in range(5)])
        kinds = np.argmin(costs, axis=0)
    kinds = np.asarray(kinds, np.uint8)
    filt = np.empty((h, stride), np.uint8)
    for k, rows in each.items():
        filt[kinds == k] = rows[kinds == k]
    return np.concatenate([kinds[:, None], filt], axis=1)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload))


def write_png(path, arr: np.ndarray, icc_profile: bytes | None = None,
              kinds: np.ndarray | None = None) -> None:
    """Write (H, W, C) uint8 or uint16 ``arr`` (C = 1..4: grey, grey + alpha, RGB, RGBA) as a
    non-interlaced PNG, each row filtered as :func:`filter_rows` chooses (or by ``kinds``)."""
    arr = np.asarray(arr)
    h, w, c = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    bpp = c * depth // 8
    pixels = np.ascontiguousarray(arr.astype(">u2") if depth == 16 else arr.astype(np.uint8))
    pixels = pixels.view(np.uint8).reshape(h, w * bpp)
    out = [SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))]
    if icc_profile:
        out.append(_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    out.append(_chunk(b"IDAT", zlib.compress(filter_rows(pixels, kinds, bpp).tobytes(), 6)))
    out.append(_chunk(b"IEND", b""))
    Path(path).write_bytes(b"".join(out))
