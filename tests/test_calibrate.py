"""Domain calibration: start bank, per-sample start choice, τ selection, and its path into the job."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pipelines.manifest import ManifestError, load_manifest
from realdgen_core import calibrate, degrade
from realdgen_core.checkpoint import load_checkpoint, save_checkpoint
from realdgen_core.config import preset
from realdgen_core.diffusion import SamplerConfig
from realdgen_core.generator import LRGenerator
from realdgen_core.models import build_model


def _hr(photos, name, size=64):
    img = torch.from_numpy(photos[name][:size, :size].copy()).permute(2, 0, 1).float() / 255
    return img[None]


def test_start_theta_is_blur_resize_jpeg_and_replays(photos):
    hr = _hr(photos, "astronaut")
    plain = degrade.apply(hr, [calibrate.start_theta(4, 0.0, 0)])
    # no blur, no JPEG: exactly the antialiased bicubic downscale, 8-bit rounded
    want = degrade.quantize_8bit(degrade.resize(hr, (16, 16), "bicubic_aa"))
    assert torch.equal(plain, want)
    blurred = degrade.apply(hr, [calibrate.start_theta(4, 2.0, 0)])
    lap = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert lap(blurred) < 0.9 * lap(plain)
    jp = degrade.apply(hr, [calibrate.start_theta(4, 0.0, 30)])
    assert not torch.equal(jp, plain) and torch.equal(
        jp, degrade.apply(hr, [calibrate.start_theta(4, 0.0, 30)])
    )
    bank = calibrate.start_bank(4, (0.0, 1.0, 2.0), (0, 50))
    assert len(bank) == 6 and all(t["kind"] == "domain" for t in bank)
    with pytest.raises(ValueError, match="jpeg_quality"):
        calibrate.start_theta(4, 1.0, 101)
    with pytest.raises(ValueError, match="not a 'domain'"):
        calibrate.check_bank([degrade.sample_theta("bicubic", 4, torch.Generator())], 4)


def test_sharpen_axis_is_an_unsharp_mask_of_the_resized_lr(photos):
    hr = _hr(photos, "astronaut")
    plain = degrade.resize(hr, (16, 16), "bicubic_aa")
    sharp = degrade.apply(hr, [calibrate.start_theta(4, 0.0, 0, sharpen=0.8)])
    # independent: the mask's Gaussian built here with the same σ and size, then x + a(x - Gx), clamped
    size = 2 * 3 + 1
    g = torch.tensor([[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]])
    k = torch.exp(-(g**2 + g.T**2) / (2 * calibrate.SHARPEN_SIGMA**2))
    k = (k / k.sum()).reshape(1, 1, size, size).repeat(3, 1, 1, 1)
    padded = torch.nn.functional.pad(plain, (3,) * 4, mode="reflect")
    blurred = torch.nn.functional.conv2d(padded, k, groups=3)
    want = degrade.quantize_8bit((plain + 0.8 * (plain - blurred)).clamp(0, 1))
    assert torch.allclose(sharp, want, atol=1.5 / 255)
    lap = lambda x: (x[..., 1:, :] - x[..., :-1, :]).abs().mean()  # noqa: E731
    assert lap(sharp) > 1.2 * lap(degrade.quantize_8bit(plain))
    bank = calibrate.start_bank(4, (0.0, 1.0), (0, 50), (0.0, 0.5, 1.0))
    assert len(bank) == 12 and len({str(t["ops"]) for t in bank}) == 12
    assert calibrate.theta_label(bank[5]) == "bicubic_aa + sharpen 1 + JPEG q50"
    assert [op["op"] for op in bank[5]["ops"]] == ["resize", "unsharp", "jpeg"]  # sharpen before the JPEG
    assert calibrate.start_bank(4, (0.0,), (0,)) == calibrate.start_bank(4, (0.0,), (0,), (0.0,))
    with pytest.raises(ValueError, match="sharpen"):
        calibrate.start_theta(4, 1.0, 50, sharpen=-1)
    with pytest.raises(ValueError, match="unsharp sigma"):
        degrade.unsharp_mask(hr, 0.0, 1.0)


def test_domain_start_picks_the_bank_entry_of_the_reference(photos):
    """A reference made by bank entry b* on the same content has E_deg error exactly 0 to b*'s start,
    so every sample's first candidate starts from b* (a broken selection picks by index or at random)."""
    gen = LRGenerator(build_model(preset("tiny", 4), seed=3))
    bank = calibrate.start_bank(4, (0.0, 1.2, 2.4), (0, 40))
    hr = torch.cat([_hr(photos, "astronaut"), _hr(photos, "coffee")])
    for want in (4, 1):
        ref = degrade.apply(hr, [bank[want], bank[want]])
        res = gen.generate(hr, ref, k=2, tau_range=(0, 0), seeds=[1, 2], start_kind="domain", start_bank=bank)
        for i in range(2):
            assert res.thetas[i][0]["ops"] == bank[want]["ops"]
            assert res.thetas[i][1]["ops"] != bank[want]["ops"]
    with pytest.raises(ValueError, match="needs start_bank"):
        gen.generate(hr, ref, k=2, seeds=[1, 2], start_kind="domain")


