"""The demo manifest end to end with the realdgen generator (a tiny random-init checkpoint)."""

from __future__ import annotations

import json
import tarfile

import pytest
from test_generate_job import REPO, validate

from pipelines.generate_dataset import run
from pipelines.manifest import load_manifest


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    checkpoint = pytest.importorskip("realdgen_core.checkpoint")
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    digest = checkpoint.save_checkpoint(path, build_model(preset("tiny")))
    return path, digest


@pytest.mark.ray
def test_demo_manifest_end_to_end_with_realdgen(ray_local, tiny_checkpoint, tmp_path):
    ckpt, digest = tiny_checkpoint
    demo = tmp_path / "demo"
    out = tmp_path / "out"
    m = load_manifest(
        REPO / "manifests" / "demo.yaml",
        [
            f"demo_inputs={demo}",
            f"hr.uri={demo / 'hr'}",
            "hr.limit=3",
            f"refs.0.source.uri={demo / 'refs'}",
            f"generator.checkpoint={ckpt}",
            "generator.k=2",
            "generator.tau_max=3",
            "tiling.tile=16",
            "tiling.max_tiles_per_image=1",
            "output.inputs_per_shard=2",
            f"output.uri={out}",
            "compute.actor_num_cpus=0.5",
            "compute.task_num_cpus=0.5",
            "progress.bar=false",
        ],
    )
    summary = run(m, log=lambda *_: None)
    assert summary["pairs"] == 3 and summary["shards"] == 2 and summary["model_digest"] == digest
    validate(str(out), "--scale", "4")
    index = json.loads((out / "_index.json").read_text())
    assert index["model_digest"] == digest
    with tarfile.open(out / "demo-000000.tar") as t:
        metas = [json.loads(t.extractfile(x).read()) for x in t.getmembers() if x.name.endswith(".json")]
    assert len(metas) == 2
    for meta in metas:
        assert meta["generator"] == "realdgen" and meta["k"] == 2 and meta["model_digest"] == digest
        assert isinstance(meta["tau"], int) and 0 <= meta["tau"] <= 3
        assert isinstance(meta["content_error"], float) and isinstance(meta["degradation_error"], float)
        assert meta["ref_source"].startswith(str(demo / "refs")) and meta["domain"] == "camera-standin"
    assert (out / "_preview.png").stat().st_size > 0


@pytest.mark.ray
def test_realdgen_bytes_do_not_depend_on_actors_or_batch_size(ray_local, tiny_checkpoint, tmp_path, photos):
    from test_generate_job import dataset_bytes, manifest_dict, run_dict, write_inputs

    ckpt, _ = tiny_checkpoint
    hr, refs = write_inputs(tmp_path, photos, size=(64, 64))
    outs = []
    for i, compute in enumerate(({"batch_size": 1}, {"batch_size": 3, "actors": {"min": 2, "max": 2}})):
        data = manifest_dict(
            str(hr),
            str(refs),
            str(tmp_path / f"o{i}"),
            scale=4,
            generator={"kind": "realdgen", "checkpoint": str(ckpt), "k": 2, "tau_max": 2},
            tiling__max_tiles_per_image=1,
            hr__limit=3,
        )
        data["compute"].update(compute)
        run_dict(data)
        outs.append(dataset_bytes(tmp_path / f"o{i}"))
    assert len(outs[0]) == 5 and outs[0] == outs[1]


