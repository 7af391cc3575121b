"""Which start of the bank trains the best SR proxy per pipeline, and how close its LR are to the truth; JSON.

Every pipeline's calibration sets τ_max = 0 (``docs/realism_report/calibrations.json``), so the
learned generator's SR-proxy training LR is one entry of the start bank (``calibrate.start_bank``),
chosen from the references by E_deg. This script asks what the best possible choice would score:
for every bank entry θ it trains the SR proxy (the manifest's protocol) on ``(h, D(h, θ))`` pairs of
the evaluation's SR-proxy tiles and scores it on the benchmark's real pairs, next to bicubic pairs
and the true pipeline's pairs of the same tiles (cut from the pipeline's LR of the whole photo, as
``sr_proxy_ceiling.py --whole-photo``), and reports how close each entry's LR are to that truth
(PSNR, and the ratios of noise level and Laplacian energy, ``realdgen_core.realism``).

The scan trains one seeded net per entry (``--scan-repeats``); the ``--top`` entries of the scan,
the entry closest to the truth, bicubic pairs and the true pairs are then re-scored with the
manifest's ``sr_proxy.repeats`` seeds (the same seeds for all). Choosing by the SR score is hindsight
on the evaluation's own tiles: an upper bound for any rule that picks one start per pipeline.

    python bench/sr_proxy_start_oracle.py out/eval_codecs [--manifest manifests/evaluate_codecs.yaml]
        [--top 3] [--scan-repeats 1] [--set sr_proxy.steps=1000 ...]

Needs a finished ``kind: evaluate`` run (``<report.dir>/report.json`` and ``work/``) and the
benchmark's tools (ffmpeg, ImageMagick). About 4 min per pipeline on 2 cores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_variant_codecs import PIPELINES as VARIANTS  # noqa: E402
from make_variant_codecs import load_benchmark  # noqa: E402
from sr_proxy_ceiling import (  # noqa: E402
    common_args,
    eval_pairs,
    psnr_to_truth,
    score,
    shared_bicubic,
    truth_crops,
)

from pipelines.manifest import load_manifest  # noqa: E402
from realdgen_core import calibrate, degrade  # noqa: E402
from realdgen_core.realism import lr_stats  # noqa: E402
from realdgen_core.train.data import to_tensor, to_uint8  # noqa: E402


def stat_ratios(lrs: list[np.ndarray], truths: list[np.ndarray | None]) -> dict:
    """Summed noise level and Laplacian energy of ``lrs`` over the truth's (boxes with a truth)."""
    got = [lr_stats(lr) for lr, t in zip(lrs, truths, strict=True) if t is not None]
    want = [lr_stats(t) for t in truths if t is not None]
    return {
        f"{k}_ratio": round(sum(g[k] for g in got) / max(sum(w[k] for w in want), 1e-9), 3)
        for k in ("noise", "laplacian")
    }


def summary(res: dict) -> dict:
    """Readings of one pipeline's result: how many scanned entries beat bicubic pairs trained with the
    scan's first seed, and the correlation over the bank between the SR score and the PSNR to truth."""
    scan = res["scan"]
    sr = np.array([v["sr_psnr"] for v in scan.values()])
    fidelity = np.array([v["psnr_to_truth"] for v in scan.values()])
    return {
        "scan_entries_above_bicubic": int((sr > res["bicubic_pairs"]["runs"][0]).sum()),
        "scan_corr_sr_vs_psnr_to_truth": round(float(np.corrcoef(sr, fidelity)[0, 1]), 3),
    }


