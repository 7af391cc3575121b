"""The SR proxy of a finished evaluation re-run with more seeds, realdgen against bicubic; JSON.

The evaluation trains ``sr_proxy.repeats`` seeded SR nets per generator (5 in
``manifests/evaluate_codecs.yaml``) and reports their mean. Where two generators end within a few
hundredths of a dB, that mean cannot rank them. This script re-trains the SR proxy on the very
training pairs the evaluation made (``work/<pipeline>/data-*/sr_pairs/realdgen-*`` and
``work/_shared/sr_pairs-*/bicubic``) with ``--repeats`` seeds (seeds ``seed + 1000 r``, so the first
ones are the evaluation's), scores each net on the pipeline's real pairs, and gives the paired
difference per seed (mean, its standard error, seeds on which realdgen is ahead). With
``--threads`` equal to the manifest's ``compute.torch_threads`` the first runs reproduce the report's.

    python bench/sr_proxy_seeds.py out/eval_codecs_v17 jpeg-reshare --repeats 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluate_realism import _rgb, read_dataset, sr_proxy_runs  # noqa: E402
from pipelines.manifest import parse_manifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", help="report.dir of a finished kind: evaluate run")
    ap.add_argument("pipeline", help="a domain of that run")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.report_dir)
    report = json.loads((root / "report.json").read_text())
    m = parse_manifest(report["manifest"])
    sp = m.sr_proxy.model_copy(update={"repeats": args.repeats})
    data = next((root / "work" / args.pipeline).glob("data-*"))
    tiles = sorted((data / "tiles" / "hr").glob("*/*.png"))
    real = [(_rgb(p), _rgb(Path(str(p).replace("/hr/", "/lr/")))) for p in tiles]
    out: dict = {"command": " ".join(sys.argv), "repeats": args.repeats, "real_tiles": len(real)}
    folders = {
        "realdgen": next((data / "sr_pairs").glob("realdgen-*")),
        "bicubic": next((root / "work" / "_shared").glob("sr_pairs-*")) / "bicubic",
    }
    for kind, folder in folders.items():
        items = sorted(read_dataset(str(folder), m.scale, one_per_image=False).items())
        pairs = [(hr, lr) for _, (hr, lr, _) in items]
        t0 = time.time()
        psnrs = [r["psnr"] for r in sr_proxy_runs(pairs, real, sp, m.scale, m.seed)]
        reported = report["domains"][args.pipeline]["generators"][kind]["sr_proxy"]
        out[kind] = {
            "train_pairs": len(pairs),
            "psnr": round(float(np.mean(psnrs)), 4),
            "std": round(float(np.std(psnrs)), 4),
            "runs": [round(p, 4) for p in psnrs],
            "report_runs": [r["psnr"] for r in reported.get("runs", [reported])],
            "seconds": round(time.time() - t0, 1),
        }
    diff = np.array(out["realdgen"]["runs"]) - np.array(out["bicubic"]["runs"])
    out["realdgen_minus_bicubic"] = {
        "mean": round(float(diff.mean()), 4),
        "se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4) if len(diff) > 1 else None,
        "realdgen_ahead_seeds": int((diff > 0).sum()),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
