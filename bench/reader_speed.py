"""Reader throughput: PairedShardDataset vs a plain PIL loop over the exported folders.

Builds a local dataset (default 64 samples, HR 512x512, LR 128x128, x4) with the test factory,
exports it to hr/ lr/ folders, then measures samples/s with num_workers=0 for each gt_size:

- ``shards``: PairedShardDataset (tar streaming + PNG decode + paired crop + augment + tensors)
- ``folders``: the same work from the exported PNG files with a plain PIL loop
  (open both files, decode, same crop/augment/tensor code), i.e. BasicSR's disk-backend path

Both sides decode the whole PNGs (PNG cannot be partially decoded), so the ratio shows what the
tar container costs or saves against one-file-per-image. Prints one JSON object.

    python bench/reader_speed.py [--samples 64] [--hr 512] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from shard_factory import write_dataset  # noqa: E402

from pipelines.export import export_dataset  # noqa: E402
from pipelines.reader import PairedShardDataset, augment_pair, paired_random_crop, to_tensor  # noqa: E402


def time_shards(uri: str, gt_size: int, repeats: int) -> tuple[float, int]:
    ds = PairedShardDataset(uri, gt_size=gt_size, scale=4, seed=0)
    best, n = float("inf"), 0
    for epoch in range(repeats):
        ds.set_epoch(epoch)
        t = time.perf_counter()
        n = sum(1 for s in ds if s["gt"] is not None)
        best = min(best, time.perf_counter() - t)
    return n / best, n


def time_folders(out: str, gt_size: int, repeats: int) -> tuple[float, int]:
    names = sorted(os.listdir(os.path.join(out, "hr")))
    rng = np.random.default_rng(0)
    best, n = float("inf"), 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = 0
        for name in names:
            hr = np.asarray(Image.open(os.path.join(out, "hr", name)).convert("RGB"))
            lr = np.asarray(Image.open(os.path.join(out, "lr", name)).convert("RGB"))
            hr, lr = paired_random_crop(hr, lr, gt_size, 4, rng)
            hr, lr = augment_pair(hr, lr, rng)
            to_tensor(hr), to_tensor(lr)
            n += 1
        best = min(best, time.perf_counter() - t)
    return n / best, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--hr", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="best of N passes")
    ap.add_argument("--gt-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--out", default=None, help="work folder (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.out or tempfile.mkdtemp(prefix="reader_speed_")
    uri = os.path.join(work, "ds")
    t = time.perf_counter()
    write_dataset(
        uri,
        n_samples=args.samples,
        samples_per_shard=16,
        hr_size=args.hr,
        failures_per_shard=0,
        noise_sigma=2.0,
    )
    build_s = time.perf_counter() - t
    export_dataset(uri, os.path.join(work, "export"))
    shard_bytes = sum(os.path.getsize(os.path.join(uri, n)) for n in os.listdir(uri) if n.endswith(".tar"))
    results = {}
    for gt in args.gt_sizes:
        s_rate, n = time_shards(uri, gt, args.repeats)
        f_rate, _ = time_folders(os.path.join(work, "export"), gt, args.repeats)
        results[str(gt)] = {
            "shards_samples_per_s": round(s_rate, 1),
            "folders_samples_per_s": round(f_rate, 1),
            "ratio_shards_over_folders": round(s_rate / f_rate, 3),
            "samples": n,
        }
    print(
        json.dumps(
            {
                "bench": "reader_speed",
                "num_workers": 0,
                "torch_threads": 1,
                "samples": args.samples,
                "hr": args.hr,
                "lr": args.hr // 4,
                "scale": 4,
                "shard_mb": round(shard_bytes / 2**20, 2),
                "build_s": round(build_s, 2),
                "gt_size": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