def test_filter_norm_makes_weights_scale_free():
    gen = LRGenerator(build_model(preset("tiny", 4), seed=5))
    hr = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(k=4, tau_range=(0, 20), seeds=[9], start_kind="bicubic")
    only_deg = gen.generate(hr, ref, weights=(0.0, 1.0), filter_norm=True, **kw)
    assert int(only_deg.kept[0]) == int(only_deg.degradation_errors[0].argmin())
    only_c = gen.generate(hr, ref, weights=(1.0, 0.0), filter_norm=True, **kw)
    assert int(only_c.kept[0]) == int(only_c.content_errors[0].argmin())
    both = gen.generate(hr, ref, weights=(1.0, 1.0), filter_norm=True, **kw)
    ce, de = both.content_errors[0], both.degradation_errors[0]
    want = int((ce / ce.mean() + de / de.mean()).argmin())
    assert int(both.kept[0]) == want


def test_split_validation_is_by_name():
    names = [f"img_{i:03d}.png" for i in range(200)]
    train, val = calibrate.split_validation(names, 0.25)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert 25 <= len(val) <= 75
    # adding files never moves an old one across, and order does not matter
    t2, v2 = calibrate.split_validation(list(reversed(names)) + ["new.png"], 0.25)
    rev = list(reversed(names))
    assert {rev[i] for i in v2 if i < 200} == {names[i] for i in val}
    assert calibrate.split_validation(["a.png", "b.png"], 0.01)[1]  # both sides non-empty
    # a file name that is not UTF-8 (listed with surrogate escapes) is split like any other
    odd = [b"caf\xe9.png".decode("utf-8", "surrogateescape"), "b.png", "c.png"]
    t3, v3 = calibrate.split_validation(odd, 0.5)
    assert sorted(t3 + v3) == [0, 1, 2] and t3 and v3


def _two_pairs(photos):
    """A tiny generator, a 2-entry bank and two (HR, reference) pairs whose references show other
    scenes, made by different entries."""
    gen = LRGenerator(build_model(preset("tiny", 4), seed=2), sampler=SamplerConfig(kind="ddim", steps=2))
    bank = calibrate.start_bank(4, (0.0, 1.6), (0,))
    hr = torch.cat([_hr(photos, "astronaut", 32), _hr(photos, "coffee", 32)])
    refs = [
        degrade.apply(_hr(photos, "chelsea", 32), [bank[1]])[0],
        degrade.apply(_hr(photos, "rocket", 32), [bank[0]])[0],
    ]
    return gen, bank, hr, refs


def test_calibrate_tau_prefers_small_tau_within_noise(photos):
    gen, bank, hr, refs = _two_pairs(photos)
    tau, scores = calibrate.calibrate_tau(gen, hr, refs, bank, tau_grid=(0, 3, 30), k=2)
    per = scores["per_tau_max"]
    assert set(per) == {"0", "3", "30"} and scores["pairs"] == 2
    best = min(per, key=lambda t: per[t]["degradation_error"])
    limit = per[best]["degradation_error"] + per[best]["degradation_error_se"]
    assert tau == min(int(t) for t in per if per[t]["degradation_error"] <= limit)
    assert (tau, int(best)) == calibrate.choose_tau_max(per)


def test_choose_tau_max_is_the_one_se_rule():
    """Worked by hand: the best mean, then the smallest τ whose mean is within its one SE."""

    def s(err, se=0.0):
        return {"degradation_error": err, "degradation_error_se": se}

    # τ 0 is beyond best + SE (1.0 > 0.6 + 0.1): diffusion earns its steps, τ 30 is kept over 300
    assert calibrate.choose_tau_max({"0": s(1.0), "30": s(0.65), "300": s(0.6, 0.1)}) == (30, 300)
    # τ 0 within it (0.69 <= 0.7): the smallest wins though it is not the best
    assert calibrate.choose_tau_max({"300": s(0.6, 0.1), "0": s(0.69), "30": s(0.65)}) == (0, 300)
    # no noise estimate: only the best itself qualifies
    assert calibrate.choose_tau_max({"0": s(0.61), "4": s(0.6)}) == (4, 4)


