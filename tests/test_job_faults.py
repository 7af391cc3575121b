"""The generation job under faults: an S3 outage in the middle of a run, and broken source tars.

1. The job reads its inputs and writes its dataset through a fault-injecting proxy
   (tests/faultproxy.py) in front of a moto S3 server; once the first shard is complete the
   proxy goes down for 20 s. The in-task retries (``REALDGEN_STORAGE_RETRY_S``) ride the outage
   out — or, if storage stays away too long for them, the job exits 1 saying so and a re-run
   finishes — and the dataset is byte for byte the one an uninterrupted run writes, with no
   input marked failed and no scratch left behind.
2. A WebDataset HR source with a tar cut off inside a member's data and a ``bad.tar`` that is no
   tar at all: what is lost becomes failure rows ("truncated" / "unreadable shard"), everything
   readable lands, and the job finishes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from faultproxy import FaultProxy
from PIL import Image
from test_generate_job import REPO, manifest_dict, run_dict, validate
from test_generate_s3 import job_env

from pipelines.storage import read_parquet

OUTAGE_S = 10.0


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _crops(photos: dict[str, np.ndarray], n: int, size: int = 48) -> list[tuple[str, np.ndarray]]:
    """``n`` distinct ``size``-square crops of the photos, named ``img00``, ``img01``, …"""
    names = sorted(photos)
    out = []
    for i in range(n):
        img = photos[names[i % len(names)]]
        y = (i // len(names)) * size
        out.append((f"img{i:02d}", img[y : y + size, :size]))
    return out


# ------------------------------------------------------------------------------------------------
# 1. an S3 outage in the middle of a run
# ------------------------------------------------------------------------------------------------


def _objects(client, bucket: str, prefix: str) -> dict[str, int]:
    """``{name below prefix: size}``, straight from the moto server (not through the proxy)."""
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = obj["Size"]
    return out


def _dataset(client, bucket: str, prefix: str) -> dict[str, bytes]:
    """The tars, parquets and index of a dataset on S3 (stats and preview carry timings)."""
    return {
        n: client.get_object(Bucket=bucket, Key=f"{prefix}/{n}")["Body"].read()
        for n in sorted(_objects(client, bucket, prefix))
        if "/" not in n and (n.endswith((".tar", ".parquet")) or n == "_index.json")
    }


def _write_manifest(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


class _Job:
    """The job as a user runs it, in its own process with its own Ray; output into files (a full
    pipe would stall it while the test sleeps through the outage)."""

    def __init__(self, manifest: Path, env: dict[str, str], logs: Path) -> None:
        self.out_path, self.err_path = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), str(manifest)],
                env=env,
                stdout=out,
                stderr=err,
                text=True,
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return rc, self.out_path.read_text(), self.err_path.read_text()


@pytest.mark.ray
def test_s3_outage_mid_run_is_ridden_out(s3_server, s3_bucket, photos, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    crops = _crops(photos, 10)
    for name, arr in crops:
        client.put_object(Bucket=s3_bucket, Key=f"hr/{name}.png", Body=_png(arr))
    for name, arr in crops[:2]:
        client.put_object(Bucket=s3_bucket, Key=f"refs/{name}.png", Body=_png(arr[::3, ::3][:16, :16]))

    def manifest(prefix: str, endpoint: str) -> dict:
        data = manifest_dict(
            f"s3://{s3_bucket}/hr",
            f"s3://{s3_bucket}/refs",
            f"s3://{s3_bucket}/{prefix}",
            generator__kind="bicubic",
            output__inputs_per_shard=1,
            compute__batch_size=2,
        )
        data["storage"] = {"endpoint_url": endpoint}
        return data

    # Credentials come from the environment; the endpoint from the manifest (never AWS_ENDPOINT_URL).
    env = job_env(AWS_ENDPOINT_URL="", REALDGEN_STORAGE_RETRY_S="60")

    # The reference: the same manifest, no faults, straight to the server, another prefix.
    t0 = time.monotonic()
    rc, out, err = _Job(
        _write_manifest(tmp_path, "ref", manifest("ref", s3_server)), env, tmp_path / "ref"
    ).wait(240)
    assert rc == 0, out[-2000:] + err[-4000:]
    t_ref = time.monotonic() - t0
    reference = _dataset(client, s3_bucket, "ref")
    n_shards = len(crops)
    assert len(reference) == 2 * n_shards + 1

    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        path = _write_manifest(tmp_path, "faults", manifest("ds", proxy.url))
        t0 = time.monotonic()
        job = _Job(path, env, tmp_path / "faults")
        try:
            # Wait for the first complete shard, then cut storage off for OUTAGE_S seconds.
            deadline = time.monotonic() + 240
            while True:
                names = _objects(client, s3_bucket, "ds")
                stats = [n for n in names if n.endswith("_stats.json")]
                if stats:
                    proxy.down()
                    break
                if job.poll() is not None:
                    rc, out, err = job.wait(0)
                    pytest.fail(f"the job ended (rc {rc}) before any shard was complete:\n{err[-4000:]}")
                assert time.monotonic() < deadline, "no shard completed in time"
                time.sleep(0.1)
            t_down = time.monotonic()
            # Work was left: the outage hits a running job, not a finished one.
            assert len(stats) < n_shards and "_index.json" not in names, names
            time.sleep(OUTAGE_S)
            ended_while_down = job.poll() is not None
        finally:
            proxy.up()
        rc, out, err = job.wait(240)
        t_run = time.monotonic() - t0
        # The outage is shorter than the retry budget: the job itself rides it out, with no re-run
        # (an outage past the budget is exit 75: test_storage_faults).
        assert rc == 0, out[-2000:] + err[-4000:]
        assert not ended_while_down, "the job finished while storage was down"
        outcome = "rode out (exit 0)"
    summary = json.loads(out.strip().splitlines()[-1])
    print(
        f"\noutage outcome: {outcome}; reference run {t_ref:.0f} s, faulted run {t_run:.0f} s "
        f"(storage down {OUTAGE_S:.0f} s from t={t_down - t0:.0f} s, {len(stats)} of {n_shards} shards "
        f"complete then); summary {summary}"
    )
    assert summary["inputs_failed"] == 0 and summary["samples_failed"] == 0
    assert summary["shards"] == n_shards

    # No input became a failure row: an outage is not a property of the input.
    for n, body in _dataset(client, s3_bucket, "ds").items():
        if n.endswith(".parquet"):
            rows = read_parquet(body).to_pylist()
            assert rows and all(r["status"] == "ok" for r in rows), (n, rows)
    assert _dataset(client, s3_bucket, "ds") == reference
    remaining = _objects(client, s3_bucket, "ds")
    assert not [n for n in remaining if n.startswith("_work/")], remaining
    assert "_lock.json" not in remaining
    validate(f"s3://{s3_bucket}/ds", "--endpoint", s3_server, "--scale", "2")


# ------------------------------------------------------------------------------------------------
# 2. a truncated source tar and a file that is no tar
# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_truncated_and_garbage_source_tars_become_failure_rows(ray_local, photos, tmp_path):
    crops = _crops(photos, 9)
    hr = tmp_path / "hr"
    hr.mkdir()
    members: dict[str, list[str]] = {}
    for t, chunk in enumerate([crops[0:3], crops[3:6], crops[6:9]]):
        name = f"src-{t:06d}.tar"
        with tarfile.open(hr / name, "w") as tar:
            for n, arr in chunk:
                _add(tar, f"{n}.png", _png(arr))
                _add(tar, f"{n}.json", b"{}")
        members[name] = [f"{n}.png" for n, _ in chunk]
    # The middle tar is cut off inside the data of its second image.
    cut = hr / "src-000001.tar"
    with tarfile.open(cut) as tar:
        victim = tar.getmember(members[cut.name][1])
    cut_at = victim.offset_data + victim.size // 2
    cut.write_bytes(cut.read_bytes()[:cut_at])
    (hr / "bad.tar").write_bytes(b"this is not a tar archive\n" * 40)

    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.ascontiguousarray(photos["chelsea"][::8, ::8][:24, :24])).save(refs / "r.png")
    out = tmp_path / "ds"
    data = manifest_dict(
        str(hr),
        str(refs),
        str(out),
        generator__kind="bicubic",
        hr__format="webdataset",
        output__inputs_per_shard=3,
        limits__max_failure_fraction=0.5,
    )
    t0 = time.monotonic()
    summary = run_dict(data)
    wall = time.monotonic() - t0
    print(f"\ntruncated-tar job: {wall:.0f} s; summary {summary}")
    validate(str(out), "--scale", "2")

    rows = [r for p in sorted(out.glob("*.parquet")) for r in read_parquet(p.read_bytes()).to_pylist()]
    inputs = {r["uri"]: r for r in rows if r["row_type"] == "input"}
    src = str(hr)
    good = [f"{src}/{t}#{m}" for t in ("src-000000.tar", "src-000002.tar") for m in members[t]]
    before_cut = f"{src}/src-000001.tar#{members[cut.name][0]}"
    truncated = f"{src}/src-000001.tar#{members[cut.name][1]}"
    after_cut = f"{src}/src-000001.tar#{members[cut.name][2]}"
    for uri in [*good, before_cut]:
        assert inputs[uri]["status"] == "ok" and inputs[uri]["samples"] >= 1, inputs[uri]
    assert inputs[truncated]["status"] == "failed", inputs[truncated]
    assert inputs[truncated]["error"].startswith("truncated"), inputs[truncated]["error"]
    # The member after the cut cannot be listed: the shard's "unreadable" entry stands for it;
    # the garbage file is one such entry (a failure row, not a planning error).
    assert after_cut not in inputs
    unreadable = {u: r for u, r in inputs.items() if u.endswith("#<unreadable>")}
    assert set(unreadable) == {f"{src}/src-000001.tar#<unreadable>", f"{src}/bad.tar#<unreadable>"}
    assert [u for u in inputs if "bad.tar" in u] == [f"{src}/bad.tar#<unreadable>"]
    for r in unreadable.values():
        assert r["status"] == "failed" and r["error"].startswith("unreadable shard"), r
    failed = {u for u, r in inputs.items() if r["status"] != "ok"}
    assert failed == {truncated, *unreadable}
    assert summary["inputs"] == len(inputs) == len(good) + 2 + len(unreadable)
    assert summary["inputs_failed"] == len(failed)

    # Every readable member has its samples in the dataset; nothing else does.
    landed: dict[str, int] = {}
    keys = []
    for p in sorted(out.glob("*.tar")):
        with tarfile.open(p) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(t.extractfile(m).read())
                    landed[meta["hr_source"]] = landed.get(meta["hr_source"], 0) + 1
                    keys.append(m.name.split(".")[0])
    assert set(landed) == {*good, before_cut}
    assert all(landed[u] == inputs[u]["samples"] for u in landed)
    assert len(keys) == len(set(keys)) == summary["pairs"] == sum(landed.values())
