"""Variants of the per-domain start choice, scored like ``start_bank_ablation.py``; JSON.

The job's rule (``calibrate.domain_start_profile``, rank aggregate, sensitivity weights) averages each
reference's E_deg error over all probe tiles. E_deg also reads the scene, so these candidates were
tried against it, all computable by a job (no truth):

- ``content_top{f}`` / ``content_soft{t}``: each reference is compared only with the probe tiles whose
  content is like its own: the nearest fraction ``f`` of the tiles, or all of them weighted by
  ``softmax(−d / (t · median d))``, where ``d`` is the distance between the content extractor's pooled
  maps (channel means and stds of ``E_cont``) of the tile's HR and of the reference upsampled;
- ``one_se_{z}``: a one-standard-error rule like the τ calibration's: among the entries whose mean rank
  is not worse than the best's by more than ``z`` paired standard errors (over the references), the
  mildest (the least mean squared change from the plain downscale over the probe tiles);
- ``double_jpeg_bank``: the job's rule over a larger bank, the 49 entries plus each JPEG entry with a
  second JPEG pass at its quality (a re-share; 91 entries);
- ``centroid`` / ``centroid_z``: the job's rank rule on ``‖ē_b − r‖²``, the distance of each reference to
  the entry's mean embedding over the probe tiles, instead of the mean of ``‖e_tb − r‖²`` over the tiles.
  That mean adds the entry's spread over the tiles to every reference's error, and heavy JPEG, which
  hides the scene, has about a tenth of the others' spread, so it is favoured whatever the domain.
  ``centroid_z`` also divides each embedding dimension by its std over all (tile, entry) embeddings.

Per pipeline and per reference set (``eval``: the other photo's true LR, what one job of the
evaluation sees; ``refs_train``: the pipeline's unpaired LR), the PSNR to the true LR of the start each
rule picks (τ 0: the start is the output), averaged over the photos, against ``base`` (the job's rule)
and ``best_fixed`` (the best single entry per photo, which needs the truth).

    python bench/start_rule_variants.py out/eval_codecs_v12/work --refs-root /work/codec_bench
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from start_bank_ablation import embed, load, psnr  # noqa: E402

from realdgen_core import calibrate, degrade  # noqa: E402
from realdgen_core.generator import LRGenerator, bicubic_up  # noqa: E402

BANK = calibrate.start_bank(4)
PLAIN = next(i for i, t in enumerate(BANK) if calibrate.theta_label(t) == "bicubic_aa")


def jpeg_twice(theta: dict) -> dict:
    twice = copy.deepcopy(theta)
    twice["ops"].append({"name": "jpeg2", "op": "jpeg", "quality": theta["ops"][-1]["quality"]})
    return twice


# the default bank, then every JPEG entry of it with a second pass at its quality
EXTENDED = list(BANK) + [jpeg_twice(t) for t in BANK if t["ops"][-1]["op"] == "jpeg"]
N = len(BANK)


def pooled_content(model: torch.nn.Module, images: list[torch.Tensor], upsample: bool) -> torch.Tensor:
    feats = []
    for x in images:
        z = model.content.encode(bicubic_up(x, 4) if upsample else x).double()
        feats.append(torch.cat([z.mean((2, 3)), z.std((2, 3))], 1))
    return torch.cat(feats)


def rank_choice(per_ref: torch.Tensor, w: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The job's rule on per-(entry, reference) errors [B, M]: lowest weighted mean rank."""
    ranks = per_ref.argsort(dim=0, stable=True).argsort(dim=0, stable=True).double()
    mean_rank, mean_err = (ranks * w[None]).sum(1), (per_ref * w[None]).sum(1)
    best = min(range(len(mean_rank)), key=lambda b: (round(float(mean_rank[b]), 9), float(mean_err[b]), b))
    return best, ranks


def one_se_choice(ranks: torch.Tensor, w: torch.Tensor, best: int, mildness: torch.Tensor, z: float) -> int:
    n_eff = 1.0 / float((w**2).sum())
    near = []
    for b in range(ranks.shape[0]):
        diff = ranks[b] - ranks[best]
        mean = float((w * diff).sum())
        se = (float((w * (diff - mean) ** 2).sum()) / max(n_eff - 1.0, 1.0)) ** 0.5
        if mean <= z * se:
            near.append(b)
    return min(near, key=lambda b: (float(mildness[b]), b))