def test_calibrate_tau_scores_the_start_rule_it_is_given(photos):
    """Default: each pair starts from its own reference's best entry; ``start_errors`` (a domain
    profile's, repeated per pair) makes every pair start from the given entry, as the job does."""
    gen, bank, hr, refs = _two_pairs(photos)
    emb = gen.degradation_embeddings(refs)
    net = gen.model.degradation
    err = torch.stack([calibrate.bank_errors(net, hr[i : i + 1], emb[i], bank, gen.device) for i in range(2)])
    assert not torch.equal(err.argmin(1), torch.zeros(2, dtype=torch.long))  # the rules differ here
    own = calibrate.calibrate_tau(gen, hr, refs, bank, tau_grid=(0,), k=2)[1]["per_tau_max"]["0"]
    forced = torch.tensor([[0.0, float("inf")]] * 2)
    one = calibrate.calibrate_tau(gen, hr, refs, bank, tau_grid=(0,), k=2, start_errors=forced)[1]
    # τ = 0: the output is the start itself, so its E_deg error is the start's own
    assert own["degradation_error"] == pytest.approx(float(err.min(1).values.mean()), rel=1e-4)
    assert one["per_tau_max"]["0"]["degradation_error"] == pytest.approx(float(err[:, 0].mean()), rel=1e-4)
    with pytest.raises(ValueError, match=r"start_errors must be \[2, 2\]"):
        calibrate.calibrate_tau(gen, hr, refs, bank, tau_grid=(0,), start_errors=torch.zeros(2, 3))


def test_adaptation_records_a_calibration_the_job_uses(tmp_path, photos, capsys):
    from pipelines import train as T
    from pipelines.generate_dataset import _checkpoint_calibration
    from pipelines.manifest import GeneratorSpec

    base = tmp_path / "base.safetensors"
    save_checkpoint(base, build_model(preset("tiny", 4), seed=7))
    lr_dir = tmp_path / "codec"
    lr_dir.mkdir()
    for name, img in sorted(photos.items()):
        for j in range(2):
            Image.fromarray(img[j * 64 :: 4, ::4][:40, :40]).save(lr_dir / f"{name}_{j}.jpg", quality=35)
    path = tmp_path / "adapt.yaml"
    path.write_text(
        f"""
kind: train
init_checkpoint: {base}
stages: [C]
data:
  lr: [{{kind: images, source: {{uri: {lr_dir}}}}}]
stage_c: {{steps: 2, batch_size: 2, lr_crop: 16}}
output: {{run_dir: {tmp_path / "run"}, checkpoint: {tmp_path / "adapted.safetensors"}}}
compute: {{torch_threads: 1}}
progress: {{bar: false}}
calibration: {{enabled: true, domain: codec, pairs: 2, hr_crop: 32, tau_grid: [0, 4], blur_sigmas: [0.0, 2.0],
               jpeg_qualities: [0, 35], sharpen_amounts: [0.0, 0.7], k: 2, sampler_steps: 2}}
"""
    )
    # a bad bank axis is a manifest error, before any training
    for bad, word in (("sharpen_amounts=[-1]", "sharpen"), ("jpeg_qualities=[101]", "jpeg_quality")):
        with pytest.raises(ManifestError, match=word):
            load_manifest(path, [f"calibration.{bad}"], kind="train")
    assert T.main([str(path)]) == 0
    model, meta = load_checkpoint(tmp_path / "adapted.safetensors")
    cal = calibrate.from_metadata(meta)
    assert cal is not None and cal.domain == "codec" and len(cal.bank) == 8
    assert sum(any(op["op"] == "unsharp" for op in t["ops"]) for t in cal.bank) == 4
    assert set(cal.scores["per_tau_max"]) == {"0", "4"} and cal.scores["validation_images"] >= 1
    assert cal.tau_max == calibrate.choose_tau_max(cal.scores["per_tau_max"])[0]  # the rule, on its scores
    assert meta["completed"] == ["diffusion"]  # the training metadata is kept
    # the job resolves its unset settings from it
    got = _checkpoint_calibration(str(tmp_path / "adapted.safetensors"))
    g = GeneratorSpec(kind="realdgen", checkpoint="x").resolved(got)
    assert (g.start_kind, g.tau_max, g.filter_norm) == ("domain", cal.tau_max, True)
    # ... and generates with the sampler τ was chosen with (DDIM, calibration.sampler_steps)
    assert cal.sampler == {"kind": "ddim", "steps": 2, "eta": 1.0}
    assert (g.sampler, g.sampler_steps, g.sampler_eta) == ("ddim", 2, 1.0)
    assert [t["ops"] for t in g.start_bank] == [t["ops"] for t in cal.bank]
    # --calibrate-only: trains nothing, re-records the calibration (here a one-point grid)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capsys.readouterr()
    assert T.main([str(path), "--calibrate-only", "--set", "calibration.tau_grid=[7]"]) == 0
    n_val = cal.scores["validation_images"]
    warned = f"warning: τ was chosen on {n_val} validation image(s) of 'codec'" in capsys.readouterr().err
    assert n_val < T.FEW_VALIDATION_IMAGES and warned  # a tiny domain: the choice is said to be weak
    again, meta2 = load_checkpoint(tmp_path / "adapted.safetensors")
    cal2 = calibrate.from_metadata(meta2)
    assert cal2.tau_max == 7 and set(cal2.scores["per_tau_max"]) == {"7"}
    assert meta2["digest"] == meta["digest"]  # same weights
    assert all(torch.equal(before[k], v) for k, v in again.state_dict().items())


