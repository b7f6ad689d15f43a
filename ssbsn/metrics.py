"""PSNR and SSIM with scikit-image's conventions, as the authors evaluate.

* Images are compared in 0..255. The denoised image is first quantised like the authors' test
  loop (``floor(x + 0.5)``, clipped to 0..255); the reference is used as is.
* PSNR: ``skimage.metrics.peak_signal_noise_ratio(ref, img, data_range=255)`` over all pixels
  and channels.
* SSIM: ``skimage.metrics.structural_similarity(ref, img, channel_axis=-1, data_range=255)``
  (7×7 uniform window, K1 = 0.01, K2 = 0.03, the mean over channels).
"""
from __future__ import annotations

import numpy as np


def quantize(x) -> np.ndarray:
    """Float 0..255 → uint8 the way the authors' test loop does: floor(x + 0.5), clipped."""
    return np.clip(np.floor(np.asarray(x, dtype=np.float64) + 0.5), 0, 255).astype(np.uint8)


def _pair(img, ref):
    img = np.asarray(img, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if img.shape != ref.shape:
        raise ValueError(f"image and reference differ in shape: {img.shape} vs {ref.shape}")
    if img.ndim == 2:
        img, ref = img[..., None], ref[..., None]
    return img, ref


def psnr(img, ref) -> float:
    """PSNR in dB of ``img`` against ``ref`` (both (H, W[, C]) in 0..255)."""
    from skimage.metrics import peak_signal_noise_ratio
    img, ref = _pair(img, ref)
    return float(peak_signal_noise_ratio(ref, img, data_range=255))


def ssim(img, ref) -> float:
    """SSIM of ``img`` against ``ref`` (both (H, W[, C]) in 0..255), mean over channels."""
    from skimage.metrics import structural_similarity
    img, ref = _pair(img, ref)
    return float(structural_similarity(ref, img, channel_axis=-1, data_range=255))
