"""A camera-like stand-in for real LR images: optics, sensor sampling, raw noise, demosaicing, ISP, JPEG.

No real LR corpus can be downloaded on the machines this project is built on, so the demo and the
tests need *something* that plays the part of "real LR from a camera" while not being the
Real-ESRGAN/BSRGAN synthetic model D that the extractors are trained with. This module is that
stand-in. It is a plausible, documented simulation of a small-sensor camera — it is NOT real LR,
and numbers measured on it say nothing about real cameras.

Pipeline per image (every parameter drawn from the image's own ``torch.Generator``):

1. optics: a defocus disk of radius ``r`` convolved with a small Gaussian (lens aberrations);
2. sensor sampling: area downsampling by ``scale`` (pixel integration);
3. to linear light (inverse sRGB), white-balance gains, Bayer RGGB mosaic;
4. raw noise: Poisson shot noise (``full_well`` electrons at white) + Gaussian read noise;
5. bilinear demosaicing (the zipper/colour-fringe artefacts of cheap ISPs);
6. sRGB gamma, in-camera unsharp-mask sharpening (halo artefacts);
7. JPEG through Pillow's libjpeg at a drawn quality, then 8-bit rounding.

Three named profiles (``phone``, ``compact``, ``webcam``) set the parameter ranges; the profile is
itself drawn per image. Tensors are ``float32 [B, 3, H, W]`` in ``[0, 1]``; the output is
``[B, 3, H // scale, W // scale]`` (bottom/right cropped to a multiple of ``scale``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class CameraProfile:
    """Ranges (lo, hi) of one simulated camera; each value is drawn uniformly per image."""

    defocus_radius: tuple[float, float]
    lens_sigma: tuple[float, float]
    full_well: tuple[float, float]  # electrons at white: lower = noisier
    read_noise: tuple[float, float]  # std of read noise, in fractions of white
    wb_jitter: float  # max relative white-balance error per channel
    sharpen: tuple[float, float]  # unsharp-mask amount
    jpeg_quality: tuple[int, int]


PROFILES: dict[str, CameraProfile] = {
    "phone": CameraProfile(
        (0.0, 1.2), (0.4, 0.9), (300.0, 1500.0), (0.002, 0.01), 0.05, (0.3, 1.0), (70, 92)
    ),
    "compact": CameraProfile(
        (0.3, 1.8), (0.5, 1.2), (800.0, 4000.0), (0.001, 0.005), 0.03, (0.0, 0.5), (80, 95)
    ),
    "webcam": CameraProfile(
        (0.5, 2.5), (0.8, 1.6), (100.0, 600.0), (0.005, 0.02), 0.08, (0.5, 1.5), (40, 75)
    ),
}


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=gen).item())


def sample_camera_params(generator: torch.Generator) -> dict:
    """Draw one image's camera parameters (profile and every value) into a plain dict."""
    names = sorted(PROFILES)
    name = names[int(torch.randint(len(names), (), generator=generator))]
    p = PROFILES[name]
    jitter = [1.0 + _uniform(generator, -p.wb_jitter, p.wb_jitter) for _ in range(3)]
    return {
        "profile": name,
        "defocus_radius": _uniform(generator, *p.defocus_radius),
        "lens_sigma": _uniform(generator, *p.lens_sigma),
        "full_well": _uniform(generator, *p.full_well),
        "read_noise": _uniform(generator, *p.read_noise),
        "wb_gains": jitter,
        "sharpen": _uniform(generator, *p.sharpen),
        "jpeg_quality": int(torch.randint(p.jpeg_quality[0], p.jpeg_quality[1] + 1, (), generator=generator)),
        "noise_seed": int(torch.randint(0, 2**62, (), generator=generator)),
    }


def lens_psf(defocus_radius: float, sigma: float, size: int = 15) -> torch.Tensor:
    """PSF: a disk of ``defocus_radius`` px blurred by a Gaussian; ``[size, size]``, sums to 1."""
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    rr = torch.sqrt(xx**2 + yy**2)
    # Soft-edged disk (anti-aliased by a 0.5 px ramp) so small radii still give a valid kernel.
    disk = torch.clamp(defocus_radius + 0.5 - rr, 0.0, 1.0)
    gauss = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    psf = torch.fft.irfft2(
        torch.fft.rfft2(torch.fft.ifftshift(disk)) * torch.fft.rfft2(torch.fft.ifftshift(gauss)),
        s=(size, size),
    )
    psf = torch.fft.fftshift(psf).clamp_min(0)
    return (psf / psf.sum()).float()