@pytest.mark.ray
def test_domain_start_profile_chosen_once_per_domain_and_used_by_every_sample(
    ray_local, tiny_checkpoint, tmp_path, photos
):
    """start_choice domain: the job scores the bank on its probe tiles against all of the domain's
    references (checked here by brute force over every pair), records the choice in the index, and
    every sample starts from that entry (τ = 0: the LR is that start, exactly)."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from test_generate_job import manifest_dict, run_dict, write_inputs

    from realdgen_core import calibrate, degrade
    from realdgen_core.generator import LRGenerator

    ckpt, _ = tiny_checkpoint
    hr_dir, ref_dir = write_inputs(tmp_path, photos, size=(64, 64))
    bank = list(calibrate.start_bank(4, (0.0, 2.0), (0, 30)))
    out = tmp_path / "out"
    gen_spec = {"kind": "realdgen", "checkpoint": str(ckpt), "k": 2, "tau_max": 0, "start_kind": "domain"}
    gen_spec |= {"start_bank": bank, "content_weight": 0.0, "degradation_weight": 1.0}
    run_dict(manifest_dict(str(hr_dir), str(ref_dir), str(out), scale=4, generator=gen_spec))
    index = json.loads((out / "_index.json").read_text())
    prof = index["start_profile"]["domain:phone"]
    assert (prof["probe_tiles"], prof["references"]) == (5, 3)
    # independent: the mean pair error over every (probe tile, reference) pair, by brute force
    gen = LRGenerator.from_checkpoint(str(ckpt))
    load = lambda p: torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255  # noqa: E731
    hrs = [load(p) for p in sorted(hr_dir.glob("*.png"))]
    refs = gen.degradation_embeddings([load(p) for p in sorted(ref_dir.glob("*.png"))])
    with torch.no_grad():
        pair = torch.stack(
            [
                (
                    (
                        gen.model.degradation(degrade.apply(h[None].expand(4, -1, -1, -1), bank))[:, None]
                        - refs[None]
                    )
                    ** 2
                ).mean(-1)
                for h in hrs
            ]
        )
    # each reference weighted by how far its embedding moves under a Gaussian blur of σ 0.7 px
    # (built here from the formula: reflect-padded 7x7 kernel, normalised)
    ax = torch.arange(-3, 4, dtype=torch.float32)
    k2 = torch.exp(-(ax[:, None] ** 2 + ax[None] ** 2) / (2 * 0.7**2))
    k2 = (k2 / k2.sum()).expand(3, 1, 7, 7)
    ref_imgs = torch.stack([load(p) for p in sorted(ref_dir.glob("*.png"))])
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(ref_imgs, (3, 3, 3, 3), mode="reflect"), k2, groups=3
    )
    w = (gen.degradation_embeddings(blurred) - refs).double().pow(2).mean(1)
    dist_score = ((pair.double() * w).sum(2) / w.sum()).mean(0)  # [bank]
    # the default rule, a weighted Borda count: each reference ranks the bank by its error averaged
    # over the probe tiles; lowest weighted mean rank wins, ties to the lower mean error
    per_ref = pair.double().mean(0)  # [bank, refs]
    ranks = per_ref.argsort(0).argsort(0).double()
    mean_rank = (ranks * w).sum(1) / w.sum()
    want = min(range(len(bank)), key=lambda b: (round(float(mean_rank[b]), 9), float(dist_score[b])))
    assert prof["bank_entry"] == want and prof["start"] == calibrate.theta_label(bank[want])
    assert prof["reference_weighting"] == "sensitivity" and prof["aggregate"] == "rank"
    assert prof["effective_references"] == pytest.approx(float(w.sum() ** 2 / w.pow(2).sum()), abs=0.01)
    assert prof["effective_references"] < 3
    n = distinct = 0
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            files = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name in files:
            if not name.endswith(".json"):
                continue
            key = name[: -len(".json")]
            hr = load(io.BytesIO(files[f"{key}.hr.png"]))
            lr = load(io.BytesIO(files[f"{key}.lr.png"]))
            dist = [float((degrade.apply(hr[None], [th])[0] - lr).pow(2).mean()) for th in bank]
            assert dist[want] <= min(dist) + 1e-12, dist  # ties: a flat tile (sky) looks the same blurred
            # τ = 0 is no diffusion: the LR is that start itself, to the 8-bit level
            start = degrade.apply(hr[None], [bank[want]])[0].clamp(0, 1).mul(255).round()
            assert torch.equal(start, lr.mul(255).round())
            distinct += dist[want] < sorted(dist)[1]
            assert json.loads(files[name])["tau"] == 0
            n += 1
    assert n == 5 and distinct >= 3

    # run again on the complete dataset: nothing generated, the references' start profile is not
    # measured again (its log line is absent) and the index keeps the recorded one, byte for byte
    from pipelines.generate_dataset import run
    from pipelines.manifest import parse_manifest

    before = (out / "_index.json").read_bytes()
    logged: list[str] = []
    data = manifest_dict(str(hr_dir), str(ref_dir), str(out), scale=4, generator=gen_spec)
    again = run(parse_manifest(data), log=lambda *a: logged.append(" ".join(map(str, a))))
    assert again["shards_written"] == 0 and again["shards_skipped"] == again["shards"] > 0
    assert (out / "_index.json").read_bytes() == before
    assert any("start profile not read again" in line for line in logged), logged
    assert not any(line.startswith("start profile domain:") for line in logged), logged

    # a complete shard that started from another entry (its probe inputs decoded otherwise then) is
    # not resumed into; overwrite regenerates every shard, from the start chosen now
    from test_generate_job import dataset_bytes

    from pipelines.generate_dataset import JobFailed

    kept = dataset_bytes(out)
    stats = sorted(out.glob("*_stats.json"))
    assert len(stats) >= 2
    st = json.loads(stats[0].read_text())
    assert st["start_digest"].startswith("start:sha256:")
    stats[0].write_text(json.dumps({**st, "start_digest": "start:sha256:another"}))
    stats[-1].unlink()  # one shard left to write: the profile is measured again
    with pytest.raises(JobFailed, match="start chosen for a reference domain differs"):
        run(parse_manifest(data), log=lambda *_: None)
    data["output"]["mode"] = "overwrite"
    assert run(parse_manifest(data), log=lambda *_: None)["shards_written"] == len(stats)
    assert dataset_bytes(out) == kept
    assert json.loads(stats[0].read_text())["start_digest"] == st["start_digest"]


@pytest.mark.ray
def test_domain_start_profile_reads_start_probe_tiles_from_few_large_inputs(
    ray_local, tiny_checkpoint, tmp_path, photos
):
    """A job of 2 photos of 4 tiles each measures its start profile on start_probe_tiles (8) tiles
    with the default `spread` layout, and on one centre tile per photo with `centre`."""
    from test_generate_job import manifest_dict, run_dict, write_inputs

    from realdgen_core import calibrate

    ckpt, _ = tiny_checkpoint
    hr_dir, ref_dir = write_inputs(tmp_path, photos, size=(128, 128))
    bank = list(calibrate.start_bank(4, (0.0, 2.0), (0, 30)))
    gen_spec = {"kind": "realdgen", "checkpoint": str(ckpt), "k": 1, "tau_max": 0, "start_kind": "domain"}
    gen_spec |= {"start_bank": bank, "start_probe_tiles": 8}
    tiles = {}
    for layout in ("spread", "centre"):
        out = tmp_path / layout
        run_dict(
            manifest_dict(
                str(hr_dir),
                str(ref_dir),
                str(out),
                scale=4,
                generator={**gen_spec, "start_probe_layout": layout},
                hr__limit=2,
                tiling__max_tiles_per_image=1,
            )
        )
        tiles[layout] = json.loads((out / "_index.json").read_text())["start_profile"]["domain:phone"]
    assert tiles["spread"]["probe_tiles"] == 8 and tiles["centre"]["probe_tiles"] == 2
    assert (tiles["spread"]["probe_layout"], tiles["centre"]["probe_layout"]) == ("spread", "centre")


def test_reference_task_threads_change_no_output_and_are_restored(
    ray_local, tiny_checkpoint, tmp_path, photos
):
    """On a CPU run the reference task takes the CPUs free on the largest node (at most
    REF_TASK_MAX_CPUS) as torch threads: the references' E_deg bank and the start profile are the
    same as on one thread, and the caller's thread count is restored."""
    import numpy as np
    import torch
    from test_generate_job import write_inputs

    from pipelines.generate.job import REF_TASK_MAX_CPUS, GenerateJob
    from pipelines.generate.references import prepare_references
    from realdgen_core import calibrate

    # ray_local is one node of 2 CPUs: 2 when idle, never more than what is free now
    free = int(ray_local.available_resources().get("CPU", 0))
    assert GenerateJob._ref_task_cpus(settle_s=0) == max(1, min(REF_TASK_MAX_CPUS, 2, free))
    # a task that has just returned: its CPU shows as free a moment later, and the count waits for it
    ray_local.get(ray_local.remote(lambda: None).options(num_cpus=1).remote())
    if free == 2:
        assert GenerateJob._ref_task_cpus() == 2
    ckpt, _ = tiny_checkpoint
    hr_dir, ref_dir = write_inputs(tmp_path, photos, size=(128, 128))
    refs = [
        {"uri": str(p), "path": str(p), "set": "phone", "domain": None} for p in sorted(ref_dir.iterdir())
    ]
    probe = [{"uri": str(p), "path": str(p)} for p in sorted(hr_dir.iterdir())[:2]]
    start = {"bank": list(calibrate.start_bank(4, (0.0, 2.0), (0, 30))), "probe": probe, "tile_hr": 64}
    start |= {"n_tiles": 4}
    before = torch.get_num_threads()
    one = prepare_references(refs, "realdgen", str(ckpt), {}, 10**7, "cpu", start, threads=1)
    two = prepare_references(refs, "realdgen", str(ckpt), {}, 10**7, "cpu", start, threads=2)
    assert torch.get_num_threads() == before
    assert one[0] == two[0] and len(one[0]) == len(refs) and np.array_equal(one[2], two[2])
    (p1,), (p2,) = one[3].values(), two[3].values()
    assert p1["tiles"] == 4 and (p1["chosen"], p1["ranks"]) == (p2["chosen"], p2["ranks"])


