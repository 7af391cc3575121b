"""PSNR/SSIM against known values, crop_border, Y channel and input kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from realdgen_core.metrics import psnr, ssim


@pytest.fixture()
def img(photos) -> np.ndarray:
    return photos["astronaut"][100:164, 200:280].copy()  # 64x80 uint8 HWC


def test_identical_images(img):
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    t = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    assert psnr(t, t) == math.inf and psnr(t[None], t[None], y_channel=True) == math.inf
    assert ssim(t, t[None]) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_psnr(img):
    a = np.clip(img, 0, 240)
    b = a + 10  # no overflow: max 250
    expect = 20 * math.log10(255 / 10)
    assert psnr(a, b) == pytest.approx(expect, abs=1e-9)
    ta = torch.from_numpy(a).permute(2, 0, 1).double() / 255
    assert psnr(ta, ta + 10 / 255) == pytest.approx(expect, abs=1e-9)
    # Y of a uniform RGB offset d is offset by d·(65.481+128.553+24.966)/255 = d·219/255.
    assert psnr(a, b, y_channel=True) == pytest.approx(20 * math.log10(255 / (10 * 219 / 255)), abs=1e-6)
    assert ssim(a, b) < 1.0


def test_crop_border_removes_corrupted_border(img):
    b = img.copy()
    b[:4] = 0
    b[:, -4:] = 255
    assert psnr(img, b) < 30 and ssim(img, b) < 0.99
    assert psnr(img, b, crop_border=4) == math.inf
    assert ssim(img, b, crop_border=4) == pytest.approx(1.0, abs=1e-12)
    assert psnr(img, b, crop_border=3) < 40


def test_ssim_matches_skimage_and_orders_noise(img):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    light = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(img + rng.normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(
        img,
        light,
        data_range=255,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(img, light) == pytest.approx(ref, abs=1e-12)
    assert 1.0 > ssim(img, light) > ssim(img, heavy) > 0
    assert psnr(img, light) > psnr(img, heavy)
    # Tensor and uint8 inputs agree.
    ta = torch.from_numpy(img).permute(2, 0, 1).float() / 255
    tb = torch.from_numpy(light).permute(2, 0, 1).float() / 255
    assert psnr(ta, tb) == pytest.approx(psnr(img, light), abs=1e-4)
    assert ssim(ta, tb, y_channel=True) == pytest.approx(ssim(img, light, y_channel=True), abs=1e-5)


def test_input_validation(img):
    with pytest.raises(ValueError, match="shape"):
        psnr(img, img[:-1])
    with pytest.raises(TypeError, match="uint8"):
        psnr(img.astype(np.float32), img.astype(np.float32))
    with pytest.raises(ValueError, match="batch size 1"):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="crop_border"):
        psnr(img, img, crop_border=40)


def test_float_tensors_on_the_0_255_scale_are_refused_and_lr_stats_names_what_it_takes():
    """psnr(x * 255, y * 255) on float tensors scored them as [0, 1] images: −21 dB, no word."""
    from realdgen_core import realism

    x = torch.rand(3, 16, 16)
    y = (x + 0.01).clamp(0, 1)
    assert psnr(x, y) > 30
    with pytest.raises(ValueError, match=r"a must be in \[0, 1\], got values in .*divide by 255"):
        psnr(x * 255, y * 255)
    with pytest.raises(
        TypeError, match=r"expected a uint8 numpy array \(HxWx3 or HxW\), got Tensor of torch.uint8"
    ):
        realism.lr_stats((x * 255).byte())
    with pytest.raises(TypeError, match=r"got dtype float32"):
        realism.lr_stats(x.permute(1, 2, 0).numpy())
    assert set(realism.lr_stats((x.permute(1, 2, 0) * 255).round().byte().numpy())) == set(realism.STATS)
