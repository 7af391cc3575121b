"""CPU cost per pair of the job's CPU stages, for sizing a cluster's CPU side; prints JSON.

Runs the job's own stage code in this process (no Ray) on realistic inputs: scikit-image photos
upscaled (Lanczos) to a camera-sized source and saved as JPEG (quality 92) and PNG, tiled into
HR 256² tiles (x4 → LR 64²). Measured per pair, each as the median over repeats:

- ``decode``: ``DecodeTile`` (read, decode, EXIF, convert, tile, pair) per input / its pairs;
- ``encode_write``: ``encode_write_batch`` (PNG + JSON encode, one part file per shard) per pair;
- ``compact``: ``compact_shard`` (read parts, tar + parquet + stats, delete parts) per pair;
- bytes per pair of the final tar and of the part files; decode peak memory per source pixel.

The GPU side (pairs/s per GPU) is not measured here; ``bench/gpu_suite.py`` measures it on a GPU.
With R pairs/s per GPU, the CPU cores a GPU keeps busy are R × (decode + encode_write + compact)
seconds per pair; ``sizing`` lists that for a few R.

    python bench/stage_costs.py [--side 3000] [--tiles 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.generate.config import DecodeConfig, GenerateConfig, PairingConfig, SinkConfig  # noqa: E402
from pipelines.generate.sink import compact_shard, encode_write_batch  # noqa: E402
from pipelines.generate.stages import DecodeTile, GenerateLR, base_key  # noqa: E402


def sources(folder: Path, side: int) -> list[Path]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = Image.fromarray(np.ascontiguousarray(getattr(data, name)()[..., :3]))
        w = side
        h = int(round(side * img.height / img.width))
        big = img.resize((w, h), Image.Resampling.LANCZOS)
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            p = folder / f"{name}.{ext}"
            big.save(p, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
            out.append(p)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=3000, help="source width in pixels")
    ap.add_argument("--tiles", type=int, default=16, help="HR tiles per source (max_tiles_per_image)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="stage-costs-"))
    (tmp / "src").mkdir()
    files = sources(tmp / "src", args.side)
    rows = [
        {"shard": 0, "input_index": i, "key": base_key(str(p)), "uri": str(p), "path": str(p)}
        for i, p in enumerate(files)
    ]
    decode = DecodeTile(
        DecodeConfig(
            seed=0,
            scale=4,
            tile=64,
            tiling_mode="grid",
            max_tiles=args.tiles,
            max_pixels=200_000_000,
            pairing=PairingConfig("round_robin", 1),
            refs=({"uri": "ref", "set": "s", "domain": None},),
        )
    )
    per_fmt: dict[str, list[float]] = {"jpg": [], "png": []}
    decoded = None
    for _ in range(args.repeats):
        for r, p in zip(rows, files, strict=True):
            t0 = time.perf_counter()
            out = decode([r])
            dt = time.perf_counter() - t0
            n = sum(1 for x in out.column("row_type").to_pylist() if x == "sample")
            per_fmt[p.suffix[1:]].append(dt / n)
        decoded = decode(rows)
    tracemalloc.start()
    decode([rows[0]])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with Image.open(files[0]) as im:
        src_pixels = im.width * im.height

    generated = GenerateLR(GenerateConfig(kind="bicubic", scale=4))(decoded)
    n_pairs = sum(1 for x in generated.column("row_type").to_pylist() if x == "sample")
    enc, comp, tar_bytes, part_bytes = [], [], 0, 0
    for rep in range(args.repeats):
        cfg = SinkConfig(store=str(tmp / f"ds{rep}"), work="_work/x", name="pairs", scale=4, digest="d")
        t0 = time.perf_counter()
        for start in range(0, generated.num_rows, 8):  # batches of 8 rows, as the job's encode stage
            encode_write_batch(generated.slice(start, 8), cfg)
        enc.append((time.perf_counter() - t0) / n_pairs)
        parts = tmp / f"ds{rep}" / "_work" / "x" / "parts"
        part_bytes = sum(f.stat().st_size for f in parts.rglob("*.parquet"))
        t0 = time.perf_counter()
        stats = compact_shard(cfg, 0, len(rows), time.time())
        comp.append((time.perf_counter() - t0) / n_pairs)
        tar_bytes = stats["bytes"]
    med = statistics.median
    cpu_s = med(per_fmt["jpg"] + per_fmt["png"]) + med(enc) + med(comp)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "source": {"side": args.side, "pixels": src_pixels, "tiles_per_source": args.tiles, "hr_tile": 256},
        "pairs": n_pairs,
        "seconds_per_pair": {
            "decode_jpeg": round(med(per_fmt["jpg"]), 5),
            "decode_png": round(med(per_fmt["png"]), 5),
            "encode_write": round(med(enc), 5),
            "compact": round(med(comp), 5),
            "total_cpu": round(cpu_s, 5),
        },
        "bytes_per_pair": {"tar": round(tar_bytes / n_pairs), "parts": round(part_bytes / n_pairs)},
        "decode_peak_bytes_per_source_pixel": round(peak / src_pixels, 2),
        "sizing": [
            {"gpu_pairs_per_s": r, "cpu_cores_per_gpu": round(r * cpu_s, 2)} for r in (2, 5, 10, 20, 50)
        ],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
