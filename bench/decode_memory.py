"""Peak memory of decoding one large image: ``sources.decode_image`` against the conversion it
replaced (2026-12-08), measured in the same run on the same files.

For each kind of file (RGB, grey, palette and RGBA PNG, 16-bit grey PNG, JPEG; ``--side`` pixels
square, default 8000 = 64 MP, the default ``limits.max_image_pixels``), a fresh process reads the
file's bytes and decodes them once, and reports its peak RSS growth (VmHWM minus the RSS before
the read: a decode task holds the file's bytes while it decodes) per pixel, with and without the
file's bytes. ``before`` is the old decode, kept here as the baseline: the
opened image held while ``ImageOps.exif_transpose`` returned a copy of it, 16-bit data through
float64, the alpha composite of the whole image at once. Both must give the same array
(``same_pixels``). The job reserves ``decode_task_memory`` (the file's bytes up to
``limits.max_file_bytes`` plus 12 B per pixel) for each decode task: ``ok`` is true when every
``after`` peak fits under the reservation for a file of that size and every output is the same.

    python bench/decode_memory.py [--side 8000] [--dir /tmp/decode_memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, io, json, sys
import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, sys.argv[3])
from pipelines.sources import decode_image


def before(data):
    with Image.open(io.BytesIO(data)) as original:  # held until the array is made, as it was
        original.load()
        return np.ascontiguousarray(convert(ImageOps.exif_transpose(original)))


def convert(im):
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024


base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
data = open(sys.argv[1], "rb").read()  # a decode task holds the file's bytes while it decodes
out = before(data) if sys.argv[2] == "before" else decode_image(data, max_pixels=10**10)
peak = status("VmHWM") - base
print(json.dumps({"peak": peak, "pixels": out.shape[0] * out.shape[1],
                  "sha256": hashlib.sha256(np.ascontiguousarray(out).tobytes()).hexdigest()}))
"""


def make_files(folder: Path, side: int) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # smooth-ish content (compresses like a photo, not like noise) with some noise
    y, x = np.mgrid[0:side, 0:side]
    base = ((np.sin(x / 97.0) + np.cos(y / 61.0)) * 60 + 128).astype(np.int16)
    rgb = np.stack([base, base[::-1], base[:, ::-1]], axis=2)
    rgb = np.clip(rgb + rng.integers(-8, 9, rgb.shape), 0, 255).astype(np.uint8)
    files = {
        "rgb_png": (Image.fromarray(rgb), "png"),
        "grey_png": (Image.fromarray(rgb[..., 0]), "png"),
        "palette_png": (Image.fromarray(rgb).quantize(64), "png"),
        "rgba_png": (Image.fromarray(np.dstack([rgb, rgb[..., 1]])), "png"),
        "grey16_png": (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 3), "png"),
        "rgb_jpeg": (Image.fromarray(rgb), "jpg"),
    }
    paths = {}
    for name, (img, ext) in files.items():
        p = folder / f"{name}_{side}.{ext}"
        if not p.exists():
            img.save(p, quality=90) if ext == "jpg" else img.save(p)
        paths[name] = p
    return paths


def measure(path: Path, which: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), which, str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=8000)
    ap.add_argument("--dir", default="/tmp/decode_memory")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from pipelines.generate.job import decode_task_memory

    px = args.side * args.side
    rows = {}
    for name, path in make_files(Path(args.dir), args.side).items():
        b, a = measure(path, "before"), measure(path, "after")
        size = path.stat().st_size
        reserved = decode_task_memory(px, size)
        rows[name] = {
            "file_mb": round(size / 2**20, 1),
            "before_b_per_px": round((b["peak"] - size) / px, 1),
            "after_b_per_px": round((a["peak"] - size) / px, 1),
            "after_mib_with_file": round(a["peak"] / 2**20),
            "reserved_mib": round(reserved / 2**20),
            "fits": a["peak"] <= reserved,
            "same_pixels": a["sha256"] == b["sha256"],
        }
    ok = all(r["same_pixels"] and r["fits"] for r in rows.values())
    print(
        json.dumps(
            {
                "side": args.side,
                "decode_b_per_px": "peak less the file's bytes, per pixel",
                "files": rows,
                "ok": ok,
            },
            indent=2,
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