@torch.no_grad()
def pipeline(folder: Path, refs_train: Path) -> dict:
    done = max(folder.glob("data-*/adapt-*/_done.json"), key=lambda p: p.stat().st_mtime)
    model = LRGenerator.from_checkpoint(str(done.parent / "adapted.safetensors")).model.eval()
    net = model.degradation
    photos: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for hr in sorted(folder.glob("data-*/tiles/hr/*/*.png")):
        photos.setdefault(hr.parent.name, []).append((load(hr), load(Path(str(hr).replace("/hr/", "/lr/")))))

    def reference_set(images: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        emb = embed(net, images).double()
        w = calibrate.reference_weights(emb, embed(net, [calibrate.weight_probe(t) for t in images]))
        return emb, w, pooled_content(model, images, upsample=True)

    ref_sets = {"refs_train": reference_set([load(p) for p in sorted(refs_train.glob("*.png"))])}
    own = {ph: reference_set([lr for _, lr in tiles]) for ph, tiles in photos.items()}
    scores: dict[str, dict[str, list[float]]] = {}
    picks: dict[str, dict[str, list[str]]] = {}
    for ph, tiles in photos.items():
        emb, psnrs, change = [], [], []
        for hr, lr in tiles:
            starts = degrade.apply(hr.expand(len(EXTENDED), -1, -1, -1), EXTENDED)
            emb.append(net(starts).double())
            psnrs.append(torch.tensor([psnr(starts[b : b + 1], lr) for b in range(len(EXTENDED))]))
            change.append(((starts[:N] - starts[PLAIN : PLAIN + 1]) ** 2).mean((1, 2, 3)).double())
        e_ext, table, mildness = torch.stack(emb), torch.stack(psnrs), torch.stack(change).mean(0)
        e = e_ext[:, :N]  # every rule but double_jpeg_bank chooses from the default bank
        tile_content = pooled_content(model, [hr for hr, _ in tiles], upsample=False)
        others = tuple(torch.cat([own[q][i] for q in photos if q != ph]) for i in range(3))
        for name, (r, w, r_content) in {"eval": others, **ref_sets}.items():
            w = w / w.sum()
            err = ((e[:, :, None, :] - r[None, None]) ** 2).mean(-1)  # [tiles, bank, refs]
            best, ranks = rank_choice(err.mean(0), w)
            chosen = {"base": best}
            dist = torch.cdist(tile_content, r_content)  # [tiles, refs]
            for f in (0.25, 0.5):
                m = max(1, round(f * len(tiles)))
                a = torch.zeros_like(dist).scatter_(0, dist.argsort(0)[:m], 1.0 / m)
                chosen[f"content_top{f}"] = rank_choice((err * a[:, None]).sum(0), w)[0]
            for t in (0.25, 0.5):
                a = torch.softmax(-dist / (t * dist.median()), 0)
                chosen[f"content_soft{t}"] = rank_choice((err * a[:, None]).sum(0), w)[0]
            for z in (0.5, 1.0, 2.0):
                chosen[f"one_se_{z}"] = one_se_choice(ranks, w, best, mildness, z)
            e_bar = e.mean(0)  # [bank, dim]: the entry's mean embedding over the probe tiles
            scale = e.reshape(-1, e.shape[-1]).std(0).clamp_min(1e-12)
            chosen["centroid"] = rank_choice(((e_bar[:, None] - r[None]) ** 2).mean(-1), w)[0]
            chosen["centroid_z"] = rank_choice((((e_bar[:, None] - r[None]) / scale) ** 2).mean(-1), w)[0]
            chosen["double_jpeg_bank"] = rank_choice(
                ((e_ext[:, :, None, :] - r[None, None]) ** 2).mean((0, -1)), w
            )[0]
            row = scores.setdefault(name, {})
            row.setdefault("best_fixed", []).append(float(table[:, :N].mean(0).max()))
            for rule, b in chosen.items():
                row.setdefault(rule, []).append(float(table[:, b].mean()))
                label = f"{ph}: {calibrate.theta_label(EXTENDED[b])}"
                picks.setdefault(name, {}).setdefault(rule, []).append(label)
    return {
        name: {rule: round(statistics.fmean(v), 3) for rule, v in row.items()} | {"picks": picks[name]}
        for name, row in scores.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", nargs="+", help="`work` folders of kind: evaluate runs")
    ap.add_argument("--refs-root", nargs="+", required=True, help="the benchmark root of each work folder")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if len(args.refs_root) != len(args.work):
        raise SystemExit("give one --refs-root per work folder")
    torch.set_num_threads(args.threads)
    result: dict = {}
    for work, root in zip(args.work, args.refs_root, strict=True):
        for p in sorted(Path(work).iterdir()):
            if any(p.glob("data-*/adapt-*/_done.json")):
                result[p.name] = pipeline(p, Path(root) / p.name / "refs_train")
    summary = {}
    for name in ("eval", "refs_train"):
        rules = [k for k in next(iter(result.values()))[name] if k != "picks"]
        delta = {k: [r[name][k] - r[name]["base"] for r in result.values()] for k in rules}
        summary[name] = {
            k: {
                "mean_db_vs_base": round(statistics.fmean(d), 3),
                "better": sum(x > 1e-9 for x in d),
                "worse": sum(x < -1e-9 for x in d),
            }
            for k, d in delta.items()
        }
    print(json.dumps({"pipelines": result, "summary": summary}, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
