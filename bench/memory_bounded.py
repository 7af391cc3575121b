"""Driver memory of the generation job: N vs 10·N inputs, and planning 10k vs 100k S3 objects.

Part 1, the job (bicubic generator, small images). Each run is a fresh process with its own
embedded Ray, so nothing is shared between the two. Measured: the driver's peak RSS (from
wait4), the peak summed RSS of the driver's whole process tree (driver + Ray services +
workers; shared pages are counted once per process, so this over-counts, but equally in both
runs), the summary's ``driver_bytes_received`` (bytes of the Arrow batches the driver
iterated over), the pairs, the bytes of the written dataset and of its shards (the sample
bytes), and the 10N / N ratios.

Part 2, the listing. A moto S3 server (server mode, 127.0.0.1) holds ``--list-small`` and
``--list-objects`` zero-byte ``.png`` objects (two folders, each flat), loaded with
``put_object`` from a thread pool (``--load backend`` writes them into moto's in-process
backend instead: same objects over HTTP, seconds instead of minutes). For each size, a fresh
driver process plans as the job does: ``make_plan(m, list_now=False)`` (the preflight), a
local Ray, then ``GenerateJob._list`` (``list_plan`` as a Ray task that writes the plan blocks
and returns a ``PlanSummary``). Recorded: the driver's peak RSS growth in each phase (VmHWM,
reset through /proc/self/clear_refs, and a 10 ms sampler), what came back (inputs, blocks,
shards, pickled size of the PlanSummary). For contrast, another fresh process lists the same
objects in-process with ``list_source`` (the old behaviour) and keeps the list.

Prints one JSON object; ``ok_without_preflight`` is true when the driver RSS ratio 10N / N is
at most ``--rss-ratio-max`` and the driver's growth during the Ray listing of
``--list-objects`` is at most ``--list-growth-max-mb`` with a PlanSummary under 5% of the
pickled URI list; ``ok`` also needs the preflight's driver growth (peak and retained) on the
same folder to stay under ``--list-growth-max-mb``.

    python bench/memory_bounded.py [--n 20] [--factor 10] [--list-objects 100000]
                                   [--list-small 10000] [--load http|backend]
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
MB = 2**20
BUCKET = "bench-listing"
WARMUP = "warmup"  # a one-object folder each child lists first
SUMMARY_FRACTION_MAX = 0.05  # PlanSummary pickled size / pickled URI list size


def _tree_rss(root: int) -> int:
    """Sum of RSS (bytes) of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            ppid, pages = int(parts[1]), int(parts[21])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
        rss[int(d)] = pages * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack.extend(children.get(p, []))
    return total


def _mb(n: float) -> float:
    return round(n / MB, 1)


# --------------------------------------------------------------------------------------------
# Part 1: the job, N and 10·N inputs
# --------------------------------------------------------------------------------------------


def write_inputs(folder: Path, n: int, size: int = 256) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for i in range(n):
        base = np.stack([(x + 3 * i) % 256, (y * 2 + i) % 256, (x + y) % 256], -1)
        img = np.clip(base + rng.integers(0, 24, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i:05d}.png")


def run_job(root: Path, n: int, per_shard: int) -> dict:
    write_inputs(root / "hr", n)
    out = root / "out"
    manifest = {
        "kind": "generate",
        "scale": 4,
        "hr": {"uri": str(root / "hr")},
        "generator": {"kind": "bicubic"},
        "tiling": {"tile": 32, "max_tiles_per_image": 4},
        "output": {"uri": str(out), "inputs_per_shard": per_shard, "preview": False},
        "compute": {"batch_size": 8, "actor_num_cpus": 0.5, "task_num_cpus": 0.5},
        "progress": {"bar": False},
    }
    path = root / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pipelines" / "generate_dataset.py"), str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peak_tree = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not stop.is_set():
            peak_tree = max(peak_tree, _tree_rss(proc.pid))
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"job with {n} inputs failed ({proc.returncode})")
    summary = json.loads(text.strip().splitlines()[-1])
    received, pairs = summary["driver_bytes_received"], summary["pairs"]
    files = [p for p in out.rglob("*") if p.is_file()]
    tars = [p for p in files if p.suffix == ".tar"]
    return {
        "inputs": n,
        "pairs": summary["pairs"],
        "shards": summary["shards"],
        "writers": summary.get("writers"),
        "wall_s": round(time.perf_counter() - t0, 2),
        "driver_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "tree_peak_rss_mb": _mb(peak_tree),
        "driver_bytes_received": summary["driver_bytes_received"],
        "driver_bytes_received_per_pair": round(received / max(1, pairs), 1),
        "dataset_bytes": sum(p.stat().st_size for p in files),
        "sample_bytes_written": sum(p.stat().st_size for p in tars),
        "driver_received_fraction_of_sample_bytes": round(
            summary["driver_bytes_received"] / max(1, sum(p.stat().st_size for p in tars)), 5
        ),
    }


