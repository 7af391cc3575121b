"""Peak memory of shard compaction: streamed through a spill file vs held in memory; JSON.

Compaction (``pipelines.generate.sink.compact_shard``) turns a shard's part files into its tar. It
used to hold every sample's bytes, then the whole tar in a buffer, then that buffer as one object
to PUT: about three times the shard. It now spills sample bytes to a local temp file part by part
and streams the tar (``DatasetStore.write_stream``), holding one part and one member at a time.

This writes ``--parts`` part files of ``--samples-per-part`` samples each (incompressible member
bytes of ``--member-kb`` KiB: the tar is about parts x samples x 2 x member size), then, each in a
fresh process so that neither sees the other's heap, runs

- ``streamed``: ``compact_shard`` itself;
- ``in_memory``: the previous way, reproduced here: read every part's rows, ``write_tar`` into a
  ``BytesIO`` and ``DatasetStore.write_bytes`` it,

and records the peak RSS growth of each (VmHWM reset through /proc/self/clear_refs, and a 10 ms
VmRSS sampler), seconds, and whether the two tars are byte-identical; for a shard of ``--parts``
parts and one ``--factor`` times larger. ``ok`` needs identical tars and the streamed peak to grow
by at most ``--max-growth`` while the shard grows ``--factor`` times (bounded, not proportional).

    python bench/compaction_memory.py [--parts 16] [--factor 4] [--samples-per-part 32] [--member-kb 256]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.generate.sink import PART_SCHEMA, compact_shard  # noqa: E402
from pipelines.storage import DatasetStore, read_parquet, shard_stem  # noqa: E402
from realdgen_core.shards import write_tar  # noqa: E402

NAME, WORK = "pairs", "_work/bench"
MODES = ("in_memory", "streamed")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_parts(store_uri: str, parts: int, per_part: int, member_kb: int) -> int:
    """Write the part files of shard 0; returns the number of inputs (one per part)."""
    store = DatasetStore(store_uri)
    rng = np.random.default_rng(0)
    size = member_kb * 1024
    for p in range(parts):
        rows = [
            {"row_type": "input", "input_index": p, "key": f"img{p:04d}", "uri": f"/x/img{p:04d}.png",
             "status": "ok", "n_samples": per_part, "width": 512, "height": 512}
        ]  # fmt: skip
        for t in range(per_part):
            rows.append(
                {"row_type": "sample", "input_index": p, "key": f"img{p:04d}_t{t:03d}",
                 "uri": f"/x/img{p:04d}.png", "status": "ok", "hr_png": rng.bytes(size),
                 "lr_png": rng.bytes(size // 16), "json": json.dumps({"i": p, "t": t}).encode()}
            )  # fmt: skip
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), buf, compression="none")
        store.write_bytes(f"{WORK}/parts/{shard_stem(NAME, 0)}/part-{p:04d}.parquet", buf.getvalue())
        del rows, buf
    return parts


def in_memory(store_uri: str) -> int:
    """The compaction before the spill file: every row in memory, the tar in a buffer."""
    store = DatasetStore(store_uri)
    samples: dict[str, dict] = {}
    for n in store.list_prefix(f"{WORK}/parts/{shard_stem(NAME, 0)}"):
        for r in read_parquet(store.read_bytes(n)).to_pylist():
            if r["row_type"] == "sample":
                samples.setdefault(r["key"], r)
    members = [
        {"__key__": s["key"], "hr.png": s["hr_png"], "json": s["json"], "lr.png": s["lr_png"]}
        for s in samples.values()
    ]
    buf = io.BytesIO()
    nbytes = write_tar(members, buf)
    del members
    store.write_bytes(f"{shard_stem(NAME, 0)}.tar", buf.getvalue())
    return nbytes


def child(mode: str, store_uri: str, inputs: int) -> dict:
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        hwm = True
    except OSError:
        hwm = False
    start = _status_kb("VmRSS")
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], _status_kb("VmRSS"))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if mode == "streamed":
        cfg = {"store": store_uri, "work": WORK, "name": NAME, "scale": 4, "digest": "d", "generator": "x"}
        nbytes = compact_shard(cfg, 0, inputs, time.time())["bytes"]
    else:
        nbytes = in_memory(store_uri)
    seconds = time.perf_counter() - t0
    stop.set()
    th.join()
    top = max(peak[0], _status_kb("VmHWM") if hwm else 0)
    with open(os.path.join(store_uri, f"{shard_stem(NAME, 0)}.tar"), "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "seconds": round(seconds, 2),
        "peak_growth_mb": round((top - start) / 1024, 1),
        "tar_bytes": nbytes,
        "tar_sha256": digest,
        "hwm_reset": hwm,
    }


def run_child(mode: str, store_uri: str, inputs: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--store", store_uri, "--inputs", str(inputs)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=16)
    ap.add_argument("--factor", type=int, default=4, help="the larger shard has factor x parts")
    ap.add_argument("--samples-per-part", type=int, default=32)
    ap.add_argument("--member-kb", type=int, default=256)
    ap.add_argument("--max-growth", type=float, default=1.5, help="streamed peak, larger / smaller shard")
    ap.add_argument("--child", choices=("streamed", "in_memory"), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.store, a.inputs)))
        return
    runs = []
    for parts in (a.parts, a.parts * a.factor):
        run: dict = {"parts": parts, "samples": parts * a.samples_per_part}
        with tempfile.TemporaryDirectory(prefix="realdgen-bench-") as tmp:
            for mode in ("in_memory", "streamed"):  # streamed deletes its parts: each gets its own
                store_uri = os.path.join(tmp, mode)
                inputs = make_parts(store_uri, parts, a.samples_per_part, a.member_kb)
                run[mode] = run_child(mode, store_uri, inputs)
        run["shard_mb"] = round(run["streamed"]["tar_bytes"] / 2**20, 1)
        run["identical_tars"] = run["streamed"]["tar_sha256"] == run["in_memory"]["tar_sha256"]
        run["peak_over_shard"] = {m: round(run[m]["peak_growth_mb"] / run["shard_mb"], 3) for m in MODES}
        runs.append(run)
    small, large = runs
    growth = {m: round(large[m]["peak_growth_mb"] / max(small[m]["peak_growth_mb"], 1e-9), 2) for m in MODES}
    print(
        json.dumps(
            {
                "runs": runs,
                "shard_growth": round(large["shard_mb"] / small["shard_mb"], 2),
                "peak_growth": growth,
                "peak_reduction_large": round(
                    large["in_memory"]["peak_growth_mb"] / max(large["streamed"]["peak_growth_mb"], 1e-9), 2
                ),
                "ok": all(r["identical_tars"] for r in runs) and growth["streamed"] <= a.max_growth,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
