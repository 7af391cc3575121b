"""Classifier intervals of a report.json made before 2026-12-07, recomputed the corrected way; JSON.

Before that date ``pool_classifier_runs`` pooled the seeded repeats' test crops as if independent,
but every repeat scores the same held-out crops (only the classifier's seed changes), so the Wilson
intervals were √repeats too narrow. This recomputes them from one repeat's crop and pair counts at
the pooled accuracy, as the evaluation now does (still a lower bound: crops of a tile overlap).

    python bench/classifier_intervals.py docs/realism_report/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.probes import wilson_interval  # noqa: E402


def corrected(clf: dict) -> dict:
    repeats = max(1, len(clf.get("repeats", [])))
    crops, pairs = clf["test_crops"] // repeats, clf["test_pairs"] // repeats
    acc, paired = clf["accuracy"], clf["paired_accuracy"]
    return {
        "accuracy": acc,
        "accuracy_ci95": [round(v, 4) for v in wilson_interval(round(acc * crops), crops)],
        "reported_accuracy_ci95": clf["accuracy_ci95"],
        "paired_accuracy": paired,
        "paired_ci95": [round(v, 4) for v in wilson_interval(round(paired * pairs), pairs)],
        "reported_paired_ci95": clf["paired_ci95"],
        "distinct_test_crops": crops,
        "test_pairs_per_repeat": pairs,
        "repeats": repeats,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="an evaluation's report.json")
    report = json.loads(Path(ap.parse_args().report).read_text())
    out = {
        dom: {g: corrected(gv["classifier"]) for g, gv in d["generators"].items() if "classifier" in gv}
        for dom, d in report["domains"].items()
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