def job_part(n: int, factor: int, per_shard: int, rss_ratio_max: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="rdg-mem-") as tmp:
        small = run_job(Path(tmp) / "small", n, per_shard)
        large = run_job(Path(tmp) / "large", n * factor, per_shard)

    def ratio(key: str) -> float:
        return round(large[key] / small[key], 3) if small[key] else float("nan")

    rss_ratio = ratio("driver_peak_rss_mb")
    return {
        "generator": "bicubic",
        "image_px": 256,
        "inputs_per_shard": per_shard,
        "n": small,
        "10n" if factor == 10 else f"{factor}n": large,
        "ratios": {
            "driver_peak_rss": rss_ratio,
            "tree_peak_rss": ratio("tree_peak_rss_mb"),
            "pairs": ratio("pairs"),
            "driver_bytes_received": ratio("driver_bytes_received"),
            "driver_bytes_received_per_pair": ratio("driver_bytes_received_per_pair"),
            "sample_bytes_written": ratio("sample_bytes_written"),
        },
        "driver_rss_ratio_max": rss_ratio_max,
        "driver_rss_bounded": rss_ratio <= rss_ratio_max,
    }


# --------------------------------------------------------------------------------------------
# Part 2: planning a large S3 listing (child processes measure; the parent serves S3)
# --------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Phase:
    """Peak RSS growth of this process over a ``with`` block: VmHWM (reset at entry through
    /proc/self/clear_refs when the kernel allows it) and a 10 ms VmRSS sampler."""

    def __init__(self) -> None:
        self.hwm_reset = False

    def __enter__(self) -> Phase:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start = _status_kb("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._sample, daemon=True)
        self._th.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled = max(self.sampled, _status_kb("VmRSS"))
            self._stop.wait(0.01)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._th.join()
        peak = max(self.sampled, _status_kb("VmHWM") if self.hwm_reset else 0)
        self.peak_growth = peak - self.start
        self.end = _status_kb("VmRSS")

    def report(self) -> dict:
        return {
            "seconds": round(self.seconds, 2),
            "rss_start_mb": _mb(self.start),
            "peak_growth_mb": _mb(self.peak_growth),
            "retained_mb": _mb(self.end - self.start),
        }


def _listing_manifest(uri: str, out: str):
    from pipelines.manifest import GenerateManifest

    return GenerateManifest.model_validate(
        {
            "kind": "generate",
            "scale": 4,
            "hr": {"uri": uri},
            "generator": {"kind": "bicubic"},
            "output": {"uri": out, "preview": False},
            "progress": {"bar": False},
        }
    )


def listing_child(mode: str, uri: str) -> dict:
    """Run in a fresh process: plan ``uri`` the job's way (``ray``) or list it here (``inproc``)."""
    sys.path.insert(0, str(REPO))
    from pipelines.generate.plan import make_plan

    rss0 = _status_kb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="rdg-list-") as out:
        m = _listing_manifest(uri, out)
        # Warm up on a one-object folder (imports, S3 clients), so that what is measured below is
        # what the listing itself costs.
        warm = _listing_manifest(f"s3://{BUCKET}/{WARMUP}", out)
        if mode == "inproc":
            from pipelines.sources import list_source
            from pipelines.storage import storage_kwargs

            list_source(warm.hr, storage_kwargs(warm.storage))
            with Phase() as ph:
                items = list_source(m.hr, storage_kwargs(m.storage))
            return {
                "mode": "list_source in the driver (old behaviour)",
                "rss_at_start_mb": _mb(rss0),
                "listing": ph.report(),
                "hwm_reset": ph.hwm_reset,
                "inputs": len(items),
                "uris_pickled_bytes": len(pickle.dumps([it.uri for it in items])),
                "items_pickled_bytes": len(pickle.dumps(items)),
            }
        import ray

        from pipelines.generate.job import GenerateJob
        from pipelines.storage import get_fs, storage_kwargs

        make_plan(warm, list_now=False)
        with Phase() as pre:
            plan = make_plan(m, list_now=False)
        # The preflight's S3 filesystem (fsspec caches instances: get_fs returns the same one).
        fs, _ = get_fs(uri, storage_kwargs(m.storage))
        dircache = sum(len(v) for v in getattr(fs, "dircache", {}).values())
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        )
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        t = time.perf_counter()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
        ray_init_s = time.perf_counter() - t
        GenerateJob(warm, log=lambda s: None)._list(make_plan(warm, list_now=False))
        job = GenerateJob(plan.manifest, log=lambda s: None)
        got = []
        with_listing = plan.with_listing
        plan.with_listing = lambda s: (got.append(s), with_listing(s))[1]  # keep what came back
        try:
            with Phase() as ph:
                job._list(plan)
        finally:
            ray.shutdown()
        summary = got[0]
        return {
            "mode": "GenerateJob._list (list_plan as a Ray task)",
            "rss_at_start_mb": _mb(rss0),
            "preflight": {**pre.report(), "s3fs_dircache_entries_after": dircache},
            "ray_init_s": round(ray_init_s, 2),
            "listing": ph.report(),
            "hwm_reset": ph.hwm_reset,
            "inputs": summary.n_inputs,
            "shards": len(summary.shard_sizes),
            "blocks": len(summary.blocks),
            "summary_pickled_bytes": len(pickle.dumps(summary)),
            "summary_bytes_per_input": round(len(pickle.dumps(summary)) / max(1, summary.n_inputs), 3),
        }


