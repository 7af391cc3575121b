"""Measure a RealDGen checkpoint on held-out crops (photos never used in training) and write JSON.

    python pipelines/evaluate.py checkpoints/realdgen-small-x4.safetensors \
        --out checkpoints/realdgen-small-x4.metrics.json
    python pipelines/evaluate.py manifests/evaluate_codecs.yaml [--set key.path=value]   # kind: evaluate

A ``.yaml`` argument runs the realism benchmark of a ``kind: evaluate`` manifest
(``pipelines/evaluate_realism.py``: paired domains, the main job with every generator, report folder).
The checkpoint form below is unchanged.

Held-out HR crops come from ``SPLITS["heldout"]`` of ``pipelines/demo_data.py`` (scikit-image photos
that the demo training never reads), or from ``--heldout DIR`` (any folder of images, >= 2 of them).
Every crop position, θ and seed is drawn from ``--seed``, so a re-run gives the same numbers.

1. ``triplet``: E_deg triplet accuracy — share of (anchor, pos_i, neg_i) with d(a, p) < d(a, n) for
   anchor D(X, θ), positives D(X'_i, θ), negatives D(X, θ_i) (n = 3, L2) — for the trained E_deg and
   for an untrained one (same architecture, random init).
2. ``content``: PSNR of Rec_hr(q(E_cont(bicubic_up(D(X, θ))))) to X, against bicubic_up(D(X, θ)).
3. ``generation``: for HR X and a reference D(X_other, θ) (X_other from another held-out photo), the
   truth is D(X, θ). PSNR/SSIM to the truth of the generated LR, of bicubic LR, and of D(X, θ′)
   with a random θ′ of the same kind.
4. the generated LR with k = 1 and with k = 4 (best-of-k), same seeds.

θ kinds alternate realesrgan / bsrgan. Metrics are on 8-bit RGB (realdgen_core.metrics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realdgen_core import degrade
from realdgen_core.checkpoint import load_checkpoint
from realdgen_core.metrics import psnr, ssim
from realdgen_core.models import build_model
from realdgen_core.train.config import DegradationStageConfig
from realdgen_core.train.data import ArrayCropSampler, bicubic_up, random_crop, to_tensor
from realdgen_core.train.degradation import triplet_accuracy, triplet_batch

KINDS = ("realesrgan", "bsrgan")


def heldout_images(folder: str | None) -> dict[str, np.ndarray]:
    if folder is None:
        from pipelines.demo_data import SPLITS, load_photo

        return {n: load_photo(n) for n in SPLITS["heldout"]}
    from pipelines.sources import ImageError, decode_image, local_image_files

    paths = [Path(p) for p in local_image_files(folder)]
    out = {}
    for p in paths:
        if p.stem in out:
            raise SystemExit(f"evaluate: two held-out images named {p.stem!r} (one name per picture)")
        try:
            out[p.stem] = decode_image(p.read_bytes())
        except ImageError as exc:
            raise SystemExit(f"evaluate: held-out image {p.name}: {exc}") from None
    return out


def crops_per_image(
    images: dict[str, np.ndarray], n: int, size: int, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """``n`` seeded random ``size``² crops of every image: name -> [n, 3, size, size]."""
    out = {}
    for name, img in images.items():
        t = to_tensor(img)
        out[name] = torch.stack([random_crop(t, size, g) for _ in range(n)])
    return out


def _gens(g: torch.Generator, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (n,), generator=g)]


def _mean(xs: Sequence[float]) -> float:
    return round(float(statistics.fmean(xs)), 4)


@torch.no_grad()
def measure_triplets(
    model, untrained, images, scale: int, g: torch.Generator, anchors: int, lr_crop: int
) -> dict:
    sampler = ArrayCropSampler(list(images.values()), flip=False)
    out = {}
    for kind in KINDS:
        cfg = DegradationStageConfig(batch_size=anchors, lr_crop=lr_crop, kinds=(kind,))
        lr_a, lr_p, lr_n, _, _ = triplet_batch(sampler, cfg, scale, g)
        out[kind] = {
            "trained": round(triplet_accuracy(model.degradation, lr_a, lr_p, lr_n), 4),
            "untrained": round(triplet_accuracy(untrained.degradation, lr_a, lr_p, lr_n), 4),
            "triplets": int(lr_p.shape[0]),
        }
    out["all"] = {
        k: round(statistics.fmean(out[kind][k] for kind in KINDS), 4) for k in ("trained", "untrained")
    }
    out["all"]["triplets"] = sum(out[kind]["triplets"] for kind in KINDS)
    out["chance"] = 0.5
    return out


@torch.no_grad()
def measure_content(model, hr: torch.Tensor, scale: int, g: torch.Generator) -> dict:
    kinds = [KINDS[i % 2] for i in range(hr.shape[0])]
    ours, bic = [], []
    for i in range(hr.shape[0]):
        lr, _ = degrade.degrade(hr[i : i + 1], kinds[i], scale, _gens(g, 1))
        up = bicubic_up(lr, scale)
        z_q, _ = model.content.quantize(model.content.encode(up))
        rec = model.content.decode(z_q).clamp(0, 1)
        ours.append(psnr(rec[0], hr[i]))
        bic.append(psnr(up[0], hr[i]))
    return {
        "psnr_econt_rechr": _mean(ours),
        "psnr_bicubic_up": _mean(bic),
        "crops": hr.shape[0],
        "gain_db": round(_mean(ours) - _mean(bic), 4),
    }


@torch.no_grad()
def measure_generation(
    model, crops: dict[str, torch.Tensor], scale: int, g: torch.Generator, ks=(1, 4), tau_max: int = 300
) -> dict:
    from realdgen_core.generator import LRGenerator

    gen = LRGenerator(model)
    names = list(crops)
    rows: dict[str, dict[str, list[float]]] = {}

    def add(key: str, img: torch.Tensor, truth: torch.Tensor) -> None:
        r = rows.setdefault(key, {"psnr": [], "ssim": []})
        r["psnr"].append(psnr(img, truth))
        r["ssim"].append(ssim(img, truth))

    n_pairs, seconds = 0, {f"k{k}": 0.0 for k in ks}
    for a, name in enumerate(names):
        other = crops[names[(a + 1) % len(names)]]  # the reference's content: another held-out photo
        for i in range(crops[name].shape[0]):
            hr = crops[name][i : i + 1]
            kind = KINDS[n_pairs % 2]
            theta = degrade.sample_theta(kind, scale, _gens(g, 1)[0])
            theta_rand = degrade.sample_theta(kind, scale, _gens(g, 1)[0])
            truth = degrade.apply(hr, [theta])[0]
            ref = degrade.apply(other[i : i + 1], [theta])
            add("bicubic", degrade.degrade(hr, "bicubic", scale, _gens(g, 1))[0][0], truth)
            add("random_theta", degrade.apply(hr, [theta_rand])[0], truth)
            seed = int(torch.randint(0, 2**62, (), generator=g))
            for k in ks:
                t0 = time.perf_counter()
                res = gen.generate(hr, ref, k=k, tau_range=(0, tau_max), seeds=[seed])
                seconds[f"k{k}"] += time.perf_counter() - t0
                add(f"realdgen_k{k}", res.lr[0], truth)
            n_pairs += 1
    out = {key: {"psnr": _mean(v["psnr"]), "ssim": _mean(v["ssim"])} for key, v in rows.items()}
    out["pairs"] = n_pairs
    out["seconds_per_pair"] = {k: round(v / max(n_pairs, 1), 2) for k, v in seconds.items()}
    out["tau_range"] = [0, tau_max]
    return out


def evaluate(
    checkpoint: str,
    *,
    heldout: str | None = None,
    seed: int = 0,
    crops: int = 8,
    hr_crop: int = 128,
    anchors: int = 32,
    ks: Sequence[int] = (1, 4),
    tau_max: int = 300,
) -> dict:
    model, meta = load_checkpoint(checkpoint)
    model.eval()
    untrained = build_model(model.config, seed=12345).eval()
    scale = model.config.scale
    images = heldout_images(heldout)
    small = [f"{n} ({a.shape[1]}x{a.shape[0]})" for n, a in images.items() if min(a.shape[:2]) < hr_crop]
    if small:
        raise SystemExit(f"evaluate: held-out image(s) smaller than --hr-crop {hr_crop}: {', '.join(small)}")
    if len(images) < 2:
        raise SystemExit("evaluate: need at least two held-out images (refs come from another image)")
    g = torch.Generator().manual_seed(seed)
    hr_crops = crops_per_image(images, crops, hr_crop, g)
    all_hr = torch.cat(list(hr_crops.values()))
    t0 = time.perf_counter()
    result = {
        "checkpoint": str(checkpoint),
        "model_digest": meta.get("digest"),
        "heldout": sorted(images),
        "seed": seed,
        "hr_crop": hr_crop,
        "lr_crop": hr_crop // scale,
        "triplet_accuracy": measure_triplets(model, untrained, images, scale, g, anchors, hr_crop // scale),
        "content_reconstruction": measure_content(model, all_hr, scale, g),
        "generation": measure_generation(model, hr_crops, scale, g, ks=ks, tau_max=tau_max),
    }
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def training_record(run_dir: str) -> dict:
    """Per phase, from the run's CSV logs: steps, wall seconds, median step seconds, first/last losses."""
    import csv

    out = {}
    for name in ("content_pretrain", "content_finetune", "degradation", "diffusion"):
        path = Path(run_dir) / "logs" / f"{name}.csv"
        if not path.exists():
            continue
        rows = list(csv.DictReader(path.open()))
        if not rows:
            continue
        losses = [k for k in rows[0] if k not in ("step", "time", "seconds", "grad_norm")]
        w = max(1, min(50, len(rows) // 5))
        out[name] = {
            "steps": int(rows[-1]["step"]),
            "wall_seconds": round(
                float(rows[-1]["time"]) - float(rows[0]["time"]) + float(rows[0]["seconds"]), 1
            ),
            "median_step_seconds": round(statistics.median(float(r["seconds"]) for r in rows), 3),
            **{f"{k}_first{w}": _mean([float(r[k]) for r in rows[:w]]) for k in losses},
            **{f"{k}_last{w}": _mean([float(r[k]) for r in rows[-w:]]) for k in losses},
        }
    if out:
        out["total_wall_seconds"] = round(sum(v["wall_seconds"] for v in out.values()), 1)
    return out


def _is_manifest(argv: Sequence[str]) -> bool:
    first = next((a for a in argv if not a.startswith("-")), "")
    return first.lower().endswith((".yaml", ".yml"))


def main_manifest(argv: Sequence[str], prog: str | None = None) -> int:
    """``evaluate.py MANIFEST.yaml [--set k=v ...]``: run a manifest by its kind (``evaluate``)."""
    from pipelines.evaluate_realism import AdaptationFailed, run_evaluation
    from pipelines.generate.job import JobFailed
    from pipelines.manifest import ManifestError, add_set_option, load_manifest, manifest_json_schema

    ap = argparse.ArgumentParser(
        prog=prog or "evaluate.py",
        description="Realism benchmark from a `kind: evaluate` manifest (docs/evaluate.md).",
    )
    ap.add_argument("manifest", help="manifest YAML (kind: evaluate)")
    add_set_option(ap, "report.dir=out/eval2")
    ap.add_argument("--print-schema", action="store_true", help="print the evaluate manifest's JSON schema")
    args = ap.parse_args(argv)
    if args.print_schema:
        print(json.dumps(manifest_json_schema("evaluate"), indent=2))
        return 0
    try:
        m = load_manifest(args.manifest, args.overrides)
        if m.kind != "evaluate":
            raise ManifestError(f"kind: evaluate.py runs `kind: evaluate` manifests (got {m.kind!r})")
        result = run_evaluation(m)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (JobFailed, AdaptationFailed) as exc:  # a job or an adaptation failed: its message says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"report": str(Path(m.report.dir) / "report.md"), "summary": result["summary"]}))
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_manifest(argv):
        return main_manifest(argv, prog)
    ap = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0]
        + " With a MANIFEST.yaml (kind: evaluate) instead of a checkpoint: the realism benchmark"
        " (`evaluate.py MANIFEST.yaml --help` lists its options: --set KEY.PATH=VALUE, --print-schema;"
        " docs/evaluate.md).",
    )
    ap.add_argument(
        "checkpoint",
        metavar="CHECKPOINT|MANIFEST.yaml",
        help="a .safetensors checkpoint, or a kind: evaluate manifest",
    )
    ap.add_argument("--out", default=None, help="write/merge the metrics into this JSON file")
    ap.add_argument("--heldout", default=None, help="folder of held-out images (default: SPLITS['heldout'])")
    ap.add_argument("--seed", type=int, default=0, help="seed of the crops, references and sampling")
    ap.add_argument("--crops", type=int, default=8, help="HR crops per held-out image")
    ap.add_argument(
        "--hr-crop", type=int, default=128, help="HR crop side in px (the LR side is this / scale)"
    )
    ap.add_argument("--anchors", type=int, default=32, help="triplet anchors per kind (x3 triplets each)")
    ap.add_argument(
        "--tau-max", type=int, default=300, help="the largest start timestep τ of the generations measured"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--run-dir", default=None, help="also record the training run's per-phase logs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(
        args.checkpoint,
        heldout=args.heldout,
        seed=args.seed,
        crops=args.crops,
        hr_crop=args.hr_crop,
        anchors=args.anchors,
        tau_max=args.tau_max,
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged["heldout_metrics"] = result
        if args.run_dir:
            merged["training"] = training_record(args.run_dir)
        path.write_text(json.dumps(merged, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
