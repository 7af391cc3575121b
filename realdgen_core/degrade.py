"""Synthetic degradation engine D: Real-ESRGAN second-order, BSRGAN shuffled and bicubic, driven by θ.

Every random choice of a degradation is drawn from an explicit ``torch.Generator`` by
:func:`sample_theta` and written into a plain, JSON-serialisable dict θ. :func:`apply` re-applies a
θ to an image deterministically: nothing in it is random except the noise fields, which are
regenerated from θ's integer ``noise_seed``. So "the same θ on another image" (paper Eq. 3) is
``apply(other_hr, [theta])``, and a θ stored as JSON reproduces the very same LR bytes.
:func:`degrade` is ``sample_theta`` per image followed by ``apply``.

Tensors are ``torch.float32 [B, 3, H, W]`` RGB in ``[0, 1]`` on any device. The ops run in torch on
that device, except two things that happen on the CPU per image: noise fields are drawn from CPU
generators (then moved to the device, so pixels do not depend on the device's RNG), and JPEG goes
through a real codec, Pillow's libjpeg (8-bit RGB in, integer quality as drawn, 4:2:0 chroma
subsampling), not a differentiable approximation.

HR-size policy: ``apply``/``degrade`` first :func:`modcrop` the HR (crop bottom/right to a multiple
of ``scale``), so the LR is always exactly ``[B, 3, H // scale, W // scale]``; intermediate sizes are
derived at apply time from the image size and θ's factors, so one θ works on images of any size.
The output is clamped and 8-bit quantised, ``round(x * 255) / 255``.

θ layout (version 1)::

    {"version": 1, "kind": "realesrgan" | "bsrgan" | "bicubic" | "codec", "scale": 2 | 4,
     "noise_seed": int,
     "ops": [{"name": str, "op": str, "applied": bool, ...parameters...}, ...]}

``ops`` lists the operations in the order they run (skipped ones stay in the list with
``applied: false`` so that the drawn order is recorded). Op types and their parameters:

- ``blur``: ``kernel`` (a kernel spec, see :func:`build_kernel`), filtered with reflect padding;
- ``resize``: ``relative_to`` ("current" image or final "lr" size), ``factor``, ``mode``;
  the target is ``floor(n * factor)`` per side (at least 1); ``clip: true`` clamps the result to
  [0, 1] (BSRGAN's resizes; absent in θs recorded before 2026-12-07, which replay unclipped);
- ``blur_subsample``: ``kernel`` then keep every ``stride``-th pixel (BSRGAN's blur + nearest);
- ``gaussian_noise``: ``sigma`` (0–255 scale), ``gray``; ``poisson_noise``: ``scale``, ``gray``;
  ``correlated_noise``: ``cov`` (3×3, [0, 1] scale, already scaled: BSRGAN scales it by the top
  level 25, so the drawn ``level`` is recorded but unused); ``camera_noise``: ``gamma``,
  ``shot``, ``read``. Each noise op has a ``stream`` int: its field is drawn from a CPU generator
  seeded with ``noise_seed + stream``;
- ``jpeg``: ``quality`` (int);
- ``unsharp``: ``sigma`` (px of the current image), ``amount``: ``x + amount·(x − G_σ∗x)``, clamped
  (the sharpening of camera pipelines and re-share apps; only domain start θs use it today).

Real-ESRGAN (numbers from its public training options, in :class:`RealESRGANConfig`):
blur1 → resize1 → noise1 → jpeg1 → blur2 (p .8) → resize2 (relative to the LR size) → noise2 →
either [final_resize → final_sinc (p .8)] → jpeg2, or jpeg2 → [final_resize → final_sinc] (p .5).
Every choice is drawn per image (the original draws some per batch). Like BasicSR, Poisson noise
counts the distinct 8-bit levels of the image to set the photon scale, and β of generalized /
plateau kernels is drawn from [β_lo, 1) or [1, β_hi] with p .5 each. Unlike the original training
code, the HR is not unsharp-masked first (D degrades the HR as given) and no random crop happens.

Codec (:class:`CodecConfig`): the path of a picture that is downscaled and re-encoded (a thumbnail,
a stream, a re-shared photo) — an optional Gaussian blur of the HR (p .7, σ 0.3–3 HR px, the
optics or an encoder's pre-filter), one resize to the LR size (antialiased bicubic, bilinear or
area), light Gaussian noise (p .2, σ 1–5), a JPEG (p .9, quality 30–95) and a second JPEG of the
result (p .4, quality 30–95: a re-share). It spans the axes the start bank of a domain calibration
(``realdgen_core.calibrate``) varies, so that E_deg learns to tell those starts apart.

BSRGAN (:class:`BSRGANConfig`): for ×4 with p .25 a ×1/2 pre-downsample (after which the inner
scale factor is 2); seven ops in a random order — blur1, blur2, down_mid (1/U(1, 2s) resize or
Gaussian blur + nearest subsampling), down_final (to the LR size), noise (level 2–25: colour, gray,
or channel-correlated with p .4/.4/.2), jpeg (p .9, quality 30–95) and camera (p .25) — where
down_mid is swapped before down_final when drawn after it; then a final JPEG 30–95. Like the public
code, the image is clipped to [0, 1] after the pre-downsample and after each resize. cv2's
interpolations map to torch's (linear → bilinear, cubic → bicubic, area → area) and MATLAB's
``imresize`` to antialiased bicubic. The camera op, which the public code never runs, is a simple
camera-noise model here: inverse gamma to linear light, heteroscedastic shot + read noise
(variance ``shot * x + read``; levels drawn as in Brooks et al., "Unprocessing Images for Learned
Raw Denoising", 2019), gamma back. Blur widths are floored at ``BSRGANConfig.min_sigma`` (the
public code divides by zero at σ = 0); the shifted kernel of the blur + nearest branch is a
Gaussian centred at ``(s - 1) / 2`` in closed form rather than an interpolated one.

Bicubic: antialiased bicubic downsampling to the LR size (MATLAB/PIL-like), then 8-bit rounding.

Where this differs from the public implementations, and why:

- JPEG is a real codec (Pillow) with integer qualities drawn uniformly from [30, 95], where
  Real-ESRGAN uses a differentiable JPEG with float qualities: D runs offline, so the artefacts of
  the real codec are the ones to reproduce.
- Resizes go to explicit sizes ``floor(n * factor)`` (``F.interpolate(size=...)``) rather than
  ``scale_factor=...``: the θ then fixes every intermediate size for any input size.
- Every draw is per image (Real-ESRGAN draws some per batch); θ is replayable, so the noise of an
  op comes from ``noise_seed + stream``, not from a shared RNG stream.
- BSRGAN's camera op is implemented (see above) instead of being dead code; σ floor and shifted
  kernel as above; its correlated-noise covariance is projected onto the PSD cone (numpy's
  sampler does the equivalent silently).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from realdgen_core.configs import config_from_dict

__all__ = [
    "KINDS",
    "SCALES",
    "THETA_VERSION",
    "RealESRGANConfig",
    "BSRGANConfig",
    "CodecConfig",
    "modcrop",
    "sample_theta",
    "near_theta",
    "apply",
    "degrade",
    "isotropic_gaussian_kernel",
    "anisotropic_gaussian_kernel",
    "generalized_gaussian_kernel",
    "plateau_kernel",
    "sinc_kernel",
    "pad_kernel",
    "build_kernel",
    "filter2d",
    "resize",
    "add_gaussian_noise",
    "add_poisson_noise",
    "add_correlated_noise",
    "add_camera_noise",
    "jpeg",
    "quantize_8bit",
]

KINDS = ("realesrgan", "bsrgan", "bicubic", "codec")
# θ kinds that are never drawn by ``sample_theta`` but may be applied: ``domain`` θs are fixed start
# degradations fitted to a reference domain (``realdgen_core.calibrate``).
APPLY_KINDS = (*KINDS, "domain")
SCALES = (2, 4)
THETA_VERSION = 1
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic", "bicubic_aa", "nearest")
# Kernels at least this wide are applied through FFTs: ~4x faster than a direct depthwise conv for
# 21x21 on a 256² image on CPU, equal to it up to float32 rounding (~1e-6).
FFT_MIN_KERNEL = 13
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, as torchvision's rgb_to_grayscale


# --------------------------------------------------------------------------------------------
# configs


class _ConfigMixin:
    """to_dict / from_dict (JSON round-trip) and validation shared by the degradation configs."""

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict):
        return config_from_dict(cls, d)

    def _check_prob(self, name: str) -> None:
        p = getattr(self, name)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}.{name} must be in [0, 1], got {p!r}")

    def _check_probs(self, name: str, n: int) -> None:
        ps = getattr(self, name)
        if len(ps) != n or any(p < 0 for p in ps) or abs(sum(ps) - 1.0) > 1e-6:
            raise ValueError(
                f"{type(self).__name__}.{name} must be {n} probabilities >= 0 summing to 1, got {ps!r}"
            )

    def _check_range(self, name: str, positive: bool = True) -> None:
        r = getattr(self, name)
        if len(r) != 2 or r[0] > r[1] or (positive and r[0] <= 0):
            raise ValueError(f"{type(self).__name__}.{name} must be a (lo, hi) range, lo <= hi, got {r!r}")


@dataclass(frozen=True)
class RealESRGANConfig(_ConfigMixin):
    """Every probability and range of the Real-ESRGAN second-order model (defaults = its public options).

    Suffix ``2`` = second order. Probabilities can be pinned to 0 or 1 to force a branch.
    """

    # kernels (both orders)
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_pad_to: int = 21
    kernel_types: tuple[str, ...] = KERNEL_TYPES
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    kernel_probs2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sinc_prob2: float = 0.1
    sinc_small_size: int = 13  # kernels smaller than this use sinc_cutoff_small
    sinc_cutoff_small: tuple[float, float] = (math.pi / 3, math.pi)
    sinc_cutoff_large: tuple[float, float] = (math.pi / 5, math.pi)
    sigma_range: tuple[float, float] = (0.2, 3.0)
    sigma_range2: tuple[float, float] = (0.2, 1.5)
    rotation_range: tuple[float, float] = (-math.pi, math.pi)
    beta_g_range: tuple[float, float] = (0.5, 4.0)
    beta_g_range2: tuple[float, float] = (0.5, 4.0)
    beta_p_range: tuple[float, float] = (1.0, 2.0)
    beta_p_range2: tuple[float, float] = (1.0, 2.0)
    # first order
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")  # drawn uniformly
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_sigma_range: tuple[float, float] = (1.0, 30.0)  # 0-255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[int, int] = (30, 95)
    # second order
    second_blur_prob: float = 0.8
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)  # relative to the final LR size
    gaussian_noise_prob2: float = 0.5
    noise_sigma_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[int, int] = (30, 95)
    # final stage
    final_sinc_prob: float = 0.8
    final_sinc_cutoff: tuple[float, float] = (math.pi / 3, math.pi)
    final_resize_first_prob: float = 0.5  # [resize + sinc] -> JPEG, else JPEG -> [resize + sinc]

    def __post_init__(self) -> None:
        for name in ("kernel_probs", "kernel_probs2"):
            self._check_probs(name, len(KERNEL_TYPES))
        if tuple(self.kernel_types) != KERNEL_TYPES:
            raise ValueError(
                f"RealESRGANConfig.kernel_types must be {KERNEL_TYPES}, got {self.kernel_types!r}"
            )
        if not self.kernel_sizes or any(
            k < 1 or k % 2 == 0 or k > self.kernel_pad_to for k in self.kernel_sizes
        ):
            raise ValueError(
                f"RealESRGANConfig.kernel_sizes must be odd and <= kernel_pad_to, got {self.kernel_sizes!r}"
            )
        for name in ("resize_probs", "resize_probs2"):
            self._check_probs(name, 3)
        for name in (
            "sinc_prob",
            "sinc_prob2",
            "gaussian_noise_prob",
            "gray_noise_prob",
            "second_blur_prob",
            "gaussian_noise_prob2",
            "gray_noise_prob2",
            "final_sinc_prob",
            "final_resize_first_prob",
        ):
            self._check_prob(name)
        for name in (
            "sinc_cutoff_small",
            "sinc_cutoff_large",
            "sigma_range",
            "sigma_range2",
            "beta_g_range",
            "beta_g_range2",
            "beta_p_range",
            "beta_p_range2",
            "resize_range",
            "resize_range2",
            "noise_sigma_range",
            "poisson_scale_range",
            "noise_sigma_range2",
            "poisson_scale_range2",
            "final_sinc_cutoff",
        ):
            self._check_range(name)
        self._check_range("rotation_range", positive=False)
        if not (self.resize_range[0] <= 1.0 <= self.resize_range[1]):
            raise ValueError(f"RealESRGANConfig.resize_range must contain 1, got {self.resize_range!r}")
        if not (self.resize_range2[0] <= 1.0 <= self.resize_range2[1]):
            raise ValueError(f"RealESRGANConfig.resize_range2 must contain 1, got {self.resize_range2!r}")
        for name in ("jpeg_range", "jpeg_range2"):
            _check_jpeg_range(type(self).__name__, name, getattr(self, name))
        _check_modes(type(self).__name__, "resize_modes", self.resize_modes)


@dataclass(frozen=True)
class CodecConfig(_ConfigMixin):
    """Downscale + re-compression (kind ``codec``): blur → resize to LR → light noise → JPEG → JPEG."""

    blur_prob: float = 0.7
    blur_sigma_range: tuple[float, float] = (0.3, 3.0)  # HR pixels
    resize_modes: tuple[str, ...] = ("bicubic_aa", "bilinear", "area")  # drawn uniformly
    noise_prob: float = 0.2
    noise_sigma_range: tuple[float, float] = (1.0, 5.0)  # 0-255 scale
    jpeg_prob: float = 0.9
    jpeg_range: tuple[int, int] = (30, 95)
    second_jpeg_prob: float = 0.4
    second_jpeg_range: tuple[int, int] = (30, 95)

    def __post_init__(self) -> None:
        for name in ("blur_prob", "noise_prob", "jpeg_prob", "second_jpeg_prob"):
            self._check_prob(name)
        for name in ("blur_sigma_range", "noise_sigma_range"):
            self._check_range(name)
        for name in ("jpeg_range", "second_jpeg_range"):
            _check_jpeg_range(type(self).__name__, name, getattr(self, name))
        _check_modes(type(self).__name__, "resize_modes", self.resize_modes)


@dataclass(frozen=True)
class BSRGANConfig(_ConfigMixin):
    """Every probability and range of the BSRGAN shuffled model (defaults = its public code).

    ``s`` below is the inner scale factor: the SR scale, or 2 after the ×4 pre-downsample.
    """

    pre_down_prob: float = 0.25  # ×4 only
    pre_down_cv2_prob: float = 0.5  # cv2 resize with a random mode, else MATLAB-like bicubic
    resize_modes: tuple[str, ...] = ("bilinear", "bicubic", "area")  # cv2 linear/cubic/area, uniform
    # blur (two independent blur ops)
    blur_kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21, 23, 25)
    blur_aniso_prob: float = 0.5
    blur_aniso_var_base: float = 4.0  # eigen-variances l1, l2 ~ U(0, base + per_scale * s)
    blur_aniso_var_per_scale: float = 1.0
    blur_iso_sigma_base: float = 2.0  # σ ~ U(0, base + per_scale * s)
    blur_iso_sigma_per_scale: float = 0.2
    min_sigma: float = 1e-3
    # intermediate downsample
    down_mid_resize_prob: float = 0.75  # else Gaussian blur + nearest subsampling by s
    down_mid_factor_per_scale: float = 2.0  # resize by 1 / U(1, per_scale * s)
    down_mid_kernel_size: int = 25
    down_mid_sigma_min: float = 0.1
    down_mid_sigma_per_scale: float = 0.6  # σ ~ U(min, per_scale * s)
    # noise
    noise_level_range: tuple[int, int] = (2, 25)  # 0-255 scale, integer
    noise_color_prob: float = 0.4
    noise_gray_prob: float = 0.4  # the rest: channel-correlated
    correlated_noise_level: float = 25.0  # the public code scales the covariance by the top level
    # JPEG
    jpeg_prob: float = 0.9
    jpeg_range: tuple[int, int] = (30, 95)
    final_jpeg_range: tuple[int, int] = (30, 95)
    # camera noise
    camera_prob: float = 0.25
    camera_gamma: float = 2.2
    camera_shot_range: tuple[float, float] = (1e-4, 1.2e-2)  # log-uniform, variance per unit signal
    camera_read_slope: float = 2.18  # log read = slope * log shot + intercept + N(0, std)
    camera_read_intercept: float = 1.2
    camera_read_std: float = 0.26

    def __post_init__(self) -> None:
        for name in (
            "pre_down_prob",
            "pre_down_cv2_prob",
            "blur_aniso_prob",
            "down_mid_resize_prob",
            "noise_color_prob",
            "noise_gray_prob",
            "jpeg_prob",
            "camera_prob",
        ):
            self._check_prob(name)
        if self.noise_color_prob + self.noise_gray_prob > 1.0 + 1e-9:
            raise ValueError(
                "BSRGANConfig.noise_color_prob + noise_gray_prob must be <= 1, got "
                f"{self.noise_color_prob!r} + {self.noise_gray_prob!r}"
            )
        if not self.blur_kernel_sizes or any(k < 1 or k % 2 == 0 for k in self.blur_kernel_sizes):
            raise ValueError(f"BSRGANConfig.blur_kernel_sizes must be odd, got {self.blur_kernel_sizes!r}")
        if self.down_mid_kernel_size < 1 or self.down_mid_kernel_size % 2 == 0:
            raise ValueError(
                f"BSRGANConfig.down_mid_kernel_size must be odd, got {self.down_mid_kernel_size!r}"
            )
        self._check_range("noise_level_range", positive=False)
        self._check_range("camera_shot_range")
        for name in ("jpeg_range", "final_jpeg_range"):
            _check_jpeg_range(type(self).__name__, name, getattr(self, name))
        _check_modes(type(self).__name__, "resize_modes", self.resize_modes)
        if self.min_sigma <= 0:
            raise ValueError(f"BSRGANConfig.min_sigma must be > 0, got {self.min_sigma!r}")
        if self.camera_gamma <= 0:
            raise ValueError(f"BSRGANConfig.camera_gamma must be > 0, got {self.camera_gamma!r}")


def _check_jpeg_range(cls: str, name: str, r: tuple[int, int]) -> None:
    if len(r) != 2 or int(r[0]) != r[0] or int(r[1]) != r[1] or not 1 <= r[0] <= r[1] <= 100:
        raise ValueError(f"{cls}.{name} must be integer qualities 1 <= lo <= hi <= 100, got {r!r}")


def _check_modes(cls: str, name: str, modes: tuple[str, ...]) -> None:
    if not modes or any(m not in RESIZE_MODES for m in modes):
        raise ValueError(f"{cls}.{name} must be a non-empty tuple of {RESIZE_MODES}, got {modes!r}")


# --------------------------------------------------------------------------------------------
# kernels (built on the CPU in float64, returned as float32)


def _grid(size: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``(x, y)`` from the kernel centre, each ``float64 [size, size]``; x runs along columns."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0 - shift
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    return xx, yy


def _quadratic_form(
    size: int, sigma_x: float, sigma_y: float, rotation: float, shift: float = 0.0
) -> torch.Tensor:
    """``p^T Σ^-1 p`` over the grid with ``Σ = R diag(σx², σy²) R^T`` (R = rotation by ``rotation`` rad)."""
    xx, yy = _grid(size, shift)
    c, s = math.cos(rotation), math.sin(rotation)
    u = c * xx + s * yy  # coordinates in the kernel's principal axes: R^T p
    v = -s * xx + c * yy
    return (u / sigma_x) ** 2 + (v / sigma_y) ** 2


def _normalise(k: torch.Tensor) -> torch.Tensor:
    return (k / k.sum()).to(torch.float32)


def _check_size(size: int) -> None:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size!r}")


def isotropic_gaussian_kernel(size: int, sigma: float, shift: float = 0.0) -> torch.Tensor:
    """Isotropic Gaussian ``exp(-r² / 2σ²)``, normalised to sum 1.

    ``shift`` moves the centre by that many pixels right and down (BSRGAN's shifted kernel).
    Returns ``float32 [size, size]`` on the CPU; size odd.
    """
    _check_size(size)
    return _normalise(torch.exp(-0.5 * _quadratic_form(size, sigma, sigma, 0.0, shift)))


def anisotropic_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float) -> torch.Tensor:
    """Bivariate Gaussian ``exp(-½ pᵀΣ⁻¹p)``, Σ = R(rotation) diag(σx², σy²) Rᵀ, normalised to sum 1.

    Returns ``float32 [size, size]`` on the CPU; size odd; rotation in radians.
    """
    _check_size(size)
    return _normalise(torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float
) -> torch.Tensor:
    """Generalized Gaussian ``exp(-½ (pᵀΣ⁻¹p)^β)`` (β = 1: Gaussian), normalised to sum 1.

    Returns ``float32 [size, size]`` on the CPU; isotropic when σx = σy and rotation = 0.
    """
    _check_size(size)
    return _normalise(torch.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, rotation) ** beta))


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float) -> torch.Tensor:
    """Plateau-shaped kernel ``1 / (1 + (pᵀΣ⁻¹p)^β)``, normalised to sum 1.

    Returns ``float32 [size, size]`` on the CPU; isotropic when σx = σy and rotation = 0.
    """
    _check_size(size)
    return _normalise(1.0 / (1.0 + _quadratic_form(size, sigma_x, sigma_y, rotation) ** beta))


def sinc_kernel(size: int, cutoff: float) -> torch.Tensor:
    """2-D circular low-pass (sinc) kernel ``ω J1(ω r) / (2π r)``, value ``ω² / 4π`` at r = 0, sum 1.

    ``cutoff`` ω in radians per pixel (π = Nyquist). Returns ``float32 [size, size]`` on the CPU;
    it has negative lobes (ringing / overshoot artefacts).
    """
    _check_size(size)
    xx, yy = _grid(size)
    r = torch.sqrt(xx**2 + yy**2)
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    k = cutoff * torch.special.bessel_j1(cutoff * safe_r) / (2 * math.pi * safe_r)
    k = torch.where(r > 0, k, torch.full_like(k, cutoff**2 / (4 * math.pi)))
    return _normalise(k)


def pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a ``[k, k]`` kernel (k odd) symmetrically to ``[size, size]``; same dtype/device."""
    k = kernel.shape[-1]
    if size < k or (size - k) % 2:
        raise ValueError(f"cannot pad a {k}x{k} kernel to {size}x{size}")
    p = (size - k) // 2
    return F.pad(kernel, (p, p, p, p))


def build_kernel(spec: dict) -> torch.Tensor:
    """Kernel from a θ kernel spec; ``float32 [n, n]`` on the CPU, sum 1, n = ``spec.get("pad_to", size)``.

    Specs: ``{"type": "iso", "size", "sigma_x", "sigma_y", "rotation", ["shift"]}`` (iso and aniso
    share the keys; iso has σx = σy, rotation 0), ``generalized_*`` and ``plateau_*`` add
    ``"beta"``, ``{"type": "sinc", "size", "cutoff"}``. Optional ``"pad_to"``.
    """
    t, size = spec["type"], int(spec["size"])
    if t == "sinc":
        k = sinc_kernel(size, float(spec["cutoff"]))
    elif t in KERNEL_TYPES:
        sx, sy, rot = float(spec["sigma_x"]), float(spec["sigma_y"]), float(spec["rotation"])
        if t == "iso":
            k = isotropic_gaussian_kernel(size, sx, float(spec.get("shift", 0.0)))
        elif t == "aniso":
            k = anisotropic_gaussian_kernel(size, sx, sy, rot)
        elif t.startswith("generalized"):
            k = generalized_gaussian_kernel(size, sx, sy, rot, float(spec["beta"]))
        else:
            k = plateau_kernel(size, sx, sy, rot, float(spec["beta"]))
    else:
        raise ValueError(f"unknown kernel type {t!r}; expected one of {KERNEL_TYPES + ('sinc',)}")
    return pad_kernel(k, int(spec.get("pad_to", size)))


# --------------------------------------------------------------------------------------------
# pixel ops


def filter2d(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``img [B, C, H, W]`` with ``kernel [k, k]`` (or one per image ``[B, k, k]``).

    k odd; output has the input's shape, dtype and device. Borders are reflect-padded (replicate
    when the image is smaller than the kernel's half-width). All-zero outer rings of the kernel
    (from padding to 21) are trimmed first: same result, less work; kernels of ``FFT_MIN_KERNEL`` or
    more are applied through FFTs (same result up to float32 rounding). Like BasicSR's ``filter2D``
    this is a correlation (``F.conv2d``): identical to a convolution for the point-symmetric
    kernels of §3; BSRGAN's shifted kernel is defined for it (peak at +shift, so output pixel i
    is centred at input i + shift, which is what scipy's convolution with BSRGAN's kernel gives).
    """
    b, c, h, w = img.shape
    kernel = kernel.to(device=img.device, dtype=img.dtype)
    if kernel.dim() == 2:
        kernel = kernel.expand(b, -1, -1)
    if kernel.shape[0] != b or kernel.shape[-1] != kernel.shape[-2] or kernel.shape[-1] % 2 == 0:
        raise ValueError(
            f"filter2d: kernel must be [k, k] or [{b}, k, k] with k odd, got {tuple(kernel.shape)}"
        )
    while kernel.shape[-1] > 1:
        ring = kernel.abs().clone()
        ring[:, 1:-1, 1:-1] = 0
        if ring.sum() != 0:
            break
        kernel = kernel[:, 1:-1, 1:-1]
    k = kernel.shape[-1]
    p = k // 2
    if p:
        mode = "reflect" if p < h and p < w else "replicate"
        img = F.pad(img, (p, p, p, p), mode=mode)
    if k >= FFT_MIN_KERNEL:
        return _fft_correlate(img, kernel, h, w)
    weight = kernel.repeat_interleave(c, dim=0).unsqueeze(1)  # [B*C, 1, k, k]
    out = F.conv2d(img.reshape(1, b * c, *img.shape[-2:]), weight, groups=b * c)
    return out.view(b, c, h, w)


def unsharp_mask(img: torch.Tensor, sigma: float, amount: float) -> torch.Tensor:
    """Unsharp masking ``img + amount·(img − G_σ∗img)``, clamped to [0, 1]; σ in pixels of ``img``."""
    if not 0.0 < sigma <= 10.0:
        raise ValueError(f"unsharp sigma must be in (0, 10] px, got {sigma!r}")
    if not 0.0 <= amount <= 10.0:
        raise ValueError(f"unsharp amount must be in [0, 10], got {amount!r}")
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = filter2d(img, isotropic_gaussian_kernel(size, sigma))
    return (img + amount * (img - blurred)).clamp_(0.0, 1.0)


def _fast_fft_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast FFT lengths)."""
    m = n
    while True:
        r = m
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        if r == 1:
            return m
        m += 1


def _fft_correlate(padded: torch.Tensor, kernel: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Valid correlation of padded ``[B, C, h+k-1, w+k-1]`` with ``[B, k, k]`` via real FFTs."""
    k = kernel.shape[-1]
    size = (_fast_fft_size(padded.shape[-2]), _fast_fft_size(padded.shape[-1]))
    spec = torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(kernel.flip(-1, -2), s=size).unsqueeze(1)
    return torch.fft.irfft2(spec, s=size)[..., k - 1 : k - 1 + h, k - 1 : k - 1 + w].contiguous()


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``img [B, C, H, W]`` to ``size = (h, w)``; same dtype/device; not clamped (cubic overshoots).

    Modes: ``area``, ``bilinear``, ``bicubic`` (no antialiasing, as ``F.interpolate`` and cv2),
    ``bicubic_aa`` (antialiased bicubic, close to MATLAB ``imresize`` / PIL), ``nearest``.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(img.shape[-2:]) == size:
        return img
    if mode == "area" or mode == "nearest":
        return F.interpolate(img, size=size, mode=mode)
    if mode == "bicubic_aa":
        return F.interpolate(img, size=size, mode="bicubic", align_corners=False, antialias=True)
    return F.interpolate(img, size=size, mode=mode, align_corners=False)


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) % (2**64))


def _gray(img: torch.Tensor) -> torch.Tensor:
    """Luma of ``[B, 3, H, W]`` as ``[B, 1, H, W]``."""
    w = torch.tensor(_GRAY_WEIGHTS, dtype=img.dtype, device=img.device).view(1, 3, 1, 1)
    return (img * w).sum(dim=1, keepdim=True)


def add_gaussian_noise(
    img: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator
) -> torch.Tensor:
    """Add N(0, (σ/255)²) noise and clamp to [0, 1]; ``img`` float ``[B, 3, H, W]`` in [0, 1].

    ``sigma`` is on the 0–255 scale; ``gray``: one field shared by the three channels. The field is
    drawn on the CPU from ``generator`` and moved to ``img``'s device.
    """
    b, c, h, w = img.shape
    noise = torch.randn((b, 1 if gray else c, h, w), generator=generator, dtype=torch.float32)
    noise = noise.to(device=img.device, dtype=img.dtype) * (sigma / 255.0)
    return (img + noise).clamp(0.0, 1.0)


def _poisson_field(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson noise of one image ``[1, C, H, W]``, BasicSR style: levels counted on the 8-bit image."""
    q = (x * 255.0).round().clamp(0, 255)
    levels = int(torch.bincount(q.flatten().to(torch.int64), minlength=256).count_nonzero())
    vals = float(2 ** math.ceil(math.log2(max(levels, 1))))
    q = q / 255.0
    rates = (q * vals).cpu().to(torch.float64)
    counts = torch.poisson(rates, generator=generator)
    return (counts / vals).to(device=x.device, dtype=x.dtype) - q


def add_poisson_noise(
    img: torch.Tensor, scale: float, gray: bool, generator: torch.Generator
) -> torch.Tensor:
    """Add Poisson (shot) noise times ``scale`` and clamp to [0, 1]; ``img`` float ``[B, 3, H, W]`` in [0, 1].

    As in BasicSR: the image is rounded to 8 bit, its number of distinct levels n sets the photon
    scale ``vals = 2^ceil(log2 n)``, noise = Poisson(x·vals)/vals − x, so its variance is
    ``scale² · x / vals`` (grows linearly with intensity). ``gray``: the noise of the luma, shared
    by the three channels. Drawn on the CPU from ``generator``, image by image.
    """
    outs = []
    for i in range(img.shape[0]):
        x = img[i : i + 1].clamp(0.0, 1.0)
        noise = _poisson_field(_gray(x) if gray else x, generator)
        outs.append((img[i : i + 1] + scale * noise).clamp(0.0, 1.0))
    return torch.cat(outs)


def add_correlated_noise(
    img: torch.Tensor, cov: Sequence[Sequence[float]], generator: torch.Generator
) -> torch.Tensor:
    """Add channel-correlated Gaussian noise N(0, cov) per pixel and clamp; ``img`` float ``[B, 3, H, W]``.

    ``cov`` is a symmetric 3×3 covariance on the [0, 1] scale; negative eigenvalues (BSRGAN takes
    the elementwise absolute value of a PSD matrix) are clipped to 0. Drawn on the CPU.
    """
    c = torch.tensor(cov, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(0.5 * (c + c.T))
    factor = (evecs * evals.clamp(min=0).sqrt()).to(torch.float32)  # factor @ factor.T = cov (PSD part)
    b, _, h, w = img.shape
    z = torch.randn((b, h, w, 3), generator=generator, dtype=torch.float32)
    noise = (z @ factor.T).permute(0, 3, 1, 2).to(device=img.device, dtype=img.dtype)
    return (img + noise).clamp(0.0, 1.0)


def add_camera_noise(
    img: torch.Tensor, shot: float, read: float, gamma: float, generator: torch.Generator
) -> torch.Tensor:
    """Simple camera-sensor noise: ``x^γ`` (to linear light), + N(0, shot·x_lin + read), clamp, ``^(1/γ)``.

    ``img`` float ``[B, 3, H, W]`` in [0, 1]; ``shot`` (variance per unit signal) and ``read``
    (variance) are on the linear [0, 1] scale; independent per channel and pixel. Drawn on the CPU.
    """
    lin = img.clamp(0.0, 1.0) ** gamma
    z = torch.randn(img.shape, generator=generator, dtype=torch.float32).to(
        device=img.device, dtype=img.dtype
    )
    lin = (lin + z * torch.sqrt(shot * lin + read)).clamp(0.0, 1.0)
    return lin ** (1.0 / gamma)


def quantize_8bit(img: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid: ``round(x * 255) / 255``; same shape/device."""
    return (img * 255.0).round().clamp(0.0, 255.0) / 255.0


def jpeg(img: torch.Tensor, quality: int | Sequence[int]) -> torch.Tensor:
    """JPEG round trip through Pillow (libjpeg, 4:2:0), per image, on the CPU; ``[B, 3, H, W]`` in [0, 1].

    The input is clamped and rounded to 8 bit (a codec takes bytes); ``quality`` 1–100, one int
    or one per image. Output: float32 on ``img``'s device, on the 8-bit grid.
    """
    b = img.shape[0]
    qs = [int(quality)] * b if isinstance(quality, int | float) else [int(q) for q in quality]
    if len(qs) != b or any(not 1 <= q <= 100 for q in qs):
        raise ValueError(f"jpeg: need {b} qualities in [1, 100], got {quality!r}")
    arr = (img.detach().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    outs = []
    for i in range(b):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr[i]), mode="RGB").save(
            buf, format="JPEG", quality=qs[i], subsampling=2, optimize=False
        )
        buf.seek(0)
        with Image.open(buf) as decoded:
            outs.append(np.asarray(decoded.convert("RGB")))
    out = torch.from_numpy(np.stack(outs)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return out.to(device=img.device, dtype=img.dtype)


# --------------------------------------------------------------------------------------------
# sampling θ (every draw from the given generator; all values plain Python numbers)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return float(lo) + (float(hi) - float(lo)) * float(torch.rand((), generator=g, dtype=torch.float64))


def _bernoulli(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g, dtype=torch.float64)) < p


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(int(lo), int(hi) + 1, (), generator=g))


def _choice(g: torch.Generator, items: Sequence, probs: Sequence[float] | None = None):
    if probs is None:
        return items[_randint(g, 0, len(items) - 1)]
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    acc = 0.0
    for item, p in zip(items, probs, strict=True):
        acc += p
        if u < acc:
            return item
    return next(item for item, p in zip(reversed(items), reversed(probs), strict=True) if p > 0)


def _beta(g: torch.Generator, lo: float, hi: float) -> float:
    """BasicSR's β draw: with p .5 from [lo, 1), else from [1, hi] (plain uniform if 1 is outside)."""
    if lo <= 1.0 <= hi:
        return _uniform(g, lo, 1.0) if _bernoulli(g, 0.5) else _uniform(g, 1.0, hi)
    return _uniform(g, lo, hi)


def _sample_realesrgan_kernel(g: torch.Generator, cfg: RealESRGANConfig, second: bool) -> dict:
    size = int(_choice(g, cfg.kernel_sizes))
    if _bernoulli(g, cfg.sinc_prob2 if second else cfg.sinc_prob):
        rng = cfg.sinc_cutoff_small if size < cfg.sinc_small_size else cfg.sinc_cutoff_large
        return {"type": "sinc", "size": size, "cutoff": _uniform(g, *rng), "pad_to": cfg.kernel_pad_to}
    t = _choice(g, KERNEL_TYPES, cfg.kernel_probs2 if second else cfg.kernel_probs)
    sig = cfg.sigma_range2 if second else cfg.sigma_range
    spec: dict = {"type": t, "size": size}
    if t.endswith("_aniso") or t == "aniso":
        spec["sigma_x"] = _uniform(g, *sig)
        spec["sigma_y"] = _uniform(g, *sig)
        spec["rotation"] = _uniform(g, *cfg.rotation_range)
    else:
        spec["sigma_x"] = spec["sigma_y"] = _uniform(g, *sig)
        spec["rotation"] = 0.0
    if t.startswith("generalized"):
        spec["beta"] = _beta(g, *(cfg.beta_g_range2 if second else cfg.beta_g_range))
    elif t.startswith("plateau"):
        spec["beta"] = _beta(g, *(cfg.beta_p_range2 if second else cfg.beta_p_range))
    spec["pad_to"] = cfg.kernel_pad_to
    return spec


def _sample_realesrgan_resize(
    g: torch.Generator,
    probs: Sequence[float],
    rng: tuple[float, float],
    modes: Sequence[str],
    relative_to: str,
) -> dict:
    direction = _choice(g, ("up", "down", "keep"), probs)
    if direction == "up":
        factor = _uniform(g, 1.0, rng[1])
    elif direction == "down":
        factor = _uniform(g, rng[0], 1.0)
    else:
        factor = 1.0
    mode = _choice(g, modes)
    return {
        "op": "resize",
        "relative_to": relative_to,
        "direction": direction,
        "factor": factor,
        "mode": mode,
    }


def _sample_realesrgan_noise(
    g: torch.Generator,
    gaussian_prob: float,
    sigma_range: tuple[float, float],
    poisson_range: tuple[float, float],
    gray_prob: float,
    stream: int,
) -> dict:
    if _bernoulli(g, gaussian_prob):
        op = {"op": "gaussian_noise", "sigma": _uniform(g, *sigma_range)}
    else:
        op = {"op": "poisson_noise", "scale": _uniform(g, *poisson_range)}
    op["gray"] = _bernoulli(g, gray_prob)
    op["stream"] = stream
    return op


def _named(name: str, op: dict | None, applied: bool = True) -> dict:
    if op is None or not applied:
        return {"name": name, "op": (op or {}).get("op", "identity"), "applied": False}
    return {"name": name, **op, "applied": True}


def _sample_realesrgan(g: torch.Generator, scale: int, cfg: RealESRGANConfig) -> list[dict]:
    ops = [
        _named("blur1", {"op": "blur", "kernel": _sample_realesrgan_kernel(g, cfg, second=False)}),
        _named(
            "resize1",
            _sample_realesrgan_resize(g, cfg.resize_probs, cfg.resize_range, cfg.resize_modes, "current"),
        ),
        _named(
            "noise1",
            _sample_realesrgan_noise(
                g,
                cfg.gaussian_noise_prob,
                cfg.noise_sigma_range,
                cfg.poisson_scale_range,
                cfg.gray_noise_prob,
                0,
            ),
        ),
        _named("jpeg1", {"op": "jpeg", "quality": _randint(g, *cfg.jpeg_range)}),
    ]
    if _bernoulli(g, cfg.second_blur_prob):
        ops.append(_named("blur2", {"op": "blur", "kernel": _sample_realesrgan_kernel(g, cfg, second=True)}))
    else:
        ops.append(_named("blur2", {"op": "blur"}, applied=False))
    ops.append(
        _named(
            "resize2",
            _sample_realesrgan_resize(g, cfg.resize_probs2, cfg.resize_range2, cfg.resize_modes, "lr"),
        )
    )
    ops.append(
        _named(
            "noise2",
            _sample_realesrgan_noise(
                g,
                cfg.gaussian_noise_prob2,
                cfg.noise_sigma_range2,
                cfg.poisson_scale_range2,
                cfg.gray_noise_prob2,
                1,
            ),
        )
    )
    resize_first = _bernoulli(g, cfg.final_resize_first_prob)
    final_resize = _named(
        "final_resize",
        {"op": "resize", "relative_to": "lr", "factor": 1.0, "mode": _choice(g, cfg.resize_modes)},
    )
    if _bernoulli(g, cfg.final_sinc_prob):
        size = int(_choice(g, cfg.kernel_sizes))
        kernel = {
            "type": "sinc",
            "size": size,
            "cutoff": _uniform(g, *cfg.final_sinc_cutoff),
            "pad_to": cfg.kernel_pad_to,
        }
        final_sinc = _named("final_sinc", {"op": "blur", "kernel": kernel})
    else:
        final_sinc = _named("final_sinc", {"op": "blur"}, applied=False)
    jpeg2 = _named("jpeg2", {"op": "jpeg", "quality": _randint(g, *cfg.jpeg_range2)})
    ops += [final_resize, final_sinc, jpeg2] if resize_first else [jpeg2, final_resize, final_sinc]
    return ops


BSRGAN_SHUFFLED = ("blur1", "blur2", "down_mid", "down_final", "noise", "jpeg", "camera")


def _sample_bsrgan_blur(g: torch.Generator, s: int, cfg: BSRGANConfig) -> dict:
    size = int(_choice(g, cfg.blur_kernel_sizes))
    if _bernoulli(g, cfg.blur_aniso_prob):
        vmax = cfg.blur_aniso_var_base + cfg.blur_aniso_var_per_scale * s
        l1, l2 = _uniform(g, 0.0, vmax), _uniform(g, 0.0, vmax)
        rotation = _uniform(g, 0.0, math.pi)
        kernel = {
            "type": "aniso",
            "size": size,
            "sigma_x": max(math.sqrt(l1), cfg.min_sigma),
            "sigma_y": max(math.sqrt(l2), cfg.min_sigma),
            "rotation": rotation,
        }
    else:
        smax = cfg.blur_iso_sigma_base + cfg.blur_iso_sigma_per_scale * s
        sigma = max(_uniform(g, 0.0, smax), cfg.min_sigma)
        kernel = {"type": "iso", "size": size, "sigma_x": sigma, "sigma_y": sigma, "rotation": 0.0}
    return {"op": "blur", "kernel": kernel}


def _sample_bsrgan_op(g: torch.Generator, name: str, s: int, cfg: BSRGANConfig) -> dict:
    if name in ("blur1", "blur2"):
        return _named(name, _sample_bsrgan_blur(g, s, cfg))
    if name == "down_mid":
        if _bernoulli(g, cfg.down_mid_resize_prob):
            sf1 = _uniform(g, 1.0, cfg.down_mid_factor_per_scale * s)
            op = {
                "op": "resize",
                "relative_to": "current",
                "factor": 1.0 / sf1,
                "mode": _choice(g, cfg.resize_modes),
                "clip": True,  # BSRGAN clips to [0, 1] after each of its downsamples
            }
            return _named(name, op)
        sigma = _uniform(g, cfg.down_mid_sigma_min, cfg.down_mid_sigma_per_scale * s)
        size = cfg.down_mid_kernel_size
        kernel = {"type": "iso", "size": size, "sigma_x": sigma, "sigma_y": sigma, "rotation": 0.0}
        kernel["shift"] = (s - 1) / 2.0
        return _named(name, {"op": "blur_subsample", "kernel": kernel, "stride": s})
    if name == "down_final":
        return _named(
            name,
            {
                "op": "resize",
                "relative_to": "lr",
                "factor": 1.0,
                "mode": _choice(g, cfg.resize_modes),
                "clip": True,
            },
        )
    if name == "noise":
        level = _randint(g, *cfg.noise_level_range)
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        if u < cfg.noise_color_prob:
            return _named(name, {"op": "gaussian_noise", "sigma": float(level), "gray": False, "stream": 0})
        if u < cfg.noise_color_prob + cfg.noise_gray_prob:
            return _named(name, {"op": "gaussian_noise", "sigma": float(level), "gray": True, "stream": 0})
        d = torch.rand(3, generator=g, dtype=torch.float64)
        a = torch.rand((3, 3), generator=g, dtype=torch.float64)
        u_orth = torch.linalg.svd(a).U  # orthonormal basis of the range of a (scipy's orth)
        lvl = cfg.correlated_noise_level / 255.0
        cov = (lvl**2 * (u_orth.T @ torch.diag(d) @ u_orth)).abs()
        return _named(name, {"op": "correlated_noise", "level": level, "cov": cov.tolist(), "stream": 0})
    if name == "jpeg":
        if _bernoulli(g, cfg.jpeg_prob):
            return _named(name, {"op": "jpeg", "quality": _randint(g, *cfg.jpeg_range)})
        return _named(name, {"op": "jpeg"}, applied=False)
    if name == "camera":
        if _bernoulli(g, cfg.camera_prob):
            lo, hi = cfg.camera_shot_range
            log_shot = _uniform(g, math.log(lo), math.log(hi))
            z = float(torch.randn((), generator=g, dtype=torch.float64))
            log_read = cfg.camera_read_slope * log_shot + cfg.camera_read_intercept + cfg.camera_read_std * z
            op = {"op": "camera_noise", "gamma": cfg.camera_gamma, "shot": math.exp(log_shot)}
            op.update({"read": math.exp(log_read), "stream": 1})
            return _named(name, op)
        return _named(name, {"op": "camera_noise"}, applied=False)
    raise ValueError(f"unknown BSRGAN op {name!r}")


def _sample_bsrgan(g: torch.Generator, scale: int, cfg: BSRGANConfig) -> list[dict]:
    s = scale
    if scale == 4 and _bernoulli(g, cfg.pre_down_prob):
        mode = _choice(g, cfg.resize_modes) if _bernoulli(g, cfg.pre_down_cv2_prob) else "bicubic_aa"
        pre = {"op": "resize", "relative_to": "current", "factor": 0.5, "mode": mode, "clip": True}
        ops = [_named("pre_down", pre)]
        s = 2
    else:
        ops = [_named("pre_down", {"op": "resize"}, applied=False)]
    order = [BSRGAN_SHUFFLED[int(i)] for i in torch.randperm(len(BSRGAN_SHUFFLED), generator=g)]
    i_mid, i_final = order.index("down_mid"), order.index("down_final")
    if i_mid > i_final:  # the intermediate downsample always precedes the final one
        order[i_mid], order[i_final] = order[i_final], order[i_mid]
    ops += [_sample_bsrgan_op(g, name, s, cfg) for name in order]
    ops.append(_named("final_jpeg", {"op": "jpeg", "quality": _randint(g, *cfg.final_jpeg_range)}))
    return ops


def _sample_codec(g: torch.Generator, scale: int, cfg: CodecConfig) -> list[dict]:
    ops = []
    if _bernoulli(g, cfg.blur_prob):
        sigma = _uniform(g, *cfg.blur_sigma_range)
        size = 2 * math.ceil(3 * sigma) + 1
        kernel = {"type": "iso", "size": size, "sigma_x": sigma, "sigma_y": sigma, "rotation": 0.0}
        ops.append(_named("blur", {"op": "blur", "kernel": kernel}))
    else:
        ops.append(_named("blur", {"op": "blur"}, applied=False))
    mode = _choice(g, cfg.resize_modes)
    ops.append(_named("resize", {"op": "resize", "relative_to": "lr", "factor": 1.0, "mode": mode}))
    if _bernoulli(g, cfg.noise_prob):
        noise = {
            "op": "gaussian_noise",
            "sigma": _uniform(g, *cfg.noise_sigma_range),
            "gray": False,
            "stream": 1,
        }
        ops.append(_named("noise", noise))
    else:
        ops.append(_named("noise", {"op": "gaussian_noise"}, applied=False))
    for name, p, rng in (
        ("jpeg", cfg.jpeg_prob, cfg.jpeg_range),
        ("jpeg2", cfg.second_jpeg_prob, cfg.second_jpeg_range),
    ):
        if _bernoulli(g, p):
            ops.append(_named(name, {"op": "jpeg", "quality": _randint(g, *rng)}))
        else:
            ops.append(_named(name, {"op": "jpeg"}, applied=False))
    return ops


def _check_kind_scale(kind: str, scale: int, kinds: tuple[str, ...] = KINDS) -> None:
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def sample_theta(
    kind: str,
    scale: int,
    generator: torch.Generator,
    config: RealESRGANConfig | BSRGANConfig | CodecConfig | None = None,
) -> dict:
    """Draw one image's degradation θ from ``generator`` (CPU); returns a plain JSON-serialisable dict.

    ``config`` defaults to the paper's numbers for ``kind`` (``None`` for ``bicubic``, which draws
    nothing but ``noise_seed``). See the module docstring for the layout.
    """
    _check_kind_scale(kind, scale)
    expected = {
        "realesrgan": RealESRGANConfig,
        "bsrgan": BSRGANConfig,
        "bicubic": None,
        "codec": CodecConfig,
    }[kind]
    if config is not None and (expected is None or not isinstance(config, expected)):
        want = "no config" if expected is None else expected.__name__
        raise ValueError(f"config for kind {kind!r} must be {want}, got {type(config).__name__}")
    # < 2**53 so that the seed survives JSON readers that parse numbers as doubles
    noise_seed = int(torch.randint(0, 2**53, (), generator=generator))
    if kind == "realesrgan":
        ops = _sample_realesrgan(generator, scale, config or RealESRGANConfig())
    elif kind == "bsrgan":
        ops = _sample_bsrgan(generator, scale, config or BSRGANConfig())
    elif kind == "codec":
        ops = _sample_codec(generator, scale, config or CodecConfig())
    else:
        ops = [_named("resize", {"op": "resize", "relative_to": "lr", "factor": 1.0, "mode": "bicubic_aa"})]
    return {"version": THETA_VERSION, "kind": kind, "scale": scale, "noise_seed": noise_seed, "ops": ops}


LEVEL_STEP = (1.3, 2.0)  # near_theta: factor range of a blur width or noise level step, up or down
JPEG_STEP = (8, 20)  # near_theta: JPEG quality step range, up or down
_LEVEL_OPS = ("blur", "blur_subsample", "gaussian_noise", "poisson_noise", "correlated_noise", "jpeg")


def _has_level(op: dict) -> bool:
    if not op.get("applied", True) or op["op"] not in _LEVEL_OPS:
        return False
    return op["op"] not in ("blur", "blur_subsample") or op["kernel"]["type"] in KERNEL_TYPES


def near_theta(theta: dict, generator: torch.Generator) -> dict | None:
    """θ with the level of one of its applied ops moved one step: a *hard* negative for stage B.

    One op is drawn among those with a level (a Gaussian-family blur's width, a noise level, a JPEG
    quality) and moved up or down (p .5): widths and noise levels by a factor from ``LEVEL_STEP``,
    JPEG quality by ``JPEG_STEP`` points within [10, 95]. Everything else — the op order, the other
    levels, ``noise_seed`` — stays, so the two LR differ in that one level only. Returns a new dict
    (``theta`` is not modified), or ``None`` when θ has no op with a level (bicubic).
    """
    ops = [dict(op) for op in theta["ops"]]
    cands = [i for i, op in enumerate(ops) if _has_level(op)]
    if not cands:
        return None
    i = cands[_randint(generator, 0, len(cands) - 1)]
    op, up = ops[i], _bernoulli(generator, 0.5)
    if op["op"] == "jpeg":
        step = _randint(generator, *JPEG_STEP)
        q = int(op["quality"])
        moved = q + step if up else q - step
        if not 10 <= moved <= 95:  # no room on that side: step the other way
            moved = q - step if up else q + step
        op["quality"] = min(95, max(10, moved))
        return {**theta, "ops": ops}
    f = _uniform(generator, *LEVEL_STEP)
    f = f if up else 1.0 / f
    if op["op"] in ("blur", "blur_subsample"):
        k = dict(op["kernel"])
        k["sigma_x"], k["sigma_y"] = k["sigma_x"] * f, k["sigma_y"] * f
        if k["type"] == "iso" and "pad_to" not in k:  # the codec kind sizes its kernel to 3σ
            k["size"] = max(int(k["size"]), 2 * math.ceil(3 * k["sigma_x"]) + 1)
        op["kernel"] = k
    elif op["op"] == "gaussian_noise":
        op["sigma"] = float(op["sigma"]) * f
    elif op["op"] == "poisson_noise":
        op["scale"] = float(op["scale"]) * f
    else:  # correlated noise: the covariance scales with the level squared
        op["cov"] = [[float(c) * f * f for c in row] for row in op["cov"]]
    return {**theta, "ops": ops}


# --------------------------------------------------------------------------------------------
# applying θ


UNIT_TOLERANCE = 1e-3  # how far outside [0, 1] an image may stray (float round-off) before it is refused


def check_unit_images(x: torch.Tensor, name: str) -> None:
    """Refuse what is not a float image in [0, 1]: an 8-bit (integer or bool) tensor, and a float
    one on the CPU holding NaN/inf or values outside [0, 1] (0–255 floats). Such inputs used to run
    and come out almost white (``x / 255`` was never applied). The values are read on the CPU only:
    on a GPU that would be a host sync in a hot path (a training step, the job's generate call)."""
    if not torch.is_floating_point(x):
        raise ValueError(
            f"{name} must be a float tensor in [0, 1], got {x.dtype}: for 8-bit images use x.float() / 255"
        )
    if x.device.type != "cpu" or x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} holds NaN or inf values")
    if lo < -UNIT_TOLERANCE or hi > 1 + UNIT_TOLERANCE:
        hint = " (0–255 values? divide by 255)" if hi > 2 else ""
        raise ValueError(f"{name} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def modcrop(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """HR-size policy: crop bottom/right so H and W are multiples of ``scale``; ``[..., H, W]`` view."""
    h, w = hr.shape[-2:]
    return hr[..., : h - h % scale, : w - w % scale]


def _target(n: int, factor: float) -> int:
    return max(1, int(math.floor(n * factor)))


def _apply_op(x: torch.Tensor, op: dict, lr_size: tuple[int, int], noise_seed: int) -> torch.Tensor:
    t = op["op"]
    if t == "blur":
        return filter2d(x, build_kernel(op["kernel"]))
    if t == "resize":
        base = x.shape[-2:] if op["relative_to"] == "current" else lr_size
        f = float(op["factor"])
        out = resize(x, (_target(base[0], f), _target(base[1], f)), op["mode"])
        return out.clamp(0.0, 1.0) if op.get("clip") else out
    if t == "blur_subsample":
        stride = int(op["stride"])
        return filter2d(x, build_kernel(op["kernel"]))[..., ::stride, ::stride]
    if t == "jpeg":
        return jpeg(x, int(op["quality"]))
    if t == "unsharp":
        return unsharp_mask(x, float(op["sigma"]), float(op["amount"]))
    g = _cpu_generator(int(noise_seed) + int(op["stream"]))
    if t == "gaussian_noise":
        return add_gaussian_noise(x, float(op["sigma"]), bool(op["gray"]), g)
    if t == "poisson_noise":
        return add_poisson_noise(x, float(op["scale"]), bool(op["gray"]), g)
    if t == "correlated_noise":
        return add_correlated_noise(x, op["cov"], g)
    if t == "camera_noise":
        return add_camera_noise(x, float(op["shot"]), float(op["read"]), float(op["gamma"]), g)
    raise ValueError(f"unknown op {t!r} in θ op {op.get('name')!r}")


def _apply_one(x: torch.Tensor, theta: dict) -> torch.Tensor:
    """θ on one modcropped image ``[1, 3, H, W]``; returns the quantised ``[1, 3, H/s, W/s]``."""
    s = int(theta["scale"])
    lr_size = (x.shape[-2] // s, x.shape[-1] // s)
    for op in theta["ops"]:
        if op.get("applied", True):
            x = _apply_op(x, op, lr_size, int(theta["noise_seed"]))
    if tuple(x.shape[-2:]) != lr_size:
        raise ValueError(f"θ ops end at size {tuple(x.shape[-2:])}, expected the LR size {lr_size}")
    return quantize_8bit(x)


def apply(hr: torch.Tensor, thetas: Sequence[dict]) -> torch.Tensor:
    """Apply θ_i to image i of ``hr`` (float ``[B, 3, H, W]`` in [0, 1], any device), deterministically.

    The HR is modcropped to a multiple of the scale first; returns float32 ``[B, 3, H // s, W // s]``
    on ``hr``'s device, clamped and 8-bit quantised. ``thetas`` are not modified.
    """
    if hr.dim() != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr must be [B, 3, H, W], got {tuple(hr.shape)}")
    check_unit_images(hr, "hr")
    if isinstance(thetas, Mapping):
        raise ValueError("thetas must be a sequence of θ dicts, one per image: got one θ (pass [theta])")
    if len(thetas) != hr.shape[0]:
        raise ValueError(f"need one θ per image: {hr.shape[0]} images, {len(thetas)} θs")
    scales = {int(t["scale"]) for t in thetas}
    if len(scales) > 1:
        raise ValueError(f"all θs of a batch must share one scale, got {sorted(scales)}")
    for t in thetas:
        _check_kind_scale(t["kind"], int(t["scale"]), APPLY_KINDS)
        if t.get("version") != THETA_VERSION:
            raise ValueError(f"θ version {t.get('version')!r} is not supported (expected {THETA_VERSION})")
    if not thetas:
        return hr.new_zeros((0, 3, 0, 0))
    s = scales.pop()
    if hr.shape[-2] < s or hr.shape[-1] < s:
        raise ValueError(f"hr of size {tuple(hr.shape[-2:])} is smaller than the scale {s}")
    x = modcrop(hr, s).to(torch.float32)
    with torch.no_grad():
        return torch.cat([_apply_one(x[i : i + 1], t) for i, t in enumerate(thetas)])


def degrade(
    hr: torch.Tensor,
    kind: str,
    scale: int,
    generators: Sequence[torch.Generator],
    config: RealESRGANConfig | BSRGANConfig | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Draw θ_i from ``generators[i]`` for each image and apply it; returns ``(lr, thetas)``.

    ``hr`` float ``[B, 3, H, W]`` in [0, 1]; ``lr`` float32 ``[B, 3, H // scale, W // scale]``,
    8-bit quantised. One generator per image, so an image's LR never depends on its batch.
    """
    if len(generators) != hr.shape[0]:
        raise ValueError(f"need one generator per image: {hr.shape[0]} images, {len(generators)} generators")
    thetas = [sample_theta(kind, scale, g, config) for g in generators]
    return apply(hr, thetas), thetas
