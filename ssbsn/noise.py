"""Synthetic noise: AWGN, Poisson-Gaussian, and a camera pipeline that gives the spatially
correlated, signal-dependent noise of real sRGB photos.

The camera pipeline follows Brooks et al., "Unprocessing Images for Learned Raw Denoising"
(CVPR 2019): an sRGB image is unprocessed to raw (inverse tone curve, inverse gamma, inverse
colour correction, inverse white balance, RGGB Bayer mosaic), shot and read noise are added in
raw (variance = shot·x + read, with log(read) ≈ 2.18·log(shot) + 1.20), and the raw image is
processed back (white balance, bilinear demosaic, colour correction, gamma, tone curve).
Demosaicking spreads each raw sample over its neighbours, which makes the sRGB noise
spatially correlated over about two pixels; gamma and the tone curve make it depend on the
signal in a non-linear way.

All functions take floats in 0..1 (H, W, 3) unless said otherwise and a ``rng``: a
``numpy.random.Generator`` or a seed. Same seed, same noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# Camera XYZ→cam matrices used by Brooks et al. (from four cameras); a random convex
# combination gives a plausible sensor.
XYZ2CAMS = np.array([
    [[1.0234, -0.2969, -0.2266], [-0.5625, 1.6328, -0.0469], [-0.0703, 0.2188, 0.6406]],
    [[0.4913, -0.0541, -0.0202], [-0.6130, 1.3513, 0.2906], [-0.1564, 0.2151, 0.7183]],
    [[0.8380, -0.2630, -0.0639], [-0.2887, 1.0725, 0.2496], [-0.0627, 0.1427, 0.5438]],
    [[0.6596, -0.2079, -0.0562], [-0.4782, 1.3016, 0.1933], [-0.0970, 0.1581, 0.5181]],
])
RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                    [0.2126729, 0.7151522, 0.0721750],
                    [0.0193339, 0.1191920, 0.9503041]])


def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


# ------------------------------------------------------------------ simple noise models

def awgn(image: np.ndarray, sigma: float, rng=None) -> np.ndarray:
    """Additive white Gaussian noise of standard deviation ``sigma`` (same units as image)."""
    return image + _rng(rng).normal(0.0, sigma, size=np.shape(image))


def poisson_gaussian(image: np.ndarray, shot: float, read: float, rng=None) -> np.ndarray:
    """Heteroscedastic Gaussian approximation of Poisson-Gaussian noise on a 0..1 image:
    variance ``shot·x + read`` (x clipped at 0)."""
    image = np.asarray(image, dtype=np.float64)
    var = shot * np.maximum(image, 0.0) + read
    return image + _rng(rng).normal(size=image.shape) * np.sqrt(var)


def random_noise_levels(rng=None, min_shot: float = 1e-4, max_shot: float = 1.2e-2):
    """(shot, read) drawn as in Brooks et al.: log-uniform shot noise, read noise on the
    log-linear fit log(read) = 2.18·log(shot) + 1.20 plus N(0, 0.26²)."""
    rng = _rng(rng)
    log_shot = rng.uniform(np.log(min_shot), np.log(max_shot))
    log_read = 2.18 * log_shot + 1.20 + rng.normal(0.0, 0.26)
    return float(np.exp(log_shot)), float(np.exp(log_read))


def read_noise_for(shot: float) -> float:
    """The mean read noise of the log-linear fit for a given shot noise."""
    return float(np.exp(2.18 * np.log(shot) + 1.20))


# ------------------------------------------------------------------ camera parameters

@dataclass
class Camera:
    """One camera's processing parameters. ``rgb2cam`` rows sum to 1 (white stays white)."""
    rgb2cam: np.ndarray
    rgb_gain: float
    red_gain: float
    blue_gain: float

    @property
    def cam2rgb(self) -> np.ndarray:
        return np.linalg.inv(self.rgb2cam)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["rgb2cam"] = self.rgb2cam.tolist()
        return d


def random_camera(rng=None) -> Camera:
    """A random colour matrix and white balance, distributed as in Brooks et al."""
    rng = _rng(rng)
    weights = rng.uniform(1e-8, 1e8, size=len(XYZ2CAMS))
    xyz2cam = np.tensordot(weights, XYZ2CAMS, axes=1) / weights.sum()
    rgb2cam = xyz2cam @ RGB2XYZ
    rgb2cam = rgb2cam / rgb2cam.sum(axis=-1, keepdims=True)
    rgb_gain = 1.0 / rng.normal(0.8, 0.1)
    red_gain = rng.uniform(1.9, 2.4)
    blue_gain = rng.uniform(1.5, 1.9)
    return Camera(rgb2cam, float(rgb_gain), float(red_gain), float(blue_gain))


# ------------------------------------------------------------------ pipeline stages

def smoothstep(x):
    return 3.0 * x ** 2 - 2.0 * x ** 3


