"""The job reading from and writing to a bucket on a real S3 protocol server (moto, loopback)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import yaml
from PIL import Image
from test_generate_job import REPO, manifest_dict, validate


def _two_s3_photos_and_a_local_ref(s3_server, bucket, photos, tmp_path):
    """Two 40 px photos under s3://bucket/hr and a folder with one 12 px reference: (fs, refs)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for n in sorted(photos)[:2]:
        fs.pipe(f"{bucket}/hr/{n}.png", _png(photos[n][:40, :40]))
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(photos[sorted(photos)[0]][:12, :12]).save(refs / "r.png")
    return fs, refs


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job process: credentials come from here, never from the manifest."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@pytest.mark.ray
def test_job_reads_and_writes_s3(s3_server, s3_bucket, photos, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    # HR content as WebDataset shards (members read by byte range), references as a folder.
    names = sorted(photos)
    for shard, chunk in enumerate([names[:3], names[3:]]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for n in chunk:
                for ext, data in (("png", _png(photos[n][:72, :104])), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{n}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        fs.pipe(f"{s3_bucket}/hr/src-{shard:06d}.tar", buf.getvalue())
    for n in names[:2]:
        fs.pipe(f"{s3_bucket}/refs/{n}.png", _png(np.ascontiguousarray(photos[n][::6, ::6][:24, :24])))

    out = f"s3://{s3_bucket}/datasets/run1"
    data = manifest_dict(f"s3://{s3_bucket}/hr", f"s3://{s3_bucket}/refs", out, generator__kind="bicubic")
    data["hr"]["format"] = "webdataset"
    data["storage"] = {"endpoint_url": s3_server}
    manifest = tmp_path / "s3.yaml"
    manifest.write_text(yaml.safe_dump(data))
    assert "testing" not in manifest.read_text()  # no credentials in the manifest

    # The job runs in its own process with its own embedded Ray, as a user would run it.
    r = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), str(manifest)],
        env=job_env(AWS_ENDPOINT_URL=""),  # the endpoint comes from the manifest's storage options
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 10 and summary["shards"] == 3
    assert "testing" not in r.stdout + r.stderr  # credentials never logged

    validate(out, "--endpoint", s3_server, "--scale", "2")
    fs.invalidate_cache()
    listing = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/datasets/run1"))
    assert "_index.json" in listing and "_preview.png" in listing and "_lock.json" not in listing
    assert [n for n in listing if n.endswith(".tar")] == [
        "pairs-000000.tar",
        "pairs-000001.tar",
        "pairs-000002.tar",
    ]
    meta = None
    with tarfile.open(fileobj=io.BytesIO(fs.cat(f"{s3_bucket}/datasets/run1/pairs-000000.tar"))) as tar:
        for m in tar:
            if m.name.endswith(".json"):
                meta = json.loads(tar.extractfile(m).read())
                break
    assert meta["hr_source"].startswith(f"s3://{s3_bucket}/hr/src-000000.tar#")
    assert meta["ref_source"].startswith(f"s3://{s3_bucket}/refs/")


def test_refused_credentials_stop_the_job_with_the_uri_and_never_a_traceback(
    s3_server, s3_bucket, photos, tmp_path, capsys, ray_local
):
    """Wrong or expired credentials: before any work (the preflight), exit 2 with one line naming the
    source; refused once the job runs (listing, decoding, writing in Ray tasks), one line naming the
    object, exit 1, nothing marked failed."""
    import moto.settings

    from pipelines.generate.job import GenerateJob, JobFailed
    from pipelines.generate.plan import make_plan
    from pipelines.generate_dataset import main
    from pipelines.manifest import parse_manifest

    fs, refs = _two_s3_photos_and_a_local_ref(s3_server, s3_bucket, photos, tmp_path)
    out = tmp_path / "out"
    data = manifest_dict(f"s3://{s3_bucket}/hr", str(refs), str(out), generator__kind="bicubic")
    data["storage"] = {"endpoint_url": s3_server}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))

    before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    plan = make_plan(parse_manifest(data), list_now=False)  # the preflight passes while storage allows
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from here on every request is refused
    try:
        assert main([str(manifest)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
        assert f"s3://{s3_bucket}/hr" in err and "access refused by storage" in err and "testing" not in err

        # the workers' reason: refused (this process's credentials) or none at all (a Ray started
        # before the fixture put them in the environment)
        with pytest.raises(JobFailed) as info:
            GenerateJob(plan.manifest, log=lambda *_: None).run(plan)
        msg = str(info.value)
        assert re.fullmatch(
            rf"listing s3://{s3_bucket}/hr: (access refused by storage|no S3 credentials) .*"
            r"Nothing was marked failed; .*",
            msg,
        ), msg  # one line: no traceback, no Ray wrapper
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = before
    assert not list(out.glob("*.tar")) and not list(out.glob("*.parquet"))


def test_missing_buckets_and_keys_are_named_before_any_work(s3_server, s3_bucket, photos, tmp_path, capsys):
    """An s3 output whose bucket does not exist is a manifest error naming the bucket (exit 2, also
    for --dry-run), not an unnamed lock failure once Ray is up; a missing source prefix or bucket is
    named with its scheme; a shard source without .tar files says so."""

    from pipelines.generate_dataset import main

    fs, refs = _two_s3_photos_and_a_local_ref(s3_server, s3_bucket, photos, tmp_path)
    data = manifest_dict(
        f"s3://{s3_bucket}/hr", str(refs), "s3://no-such-bucket-x/out", generator__kind="bicubic"
    )
    data["storage"] = {"endpoint_url": s3_server}
    manifest = tmp_path / "m.yaml"
    cases = {
        (): "output.uri: the bucket 'no-such-bucket-x' does not exist (got 's3://no-such-bucket-x/out')",
        ("--set", f"output.uri=s3://{s3_bucket}/out", "--set", f"hr.uri=s3://{s3_bucket}/nope/"): (
            f"hr.uri: not found: s3://{s3_bucket}/nope/\n"
        ),
        ("--set", f"output.uri=s3://{s3_bucket}/out", "--set", "hr.uri=s3://no-such-bucket-y/hr/"): (
            "hr.uri: not found: 's3://no-such-bucket-y/hr/' (The specified bucket does not exist)"
        ),
        # a glob lists nothing in a bucket that does not exist: said so, not "no images found"
        ("--set", f"output.uri=s3://{s3_bucket}/out", "--set", "hr.uri=s3://no-such-bucket-z/hr/*.png"): (
            "hr.uri: the bucket 'no-such-bucket-z' does not exist (got 's3://no-such-bucket-z/hr/*.png')"
        ),
        ("--set", f"output.uri=s3://{s3_bucket}/out", "--set", f"hr.uri=s3://{s3_bucket}/hr/*.tif"): (
            f"hr.uri: no images found (got 's3://{s3_bucket}/hr/*.tif'"
        ),
        ("--set", f"output.uri=s3://{s3_bucket}/out", "--set", "hr.format=webdataset"): (
            f"hr.uri: no .tar shards found (got 's3://{s3_bucket}/hr', format webdataset)"
        ),
    }
    manifest.write_text(yaml.safe_dump(data))
    for args, needle in cases.items():
        for dry in ((), ("--dry-run",)):
            assert main([str(manifest), *args, *dry]) == 2, (args, dry)
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err, (args, err)
    assert not fs.exists(f"{s3_bucket}/out")  # nothing written anywhere
    assert main([str(manifest), "--set", f"output.uri=s3://{s3_bucket}/out", "--dry-run"]) == 0
