"""kind: evaluate end to end on synthetic codec stand-ins, checked against numbers computed here.

The stand-in "codec" is Pillow: bicubic downscale ×4 of the whole photo, then JPEG at quality 30,
tiles cut from the result (the layout of shared/bench/make_codec_pairs.py: refs_train/, hr/, lr/).
The report's per-tile PSNR, SSIM and statistic gaps are recomputed from the shards' bytes with
plain numpy / scipy formulas (not the code path of the pipeline), and the references are checked to
come from the other photo.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.manifest import ManifestError, parse_manifest
from realdgen_core import realism

S, T = 4, 16  # scale, LR tile


def _standin(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = img.shape[0] // S * S, img.shape[1] // S * S
    hr = img[:h, :w]
    small = Image.fromarray(hr).resize((w // S, h // S), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=30)
    return hr, np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from skimage import data

    root = tmp_path_factory.mktemp("bench")
    d = root / "jpeg-standin"
    for sub in ("hr", "lr", "refs_train"):
        (d / sub).mkdir(parents=True)
    _, lr = _standin(data.chelsea())
    for i in range(6):
        Image.fromarray(lr[:T, i * T : (i + 1) * T]).save(d / "refs_train" / f"chelsea_0_{i}.png")
    for name, (y, x) in (("astronaut", (24, 36)), ("coffee", (24, 48))):
        hr, lr = _standin(getattr(data, name)())
        for j in range(2):
            xx = x + j * T
            key = f"{name}_{y}_{xx}"
            Image.fromarray(hr[y * S : (y + T) * S, xx * S : (xx + T) * S]).save(d / "hr" / f"{key}.png")
            Image.fromarray(lr[y : y + T, xx : xx + T]).save(d / "lr" / f"{key}.png")
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from realdgen_core.checkpoint import save_checkpoint
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model(preset("tiny")))
    return path


def _manifest(bench: Path, ckpt: Path, out: Path, **extra) -> dict:
    data = {
        "kind": "evaluate",
        "checkpoint": str(ckpt),
        "root": str(bench),
        "domains": [{"name": "jpeg-standin"}],
        "generation": {"tile": T, "k": 2, "tau_max": 3, "generators": ["realdgen", "bicubic"]},
        "classifier": {"steps": 40, "crop": 8, "batch_size": 16, "width": 8, "repeats": 2},
        "sr_proxy": {
            "photos": ["camera"],
            "tiles_per_image": 2,
            "steps": 20,
            "crop": 8,
            "batch_size": 4,
            "width": 8,
            "blocks": 1,
            "repeats": 2,
        },
        "report": {"dir": str(out)},
    }
    data.update(extra)
    return data


# ---- independent formulas ---------------------------------------------------------------------


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return min(10 * math.log10(255.0**2 / mse) if mse else math.inf, 58.92)  # capped at MSE 1/12


GAP_FLOORS = {"noise": 0.1, "laplacian": 1.0, "blockiness": 1e-3}


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. 2004 with an 11-tap Gaussian (σ = 1.5), valid windows, mean over channels."""
    from scipy.signal import convolve2d

    r = np.arange(-5, 6)
    k1 = np.exp(-0.5 * (r / 1.5) ** 2)
    k = np.outer(k1, k1) / k1.sum() ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    out = []
    for ch in range(3):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)

        def f(z):
            return convolve2d(z, k, mode="valid")

        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))


def _y(a):
    a = a.astype(np.float64)
    return a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114


def _stats(a: np.ndarray) -> dict[str, float]:
    from scipy.signal import convolve2d

    y = _y(a)
    n = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], float)
    lap = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float)
    h, w = y.shape
    noise = math.sqrt(math.pi / 2) * np.abs(convolve2d(y, n, mode="valid")).sum() / (6 * (h - 2) * (w - 2))
    energy = float(np.mean(convolve2d(y, lap, mode="valid") ** 2))
    on, off = [], []
    for x in range(w - 1):
        (on if x % 8 == 7 else off).extend(np.abs(y[:, x + 1] - y[:, x]))
    for yy in range(h - 1):
        (on if yy % 8 == 7 else off).extend(np.abs(y[yy + 1, :] - y[yy, :]))
    return {"noise": noise, "laplacian": energy, "blockiness": float(np.mean(on) / np.mean(off))}