def inverse_smoothstep(y):
    y = np.clip(y, 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def gamma_expansion(x):
    return np.maximum(x, 1e-8) ** 2.2


def gamma_compression(x):
    return np.maximum(x, 1e-8) ** (1.0 / 2.2)


def apply_ccm(image, ccm):
    return image @ np.asarray(ccm).T


def _wb_gains(cam: Camera) -> np.ndarray:
    return np.array([cam.red_gain, 1.0, cam.blue_gain]) * cam.rgb_gain


def safe_invert_gains(image, cam: Camera):
    """Divide by the white-balance gains, tapering to 1 near saturation so that highlights
    are not pushed below white (Brooks et al.)."""
    gains = 1.0 / _wb_gains(cam)
    grey = image.mean(axis=-1, keepdims=True)
    mask = (np.maximum(grey - 0.9, 0.0) / 0.1) ** 2
    safe = np.maximum(mask + (1.0 - mask) * gains, gains)
    return image * safe


BAYER_RGGB = np.array([[0, 1], [1, 2]])  # channel of each position of a 2×2 cell


def bayer_masks(h: int, w: int) -> np.ndarray:
    """(H, W, 3) booleans: which colour the RGGB sensor records at each pixel."""
    ch = BAYER_RGGB[np.arange(h)[:, None] % 2, np.arange(w)[None, :] % 2]
    return ch[..., None] == np.arange(3)


def mosaic(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) → (H, W) RGGB Bayer samples (one colour per pixel)."""
    return (image * bayer_masks(*image.shape[:2])).sum(axis=-1)


_K_GREEN = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]]) / 4.0
_K_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 4.0


def demosaic_bilinear(raw: np.ndarray) -> np.ndarray:
    """Bilinear demosaic of an RGGB mosaic (H, W) → (H, W, 3). Borders mirror, which keeps
    the Bayer phase, so a constant colour is reproduced exactly."""
    masks = bayer_masks(*raw.shape)
    out = np.empty(raw.shape + (3,), dtype=np.float64)
    for c, k in ((0, _K_RB), (1, _K_GREEN), (2, _K_RB)):
        out[..., c] = ndimage.convolve(raw * masks[..., c], k, mode="mirror")
    return out


def unprocess(image: np.ndarray, cam: Camera) -> np.ndarray:
    """sRGB (H, W, 3) in 0..1 → raw RGGB mosaic (H, W) in 0..1."""
    x = inverse_smoothstep(image)
    x = gamma_expansion(x)
    x = apply_ccm(x, cam.rgb2cam)
    x = safe_invert_gains(x, cam)
    x = np.clip(x, 0.0, 1.0)
    return mosaic(x)


def process(raw: np.ndarray, cam: Camera) -> np.ndarray:
    """Raw RGGB mosaic (H, W) → sRGB (H, W, 3) in 0..1."""
    gains = _wb_gains(cam)
    raw = raw * (bayer_masks(*raw.shape) * gains).sum(axis=-1)
    raw = np.clip(raw, 0.0, 1.0)
    x = demosaic_bilinear(raw)
    x = apply_ccm(x, cam.cam2rgb)
    x = np.clip(x, 0.0, 1.0)
    x = gamma_compression(x)
    return np.clip(smoothstep(x), 0.0, 1.0)


def camera_noise(image: np.ndarray, rng=None, shot: float | None = None,
                 read: float | None = None, cam: Camera | None = None) -> tuple[np.ndarray, dict]:
    """Realistic sRGB noise through the unprocess → raw noise → process pipeline.

    Args:
        image: (H, W, 3) sRGB floats in 0..1 (grey (H, W) or (H, W, 1) is replicated).
        shot, read: raw noise variance ``shot·x + read``; random (Brooks et al.) when None;
            ``read`` defaults to the log-linear fit for the given ``shot``.
        cam: colour matrix and white balance; random when None.
    Returns:
        (noisy sRGB floats in 0..1 of the input's shape, the parameters used).
        The clean reference of the same pipeline without noise is ``camera_noise(...,
        shot=0, read=0)`` with the same camera; for smooth images it is close to the input.
    """
    rng = _rng(rng)
    image = np.asarray(image, dtype=np.float64)
    grey = image.ndim == 2 or image.shape[-1] == 1
    rgb = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1) if grey else image
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"camera_noise expects (H, W, 3) or grey images, got {image.shape}")
    cam = cam or random_camera(rng)
    if shot is None:
        shot, read_r = random_noise_levels(rng)
        read = read_r if read is None else read
    elif read is None:
        read = read_noise_for(shot) if shot > 0 else 0.0
    raw = unprocess(rgb, cam)
    if shot > 0 or read > 0:
        raw = poisson_gaussian(raw, shot, read, rng)
    out = process(raw, cam)
    if grey:
        out = out.mean(axis=-1).reshape(image.shape)
    return out, {"shot": float(shot), "read": float(read), "camera": cam.as_dict()}


def add_camera_noise(image_u8: np.ndarray, rng=None, shot: float | None = None,
                     read: float | None = None, cam: Camera | None = None) -> np.ndarray:
    """:func:`camera_noise` on a uint8 image; returns uint8 (rounded), like a real photo."""
    noisy, _ = camera_noise(np.asarray(image_u8, dtype=np.float64) / 255.0, rng, shot, read, cam)
    return np.clip(np.floor(noisy * 255.0 + 0.5), 0, 255).astype(np.uint8)


def camera_pair(image_u8: np.ndarray, rng, shot: float, read: float | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) uint8 renderings of a clean uint8 photo through one random camera: the
    clean reference is the same pipeline without noise (it is not the input photo itself)."""
    cam = random_camera(rng)
    clean = add_camera_noise(image_u8, rng, shot=0.0, read=0.0, cam=cam)
    return add_camera_noise(image_u8, rng, shot=shot, read=read, cam=cam), clean
