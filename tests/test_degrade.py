"""Tests of the degradation engine D: θ replay, forced branches vs closed forms, sizes, RNG hygiene."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from realdgen_core import degrade as D
from realdgen_core.degrade import BSRGANConfig, RealESRGANConfig


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def photo(b: int = 1, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A smooth random image with edges and texture, float32 [b, 3, h, w] in [0, 1]."""
    g = gen(seed)
    low = torch.rand((b, 3, max(2, h // 8), max(2, w // 8)), generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    img = img + 0.15 * torch.rand((b, 3, h, w), generator=g)
    yy = torch.arange(h).view(1, 1, h, 1)
    img = img + 0.3 * ((yy // 8) % 2)  # hard horizontal edges
    return (img / img.amax()).clamp(0, 1).to(torch.float32)


def op(theta: dict, name: str) -> dict:
    (found,) = [o for o in theta["ops"] if o["name"] == name]
    return found


def names(theta: dict) -> list[str]:
    return [o["name"] for o in theta["ops"]]


# ---------------------------------------------------------------------------------------------
# closed forms computed independently with numpy


def np_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    r = (size - 1) / 2
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x, y


def np_rotated_q(size: int, sx: float, sy: float, rot: float) -> np.ndarray:
    x, y = np_grid(size)
    u = x * math.cos(rot) + y * math.sin(rot)
    v = -x * math.sin(rot) + y * math.cos(rot)
    return u**2 / sx**2 + v**2 / sy**2


def np_bessel_j1(z: np.ndarray) -> np.ndarray:
    """J1 by Bessel's integral (1/π) ∫_0^π cos(τ − z sin τ) dτ (composite Simpson, no scipy)."""
    n = 2000
    tau = np.linspace(0, np.pi, n + 1)
    wts = np.ones(n + 1)
    wts[1:-1:2], wts[2:-1:2] = 4, 2
    vals = np.cos(tau[None, :] - z.reshape(-1, 1) * np.sin(tau)[None, :])
    return ((vals * wts).sum(axis=1) * (np.pi / n) / 3 / np.pi).reshape(z.shape)


def np_expected_kernel(spec: dict) -> np.ndarray:
    size, t = spec["size"], spec["type"]
    if t == "sinc":
        x, y = np_grid(size)
        r = np.hypot(x, y)
        w = spec["cutoff"]
        with np.errstate(invalid="ignore", divide="ignore"):
            k = w * np_bessel_j1(w * r) / (2 * np.pi * r)
        k[r == 0] = w**2 / (4 * np.pi)
    else:
        q = np_rotated_q(size, spec["sigma_x"], spec["sigma_y"], spec["rotation"])
        if t in ("iso", "aniso"):
            k = np.exp(-q / 2)
        elif t.startswith("generalized"):
            k = np.exp(-0.5 * q ** spec["beta"])
        else:
            k = 1 / (1 + q ** spec["beta"])
    k = k / k.sum()
    p = (spec.get("pad_to", size) - size) // 2
    return np.pad(k, p)


# ---------------------------------------------------------------------------------------------
# θ: replay, JSON, per-image draws, batch independence, global RNG


@pytest.mark.parametrize("kind", D.KINDS)
@pytest.mark.parametrize("scale", [2, 4])
def test_theta_replays_bytes_and_survives_json(kind: str, scale: int) -> None:
    hr = photo(1, 64, 72, seed=1)
    lr, (theta,) = D.degrade(hr, kind, scale, [gen(7)])
    assert lr.shape == (1, 3, 64 // scale, 72 // scale) and lr.dtype == torch.float32
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    assert torch.equal(lr, (lr * 255).round() / 255)  # 8-bit grid
    again = D.apply(hr, [theta])
    assert again.numpy().tobytes() == lr.numpy().tobytes()
    loaded = json.loads(json.dumps(theta))
    assert loaded == theta
    assert torch.equal(D.apply(hr, [loaded]), lr)
    # the same generator seed gives the same θ
    assert D.sample_theta(kind, scale, gen(7)) == theta


@pytest.mark.parametrize("kind", ["realesrgan", "bsrgan"])
def test_same_theta_on_two_images(kind: str) -> None:
    theta = D.sample_theta(kind, 4, gen(3))
    frozen = copy.deepcopy(theta)
    a, b = photo(1, 64, 64, seed=1), photo(1, 64, 64, seed=2)
    out = D.apply(torch.cat([a, b, a]), [theta, theta, theta])
    assert theta == frozen  # apply records nothing new and changes nothing
    assert torch.equal(out[0], out[2])  # identical inputs -> identical outputs
    assert not torch.equal(out[0], out[1])
    # the same θ on an image of another size
    other = D.apply(photo(1, 96, 80, seed=4), [theta])
    assert other.shape == (1, 3, 24, 20)


def test_noise_seed_drives_the_noise_field() -> None:
    cfg = RealESRGANConfig(gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0)
    theta = D.sample_theta("realesrgan", 2, gen(5), cfg)
    hr = photo(1, 64, 64)
    changed = dict(theta, noise_seed=theta["noise_seed"] + 12345)
    assert torch.equal(D.apply(hr, [theta]), D.apply(hr, [dict(theta)]))
    assert not torch.equal(D.apply(hr, [theta]), D.apply(hr, [changed]))


@pytest.mark.parametrize("kind", D.KINDS)
def test_draws_are_per_image_and_batch_independent(kind: str) -> None:
    hr = photo(8, 64, 64, seed=11)
    hr[3] = hr[2]  # two identical images with different generators
    batch, thetas = D.degrade(hr, kind, 4, [gen(100 + i) for i in range(8)])
    # every image draws its own θ (bicubic draws only its noise seed)
    assert len({json.dumps(t, sort_keys=True) for t in thetas}) == 8
    assert len({t["noise_seed"] for t in thetas}) == 8
    if kind != "bicubic":
        assert not torch.equal(batch[2], batch[3])
        assert len({json.dumps(t["ops"], sort_keys=True) for t in thetas}) == 8
    # a sample's pixels and θ do not depend on the batch it ran in
    for i in (0, 5):
        alone, (theta,) = D.degrade(hr[i : i + 1], kind, 4, [gen(100 + i)])
        assert theta == thetas[i]
        assert torch.equal(alone[0], batch[i])


@pytest.mark.parametrize("kind", D.KINDS)
def test_global_rng_untouched(kind: str) -> None:
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    D.degrade(photo(2, 64, 64), kind, 4, [gen(1), gen(2)])
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert random.getstate() == py_state


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize("kind", D.KINDS)
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("hw", [(67, 70), (81, 96)])
def test_lr_size_is_hr_over_scale(kind: str, scale: int, hw: tuple[int, int]) -> None:
    h, w = hw
    hr = photo(2, h, w)
    lr, _ = D.degrade(hr, kind, scale, [gen(s) for s in range(2)])
    assert lr.shape == (2, 3, h // scale, w // scale)


def test_bsrgan_lr_size_with_every_forced_branch() -> None:
    hr = photo(1, 67, 70)
    for cfg in (
        BSRGANConfig(pre_down_prob=1.0, down_mid_resize_prob=0.0),
        BSRGANConfig(pre_down_prob=1.0, down_mid_resize_prob=1.0, pre_down_cv2_prob=0.0),
        BSRGANConfig(pre_down_prob=0.0, down_mid_resize_prob=0.0),
    ):
        lr, _ = D.degrade(hr.expand(2, -1, -1, -1), "bsrgan", 4, [gen(0), gen(1)], cfg)
        assert lr.shape == (2, 3, 16, 17)


def test_modcrop() -> None:
    x = torch.rand(2, 3, 67, 70)
    assert D.modcrop(x, 4).shape == (2, 3, 64, 68)
    assert D.modcrop(x, 2).shape == (2, 3, 66, 70)
    assert torch.equal(D.modcrop(x, 4), x[..., :64, :68])  # bottom/right crop


# ---------------------------------------------------------------------------------------------
# kernels


@pytest.mark.parametrize("index", range(6))
def test_each_kernel_type_forced_matches_closed_form(index: int) -> None:
    probs = tuple(1.0 if i == index else 0.0 for i in range(6))
    cfg = RealESRGANConfig(kernel_probs=probs, sinc_prob=0.0, kernel_sizes=(11,))
    expected_type = D.KERNEL_TYPES[index]
    betas = []
    for seed in range(6):
        spec = op(D.sample_theta("realesrgan", 4, gen(seed), cfg), "blur1")["kernel"]
        assert spec["type"] == expected_type and spec["size"] == 11 and spec["pad_to"] == 21
        assert 0.2 <= spec["sigma_x"] <= 3 and 0.2 <= spec["sigma_y"] <= 3
        if "_iso" in expected_type or expected_type == "iso":
            assert spec["sigma_x"] == spec["sigma_y"] and spec["rotation"] == 0
        if "beta" in spec:
            betas.append(spec["beta"])
        k = D.build_kernel(spec)
        assert k.shape == (21, 21) and k.dtype == torch.float32
        assert abs(float(k.sum()) - 1) < 1e-5
        assert torch.all(k[:5] == 0) and torch.all(k[:, -5:] == 0)  # 11x11 support padded to 21
        np.testing.assert_allclose(k.numpy(), np_expected_kernel(spec), atol=1e-6)
    if expected_type.startswith("generalized"):
        assert all(0.5 <= b <= 4 for b in betas)
    elif expected_type.startswith("plateau"):
        assert all(1 <= b <= 2 for b in betas)


def test_plateau_and_generalized_shapes() -> None:
    # relative to its peak, generalized β<1 has heavier tails than the Gaussian, β>1 a flatter top
    def rel(k: torch.Tensor, col: int) -> float:
        return float(k[10, col] / k[10, 10])

    g_low = D.generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, 0.5)
    gauss = D.anisotropic_gaussian_kernel(21, 2.0, 2.0, 0.0)
    g_high = D.generalized_gaussian_kernel(21, 2.0, 2.0, 0.0, 4.0)
    assert rel(g_low, 0) > rel(gauss, 0) > rel(g_high, 0)  # tails (r = 10)
    assert rel(g_low, 11) < rel(gauss, 11) < rel(g_high, 11)  # shoulder (r = 1)
    assert abs(rel(g_low, 0) - math.exp(-0.5 * 5.0)) < 1e-5  # exp(-½ (r²/σ²)^β) at r = 10
    plateau = D.plateau_kernel(21, 3.0, 3.0, 0.0, 2.0)
    gauss3 = D.anisotropic_gaussian_kernel(21, 3.0, 3.0, 0.0)
    assert abs(rel(plateau, 11) - 1 / (1 + (1 / 9) ** 2)) < 1e-5  # 1 / (1 + (r²/σ²)^β)
    assert rel(plateau, 11) > rel(gauss3, 11) and rel(plateau, 0) > rel(gauss3, 0)  # flat top, long tail
    assert torch.allclose(
        D.generalized_gaussian_kernel(15, 1.3, 0.7, 0.4, 1.0),
        D.anisotropic_gaussian_kernel(15, 1.3, 0.7, 0.4),
    )


@pytest.mark.parametrize("size", [7, 11, 15, 21])
def test_sinc_forced_matches_closed_form(size: int) -> None:
    cfg = RealESRGANConfig(sinc_prob=1.0, kernel_sizes=(size,))
    for seed in range(3):
        spec = op(D.sample_theta("realesrgan", 4, gen(seed), cfg), "blur1")["kernel"]
        assert spec["type"] == "sinc" and spec["size"] == size
        lo = math.pi / 3 if size < 13 else math.pi / 5
        assert lo <= spec["cutoff"] <= math.pi
        k = D.build_kernel(spec)
        assert abs(float(k.sum()) - 1) < 1e-5
        np.testing.assert_allclose(k.numpy(), np_expected_kernel(spec), atol=1e-6)


def test_final_sinc_forced() -> None:
    on = D.sample_theta("realesrgan", 4, gen(1), RealESRGANConfig(final_sinc_prob=1.0))
    off = D.sample_theta("realesrgan", 4, gen(1), RealESRGANConfig(final_sinc_prob=0.0))
    spec = op(on, "final_sinc")["kernel"]
    assert op(on, "final_sinc")["applied"] and spec["type"] == "sinc"
    assert math.pi / 3 <= spec["cutoff"] <= math.pi
    assert not op(off, "final_sinc")["applied"]


@pytest.mark.parametrize("size", [7, 21])  # direct conv and FFT paths
def test_filter2d_matches_numpy_correlation_with_reflect_padding(size: int) -> None:
    img = torch.rand(2, 3, 27, 29, generator=gen(0))
    k = D.anisotropic_gaussian_kernel(size, 1.5, 0.6, 0.7)
    k = k + 1e-3 * torch.rand((size, size), generator=gen(1))  # break the symmetry
    k = k / k.sum()
    padded = D.pad_kernel(k, 25)  # zero rings must not change the result
    out = D.filter2d(img, padded).numpy()
    p = size // 2
    x = np.pad(img.numpy().astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)), mode="reflect")
    ref = np.zeros(img.shape)
    kn = k.numpy().astype(np.float64)
    for dy in range(size):
        for dx in range(size):
            ref += kn[dy, dx] * x[:, :, dy : dy + 27, dx : dx + 29]
    np.testing.assert_allclose(out, ref, atol=2e-6)
    # one kernel per image
    per_image = D.filter2d(img, torch.stack([k, D.isotropic_gaussian_kernel(size, 1.0)]))
    np.testing.assert_allclose(per_image[0].numpy(), ref[0], atol=2e-6)
    # tiny images fall back to replicate padding instead of failing
    assert D.filter2d(img[..., :4, :5], k).shape == (2, 3, 4, 5)


def test_kernel_type_frequencies_follow_config() -> None:
    counts: dict[str, int] = {}
    n = 1500
    for seed in range(n):
        t = op(D.sample_theta("realesrgan", 4, gen(seed)), "blur1")["kernel"]["type"]
        counts[t] = counts.get(t, 0) + 1
    assert abs(counts.get("sinc", 0) / n - 0.1) < 0.03
    for t, p in zip(D.KERNEL_TYPES, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03), strict=True):
        assert abs(counts.get(t, 0) / n - 0.9 * p) < 0.04, (t, counts)


# ---------------------------------------------------------------------------------------------
# noise


def test_gaussian_noise_sigma_and_gray() -> None:
    flat = torch.full((1, 3, 128, 128), 0.5)
    colour = D.add_gaussian_noise(flat, 10.0, False, gen(0))
    assert abs(float((colour - 0.5).std()) * 255 - 10.0) < 0.4
    assert not torch.equal(colour[:, 0], colour[:, 1])
    gray = D.add_gaussian_noise(flat, 20.0, True, gen(0))
    assert abs(float((gray - 0.5).std()) * 255 - 20.0) < 0.8
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    assert torch.equal(D.add_gaussian_noise(flat, 10.0, False, gen(0)), colour)


def test_noise_types_forced_in_theta() -> None:
    g_cfg = RealESRGANConfig(
        gaussian_noise_prob=1.0, gray_noise_prob=1.0, gaussian_noise_prob2=0.0, gray_noise_prob2=0.0
    )
    for seed in range(5):
        theta = D.sample_theta("realesrgan", 4, gen(seed), g_cfg)
        n1, n2 = op(theta, "noise1"), op(theta, "noise2")
        assert n1["op"] == "gaussian_noise" and n1["gray"] is True and 1 <= n1["sigma"] <= 30
        assert n2["op"] == "poisson_noise" and n2["gray"] is False and 0.05 <= n2["scale"] <= 2.5
        assert n1["stream"] != n2["stream"]
    for noise_cfg, expect in (
        (BSRGANConfig(noise_color_prob=1.0, noise_gray_prob=0.0), ("gaussian_noise", False)),
        (BSRGANConfig(noise_color_prob=0.0, noise_gray_prob=1.0), ("gaussian_noise", True)),
        (BSRGANConfig(noise_color_prob=0.0, noise_gray_prob=0.0), ("correlated_noise", None)),
    ):
        n = op(D.sample_theta("bsrgan", 4, gen(0), noise_cfg), "noise")
        assert n["op"] == expect[0] and n.get("gray") is expect[1]
        level = n["sigma"] if "sigma" in n else n["level"]
        assert 2 <= level <= 25 and level == int(level)


def test_gaussian_sigma_through_the_engine() -> None:
    # a θ whose only stochastic op is noise1 (σ as drawn), measured on a flat gray image
    cfg = RealESRGANConfig(gaussian_noise_prob=1.0, gray_noise_prob=0.0)
    theta = D.sample_theta("realesrgan", 2, gen(9), cfg)
    noise = op(theta, "noise1")
    noise_only = dict(
        theta,
        ops=[noise, {"name": "down", "op": "resize", "relative_to": "lr", "factor": 1.0, "mode": "nearest"}],
    )
    flat = torch.full((1, 3, 256, 256), 0.5)
    out = D.apply(flat, [noise_only])
    expected = noise["sigma"] / 255
    measured = float((out - 0.5).std())
    assert abs(measured - math.sqrt(expected**2 + 1 / 12 / 255**2)) < 0.06 * expected + 1e-3


def test_poisson_variance_scales_with_intensity() -> None:
    img = torch.full((1, 3, 96, 96), 0.2)
    img[..., 48:] = 0.8
    q = torch.round(img * 255) / 255  # the levels actually used: 2 distinct -> vals = 2
    scale = 0.1
    out = D.add_poisson_noise(img, scale, False, gen(0))
    noise = out - img
    var_dark, var_bright = float(noise[..., :48].var()), float(noise[..., 48:].var())
    exp_dark = scale**2 * float(q[0, 0, 0, 0]) / 2
    exp_bright = scale**2 * float(q[0, 0, 0, -1]) / 2
    assert abs(var_dark / exp_dark - 1) < 0.1 and abs(var_bright / exp_bright - 1) < 0.1
    assert 3.4 < var_bright / var_dark < 4.6
    gray = D.add_poisson_noise(img, scale, True, gen(0))
    assert torch.equal(gray[:, 0], gray[:, 2]) and not torch.equal(gray, img)


def test_correlated_noise_covariance() -> None:
    theta = D.sample_theta("bsrgan", 4, gen(2), BSRGANConfig(noise_color_prob=0.0, noise_gray_prob=0.0))
    cov = np.array(op(theta, "noise")["cov"])
    assert cov.shape == (3, 3) and np.allclose(cov, cov.T) and np.all(cov >= 0)
    flat = torch.full((1, 3, 160, 160), 0.5)
    out = D.add_correlated_noise(flat, cov.tolist(), gen(0))
    emp = np.cov((out - 0.5).reshape(3, -1).numpy())
    w, v = np.linalg.eigh(cov)
    psd = (v * np.clip(w, 0, None)) @ v.T
    assert np.abs(emp - psd).max() < 0.08 * np.abs(psd).max()


def test_camera_noise_is_heteroscedastic_in_linear_light() -> None:
    img = torch.full((1, 3, 128, 128), 0.3)
    img[..., 64:, :] = 0.8
    shot, read, gamma = 4e-3, 1e-4, 2.2
    out = D.add_camera_noise(img, shot, read, gamma, gen(0))
    lin_in, lin_out = img**gamma, out.double() ** gamma
    for sl in (slice(0, 64), slice(64, 128)):
        x = float(lin_in[..., sl, :].mean())
        var = float((lin_out[..., sl, :] - x).var())
        assert abs(var / (shot * x + read) - 1) < 0.1
    assert torch.allclose(D.add_camera_noise(img, 0.0, 0.0, gamma, gen(0)), img, atol=1e-5)


def test_camera_op_is_selectable_and_changes_pixels() -> None:
    theta = D.sample_theta("bsrgan", 4, gen(4), BSRGANConfig(camera_prob=1.0))
    cam = op(theta, "camera")
    assert (
        cam["applied"] and cam["op"] == "camera_noise" and 1e-4 <= cam["shot"] <= 1.2e-2 and cam["read"] > 0
    )
    off = copy.deepcopy(theta)
    op(off, "camera")["applied"] = False
    hr = photo(1, 64, 64)
    assert not torch.equal(D.apply(hr, [theta]), D.apply(hr, [off]))
    assert not op(D.sample_theta("bsrgan", 4, gen(4), BSRGANConfig(camera_prob=0.0)), "camera")["applied"]


# ---------------------------------------------------------------------------------------------
# order, JPEG, resize


def test_realesrgan_final_order_forced() -> None:
    first = D.sample_theta(
        "realesrgan", 4, gen(8), RealESRGANConfig(final_resize_first_prob=1.0, final_sinc_prob=1.0)
    )
    last = D.sample_theta(
        "realesrgan", 4, gen(8), RealESRGANConfig(final_resize_first_prob=0.0, final_sinc_prob=1.0)
    )
    common = ["blur1", "resize1", "noise1", "jpeg1", "blur2", "resize2", "noise2"]
    assert names(first) == common + ["final_resize", "final_sinc", "jpeg2"]
    assert names(last) == common + ["jpeg2", "final_resize", "final_sinc"]
    assert sorted(first["ops"], key=lambda o: o["name"]) == sorted(last["ops"], key=lambda o: o["name"])
    hr = photo(1, 96, 96)
    assert not torch.equal(D.apply(hr, [first]), D.apply(hr, [last]))


def test_realesrgan_resize_forced() -> None:
    down = RealESRGANConfig(
        resize_probs=(0.0, 1.0, 0.0), resize_probs2=(1.0, 0.0, 0.0), resize_modes=("area",)
    )
    for seed in range(5):
        theta = D.sample_theta("realesrgan", 4, gen(seed), down)
        r1, r2 = op(theta, "resize1"), op(theta, "resize2")
        assert r1["direction"] == "down" and 0.15 <= r1["factor"] <= 1 and r1["relative_to"] == "current"
        assert r2["direction"] == "up" and 1 <= r2["factor"] <= 1.2 and r2["relative_to"] == "lr"
        assert r1["mode"] == r2["mode"] == op(theta, "final_resize")["mode"] == "area"
    keep = D.sample_theta("realesrgan", 4, gen(0), RealESRGANConfig(resize_probs=(0.0, 0.0, 1.0)))
    assert op(keep, "resize1")["factor"] == 1.0


def test_jpeg_quality_ordering_and_codec() -> None:
    img = photo(1, 64, 64, seed=3)
    errors = [float((D.jpeg(img, q) - img).abs().mean()) for q in (10, 30, 60, 95)]
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0
    out = D.jpeg(torch.cat([img, img]), [30, 95])
    assert torch.equal(out[0:1], D.jpeg(img, 30)) and torch.equal(out[1:2], D.jpeg(img, 95))
    cfg = RealESRGANConfig(jpeg_range=(42, 42), jpeg_range2=(77, 77))
    theta = D.sample_theta("realesrgan", 4, gen(0), cfg)
    assert op(theta, "jpeg1")["quality"] == 42 and op(theta, "jpeg2")["quality"] == 77


def test_bicubic_kind_is_antialiased_bicubic() -> None:
    hr = photo(2, 67, 70)
    lr, thetas = D.degrade(hr, "bicubic", 4, [gen(0), gen(1)])
    ref = torch.nn.functional.interpolate(hr[..., :64, :68], size=(16, 17), mode="bicubic", antialias=True)
    assert torch.equal(lr, (ref * 255).round().clamp(0, 255) / 255)


# ---------------------------------------------------------------------------------------------
# BSRGAN structure


def test_bsrgan_order_and_pre_downsample() -> None:
    pre4 = 0
    n = 300
    for seed in range(n):
        t4 = D.sample_theta("bsrgan", 4, gen(seed))
        t2 = D.sample_theta("bsrgan", 2, gen(seed))
        for t in (t4, t2):
            order = names(t)
            assert order[0] == "pre_down" and order[-1] == "final_jpeg"
            assert sorted(order[1:-1]) == sorted(D.BSRGAN_SHUFFLED)
            assert order.index("down_mid") < order.index("down_final")
            assert op(t, "final_jpeg")["applied"] and 30 <= op(t, "final_jpeg")["quality"] <= 95
        assert not op(t2, "pre_down")["applied"]
        pre4 += op(t4, "pre_down")["applied"]
    assert 0.17 < pre4 / n < 0.33
    forced = D.sample_theta("bsrgan", 2, gen(0), BSRGANConfig(pre_down_prob=1.0))
    assert not op(forced, "pre_down")["applied"]  # ×4 only
    forced4 = D.sample_theta("bsrgan", 4, gen(0), BSRGANConfig(pre_down_prob=1.0, down_mid_resize_prob=0.0))
    assert op(forced4, "pre_down")["factor"] == 0.5
    assert op(forced4, "down_mid")["op"] == "blur_subsample" and op(forced4, "down_mid")["stride"] == 2


def test_bsrgan_resizes_clip_to_the_unit_range_like_its_public_code() -> None:
    """BSRGAN clips to [0, 1] after its pre-downsample and after each downsample (bicubic overshoots
    on hard edges would otherwise feed the next blur and noise); Real-ESRGAN's code does not clip
    there. A θ without the key (recorded before it existed) replays unclipped."""
    hr = (torch.rand(1, 3, 64, 64, generator=gen(0)) > 0.5).float()  # hard edges: bicubic overshoots
    theta = D.sample_theta("bsrgan", 4, gen(0), BSRGANConfig(pre_down_prob=1.0, down_mid_resize_prob=1.0))
    resizes = [o for o in theta["ops"] if o["op"] == "resize"]
    assert [o["name"] for o in resizes] == ["pre_down", "down_mid", "down_final"]
    assert all(o["clip"] is True for o in resizes)
    assert not any(o.get("clip") for o in D.sample_theta("realesrgan", 4, gen(0))["ops"])

    # the public code's order written out (resize, then clip, at every resize) on θ's resizes and
    # blurs (noise and JPEG left out: they draw from D's seeded streams)
    plain = {**theta, "ops": [o for o in theta["ops"] if o["op"] in ("resize", "blur", "blur_subsample")]}
    ref = hr
    for o in plain["ops"]:
        if not o["applied"]:
            continue
        if o["op"] == "resize":
            size = (
                (16, 16) if o["relative_to"] == "lr" else tuple(int(n * o["factor"]) for n in ref.shape[-2:])
            )
            ref = D.resize(ref, size, o["mode"]).clamp(0, 1)
        else:
            ref = D.filter2d(ref, D.build_kernel(o["kernel"]))
    got = D.apply(hr, [plain])
    assert torch.equal(got, D.quantize_8bit(ref))
    unclipped = {**plain, "ops": [{k: v for k, v in o.items() if k != "clip"} for o in plain["ops"]]}
    assert (D.apply(hr, [unclipped]) - got).abs().max() > 2 / 255  # the clips change the pixels


def test_bsrgan_orders_vary_per_seed() -> None:
    orders = {tuple(names(D.sample_theta("bsrgan", 4, gen(s)))) for s in range(20)}
    assert len(orders) > 10


# ---------------------------------------------------------------------------------------------
# configs and validation


def test_configs_round_trip_and_validate() -> None:
    for cfg in (RealESRGANConfig(sinc_prob=0.25), BSRGANConfig(jpeg_prob=0.5)):
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
    cfg = RealESRGANConfig()
    assert cfg.kernel_probs == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and cfg.jpeg_range == (30, 95)
    with pytest.raises(ValueError, match="kernel_probs"):
        RealESRGANConfig(kernel_probs=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(ValueError, match="jpeg_prob"):
        BSRGANConfig(jpeg_prob=1.5)
    with pytest.raises(ValueError, match="kind"):
        D.sample_theta("nope", 4, gen(0))
    with pytest.raises(ValueError, match="scale"):
        D.sample_theta("bicubic", 3, gen(0))
    with pytest.raises(ValueError, match="config"):
        D.sample_theta("bsrgan", 4, gen(0), RealESRGANConfig())
    with pytest.raises(ValueError, match="one θ per image"):
        D.apply(photo(2), [D.sample_theta("bicubic", 4, gen(0))])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    hr = photo(2, 64, 64)
    lr_cpu, thetas = D.degrade(hr, "realesrgan", 4, [gen(0), gen(1)])
    lr_gpu = D.apply(hr.cuda(), thetas)
    assert lr_gpu.is_cuda and lr_gpu.shape == lr_cpu.shape
    assert float((lr_gpu.cpu() - lr_cpu).abs().mean()) < 2 / 255


def test_codec_kind_is_blur_resize_noise_jpeg_as_drawn():
    """kind ``codec``: the drawn ops, in order, rebuild the LR exactly when applied by hand."""
    g = torch.Generator().manual_seed(11)
    hr = torch.rand(1, 3, 64, 64, generator=g)
    cfg = D.CodecConfig(blur_prob=1.0, noise_prob=0.0, jpeg_prob=1.0, second_jpeg_prob=1.0)
    theta = D.sample_theta("codec", 4, torch.Generator().manual_seed(3), cfg)
    names = [op["name"] for op in theta["ops"]]
    assert names == ["blur", "resize", "noise", "jpeg", "jpeg2"]
    applied = {op["name"]: op for op in theta["ops"] if op["applied"]}
    assert set(applied) == {"blur", "resize", "jpeg", "jpeg2"}
    sigma = applied["blur"]["kernel"]["sigma_x"]
    assert 0.3 <= sigma <= 3.0 and applied["resize"]["mode"] in ("bicubic_aa", "bilinear", "area")
    x = D.filter2d(hr, D.isotropic_gaussian_kernel(applied["blur"]["kernel"]["size"], sigma))
    x = D.resize(x, (16, 16), applied["resize"]["mode"])
    x = D.jpeg(D.jpeg(x, applied["jpeg"]["quality"]), applied["jpeg2"]["quality"])
    assert torch.allclose(D.apply(hr, [theta]), D.quantize_8bit(x), atol=1e-6)
    # nothing drawn: resize alone, the bicubic-like LR
    bare = D.CodecConfig(blur_prob=0.0, noise_prob=0.0, jpeg_prob=0.0, second_jpeg_prob=0.0)
    t0 = D.sample_theta("codec", 4, torch.Generator().manual_seed(3), bare)
    assert [op["name"] for op in t0["ops"] if op["applied"]] == ["resize"]
    with pytest.raises(ValueError, match="CodecConfig.jpeg_range"):
        D.CodecConfig(jpeg_range=(0, 50))
    with pytest.raises(ValueError, match="config for kind 'codec'"):
        D.sample_theta("codec", 4, g, D.BSRGANConfig())


def _level(op: dict) -> float | None:
    """The one level ``near_theta`` may move in ``op`` (None for ops without one)."""
    if not op.get("applied", True):
        return None
    return {
        "jpeg": lambda: float(op["quality"]),
        "gaussian_noise": lambda: float(op["sigma"]),
        "poisson_noise": lambda: float(op["scale"]),
        "correlated_noise": lambda: float(op["cov"][0][0]),
        "blur": lambda: float(op["kernel"]["sigma_x"]),
        "blur_subsample": lambda: float(op["kernel"]["sigma_x"]),
    }.get(op["op"], lambda: None)()


@pytest.mark.parametrize("kind", ["codec", "realesrgan", "bsrgan"])
def test_near_theta_moves_exactly_one_level_one_step(kind: str) -> None:
    """A hard negative: one applied op's level moved by a bounded step, every other field kept."""
    directions, moved_ops, visible, drawn = set(), set(), 0, 0
    for seed in range(40):
        theta = D.sample_theta(kind, 4, gen(seed))
        before = json.dumps(theta, sort_keys=True)
        near = D.near_theta(theta, gen(1000 + seed))
        assert json.dumps(theta, sort_keys=True) == before, "near_theta modified its input"
        if near is None:  # e.g. a codec draw with no blur, noise or JPEG: only the resize
            assert all(_level(o) is None for o in theta["ops"]), theta
            continue
        assert {k: v for k, v in near.items() if k != "ops"} == {k: v for k, v in theta.items() if k != "ops"}
        changed = [i for i, (a, b) in enumerate(zip(theta["ops"], near["ops"], strict=True)) if a != b]
        assert len(changed) == 1, (seed, changed)
        a, b = theta["ops"][changed[0]], near["ops"][changed[0]]
        la, lb = _level(a), _level(b)
        assert la is not None and lb is not None and la != lb
        if a["op"] == "jpeg":
            assert 8 <= abs(lb - la) <= 20 and 10 <= lb <= 95
        elif a["op"] == "correlated_noise":
            ratio = math.sqrt(lb / la)
            assert 1.3 - 1e-9 <= max(ratio, 1 / ratio) <= 2.0 + 1e-9
        else:
            ratio = lb / la
            assert 1.3 - 1e-9 <= max(ratio, 1 / ratio) <= 2.0 + 1e-9, (a, b)
        directions.add(lb > la)
        moved_ops.add(a["op"])
        # the moved level shows in the pixels of the same HR (unless a later blur + JPEG hides it)
        hr = photo(1, 64, 64, seed)
        visible += not torch.equal(D.apply(hr, [theta]), D.apply(hr, [near]))
        drawn += 1
    assert visible >= 0.9 * drawn, (visible, drawn)
    assert directions == {True, False}
    assert "jpeg" in moved_ops and len(moved_ops) >= 2


def test_near_theta_codec_blur_widens_its_kernel_and_bicubic_has_no_level() -> None:
    cfg = D.CodecConfig(blur_prob=1.0, noise_prob=0.0, jpeg_prob=0.0, second_jpeg_prob=0.0)
    theta = D.sample_theta("codec", 4, gen(5), cfg)
    sigma = op(theta, "blur")["kernel"]["sigma_x"]
    wider = [
        t
        for s in range(30)
        if (t := D.near_theta(theta, gen(s))) and op(t, "blur")["kernel"]["sigma_x"] > sigma
    ]
    assert wider
    for t in wider:  # sized to 3σ like the codec kind's own draws, never narrower than before
        k = op(t, "blur")["kernel"]
        assert k["size"] >= max(op(theta, "blur")["kernel"]["size"], 2 * math.ceil(3 * k["sigma_x"]) + 1)
    assert D.near_theta(D.sample_theta("bicubic", 4, gen(0)), gen(0)) is None


def test_apply_refuses_8bit_and_0_255_images_and_a_lone_theta():
    """degrade()/apply() on an 8-bit tensor used to return an LR 95 % white without a word."""
    g = torch.Generator().manual_seed(0)
    theta = D.sample_theta("bicubic", 4, g)
    hr = torch.rand(1, 3, 32, 32)
    assert D.apply(hr, [theta]).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"hr must be a float tensor in \[0, 1\], got torch.uint8"):
        D.apply((hr * 255).round().to(torch.uint8), [theta])
    with pytest.raises(ValueError, match=r"divide by 255"):
        D.apply(hr * 255, [theta])
    with pytest.raises(ValueError, match=r"hr must be a float tensor"):
        D.degrade((hr * 255).to(torch.uint8), "bicubic", 4, [torch.Generator().manual_seed(1)])
    with pytest.raises(ValueError, match=r"got one θ \(pass \[theta\]\)"):
        D.apply(hr, theta)
