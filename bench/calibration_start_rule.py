"""Does the τ calibration's start rule change the τ it chooses? Per-sample starts against the job's
one start per domain, on an evaluation run's adapted checkpoints; JSON.

The domain calibration (``pipelines/train.py --calibrate-only``, ``calibrate.calibrate_tau``)
starts each validation pair from the bank entry closest to *that pair's own* reference, the very
E_deg error it then scores, which favours τ = 0 (the start is chosen on the measure; diffusion can
only move away from it). The generation job instead starts every sample of a domain from one entry,
chosen from all of the domain's references (``start_choice: domain``). This script re-runs each
adaptation's calibration on the same inputs (``train.calibration_inputs``: its validation split,
HR crops and pairing, same seed) both ways: as committed, and with every pair starting from the
domain profile's entry (``calibrate.domain_start_profile`` over the calibration's HR crops and all
validation references, reference weights and rank rule as the job's defaults).

    python bench/calibration_start_rule.py out/eval_codecs [--adapt manifests/adapt.yaml]

Needs a finished ``kind: evaluate`` run with adaptation. About 2.5 min per domain on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.manifest import load_manifest  # noqa: E402
from pipelines.train import calibration_inputs, calibration_refs  # noqa: E402
from realdgen_core import calibrate  # noqa: E402
from realdgen_core.checkpoint import load_checkpoint  # noqa: E402
from realdgen_core.diffusion import SamplerConfig  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402


def both_rules(adapt_yaml: str, refs_train: str, ckpt: Path) -> dict:
    m = load_manifest(
        adapt_yaml, [f"data.lr.0.source.uri={refs_train}", f"output.checkpoint={ckpt}", "seed=0"]
    )
    cal = m.calibration
    _, hr, pair_refs = calibration_inputs(m)
    refs = calibration_refs(m)
    model, _ = load_checkpoint(ckpt)
    gen = LRGenerator(model, sampler=SamplerConfig(kind="ddim", steps=cal.sampler_steps, eta=1.0))
    bank = calibrate.start_bank(model.config.scale, cal.blur_sigmas, cal.jpeg_qualities, cal.sharpen_amounts)
    kw = {
        "tau_grid": cal.tau_grid,
        "k": cal.k,
        "weights": (cal.content_weight, cal.degradation_weight),
        "seed": m.seed,
    }
    emb = gen.degradation_embeddings(refs)
    blurred = gen.degradation_embeddings([calibrate.weight_probe(r) for r in refs])
    profile = calibrate.domain_start_profile(
        model.degradation,
        list(hr),
        emb,
        bank,
        gen.device,
        ref_weights=calibrate.reference_weights(emb, blurred),
    )
    shared = calibrate.profile_errors(profile, len(bank))[None].expand(hr.shape[0], -1).clone()
    out = {"validation_refs": len(refs), "pairs": int(hr.shape[0])}
    for rule, errors in (("per_sample", None), ("domain", shared)):
        t0 = time.time()
        tau, scores = calibrate.calibrate_tau(gen, hr, pair_refs, bank, start_errors=errors, **kw)
        out[rule] = {
            "tau_max": tau,
            "degradation_error": {t: v["degradation_error"] for t, v in scores["per_tau_max"].items()},
            "degradation_error_se": {t: v["degradation_error_se"] for t, v in scores["per_tau_max"].items()},
            "seconds": round(time.time() - t0, 1),
        }
    out["domain"]["start"] = calibrate.theta_label(bank[profile["chosen"]])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="report.dir of a finished kind: evaluate run with adaptation")
    ap.add_argument("--adapt", default=str(ROOT / "manifests" / "adapt.yaml"))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    report = json.loads((Path(args.run) / "report.json").read_text())
    result = {"run": args.run, "domains": {}}
    for name, sec in report["domains"].items():
        ckpts = sorted((Path(args.run) / "work" / name).glob("data-*/adapt-*/adapted.safetensors"))
        if not ckpts:
            print(f"{name}: no adapted checkpoint in the run, skipped", file=sys.stderr)
            continue
        if len(ckpts) > 1:
            print(f"{name}: {len(ckpts)} adapted checkpoints, using the last by name", file=sys.stderr)
        if not sec.get("adapted") or not sec.get("refs_train"):
            print(f"{name}: not adapted in this run, skipped", file=sys.stderr)
            continue
        result["domains"][name] = both_rules(args.adapt, sec["refs_train"], ckpts[-1])
        print(f"{name}: {json.dumps(result['domains'][name])}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
