"""LRGenerator: shapes, batch independence, seeding, best-of-k filter, reference-embedding path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from realdgen_core import degrade
from realdgen_core.config import preset
from realdgen_core.generator import GenerationResult, LRGenerator
from realdgen_core.models import build_model

TAU = (0, 12)  # short chains keep the module fast; τ still varies per candidate


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny networks are dominated by per-op overhead; on a shared 2-core box two OpenMP threads
    # contend and run ~10x slower than one. Restored afterwards.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def model4():
    return build_model(preset("tiny", 4), seed=0)


@pytest.fixture(scope="module")
def gen4(model4):
    return LRGenerator(model4)


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    # Smooth random content (upsampled noise) rather than white noise: closer to photos.
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def batch8():
    return _images(8, 32, 1), _images(8, 16, 2)


@pytest.mark.parametrize("scale", [2, 4])
def test_output_shapes_and_ranges(scale, model4):
    model = model4 if scale == 4 else build_model(preset("tiny", 2), seed=0)
    gen = LRGenerator(model, digest="abc")
    hr = _images(2, 40, 3)[..., :38, :37]  # modcropped to a multiple of the scale
    refs = _images(2, 12, 4)
    res = gen.generate(hr, refs, k=3, tau_range=(2, 6), seeds=[1, 2])
    hh, ww = 38 - 38 % scale, 37 - 37 % scale
    assert isinstance(res, GenerationResult) and gen.scale == scale and gen.digest == "abc"
    assert res.lr.shape == (2, 3, hh // scale, ww // scale) and res.lr.dtype == torch.float32
    assert 0 <= res.lr.min() and res.lr.max() <= 1
    assert torch.equal(res.lr, torch.round(res.lr * 255) / 255)  # 8-bit quantised
    assert res.content_errors.shape == res.degradation_errors.shape == res.tau.shape == (2, 3)
    assert res.kept.shape == (2,) and res.kept.dtype == torch.long
    assert int(res.tau.min()) >= 2 and int(res.tau.max()) <= 6
    assert len(res.thetas) == 2 and all(len(t) == 3 and t[0]["kind"] == "realesrgan" for t in res.thetas)
    assert res.candidates is None
    assert {"degrade", "content", "degradation", "modulation", "unet", "filter"} <= set(res.timings)


@pytest.mark.parametrize("rows_per_call", [None, 8])
def test_sample_alone_equals_sample_in_batch_of_8(gen4, model4, batch8, rows_per_call):
    gen = gen4 if rows_per_call is None else LRGenerator(model4, rows_per_call=rows_per_call)
    hr, refs = batch8
    seeds = [101, 7, 33, 5, 90, 12, 64, 3]
    full = gen.generate(hr, refs, k=4, tau_range=TAU, seeds=seeds)
    assert len(set(full.tau.flatten().tolist())) > 3  # τ really differs between rows
    for i in (0, 5):
        alone = gen.generate(hr[i : i + 1], refs[i : i + 1], k=4, tau_range=TAU, seeds=[seeds[i]])
        assert torch.equal(_u8(alone.lr[0]), _u8(full.lr[i]))
        assert torch.equal(alone.tau[0], full.tau[i]) and alone.thetas[0] == full.thetas[i]
        assert torch.equal(alone.content_errors[0], full.content_errors[i])
        assert torch.equal(alone.degradation_errors[0], full.degradation_errors[i])
    # A sample in the middle of a differently composed batch too.
    mixed = gen.generate(hr[[5, 2, 0]], refs[[5, 2, 0]], k=4, tau_range=TAU, seeds=[seeds[5], 999, seeds[0]])
    assert torch.equal(_u8(mixed.lr[0]), _u8(full.lr[5])) and torch.equal(_u8(mixed.lr[2]), _u8(full.lr[0]))


def test_seeds_determine_output(gen4, batch8):
    hr, refs = batch8[0][:2], batch8[1][:2]
    a = gen4.generate(hr, refs, k=2, tau_range=TAU, seeds=[4, 5])
    b = gen4.generate(hr, refs, k=2, tau_range=TAU, seeds=[4, 5])
    c = gen4.generate(hr, refs, k=2, tau_range=TAU, seeds=[6, 7])
    assert torch.equal(a.lr, b.lr) and a.thetas == b.thetas and torch.equal(a.tau, b.tau)
    for i in range(2):
        assert not torch.equal(a.lr[i], c.lr[i])
        assert a.thetas[i] != c.thetas[i]


def _independent_errors(model, hr, refs, cands, scale):
    """Errors recomputed one image at a time, straight from the networks."""
    b, k = cands.shape[:2]
    ce, de = torch.empty(b, k), torch.empty(b, k)
    with torch.inference_mode():
        for i in range(b):
            f_hr = model.content.encode(hr[i : i + 1])
            d_ref = model.degradation(refs[i : i + 1])
            for j in range(k):
                c = cands[i, j : j + 1]
                up = F.interpolate(c, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
                ce[i, j] = ((model.content.encode(up) - f_hr) ** 2).mean()
                de[i, j] = ((model.degradation(c) - d_ref) ** 2).mean()
    return ce, de


def test_best_of_k_keeps_min_combined_error(gen4, model4, batch8):
    hr, refs = batch8[0][:6], batch8[1][:6]
    seeds = list(range(20, 26))
    res = gen4.generate(hr, refs, k=4, tau_range=TAU, seeds=seeds, return_candidates=True)
    assert res.candidates.shape == (6, 4, 3, 8, 8)
    ce, de = _independent_errors(model4, hr, refs, res.candidates, 4)
    torch.testing.assert_close(res.content_errors, ce, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(res.degradation_errors, de, rtol=1e-4, atol=1e-9)
    # the default filter divides each error by its mean over the sample's candidates, so both count
    normed = ce / ce.mean(1, keepdim=True) + de / de.mean(1, keepdim=True)
    assert torch.equal(res.kept, torch.argmin(normed, dim=1))
    assert torch.equal(res.lr, res.candidates[torch.arange(6), res.kept])
    raw = gen4.generate(hr, refs, k=4, tau_range=TAU, seeds=seeds, filter_norm=False)
    assert torch.equal(raw.kept, torch.argmin(ce + de, dim=1))
    # raw, the ~1e4x larger content error decides alone; normalised, the degradation error moves picks
    assert torch.equal(raw.kept, torch.argmin(ce, dim=1))
    assert not torch.equal(res.kept, raw.kept)

    # Weights decide: content only, degradation only (same draws ⇒ same candidates).
    kept = {}
    for w in [(1.0, 0.0), (0.0, 1.0)]:
        r = gen4.generate(hr, refs, k=4, tau_range=TAU, seeds=seeds, weights=w, return_candidates=True)
        assert torch.equal(r.candidates, res.candidates)
        assert torch.equal(r.kept, torch.argmin(ce if w[0] else de, dim=1))
        kept[w] = r.kept
    assert not torch.equal(kept[(1.0, 0.0)], kept[(0.0, 1.0)])  # the weights matter for these seeds


def test_k1_and_tau_zero_is_the_degraded_hr_itself(gen4, batch8, monkeypatch):
    hr, refs = batch8[0][:3], batch8[1][:3]
    calls = []
    unet = gen4._unet
    monkeypatch.setattr(gen4, "_unet", lambda *a, **kw: calls.append(1) or unet(*a, **kw))
    res = gen4.generate(hr, refs, k=1, tau_range=(0, 0), seeds=[1, 2, 3], return_candidates=True)
    assert res.kept.tolist() == [0, 0, 0] and torch.equal(res.lr, res.candidates[:, 0])
    assert res.tau.tolist() == [[0], [0], [0]]
    # τ = 0 is no diffusion: the output is D(HR, θ) with the recorded θ, bit for bit, and no UNet call
    assert torch.equal(res.lr, degrade.apply(hr, [t[0] for t in res.thetas])) and not calls
    other = degrade.apply(hr, [res.thetas[(i + 1) % 3][0] for i in range(3)])
    assert (res.lr - other).abs().mean() > 0.001


def test_mixed_tau_zero_rows_keep_their_start_and_the_others_are_diffused(gen4, batch8):
    hr, refs = batch8[0][:3], batch8[1][:3]
    res = gen4.generate(hr, refs, k=4, tau_range=(0, 3), seeds=[1, 2, 3], return_candidates=True)
    h, w = res.lr.shape[-2:]
    thetas = [t for ts in res.thetas for t in ts]
    starts = degrade.apply(hr.repeat_interleave(4, 0), thetas).view(3, 4, 3, h, w)
    zero = res.tau == 0
    assert zero.any() and (~zero).any()  # these seeds draw both
    assert torch.equal(res.candidates[zero], starts[zero])
    moved = (res.candidates[~zero] - starts[~zero]).abs().flatten(1).amax(1)
    assert bool((moved > 0).all())  # every τ > 0 row went through the reverse process


def test_ref_embeddings_path_equals_refs_path(gen4, batch8):
    hr, refs = batch8[0][:3], batch8[1][:3]
    bank = gen4.degradation_embeddings(batch8[1])
    assert bank.shape == (8, 2048)
    assert torch.equal(gen4.degradation_embeddings(refs[1:2]), bank[1:2])  # bank-size independent
    a = gen4.generate(hr, refs, k=2, tau_range=TAU, seeds=[8, 9, 10])
    b = gen4.generate(hr, k=2, tau_range=TAU, seeds=[8, 9, 10], ref_embeddings=bank[:3])
    assert torch.equal(a.lr, b.lr) and torch.equal(a.degradation_errors, b.degradation_errors)
    # One shared reference for the whole batch (embedding [1, 2048] or a single ref image).
    c = gen4.generate(hr, k=2, tau_range=TAU, seeds=[8, 9, 10], ref_embeddings=bank[0:1])
    d = gen4.generate(hr, refs[0:1], k=2, tau_range=TAU, seeds=[8, 9, 10])
    assert torch.equal(c.lr, d.lr)
    # References of different sizes as a list.
    mixed = gen4.degradation_embeddings([refs[0], _images(1, 20, 9)[0]])
    assert torch.equal(mixed[0], bank[0])


def test_generate_validates_arguments(gen4, batch8):
    hr, refs = batch8[0][:2], batch8[1][:2]
    with pytest.raises(ValueError, match="exactly one of refs or ref_embeddings"):
        gen4.generate(hr, refs, seeds=[1, 2], ref_embeddings=torch.zeros(2, 2048))
    with pytest.raises(ValueError, match="exactly one"):
        gen4.generate(hr, seeds=[1, 2])
    with pytest.raises(ValueError, match="seeds"):
        gen4.generate(hr, refs, seeds=[1])
    with pytest.raises(ValueError, match="tau_range"):
        gen4.generate(hr, refs, seeds=[1, 2], tau_range=(0, 1000))
    with pytest.raises(ValueError, match="k must"):
        gen4.generate(hr, refs, seeds=[1, 2], k=0)
    with pytest.raises(ValueError, match="start_kind"):
        gen4.generate(hr, refs, seeds=[1, 2], start_kind="jpeg")
    with pytest.raises(ValueError, match="reference embeddings"):
        gen4.generate(hr, seeds=[1, 2], ref_embeddings=torch.zeros(3, 2048))


def test_images_off_the_unit_scale_and_loose_numbers_are_refused(gen4, batch8):
    """What a notebook passes first: 8-bit tensors, 0–255 floats, numpy/PIL references, float seeds,
    NaN weights. Each ran before and came out wrong without a word (an 8-bit HR almost white)."""
    import numpy as np

    hr, refs = batch8[0][:2], batch8[1][:2]
    ok = gen4.generate(hr, refs, k=2, tau_range=(0, 2), seeds=[1, 2])
    assert ok.lr.shape == (2, 3, 8, 8)
    cases = [
        (
            {"hr": _u8(hr)},
            r"hr must be a float tensor in \[0, 1\], got torch.uint8: for 8-bit images use x.float\(\) / 255",
        ),
        ({"hr": hr * 255}, r"hr must be in \[0, 1\], got values in \[.*\] \(0–255 values\? divide by 255\)"),
        ({"hr": hr.clone().fill_(float("nan"))}, "hr holds NaN or inf values"),
        ({"refs": _u8(refs)}, r"refs must be a float tensor in \[0, 1\], got torch.uint8"),
        ({"refs": [refs[0] * 255, refs[1]]}, r"refs\[0\] must be in \[0, 1\]"),
        (
            {"refs": _u8(refs[0]).permute(1, 2, 0).numpy()},
            r"refs must be .* got ndarray \(an HxWx3 uint8 array a: ",
        ),
        ({"refs": [np.zeros((16, 16, 3), np.uint8)] * 2}, r"got ndarray at \[0\]"),
        ({"seeds": [0.2, 0.9]}, r"seeds must be ints, got \[0.2, 0.9\]"),
        ({"tau_range": (0.5, 2.7)}, r"tau_range must be two ints"),
        ({"weights": (float("nan"), 1.0)}, "weights must be two non-negative floats"),
        ({"weights": (float("inf"), 1.0)}, "weights must be two non-negative floats"),
        ({"k": True}, "k must be a positive int"),
    ]
    for change, message in cases:
        args = {"hr": hr, "refs": refs, "k": 2, "tau_range": (0, 2), "seeds": [1, 2], **change}
        with pytest.raises(ValueError, match=message):
            gen4.generate(args.pop("hr"), args.pop("refs"), **args)
    starts = ok.lr[:, None].expand(2, 2, 3, 8, 8) * 255
    with pytest.raises(ValueError, match=r"starts must be in \[0, 1\]"):
        gen4.generate(hr, refs, k=2, tau_range=(0, 2), seeds=[1, 2], starts=starts)
    # numpy integers are ints; a 1e-4 overshoot (float round-off) is not refused
    again = gen4.generate(
        (hr * 1.0001).clamp(max=1.0001),
        refs,
        k=np.int64(2),
        tau_range=(np.int64(0), 2),
        seeds=np.array([1, 2]),
    )
    assert again.lr.shape == ok.lr.shape


def test_from_checkpoint_roundtrip(model4, batch8, tmp_path):
    ckpt = pytest.importorskip("realdgen_core.checkpoint")
    path = tmp_path / "tiny.safetensors"
    digest = ckpt.save_checkpoint(path, model4)
    gen = LRGenerator.from_checkpoint(path, device="cpu")
    assert gen.digest == digest and gen.scale == 4
    hr, refs = batch8[0][:1], batch8[1][:1]
    a = gen.generate(hr, refs, k=2, tau_range=TAU, seeds=[3])
    b = LRGenerator(model4).generate(hr, refs, k=2, tau_range=TAU, seeds=[3])
    assert torch.equal(a.lr, b.lr)


def test_tau_past_the_trained_timesteps_is_refused(gen4, batch8):
    """Training draws t below max_train_timestep (500): a start at or past it would run the UNet on
    timesteps it never saw, so generate refuses it by name (999 used to pass: < num_timesteps)."""
    hr, refs = batch8[0][:1], batch8[1][:1]
    n = gen4.model.config.diffusion.max_train_timestep
    assert n == 500
    with pytest.raises(ValueError, match=f"max_train_timestep.*t < {n}"):
        gen4.generate(hr, refs, k=1, tau_range=(0, n), seeds=[0])
    with pytest.raises(ValueError, match="tau_range"):
        gen4.generate(hr, refs, k=1, tau_range=(0, 999), seeds=[0])


def test_generating_as_the_job_does_from_the_api():
    """docs/interfaces.md's "Generating as the job does", on the committed checkpoint: its calibration
    comes with from_checkpoint, domain_start picks one bank entry for the domain, and with the
    calibration's τ range (0..0) every sample's LR is that entry applied to its HR."""
    from pathlib import Path

    from realdgen_core import calibrate, degrade

    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / "realdgen-small-x4.safetensors"
    gen = LRGenerator.from_checkpoint(ckpt)
    cal = gen.calibration
    assert cal is not None and gen.metadata["digest"] == gen.digest and (cal.tau_min, cal.tau_max) == (0, 0)
    hr = _images(2, 64, 5)
    refs = [degrade.apply(_images(1, 96, s), [calibrate.start_bank(4, (1.6,), (60,))[0]])[0] for s in (6, 7)]
    probe = list(_images(3, 64, 8))
    profile = gen.domain_start(probe, refs, cal.bank)
    assert profile["label"] == calibrate.theta_label(cal.bank[profile["chosen"]])
    by_distance = gen.domain_start(probe, refs, cal.bank, aggregate="distance")
    assert by_distance["chosen"] == min(range(len(cal.bank)), key=lambda i: by_distance["errors"][i])
    res = gen.generate(
        hr,
        refs,
        k=4,
        seeds=[1, 2],
        tau_range=(cal.tau_min, cal.tau_max),
        start_kind="domain",
        start_bank=cal.bank,
        start_bank_errors=calibrate.profile_errors(profile, len(cal.bank)).expand(2, -1),
        weights=cal.weights,
        filter_norm=cal.filter_norm,
    )
    want = degrade.apply(hr, [cal.bank[profile["chosen"]]] * 2)
    assert torch.equal(res.lr, want)
    with pytest.raises(ValueError, match="ref_weighting"):
        gen.domain_start(probe, refs, cal.bank, ref_weighting="flat")
