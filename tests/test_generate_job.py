"""The generation job end to end on a local Ray: contract, determinism, bad inputs, resume, S3."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.generate_dataset import JobFailed, main, run
from pipelines.manifest import parse_manifest
from pipelines.storage import read_parquet

REPO = Path(__file__).resolve().parent.parent
DEMO_CKPT = REPO / "checkpoints" / "realdgen-small-x4.safetensors"
VALIDATOR = REPO.parent / "shared" / "checks" / "validate_shards.py"
if not VALIDATOR.exists():
    VALIDATOR = Path("/work/shared/checks/validate_shards.py")


def validate(uri: str, *extra: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(VALIDATOR), uri, *extra], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def write_inputs(root: Path, photos: dict[str, np.ndarray], size=(72, 104), refs=3) -> tuple[Path, Path]:
    hr, rf = root / "hr", root / "refs"
    hr.mkdir(parents=True, exist_ok=True)
    rf.mkdir(parents=True, exist_ok=True)
    for i, (name, img) in enumerate(sorted(photos.items())):
        h, w = size
        Image.fromarray(np.ascontiguousarray(img[:h, :w])).save(hr / f"{name}.png")
        if i < refs:
            Image.fromarray(np.ascontiguousarray(img[::6, ::6][:24, :24])).save(rf / f"ref_{name}.png")
    return hr, rf


def manifest_dict(hr: str, refs: str, out: str, **patch) -> dict:
    m = {
        "kind": "generate",
        "seed": 7,
        "scale": 2,
        "hr": {"uri": hr},
        "refs": [{"name": "cam", "domain": "phone", "source": {"uri": refs}}],
        "generator": {"kind": "realesrgan"},
        "tiling": {"tile": 16, "mode": "grid", "max_tiles_per_image": 2},
        "output": {"uri": out, "name": "pairs", "inputs_per_shard": 2},
        "compute": {"batch_size": 3, "actor_num_cpus": 0.5, "task_num_cpus": 0.5},
        "progress": {"bar": False},
    }
    for key, value in patch.items():
        node = m
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return m


def run_dict(data: dict) -> dict:
    return run(parse_manifest(data), log=lambda *_: None)


def dataset_bytes(folder: Path) -> dict[str, bytes]:
    """Every data file of a dataset except the timing-bearing stats and the preview."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.suffix in (".tar", ".parquet") or p.name == "_index.json"
    }


def tar_keys(folder: Path) -> list[str]:
    keys = []
    for p in sorted(folder.glob("*.tar")):
        with tarfile.open(p) as t:
            keys += [n.split(".")[0] for n in t.getnames() if n.endswith(".json")]
    return keys


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("inputs")
    return write_inputs(root, photos)


@pytest.mark.ray
def test_job_writes_a_valid_dataset_and_resumes(ray_local, inputs, tmp_path):
    hr, refs = inputs
    out = tmp_path / "ds"
    data = manifest_dict(str(hr), str(refs), str(out), pairing__mode="round_robin", pairing__refs_per_tile=2)
    summary = run_dict(data)
    # 5 photos x 2 grid tiles x 2 refs
    assert summary["pairs"] == 20 and summary["shards"] == 3 and summary["inputs_failed"] == 0
    validate(str(out), "--scale", "2")
    names = sorted(p.name for p in out.iterdir())
    assert names[:3] == ["_index.json", "_preview.png", "pairs-000000.parquet"]
    index = json.loads((out / "_index.json").read_text())
    assert index["total_samples"] == 20 and index["model_digest"] is None
    # the code that wrote it: one record, this environment's versions, also in each shard's stats
    import importlib.metadata

    import torch
    from PIL import __version__ as pillow_version

    want = {"realdgen": importlib.metadata.version("realdgen"), "torch": torch.__version__}
    want |= {"pillow": pillow_version, "numpy": np.__version__, "python": platform.python_version()}
    assert index["software"] == [want]
    assert all(json.loads(p.read_text())["software"] == want for p in out.glob("*_stats.json"))
    with tarfile.open(out / "pairs-000000.tar") as t:
        members = t.getmembers()
        meta = json.loads(t.extractfile(members[1]).read())
    assert [m.name.split(".", 1)[1] for m in members[:3]] == ["hr.png", "json", "lr.png"]
    assert all(m.mtime == 0 for m in members)
    assert meta["generator"] == "realesrgan" and meta["k"] == 1 and meta["tau"] is None
    assert meta["ref_set"] == "cam" and meta["domain"] == "phone" and meta["ref_source"].endswith(".png")
    assert meta["hr_box"][2] - meta["hr_box"][0] == 32
    # round robin over 3 refs: the two refs of one tile differ
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 20 and all(k.endswith(("_r00", "_r01")) for k in keys)
    source = {}
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    source[m.name.split(".")[0]] = json.loads(t.extractfile(m).read())["ref_source"]
    tiles = {k[: -len("_r00")] for k in keys}
    assert len(tiles) == 10 and all(source[f"{t}_r00"] != source[f"{t}_r01"] for t in tiles)
    assert len(set(source.values())) == 3  # every reference is used

    before = dataset_bytes(out)
    again = run_dict(data)
    assert again["shards_written"] == 0 and again["shards_skipped"] == 3
    assert dataset_bytes(out) == before

    # an incomplete shard (stats missing) is rewritten, byte for byte
    (out / "pairs-000001_stats.json").unlink()
    (out / "pairs-000001.tar").write_bytes(b"partial")
    third = run_dict(data)
    assert third["shards_written"] == 1
    assert dataset_bytes(out) == before


@pytest.mark.ray
def test_identical_bytes_across_actors_and_batch_sizes(ray_local, inputs, tmp_path):
    hr, refs = inputs
    outs = {}
    for name, patch in {
        "a1_b3": {"compute__batch_size": 3},
        "a2_b3": {"compute__batch_size": 3, "compute__actors": {"min": 2, "max": 2}},
        "a1_b1": {"compute__batch_size": 1, "compute__decode_batch_size": 2, "compute__encode_batch_size": 1},
    }.items():
        out = tmp_path / name
        run_dict(manifest_dict(str(hr), str(refs), str(out), generator__kind="bsrgan", **patch))
        outs[name] = dataset_bytes(out)
    assert len(outs["a1_b3"]) == 7  # 3 tars, 3 parquets, the index
    assert outs["a1_b3"] == outs["a2_b3"] == outs["a1_b1"]


