"""Full-reference image metrics (PSNR, SSIM) on the 0–255 scale, computed by scikit-image.

Inputs: ``uint8`` numpy arrays (HWC, or HW for gray) or float torch tensors in [0, 1] shaped
``[3, H, W]`` or ``[1, 3, H, W]``. Both images are brought to float64 on the 0–255 scale
(tensors are multiplied by 255, not rounded) and compared with ``data_range = 255``.

Conventions follow the SR literature (BasicSR): ``crop_border`` pixels are removed from every
edge before measuring; ``y_channel=True`` measures the BT.601 luma of ``skimage.color.rgb2ycbcr``
(Y in [16, 235]); SSIM uses the Gaussian-weighted window of Wang et al. (σ = 1.5, 11 taps,
population covariance) — the settings scikit-image documents as matching the original paper.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from realdgen_core import degrade

_DATA_RANGE = 255.0


def _to_float255(img, name: str) -> np.ndarray:
    """-> float64 HWC (or HW) array on the 0–255 scale."""
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"{name}: a 4-D tensor must have batch size 1, got shape {tuple(t.shape)}")
            t = t[0]
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"{name}: expected a [3,H,W] or [1,3,H,W] tensor, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name}: tensors must be float in [0, 1], got dtype {t.dtype}")
        degrade.check_unit_images(t, name)  # 0–255 floats scored as [0, 1] gave −21 dB
        arr = t.to("cpu", torch.float64).permute(1, 2, 0).numpy() * _DATA_RANGE
        return arr[..., 0] if arr.shape[-1] == 1 else arr
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(
                f"{name}: numpy inputs must be uint8 (HWC or HW), got dtype {img.dtype}; "
                "pass float images as [3,H,W] torch tensors in [0, 1]"
            )
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3)):
            raise ValueError(f"{name}: expected an HWC (C=1 or 3) or HW uint8 array, got shape {img.shape}")
        arr = img.astype(np.float64)
        return arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    raise TypeError(f"{name}: expected a numpy uint8 array or a torch tensor, got {type(img).__name__}")


def _prepare(a, b, crop_border: int, y_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    x, y = _to_float255(a, "a"), _to_float255(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: a {x.shape} vs b {y.shape}")
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    if crop_border:
        if 2 * crop_border >= min(x.shape[0], x.shape[1]):
            raise ValueError(f"crop_border={crop_border} leaves nothing of a {x.shape[0]}x{x.shape[1]} image")
        c = crop_border
        x, y = x[c:-c, c:-c], y[c:-c, c:-c]
    if y_channel:
        if x.ndim != 3:
            raise ValueError("y_channel=True needs RGB images")
        # rgb2ycbcr takes floats in [0, 1] and returns Y on the 16–235 (0–255) scale.
        x = rgb2ycbcr(x / _DATA_RANGE)[..., 0]
        y = rgb2ycbcr(y / _DATA_RANGE)[..., 0]
    return x, y


def psnr(a, b, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """PSNR in dB on the 0–255 scale (``inf`` for identical images)."""
    x, y = _prepare(a, b, crop_border, y_channel)
    if np.array_equal(x, y):
        return float("inf")
    return float(peak_signal_noise_ratio(x, y, data_range=_DATA_RANGE))


def ssim(a, b, *, crop_border: int = 0, y_channel: bool = False) -> float:
    """SSIM (Gaussian window σ=1.5, mean over channels for RGB); 1.0 for identical images."""
    x, y = _prepare(a, b, crop_border, y_channel)
    return float(
        structural_similarity(
            x,
            y,
            data_range=_DATA_RANGE,
            channel_axis=-1 if x.ndim == 3 else None,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )
