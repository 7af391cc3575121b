"""How the start chosen against ``refs_train/`` depends on the crops of the job's photos it scores; JSON.

The SR-proxy job of a ``kind: evaluate`` run (HR: the ``sr_proxy.photos``; references: the
pipeline's ``refs_train/``) chooses its start once, with ``calibrate.domain_start_profile`` on
``generator.start_probe_tiles`` probe tiles: one centre tile per input, so 6 for 6 photos. This
script makes the same choice (the run's adapted checkpoint, the same reference weights) on other
probe sets cut from the same photos:

- ``centre``: the job's own probes, one centre tile per photo;
- ``job_tiles``: the tiles the SR-proxy datasets were generated on (2 per photo);
- ``spread_32`` / ``spread_64``: 32 / 64 distinct tiles spread evenly over the photos
  (``calibrate.spread_probe_crops``, the job's own layout since ``generator.start_probe_layout: spread``),

under both aggregates (``rank``, the default, and ``distance``), and reads each chosen start's
SR-proxy score (one seed, as a margin over bicubic pairs) and the PSNR of its LR to the truth from
a ``bench/sr_proxy_start_oracle.py`` output of the same run. If E_deg read only the degradation, the
choice would not depend on the crops; where it moves, it follows the scenes.

    python bench/start_probe_ablation.py out/eval_codecs \\
        --oracle docs/realism_report/sr_proxy_start_oracle.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sr_proxy_ceiling import shared_bicubic  # noqa: E402

from pipelines.demo_data import load_photo  # noqa: E402
from pipelines.manifest import load_manifest  # noqa: E402
from realdgen_core import calibrate  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402
from realdgen_core.train.data import to_tensor  # noqa: E402


def probe_sets(photos: list[str], tile: int, work: Path, scale: int) -> dict[str, list[torch.Tensor]]:
    images = [load_photo(p) for p in photos]

    def cut(img: np.ndarray, y: int, x: int) -> torch.Tensor:
        return to_tensor(np.ascontiguousarray(img[y : y + tile, x : x + tile]))

    sets = {"centre": [cut(im, (im.shape[0] - tile) // 2, (im.shape[1] - tile) // 2) for im in images]}
    sets["job_tiles"] = [to_tensor(hr) for _, (hr, _, _) in shared_bicubic(work, scale)]
    for budget in (32, 64):  # the job's own layout (generator.start_probe_layout: spread)
        crops = calibrate.spread_probe_crops(images, len(images), tile, budget)
        sets[f"spread_{budget}"] = [to_tensor(c) for c in crops]
    return sets


def pipeline_results(oracle: dict) -> dict:
    """``{pipeline: result}`` of a ``sr_proxy_start_oracle.py`` output, or of a file that nests
    several of them one level down (``docs/realism_report/sr_proxy_start_oracle.json``)."""
    out = {}
    for key, value in oracle.items():
        if isinstance(value, dict) and "scan" in value:
            out[key] = value
        elif isinstance(value, dict):
            out.update({k: v for k, v in value.items() if isinstance(v, dict) and "scan" in v})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report_dir", help="report.dir of a finished kind: evaluate run")
    ap.add_argument("--oracle", required=True, help="bench/sr_proxy_start_oracle.py output of that run")
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "evaluate_codecs.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = load_manifest(args.manifest, [], kind="evaluate")
    rep_dir = Path(args.report_dir)
    report = json.loads((rep_dir / "report.json").read_text())
    oracle = pipeline_results(json.loads(Path(args.oracle).read_text()))
    bank = calibrate.start_bank(m.scale)
    labels = [calibrate.theta_label(t) for t in bank]
    sets = probe_sets(list(m.sr_proxy.photos), m.generation.tile * m.scale, rep_dir / "work", m.scale)
    out: dict = {"probe_tiles": {k: len(v) for k, v in sets.items()}}
    for name, dom in report["domains"].items():
        scan = oracle.get(name, {}).get("scan")
        if not scan:
            out[name] = {"skipped": "no sr_proxy_start_oracle.py result for this pipeline"}
            continue
        t0 = time.perf_counter()
        bic = oracle[name]["bicubic_pairs"]["runs"][0]
        ckpt = Path(dom["checkpoint"])  # recorded relative to the directory the evaluation ran in
        gen = LRGenerator.from_checkpoint(ckpt if ckpt.exists() else ROOT / ckpt, device="cpu")
        refs = [
            to_tensor(np.array(Image.open(p).convert("RGB")))
            for p in sorted(Path(dom["refs_train"]).glob("*.png"))
        ]
        emb = gen.degradation_embeddings(refs)
        weights = calibrate.reference_weights(
            emb, gen.degradation_embeddings([calibrate.weight_probe(r) for r in refs])
        )
        res = {}
        for probe, tiles in sets.items():
            for aggregate in ("rank", "distance"):
                prof = calibrate.domain_start_profile(
                    gen.model.degradation, tiles, emb, bank, "cpu", ref_weights=weights, aggregate=aggregate
                )
                lab = labels[prof["chosen"]]
                res[f"{probe}_{aggregate}"] = {
                    "start": lab,
                    "sr_margin_db": round(scan[lab]["sr_psnr"] - bic, 3),
                    "psnr_to_truth": scan[lab]["psnr_to_truth"],
                }
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = res
        print(
            name,
            {k: (v["start"], v["sr_margin_db"]) for k, v in res.items() if k.endswith("_rank")},
            file=sys.stderr,
        )
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