def _load(client, backend, prefix: str, n: int, how: str, threads: int) -> dict:
    keys = [f"{prefix}/img{i:07d}.png" for i in range(n)]
    t = time.perf_counter()
    if how == "backend":
        for k in keys:
            backend.put_object(BUCKET, k, b"")
    else:
        with ThreadPoolExecutor(threads) as ex:
            for _ in ex.map(lambda k: client.put_object(Bucket=BUCKET, Key=k, Body=b""), keys):
                pass
    s = time.perf_counter() - t
    return {"objects": n, "load": how, "load_s": round(s, 1), "puts_per_s": round(n / s, 1)}


def _child(mode: str, uri: str, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--child-uri", uri],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"listing child {mode} {uri} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def listing_part(sizes: list[int], how: str, threads: int, growth_max_mb: float) -> dict:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(creds)
    # Port 0: the server binds a free port itself and reports it, so nothing can take it in between.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(creds, AWS_ENDPOINT_URL=endpoint)
    try:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3", endpoint_url=endpoint, config=Config(max_pool_connections=threads), region_name="us-east-1"
        )
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=f"{WARMUP}/img0000000.png", Body=b"")
        backend = None
        if how == "backend":
            from moto.core import DEFAULT_ACCOUNT_ID
            from moto.s3.models import s3_backends

            backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        runs = {}
        for n in sizes:
            prefix = f"hr{n}"
            entry = _load(client, backend, prefix, n, how, threads)
            uri = f"s3://{BUCKET}/{prefix}"
            print(f"[listing] {n} objects loaded in {entry['load_s']} s", file=sys.stderr, flush=True)
            entry["ray_task"] = _child("ray", uri, env)
            entry["in_driver"] = _child("inproc", uri, env)
            print(f"[listing] {n} objects measured", file=sys.stderr, flush=True)
            runs[str(n)] = entry
    finally:
        server.stop()
    big = runs[str(max(sizes))]
    small = runs[str(min(sizes))]
    rt, ind = big["ray_task"], big["in_driver"]
    frac = rt["summary_pickled_bytes"] / max(1, ind["uris_pickled_bytes"])
    listing_ok = rt["listing"]["peak_growth_mb"] <= growth_max_mb and frac <= SUMMARY_FRACTION_MAX
    pre = rt["preflight"]
    preflight_ok = max(pre["peak_growth_mb"], pre["retained_mb"]) <= growth_max_mb
    return {
        "server": "moto ThreadedMotoServer on 127.0.0.1 (server mode), zero-byte .png objects, flat folders",
        "method": "each size in fresh driver processes; each phase first run on a one-object folder "
        "(imports, clients warm); growth = peak VmRSS during the phase - VmRSS at its start",
        "runs": runs,
        "compare": {
            "objects": [min(sizes), max(sizes)],
            "ray_listing_driver_peak_growth_mb": [
                small["ray_task"]["listing"]["peak_growth_mb"],
                rt["listing"]["peak_growth_mb"],
            ],
            "in_driver_listing_peak_growth_mb": [
                small["in_driver"]["listing"]["peak_growth_mb"],
                ind["listing"]["peak_growth_mb"],
            ],
            "preflight_driver_peak_growth_mb": [
                small["ray_task"]["preflight"]["peak_growth_mb"],
                rt["preflight"]["peak_growth_mb"],
            ],
            "preflight_driver_retained_mb": [
                small["ray_task"]["preflight"]["retained_mb"],
                rt["preflight"]["retained_mb"],
            ],
            "summary_pickled_bytes": [
                small["ray_task"]["summary_pickled_bytes"],
                rt["summary_pickled_bytes"],
            ],
            "uris_pickled_bytes": [small["in_driver"]["uris_pickled_bytes"], ind["uris_pickled_bytes"]],
            "summary_fraction_of_uri_list": round(frac, 4),
        },
        "thresholds": {
            "ray_listing_driver_peak_growth_mb_max": growth_max_mb,
            "summary_fraction_of_uri_list_max": SUMMARY_FRACTION_MAX,
            "preflight_driver_growth_mb_max": growth_max_mb,
        },
        "listing_ok": listing_ok,
        "preflight_ok": preflight_ok,
        "driver_held_the_listing": {
            "ray_listing_phase": not listing_ok,
            "preflight": pre["s3fs_dircache_entries_after"] >= rt["inputs"],
        },
    }


