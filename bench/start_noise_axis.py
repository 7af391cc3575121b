"""Would a noise axis in the start bank help? The job's rule on the default bank and on it × noise; JSON.

The start bank (``calibrate.start_bank``) varies blur and JPEG only. This adds a Gaussian noise op
(colour, σ in 0–255 units, after the resize and before the JPEG; each tile's noise from its own seed,
as the job's ``calibrate.instantiate`` does) with σ ∈ ``--sigmas`` to every entry, and for each
pipeline folder (``make_codec_pairs.py``'s layout) and both reference sets (the other eval photo's
true LR; ``refs_train/``) lets the job's rule (``domain_start_profile``: rank, sensitivity weights)
pick a start per photo, then reports the pick's PSNR to the true LR and its noise-level gap
(``realism.relative_gap`` of ``realism.noise_level``, mean over tiles), with the checkpoint not
adapted (as ``start_bank_ablation.py --checkpoint``). τ 0: the start is the output.

    python bench/start_noise_axis.py /work/codec_more/blur-noise-raw /work/codec_bench/x265-stream ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from start_bank_ablation import codec_pipeline, embed, load, psnr  # noqa: E402

from realdgen_core import calibrate, degrade, realism  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402


def with_noise(theta: dict, sigma: float) -> dict:
    if not sigma:
        return theta
    ops = list(theta["ops"])
    at = [o["op"] for o in ops].index("resize") + 1
    ops.insert(
        at, {"name": "noise", "op": "gaussian_noise", "sigma": float(sigma), "gray": False, "stream": 0}
    )
    return {**theta, "ops": ops}


def label(theta: dict) -> str:
    sigma = [o["sigma"] for o in theta["ops"] if o["op"] == "gaussian_noise"]
    return calibrate.theta_label(theta).replace(" + gaussian_noise", "") + (
        f" + noise {sigma[0]:g}" if sigma else ""
    )


def u8(x: torch.Tensor):
    return (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()


def noise_gap(x: torch.Tensor, truth: torch.Tensor) -> float:
    # the evaluation's floor (realism.GAP_FLOORS); every true tile this study read is noisier than
    # it (0.89–3.6 grey levels on AV1/VP9), so the committed figures are the same either way
    truth_noise = realism.noise_level(u8(truth))
    return realism.relative_gap(realism.noise_level(u8(x)), truth_noise, realism.GAP_FLOORS["noise"])


@torch.no_grad()
def pipeline(net: torch.nn.Module, folder: Path, banks: dict) -> dict:
    photos = codec_pipeline(folder)
    refs = {ph: embed(net, [lr for _, lr in t]) for ph, t in photos.items()}
    w = {
        ph: calibrate.reference_weights(refs[ph], embed(net, [calibrate.weight_probe(lr) for _, lr in t]))
        for ph, t in photos.items()
    }
    train = [load(p) for p in sorted((folder / "refs_train").glob("*.png"))]
    train_emb = embed(net, train)
    train_w = calibrate.reference_weights(train_emb, embed(net, [calibrate.weight_probe(t) for t in train]))
    out: dict = {}
    for bank_name, bank in banks.items():
        for ref_name in ("eval_refs", "refs_train"):
            ps, gaps, picks = [], [], []
            for ph, tiles in photos.items():
                if ref_name == "eval_refs":
                    r = torch.cat([refs[q] for q in photos if q != ph])
                    rw = torch.cat([w[q] for q in photos if q != ph])
                else:
                    r, rw = train_emb, train_w
                prof = calibrate.domain_start_profile(
                    net, [hr[0] for hr, _ in tiles], r, bank, ref_weights=rw
                )
                theta = bank[prof["chosen"]]
                picks.append(f"{ph}: {label(theta)}")
                for i, (hr, lr) in enumerate(tiles):
                    seed = int(hashlib.sha256(f"{ph}/{i}".encode()).hexdigest()[:12], 16)
                    x = degrade.apply(hr, [calibrate.instantiate(theta, seed)])
                    ps.append(psnr(x, lr))
                    gaps.append(noise_gap(x, lr))
            out[f"{bank_name}/{ref_name}"] = {
                "psnr": round(statistics.fmean(ps), 3),
                "noise_gap": round(statistics.fmean(gaps), 3),
                "picks": picks,
            }
    plain = calibrate.start_theta(int(banks["default"][0]["scale"]), 0, 0)
    gaps = [noise_gap(degrade.apply(hr, [plain]), lr) for t in photos.values() for hr, lr in t]
    out["bicubic_aa_noise_gap"] = round(statistics.fmean(gaps), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "pipelines", nargs="+", help="pipeline folders (<root>/<pipeline>: hr/, lr/, refs_train/)"
    )
    ap.add_argument("--checkpoint", default="checkpoints/realdgen-small-x4.safetensors")
    ap.add_argument("--sigmas", default="0,3,6", help="noise σ of the extended bank (0 = the entry as it is)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = LRGenerator.from_checkpoint(args.checkpoint).model.degradation.eval()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    base = calibrate.start_bank(4)
    banks = {"default": base, "noise": tuple(with_noise(t, s) for s in sigmas for t in base)}
    result = {}
    for folder in map(Path, args.pipelines):
        result[folder.name] = pipeline(net, folder, banks)
        print(folder.name, json.dumps(result[folder.name]), file=sys.stderr, flush=True)
    print(json.dumps({"checkpoint": args.checkpoint, "sigmas": sigmas, "pipelines": result}, indent=1))


if __name__ == "__main__":
    main()