def _shard_samples(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """HR stem -> (LR uint8, json) read straight from the tar files."""
    out = {}
    for tar_path in sorted(folder.rglob("*.tar")):
        with tarfile.open(tar_path) as t:
            files: dict[str, dict[str, bytes]] = {}
            for mem in t.getmembers():
                key, _, suffix = mem.name.partition(".")
                files.setdefault(key, {})[suffix] = t.extractfile(mem).read()
        for f in files.values():
            meta = json.loads(f["json"])
            lr = np.asarray(Image.open(io.BytesIO(f["lr.png"])).convert("RGB"))
            out[Path(meta["hr_source"]).stem] = (lr, meta)
    return out


# ---- tests ------------------------------------------------------------------------------------


@pytest.mark.ray
def test_tiny_evaluation_report_matches_independent_numbers(ray_local, bench, tiny_ckpt, tmp_path):
    from pipelines.evaluate_realism import run_evaluation

    out = tmp_path / "report"
    # the SR proxy's HR: a user folder with one photo and one broken file (the job skips it, the
    # report says so, the rest goes on)
    sr_hr = tmp_path / "sr_hr"
    sr_hr.mkdir()
    from skimage import data as skdata

    Image.fromarray(skdata.camera()).convert("RGB").save(sr_hr / "camera.png")
    (sr_hr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    base = _manifest(bench, tiny_ckpt, out)
    m = parse_manifest({**base, "sr_proxy": {**base["sr_proxy"], "hr": {"uri": str(sr_hr)}}})
    result = run_evaluation(m, log=lambda *_: None)
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"] == json.loads(json.dumps(result["summary"]))
    for name in (
        "report.md",
        "grid_jpeg-standin.png",
        "bars_psnr.png",
        "bars_classifier_accuracy.png",
        "bars_classifier_paired_accuracy.png",
        "hist_jpeg-standin.png",
    ):
        assert (out / name).stat().st_size > 0, name
    dom = rep["domains"]["jpeg-standin"]
    assert dom["tiles"] == 4 and dom["groups"] == {"astronaut": 2, "coffee": 2}
    truth_dir = bench / "jpeg-standin" / "lr"
    truth = {p.stem: np.asarray(Image.open(p).convert("RGB")) for p in truth_dir.glob("*.png")}
    (work,) = (out / "work" / "jpeg-standin").glob("data-*/gen")  # one folder, named by the data digest
    for kind in ("bicubic", "realdgen"):
        folder = next(p for p in work.iterdir() if p.name.startswith(kind))
        samples = _shard_samples(folder)
        assert sorted(samples) == sorted(truth)
        per_tile = {r["tile"]: r for r in dom["generators"][kind]["per_tile"]}
        mine = {k: [] for k in ("psnr", "ssim", "noise_gap", "laplacian_gap", "blockiness_gap")}
        for name, (lr, meta) in samples.items():
            assert lr.shape == (T, T, 3)
            assert meta["hr_box"] == [0, 0, T * S, T * S]  # the whole HR tile -> the whole LR tile
            # recorded relative to the work folder: keys and seeds do not depend on where the report is
            assert meta["hr_source"].startswith("tiles/hr/"), meta["hr_source"]
            t, g = _stats(truth[name]), _stats(lr)
            row = {
                "psnr": _psnr(lr, truth[name]),
                "ssim": _ssim(lr, truth[name]),
                **{f"{k}_gap": abs(g[k] - t[k]) / max(t[k], GAP_FLOORS[k]) for k in t},
            }
            for k, v in row.items():
                assert per_tile[name][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (kind, name, k)
                mine[k].append(v)
            if kind == "realdgen":  # honest reference: the true LR of the OTHER photo
                own, ref = name.split("_")[0], Path(meta["ref_source"])
                assert ref.parent.name != own and ref.parent.parent.name == "lr", meta["ref_source"]
        for k, vs in mine.items():
            assert dom["generators"][kind]["metrics"][k] == pytest.approx(np.mean(vs), abs=1e-4)
    # The bicubic stand-in's own downscale is bicubic too: bicubic is far closer than a random tiny model.
    g = {k: dom["generators"][k]["metrics"] for k in ("bicubic", "realdgen")}
    margin = rep["summary"]["psnr"]["jpeg-standin"]["realdgen_margin"]
    assert margin == pytest.approx(g["realdgen"]["psnr"] - g["bicubic"]["psnr"], abs=1e-3)
    # Classifier, 2 seeded repeats: both photos held out once per repeat, 2 classes x 2 tiles x
    # (16/8)^2 crops each per fold.
    clf = dom["generators"]["realdgen"]["classifier"]
    assert [f["held_out"] for f in clf["folds"]] == ["astronaut", "coffee"] * 2 and clf["test_crops"] == 64
    assert len(clf["repeats"]) == 2 and clf["accuracy"] == pytest.approx(np.mean(clf["repeats"]), abs=1e-3)
    assert 0.0 <= clf["accuracy_ci95"][0] <= clf["accuracy"] <= clf["accuracy_ci95"][1] <= 1.0
    # paired figure pooled over the repeats: 32 pairs (half the crops) per repeat
    assert clf["test_pairs"] == 32
    assert clf["paired_accuracy"] == pytest.approx(clf["paired_wins"] / 32, abs=1e-4)
    assert clf["paired_accuracy"] == pytest.approx(np.mean(clf["paired_repeats"]), abs=1e-3)
    assert dom["generators"]["realdgen"]["metrics"]["classifier_paired_accuracy"] == clf["paired_accuracy"]
    assert 0.0 <= clf["paired_ci95"][0] <= clf["paired_accuracy"] <= clf["paired_ci95"][1] <= 1.0

    # Both repeats score the same held-out crops: the interval is one repeat's (32 crops, 16 pairs)
    # at the pooled accuracy, not 64 independent crops. Wilson's formula, written out here:
    def wilson(p: float, n: int) -> list[float]:
        k = round(p * n) / n
        mid, half = k + 1.96**2 / (2 * n), 1.96 * np.sqrt(k * (1 - k) / n + 1.96**2 / (4 * n * n))
        return [max(0.0, (mid - half) / (1 + 1.96**2 / n)), min(1.0, (mid + half) / (1 + 1.96**2 / n))]

    assert clf["distinct_test_crops"] == 32
    assert clf["accuracy_ci95"] == pytest.approx(wilson(clf["accuracy"], 32), abs=1e-3)
    assert clf["paired_ci95"] == pytest.approx(wilson(clf["paired_accuracy"], 16), abs=1e-3)
    dist = np.mean([abs(f["paired_accuracy"] - 0.5) for f in clf["folds"]])  # 4 folds, sign-free
    fd = rep["summary"]["classifier_paired_fold_distance"]["jpeg-standin"]  # lower is better
    assert fd["realdgen_margin"] == pytest.approx(
        fd["values"][fd["best_baseline"]] - fd["values"]["realdgen"]
    )
    assert fd["values"][fd["best_baseline"]] == min(v for g, v in fd["values"].items() if g != "realdgen")
    assert clf["paired_fold_distance"] == pytest.approx(dist, abs=1e-4)
    assert dom["generators"]["realdgen"]["metrics"]["classifier_paired_fold_distance"] == pytest.approx(
        dist, abs=1e-4
    )
    assert dom["sr_proxy"]["inputs_failed"] == {"realdgen": "1 of 2", "bicubic": "1 of 2"}
    assert "1 of 2 training HR inputs failed for realdgen" in (out / "report.md").read_text()
    # SR proxy: 2 training tiles of `camera` per generator, scored on the 4 real pairs.
    for kind in ("bicubic", "realdgen"):
        sp = dom["generators"][kind]["sr_proxy"]
        assert sp["train_pairs"] == 2 and len(sp["per_tile_psnr"]) == 4 and math.isfinite(sp["psnr"])
        assert sp["psnr"] == pytest.approx(np.mean([r["psnr"] for r in sp["runs"]]), abs=1e-3)
    # realdgen metadata read back for the histograms
    sv = dom["generators"]["realdgen"]["shard_values"]
    assert len(sv["tau"]) == 4 and all(0 <= t <= 3 for t in sv["tau"])


def test_statistics_behave():
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 128, np.uint8)
    noisy = np.clip(128 + rng.normal(0, 10, (64, 64, 1)), 0, 255).round().astype(np.uint8).repeat(3, axis=2)
    assert realism.noise_level(flat) == 0.0 and realism.blockiness(flat) == 1.0
    assert realism.noise_level(noisy) == pytest.approx(10, rel=0.1)
    blocks = np.kron(rng.integers(0, 255, (8, 8)), np.ones((8, 8))).astype(np.uint8)  # 8x8 constant blocks
    ramp = (np.add.outer(np.arange(64), np.arange(64)) * 2).astype(np.uint8)
    assert realism.blockiness(np.stack([blocks] * 3, axis=2)) > 100
    assert realism.blockiness(np.stack([ramp] * 3, axis=2)) == pytest.approx(1.0)
    for img in (noisy, np.stack([ramp] * 3, axis=2)):
        mine = _stats(img)
        assert realism.lr_stats(img) == pytest.approx(mine, rel=1e-9)
    assert realism.relative_gap(3.0, 2.0) == 0.5 and realism.relative_gap(1.0, 0.0) == 1000.0


def test_evaluate_manifest_is_strict(tmp_path, bench, tiny_ckpt):
    good = _manifest(bench, tiny_ckpt, tmp_path / "r")
    assert parse_manifest(good).generation.group_pattern == "^([^_]+)"
    with pytest.raises(ManifestError, match="classifier.stepz: unknown key"):
        parse_manifest({**good, "classifier": {"stepz": 3}})
    with pytest.raises(ManifestError, match="set `checkpoint`"):
        parse_manifest({**good, "checkpoint": None})
    with pytest.raises(ManifestError, match="group_pattern: not a regular expression"):
        parse_manifest({**good, "generation": {"group_pattern": "("}})
    with pytest.raises(ManifestError, match="greater than or equal to 1"):
        parse_manifest({**good, "sr_proxy": {"steps": 0}})


def test_cli_dispatches_manifest_and_reports_bad_paths(tmp_path, bench, tiny_ckpt, capsys):
    import yaml

    from pipelines.evaluate import main

    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(_manifest(bench, tiny_ckpt, tmp_path / "r")))
    assert main([str(p), "--set", "domains.0.name=missing"]) == 2
    assert "no hr/+lr/ or HR/+LR/" in capsys.readouterr().err
    assert main([str(p), "--set", "checkpoint=/nope.safetensors"]) == 2
    assert "checkpoint: file not found" in capsys.readouterr().err
    assert main([str(p), "--set", "sr_proxy.photos=[camra]"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: invalid manifest") and "\n  sr_proxy.photos: unknown photo(s) ['camra']" in err
    )


def _realsr_domain(tmp_path, pairs: dict[str, tuple[np.ndarray, np.ndarray]], **generation):
    for sub in ("HR", "LR"):
        (tmp_path / "d" / sub).mkdir(parents=True, exist_ok=True)
    for stem, (hr, lr) in pairs.items():
        Image.fromarray(hr).save(tmp_path / "d" / "HR" / f"{stem}_HR.png")
        Image.fromarray(lr).save(tmp_path / "d" / "LR" / f"{stem}_LR4.png")
    return parse_manifest(
        {
            "kind": "evaluate",
            "domains": [{"name": "d", "path": str(tmp_path / "d")}],
            "generation": {"tile": 16, "generators": ["bicubic"], **generation},
            "report": {"dir": str(tmp_path / "r")},
        }
    )


def test_realsr_layout_pairs_by_name_and_cuts_tiles(tmp_path):
    from pipelines.evaluate_realism import prepare_domain

    rng = np.random.default_rng(1)
    hr = rng.integers(0, 255, (130, 200, 3), dtype=np.uint8)  # 8 px wider than 4 x 48: cropped
    lr = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
    other = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = _realsr_domain(tmp_path, {"Canon_001": (hr, lr), "Nikon_002": (other, other[::4, ::4].copy())})
    dom = prepare_domain(m, m.domains[0], tmp_path / "w")
    assert dom.layout == "realsr" and len(dom.tiles) == 7
    assert {t.group for t in dom.tiles} == {"Canon", "Nikon"}
    t = next(t for t in dom.tiles if t.name == "Canon_001_16_32")
    assert np.array_equal(t.lr, lr[16:32, 32:48]) and np.array_equal(t.hr, hr[64:128, 128:192])
    assert any("Canon_001_HR.png" in n and "cropped" in n for n in dom.notes)


def test_eval_pairs_are_checked_before_any_work(tmp_path):
    """Bad benchmark data fails in prepare_domain (before Ray, adaptation or any job) with the reason."""
    from pipelines.evaluate_realism import prepare_domain

    rng = np.random.default_rng(2)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731

    def prepare(name, pairs, **generation):
        m = _realsr_domain(tmp_path / name, pairs, **generation)
        return prepare_domain(m, m.domains[0], tmp_path / name / "w")

    # x8 data read as x4: the HR is twice too large, not a crop
    with pytest.raises(
        ManifestError,
        match=r"Canon_001_HR.png / Canon_001_LR4.png: HR 256x256 and its LR 32x32 are not a x4 pair",
    ):
        prepare("x8", {"Canon_001": (img(256, 256), img(32, 32)), "Nikon_002": (img(64, 64), img(16, 16))})
    # an LR rounded up (HR 130 px -> LR 33): both are cropped to 128 / 32
    dom = prepare(
        "ceil", {"Canon_001": (img(130, 130), img(33, 33)), "Nikon_002": (img(64, 64), img(16, 16))}
    )
    assert next(t for t in dom.tiles if t.name == "Canon_001_16_16").lr.shape == (16, 16, 3)
    # a broken file loses its pair, with a note in the report; the other pairs stay
    (tmp_path / "ceil" / "d" / "HR" / "Sony_003_HR.png").write_bytes(b"not a png")
    Image.fromarray(img(16, 16)).save(tmp_path / "ceil" / "d" / "LR" / "Sony_003_LR4.png")
    again = prepare("ceil", {})
    assert [t.name for t in again.tiles] == [t.name for t in dom.tiles]
    assert any(n.startswith("HR Sony_003_HR.png: not an image") and "pair skipped" in n for n in again.notes)
    # one photo only: no honest reference exists
    with pytest.raises(ManifestError, match=r"one photo group only \('Canon'"):
        prepare("one", {"Canon_001": (img(64, 64), img(16, 16)), "Canon_002": (img(64, 64), img(16, 16))})
    # every pair too small: the error says why instead of only "no tile"
    with pytest.raises(ManifestError, match=r"no \(HR, LR\) tile found .*smaller than one 16-px tile"):
        prepare("small", {"Canon_001": (img(32, 32), img(8, 8)), "Nikon_002": (img(32, 32), img(8, 8))})
    # a 16-bit grey PNG is scaled like the job scales it, not clipped to white
    grey16 = (rng.integers(0, 256, (64, 64)) * 257).astype(np.uint16)
    (tmp_path / "g" / "d" / "HR").mkdir(parents=True)
    (tmp_path / "g" / "d" / "LR").mkdir(parents=True)
    Image.fromarray(grey16).save(tmp_path / "g" / "d" / "HR" / "Canon_001_HR.png")
    Image.fromarray(img(16, 16)).save(tmp_path / "g" / "d" / "LR" / "Canon_001_LR4.png")
    dom = prepare("g", {"Nikon_002": (img(64, 64), img(16, 16))})
    t = next(t for t in dom.tiles if t.group == "Canon")
    assert np.array_equal(t.hr, np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_tile_metrics_stay_finite_on_identical_and_flat_tiles():
    from pipelines.evaluate_realism import tile_metrics

    rng = np.random.default_rng(3)
    x = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert tile_metrics(x, x)["psnr"] == pytest.approx(58.92)  # identical: 8-bit rounding's PSNR
    flat = np.zeros((32, 32, 3), np.uint8)
    speck = flat.copy()
    speck[::4, ::4] = 1  # a faint pattern on a black letterbox
    row = tile_metrics(speck, flat)
    g = realism.lr_stats(speck)
    assert row["noise_gap"] == pytest.approx(g["noise"] / 0.1) and row["noise_gap"] < 10
    assert row["laplacian_gap"] == pytest.approx(g["laplacian"] / 1.0)


@pytest.mark.ray
def test_adaptation_runs_the_one_command_and_its_checkpoint_generates(ray_local, bench, tiny_ckpt, tmp_path):
    from pipelines.evaluate_realism import run_evaluation
    from realdgen_core.checkpoint import checkpoint_digest

    out = tmp_path / "report"
    data = _manifest(
        bench,
        tiny_ckpt,
        out,
        adapt={"enabled": True, "steps": 2, "overrides": ["stage_c.lr_crop=8", "stage_c.batch_size=2"]},
        classifier={"enabled": False},
        sr_proxy={"enabled": False},
    )
    data["generation"]["generators"] = ["realdgen"]
    lines: list[str] = []
    rep = run_evaluation(parse_manifest(data), log=lines.append)
    dom = rep["domains"]["jpeg-standin"]
    assert dom["adapted"] and dom["base_model_digest"] == checkpoint_digest(tiny_ckpt)
    # the jobs take the calibration the evaluation just made; their per-photo reference labels are
    # the evaluation's own, so no "calibrated for another domain" advice to adapt
    settings = [s for s in lines if "job: generator: domain calibration 'my-domain' from the checkpoint" in s]
    assert settings and not any("it was calibrated for" in s for s in lines), lines
    assert dom["model_digest"] == checkpoint_digest(dom["checkpoint"]) != dom["base_model_digest"]
    assert "stage_c.steps=2" in (Path(dom["checkpoint"]).parent / "_done.json").read_text()
    (gen,) = (out / "work" / "jpeg-standin").glob("data-*/gen")
    samples = _shard_samples(next(gen.glob("realdgen-*")))
    assert len(samples) == 4 and {m["model_digest"] for _, m in samples.values()} == {dom["model_digest"]}


def test_two_sample_threshold_is_the_median_of_the_balanced_held_out_set(photos):
    import torch

    from realdgen_core.probes import _balanced_correct, two_sample_test

    # every logit of an unseen photo shifted by +5: a threshold of 0 calls all "generated" (0.5),
    # the median of the balanced set ranks them perfectly
    real, gen = torch.full((2, 6), 4.0), torch.full((2, 6), 6.0)
    assert _balanced_correct(torch.stack([real.flatten(), gen.flatten()])) == (24, 24)
    assert _balanced_correct(torch.full((2, 10), 3.0)) == (10, 20)  # no information: chance
    flipped = torch.stack([torch.arange(10.0) + 10, torch.arange(10.0)])  # generated ranked below real
    assert _balanced_correct(flipped) == (0, 20)
    # real tiles, and the same tiles with strong noise: told apart; identical tiles: exactly chance
    rng = np.random.default_rng(0)
    tiles = [
        np.ascontiguousarray(photos[n][y : y + 32, 64:96])
        for n in ("astronaut", "coffee")
        for y in (0, 64, 128)
    ]
    noisy = [np.clip(t + rng.normal(0, 25, t.shape), 0, 255).astype(np.uint8) for t in tiles]
    groups = ["a"] * 3 + ["b"] * 3
    kw = dict(steps=60, batch_size=16, crop=16, width=8, seed=0)
    told = two_sample_test(tiles, noisy, groups, **kw)
    same = two_sample_test(tiles, [t.copy() for t in tiles], groups, **kw)
    assert told["accuracy"] >= 0.7 and same["accuracy"] == 0.5, (told, same)
    assert 0.0 <= told["fixed_threshold_accuracy"] <= 1.0 and told["test_crops"] == same["test_crops"] == 48
    # paired 2AFC: identical crops tie everywhere (exactly chance); noise is picked in nearly every pair
    assert same["paired_accuracy"] == 0.5 and same["test_pairs"] == 24 and same["paired_wins"] == 12.0
    assert told["paired_accuracy"] >= 0.9, told
    assert same["paired_fold_distance"] == 0.0 and told["paired_fold_distance"] >= 0.4
    assert told["paired_accuracy"] == pytest.approx(
        np.mean([f["paired_accuracy"] for f in told["folds"]]), abs=1e-3
    )


@pytest.mark.ray
def test_three_photos_make_one_reference_domain_per_job(ray_local, tiny_ckpt, tmp_path):
    """A codec pipeline is one domain: each photo's realdgen job gets the true LR of all the other
    photos as one reference domain (one start choice from all of them), never its own."""
    from skimage import data

    from pipelines.evaluate_realism import run_evaluation

    d = tmp_path / "bench" / "three"
    for sub in ("hr", "lr", "refs_train"):
        (d / sub).mkdir(parents=True)
    names = ("astronaut", "chelsea", "coffee")
    for name in names:
        hr, lr = _standin(getattr(data, name)())
        key = f"{name}_8_8"
        Image.fromarray(hr[8 * S : (8 + T) * S, 8 * S : (8 + T) * S]).save(d / "hr" / f"{key}.png")
        Image.fromarray(lr[8 : 8 + T, 8 : 8 + T]).save(d / "lr" / f"{key}.png")
        Image.fromarray(lr[40 : 40 + T, 40 : 40 + T]).save(d / "refs_train" / f"{name}.png")
    m = parse_manifest(
        {
            **_manifest(tmp_path / "bench", tiny_ckpt, tmp_path / "report"),
            "domains": [{"name": "three"}],
            "classifier": {"enabled": False},
            "sr_proxy": {"enabled": False},
        }
    )
    run_evaluation(m, log=lambda *_: None)
    (gen,) = (tmp_path / "report" / "work" / "three").glob("data-*/gen")
    (jobs,) = [p for p in gen.iterdir() if p.name.startswith("realdgen")]
    assert sorted(p.name for p in jobs.iterdir()) == sorted(names)
    for own in names:
        others = [n for n in names if n != own]
        ((lr, meta),) = _shard_samples(jobs / own).values()
        assert lr.shape == (T, T, 3) and meta["hr_source"] == f"tiles/hr/{own}/{own}_8_8.png"
        ref = Path(meta["ref_source"]).parent.name
        assert ref in others and meta["ref_set"] == f"truelr-{ref}"
        assert meta["domain"] == "truelr-" + "+".join(others)


def _photo_pair(name: str, size: tuple[int, int]) -> np.ndarray:
    """A real photo (scikit-image's bundled ones) at ``size`` (w, h): misalignment shows on it."""
    from skimage import data

    img = getattr(data, name)()
    img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))


def test_an_lr_resized_from_the_whole_hr_is_refused_a_registration_crop_is_kept(tmp_path):
    """Both fit the size test (HR up to 5 % wider than 4 x LR); only the crop is on the x4 grid."""
    from pipelines.evaluate_realism import prepare_domain

    hr = _photo_pair("astronaut", (512, 384))
    other = _photo_pair("coffee", (128, 128))
    other_lr = np.asarray(Image.fromarray(other).resize((32, 32), Image.Resampling.BICUBIC))
    down = lambda im, w, h: np.asarray(Image.fromarray(im).resize((w, h), Image.Resampling.BICUBIC))  # noqa: E731

    resized = down(hr, 123, 92)  # the whole photo, x4.16 / x4.17
    m = _realsr_domain(tmp_path / "a", {"Canon_001": (hr, resized), "Nikon_002": (other, other_lr)})
    with pytest.raises(
        ManifestError,
        match=r"Canon_001_HR.png / Canon_001_LR4.png: the LR 123x92 does not line up with the HR 512x384",
    ):
        prepare_domain(m, m.domains[0], tmp_path / "a" / "w")

    cropped = down(hr[:368, :492], 123, 92)  # registered: cut on the x4 grid, then x4
    m = _realsr_domain(tmp_path / "b", {"Canon_001": (hr, cropped), "Nikon_002": (other, other_lr)})
    dom = prepare_domain(m, m.domains[0], tmp_path / "b" / "w")
    t = next(t for t in dom.tiles if t.name == "Canon_001_16_16")
    assert np.array_equal(t.lr, cropped[16:32, 16:32]) and np.array_equal(t.hr, hr[64:128, 64:128])
    assert any("cropped bottom/right to HR 492x368" in n for n in dom.notes)


def test_lr_files_of_two_scales_and_other_naming_conventions(tmp_path):
    from pipelines.evaluate_realism import prepare_domain

    rng = np.random.default_rng(3)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    lr4 = img(16, 16)
    m = _realsr_domain(
        tmp_path / "two", {"Canon_001": (img(64, 64), lr4), "Nikon_002": (img(64, 64), img(16, 16))}
    )
    Image.fromarray(img(32, 32)).save(tmp_path / "two" / "d" / "LR" / "Canon_001_LR2.png")
    dom = prepare_domain(m, m.domains[0], tmp_path / "two" / "w")  # x4: the _LR4 file, not the last sorted
    assert np.array_equal(next(t for t in dom.tiles if t.group == "Canon").lr, lr4)
    Image.fromarray(img(16, 16)).save(tmp_path / "two" / "d" / "LR" / "Canon_001_LR.png")
    Image.fromarray(img(16, 16)).save(tmp_path / "two" / "d" / "LR" / "Canon_001_x4.png")
    with pytest.raises(ManifestError, match=r"true LR files .*Canon_001_LR4.png.* pair with the same HR"):
        prepare_domain(m, m.domains[0], tmp_path / "two" / "w")

    # DIV2K names in explicitly named folders (0801.png / 0801x4.png): paired by suffix, with a note
    for sub in ("DIV2K_HR", "DIV2K_LR_x4"):
        (tmp_path / "div" / sub).mkdir(parents=True)
    for stem in ("0801", "0802"):
        Image.fromarray(img(64, 64)).save(tmp_path / "div" / "DIV2K_HR" / f"{stem}.png")
        Image.fromarray(img(16, 16)).save(tmp_path / "div" / "DIV2K_LR_x4" / f"{stem}x4.png")
    m = parse_manifest(
        {
            "kind": "evaluate",
            "domains": [
                {
                    "name": "d",
                    "hr": str(tmp_path / "div" / "DIV2K_HR"),
                    "lr": str(tmp_path / "div" / "DIV2K_LR_x4"),
                }
            ],
            "generation": {"tile": 16, "generators": ["bicubic"], "group_pattern": "^(\\d+)"},
            "report": {"dir": str(tmp_path / "r")},
        }
    )
    dom = prepare_domain(m, m.domains[0], tmp_path / "div" / "w")
    assert len(dom.tiles) == 2 and dom.layout == "realsr" and any("suffixes" in n for n in dom.notes)

    # RealSR V3: HR and LR side by side in one folder
    one = tmp_path / "v3"
    one.mkdir()
    for stem in ("Canon_001", "Nikon_002"):
        Image.fromarray(img(64, 64)).save(one / f"{stem}_HR.png")
        Image.fromarray(img(16, 16)).save(one / f"{stem}_LR4.png")
    m = parse_manifest(
        {
            "kind": "evaluate",
            "domains": [{"name": "d", "hr": str(one), "lr": str(one)}],
            "generation": {"tile": 16, "generators": ["bicubic"]},
            "report": {"dir": str(tmp_path / "r")},
        }
    )
    dom = prepare_domain(m, m.domains[0], tmp_path / "v3w")
    assert sorted({t.group for t in dom.tiles}) == ["Canon", "Nikon"] and len(dom.tiles) == 2


def test_classifier_is_left_out_with_a_note_when_there_are_too_few_test_crops(tmp_path):
    from pipelines.evaluate_realism import MIN_CLASSIFIER_TEST_CROPS, classifier_too_few, prepare_domain

    rng = np.random.default_rng(4)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    m = _realsr_domain(
        tmp_path, {"Canon_001": (img(64, 64), img(16, 16)), "Nikon_002": (img(64, 128), img(16, 32))}
    )
    dom = prepare_domain(m, m.domains[0], tmp_path / "w")
    names = [t.name for t in dom.tiles]  # 3 tiles of 16 px: Canon 1, Nikon 2
    assert len(names) == 3
    for crop, crops in ((16, 3), (8, 12), (4, 48)):
        mm = m.model_copy(update={"classifier": m.classifier.model_copy(update={"crop": crop})})
        why = classifier_too_few(mm, names)
        if crops >= MIN_CLASSIFIER_TEST_CROPS:
            assert why is None
        else:
            assert why.startswith(f"classifier skipped: {crops} held-out test crop(s) of {crop} px per class")
    big = m.model_copy(update={"classifier": m.classifier.model_copy(update={"crop": 32})})
    assert "(classifier.crop 32 > tile 16: 16)" in classifier_too_few(big, names)


def test_realsr_suffixes_leave_other_names_alone():
    from pipelines.evaluate_realism import _is_lr_name, _match_key, _suffix_scale

    keys = {
        "Canon_001_HR": "Canon_001",
        "Canon_001_LR4": "Canon_001",
        "Canon_001_x4": "Canon_001",
        "Canon_001_LR": "Canon_001",
        "0801x4": "0801",
        "0801": "0801",
        "scanA_640x480": "scanA_640x480",
        "scanA_640x480_LR4": "scanA_640x480",
        "box4": "box4",
        "2x4": "2",
    }
    assert {k: _match_key(k, "realsr") for k in keys} == keys
    assert _match_key("Canon_001_HR", "explicit") == "Canon_001_HR"
    lr = {"Canon_001_LR4", "Canon_001_x4", "Canon_001_LR", "0801x4", "photo_lr", "scanA_640x480_LR2"}
    not_lr = {"Canon_001_HR", "Canon_001_x1", "0801", "scanB_1024x768", "box4", "IMG_1234", "a_HR"}
    assert all(_is_lr_name(n) for n in lr) and not any(_is_lr_name(n) for n in not_lr)
    assert [_suffix_scale(n) for n in ("Canon_001_LR2", "0801x3", "Canon_001_LR", "IMG_1234")] == [
        2,
        3,
        None,
        None,
    ]


def test_sr_proxy_demo_folder_follows_the_photo_list(tmp_path):
    """A photo dropped from `sr_proxy.photos` leaves the SR-proxy training on a re-run into the same
    report folder, and the training datasets are named anew (the folder's listing changed)."""
    from pipelines.evaluate_realism import _load_demo_photos, _sr_source_key

    work = tmp_path / "work"
    folder = work / "_shared" / "sr_hr"
    _load_demo_photos(["camera", "coins"], folder)
    both = _sr_source_key("_shared/sr_hr", work)
    camera = (folder / "camera.png").read_bytes()
    (folder / ".coins.png.tmp").write_bytes(b"left by an interrupted run")
    _load_demo_photos(["camera"], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["camera.png"]
    assert (folder / "camera.png").read_bytes() == camera  # kept, not rewritten
    assert _sr_source_key("_shared/sr_hr", work) != both
    _load_demo_photos(["coins", "camera"], folder)
    assert _sr_source_key("_shared/sr_hr", work) == both


def test_refs_train_is_listed_recursively_as_the_jobs_list_it(tmp_path):
    """The adaptation and the jobs read refs_train's sub-folders too: so do the check before any work
    and the work folder's digest (a changed reference in a sub-folder never reuses old datasets)."""
    from pipelines.evaluate_realism import prepare_domain
    from pipelines.manifest import SourceSpec
    from pipelines.sources import list_source

    rng = np.random.default_rng(5)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    pairs = {"Canon_001": (img(64, 64), img(16, 16)), "Nikon_002": (img(64, 64), img(16, 16))}
    m = _realsr_domain(tmp_path, pairs)
    refs = tmp_path / "d" / "refs_train"
    (refs / "phoneA").mkdir(parents=True)
    Image.fromarray(img(16, 16)).save(refs / "phoneA" / "a.png")
    Image.fromarray(img(16, 16)).save(refs / "phoneA" / "b.JPG", format="JPEG")
    (refs / "phoneA" / "notes.txt").write_text("not an image")
    dom = prepare_domain(m, m.domains[0], tmp_path / "w")  # all images in a sub-folder: accepted
    assert dom.refs_dir == refs
    # a reference at the top too; then one in the sub-folder changes: a new work folder
    Image.fromarray(img(16, 16)).save(refs / "top.png")
    dom = prepare_domain(m, m.domains[0], tmp_path / "w")
    assert prepare_domain(m, m.domains[0], tmp_path / "w").work == dom.work  # same data, same folder
    Image.fromarray(img(16, 16)).save(refs / "phoneA" / "a.png")
    assert prepare_domain(m, m.domains[0], tmp_path / "w").work != dom.work
    # the listing is the job's
    from pipelines.evaluate_realism import _source_images

    job = [Path(it.path) for it in list_source(SourceSpec(uri=str(refs)))]
    assert _source_images(refs) == job and [p.name for p in job] == ["a.png", "b.JPG", "top.png"]


def test_photo_groups_of_non_ascii_names_stay_distinct():
    """A group names a folder and a reference set (A-Za-z0-9_-): names spelled otherwise are made safe
    without merging different photos into one group."""
    from pipelines.evaluate_realism import group_of

    pattern = "^([^_]+)"
    assert group_of("Canon_001", pattern) == "Canon" and group_of("a-b_c", pattern) == "a-b"  # unchanged
    cjk = [group_of(s, pattern) for s in ("猫", "咖啡", "火箭", "猫_2")]
    assert len(set(cjk[:3])) == 3 and cjk[3] == cjk[0]  # three photos; 猫_2 is 猫's
    latin = [group_of(s, pattern) for s in ("café_001", "cafè_002", "caf__003", "caf _004")]
    assert len(set(latin)) == 4, latin
    for g in cjk + latin:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", g), g
    assert group_of("caf_", "^(x*)") == "caf_"  # an empty group: the stem
    assert re.fullmatch(r"[A-Za-z0-9_-]+", group_of("été 1", "^(x?)"))  # the stem, made safe too


def test_files_whose_names_are_not_utf8_are_left_out_with_a_note(tmp_path):
    """As the job's lister does (pipelines.sources): such a name cannot be keyed, recorded or shown.
    It stopped the evaluation with a UnicodeEncodeError (tile name / refs_train digest)."""
    from pipelines.evaluate_realism import prepare_domain
    from pipelines.manifest import SourceSpec
    from pipelines.sources import list_source

    rng = np.random.default_rng(6)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    pairs = {"Canon_001": (img(64, 64), img(16, 16)), "Nikon_002": (img(64, 64), img(16, 16))}
    m = _realsr_domain(tmp_path, pairs)
    d = tmp_path / "d"
    latin1 = os.fsdecode(b"caf\xe9_003")  # a Latin-1 name: surrogate escapes once decoded
    Image.fromarray(img(64, 64)).save(d / "HR" / f"{latin1}_HR.png")
    Image.fromarray(img(16, 16)).save(d / "LR" / f"{latin1}_LR4.png")
    (d / "refs_train" / "phoneA").mkdir(parents=True)
    Image.fromarray(img(16, 16)).save(d / "refs_train" / "ok.png")
    Image.fromarray(img(16, 16)).save(d / "refs_train" / "phoneA" / f"{latin1}.png")
    dom = prepare_domain(m, m.domains[0], tmp_path / "w")
    assert sorted(t.group for t in dom.tiles) == ["Canon", "Nikon"]
    for what, name in (("HR", "caf\\udce9_003_HR.png"), ("LR", "caf\\udce9_003_LR4.png")):
        note = f"{what}: 1 file(s) left out, their names are not valid UTF-8 (e.g. '{name}'); rename them"
        assert any(n.startswith(note) for n in dom.notes), dom.notes
    assert any(n.startswith("refs_train: 1 file(s) left out") and "phoneA/caf" in n for n in dom.notes)
    json.dumps(dom.notes).encode("utf-8")  # the notes go into report.json / report.md
    # the job reads the same references
    assert [Path(it.path).name for it in list_source(SourceSpec(uri=str(d / "refs_train")))] == ["ok.png"]
    (d / "refs_train" / "ok.png").unlink()
    with pytest.raises(ManifestError, match="refs_train: no image files in .* not valid UTF-8"):
        prepare_domain(m, m.domains[0], tmp_path / "w")


def test_an_adaptation_that_cannot_run_fails_before_any_work(tmp_path, monkeypatch):
    """What the one-command adaptation needs of refs_train (a calibration split with both sides, an
    image at least stage_c.lr_crop) and its manifest are checked with the domains, before Ray starts:
    not a traceback when that domain's turn comes, after the earlier domains' jobs."""
    from pipelines.evaluate_realism import check_adaptation, prepare_domain

    rng = np.random.default_rng(7)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    pairs = {"Canon_001": (img(64, 64), img(16, 16)), "Nikon_002": (img(64, 64), img(16, 16))}
    m = _realsr_domain(tmp_path, pairs)
    m = m.model_copy(update={"adapt": m.adapt.model_copy(update={"enabled": True})})
    refs = tmp_path / "d" / "refs_train"
    refs.mkdir()

    def check(mm=m):
        return check_adaptation(mm, prepare_domain(mm, mm.domains[0], tmp_path / "w"))

    Image.fromarray(img(48, 48)).save(refs / "only.png")
    with pytest.raises(ManifestError, match=r"domains\.d: adaptation .*validation split .* is empty"):
        check()
    for i in range(8):
        Image.fromarray(img(24, 40)).save(refs / f"small{i}.png")
    (refs / "only.png").unlink()
    with pytest.raises(
        ManifestError,
        match=r"data.lr.0.source: no usable image of at least 32x32 px .*smaller.*adapt.overrides",
    ):
        check()
    # stage C reads the split's training side only: a large image held out for validation is no help
    from realdgen_core.calibrate import split_validation

    names = [f"big{i}.png" for i in range(40)]
    held = split_validation(names, 0.25)[1]
    train_side = next(n for n in names if n not in {names[i] for i in held})
    Image.fromarray(img(40, 36)).save(refs / names[held[0]])
    with pytest.raises(ManifestError, match="no usable image of at least 32x32 px"):
        check()
    Image.fromarray(img(40, 36)).save(refs / train_side)
    check()  # usable now
    small = m.model_copy(update={"adapt": m.adapt.model_copy(update={"overrides": ["stage_c.lr_crop=16"]})})
    (refs / train_side).unlink()
    check(small)  # a smaller crop through adapt.overrides, as the message says
    gone = m.model_copy(update={"adapt": m.adapt.model_copy(update={"manifest": "nope/adapt.yaml"})})
    with pytest.raises(ManifestError, match="adapt.manifest: file not found"):
        check(gone)
    # relative to the working directory first, like the manifest's other paths
    (tmp_path / "mine.yaml").write_text((Path(__file__).parents[1] / "manifests" / "adapt.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    Image.fromarray(img(40, 36)).save(refs / train_side)
    check(m.model_copy(update={"adapt": m.adapt.model_copy(update={"manifest": "mine.yaml"})}))


def test_lowercase_folders_of_realsr_names_pair_by_suffix_and_orphans_are_named(tmp_path):
    """hr/+lr/ folders (found under `path` or named explicitly) whose files share no name pair by the
    RealSR/DIV2K suffixes, as documented for named folders; an LR without an HR is named in the notes."""
    from pipelines.evaluate_realism import prepare_domain

    rng = np.random.default_rng(9)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    m = _realsr_domain(
        tmp_path, {"Canon_001": (img(64, 64), img(16, 16)), "Nikon_002": (img(64, 64), img(16, 16))}
    )
    Image.fromarray(img(16, 16)).save(tmp_path / "d" / "LR" / "Canon_009_LR4.png")  # no HR of its own
    (tmp_path / "d" / "HR").rename(tmp_path / "d" / "hr")
    (tmp_path / "d" / "LR").rename(tmp_path / "d" / "lr")
    base = str(tmp_path / "d")
    for extra in ({}, {"hr": f"{base}/hr", "lr": f"{base}/lr"}):
        dm = m.model_copy(update={"domains": [m.domains[0].model_copy(update=extra)]})
        dom = prepare_domain(dm, dm.domains[0], tmp_path / "w")
        assert dom.layout == "realsr" and sorted(t.name for t in dom.tiles) == ["Canon_001", "Nikon_002"]
        orphan = [n for n in dom.notes if "without an HR" in n]
        assert orphan == [
            "1 true LR image(s) without an HR (RealSR/DIV2K suffixes), left out, e.g. ['Canon_009_LR4.png']"
        ]


def test_report_header_says_which_domains_were_adapted():
    from pipelines.eval_report import _adaptation_line

    def result(enabled, adapted):
        doms = {name: {"adapted": a} for name, a in adapted.items()}
        return {"manifest": {"adapt": {"enabled": enabled, "steps": 50}}, "domains": doms}

    assert _adaptation_line(result(False, {"a": False})) == "adaptation off"
    assert _adaptation_line(result(True, {"a": True, "b": True})) == "adaptation on (50 steps)"
    assert _adaptation_line(result(True, {"a": True, "b": False})) == (
        "adaptation on (50 steps) for a only (the others have no refs_train/)"
    )
    assert "every domain used the unadapted checkpoint" in _adaptation_line(result(True, {"a": False}))