def test_a_large_reference_is_read_from_its_centre_crop_and_a_tiny_one_is_skipped(tiny_checkpoint, tmp_path):
    """E_deg runs at a reference's full resolution (about 670 B per pixel): a 12 MP photo used as a
    reference took 8 GB and a larger one ran the machine out of memory. A reference larger than
    REFERENCE_MAX_SIDE is embedded from its centre crop (the same vector as that crop saved alone);
    one smaller than REFERENCE_MIN_SIDE is skipped with a reason, like one that does not decode."""
    import numpy as np
    from PIL import Image

    from pipelines.generate.references import REFERENCE_MAX_SIDE as cap
    from pipelines.generate.references import prepare_references, reference_view

    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (cap + 77, cap + 150, 3), dtype=np.uint8)
    y, x = 77 // 2, 150 // 2
    paths = {
        "big": (big, tmp_path / "big.png"),
        "crop": (np.ascontiguousarray(big[y : y + cap, x : x + cap]), tmp_path / "crop.png"),
        "tiny": (rng.integers(0, 256, (5, 40, 3), dtype=np.uint8), tmp_path / "tiny.png"),
        "small": (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), tmp_path / "small.png"),
    }
    for img, p in paths.values():
        Image.fromarray(img).save(p)
    refs = [{"uri": str(p), "path": str(p), "set": "phone", "domain": None} for _, p in paths.values()]
    ok, errors, bank, _, cropped = prepare_references(
        refs, "realdgen", str(tiny_checkpoint[0]), {}, 10**7, "cpu"
    )
    assert ok == [0, 1, 3] and cropped == [0]
    assert errors == [
        f"{paths['tiny'][1]}: too small: 40x5 px, a reference needs at least 8 px on a side "
        "to read a degradation from"
    ]
    assert np.array_equal(bank[0], bank[1]) and not np.array_equal(bank[0], bank[2])
    small = paths["small"][0]
    assert np.array_equal(reference_view(small), small)  # whole
    # the job records the crop in references_digest: a dataset that embedded such a reference whole
    # (before 2026-12-08) is not resumed with its crop's vector
    from pipelines.generate.plan import references_digest

    rows = [{**refs[i], "size": 1} for i in ok]
    marked = [dict(r, crop=cap) if j == 0 else r for j, r in enumerate(rows)]
    assert references_digest(marked) != references_digest(rows)
    assert references_digest([dict(r) for r in rows]) == references_digest(rows)


