"""Crash and resume: the driver killed with SIGKILL mid-run, then re-run, gives the uninterrupted dataset."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image
from test_generate_job import REPO, dataset_bytes, manifest_dict, run_dict, tar_keys, validate
from test_generate_s3 import job_env


@pytest.mark.ray
def test_sigkill_then_resume_equals_uninterrupted_run(ray_local, photos, tmp_path):
    hr = tmp_path / "hr"
    refs = tmp_path / "refs"
    hr.mkdir()
    refs.mkdir()
    i = 0
    for name, img in sorted(photos.items()):
        for y in (0, 128):  # two crops per photo: 10 inputs, one shard each
            Image.fromarray(np.ascontiguousarray(img[y : y + 128, :192])).save(hr / f"{name}_{i}.png")
            i += 1
    Image.fromarray(np.ascontiguousarray(photos["chelsea"][::8, ::8])).save(refs / "r.png")

    def manifest(out):
        return manifest_dict(
            str(hr),
            str(refs),
            str(out),
            scale=4,
            generator__kind="realesrgan",
            tiling__tile=16,
            tiling__max_tiles_per_image=6,
            output__inputs_per_shard=1,
            compute__batch_size=2,
        )

    reference = tmp_path / "uninterrupted"
    run_dict(manifest(reference))
    expected = dataset_bytes(reference)
    assert len([n for n in expected if n.endswith(".tar")]) == 10

    out = tmp_path / "crashed"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest(out)))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), str(path)],
        env=job_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and any(p.name.endswith("_stats.json") for p in out.iterdir()):
                break
            time.sleep(0.02)
        assert proc.poll() is None, (
            "the job ended before it could be killed: " + proc.stderr.read().decode()[-3000:]
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the embedded Ray of the killed driver

    # Workers write the shards: a compaction task already running may still finish one after the
    # driver died. Let the killed run's processes settle before counting what it left.
    def completed() -> list[str]:
        return sorted(p.name for p in out.iterdir() if p.name.endswith("_stats.json"))

    done, settle = completed(), time.time() + 30
    while time.time() < settle:
        time.sleep(2)
        if completed() == done:
            break
        done = completed()
    assert 1 <= len(done) < 10 and not (out / "_index.json").exists(), done
    assert (out / "_lock.json").exists()  # left behind by the killed driver

    # Re-run at once: the dead driver's lock is taken over, complete shards are kept.
    summary = run_dict(manifest(out))
    assert summary["shards_skipped"] == len(done) and summary["shards_written"] == 10 - len(done)
    assert dataset_bytes(out) == expected
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == len(tar_keys(reference))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "_lock.json"]
    validate(str(out))
