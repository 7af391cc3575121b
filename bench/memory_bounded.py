"""Peak memory of the generation job for N and 10·N inputs (bicubic generator): does it stay bounded?

Each run is a fresh process with its own embedded Ray, so nothing is shared between the two.
Measured: the driver's peak RSS (from wait4) and the peak summed RSS of the driver's whole
process tree (driver + Ray services + workers; shared pages are counted once per process, so
this over-counts, but it does so equally in both runs). Prints one JSON object.

    python bench/memory_bounded.py [--n 20] [--factor 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


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
    manifest = {
        "kind": "generate",
        "scale": 4,
        "hr": {"uri": str(root / "hr")},
        "generator": {"kind": "bicubic"},
        "tiling": {"tile": 32, "max_tiles_per_image": 4},
        "output": {"uri": str(root / "out"), "inputs_per_shard": per_shard, "preview": False},
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
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"job with {n} inputs failed ({proc.returncode})")
    summary = json.loads(out.strip().splitlines()[-1])
    return {
        "inputs": n,
        "pairs": summary["pairs"],
        "shards": summary["shards"],
        "wall_s": round(time.perf_counter() - t0, 2),
        "driver_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "tree_peak_rss_mb": round(peak_tree / 2**20, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--inputs-per-shard", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdg-mem-") as tmp:
        small = run_job(Path(tmp) / "small", args.n, args.inputs_per_shard)
        large = run_job(Path(tmp) / "large", args.n * args.factor, args.inputs_per_shard)
    print(
        json.dumps(
            {
                "bench": "memory_bounded",
                "generator": "bicubic",
                "small": small,
                "large": large,
                "driver_rss_ratio": round(large["driver_peak_rss_mb"] / small["driver_peak_rss_mb"], 3),
                "tree_rss_ratio": round(large["tree_peak_rss_mb"] / small["tree_peak_rss_mb"], 3),
                "bounded": large["driver_peak_rss_mb"] < 1.5 * small["driver_peak_rss_mb"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
