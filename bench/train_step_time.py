"""Seconds per training step of each phase (A1, A2, B, C) for the tiny and small presets on this CPU.

Prints JSON: per preset and phase, the median step time, the median time of drawing the batch alone
(crops + degradations: the data side of the step), and the ratio small/tiny measured in the same run.
Batch settings are read from manifests/train_demo.yaml (small) and manifests/train_tiny.yaml (tiny); pass
``--threads`` to set torch's intra-op threads (1 is fastest on a shared 2-core machine).

    python bench/train_step_time.py --steps 5 --out bench/train_step_time.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realdgen_core.config import preset  # noqa: E402
from realdgen_core.models import build_model  # noqa: E402
from realdgen_core.train import (  # noqa: E402
    ArrayCropSampler,
    ContentFinetune,
    ContentPretrain,
    ContentStageConfig,
    DegradationStageConfig,
    DegradationTrain,
    DiffusionStageConfig,
    DiffusionTrain,
    MixtureSampler,
    SyntheticLRSampler,
)
from realdgen_core.train.data import CameraLRSampler  # noqa: E402

MANIFESTS = {"tiny": "manifests/train_tiny.yaml", "small": "manifests/train_demo.yaml"}


def settings(name: str) -> dict:
    """Stage settings (batch sizes, crops) of the manifest that trains this preset; for ``paper``, the
    paper's stage C (batch 8 of 256x256 LR, A.3) with 256x256 HR crops for A and 64x64 LR for B.
    The paper branch needs no pydantic (GPU images may lack the pipelines' dependencies)."""
    if name == "paper":
        return {
            "A": ContentStageConfig(pretrain_steps=10**6, finetune_steps=10**6, batch_size=8, hr_crop=256),
            "B": DegradationStageConfig(steps=10**6, batch_size=8, lr_crop=64),
            "C": DiffusionStageConfig(steps=10**6, batch_size=8, lr_crop=256),
        }
    from pipelines.manifest import load_manifest

    m = load_manifest(Path(__file__).resolve().parent.parent / MANIFESTS[name], kind="train")
    big = {"pretrain_steps": 10**6, "finetune_steps": 10**6}
    return {
        "A": m.stage_a.model_copy(update=big).to_core(),
        "B": m.stage_b.model_copy(update={"steps": 10**6}).to_core(),
        "C": m.stage_c.model_copy(update={"steps": 10**6}).to_core(),
    }


def photos(min_side: int = 0) -> list[np.ndarray]:
    """Three scikit-image photos; upscaled (bicubic) so the shorter side is ≥ ``min_side`` — stage C
    of ``paper`` crops 256² LR from 1024² HR, larger than the bundled photos."""
    from PIL import Image
    from skimage import data

    out = []
    for n in ("astronaut", "coffee", "rocket"):
        im = np.ascontiguousarray(getattr(data, n)()[..., :3])
        if min(im.shape[:2]) < min_side:
            f = min_side / min(im.shape[:2])
            size = (round(im.shape[1] * f) + 1, round(im.shape[0] * f) + 1)
            im = np.asarray(Image.fromarray(im).resize(size, Image.BICUBIC))
        out.append(im)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(phase, steps: int) -> dict:
    device = phase.device
    phase.train_step()  # warm-up (allocations, first-touch, kernel selection)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s, batch_s = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        phase.batch()
        batch_s.append(time.perf_counter() - t0)
        _sync(device)
        t0 = time.perf_counter()
        phase.train_step()
        _sync(device)
        step_s.append(time.perf_counter() - t0)
    out = {
        "step_s": round(statistics.median(step_s), 4),
        "batch_s": round(statistics.median(batch_s), 4),
        "min_step_s": round(min(step_s), 4),
    }
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (reports peak memory on cuda)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    need = 4 * 256 + 16 if "paper" in args.presets.split(",") else 0
    hr = ArrayCropSampler(photos(need))
    result: dict = {
        "threads": args.threads,
        "steps": args.steps,
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "presets": {},
    }
    for name in args.presets.split(","):
        cfg = settings(name)
        model = build_model(preset(name, 4), seed=0).to(args.device)
        lr = MixtureSampler([SyntheticLRSampler(hr, ("realesrgan", "bsrgan"), 4), CameraLRSampler(hr, 4)])
        out = {}
        out["A1_content_pretrain"] = time_phase(ContentPretrain(model, cfg["A"], hr), args.steps)
        out["A2_content_finetune"] = time_phase(ContentFinetune(model, cfg["A"], hr), args.steps)
        out["B_degradation"] = time_phase(DegradationTrain(model, cfg["B"], hr), args.steps)
        out["C_diffusion"] = time_phase(DiffusionTrain(model, cfg["C"], lr), args.steps)
        out["settings"] = {k: v.to_dict() for k, v in cfg.items()}
        result["presets"][name] = out
        print(json.dumps({name: {k: v for k, v in out.items() if k != "settings"}}), file=sys.stderr)
    if "tiny" in result["presets"] and "small" in result["presets"]:
        t, s = result["presets"]["tiny"], result["presets"]["small"]
        result["small_over_tiny"] = {
            k: round(s[k]["step_s"] / t[k]["step_s"], 2) for k in t if k != "settings"
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