class _Sharpness(torch.nn.Module):
    """A stand-in E_deg with a known meaning: mean |horizontal / vertical difference| per channel
    (what blur removes), so the domain profile's choice can be predicted without a trained net."""

    def forward(self, x):
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((-2, -1))
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((-2, -1))
        return torch.cat([dx, dy], 1) * 10


def test_domain_start_profile_picks_the_domains_entry_and_is_the_mean_pair_error(photos):
    bank = calibrate.start_bank(4, (0.0, 1.5, 3.0), (0,))
    img = torch.from_numpy(photos["chelsea"].copy()).permute(2, 0, 1).float() / 255
    # probe tiles and the domain's references show the same scene (shifted by a few pixels), so the
    # degradation is all that tells the bank entries apart and the answer is known
    probe = [img[:, 100 + d : 164 + d, 200:264] for d in (0, 2, 4, 6)]
    net = _Sharpness()
    for want in range(3):
        ref_hr = torch.stack([img[:, 101 + d : 165 + d, 201:265] for d in (0, 2, 4)])
        ref_emb = net(degrade.apply(ref_hr, [bank[want]] * len(ref_hr)))
        prof = calibrate.domain_start_profile(net, probe, ref_emb, bank)
        assert prof["chosen"] == want and (prof["tiles"], prof["refs"]) == (4, 3)
        # closed form == the brute-force mean over every (probe tile, reference) pair
        pair = torch.stack(
            [
                (
                    (net(degrade.apply(h[None].expand(3, -1, -1, -1), list(bank)))[:, None] - ref_emb[None])
                    ** 2
                ).mean(-1)
                for h in probe
            ]
        )  # [tiles, bank, refs]
        assert torch.allclose(
            torch.tensor(prof["errors"], dtype=torch.float64), pair.mean((0, 2)).double(), rtol=1e-5
        )
        errs = calibrate.profile_errors(prof, len(bank))
        assert (
            calibrate.choose_starts(errs, 3) == [want] * 3
        )  # every candidate starts from the domain's entry
    assert calibrate.theta_label(bank[1]) == "blur σ 1.5 + bicubic_aa"
    # a sharpened domain picks its sharpening entry, a plain one does not
    sharp_bank = calibrate.start_bank(4, (0.0, 1.5), (0,), (0.0, 1.0))
    for want in range(4):
        emb = net(degrade.apply(ref_hr, [sharp_bank[want]] * len(ref_hr)))
        assert calibrate.domain_start_profile(net, probe, emb, sharp_bank)["chosen"] == want
    with pytest.raises(ValueError, match="probe HR tile"):
        calibrate.domain_start_profile(net, [], ref_emb, bank)
    with pytest.raises(ValueError, match="all errors are infinite"):
        calibrate.choose_starts(torch.full((3,), float("inf")), 2)


