"""Start choice with E_deg's scene directions removed before the distances: measured; JSON.

E_deg reads the scene along with the degradation (docs/realism.md, "Start choice"). The probe tiles
give a direct estimate of the scene directions: for each bank entry, the spread of its embeddings over
the photo's tiles is scene only (the degradation is the same). This bench stacks those within-entry
deviations (every entry, every tile), takes their principal directions, and re-runs the job's rule
(weighted rank count, ``calibrate.domain_start_profile``) on embeddings where they are suppressed:

- ``proj<k>``: the top k scene directions projected out of both the tiles' and the references'
  embeddings;
- ``whiten<a>``: every embedding whitened by the within-entry covariance shrunk towards its mean
  eigenvalue by a (a linear-discriminant metric: directions the scene moves count less);
- ``job``: the job's rule on the raw embeddings; ``best_fixed_photo``: the best entry for the photo
  (needs the truth).

Scored like ``bench/start_stats_rule.py`` (per photo, default 49-entry bank, τ = 0; mean PSNR to the
true LR and noise-level gap over the tiles), with ``eval`` references (the other photo's true LR)
and ``refs_train`` (other scenes).

    python bench/start_scene_projection.py /work/codec_bench /work/codec_variant /work/codec_more \\
        --checkpoint checkpoints/realdgen-small-x4.safetensors --jobs 2 > start_scene_projection.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from start_content_match import embedding_study, job_errors, rank_choice  # noqa: E402
from start_stats_rule import study_main  # noqa: E402

from realdgen_core import calibrate  # noqa: E402

BANK = calibrate.start_bank(4)
KS = (1, 2, 4, 8, 16, 32)
ALPHAS = (0.05, 0.2, 0.5)


def scene_basis(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, B, D] → the within-entry deviations' principal directions [D, n] and variances [n]."""
    dev = (e - e.mean(0, keepdim=True)).reshape(-1, e.shape[-1])
    u, s, _ = torch.linalg.svd(dev.T, full_matrices=False)
    return u, s.pow(2) / dev.shape[0]


def project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return x - (x @ u) @ u.T


def whiten(x: torch.Tensor, u: torch.Tensor, var: torch.Tensor, shrink: float) -> torch.Tensor:
    """x in the metric of the within-entry covariance shrunk towards its mean eigenvalue."""
    iso = float(var.sum()) / x.shape[-1]
    c = x @ u
    return (x - c @ u.T) / (shrink * iso) ** 0.5 + (c / ((1 - shrink) * var + shrink * iso).sqrt()) @ u.T


def projection_rules(tiles, e, r, w, refs) -> dict[str, int]:
    u, var = scene_basis(e)
    picks = {}
    for k in KS:
        picks[f"proj{k}"] = rank_choice(
            job_errors(project_out(e, u[:, :k]), project_out(r, u[:, :k])).mean(0), w
        )
    for a in ALPHAS:
        picks[f"whiten{a}"] = rank_choice(job_errors(whiten(e, u, var, a), whiten(r, u, var, a)).mean(0), w)
    return picks


def pipeline(folder: Path, ckpt: Path) -> dict:
    return embedding_study(folder, ckpt, projection_rules)


def main() -> None:
    study_main(pipeline, __doc__)


if __name__ == "__main__":
    main()
