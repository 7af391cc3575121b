"""How well E_deg picks the start from the start bank, against an oracle, on an evaluation's tiles; JSON.

Reads the work folder of a ``kind: evaluate`` run (``<report.dir>/work``): per pipeline, the adapted
checkpoint and the eval tiles (HR and true LR, grouped by photo). For every tile and every bank it
degrades the HR with each bank entry (τ = 0: the start is the output) and reports, averaged over
tiles, the PSNR to the true LR of

- ``single``: the entry whose E_deg embedding is closest to one reference (the other photo's true LR,
  each of them in turn: ``generator.start_choice: sample``, one sample with one reference);
- ``domain``: the job's per-domain choice (``start_choice: domain``, the default): one entry per
  photo, chosen by ``calibrate.domain_start_profile`` from all of that photo's tiles against all of
  the other photo's true LR (what one job of the evaluation sees);
- ``domain_refs_train`` (with ``--refs-root``): the same choice against the pipeline's
  ``refs_train/`` instead (the SR proxy's situation: references whose scenes differ from the HR's);
- ``domain_uniform`` / ``domain_refs_train_uniform``: both per-domain choices with every reference
  weighted the same (``generator.start_ref_weighting: uniform``; the default weights each reference
  by ``calibrate.reference_weights``);
- ``*_distance``: each of those four choices made by the lowest mean error instead of the lowest mean
  rank (``generator.start_aggregate: distance``, the rule before ``rank``; same profile, same run);
- ``best_fixed``: the one entry best for the whole pipeline, and ``oracle``: the best entry per tile
  (both need the truth; upper bounds for the bank),

for the previous 20-entry bank and the default 49-entry bank (``calibrate.start_bank``), in one run.

    python bench/start_bank_ablation.py out/eval_codecs/work --refs-root /work/codec_bench
    python bench/start_bank_ablation.py /work/codec_more --checkpoint \\
        checkpoints/realdgen-small-x4.safetensors

With ``--checkpoint`` the tiles come straight from a benchmark root's ``<pipeline>/hr,lr`` and every
pipeline is scored with that one checkpoint, not adapted: no evaluation run is needed, so the start
rules can be compared on many pipelines (the adaptation's stage C moves E_deg's last conv only at
``finetune_lr`` 1e-6).
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
    "previous_20": calibrate.start_bank(4, (0.0, 1.0, 1.6, 2.2, 3.0), (0, 85, 60, 40)),
    "default_49": calibrate.start_bank(4),
}


def load(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float()[None] / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def embed(net: torch.nn.Module, images: list[torch.Tensor], chunk: int = 16) -> torch.Tensor:
    return torch.cat([net(torch.cat(images[i : i + chunk])) for i in range(0, len(images), chunk)])


def work_pipeline(folder: Path) -> tuple[Path, dict]:
    """A ``kind: evaluate`` run's pipeline folder: its newest adapted checkpoint and its eval tiles."""
    # the newest finished adaptation (a work folder keeps older ones, e.g. of an earlier start bank)
    done = max(folder.glob("data-*/adapt-*/_done.json"), key=lambda p: p.stat().st_mtime)
    photos: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for hr in sorted(folder.glob("data-*/tiles/hr/*/*.png")):
        lr = Path(str(hr).replace("/hr/", "/lr/"))
        photos.setdefault(hr.parent.name, []).append((load(hr), load(lr)))
    return done.parent / "adapted.safetensors", photos


def codec_pipeline(folder: Path) -> dict:
    """A benchmark pipeline folder (``hr/`` + ``lr/``, names ``<photo>_<y>_<x>.png``): its tiles by photo."""
    photos: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for hr in sorted((folder / "hr").glob("*.png")):
        photos.setdefault(hr.stem.rsplit("_", 2)[0], []).append((load(hr), load(folder / "lr" / hr.name)))
    return photos