def test_rank_aggregate_gives_each_reference_one_say_where_the_mean_follows_outliers(photos):
    bank = calibrate.start_bank(4, (0.0, 1.5, 3.0), (0,))
    img = torch.from_numpy(photos["chelsea"].copy()).permute(2, 0, 1).float() / 255
    probe = [img[:, 100 + d : 164 + d, 200:264] for d in (0, 2, 4, 6)]
    net = _Sharpness()
    ref_hr = torch.stack([img[:, 101 + d : 165 + d, 201:265] for d in (0, 2, 4)])
    agree = net(degrade.apply(ref_hr, [bank[0]] * 3))  # three references made by the sharpest entry
    e = torch.stack([torch.stack([net(degrade.apply(h[None], [t]))[0] for h in probe]).mean(0) for t in bank])
    far = e[2] + 10 * (e[2] - e[0])  # two references beyond the blurriest entry (a scene unlike the HR)
    emb = torch.cat([agree, far.expand(2, -1)])
    dist = calibrate.domain_start_profile(net, probe, emb, bank, aggregate="distance")
    rank = calibrate.domain_start_profile(net, probe, emb, bank)  # the default
    # the two far references dominate the mean error; counted by rank, the three agreeing ones win
    assert dist["chosen"] == 2 and dist["aggregate"] == "distance"
    assert rank["chosen"] == 0 and rank["aggregate"] == "rank"
    assert rank["errors"] == dist["errors"]
    # brute force: each reference ranks the bank by its mean error over the probe tiles
    pair = torch.stack(
        [
            ((net(degrade.apply(h[None].expand(3, -1, -1, -1), list(bank)))[:, None] - emb[None]) ** 2).mean(
                -1
            )
            for h in probe
        ]
    ).mean(0)  # [bank, refs]
    ranks = pair.argsort(0).argsort(0).double().mean(1)
    assert torch.allclose(torch.tensor(rank["ranks"], dtype=torch.float64), ranks, atol=1e-6)
    assert rank["ranks"] == pytest.approx([(0 * 3 + 2 * 2) / 5, 1.0, (2 * 3 + 0 * 2) / 5])
    # weights count in the rank too: weighted to the far pair, the blurriest entry wins again
    w = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0])
    assert calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=w)["chosen"] == 2
    with pytest.raises(ValueError, match="aggregate must be"):
        calibrate.domain_start_profile(net, probe, emb, bank, aggregate="median")


def test_reference_weights_discount_flat_references_and_weight_the_profile(photos):
    bank = calibrate.start_bank(4, (0.0, 1.5, 3.0), (0,))
    img = torch.from_numpy(photos["chelsea"].copy()).permute(2, 0, 1).float() / 255
    probe = [img[:, 100 + d : 164 + d, 200:264] for d in (0, 2, 4, 6)]
    net = _Sharpness()
    want = 0  # the textured references were made by the sharpest entry ...
    textured = degrade.apply(
        torch.stack([img[:, 101 + d : 165 + d, 201:265] for d in (0, 2, 4)]), [bank[want]] * 3
    )
    # ... and a majority of flat crops (one grey level each), which E_deg reads as "blurred"
    flat = torch.stack([torch.full((3, 16, 16), v) for v in (0.2, 0.4, 0.5, 0.6, 0.8)])
    refs = list(textured) + list(flat)
    emb = torch.cat([net(textured), net(flat)])
    blurred = torch.cat([net(calibrate.weight_probe(textured)), net(calibrate.weight_probe(flat))])
    w = calibrate.reference_weights(emb, blurred)
    assert w.shape == (8,) and bool((w[:3] > 1e-4).all()) and float(w[3:].abs().max()) < 1e-12
    assert torch.allclose(calibrate.weight_probe(refs[0]), calibrate.weight_probe(textured)[0])

    uniform = calibrate.domain_start_profile(net, probe, emb, bank)
    weighted = calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=w)
    only_textured = calibrate.domain_start_profile(net, probe, emb[:3], bank, ref_weights=w[:3])
    # the flat majority pulls the uniform choice to the blurriest entry; weighted, they drop out
    assert uniform["chosen"] == 2 and weighted["chosen"] == want
    assert torch.allclose(torch.tensor(weighted["errors"]), torch.tensor(only_textured["errors"]), rtol=1e-6)
    assert uniform["effective_refs"] == 8.0 and weighted["effective_refs"] < 3.01
    # the weighted closed form == the brute-force weighted mean over every (probe, reference) pair
    ws = torch.tensor([0.5, 2.0, 1.0, 0.25, 0.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    prof = calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=ws)
    pair = torch.stack(
        [
            ((net(degrade.apply(h[None].expand(3, -1, -1, -1), list(bank)))[:, None] - emb[None]) ** 2).mean(
                -1
            )
            for h in probe
        ]
    ).double()  # [tiles, bank, refs]
    brute = (pair * ws).sum(2).mean(0) / ws.sum()
    assert torch.allclose(torch.tensor(prof["errors"], dtype=torch.float64), brute, rtol=1e-5)
    # all-zero weights mean "no information": every reference counts the same
    zero = calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=torch.zeros(8))
    assert zero["errors"] == uniform["errors"]
    with pytest.raises(ValueError, match="ref_weights must be 8"):
        calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=torch.ones(3))
    with pytest.raises(ValueError, match="ref_weights must be 8"):
        calibrate.domain_start_profile(net, probe, emb, bank, ref_weights=-torch.ones(8))