def main() -> None:
    ap = common_args(__doc__.split("\n\n")[0])
    ap.add_argument("--top", type=int, default=3, help="scan entries re-scored with the manifest's repeats")
    ap.add_argument("--scan-repeats", type=int, default=1, help="seeded SR nets per entry in the scan")
    ap.add_argument(
        "--from-json",
        metavar="FILE",
        help="recompute the readings (summary) of an earlier output FILE without training; prints it",
    )
    args = ap.parse_args()
    if args.from_json:
        prev = json.loads(Path(args.from_json).read_text())
        for res in prev.values():
            if isinstance(res, dict) and "scan" in res:
                res.update(summary(res))
        print(json.dumps(prev, indent=1))
        return
    torch.set_num_threads(args.threads)
    m = load_manifest(args.manifest, args.set, kind="evaluate")
    sp, scale = m.sr_proxy, m.scale
    mcp = load_benchmark(args.benchmark)
    rep_dir = Path(args.report_dir)
    report = json.loads((rep_dir / "report.json").read_text())
    work = rep_dir / "work"
    items = shared_bicubic(work, scale)
    hrs = [hr for _, (hr, _, _) in items]
    bank = calibrate.start_bank(scale)
    labels = [calibrate.theta_label(t) for t in bank]
    hr_t = torch.stack([to_tensor(h) for h in hrs])
    starts = {
        lab: [to_uint8(lr) for lr in degrade.apply(hr_t, [th] * len(hrs))]
        for lab, th in zip(labels, bank, strict=True)
    }
    out: dict = {
        "settings": sp.model_dump(),
        "train_tiles": len(hrs),
        "bank_entries": len(bank),
        "scan_repeats": args.scan_repeats,
    }
    for name, dom in report["domains"].items():
        if name not in mcp.PIPELINES and name not in VARIANTS:
            out[name] = {"skipped": "no known pipeline of that name"}
            continue
        t0 = time.perf_counter()
        real = eval_pairs(work, name)
        truths = truth_crops(mcp, name, items, scale)
        scan = {}
        for lab, lrs in starts.items():
            scan[lab] = {
                "sr_psnr": score(
                    list(zip(hrs, lrs, strict=True)), real, sp, scale, m.seed, args.scan_repeats
                )["psnr"],
                "psnr_to_truth": psnr_to_truth(truths, lrs),
                **stat_ratios(lrs, truths),
            }
        ranked = sorted(scan, key=lambda lab: -scan[lab]["sr_psnr"])
        closest = max(scan, key=lambda lab: scan[lab]["psnr_to_truth"])
        rescored = {}
        for lab in dict.fromkeys(ranked[: args.top] + [closest]):
            rescored[lab] = score(
                list(zip(hrs, starts[lab], strict=True)), real, sp, scale, m.seed, sp.repeats
            )
        bicubic = score([(hr, lr) for _, (hr, lr, _) in items], real, sp, scale, m.seed, sp.repeats)
        have = [(h, t) for h, t in zip(hrs, truths, strict=True) if t is not None]
        true_pairs = score(have, real, sp, scale, m.seed, sp.repeats)
        best = max(rescored, key=lambda lab: rescored[lab]["psnr"])
        res = {
            "bicubic_pairs": bicubic,
            "true_pipeline_pairs": true_pairs,
            "true_pipeline_tiles": len(have),
            "rescored": {lab: {**rescored[lab], **scan[lab]} for lab in rescored},
            "best_start": best,
            "best_start_margin_db": round(rescored[best]["psnr"] - bicubic["psnr"], 3),
            "closest_start": closest,
            "closest_start_margin_db": round(rescored[closest]["psnr"] - bicubic["psnr"], 3),
            "realdgen_report_sr_psnr": dom["generators"]
            .get("realdgen", {})
            .get("metrics", {})
            .get("sr_psnr"),
            "scan": scan,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        res.update(summary(res))
        out[name] = res
        print(
            f"{name}: best start {best} {rescored[best]['psnr']:.2f} dB (PSNR to truth "
            f"{scan[best]['psnr_to_truth']:.2f}), closest {closest} {rescored[closest]['psnr']:.2f} dB "
            f"({scan[closest]['psnr_to_truth']:.2f}), bicubic pairs {bicubic['psnr']:.2f} dB, "
            f"true pairs {true_pairs['psnr']:.2f} dB",
            file=sys.stderr,
            flush=True,
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