def _conv_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise 'same' convolution with reflect padding. x [1,C,H,W], kernel [k,k]."""
    k = kernel.shape[-1]
    c = x.shape[1]
    w = kernel.to(x).expand(c, 1, k, k)
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="reflect"), w, groups=c)


def _srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp_min(1e-12) ** (1 / 2.4) - 0.055)


def _bayer_masks(h: int, w: int, device: torch.device) -> torch.Tensor:
    """RGGB masks [3, h, w] (1 where the sensor samples that colour)."""
    m = torch.zeros(3, h, w, device=device)
    m[0, 0::2, 0::2] = 1
    m[1, 0::2, 1::2] = 1
    m[1, 1::2, 0::2] = 1
    m[2, 1::2, 1::2] = 1
    return m


def _demosaic_bilinear(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Bilinear demosaicing by normalised convolution. raw [1,1,h,w] -> [1,3,h,w]."""
    k = torch.tensor([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]], device=raw.device)
    sampled = raw * masks.unsqueeze(0)
    num = _conv_same(sampled, k)
    den = _conv_same(masks.unsqueeze(0), k)
    return num / den.clamp_min(1e-6)


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG round trip through Pillow (libjpeg, 4:2:0). x [3,H,W] in [0,1] -> same shape."""
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(out.copy()).permute(2, 0, 1).float().div(255).to(x.device)


def apply_camera(hr: torch.Tensor, params: dict, scale: int) -> torch.Tensor:
    """Apply one image's camera parameters: hr [3,H,W] in [0,1] -> LR [3,H//s,W//s], 8-bit values."""
    h, w = (hr.shape[-2] // scale) * scale, (hr.shape[-1] // scale) * scale
    x = hr[:, :h, :w].unsqueeze(0).float()
    x = _conv_same(x, lens_psf(params["defocus_radius"], params["lens_sigma"]).to(x.device))
    x = F.avg_pool2d(x, scale)  # pixel integration over scale x scale HR pixels
    lin = _srgb_to_linear(x.clamp(0, 1)) * torch.tensor(params["wb_gains"], device=x.device).view(1, 3, 1, 1)
    lh, lw = lin.shape[-2:]
    masks = _bayer_masks(lh, lw, x.device)
    raw = (lin * masks.unsqueeze(0)).sum(1, keepdim=True).clamp(0, 1)
    noise_gen = torch.Generator().manual_seed(params["noise_seed"])
    electrons = torch.poisson((raw * params["full_well"]).cpu(), generator=noise_gen)
    read = torch.randn(raw.shape, generator=noise_gen) * params["read_noise"]
    raw = (electrons / params["full_well"] + read).to(x.device)
    rgb = _linear_to_srgb(
        _demosaic_bilinear(raw, masks) / torch.tensor(params["wb_gains"], device=x.device).view(1, 3, 1, 1)
    )
    if params["sharpen"] > 0:
        blurred = _conv_same(rgb, lens_psf(0.0, 1.0, size=5).to(x.device))
        rgb = rgb + params["sharpen"] * (rgb - blurred)
    out = _jpeg(rgb[0], params["jpeg_quality"])
    return (out * 255).round() / 255


def camera_standin(
    hr: torch.Tensor, scale: int, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, list[dict]]:
    """Simulate camera LR for a batch. hr [B,3,H,W] in [0,1]; one generator per image.

    Returns (lr [B,3,H//scale,W//scale] quantised to 8 bit, the per-image parameter dicts).
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"camera_standin expects [B,3,H,W], got {tuple(hr.shape)}")
    if len(generators) != hr.shape[0]:
        raise ValueError(f"camera_standin needs one generator per image: {len(generators)} for {hr.shape[0]}")
    if scale < 1 or math.log2(scale) % 1:
        raise ValueError(f"scale must be a power of two, got {scale}")
    params = [sample_camera_params(g) for g in generators]
    return torch.stack([apply_camera(hr[i], params[i], scale) for i in range(hr.shape[0])]), params
