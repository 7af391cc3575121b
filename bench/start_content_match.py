"""Start choice with each reference compared only to the probe tiles whose scene resembles it: measured; JSON.

E_deg reads the scene along with the degradation (docs/realism.md, "Start choice"): the job's rule
(``calibrate.domain_start_profile``, rank) averages every reference's error over *all* probe tiles,
so a star field or a retina crop is compared with portraits and street scenes as well. This bench
asks whether pairing each reference with the probe tiles of the most similar scene helps. The scene
descriptor ignores what a codec changes: both images at the LR size (a probe tile is downscaled
bicubically), blurred by a Gaussian of 1.5 px, then mean and spread of each colour channel, the
mean log gradient magnitude and an 8-bin gradient orientation histogram; features standardised over
the photo's tiles and references together, Euclidean distance.

Rules (per photo of each pipeline, the default 49-entry bank, τ = 0, reference weights as the job's):

- ``job``: the job's rule, re-computed here from the same embeddings (checked equal to
  ``domain_start_profile``'s choice);
- ``near<k>``: each reference ranks the bank by its mean error over its k nearest tiles only, then
  the same weighted Borda count;
- ``best_fixed_photo``: the entry best for the photo (needs the truth; an upper bound).

Scored like ``bench/start_stats_rule.py`` (mean PSNR to the true LR and noise-level gap over the
tiles), with ``eval`` references (the other photo's true LR) and ``refs_train`` (other scenes).

    python bench/start_content_match.py /work/codec_bench /work/codec_variant /work/codec_more \\
        --checkpoint checkpoints/realdgen-small-x4.safetensors --jobs 2 > start_content_match.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from start_bank_ablation import codec_pipeline, embed, load  # noqa: E402
from start_stats_rule import add_picks, bank_scores, study_main, summarise  # noqa: E402

from realdgen_core import calibrate  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402

BANK = calibrate.start_bank(4)
NEAR = (1, 2, 4)
SCENE_BLUR = 1.5


def scene_descriptor(img: torch.Tensor) -> np.ndarray:
    """[1,3,h,w] LR-size image in [0,1] → 15 scene features that a codec barely moves."""
    x = calibrate.weight_probe(img, SCENE_BLUR)[0].double()
    mean, std = x.mean((1, 2)), x.std((1, 2))
    y = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    gy, gx = y[1:, :-1] - y[:-1, :-1], y[:-1, 1:] - y[:-1, :-1]
    mag = torch.sqrt(gx**2 + gy**2) + 1e-6
    ang = torch.remainder(torch.atan2(gy, gx), np.pi)  # orientation, sign ignored
    bins = torch.clamp((ang / np.pi * 8).long(), max=7)
    hist = torch.zeros(8, dtype=torch.float64).index_add_(0, bins.flatten(), mag.flatten())
    hist = hist / hist.sum()
    return torch.cat([mean, std, torch.log(mag).mean()[None], hist]).numpy()


def rank_choice(per_ref: torch.Tensor, w: torch.Tensor) -> int:
    """The job's weighted Borda count over per-reference errors [B, M] (ties: lower mean error)."""
    errors = (per_ref * w[None]).sum(1)
    ranks = per_ref.argsort(dim=0, stable=True).argsort(dim=0, stable=True).to(torch.float64)
    mean_rank = (ranks * w[None]).sum(1)
    return min(range(per_ref.shape[0]), key=lambda b: (round(float(mean_rank[b]), 9), float(errors[b]), b))


def job_errors(e: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Tiles' embeddings [T, B, D] against references [M, D] → the job's mean squared error [T, B, M]."""
    return (e.pow(2).sum(-1)[..., None] - 2 * e @ r.T + r.pow(2).sum(1)) / r.shape[1]


@torch.no_grad()
def embedding_study(folder: Path, ckpt: Path, rules) -> dict:
    """Score start rules on one pipeline: ``rules(tiles, e, r, w, refs)`` → ``{rule: bank index}``,
    from the photo's tiles' embeddings ``e`` [T, B, D] of every start, the references' ``r`` [M, D]
    and their weights ``w``; ``job`` (checked equal to ``domain_start_profile``'s choice) and
    ``best_fixed_photo`` are added."""
    net = LRGenerator.from_checkpoint(str(ckpt)).model.degradation.eval()
    photos = codec_pipeline(folder)
    train = [load(p) for p in sorted((folder / "refs_train").glob("*.png"))]
    scored, tile_emb = {}, {}
    for ph, tiles in photos.items():
        ps, gaps, embs = [], [], []
        for hr, lr in tiles:
            starts, p, g = bank_scores(hr, lr)
            ps.append(p)
            gaps.append(g)
            embs.append(net(starts).double())  # [B, D]
        scored[ph] = (np.array(ps), np.array(gaps))
        tile_emb[ph] = torch.stack(embs)  # [T, B, D]
    out: dict = {"tiles": sum(len(t) for t in photos.values())}
    for refkind in ("eval", "refs_train"):
        rows: dict[str, dict[str, list]] = {}
        for ph, tiles in photos.items():
            refs = [lr for q in photos if q != ph for _, lr in photos[q]] if refkind == "eval" else train
            r = embed(net, refs).double()
            w = calibrate.reference_weights(r, embed(net, [calibrate.weight_probe(x) for x in refs]))
            w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1 / len(w))
            e = tile_emb[ph]
            job = calibrate.domain_start_profile(
                net, [hr[0] for hr, _ in tiles], r.float(), BANK, ref_weights=w
            )["chosen"]
            picks = {"job": rank_choice(job_errors(e, r).mean(0), w)}
            if picks["job"] != job:
                raise AssertionError(
                    f"{folder.name}/{ph}: re-computed rule picked {picks['job']}, the job {job}"
                )
            picks.update(rules(tiles, e, r, w, refs))
            ps, gaps = scored[ph]
            picks["best_fixed_photo"] = int(ps.mean(0).argmax())
            add_picks(rows, picks, ps, gaps, ph)
        out[refkind] = summarise(rows)
    return out


def content_rules(tiles, e, r, w, refs) -> dict[str, int]:
    """``near<k>``: each reference ranks the bank by its mean error over its k nearest tiles only."""
    err = job_errors(e, r)  # [T, B, M]
    d_tiles = np.stack(
        [
            scene_descriptor(
                F.interpolate(hr, size=lr.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
            )
            for hr, lr in tiles
        ]
    )
    d_refs = np.stack([scene_descriptor(x) for x in refs])
    scale = np.concatenate([d_tiles, d_refs]).std(0) + 1e-9
    dist = np.linalg.norm((d_tiles[:, None] - d_refs[None]) / scale, axis=-1)  # [T, M]
    order = np.argsort(dist, axis=0, kind="stable")  # tiles nearest each reference first
    picks = {}
    for k in NEAR:
        kk = min(k, len(tiles))
        mask = torch.zeros(len(tiles), r.shape[0], dtype=torch.float64)
        for m in range(r.shape[0]):
            mask[order[:kk, m], m] = 1.0 / kk
        picks[f"near{k}"] = rank_choice((err * mask[:, None, :]).sum(0), w)
    return picks


def pipeline(folder: Path, ckpt: Path) -> dict:
    return embedding_study(folder, ckpt, content_rules)


def main() -> None:
    study_main(pipeline, __doc__)


if __name__ == "__main__":
    main()
