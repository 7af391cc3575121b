"""How well a checkpoint's E_deg picks the start, on synthetic codec domains only: a validation score
for choosing between E_deg checkpoints without the realism benchmark; JSON.

Each domain is one draw of D's ``codec`` kind (blur → resize → light noise → JPEG → JPEG, fixed
seeds). Its references are that θ applied to HR tiles of some photos; the job's rule
(``calibrate.domain_start_profile``: default bank, rank rule, reference weights) picks a bank entry
from probe tiles of *other* photos; the score is the PSNR of the picked start to the same θ applied
to the probe tiles (the domain's true LR), against the best single entry with hindsight. The photos
are the calibration split (`pipelines/demo_data.py`), none of them the realism benchmark's.

    python bench/start_choice_synthetic.py checkpoints/realdgen-small-x4.safetensors OTHER.safetensors

Measured (docs/realism.md, "Hard negatives for E_deg"): it ranks the three E_deg checkpoints of that
study in the REVERSE order of their scores on real encoders' output (36.60 / 36.74 / 36.83 dB against
28.08 / 27.47 / 27.42 dB on ten codec pipelines). More stage-B training fits D's own codec family
better and real codecs worse, so this score is no stand-in for them: keep it as a check of that
fit, and choose E_deg checkpoints on real encoders' output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.demo_data import SPLITS, load_photo  # noqa: E402
from realdgen_core import calibrate, degrade  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402

SCALE = 4


def tiles(names: list[str], tile: int, per_photo: int) -> list[torch.Tensor]:
    """``per_photo`` HR tiles [3, tile, tile] in [0, 1] spread over each photo (a fixed grid)."""
    out = []
    for name in names:
        img = torch.from_numpy(np.ascontiguousarray(load_photo(name))).permute(2, 0, 1).float() / 255
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        h, w = img.shape[-2:]
        side = int(np.ceil(np.sqrt(per_photo)))
        ys = np.linspace(0, h - tile, side).astype(int)
        xs = np.linspace(0, w - tile, side).astype(int)
        boxes = [(y, x) for y in ys for x in xs][:per_photo]
        out += [img[:3, y : y + tile, x : x + tile].contiguous() for y, x in boxes]
    return out


def codec_label(theta: dict) -> str:
    """A codec-kind θ in words (its applied ops only)."""
    parts = []
    for op in theta["ops"]:
        if not op.get("applied", True):
            continue
        if op["op"] == "blur":
            parts.append(f"blur σ {op['kernel']['sigma_x']:.2f}")
        elif op["op"] == "resize":
            parts.append(op["mode"])
        elif op["op"] == "gaussian_noise":
            parts.append(f"noise σ {op['sigma']:.1f}")
        elif op["op"] == "jpeg":
            parts.append(f"JPEG q{op['quality']}")
    return " + ".join(parts)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean().clamp_min(1e-5)))  # identical: 50 dB


@torch.no_grad()
def score(ckpt: str, domains: int, seed: int, tile: int, per_photo: int) -> dict:
    net = LRGenerator.from_checkpoint(ckpt).model.degradation.eval()
    photos = list(SPLITS["calibration"])
    probe_hr = tiles(photos[: len(photos) // 2], tile, per_photo)
    ref_hr = torch.stack(tiles(photos[len(photos) // 2 :], tile, per_photo))
    bank = calibrate.start_bank(SCALE)
    starts = [degrade.apply(h[None].expand(len(bank), -1, -1, -1), list(bank)) for h in probe_hr]
    rows = []
    for d in range(domains):
        theta = degrade.sample_theta("codec", SCALE, torch.Generator().manual_seed(seed + d))
        refs = degrade.apply(ref_hr, [theta] * len(ref_hr))
        emb = net(refs)
        w = calibrate.reference_weights(emb, net(torch.stack([calibrate.weight_probe(r) for r in refs])))
        prof = calibrate.domain_start_profile(net, probe_hr, emb, bank, ref_weights=w)
        truth = degrade.apply(torch.stack(probe_hr), [theta] * len(probe_hr))
        table = torch.tensor(
            [[psnr(s[b : b + 1], truth[i : i + 1]) for b in range(len(bank))] for i, s in enumerate(starts)]
        )
        per_entry = table.mean(0)
        rows.append(
            {
                "theta": codec_label(theta),
                "pick": calibrate.theta_label(bank[prof["chosen"]]),
                "pick_psnr": round(float(per_entry[prof["chosen"]]), 3),
                "best_psnr": round(float(per_entry.max()), 3),
                "pick_rank": int((per_entry > per_entry[prof["chosen"]]).sum()),
            }
        )
    return {
        "checkpoint": ckpt,
        "mean_pick_psnr": round(statistics.fmean(r["pick_psnr"] for r in rows), 3),
        "mean_gap_to_best": round(statistics.fmean(r["best_psnr"] - r["pick_psnr"] for r in rows), 3),
        "mean_pick_rank": round(statistics.fmean(r["pick_rank"] for r in rows), 2),
        "domains": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--domains", type=int, default=24)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--tile", type=int, default=128, help="HR tile side (a multiple of 4)")
    ap.add_argument("--per-photo", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for c in args.checkpoints:
        t0 = time.perf_counter()
        res = score(c, args.domains, args.seed, args.tile, args.per_photo)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out.append(res)
        print(f"{c}: pick {res['mean_pick_psnr']} dB, gap {res['mean_gap_to_best']} dB", file=sys.stderr)
    settings = {k: getattr(args, k) for k in ("domains", "seed", "tile", "per_photo")}
    print(json.dumps({"settings": settings, "results": out}, indent=1))


if __name__ == "__main__":
    main()
