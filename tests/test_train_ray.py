"""Ray Train path: TorchTrainer with 2 CPU workers (DDP over gloo) trains and writes a loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image


@pytest.mark.ray
def test_ray_train_two_gloo_workers_write_loadable_checkpoint(tmp_path, photos, ray_local, monkeypatch):
    from pipelines import train as T
    from pipelines.manifest import parse_manifest
    from realdgen_core.checkpoint import load_checkpoint
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    # relative paths, as the shipped manifests write them: Ray Train moves its workers into a trial
    # folder, and they must still resolve against the driver's folder
    monkeypatch.chdir(tmp_path)
    hr = tmp_path / "hr"
    hr.mkdir()
    for name, img in photos.items():
        Image.fromarray(img[:128, :128]).save(hr / f"{name}.png")
    m = parse_manifest(
        {
            "kind": "train",
            "preset": "tiny",
            "data": {
                "hr": {"uri": "hr"},
                "lr": [{"kind": "synthetic", "degradations": ["bicubic", "bsrgan"]}],
            },
            "stage_a": {"pretrain_steps": 2, "finetune_steps": 2, "batch_size": 2, "hr_crop": 32},
            "stage_b": {"steps": 2, "batch_size": 2, "lr_crop": 8},
            "stage_c": {"steps": 3, "batch_size": 2, "lr_crop": 16},
            "output": {"run_dir": "run", "checkpoint": "model.safetensors", "checkpoint_every": 2},
            "compute": {"backend": "ray", "num_workers": 2, "cpus_per_worker": 0.5, "torch_threads": 1},
            "progress": {"bar": False},
        }
    )
    summary = T.run_with_ray(m, ("A", "B", "C"))
    assert summary["completed"] == ["content_pretrain", "content_finetune", "degradation", "diffusion"]
    assert summary["world_size"] == 2

    model, meta = load_checkpoint(tmp_path / "model.safetensors")
    assert meta["completed"] == summary["completed"]
    assert meta["digest"] == summary["model_digest"]
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest["completed"] == summary["completed"]
    # DDP kept the two replicas identical: the gradient all-reduce ran (rank 1 reports its hash).
    assert summary["replica_hashes"][0] == summary["replica_hashes"][1]
    x = torch.rand(1, 3, 16, 16)
    assert model.degradation(x).shape == (1, 2048)
    # ... and they trained: every phase moved weights of its own part away from the initial ones
    init = build_model(preset(m.preset, m.scale), seed=m.seed).state_dict()
    trained = model.state_dict()
    moved = {k.split(".")[0] for k in trained if not torch.equal(trained[k], init[k])}
    assert {"content", "degradation", "unet"} <= moved, moved
    # the state holds each rank's own generator (seeded by rank), so a resume restores each its own
    state = torch.load(tmp_path / "run" / latest["checkpoint"] / "state.pt", weights_only=True)
    by_rank = state["rng_by_rank"]
    assert len(by_rank) == 2 and not torch.equal(by_rank[0], by_rank[1])
    assert torch.equal(by_rank[0], state["rng"])
