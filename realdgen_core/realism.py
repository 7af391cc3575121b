"""Degradation statistics of an LR image (noise level, Laplacian energy, 8×8 blockiness) and their gaps.

All statistics are measured on the luma of an 8-bit RGB image, ``Y = 0.299 R + 0.587 G + 0.114 B``
on the 0–255 scale (float64), over the "valid" region of each filter (no padding):

- ``noise``: Immerkær's fast noise estimate (CVIU 64(2), 1996):
  ``σ = sqrt(π/2) / (6 (H−2)(W−2)) · Σ |Y ⊛ N|`` with ``N = [[1,−2,1],[−2,4,−2],[1,−2,1]]``
  (the difference of two Laplacians, blind to edges and smooth gradients to first order).
  On pure Gaussian noise of std s it returns ≈ s.
- ``laplacian``: mean of ``(Y ⊛ L)²`` with ``L = [[0,1,0],[1,−4,1],[0,1,0]]`` (sharpness/texture energy).
- ``blockiness``: mean ``|ΔY|`` of horizontally and vertically adjacent pixel pairs that straddle an
  8-px block boundary (between columns/rows ``8j−1`` and ``8j``), divided by the mean ``|ΔY|`` of all
  other adjacent pairs; 1 = no block structure, > 1 = visible 8×8 blocks (JPEG/MPEG-style codecs).
  A flat image (no differences) has blockiness 1.

``relative_gap(g, t) = |g − t| / max(t, eps)``: the gap between a generated LR's statistic and the
true LR's, relative to the truth; reports average it over tiles. ``GAP_FLOORS`` are the ``eps`` the
evaluation uses per statistic: a true tile that is flat (a letterbox, a white background) would
otherwise turn a generated σ of 0.3 into a gap of 300 and swamp the mean. They lie below what 8-bit
rounding alone gives (σ ≈ 0.29, Laplacian energy ≈ 1.7), so no tile with any content reaches them.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "STATS",
    "GAP_FLOORS",
    "luma",
    "noise_level",
    "laplacian_energy",
    "blockiness",
    "lr_stats",
    "relative_gap",
]

STATS = ("noise", "laplacian", "blockiness")
GAP_EPS = 1e-3
GAP_FLOORS = {"noise": 0.1, "laplacian": 1.0, "blockiness": GAP_EPS}


def luma(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB (or HW gray) → float64 HW luma on the 0–255 scale (BT.601 weights, no offset)."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        if isinstance(img, np.ndarray):
            got = f"dtype {img.dtype}"
        else:
            got = type(img).__name__ + (f" of {img.dtype}" if hasattr(img, "dtype") else "")
        raise TypeError(
            f"expected a uint8 numpy array (HxWx3 or HxW), got {got} (from a [3,H,W] float tensor x "
            "in [0, 1]: (x.permute(1, 2, 0) * 255).round().byte().numpy())"
        )
    x = img.astype(np.float64)
    if x.ndim == 2:
        return x
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"expected HxWx3 or HxW, got shape {img.shape}")
    return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _check(y: np.ndarray) -> None:
    if y.shape[0] < 3 or y.shape[1] < 3:
        raise ValueError(f"image too small for 3x3 statistics: {y.shape}")


def noise_level(img: np.ndarray) -> float:
    """Immerkær's noise σ of the luma (0–255 scale); see the module docstring."""
    y = luma(img)
    _check(y)
    c = y[1:-1, 1:-1]
    edges = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:]
    corners = y[:-2, :-2] + y[:-2, 2:] + y[2:, :-2] + y[2:, 2:]
    r = 4 * c - 2 * edges + corners
    h, w = y.shape
    return float(math.sqrt(math.pi / 2) * np.abs(r).sum() / (6.0 * (h - 2) * (w - 2)))


def laplacian_energy(img: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian of the luma."""
    y = luma(img)
    _check(y)
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4 * y[1:-1, 1:-1]
    return float(np.mean(lap**2))


def blockiness(img: np.ndarray, block: int = 8) -> float:
    """Boundary / non-boundary ratio of mean absolute neighbour differences on a ``block`` grid."""
    y = luma(img)
    dx = np.abs(np.diff(y, axis=1))  # pair (x, x+1) at column index x
    dy = np.abs(np.diff(y, axis=0))
    bx = (np.arange(dx.shape[1]) + 1) % block == 0
    by = (np.arange(dy.shape[0]) + 1) % block == 0
    on = np.concatenate([dx[:, bx].ravel(), dy[by, :].ravel()])
    off = np.concatenate([dx[:, ~bx].ravel(), dy[~by, :].ravel()])
    if on.size == 0 or off.size == 0:
        raise ValueError(f"image {y.shape} has no {block}-px block boundary")
    m_on, m_off = float(on.mean()), float(off.mean())
    if m_off == 0.0:
        return 1.0 if m_on == 0.0 else float("inf")
    return m_on / m_off


def lr_stats(img: np.ndarray) -> dict[str, float]:
    """``{"noise", "laplacian", "blockiness"}`` of one uint8 RGB image."""
    return {"noise": noise_level(img), "laplacian": laplacian_energy(img), "blockiness": blockiness(img)}


def relative_gap(generated: float, truth: float, eps: float = GAP_EPS) -> float:
    """``|generated − truth| / max(truth, eps)``."""
    return abs(generated - truth) / max(truth, eps)
