"""Shared fixtures: a real S3 protocol server (moto, server mode) on loopback, a local Ray, photos."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from ports import free_ports

# No Ray metrics in the tests: nothing here reads them, and Ray 2.60's OpenTelemetry metrics thread
# once crashed a job's driver with SIGSEGV at shutdown (TemporalMetricStorage::buildMetrics, exit
# -11 in test_multinode). Every Ray process the suite starts, and every driver it launches (their
# environments copy this one), inherits the switch; production jobs keep their metrics.
os.environ.setdefault("RAY_enable_metrics_collection", "0")

# One intra-op thread: the suite runs Ray workers beside the test process on 2 cores, and two
# spinning OpenMP pools per process were measured 10-50x slower than one thread each.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server over HTTP on 127.0.0.1; yields its endpoint URL.

    Credentials are dummies placed in the environment (as a real deployment would), so s3fs and
    every Ray worker started afterwards read them from the environment, never from a manifest.
    """
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]  # outside the ephemeral range: no outgoing connection takes it first
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import boto3

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    yield name


@pytest.fixture()
def storage_refuses(s3_server):
    """The moto server checks credentials (its IAM knows no key: every request is answered 403,
    InvalidAccessKeyId or Forbidden), as a store does for an expired or wrong key."""
    import moto.settings

    before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = before


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session, bound to loopback, no dashboard."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """scikit-image's bundled RGB photos as uint8 HWC arrays (no download needed)."""
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry"]
    return {n: np.ascontiguousarray(getattr(data, n)()[..., :3]) for n in names}


@pytest.fixture()
def one_torch_thread():
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads are ~50x slower."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
