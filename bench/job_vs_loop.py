"""Throughput of the Ray generation job vs a plain loop calling LRGenerator on the same inputs.

Both sides do the same work per pair: decode the HR image, cut the same tiles, generate with
the same checkpoint/k/τ range/seeds, encode PNGs. The job runs in a fresh process with its own
embedded Ray (its wall time includes Ray start-up; its generation-phase rate is reported too);
the loop runs in this process with the same number of torch threads the job's actor gets.
Prints one JSON object with the ratios.

    python bench/job_vs_loop.py [--checkpoint PATH] [--inputs 6] [--k 2] [--tau-max 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipelines.generate.stages import base_key, derive_seed, sample_key, tile_boxes  # noqa: E402
from pipelines.sources import SourceItem, load_image  # noqa: E402
from realdgen_core.shards import encode_png  # noqa: E402


def checkpoint_path(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    demo = REPO / "checkpoints" / "realdgen-small-x4.safetensors"
    if demo.exists():
        return demo
    from realdgen_core.checkpoint import save_checkpoint
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    torch.manual_seed(0)
    path = tmp / "tiny.safetensors"
    save_checkpoint(path, build_model(preset("tiny")))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="default: the demo checkpoint, else a tiny random one")
    ap.add_argument("--inputs", type=int, default=6)
    ap.add_argument("--tile", type=int, default=32, help="LR tile edge")
    ap.add_argument("--tiles", type=int, default=2, help="tiles per image")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--tau-max", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (loop and each actor)")
    ap.add_argument("--actors", type=int, default=1, help="generation actors of the job")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="rdg-jvl-") as tmp_s:
        tmp = Path(tmp_s)
        ckpt = checkpoint_path(args.checkpoint, tmp)
        from realdgen_core.checkpoint import load_checkpoint

        scale = load_checkpoint(ckpt)[0].config.scale
        from skimage import data as skd

        hr_dir, ref_dir = tmp / "hr", tmp / "refs"
        hr_dir.mkdir()
        ref_dir.mkdir()
        names = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera"]
        for i in range(args.inputs):
            img = np.asarray(getattr(skd, names[i % len(names)])())
            img = np.repeat(img[..., None], 3, 2) if img.ndim == 2 else img[..., :3]
            Image.fromarray(np.ascontiguousarray(img[(i // len(names)) * 16 :][:256, :256])).save(
                hr_dir / f"{i:03d}.png"
            )
        Image.fromarray(np.asarray(skd.chelsea())[::scale, ::scale]).save(ref_dir / "ref.png")

        manifest = {
            "kind": "generate",
            "seed": 0,
            "scale": scale,
            "hr": {"uri": str(hr_dir)},
            "refs": [{"name": "r", "source": {"uri": str(ref_dir)}}],
            "generator": {
                "kind": "realdgen",
                "checkpoint": str(ckpt),
                "k": args.k,
                "tau_max": args.tau_max,
                "calibration": "off",
            },  # the loop below runs the paper's start: same work
            "tiling": {"tile": args.tile, "max_tiles_per_image": args.tiles},
            "output": {"uri": str(tmp / "out"), "inputs_per_shard": 2, "preview": False},
            "compute": {
                "batch_size": 4,
                "torch_threads": args.threads,
                "actors": {"min": args.actors, "max": args.actors},
                "actor_num_cpus": 0.5,
                "task_num_cpus": 0.5,
            },
            "progress": {"bar": False},
        }
        mpath = tmp / "m.yaml"
        mpath.write_text(yaml.safe_dump(manifest))

        def job_once() -> tuple[dict, float]:
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            t0 = time.perf_counter()
            cmd = [
                sys.executable,
                str(REPO / "pipelines" / "generate_dataset.py"),
                str(mpath),
                "--set",
                "output.mode=overwrite",
            ]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(r.stderr[-3000:])
            return json.loads(r.stdout.strip().splitlines()[-1]), time.perf_counter() - t0

        def loop_once() -> tuple[int, float]:
            """The plain loop: same tiles, seeds and reference, one process, no Ray."""
            from realdgen_core.generator import LRGenerator

            torch.set_num_threads(args.threads)
            t0 = time.perf_counter()
            gen = LRGenerator.from_checkpoint(ckpt)
            ref = load_image(SourceItem(str(ref_dir / "ref.png"), str(ref_dir / "ref.png")))
            bank = gen.degradation_embeddings([torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255])
            pairs = 0
            for p in sorted(hr_dir.iterdir()):
                uri = str(p)
                img = load_image(SourceItem(uri, uri))
                key = base_key(uri)
                boxes = tile_boxes(
                    img.shape[1], img.shape[0], args.tile * scale, "grid", args.tiles, derive_seed(0, key)
                )
                for ti, (x0, y0, x1, y1) in enumerate(boxes):
                    tile = np.ascontiguousarray(img[y0:y1, x0:x1])
                    hr = torch.from_numpy(tile).permute(2, 0, 1)[None].float() / 255
                    seed = derive_seed(0, sample_key(key, ti, 0, 1))
                    res = gen.generate(
                        hr, k=args.k, tau_range=(0, args.tau_max), seeds=[seed], ref_embeddings=bank
                    )
                    encode_png((res.lr[0] * 255).round().byte().permute(1, 2, 0).numpy())
                    encode_png(tile)
                    pairs += 1
            return pairs, time.perf_counter() - t0

        # loop, job, loop: the machine is shared, so the loop brackets the job in time.
        pairs, loop_a = loop_once()
        job, job_wall = job_once()
        _, loop_b = loop_once()
        loop_wall = (loop_a + loop_b) / 2

    loop_rate = pairs / loop_wall
    print(
        json.dumps(
            {
                "bench": "job_vs_loop",
                "checkpoint": ckpt.name,
                "k": args.k,
                "tau_max": args.tau_max,
                "tile_lr": args.tile,
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "actors": args.actors,
                "job": {
                    "pairs": job["pairs"],
                    "wall_s": round(job_wall, 2),
                    "generate_s": job["generate_seconds"],
                    "pairs_per_s_wall": round(job["pairs"] / job_wall, 3),
                    "pairs_per_s_generate": job["pairs_per_s"],
                },
                "loop": {
                    "pairs": pairs,
                    "wall_s": [round(loop_a, 2), round(loop_b, 2)],
                    "pairs_per_s": round(loop_rate, 3),
                },
                "load_avg_1m": os.getloadavg()[0],
                "ratio_job_over_loop_wall": round(job["pairs"] / job_wall / loop_rate, 3),
                "ratio_job_over_loop_generate": round(job["pairs_per_s"] / loop_rate, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
