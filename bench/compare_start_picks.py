"""Compare two checkpoints' start picks: ``start_bank_ablation.py --checkpoint`` outputs, one per root; JSON.

For each pipeline, the PSNR (dB) to the true LR of the start the job's rule picks with the default
49-entry bank, against the eval references (``domain``) and against ``refs_train/``
(``domain_refs_train``), for a baseline (by default the committed thirteen-pipeline study) and a
candidate (the JSONs given), and the means over the pipelines both cover, split into the four
benchmark pipelines and the held-out rest.

    python bench/start_bank_ablation.py /work/codec_bench --checkpoint NEW.safetensors > new_bench.json
    python bench/compare_start_picks.py new_bench.json new_more.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

BENCHMARK = ("x265-stream", "av1-social", "vp9-webcam", "jpeg-reshare")
RULES = ("domain", "domain_refs_train")
BASELINE = Path(__file__).resolve().parents[1] / "docs/realism_report/start_bank_13_pipelines.json"


def picks(result: dict, bank: str) -> dict[str, dict[str, float]]:
    """``{pipeline: {rule: dB}}`` from one ablation JSON (a root's output) for ``bank``."""
    return {p: {r: v["banks"][bank][r] for r in RULES} for p, v in result.items() if "banks" in v}


def compare(baseline: dict, candidate: dict) -> dict:
    common = sorted(set(baseline) & set(candidate))
    if not common:
        raise SystemExit("the baseline and the candidate share no pipeline")
    rows = {p: {r: {"baseline": baseline[p][r], "candidate": candidate[p][r]} for r in RULES} for p in common}
    means = {}
    for group, members in (
        ("benchmark", [p for p in common if p in BENCHMARK]),
        ("held_out", [p for p in common if p not in BENCHMARK]),
        ("all", common),
    ):
        if not members:
            continue
        means[group] = {"pipelines": len(members)}
        for r in RULES:
            b = statistics.fmean(baseline[p][r] for p in members)
            c = statistics.fmean(candidate[p][r] for p in members)
            better = sum(candidate[p][r] > baseline[p][r] + 1e-9 for p in members)
            worse = sum(candidate[p][r] < baseline[p][r] - 1e-9 for p in members)
            means[group][r] = {
                "baseline": round(b, 3),
                "candidate": round(c, 3),
                "delta": round(c - b, 3),
                "better": better,
                "worse": worse,
            }
    return {"pipelines": rows, "means": means}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidate", nargs="+", help="start_bank_ablation.py --checkpoint outputs (JSON)")
    ap.add_argument("--baseline", default=str(BASELINE), help="the study to compare against")
    ap.add_argument("--bank", default="default_49")
    args = ap.parse_args()
    base_doc = json.loads(Path(args.baseline).read_text())
    base_roots = base_doc["roots"].values() if "roots" in base_doc else [base_doc]
    baseline = {p: v for root in base_roots for p, v in picks(root, args.bank).items()}
    candidate: dict[str, dict[str, float]] = {}
    for f in args.candidate:
        candidate.update(picks(json.loads(Path(f).read_text()), args.bank))
    print(json.dumps(compare(baseline, candidate), indent=1))


if __name__ == "__main__":
    main()
