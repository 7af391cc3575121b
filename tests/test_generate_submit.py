"""`ray job submit` against a local `ray start --head` on loopback runs the job.

The head gets its own temp dir and is stopped by pid (never `ray stop`, which would also stop
the session's other local Ray).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_generate_job import REPO, manifest_dict, validate, write_inputs
from test_generate_s3 import job_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    cand = Path(sys.executable).with_name("ray")
    return str(cand) if cand.exists() else "ray"


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line mentions our head's private temp dir (the head's services)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(d.name))
    return pids


@pytest.fixture()
def ray_head():
    # A short temp dir: Ray's unix socket paths must stay under ~107 bytes.
    temp = tempfile.mkdtemp(prefix="rdg-head-", dir="/tmp")
    gcs_port, dash_port = _free_port(), _free_port()
    env = job_env(RAY_AUTH_MODE="disabled")
    head = subprocess.Popen(
        [
            _ray_bin(),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dash_port),
            "--num-cpus",
            "2",
            "--temp-dir",
            temp,
            # Every port explicit and free: other Rays on this machine hold the defaults (e.g. the
            # dashboard agent's 52365), and a clash silently leaves the head without a job agent.
            *[
                arg
                for flag in (
                    "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port",
                    "--metrics-export-port",
                    "--runtime-env-agent-port",
                    "--ray-client-server-port",
                    "--node-manager-port",
                    "--object-manager-port",
                )
                for arg in (flag, str(_free_port()))
            ],
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while True:
            if head.poll() is not None:
                pytest.fail("ray start --head failed: " + head.stderr.read().decode()[-3000:])
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("the Ray head's dashboard did not come up")
            time.sleep(0.5)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` tears down its own services
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            head.kill()
        time.sleep(1)
        for pid in _pids_using(temp):  # whatever survived, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray
def test_ray_job_submit_runs_the_job(ray_head, photos, tmp_path):
    address, env = ray_head
    hr, refs = write_inputs(tmp_path, photos)
    out = tmp_path / "ds"
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic"))
    )
    cmd = [
        _ray_bin(),
        "job",
        "submit",
        "--address",
        address,
        "--",
        sys.executable,
        str(REPO / "pipelines" / "generate_dataset.py"),
        str(manifest),
    ]
    for _ in range(6):  # the head's job agent can come up a little after its dashboard
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr:
            break
        time.sleep(5)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    summary = json.loads(next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith('{"output"')))
    assert summary["pairs"] == 10
    validate(str(out))
