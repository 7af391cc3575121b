"""Peak memory of the reference task (``prepare_references``) against the number of references:
each reference embedded as it is decoded (2026-12-08), against the task it replaced, which held
every decoded reference (float32, 12 B per pixel) until the last was read, measured in the same run.

A fresh process per case runs the task on ``--n`` references (``--side`` pixels square, noise over
a photo, PNG) with the start choice on (a domain profile over 4 probe tiles, as the job's default)
and reports its peak RSS (VmHWM) minus its RSS once the checkpoint is loaded. ``stream`` is the task
as the job runs it, on ``--n`` and on ``--n // 8`` references; ``held`` is the old task, kept here as
the baseline: decode all, then embed all, then the profile from the images. ``same`` is true when
both give the same bank and profile. ``ok``: the same results, the streamed task's peak on ``n``
references under a quarter of the held one's, and its growth from ``n // 8`` to ``n`` references
under a quarter of what the ``n`` images alone take as float32 (12 B a pixel; the held task's peak
is several times that: it also stacks them, and blurs them all for the reference weights).

    python bench/reference_memory.py [--n 144] [--side 384] [--dir /tmp/reference_memory]
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
import hashlib, json, sys
sys.path.insert(0, sys.argv[4])
import numpy as np, torch


def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


mode, spec, ckpt = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
from pipelines.generate.references import _probe_tiles, prepare_references
from pipelines.sources import SourceItem, load_image
from realdgen_core import calibrate
from realdgen_core.generator import LRGenerator

refs, start = spec["refs"], spec["start"]
start["bank"] = list(calibrate.start_bank(4, (0.0, 2.0), (0, 30)))
gen = LRGenerator.from_checkpoint(ckpt, device="cpu")  # loaded once here, so both count from it
before = rss("VmRSS")
if mode == "stream":
    ok, _, bank, profiles, _ = prepare_references(refs, "realdgen", ckpt, {}, 10**8, "cpu", start)
    profile = profiles["set:s"]
else:  # the task before 2026-12-08: every reference held until the last is read
    images = []
    for r in refs:
        img = load_image(SourceItem.from_row(r), {}, max_pixels=10**8)
        images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0))
    emb = gen.degradation_embeddings(images)
    bank = emb.numpy().astype(np.float32)
    tiles = _probe_tiles(start["probe"], {}, 10**8, int(start["tile_hr"]), start["n_tiles"])
    profile = gen.domain_start(tiles, images, start["bank"], ref_embeddings=emb)
peak = rss("VmHWM")
digest = hashlib.sha256(bank.tobytes() + repr((profile["chosen"], profile["ranks"])).encode()).hexdigest()
print(json.dumps({"growth_bytes": peak - before, "result": digest[:16]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=144)
    ap.add_argument("--side", type=int, default=384)
    ap.add_argument("--dir", default="/tmp/reference_memory")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from skimage import data

    from realdgen_core.checkpoint import save_checkpoint
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    ckpt = d / "tiny.safetensors"
    save_checkpoint(ckpt, build_model(preset("tiny")))
    photo = np.asarray(Image.fromarray(data.astronaut()).resize((a.side, a.side), Image.BICUBIC), np.int16)
    rng = np.random.default_rng(0)
    refs = []
    for i in range(a.n):
        p = d / f"ref{i:04d}.png"
        if not p.exists():
            noisy = np.clip(photo + rng.normal(0, 4 + i % 8, photo.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(p)
        refs.append({"uri": str(p), "path": str(p), "set": "s", "domain": None})
    probe = []
    for name in ("coffee", "rocket"):
        p = d / f"hr_{name}.png"
        Image.fromarray(getattr(data, name)()).save(p)
        probe.append({"uri": str(p), "path": str(p)})
    start = {"probe": probe, "tile_hr": 64, "n_tiles": 4}

    def run(mode: str, n: int) -> dict:
        spec = json.dumps({"refs": refs[:n], "start": start})
        out = subprocess.run(
            [sys.executable, "-c", CHILD, mode, spec, str(ckpt), str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    small, large, held = run("stream", max(1, a.n // 8)), run("stream", a.n), run("held", a.n)
    held_images = 12 * a.side * a.side * a.n
    stream_growth = large["growth_bytes"] - small["growth_bytes"]
    report = {
        "references": a.n,
        "side": a.side,
        "images_held_mb": round(held_images / 2**20, 1),
        "stream_peak_growth_mb": {
            str(max(1, a.n // 8)): round(small["growth_bytes"] / 2**20, 1),
            str(a.n): round(large["growth_bytes"] / 2**20, 1),
        },
        "held_peak_growth_mb": {str(a.n): round(held["growth_bytes"] / 2**20, 1)},
        "stream_growth_with_n_mb": round(stream_growth / 2**20, 1),
        "same": large["result"] == held["result"],
    }
    lean = large["growth_bytes"] < held["growth_bytes"] / 4 and stream_growth < held_images / 4
    report["ok"] = report["same"] and lean
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