@pytest.mark.ray
def test_same_manifest_from_two_checkouts_gives_identical_bytes(ray_local, photos, tmp_path, monkeypatch):
    """Relative paths in a manifest: keys, seeds and every byte must not depend on where it runs."""
    outs = []
    for copy in ("checkout_a", "checkout_b"):
        root = tmp_path / copy
        write_inputs(root / "data", dict(list(photos.items())[:2]), refs=2)
        monkeypatch.chdir(root)
        run_dict(manifest_dict("data/hr", "data/refs", "out", generator__kind="bsrgan"))
        outs.append(dataset_bytes(root / "out"))
    assert len(outs[0]) == 3 and outs[0] == outs[1]  # 1 tar, 1 parquet, the index


@pytest.mark.ray
def test_bad_inputs_get_failure_rows_and_good_ones_land(ray_local, tmp_path):
    from test_sources import write_bad_inputs

    cases = write_bad_inputs(tmp_path / "hr", size=64)
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(refs / "r.png")
    (refs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")  # a bad reference is skipped
    out = tmp_path / "ds"
    data = manifest_dict(
        str(tmp_path / "hr"),
        str(refs),
        str(out),
        generator__kind="bicubic",
        tiling__tile=16,
        limits__max_image_pixels=10_000_000,
        output__inputs_per_shard=4,
    )
    summary = run_dict(data)
    validate(str(out))
    rows = [r for p in sorted(out.glob("*.parquet")) for r in read_parquet(p.read_bytes()).to_pylist()]
    by_name = {Path(r["uri"]).name: r for r in rows if r["row_type"] == "input"}
    assert set(by_name) == set(cases)
    for name, outcome in cases.items():
        row = by_name[name]
        if outcome == "ok":
            assert row["status"] == "ok" and row["samples"] >= 1, row
        else:
            assert row["status"] == "failed" and row["error"].startswith(outcome), (name, row["error"])
    assert "16x16 pixels" not in by_name["tiny.png"]["error"]
    assert by_name["tiny.png"]["error"] == "smaller than one tile: 8x8 < 32x32"
    assert "20000x20000" in by_name["bomb.png"]["error"]
    good = sorted(n for n, o in cases.items() if o == "ok")
    landed = set()
    exif_meta = None
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    landed.add(Path(meta["hr_source"]).name)
                    assert meta["ref_source"].endswith("r.png")
                    if meta["hr_source"].endswith("exif_rot.jpg"):
                        exif_meta = meta
                        hr_png = t.extractfile(t.getmember(m.name.replace(".json", ".hr.png"))).read()
    assert sorted(landed) == good
    # EXIF orientation 6: the stored 80x64 (WxH) photo is 64x80 once rotated; tiles come from that
    assert exif_meta["source_size"] == [64, 80]
    from test_sources import gradient

    x0, y0, x1, y1 = exif_meta["hr_box"]
    expected = np.rot90(gradient(64, 80), k=-1)[y0:y1, x0:x1]
    got = np.asarray(Image.open(io.BytesIO(hr_png)))
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 8
    stats = json.loads((out / "pairs-000000_stats.json").read_text())
    assert sum(stats["errors"].values()) == stats["inputs_failed"] >= 1
    assert summary["inputs_failed"] == sum(o != "ok" for o in cases.values())
    # the reference that did not decode is named in the index, and stays named when a rerun over
    # the complete dataset does not read the references again
    index = json.loads((out / "_index.json").read_text())
    assert index["references_skipped"]["count"] == 1, index
    assert index["references_skipped"]["first"][0].startswith(f"{refs / 'broken.png'}: "), index
    assert summary["references_skipped"] == 1  # and in the summary (the done: line says so)
    run_dict(data)
    assert json.loads((out / "_index.json").read_text())["references_skipped"] == index["references_skipped"]


@pytest.mark.ray
def test_failure_budget_fails_loudly(ray_local, tmp_path, capsys):
    hr = tmp_path / "hr"
    hr.mkdir()
    for i in range(3):
        (hr / f"bad{i}.png").write_bytes(b"garbage")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(hr / "good.png")
    out = tmp_path / "ds"
    data = manifest_dict(
        str(hr),
        str(hr),
        str(out),
        generator__kind="bicubic",
        limits__max_failure_fraction=0.25,
        output__inputs_per_shard=1,
    )
    data["refs"] = []
    # the error names the inputs that failed and why (no shard was written to look them up in)
    bad = r"hr/bad\d\.png: not an image"
    with pytest.raises(
        JobFailed, match=rf"failure budget exceeded: [23] of 4 inputs failed .*First failures: .*{bad}"
    ):
        run_dict(data)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(data))
    assert main([str(p)]) == 1
    assert "failure budget exceeded" in capsys.readouterr().err
    assert not (out / "_index.json").exists()
    # what the stopped job leaves is whole: every shard that has a tar has its completion marker
    # (compactions in flight when the budget tripped are waited for), and no temporary file
    tars = {p.name.removesuffix(".tar") for p in out.glob("*.tar")}
    assert tars == {p.name.removesuffix("_stats.json") for p in out.glob("*_stats.json")}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    # complete under a looser budget, then rerun under a stricter one: nothing left to generate,
    # the kept shards' failures pass it, and the index is not rewritten (it was, before the check)
    data["limits"]["max_failure_fraction"] = 0.9
    assert main([str(p), "--set", "limits.max_failure_fraction=0.9"]) == 0
    err = capsys.readouterr().err
    # every failure is listed, this run's and those of the shards the first run completed (read
    # back from their parquet files), so no line has to point elsewhere
    listed = re.findall(rf"^failed: .*{bad}", err, flags=re.M)
    assert len(listed) == 3 and len(set(listed)) == 3, err
    assert "every failure, by reason: realdgen inspect" not in err, err
    (out / "_index.json").unlink()
    for n in out.glob("pairs-*"):
        n.unlink()
    summary = run_dict(data)
    assert summary["inputs_failed"] == 3 and len(summary["failure_examples"]) == 3
    index = (out / "_index.json").read_bytes()
    (out / "_index.json").unlink()
    data["limits"]["max_failure_fraction"] = 0.25
    with pytest.raises(JobFailed, match="failure budget exceeded: 3 of 4"):
        run_dict(data)
    assert not (out / "_index.json").exists() and index