def _commit() -> str | None:
    """The code measured: ``git rev-parse HEAD`` (``REALDGEN_COMMIT`` for an exported tree)."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("REALDGEN_COMMIT")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="inputs of the small job run")
    ap.add_argument("--factor", type=int, default=10, help="the large job run has n·factor inputs")
    ap.add_argument("--inputs-per-shard", type=int, default=10)
    ap.add_argument("--rss-ratio-max", type=float, default=1.2)
    ap.add_argument("--list-objects", type=int, default=100_000, help="objects of the large listing")
    ap.add_argument("--list-small", type=int, default=10_000, help="objects of the small listing")
    ap.add_argument("--load", choices=("http", "backend"), default="http", help="how objects reach moto")
    ap.add_argument("--load-threads", type=int, default=16)
    ap.add_argument("--list-growth-max-mb", type=float, default=16.0)
    ap.add_argument("--skip-job", action="store_true")
    ap.add_argument("--skip-listing", action="store_true")
    ap.add_argument("--child", choices=("ray", "inproc"), help=argparse.SUPPRESS)
    ap.add_argument("--child-uri", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(listing_child(args.child, args.child_uri)))
        return
    out: dict = {"bench": "memory_bounded", "commit": _commit(), "cpus": os.cpu_count()}
    oks, pre_oks = [], []
    if not args.skip_job:
        print("[job] running N and 10N", file=sys.stderr, flush=True)
        out["job"] = job_part(args.n, args.factor, args.inputs_per_shard, args.rss_ratio_max)
        oks.append(out["job"]["driver_rss_bounded"])
    if not args.skip_listing:
        sizes = sorted({args.list_small, args.list_objects})
        out["listing"] = listing_part(sizes, args.load, args.load_threads, args.list_growth_max_mb)
        oks.append(out["listing"]["listing_ok"])
        pre_oks.append(out["listing"]["preflight_ok"])
    out["ok_rule"] = (
        f"job driver peak RSS ratio 10N/N <= {args.rss_ratio_max}; driver peak RSS growth during "
        f"the Ray listing of {args.list_objects} objects <= {args.list_growth_max_mb} MiB with a "
        f"PlanSummary <= {SUMMARY_FRACTION_MAX:.0%} of the pickled URI list; and the driver's "
        f"preflight of the same folder (peak growth and retained) <= {args.list_growth_max_mb} MiB"
    )
    out["ok_without_preflight"] = bool(oks) and all(oks)
    out["ok"] = out["ok_without_preflight"] and all(pre_oks)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
