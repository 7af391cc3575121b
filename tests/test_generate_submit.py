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
from ports import free_ports
from test_generate_job import REPO, manifest_dict, validate, write_inputs
from test_generate_s3 import job_env

# The head is stopped by the pids found through /proc: Linux only, as the README says.
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only: the head is stopped via /proc")


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


# Every port explicit, free and outside the ephemeral range (tests/ports.py): other Rays on this
# machine hold the defaults (e.g. the dashboard agent's 52365), and an agent that cannot bind its
# port takes the whole node down with it.
_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
)


class Head:
    """``ray start --head --block`` on loopback with its own temp dir, stopped by pid (never
    ``ray stop``, which would also stop the session's other local Ray)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._err = None
        self.temp = ""
        self.ports: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, tries: int = 3) -> None:
        """Start it and wait until its dashboard answers and its job agent listens; a head that
        dies while starting (Ray's own startup, before any job) is started afresh, new ports."""
        why = ""
        for _ in range(tries):
            self._launch()
            why = self._wait_ready(deadline=time.time() + 120)
            if not why:
                return
            why += "\n" + self.logs()
            self.stop()
        pytest.fail(f"the Ray head did not come up ({tries} tries): {why}")

    def _launch(self) -> None:
        # A short temp dir: Ray's unix socket paths must stay under ~107 bytes.
        self.temp = tempfile.mkdtemp(prefix="rdg-head-", dir="/tmp")
        self.ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        # Its output to a file, not to a pipe nobody reads while it runs (a full pipe blocks it).
        self._err = open(Path(self.temp) / "ray_start.err", "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                _ray_bin(),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--dashboard-host",
                "127.0.0.1",
                "--num-cpus",
                "2",
                "--temp-dir",
                self.temp,
                *[a for flag, port in self.ports.items() for a in (flag, str(port))],
                "--include-dashboard",
                "true",
                "--disable-usage-stats",
            ],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self._err,
            start_new_session=True,
        )

    def _wait_ready(self, deadline: float) -> str:
        """'' once ready, else why not."""
        agent = ("127.0.0.1", self.ports["--dashboard-agent-listen-port"])
        while time.time() < deadline:
            if not self.alive():
                return "ray start --head exited while starting"
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    dashboard = r.status == 200
                with socket.create_connection(agent, timeout=2):
                    pass
                if dashboard:
                    return ""
            except OSError:
                pass
            time.sleep(0.5)
        return "the dashboard or the job agent did not come up in 120 s"

    def logs(self) -> str:
        """The tail of the head's own output and of its services' logs, for a failure message."""
        parts = []
        if self.proc is not None and self.proc.poll() is not None:
            err = (Path(self.temp) / "ray_start.err").read_text(errors="replace")
            parts.append(f"[ray start exited {self.proc.returncode}] {err[-2000:]}")
        for f in sorted(Path(self.temp).glob("session_latest/logs/*")):
            service = f.name.startswith(("dashboard", "raylet", "gcs_server"))
            if service and f.suffix in (".log", ".out", ".err"):
                text = f.read_text(errors="replace").strip()
                if text:
                    parts.append(f"[{f.name}] {text[-1500:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` tears down its own services
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            time.sleep(1)
        if self._err is not None:
            self._err.close()
            self._err = None
        for pid in _pids_using(self.temp):  # whatever survived, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)
        self.proc = None


@pytest.fixture()
def ray_head():
    head = Head(job_env(RAY_AUTH_MODE="disabled"))
    head.start()
    try:
        yield head
    finally:
        head.stop()


@pytest.mark.ray
def test_ray_job_submit_runs_the_job(ray_head, photos, tmp_path):
    hr, refs = write_inputs(tmp_path, photos)
    out = tmp_path / "ds"
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(manifest_dict(str(hr), str(refs), str(out), generator__kind="bicubic"))
    )

    def submit() -> subprocess.CompletedProcess:
        cmd = [_ray_bin(), "job", "submit", "--address", ray_head.address, "--"]
        cmd += [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), str(manifest)]
        return subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=300)

    restarted = False
    for _ in range(6):
        r = submit()
        said = r.stdout + r.stderr
        if r.returncode == 0:
            break
        if "No available agent" in said:  # the job agent registers a little after it listens
            time.sleep(5)
            continue
        if not ray_head.alive() and "submitted successfully" not in said and not restarted:
            # Ray's head went down before it accepted the job: Ray's own startup failed, not the
            # job under test. Once only, start it afresh (a second death fails the test).
            ray_head.stop()
            ray_head.start()
            restarted = True
            continue
        break
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:] + "\n" + ray_head.logs()
    assert "succeeded" in (r.stdout + r.stderr).lower()
    summary = json.loads(next(ln for ln in reversed(r.stdout.splitlines()) if ln.startswith('{"output"')))
    assert summary["pairs"] == 10
    validate(str(out))
