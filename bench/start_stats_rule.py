"""Pick the start by matching low-level statistics of the references instead of E_deg: measured; JSON.

The issue's noise-gap miss on JPEG-reshare asks whether a rule that looks at the references'
noise level, Laplacian energy and 8×8 blockiness (``realdgen_core.realism``, the evaluation's own
statistics, all computable from unpaired LR) chooses the start degradation better than E_deg's
per-domain rank rule (``calibrate.domain_start_profile``, the job's default). For every pipeline
of a benchmark root (``<pipeline>/hr,lr,refs_train``) and each photo of its eval tiles, with the
given checkpoint (not adapted), every entry of the default 49-entry bank degrades the photo's HR
tiles (τ = 0: the start is the output). Rules:

- ``job``: the job's rule (E_deg, rank, reference weights);
- ``s_<stats>``: the entry whose median statistics over the photo's tiles are closest to the
  references' medians (squared difference of the logs, summed over the named statistics:
  ``all`` = noise + laplacian + blockiness, ``noise``, ``block``, ``noise_block``, ``lap_block``);
- ``h<m>_s_<stats>``: a hybrid, the same statistics choosing among the job's m best-ranked entries;
- ``best_fixed_photo``: the entry best for the photo (needs the truth; an upper bound).

Each rule is scored by the mean over the tiles of the PSNR to the true LR and of the noise-level
gap (as the evaluation computes it), with two reference sets: ``eval`` (the other photo's true LR,
same scenes as a job on that photo sees) and ``refs_train`` (the pipeline's unpaired LR, other scenes).

    python bench/start_stats_rule.py /work/codec_bench /work/codec_variant /work/codec_more \\
        --checkpoint checkpoints/realdgen-small-x4.safetensors > start_stats_rule.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from start_bank_ablation import codec_pipeline, embed, load, psnr  # noqa: E402

from realdgen_core import calibrate, degrade, realism  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402

BANK = calibrate.start_bank(4)
STAT_WEIGHTS = {
    "all": (1, 1, 1),
    "noise": (1, 0, 0),
    "block": (0, 0, 1),
    "noise_block": (1, 0, 1),
    "lap_block": (0, 1, 1),
}
HYBRID_TOP = (5, 10)


def to_u8(t: torch.Tensor) -> np.ndarray:
    """[3,H,W] float in [0,1] → HWC uint8."""
    return (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def log_stats(imgs: list[np.ndarray]) -> np.ndarray:
    """[N, 3]: log noise, log Laplacian energy, log blockiness (floored like the evaluation's gaps)."""
    rows = []
    for img in imgs:
        s = realism.lr_stats(img)
        rows.append([np.log(max(s[k], realism.GAP_FLOORS[k])) for k in realism.STATS])
    return np.array(rows)


def bank_scores(hr: torch.Tensor, lr: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
    """One tile: every bank entry's start of ``hr``, its PSNR to the true ``lr`` and its noise-level gap."""
    starts = degrade.apply(hr.expand(len(BANK), -1, -1, -1), list(BANK))
    true_noise = realism.noise_level(to_u8(lr[0]))
    ps = [psnr(starts[b : b + 1], lr) for b in range(len(BANK))]
    gaps = [
        realism.relative_gap(realism.noise_level(to_u8(s)), true_noise, realism.GAP_FLOORS["noise"])
        for s in starts
    ]
    return starts, ps, gaps


def add_picks(rows: dict, picks: dict[str, int], ps: np.ndarray, gaps: np.ndarray, photo: str) -> None:
    """Record each rule's pick for one photo: its tiles' PSNR and noise gaps ([tiles, bank] arrays)."""
    for rule, b in picks.items():
        row = rows.setdefault(rule, {"psnr": [], "noise_gap": [], "picks": []})
        row["psnr"] += ps[:, b].tolist()
        row["noise_gap"] += gaps[:, b].tolist()
        row["picks"].append(f"{photo}: {calibrate.theta_label(BANK[b])}")


def summarise(rows: dict) -> dict:
    return {
        rule: {
            "psnr": round(statistics.fmean(r["psnr"]), 3),
            "noise_gap": round(statistics.fmean(r["noise_gap"]), 3),
            "picks": r["picks"],
        }
        for rule, r in rows.items()
    }


@torch.no_grad()
def pipeline(folder: Path, ckpt: Path) -> dict:
    net = LRGenerator.from_checkpoint(str(ckpt)).model.degradation.eval()
    photos = codec_pipeline(folder)
    if len(photos) < 2:
        raise SystemExit(f"{folder}: needs tiles of two photos (references come from the other one)")
    train = [load(p) for p in sorted((folder / "refs_train").glob("*.png"))]
    scored = {}  # photo → psnr [tiles, bank], noise gap [tiles, bank], median log stats [bank, 3]
    for ph, tiles in photos.items():
        ps, gaps, stats = [], [], []
        for hr, lr in tiles:
            starts, p, g = bank_scores(hr, lr)
            ps.append(p)
            gaps.append(g)
            stats.append(log_stats([to_u8(s) for s in starts]))
        scored[ph] = (np.array(ps), np.array(gaps), np.median(np.stack(stats), 0))
    out: dict = {"tiles": sum(len(t) for t in photos.values())}
    for refkind in ("eval", "refs_train"):
        rows: dict[str, dict[str, list]] = {}
        for ph, tiles in photos.items():
            refs = [lr for q in photos if q != ph for _, lr in photos[q]] if refkind == "eval" else train
            emb = embed(net, refs)
            weights = calibrate.reference_weights(emb, embed(net, [calibrate.weight_probe(x) for x in refs]))
            hrs = [hr[0] for hr, _ in tiles]
            prof = calibrate.domain_start_profile(net, hrs, emb, BANK, ref_weights=weights)
            ps, gaps, stats = scored[ph]
            diff2 = (stats - np.median(log_stats([to_u8(x[0]) for x in refs]), 0)[None]) ** 2  # [bank, 3]
            by_rank = np.argsort(np.array(prof["ranks"]), kind="stable")
            picks = {"job": prof["chosen"]}
            for name, w in STAT_WEIGHTS.items():
                cost = (diff2 * np.array(w)[None]).sum(1)
                picks[f"s_{name}"] = int(np.argmin(cost))
                for m in HYBRID_TOP:
                    top = by_rank[:m]
                    picks[f"h{m}_s_{name}"] = int(top[np.argmin(cost[top])])
            picks["best_fixed_photo"] = int(ps.mean(0).argmax())
            add_picks(rows, picks, ps, gaps, ph)
        out[refkind] = summarise(rows)
    return out


def study_main(pipeline_fn, doc: str) -> None:
    """Score ``pipeline_fn(folder, checkpoint)`` on every pipeline of the roots and print the JSON,
    with the means of every rule and how many pipelines each is better / worse on than ``job``."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", help="benchmark roots (make_codec_pairs.py's layout)")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--jobs", type=int, default=1, help="pipelines scored at once (one thread each)")
    args = ap.parse_args()
    folders = [
        p
        for root in args.roots
        for p in sorted(Path(root).iterdir())
        if (p / "hr").is_dir() and (p / "refs_train").is_dir()
    ]
    result: dict = {"command": " ".join(sys.argv), "checkpoint": args.checkpoint, "pipelines": {}}
    with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        futures = {p.name: pool.submit(pipeline_fn, p, Path(args.checkpoint)) for p in folders}
        for name, fut in futures.items():
            result["pipelines"][name] = fut.result()
            print(name, "done", file=sys.stderr, flush=True)
    means = {}
    for refkind in ("eval", "refs_train"):
        per_rule = {}
        for rule in next(iter(result["pipelines"].values()))[refkind]:
            vals = [v[refkind][rule] for v in result["pipelines"].values()]
            job = [v[refkind]["job"] for v in result["pipelines"].values()]
            per_rule[rule] = {
                "psnr": round(statistics.fmean(x["psnr"] for x in vals), 3),
                "noise_gap": round(statistics.fmean(x["noise_gap"] for x in vals), 3),
                "psnr_better_worse_than_job": [
                    sum(x["psnr"] > j["psnr"] + 1e-9 for x, j in zip(vals, job, strict=True)),
                    sum(x["psnr"] < j["psnr"] - 1e-9 for x, j in zip(vals, job, strict=True)),
                ],
            }
        means[refkind] = per_rule
    result["mean"] = means
    print(json.dumps(result, indent=1))


def main() -> None:
    study_main(pipeline, __doc__)


if __name__ == "__main__":
    main()