def test_references_are_embedded_one_at_a_time_with_the_vectors_and_start_of_all_held_at_once(
    tiny_checkpoint, photos, tmp_path
):
    """The reference task held every decoded reference (float32, up to 12 MB each after the crop)
    until the last was read: ten thousand references would need 100 GB in one task. Each is now
    embedded as it is decoded and dropped. The bank and each domain's start profile must be those of
    the references held at once and passed to ``domain_start`` as images (two domains, references of
    several sizes, one that fails to decode between them: the rows must not shift)."""
    import numpy as np
    import torch
    from PIL import Image

    from pipelines.generate.references import prepare_references
    from realdgen_core import calibrate
    from realdgen_core.generator import LRGenerator

    names = ["astronaut", "chelsea", "coffee", "rocket"]
    sizes = [(48, 64), (40, 40), (64, 48), (56, 72)]
    refs, images = [], []
    for j, (name, (h, w)) in enumerate(zip(names * 2, sizes * 2, strict=True)):
        img = np.array(Image.fromarray(photos[name]).resize((w, h), Image.BICUBIC))
        p = tmp_path / f"ref{j}.png"
        Image.fromarray(img).save(p)
        refs.append({"uri": str(p), "path": str(p), "set": "s", "domain": "a" if j % 2 else "b"})
        images.append(torch.from_numpy(img).permute(2, 0, 1).float().div(255.0))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    refs.insert(3, {"uri": str(broken), "path": str(broken), "set": "s", "domain": "a"})
    probe = []
    for name in ["coffee", "rocket"]:
        p = tmp_path / f"hr_{name}.png"
        Image.fromarray(photos[name]).save(p)
        probe.append({"uri": str(p), "path": str(p)})
    bank = list(calibrate.start_bank(4, (0.0, 2.0), (0, 30)))
    start = {"bank": bank, "probe": probe, "tile_hr": 64, "n_tiles": 4}
    ckpt = str(tiny_checkpoint[0])

    ok, errors, emb, profiles, _ = prepare_references(refs, "realdgen", ckpt, {}, 10**7, "cpu", start)
    assert ok == [0, 1, 2, 4, 5, 6, 7, 8] and len(errors) == 1 and str(broken) in errors[0]

    gen = LRGenerator.from_checkpoint(ckpt, device="cpu")
    assert np.array_equal(emb, gen.degradation_embeddings(images).numpy())
    from pipelines.generate.references import _probe_tiles

    tiles = _probe_tiles(probe, {}, 10**7, 64, 4)
    for domain, rows in (("a", [1, 3, 5, 7]), ("b", [0, 2, 4, 6])):
        held = gen.domain_start(tiles, [images[r] for r in rows], bank)
        streamed = profiles[f"domain:{domain}"]
        assert (streamed["chosen"], streamed["ranks"], streamed["label"]) == (
            held["chosen"],
            held["ranks"],
            held["label"],
        )
        assert np.array_equal(np.asarray(streamed["errors"]), np.asarray(held["errors"]))
    uniform = prepare_references(
        refs, "realdgen", ckpt, {}, 10**7, "cpu", {**start, "ref_weighting": "uniform"}
    )
    held = gen.domain_start(tiles, [images[r] for r in [1, 3, 5, 7]], bank, ref_weighting="uniform")
    assert np.array_equal(np.asarray(uniform[3]["domain:a"]["errors"]), np.asarray(held["errors"]))
    with pytest.raises(ValueError, match="ref_probe_embeddings"):
        gen.domain_start(tiles, None, bank, ref_embeddings=torch.from_numpy(emb[:2]))
