"""What a user sees: the demo manifest's job run as the README runs it, its console captured.

The job runs in a subprocess (its own embedded Ray, as `python pipelines/generate_dataset.py
manifests/demo.yaml` does) with a tiny checkpoint and a few inputs. Its stderr is read line by
line as it is written: progress lines must arrive while generation is still running (not all at
the end), and Ray's noise that a user cannot act on must not appear.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from test_generate_job import REPO, validate

NOISE = {
    "actor constructor-argument error": re.compile(r"core_worker\.cc.*constructor arguments"),
    "progress bars disabled warning": re.compile(r"Progress bars disabled"),
    "token authentication notice": re.compile(r"Token authentication is (enabled|disabled)"),
}
PROGRESS = re.compile(r"^progress: (\d+)/(\d+) samples .* (\d+)/(\d+) inputs, ([\d.]+) pairs/s")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from realdgen_core.checkpoint import save_checkpoint
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, build_model(preset("tiny")))
    return path


def _read_lines(stream, sink: list[tuple[float, str]]) -> None:
    for line in iter(stream.readline, ""):
        sink.append((time.monotonic(), line.rstrip("\n")))


@pytest.mark.ray
def test_demo_job_console_shows_progress_as_it_goes_and_no_ray_noise(tiny_checkpoint, tmp_path):
    demo, out = tmp_path / "demo", tmp_path / "out"
    overrides = {
        "demo_inputs": demo,
        "hr.uri": demo / "hr",
        "hr.limit": 4,
        "refs.0.source.uri": demo / "refs",
        "generator.checkpoint": tiny_checkpoint,
        "generator.k": 2,
        # every sample denoises from τ = 150, so each batch takes a moment (τ drawn below that could
        # make all batches finish within half a second on a fast machine)
        "generator.tau_min": 150,
        "generator.tau_max": 150,
        "tiling.tile": 16,
        "tiling.max_tiles_per_image": 2,
        "output.uri": out,
        "output.inputs_per_shard": 2,
        "compute.batch_size": 2,
        "compute.actor_num_cpus": 0.5,
        "compute.task_num_cpus": 0.5,
        "progress.interval_s": 0,
    }
    cmd = [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), "manifests/demo.yaml"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    # A user's environment: no RAY_ADDRESS, RAY_AUTH_MODE unset (the suite's fixture sets it).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    # One reader thread per pipe (communicate() would read stderr too and take lines away).
    err: list[tuple[float, str]] = []
    out_lines: list[tuple[float, str]] = []
    readers = [
        threading.Thread(target=_read_lines, args=(proc.stderr, err), daemon=True),
        threading.Thread(target=_read_lines, args=(proc.stdout, out_lines), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    for r in readers:
        r.join(timeout=30)
    stdout = "\n".join(line for _, line in out_lines)
    console = "\n".join(line for _, line in err)
    assert proc.returncode == 0, console[-4000:]

    for what, pattern in NOISE.items():
        assert not pattern.search(console), f"{what} on the console:\n{console}"

    progress = [(t, PROGRESS.match(line)) for t, line in err if PROGRESS.match(line)]
    done = [int(m.group(1)) for _, m in progress]
    summary = json.loads(stdout.strip().splitlines()[-1])
    pairs = summary["pairs"]
    assert pairs == 8 and summary["inputs_failed"] == 0
    assert done == sorted(done) and done[-1] == pairs, console
    assert int(progress[-1][1].group(2)) == pairs and int(progress[-1][1].group(3)) == 4
    # Samples reached the console in several steps while generation ran: at least two lines
    # with different counts below the total, and time passed between the first sample and the
    # last (all rows arriving at the end would print them within milliseconds of each other).
    partial = sorted({d for d in done if 0 < d < pairs})
    assert len(partial) >= 2, console
    t_first = next(t for (t, m) in progress if int(m.group(1)) > 0)
    t_last = progress[-1][0]
    assert t_last - t_first > 0.5, console
    assert float(progress[-1][1].group(5)) > 0
    # the summary follows the progress, as before
    done_line = next(i for i, (_, line) in enumerate(err) if line.startswith("done: "))
    assert done_line > max(i for i, (_, line) in enumerate(err) if PROGRESS.match(line))
    validate(str(out), "--scale", "4")


def test_ray_datas_advice_to_ignore_a_failed_task_is_cut_from_its_abort_line():
    """On an outage Ray Data logged "… will now abort. To ignore this exception and continue, set
    DataContext.max_errored_blocks." just before the job's own error: advice that would finish the
    job with holes in its shards. The record keeps the rest; other records are untouched."""
    import logging

    from pipelines.generate.console import RAY_DATA_ABORT_LOGGER, drop_ray_data_ignore_advice

    logger = logging.getLogger(RAY_DATA_ABORT_LOGGER)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        drop_ray_data_ignore_advice()
        drop_ray_data_ignore_advice()  # installed once
        assert sum(type(f).__name__ == "_NoIgnoreAdvice" for f in logger.filters) == 1
        logger.error(
            'An exception was raised from a task of operator "MapBatches(x)". Dataset execution will now '
            "abort. To ignore this exception and continue, set DataContext.max_errored_blocks."
        )
        logger.error("another %s", "record")
    finally:
        logger.removeHandler(handler)
    assert seen == [
        'An exception was raised from a task of operator "MapBatches(x)". Dataset execution will now abort.',
        "another record",
    ]


def test_the_console_kept_while_native_stderr_goes_to_a_file_writes_in_stderrs_encoding(tmp_path):
    """native_stderr_to reopened the console (fd 2) in the locale's encoding, not in the one
    ``sys.stderr`` writes in (with PYTHONIOENCODING=utf-8: UTF-8 against cp1252 on Windows, here
    against ASCII): τ, → and … came out as \\u escapes. It now writes in stderr's encoding; the
    native writes still go to the file."""
    native = tmp_path / "native.err"
    code = (
        "import os, sys\n"
        "from pipelines.generate.console import native_stderr_to\n"
        f"with native_stderr_to({str(native)!r}):\n"
        "    print('\\u03c4 150 \\u2192 0 \\u2026', file=sys.stderr, flush=True)\n"  # ASCII source
        "    os.write(2, b'native\\n')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "LC_ALL": "C",  # an ASCII locale: no coercion to C.UTF-8, no UTF-8 mode
        "PYTHONCOERCECLOCALE": "0",
        "PYTHONUTF8": "0",
        "PYTHONIOENCODING": "utf-8",
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.decode("utf-8") == "τ 150 → 0 …\n"
    assert native.read_bytes() == b"native\n"