def test_bad_manifests_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    hr = tmp_path / "hr"
    hr.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(hr / "a.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    # the demo checkpoint less one tensor, and a pickle: refused in preflight, not in a Ray task
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(DEMO_CKPT), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lr_reconstructor.conv_out.weight"}
    assert len(tensors) > 10
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=meta)
    torch.save({"w": torch.zeros(2)}, tmp_path / "pickled.safetensors")
    cases = {
        "ckpt_tensor": (
            {
                "scale": 4,
                "generator": {"kind": "realdgen", "checkpoint": str(tmp_path / "short.safetensors")},
            },
            "missing tensor 'lr_reconstructor.conv_out.weight'",
        ),
        "ckpt_pickle": (
            {
                "scale": 4,
                "generator": {"kind": "realdgen", "checkpoint": str(tmp_path / "pickled.safetensors")},
            },
            "torch.save",
        ),
        "scale": ({"scale": 3}, "scale: Input should be 2 or 4"),
        "out_in_hr": ({"output": {"uri": str(hr / "ds")}}, "output.uri: "),
        "out_no_bucket": ({"output": {"uri": "s3://"}}, "output.uri: s3 URI lacks a bucket"),
        "endpoint_userinfo": (
            {"storage": {"endpoint_url": "http://me:hunter2@127.0.0.1:9000"}},
            "must not hold credentials",
        ),
        "endpoint_query": (
            {"storage": {"endpoint_url": "http://127.0.0.1:9000/?X-Amz-Security-Token=hunter2"}},
            "storage.endpoint_url: must not hold credentials or anything else after '?' or '#'",
        ),
        "endpoint_typo": (
            {"storage": {"endpoint_url": "http://127.0.0.1:9O00"}},
            "storage.endpoint_url: is not a URL of the form http(s)://host[:port]",
        ),
        # a check of the whole manifest does not echo it (its storage section with it)
        "whole_manifest": (
            {
                "storage": {"endpoint_url": "http://127.0.0.1:9/hunter2"},
                "refs": [],
                "generator": {"kind": "realdgen", "checkpoint": str(DEMO_CKPT)},
            },
            "needs at least one reference set in `refs`\n",
        ),
        "storage_key": (
            {"storage": {"key": "AKIAEXAMPLE"}},
            "storage.key: credentials must not be in a manifest",
        ),
        "unknown": ({"tiling": {"tile": 16, "grid": True}}, "tiling.grid: unknown key"),
        "type": ({"output": {"uri": str(out), "inputs_per_shard": "many"}}, "output.inputs_per_shard"),
        "bounds": (
            {"generator": {"kind": "bicubic", "k": 0}},
            "generator.k: Input should be greater than or equal to 1",
        ),
        "missing_hr": ({"hr": {"uri": str(tmp_path / "nope")}}, f"hr.uri: not found: {tmp_path / 'nope'}\n"),
        "file_hr": (
            {"hr": {"uri": str(empty / "notes.txt")}},
            f"hr.uri: '{empty / 'notes.txt'}' is a file, not a folder",
        ),
        "empty_hr": ({"hr": {"uri": str(empty)}}, "hr.uri: no images found"),
        "missing_ckpt": (
            {"generator": {"kind": "realdgen", "checkpoint": str(tmp_path / "x.safetensors")}},
            "generator.checkpoint: file not found",
        ),
        # a relative path is read from the current folder: the message says which one
        "relative_ckpt": (
            {"generator": {"kind": "realdgen", "checkpoint": "nowhere/x.safetensors"}},
            f"file not found (got 'nowhere/x.safetensors', relative to the current folder {os.getcwd()})",
        ),
        "empty_bank": (
            {"scale": 4, "generator": {"kind": "realdgen", "checkpoint": str(DEMO_CKPT), "start_bank": []}},
            "generator.start_bank: ValueError: the start bank is empty",
        ),
        "bank_scale": (
            {
                "scale": 4,
                "generator": {
                    "kind": "realdgen",
                    "checkpoint": str(DEMO_CKPT),
                    "start_bank": [{"version": 1, "kind": "domain", "scale": 2, "ops": []}],
                },
            },
            "start bank entry 0 is not a 'domain' θ of scale 4",
        ),
        "out_is_a_file": ({"output": {"uri": str(tmp_path / "a_file")}}, "a_file' is a file, not a folder"),
        "out_under_a_file": (
            {"output": {"uri": str(tmp_path / "a_file" / "ds")}},
            "a_file/ds' lies under '" + str(tmp_path / "a_file") + "', which is a file",
        ),
        # the demo inputs are written at the manifest's scale: not before the checkpoint is checked
        "demo_scale": (
            {
                "scale": 2,
                "demo_inputs": str(tmp_path / "demo"),
                "generator": {"kind": "realdgen", "checkpoint": str(DEMO_CKPT)},
            },
            "the checkpoint is x4",
        ),
        # the demo checkpoint's UNet was trained on t < 500: τ 500 is past it
        "tau_untrained": (
            {"scale": 4, "generator": {"kind": "realdgen", "checkpoint": str(DEMO_CKPT), "tau_max": 500}},
            "generator.tau_max: 500 is past what the checkpoint's UNet was trained on",
        ),
    }
    (tmp_path / "a_file").write_text("not a folder")
    for name, (patch, needle) in cases.items():
        data = {**manifest_dict(str(hr), str(hr), str(out)), **patch}
        p = tmp_path / f"m_{name}.yaml"
        p.write_text(yaml.safe_dump(data))
        assert main([str(p)]) == 2, name
        err = capsys.readouterr().err
        assert needle in err, (name, err)
        assert not out.exists(), name
        assert "hunter2" not in err and "AKIAEXAMPLE" not in err, (name, err)
    assert not (hr / "ds").exists() and not (tmp_path / "demo").exists()


