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