def test_probe_boxes_spread_distinct_tiles_inside_the_image():
    for h, w, tile, k in ((512, 768, 256, 6), (300, 1000, 64, 11), (256, 256, 64, 32), (97, 130, 32, 5)):
        boxes = calibrate.probe_boxes(h, w, tile, k)
        assert len(boxes) == k and len(set(boxes)) == k, (h, w, tile, k, boxes)
        assert all(0 <= y <= h - tile and 0 <= x <= w - tile for y, x in boxes)
    # the 6 boxes of a 512x768 image at 256 are exactly its 2x3 grid of whole tiles
    assert calibrate.probe_boxes(512, 768, 256, 6) == [(y, x) for y in (0, 256) for x in (0, 256, 512)]
    assert calibrate.probe_boxes(512, 768, 256, 1) == [(128, 256)]  # one box: the centre tile
    assert calibrate.probe_boxes(256, 256, 256, 5) == [(0, 0)]  # an image of one tile: one box
    assert calibrate.probe_boxes(40, 400, 32, 8) == sorted(set(calibrate.probe_boxes(40, 400, 32, 8)))
    with pytest.raises(ValueError, match="probe_boxes"):
        calibrate.probe_boxes(16, 64, 32, 2)


def test_probe_tiles_spread_the_budget_over_few_inputs_and_skip_broken_ones(tmp_path):
    """The job's probe tiles (`generator.start_probe_layout`): `spread` cuts start_probe_tiles tiles
    from a few large inputs, `centre` one centre tile per input; a broken input's share passes on,
    and what the last inputs could not give comes from the earlier inputs' reserve."""
    import numpy as np

    from pipelines.generate.references import _probe_tiles

    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(small).save(tmp_path / "small.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [
        {"uri": str(tmp_path / n), "path": str(tmp_path / n)} for n in ("big.png", "broken.png", "small.png")
    ]
    as_u8 = lambda t: (t.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    # spread: 9 tiles over 3 inputs -> 3 for big; the broken one gives none, the small one (one tile)
    # one; the 5 still wanted come from big's reserve (3 more distinct boxes: up to its share again)
    spread = _probe_tiles(rows, {}, 10**7, 64, n_tiles=9)
    boxes = calibrate.probe_boxes(192, 256, 64, 3)
    assert len(spread) == 7
    for t, (y, x) in zip(spread[:3], boxes, strict=True):
        assert np.array_equal(as_u8(t), big[y : y + 64, x : x + 64])
    assert np.array_equal(as_u8(spread[3]), small)
    spare = [b for b in calibrate.probe_boxes(192, 256, 64, 6) if b not in boxes][:3]
    assert len(spare) == 3
    assert [as_u8(t).tobytes() for t in spread[4:]] == [
        big[y : y + 64, x : x + 64].tobytes() for y, x in spare
    ]
    # what an input does not give passes to the inputs after it: broken then big -> 6 from big;
    # small (one tile) then big -> 1 + 4
    carried = _probe_tiles([rows[1], rows[0]], {}, 10**7, 64, n_tiles=6)
    assert [as_u8(t).tobytes() for t in carried] == [
        big[y : y + 64, x : x + 64].tobytes() for y, x in calibrate.probe_boxes(192, 256, 64, 6)
    ]
    assert len(_probe_tiles([rows[2], rows[0]], {}, 10**7, 64, n_tiles=5)) == 5
    assert len(_probe_tiles([rows[0], rows[2]], {}, 10**7, 64, n_tiles=2)) == 2  # the budget is a cap
    # centre: one centre tile per readable input
    centre = _probe_tiles(rows, {}, 10**7, 64)
    assert len(centre) == 2 and np.array_equal(as_u8(centre[0]), big[64:128, 96:160])