@pytest.mark.skipif(
    __import__("torch").cuda.is_available() or bool(os.environ.get("RAY_ADDRESS")),
    reason="needs a machine without a CUDA GPU, and the job's own Ray",
)
def test_cuda_on_the_jobs_own_ray_without_a_gpu_is_refused_not_waited_on(tmp_path, capsys, photos, ray_local):
    """compute.device cuda with a Ray this process started and no GPU: every GPU task would wait
    forever (the job printed its plan and hung). Refused once Ray is up, before the lock or any
    output. The session's Ray (started by ray.init here, as a caller's own would be) counts too."""
    from pipelines.generate_dataset import main

    hr, refs = write_inputs(tmp_path, photos)
    out = tmp_path / "out"
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(out), compute__device="cuda")))
    assert main([str(p)]) == 1
    err = capsys.readouterr().err
    assert "compute.device: 'cuda', but the Ray this job started here has no GPU" in err, err
    assert not out.exists()


def test_references_that_all_fail_to_decode_stop_the_job_and_leave_no_work_folder(tmp_path, capsys, photos):
    from pipelines.generate_dataset import main

    hr, refs = write_inputs(tmp_path, photos)
    for p in refs.iterdir():
        p.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "out"
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(out))))
    assert main([str(p)]) == 1
    err = capsys.readouterr().err
    assert "error: no usable reference: every reference image failed to decode" in err, err
    assert "reference skipped:" in err
    assert not out.exists() or not any(out.iterdir()), sorted(x.name for x in out.iterdir())


def test_more_shards_than_six_digit_names_allow_is_refused(tmp_path, capsys, monkeypatch, photos):
    """Past NAME-999999 the shard names would break the output contract: refused in the listing."""
    from pipelines.generate import plan as plan_mod

    hr, refs = write_inputs(tmp_path, photos)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(tmp_path / "out"))))
    monkeypatch.setattr(plan_mod, "MAX_SHARDS", 2)  # 5 inputs, 1 per shard: 5 shards > 2
    assert main([str(p), "--dry-run", "--set", "output.inputs_per_shard=1"]) == 2
    err = capsys.readouterr().err
    assert "5 inputs make 5 shards, more than the 2" in err and "raise it to at least 3" in err, err
    assert main([str(p), "--dry-run", "--set", "output.inputs_per_shard=3"]) == 0


