"""Camera stand-in and demo inputs: determinism, sizes, PSF, noise ordering, idempotent folders."""

import numpy as np
import torch

from realdgen_core.camera import apply_camera, camera_standin, lens_psf, sample_camera_params


def _img(photos, name="astronaut", size=96):
    a = photos[name][:size, :size]
    return torch.from_numpy(a).permute(2, 0, 1).float().div(255)


def test_psf_sums_to_one_and_matches_gaussian_without_defocus():
    psf = lens_psf(0.0, 1.3, size=15).double()
    assert abs(psf.sum().item() - 1.0) < 1e-6
    ax = np.arange(15) - 7
    g = np.exp(-(ax[None] ** 2 + ax[:, None] ** 2) / (2 * 1.3**2))
    # radius 0 keeps only the central pixel of the disk, so the PSF is the Gaussian itself.
    np.testing.assert_allclose(psf.numpy(), g / g.sum(), atol=1e-6)
    # A larger defocus spreads energy away from the centre.
    assert lens_psf(2.0, 0.5)[7, 7] < lens_psf(0.5, 0.5)[7, 7]


def test_same_seed_same_bytes_and_sizes(photos):
    hr = torch.stack([_img(photos), _img(photos, "coffee")])
    a, pa = camera_standin(hr, 4, [torch.Generator().manual_seed(s) for s in (1, 2)])
    b, pb = camera_standin(hr, 4, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert a.shape == (2, 3, 24, 24)
    assert torch.equal(a, b) and pa == pb
    assert torch.equal(a * 255, (a * 255).round())  # 8-bit values
    c, _ = camera_standin(hr[:1], 4, [torch.Generator().manual_seed(3)])
    assert not torch.equal(a[:1], c)
    # A non-multiple size is cropped bottom/right, never resampled.
    odd, _ = camera_standin(hr[:, :, :67, :70], 2, [torch.Generator().manual_seed(1)] * 2)
    assert odd.shape[-2:] == (33, 35)


def test_lower_full_well_means_more_noise():
    flat = torch.full((3, 64, 64), 0.5)
    params = sample_camera_params(torch.Generator().manual_seed(0))
    params.update(
        defocus_radius=0.0,
        lens_sigma=0.5,
        sharpen=0.0,
        jpeg_quality=95,
        read_noise=0.0,
        wb_gains=[1.0, 1.0, 1.0],
    )
    noisy = apply_camera(flat, {**params, "full_well": 50.0}, 2)
    clean = apply_camera(flat, {**params, "full_well": 20000.0}, 2)
    assert noisy.std().item() > 3 * clean.std().item()


def test_prepare_demo_inputs_is_idempotent(tmp_path):
    from pipelines.demo_data import SPLITS, prepare_demo_inputs

    dirs = prepare_demo_inputs(tmp_path, scale=4, refs_per_photo=1)
    assert len(list(dirs["hr"].glob("*.png"))) == len(SPLITS["hr_train"])
    assert len(list(dirs["refs"].glob("*.png"))) == len(SPLITS["ref_photos"])
    assert not set(SPLITS["heldout"]) & (set(SPLITS["hr_train"]) | set(SPLITS["ref_photos"]))
    mtimes = {p: p.stat().st_mtime_ns for p in dirs["refs"].glob("*.png")}
    prepare_demo_inputs(tmp_path, scale=4, refs_per_photo=1)
    assert mtimes == {p: p.stat().st_mtime_ns for p in dirs["refs"].glob("*.png")}
