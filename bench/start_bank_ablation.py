"""How well E_deg picks the start from the start bank, against an oracle, on an evaluation's tiles; JSON.

Reads the work folder of a ``kind: evaluate`` run (``<report.dir>/work``): per pipeline, the adapted
checkpoint and the eval tiles (HR and true LR, grouped by photo). For every tile and every bank it
degrades the HR with each bank entry (τ = 0: the start is the output) and reports, averaged over
tiles, the PSNR to the true LR of

- ``single``: the entry whose E_deg embedding is closest to one reference (the other photo's true LR,
  each of them in turn: what the job does for one sample with one reference), and
- ``oracle``: the best entry (needs the truth; an upper bound for the bank),

for the default bank (``realdgen_core.calibrate.start_bank``) and finer grids, all in the same run.

    python bench/start_bank_ablation.py out/eval_codecs/work
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core import calibrate, degrade  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402

BANKS = {
    "default": calibrate.start_bank(4),
    "jpeg_fine": calibrate.start_bank(4, calibrate.DEFAULT_BLUR_SIGMAS, (0, 95, 90, 85, 75, 60, 40)),
    "blur_and_jpeg_fine": calibrate.start_bank(
        4, (0.0, 0.6, 1.0, 1.3, 1.6, 2.2, 3.0), (0, 95, 90, 85, 75, 60, 40)
    ),
}


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@torch.no_grad()
def pipeline(folder: Path) -> dict:
    ckpt = next(folder.glob("data-*/adapt-*/adapted.safetensors"))
    net = LRGenerator.from_checkpoint(str(ckpt)).model.degradation.eval()
    photos: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for hr in sorted(folder.glob("data-*/tiles/hr/*/*.png")):
        lr = Path(str(hr).replace("/hr/", "/lr/"))
        photos.setdefault(hr.parent.name, []).append((load(hr), load(lr)))
    if len(photos) < 2:
        raise SystemExit(f"{folder}: needs tiles of two photos (references come from the other one)")
    refs = {ph: net(torch.cat([lr for _, lr in tiles])) for ph, tiles in photos.items()}
    out = {}
    for name, bank in BANKS.items():
        single, oracle = [], []
        for ph, tiles in photos.items():
            r = torch.cat([refs[q] for q in photos if q != ph])
            for hr, lr in tiles:
                starts = degrade.apply(hr.expand(len(bank), -1, -1, -1), list(bank))
                d = ((net(starts)[:, None] - r[None]) ** 2).mean(-1)  # [bank, refs]
                ps = torch.tensor([psnr(starts[b : b + 1], lr) for b in range(len(bank))])
                single.append(float(ps[d.argmin(0)].mean()))
                oracle.append(float(ps.max()))
        out[name] = {
            "entries": len(bank),
            "single": round(statistics.fmean(single), 3),
            "oracle": round(statistics.fmean(oracle), 3),
        }
    return {"checkpoint": str(ckpt), "tiles": sum(len(t) for t in photos.values()), "banks": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", help="the `work` folder of a kind: evaluate run")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.work)
    result = {
        p.name: pipeline(p)
        for p in sorted(root.iterdir())
        if any(p.glob("data-*/adapt-*/adapted.safetensors"))
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