@torch.no_grad()
def pipeline(folder: Path, refs_train: Path | None, ckpt: Path, photos: dict) -> dict:
    net = LRGenerator.from_checkpoint(str(ckpt)).model.degradation.eval()
    if len(photos) < 2:
        raise SystemExit(f"{folder}: needs tiles of two photos (references come from the other one)")
    refs = {ph: embed(net, [lr for _, lr in tiles]) for ph, tiles in photos.items()}
    weights = {
        ph: calibrate.reference_weights(refs[ph], embed(net, [calibrate.weight_probe(lr) for _, lr in tiles]))
        for ph, tiles in photos.items()
    }
    train_emb = train_w = None
    if refs_train:
        train = [load(p) for p in sorted(refs_train.glob("*.png"))]
        train_emb = embed(net, train)
        train_w = calibrate.reference_weights(
            train_emb, embed(net, [calibrate.weight_probe(t) for t in train])
        )
    out = {}
    for name, bank in BANKS.items():
        psnrs: list[torch.Tensor] = []  # per tile: [len(bank)]
        base = ("domain", "domain_uniform", "domain_refs_train", "domain_refs_train_uniform")
        keys = base + tuple(f"{k}_distance" for k in base)
        rows: dict[str, list[float]] = {"single": [], **{k: [] for k in keys}}
        picks: dict[str, list[str]] = {k: [] for k in keys}
        for ph, tiles in photos.items():
            r = torch.cat([refs[q] for q in photos if q != ph])
            rw = torch.cat([weights[q] for q in photos if q != ph])
            hrs = [hr[0] for hr, _ in tiles]
            ps_photo = []
            for hr, lr in tiles:
                starts = degrade.apply(hr.expand(len(bank), -1, -1, -1), list(bank))
                d = ((net(starts)[:, None] - r[None]) ** 2).mean(-1)  # [bank, refs]
                ps = torch.tensor([psnr(starts[b : b + 1], lr) for b in range(len(bank))])
                rows["single"].append(float(ps[d.argmin(0)].mean()))
                ps_photo.append(ps)
            psnrs += ps_photo
            for key, emb, w in (
                ("domain", r, rw),
                ("domain_uniform", r, None),
                ("domain_refs_train", train_emb, train_w),
                ("domain_refs_train_uniform", train_emb, None),
            ):
                if emb is None:
                    continue
                prof = calibrate.domain_start_profile(net, hrs, emb, bank, ref_weights=w)  # rank
                by_distance = min(range(len(bank)), key=lambda i: (prof["errors"][i], i))
                for k, b in ((key, prof["chosen"]), (f"{key}_distance", by_distance)):
                    rows[k] += [float(p[b]) for p in ps_photo]
                    picks[k].append(f"{ph}: {calibrate.theta_label(bank[b])}")
        table = torch.stack(psnrs)
        res = {k: round(statistics.fmean(v), 3) for k, v in rows.items() if v}
        best = int(table.mean(0).argmax())
        res |= {
            "best_fixed": round(float(table.mean(0).max()), 3),
            "best_fixed_entry": calibrate.theta_label(bank[best]),
            "oracle": round(float(table.max(1).values.mean()), 3),
            "entries": len(bank),
            "domain_picks": {k: v for k, v in picks.items() if v},
        }
        out[name] = res
    return {"checkpoint": str(ckpt), "tiles": sum(len(t) for t in photos.values()), "banks": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "work", help="the `work` folder of a kind: evaluate run, or with --checkpoint a benchmark root"
    )
    ap.add_argument("--refs-root", help="the benchmark root (<pipeline>/refs_train/): adds domain_refs_train")
    ap.add_argument(
        "--checkpoint",
        help="score this checkpoint (not adapted) on every <pipeline>/hr,lr of WORK, a benchmark root "
        "(make_codec_pairs.py's layout); refs_train/ is read from there too",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.work)
    result = {}
    for p in sorted(root.iterdir()):
        if args.checkpoint:
            if not (p / "hr").is_dir():
                continue
            ckpt, photos, rt = Path(args.checkpoint), codec_pipeline(p), p / "refs_train"
        else:
            if not any(p.glob("data-*/adapt-*/_done.json")):
                continue
            ckpt, photos = work_pipeline(p)
            rt = Path(args.refs_root) / p.name / "refs_train" if args.refs_root else None
        result[p.name] = pipeline(p, rt if rt is not None and rt.is_dir() else None, ckpt, photos)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
