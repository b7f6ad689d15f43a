"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on the path).
The ``one_thread`` fixture is in conftest.py."""
from __future__ import annotations

import contextlib
import struct
import zlib

import h5py
import numpy as np
import torch

TINY = dict(base_channels=8, num_modules=2, ss_blocks=1)  # a model the tests can run in seconds


def save_tiny_model(path, varied: bool = False):
    """A :data:`TINY` SS-BSN (initialised with seed 0) saved to ``path``; returns ``path``.
    ``varied``: without R3 and with the last convolution scaled, so that its outputs lie around
    mid-grey and vary (8-bit results of different inputs differ)."""
    from ssbsn import SSBSN
    torch.manual_seed(0)
    model = SSBSN(**TINY, inference=dict(r3=False)) if varied else SSBSN(**TINY)
    if varied:
        with torch.no_grad():
            model.bsn.tail[-1].bias.fill_(120.0)
            model.bsn.tail[-1].weight.mul_(200.0)
    model.save(path)
    return path


@contextlib.contextmanager
def torch_threads(n: int):
    """torch runs on ``n`` threads inside the block (tiny models run fastest on one, a busy
    machine punishes two, and float sums agree with one-thread subprocesses)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_grads(fn, x, w, go):
    """(out, dx, dw) of fn(x, w) with upstream gradient go."""
    xa = x.detach().clone().requires_grad_()
    wa = w.detach().clone().requires_grad_()
    out = fn(xa, wa)
    out.backward(go)
    return out.detach(), xa.grad, wa.grad


def attention_inputs(shape, embed=None, device="cpu", offset=1.5, dtype=torch.float64):
    """SS-Attention inputs: x with a common offset (as ReLU features have), the paper's W init
    (Xavier uniform, gain 1.414), (C, embed or C)."""
    C = shape[1]
    x = torch.randn(shape, dtype=dtype, device=device) + offset
    w = torch.empty(C, embed or C, dtype=dtype, device=device)
    torch.nn.init.xavier_uniform_(w, gain=1.414)
    return x, w


def make_dnd(root, n_images=2, n_boxes=3, h=40, w=44, box=16):
    """DND layout: images_srgb/%04d.mat with InoisySRGB stored transposed, info.mat with
    info/boundingboxes → references to (4, n_boxes) arrays of 1-based [r0, c0, r1, c1]."""
    rng = np.random.default_rng(0)
    (root / "images_srgb").mkdir(parents=True)
    images, boxes = [], []
    for i in range(n_images):
        img = rng.random((h, w, 3)).astype(np.float32)
        with h5py.File(root / "images_srgb" / f"{i + 1:04d}.mat", "w") as f:
            f["InoisySRGB"] = img.T  # (3, W, H), as MATLAB stores (H, W, 3)
        b = []
        for k in range(n_boxes):
            r0, c0 = 1 + 3 * k + i, 2 + 5 * k
            b.append([r0, c0, r0 + box - 1, c0 + box - 1])
        images.append(img)
        boxes.append(np.array(b, dtype=np.float64))
    with h5py.File(root / "info.mat", "w") as f:
        refs_group = f.create_group("#refs#")
        info = f.create_group("info")
        refs = np.empty((1, n_images), dtype=h5py.ref_dtype)
        for i, b in enumerate(boxes):
            refs_group[f"b{i}"] = b.T  # stored (4, n_boxes)
            refs[0, i] = refs_group[f"b{i}"].ref
        info.create_dataset("boundingboxes", data=refs, dtype=h5py.ref_dtype)
    return images, boxes


def noisy_folder(folder, count: int, height: int, width: int):
    """``count`` flat-colour RGB PNGs with Gaussian noise (σ 25) in a new ``folder``: data a
    tiny model can train on in seconds. Returns the folder."""
    from ssbsn.images import write_image
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(40, 200, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
        write_image(folder / f"{i}.png", img)
    return folder


def write_png16_colour(path, a, interlace=0):
    """A minimal 16-bit RGB PNG writer (Pillow cannot write one): every row unfiltered."""
    h, w, _ = a.shape
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0,
                                                                         interlace))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