def test_dry_run_and_schema(tmp_path, capsys, photos):
    hr, refs = write_inputs(tmp_path, photos)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(tmp_path / "out"))))
    assert main([str(p), "--dry-run", "--set", "output.inputs_per_shard=4"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["inputs"] == 5 and plan["references"] == 3 and plan["shards"] == 2 and plan["max_pairs"] == 10
    assert not (tmp_path / "out").exists()
    assert main(["--print-schema"]) == 0
    assert "GenerateManifest" in capsys.readouterr().out


@pytest.mark.ray
def test_changed_input_listing_is_not_resumed_into(ray_local, photos, tmp_path, capsys):
    """One input added under hr.uri moves every later input to another shard: the old shards are not
    kept as complete (that would drop or repeat inputs); the job refuses, and overwrite regenerates."""
    hr, refs = write_inputs(tmp_path / "in", dict(sorted(photos.items())[:3]))
    out = tmp_path / "ds"
    data = manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic")
    first = run_dict(data)
    assert first["inputs"] == 3 and first["shards"] == 2
    assert first["output"] == str(out)  # local outputs: the absolute path
    # --dry-run judges the output as the run does: complete for this manifest, foreign for another
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(data))
    for extra, complete, conflict in (
        ((), 2, None),
        (
            ("--set", "seed=1"),
            0,
            "(here: manifest (seed: 7 → 1); e.g. ['_index.json', 'pairs-000000_stats.json'",
        ),
        (("--set", "seed=1", "--set", "output.mode=overwrite"), 0, "the run would delete them"),
    ):
        assert main([str(mpath), "--dry-run", *extra]) == 0
        plan_out = json.loads(capsys.readouterr().out)
        assert plan_out["shards_complete"] == complete, extra
        assert (
            (plan_out["output_conflict"] is None)
            if conflict is None
            else conflict in plan_out["output_conflict"]
        )
    assert plan_out["actors"] == {"min": 1, "max": None}  # no max: the GPUs the run finds at its start
    index = json.loads((out / "_index.json").read_text())
    assert index["inputs_digest"].startswith("listing2:sha256:")
    stats = json.loads((out / "pairs-000000_stats.json").read_text())
    assert stats["inputs_digest"] == index["inputs_digest"]
    # an interrupted run of the old listing left a part behind in the work folder
    from pipelines.generate.plan import make_plan

    work = out / make_plan(parse_manifest(data), list_now=False).work
    stale = work / "parts" / "pairs-000000" / "part-stale.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"from the old listing")
    name, img = sorted(photos.items())[3]
    Image.fromarray(np.ascontiguousarray(img[:72, :104])).save(hr / f"{name}.png")  # sorts among them
    with pytest.raises(JobFailed, match=r"input listing \(files added, removed or renamed under hr.uri"):
        run_dict(data)
    assert not stale.exists()  # the refusal cleared the work folder before anything ran
    data["output"]["mode"] = "overwrite"
    again = run_dict(data)
    assert again["inputs"] == 4 and again["shards_written"] == 2 and again["shards_skipped"] == 0
    validate(str(out), "--scale", "2")
    assert len(tar_keys(out)) == 8
    assert json.loads((out / "_index.json").read_text())["inputs_digest"] != index["inputs_digest"]
    # a dataset from before inputs_digest existed is not resumed into either, and the error says so
    old = json.loads((out / "pairs-000000_stats.json").read_text())
    del old["inputs_digest"]
    (out / "pairs-000000_stats.json").write_text(json.dumps(old))
    data["output"]["mode"] = "resume"
    with pytest.raises(JobFailed, match="not recorded: written before inputs_digest existed"):
        run_dict(data)
    # ... nor one whose digest covered the inputs only (before the references were in it)
    old["inputs_digest"] = "sha256:" + "0" * 64
    (out / "pairs-000000_stats.json").write_text(json.dumps(old))
    with pytest.raises(JobFailed, match="recorded without the references"):
        run_dict(data)
    data["output"]["mode"] = "overwrite"
    run_dict(data)
    data["output"]["mode"] = "resume"
    before = dataset_bytes(out)
    # a reference added changes every later pairing: refused as another listing
    extra = Image.open(sorted(refs.iterdir())[0])
    extra.save(refs / "zz_added.png")
    with pytest.raises(JobFailed, match="input listing"):
        run_dict(data)
    (refs / "zz_added.png").unlink()
    # an incomplete shard with a part an interrupted run left (another model, or an image since
    # replaced at the same URI): the part is dropped and the shard regenerated, byte for byte
    (out / "pairs-000001_stats.json").unlink()
    stale = work / "parts" / "pairs-000001" / "part-stale.parquet"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a parquet file: an earlier run's part")
    again = run_dict(data)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 1
    assert dataset_bytes(out) == before and not stale.exists()
    # a shard whose tar is gone but whose stats remain is not complete: generated again, byte for byte
    (out / "pairs-000000.tar").unlink()
    again = run_dict(data)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 1
    assert dataset_bytes(out) == before


@pytest.mark.ray
def test_a_reference_that_stops_decoding_is_not_resumed_into(ray_local, photos, tmp_path):
    """Same listing, but a reference that decoded when the complete shards were written fails now: the
    remaining tiles would be paired over another reference list, so the job refuses before generating;
    with the reference readable again it resumes, byte for byte."""
    hr, refs = write_inputs(tmp_path / "in", dict(sorted(photos.items())[:3]))
    out = tmp_path / "ds"
    data = manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic", pairing__mode="round_robin")
    assert run_dict(data)["shards"] == 2
    before = dataset_bytes(out)
    stats = [json.loads((out / f"pairs-00000{i}_stats.json").read_text()) for i in (0, 1)]
    assert stats[0]["references_digest"].startswith("refs2:sha256:")
    assert stats[0]["references_digest"] == stats[1]["references_digest"]
    ref = sorted(refs.iterdir())[1]
    good = ref.read_bytes()
    # replaced by another picture under the same name (it decodes): refused as well
    other = sorted(refs.iterdir())[0].read_bytes()
    assert len(other) != len(good)
    ref.write_bytes(other)
    (out / "pairs-000001_stats.json").unlink()
    with pytest.raises(JobFailed, match=r"references that decode differ .*3 of 3 decode now.*same name"):
        run_dict(data)
    ref.write_bytes(good)
    assert run_dict(data)["shards_written"] == 1 and dataset_bytes(out) == before
    ref.write_bytes(b"not an image any more")  # same name: the listing digest does not change
    (out / "pairs-000001_stats.json").unlink()  # one shard left to write
    with pytest.raises(JobFailed, match=r"references that decode differ .*pairs-000000\): 2 of 3 decode now"):
        run_dict(data)
    ref.write_bytes(good)
    again = run_dict(data)
    assert again["shards_written"] == 1 and again["shards_skipped"] == 1
    assert dataset_bytes(out) == before
    # overwrite, as the refusal suggests, regenerates every shard over the references that decode now
    # (before, it kept the complete shards and refused again, whatever the mode)
    ref.write_bytes(b"not an image any more")
    (out / "pairs-000001_stats.json").unlink()
    over = {**data, "output": {**data["output"], "mode": "overwrite"}}
    assert run_dict(over)["shards_written"] == 2
    validate(str(out))
    now = {json.loads((out / f"pairs-00000{i}_stats.json").read_text())["references_digest"] for i in (0, 1)}
    assert len(now) == 1 and now != {stats[0]["references_digest"]}
    ref.write_bytes(good)
    (out / "pairs-000001_stats.json").unlink()  # (a complete dataset is not read again at all)
    assert run_dict(over)["shards_written"] == 2 and dataset_bytes(out) == before


@pytest.mark.ray
def test_a_temp_file_a_killed_writer_left_is_gone_when_the_job_ends(ray_local, photos, tmp_path, monkeypatch):
    """A compaction killed mid-write leaves its temp tar (its retry wrote under another temp name);
    the job removes it once no writer runs, not only at the next run's start."""
    from pipelines.generate.job import GenerateJob

    hr, refs = write_inputs(tmp_path / "in", dict(sorted(photos.items())[:2]))
    out = tmp_path / "ds"
    write_index = GenerateJob.write_index

    def after_a_killed_writer(self, *args, **kw):
        (out / ".pairs-000000.tar.0123abcd.tmp").write_bytes(b"part of a tar")
        return write_index(self, *args, **kw)

    monkeypatch.setattr(GenerateJob, "write_index", after_a_killed_writer)
    run_dict(manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic"))
    assert (out / "_index.json").exists() and not list(out.glob(".*.tmp"))


@pytest.mark.ray
def test_foreign_output_refused_and_lock_respected(ray_local, inputs, tmp_path):
    from pipelines.storage import LOCK_NAME

    hr, refs = inputs
    out = tmp_path / "ds"
    data = manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic", output__inputs_per_shard=5)
    run_dict(data)
    other = manifest_dict(
        str(hr), str(refs), str(out), generator__kind="bicubic", seed=8, output__inputs_per_shard=5
    )
    with pytest.raises(JobFailed, match="different manifest") as info:
        run_dict(other)
    # the keys that changed, from the finished dataset's _index.json (the digested manifest)
    assert "(here: manifest (seed: 7 → 8); e.g." in str(info.value), info.value
    assert str(info.value).endswith(
        "a default that another RealDGen version sets otherwise: finish such "
        "a dataset with the version that started it"
    )
    other["output"]["mode"] = "overwrite"
    run_dict(other)
    validate(str(out))
    other["output"]["mode"] = "resume"
    # an interrupted run (no index yet): each shard's stats keep the settings, so the keys are named
    (out / "_index.json").unlink()
    stats_files = {f: f.read_text() for f in sorted(out.glob("*_stats.json"))}
    assert json.loads(next(iter(stats_files.values())))["manifest"]["seed"] == 8
    with pytest.raises(JobFailed, match=r"\(here: manifest \(seed: 8 → 7\); e\.g\."):
        run_dict(data)
    # written by another RealDGen version: the same settings under another digest (a default that
    # changed, a key no longer counted), or none recorded: said so, not "the manifest changed"
    for f, text in stats_files.items():
        meta = json.loads(text)
        meta["manifest_digest"] = "sha256:" + "1" * 64
        f.write_text(json.dumps(meta))
    with pytest.raises(JobFailed, match=r"here: manifest digest \(the same settings, digested by another"):
        run_dict(other)
    for f in stats_files:
        meta = json.loads(f.read_text())
        del meta["manifest"]
        f.write_text(json.dumps(meta))
    with pytest.raises(JobFailed, match=r"here: manifest \(its settings are not recorded: written before"):
        run_dict(other)
    # stats from before they kept the settings, an index that keeps them: the keys, said once
    index = out / "_index.json"
    kept = json.loads(next(iter(stats_files.values())))
    recorded = {**kept["manifest"], "seed": 3}
    index.write_text(json.dumps({**kept, "manifest_digest": "sha256:" + "2" * 64, "manifest": recorded}))
    with pytest.raises(JobFailed, match=r"here: manifest \(seed: 3 → 8\); e\.g\.") as info:
        run_dict(other)
    assert "not recorded" not in str(info.value), info.value
    index.unlink()
    for f, text in stats_files.items():
        f.write_text(text)
    # a live lock (this very process, fresh heartbeat) refuses a second writer ...
    import socket
    import time

    lock = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "x", "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(lock))
    with pytest.raises(JobFailed, match="another live job"):
        run_dict(other)
    # ... a dead one (no such pid) is taken over
    lock["pid"] = 2**22 + 12345
    (out / LOCK_NAME).write_text(json.dumps(lock))
    assert run_dict(other)["shards_skipped"] == 1
    assert not (out / LOCK_NAME).exists()


def test_driver_endpoint_travels_to_the_workers(tmp_path, monkeypatch):
    """AWS_ENDPOINT_URL set only on the driver reaches the workers' storage options (before, a worker
    without it went to AWS); the manifest's endpoint wins; one holding user:password@ never travels."""
    from pipelines.generate.job import GenerateJob

    data = manifest_dict(str(tmp_path), str(tmp_path), str(tmp_path / "out"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert GenerateJob(parse_manifest(data)).storage == {"endpoint_url": "http://127.0.0.1:9"}
    data["storage"] = {"endpoint_url": "http://127.0.0.1:10"}
    assert GenerateJob(parse_manifest(data)).storage == {"endpoint_url": "http://127.0.0.1:10"}
    del data["storage"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://me:pw@127.0.0.1:9")
    assert GenerateJob(parse_manifest(data)).storage == {}


def test_colliding_40_bit_keys_get_64_bits(tmp_path, monkeypatch):
    """Two inputs named alike whose 40-bit keys collide (found by search: sha256 of these two URIs
    shares its first 10 hex chars) are both planned; the later one in URI order gets 16 hex chars."""
    import hashlib

    from pipelines.generate.plan import list_plan

    uris = ["hr/1205117/image.png", "hr/2493894/image.png"]
    digests = [hashlib.sha256(u.encode()).hexdigest() for u in uris]
    assert digests[0][:10] == digests[1][:10] and digests[0][:16] != digests[1][:16]
    monkeypatch.chdir(tmp_path)
    for u in [*uris, "refs/r.png"]:
        Path(u).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(u)
    m = parse_manifest(manifest_dict("hr", "refs", "out", generator__kind="bicubic"))
    summary = list_plan(m, store_uri="out", storage={}, use_ray=False)
    assert summary.error is None and summary.n_inputs == 2
    rows = [r for b in summary.blocks for r in read_parquet(Path("out", b["name"]).read_bytes()).to_pylist()]
    keys = {r["uri"]: r["key"] for r in rows}
    assert keys == {uris[0]: f"image_{digests[0][:10]}", uris[1]: f"image_{digests[1][:16]}"}


def test_preview_reads_the_first_whole_samples_even_when_members_are_not_adjacent(tmp_path):
    """The preview streams a shard: it takes samples as they become whole and stops after n."""
    from types import SimpleNamespace

    from pipelines.generate.job import GenerateJob
    from pipelines.storage import DatasetStore

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in ("a", "b"):
            member(tar, f"{key}.hr.png", f"{key}-hr".encode())
        for key in ("a", "b", "c"):
            member(tar, f"{key}.lr.png", f"{key}-lr".encode())
            member(tar, f"{key}.json", json.dumps({"ref_source": f"ref-{key}"}).encode())
        member(tar, "c.hr.png", b"c-hr")
    store = DatasetStore(str(tmp_path))
    store.write_bytes("p-000000.tar", buf.getvalue())
    job = SimpleNamespace(store=store)
    rows = GenerateJob.preview_rows(job, SimpleNamespace(stems=["p-000000"]), 2)
    assert [(r["hr_png"], r["lr_png"], r["ref_source"]) for r in rows] == [
        (b"a-hr", b"a-lr", "ref-a"),
        (b"b-hr", b"b-lr", "ref-b"),
    ]
    assert len(GenerateJob.preview_rows(job, SimpleNamespace(stems=["p-000000"]), 5)) == 3


def test_preview_and_references_read_with_the_jobs_limits(tmp_path):
    """A kept shard is as trusted as the output prefix, a reference as its folder: the preview skips
    unsafe members and refuses a PNG over limits.max_image_pixels from its header (a 17 KB bomb
    took 6 GB in the driver); references and probe inputs obey limits.max_file_bytes."""
    from types import SimpleNamespace

    from test_sources import bomb_png

    from pipelines.generate.job import GenerateJob
    from pipelines.generate.references import prepare_references
    from pipelines.storage import DatasetStore
    from realdgen_core.shards import encode_png

    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    hr, lr = np.full((32, 32, 3), 200, np.uint8), np.full((8, 8, 3), 50, np.uint8)
    # the reference panel: the centre 8x8 of a 20x24 reference, magnified 4x like the LR
    ref_img = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    ref_path = tmp_path / "ref.png"
    Image.fromarray(ref_img).save(ref_path)
    meta = json.dumps({"ref_source": str(ref_path)}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        member(tar, "../x.hr.png", encode_png(hr))  # never read
        for key, hr_png in (("a", bomb_png(12000, 12000)), ("b", encode_png(hr))):
            member(tar, f"{key}.hr.png", hr_png)
            member(tar, f"{key}.json", meta)
            member(tar, f"{key}.lr.png", encode_png(lr))
    store = DatasetStore(str(tmp_path / "ds"))
    store.write_bytes("p-000000.tar", buf.getvalue())
    logged: list[str] = []
    limits = SimpleNamespace(max_image_pixels=10**6, max_file_bytes=10**6)
    plan = SimpleNamespace(refs=[{"uri": str(ref_path), "path": str(ref_path)}])
    job = SimpleNamespace(
        store=store, m=SimpleNamespace(limits=limits), log=logged.append, storage={}, plan=plan
    )
    rows = GenerateJob.preview_rows(job, SimpleNamespace(stems=["p-000000"]), 4)
    assert len(rows) == 2
    assert GenerateJob.write_preview(job, rows) is True
    assert len(logged) == 1 and "12000x12000 = 144000000 pixels > limit 1000000" in logged[0]
    from pipelines.generate.job import PREVIEW_HEADER_PX as head

    grid = np.asarray(Image.open(tmp_path / "ds" / "_preview.png"))
    assert grid.shape == (head + 32, 32 * 3 + 8, 3)  # the labels, then one row: HR | reference | LR
    assert (grid[:head] < 128).any() and (grid[:head] == 255).mean() > 0.5  # dark text on white
    grid = grid[head:]
    assert np.array_equal(grid[:, 36:68], ref_img[6:14, 8:16].repeat(4, 0).repeat(4, 1))
    assert np.array_equal(grid[:, 72:], np.full((32, 32, 3), 50, np.uint8))
    assert GenerateJob.write_preview(job, rows[:1]) is False

    refs_dir = tmp_path / "refs"
    refs_dir.mkdir()
    Image.fromarray(lr).save(refs_dir / "small.png")
    (refs_dir / "padded.png").write_bytes((refs_dir / "small.png").read_bytes() + bytes(5000))
    refs = [{"uri": str(p), "path": str(p), "set": "r", "domain": None} for p in sorted(refs_dir.iterdir())]
    ok, errors, _, _, cropped = prepare_references(refs, "bicubic", None, {}, 10**7, "cpu", max_bytes=4000)
    assert [refs[i]["uri"] for i in ok] == [str(refs_dir / "small.png")]
    assert len(errors) == 1 and re.search(r"padded.png: file too large: \d+ bytes > limit 4000", errors[0])
    # the synthetic kinds only pair with the references: an 8x8 one (the minimum for E_deg) or a
    # 1x1 one is used whole
    Image.fromarray(lr[:1, :1]).save(refs_dir / "tiny.png")
    refs.append(
        {"uri": str(refs_dir / "tiny.png"), "path": str(refs_dir / "tiny.png"), "set": "r", "domain": None}
    )
    ok, errors, _, _, cropped = prepare_references(refs, "bicubic", None, {}, 10**7, "cpu", max_bytes=4000)
    assert [refs[i]["uri"] for i in ok] == [str(refs_dir / "small.png"), str(refs_dir / "tiny.png")]
    assert len(errors) == 1 and cropped == []


def test_ray_giving_up_keeps_its_traceback_and_ends_with_what_to_do(tmp_path, capsys, monkeypatch, photos):
    """Ray's own failure (a node lost past its retries): its traceback, then one line saying the
    complete shards are kept and how to resume, exit 1; an error of ours is not dressed up as Ray's."""
    import ray.exceptions

    from pipelines import generate_dataset

    hr, refs = write_inputs(tmp_path, photos)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(tmp_path / "out"))))

    def lost(self, plan=None):
        raise ray.exceptions.RayError("node 2 died and its objects could not be rebuilt")

    monkeypatch.setattr(generate_dataset.GenerateJob, "run", lost)
    monkeypatch.setattr(generate_dataset, "ensure_ray", lambda: False)  # no Ray needed here
    assert main([str(p)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):" and "node 2 died" in "\n".join(lines)
    assert lines[-1].startswith("error: Ray gave up on the job's work (RayError; above); complete shards in ")
    assert lines[-1].endswith("if a node was lost, run the same command again to resume")

    def ours(self, plan=None):
        raise ValueError("a bug")

    monkeypatch.setattr(generate_dataset.GenerateJob, "run", ours)
    with pytest.raises(ValueError, match="a bug"):
        main([str(p)])


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch, photos):
    """Ctrl-C during the run: one line saying the complete shards are kept, exit 130 (no traceback)."""
    from pipelines import generate_dataset

    hr, refs = write_inputs(tmp_path, photos)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(tmp_path / "out"))))

    def interrupted(self, plan=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_dataset.GenerateJob, "run", interrupted)
    monkeypatch.setattr(generate_dataset, "ensure_ray", lambda: False)  # no Ray needed here
    assert main([str(p)]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted: complete shards in ") and "run the same command again" in err, err
    # Ctrl-C pressed again while the Ray this run started shuts down: out at once with 130 (it was
    # a traceback); the process exit is stood in for here
    import signal

    import ray

    class Left(Exception):
        pass

    exits = []

    def exit_now(code):
        exits.append(code)
        raise Left

    def impatient_shutdown():
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, a real signal

    monkeypatch.setattr(generate_dataset, "ensure_ray", lambda: True)
    monkeypatch.setattr(generate_dataset, "_exit_now", exit_now)
    monkeypatch.setattr(ray, "shutdown", impatient_shutdown)
    try:
        with pytest.raises(Left):
            main([str(p)])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a real exit would not come back
    assert exits == [130]
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.endswith("interrupted again: leaving now\n"), err


def test_a_live_lock_here_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch, photos):
    """A second job into an output a live job on this host writes is refused at once, not after the
    seconds a local Ray takes to start."""
    import socket
    import time

    from pipelines import generate_dataset
    from pipelines.storage import LOCK_NAME

    hr, refs = write_inputs(tmp_path, photos)
    out = tmp_path / "out"
    out.mkdir()
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(out))))
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": "x", "heartbeat": time.time()}
    (out / LOCK_NAME).write_text(json.dumps(lock))

    def no_ray():
        raise AssertionError("Ray was started for a job that is refused")

    monkeypatch.setattr(generate_dataset, "ensure_ray", no_ray)
    assert main([str(p)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {out} is being written by another live job") and f"pid {os.getpid()}" in err
    ), err
    assert json.loads((out / LOCK_NAME).read_text()) == lock  # left as it was


def test_the_plan_says_where_tau_and_the_start_come_from(tmp_path, capsys, photos):
    """A checkpoint without a domain calibration (an adaptation interrupted before it calibrated)
    silently meant the paper's τ ≤ 300 and Real-ESRGAN starts: the dry run and the job's log say so."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    hr, refs = write_inputs(tmp_path, photos)
    with safe_open(str(DEMO_CKPT), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    inner = json.loads(meta["metadata"])
    assert "calibration" in inner
    bare = tmp_path / "bare.safetensors"
    inner.pop("calibration")
    save_file(tensors, str(bare), metadata={**meta, "metadata": json.dumps(inner)})
    p = tmp_path / "m.yaml"
    data = manifest_dict(str(hr), str(refs), str(tmp_path / "out"), scale=4)
    data["generator"] = {"kind": "realdgen", "checkpoint": str(DEMO_CKPT)}
    p.write_text(yaml.safe_dump(data))
    notes = {}
    for name, extra in {
        "calibrated": ["--set", "refs.0.domain=camera-standin"],
        "bare": ["--set", f"generator.checkpoint={bare}"],
        "off": ["--set", "generator.calibration=off"],
        "other domain": [],  # manifest_dict's references are 'phone'
    }.items():
        assert main([str(p), "--dry-run", *extra]) == 0
        notes[name] = json.loads(capsys.readouterr().out)["generator_settings"]
    assert notes["calibrated"] == (
        "domain calibration 'camera-standin' from the checkpoint: τ 0..0, start domain (49-entry bank)"
    )
    assert notes["bare"].startswith(
        "the checkpoint carries no domain calibration, so the paper's settings: τ 0..300"
    )
    assert notes["off"] == "domain calibration off (generator.calibration): τ 0..300, start realesrgan"
    # the calibration's τ belongs to its own domain: a job over another domain is told so
    assert notes["other domain"].startswith(
        notes["calibrated"] + "; it was calibrated for 'camera-standin', "
    )
    assert "this job's references are labelled 'phone': unless they are" in notes["other domain"]


def test_sigterm_is_one_line_and_exit_143(tmp_path, capsys, monkeypatch, photos):
    """`ray job stop` sends SIGTERM: the same unwinding as Ctrl-C (job.run's finally releases the
    lock) and one line saying so, exit 128 + 15; the process's own handler is back afterwards."""
    import os
    import signal
    import time

    from pipelines import generate_dataset

    hr, refs = write_inputs(tmp_path, photos)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(manifest_dict(str(hr), str(refs), str(tmp_path / "out"))))
    unwound = []

    def terminated(self, plan=None):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        finally:
            unwound.append(True)
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(generate_dataset.GenerateJob, "run", terminated)
    monkeypatch.setattr(generate_dataset, "ensure_ray", lambda: False)  # no Ray needed here
    assert main([str(p)]) == 143
    err = capsys.readouterr().err
    assert err.startswith("interrupted (SIGTERM, e.g. `ray job stop`): complete shards in ") and unwound, err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_relative_output_in_rays_working_dir_copy_is_warned_about():
    """Under `ray job submit --working-dir .` the driver runs in Ray's copy of the checkout: a relative
    output lands in Ray's session folder, so the job says where; absolute paths and s3 say nothing."""
    from pipelines.generate.job import ray_working_dir_warning

    cwd = "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_8ef5"
    msg = ray_working_dir_warning("out/demo", cwd)
    assert msg is not None and f"{cwd}/out/demo" in msg and "absolute path or s3://" in msg
    assert ray_working_dir_warning("/data/out", cwd) is None
    assert ray_working_dir_warning("s3://b/out", cwd) is None
    assert ray_working_dir_warning("out/demo", "/home/me/realdgen") is None


def test_shards_made_before_the_reference_crop_are_not_resumed_with_it():
    """A complete shard is compared by its references digest; one that carries none (or a v1 digest
    without sizes) is not, except when a reference is now read from its centre crop: every shard
    from before the crop embedded it whole."""
    from pipelines.generate.job import shards_made_otherwise

    now = {"references_digest": "refs2:sha256:new", "start_digest": None}
    stats = {
        "s0": {"references_digest": "refs2:sha256:new"},  # this run's
        "s1": {"references_digest": "refs2:sha256:old"},  # other references
        "s2": {},  # from before the digest was recorded
        "s3": {"references_digest": "refs:sha256:v1"},  # v1, without sizes
    }
    assert shards_made_otherwise(stats, now) == {"references_digest": ["s1"]}
    assert shards_made_otherwise(stats, now, cropped_now=True) == {"references_digest": ["s1", "s2", "s3"]}
    assert shards_made_otherwise({"s0": {"start_digest": "start:a"}}, {"start_digest": "start:b"}) == {
        "start_digest": ["s0"]
    }
