"""Per-domain start degradations and τ: the paper's "auto-selection of T" future work (§3.4, §4).

Generation starts at ``x_τ = √ᾱ_τ·D(HR) + √(1−ᾱ_τ)·ε`` (Alg. 2). The paper draws D from a fixed
synthetic model and τ from a fixed range, and notes that τ "should not be a manual set but rather
a variable that correlates with the degradation process". This module makes both follow the
reference domain:

- **Start bank.** A small grid of plain start degradations θ (kind ``domain``): isotropic Gaussian
  blur of the HR (σ in HR pixels), antialiased bicubic ×1/s, optional JPEG (Pillow's libjpeg,
  4:2:0). Each candidate of each sample starts from the bank entries whose D(HR_i, θ) is closest to
  the sample's reference in the degradation extractor's space, ``‖E_deg(D(HR_i, θ)) − E_deg(ref_i)‖²``
  (the very error the best-of-k filter uses, applied to the start instead of only to the end).
  This is per sample, so it needs no paired data and follows the reference it is given.
- **τ per domain.** ``calibrate_tau`` generates the LR of calibration HR crops with references
  from a *validation split* of the domain's unpaired LR for each candidate ``tau_max`` and keeps the
  one whose outputs are closest to their references in E_deg space, preferring the smaller τ
  when the difference is within the measurement noise (fidelity falls as τ grows, Table 3).

Why not fit a single θ to the domain's statistics: measured on codec data (docs/realism.md), the
mean statistics of a domain's LR (noise level, blur, E_deg mean) depend on *what* the pictures show
as much as on how they were degraded — refs of smooth scenes (retina, star fields) read as "blurry"
whatever the codec — so a single fitted θ followed the scenes, not the codec. Matching each sample
to its own reference, content against comparable content, was far more robust.

The result is a :class:`DomainCalibration` stored in the adapted checkpoint's metadata
(``calibration``) and used by the generation job by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from realdgen_core import degrade

METADATA_KEY = "calibration"

# 49 entries. The job chooses among them once per reference domain (``domain_start_profile``: one
# E_deg call per entry per probe tile, not per sample), so a finer grid costs no per-sample work;
# chosen per sample from one reference, a finer grid only gave E_deg's noise more ways to err.
DEFAULT_BLUR_SIGMAS: tuple[float, ...] = (0.0, 0.6, 1.0, 1.3, 1.6, 2.2, 3.0)
DEFAULT_JPEG_QUALITIES: tuple[int, ...] = (0, 95, 90, 85, 75, 60, 40)  # 0 = no JPEG
DEFAULT_TAU_GRID: tuple[int, ...] = (0, 25, 50, 100, 200, 300)
# Unsharp-mask amounts applied to the LR after the resize (0 = none): phones and re-share apps sharpen.
DEFAULT_SHARPEN_AMOUNTS: tuple[float, ...] = (0.0,)
SHARPEN_SIGMA = 1.0  # LR px: the mask's Gaussian


def start_theta(scale: int, blur_sigma: float, jpeg_quality: int, sharpen: float = 0.0) -> dict:
    """One start θ (kind ``domain``): blur σ (HR px, 0 = none) → bicubic_aa ×1/s → unsharp mask of
    that amount (σ ``SHARPEN_SIGMA`` LR px, 0 = none) → JPEG q (0 = none)."""
    if scale not in degrade.SCALES:
        raise ValueError(f"scale must be one of {degrade.SCALES}, got {scale!r}")
    if not 0.0 <= float(blur_sigma) <= 10.0:
        raise ValueError(f"blur_sigma must be in [0, 10] HR pixels, got {blur_sigma!r}")
    if not (int(jpeg_quality) == 0 or 1 <= int(jpeg_quality) <= 100):
        raise ValueError(f"jpeg_quality must be 0 (none) or in [1, 100], got {jpeg_quality!r}")
    if not 0.0 <= float(sharpen) <= 10.0:
        raise ValueError(f"sharpen must be in [0, 10] (0 = none), got {sharpen!r}")
    ops: list[dict] = []
    if blur_sigma > 0:
        # 21 taps as in D; covers ±3σ up to σ = 3.3, wider kernels are truncated (and renormalised).
        size = 21 if blur_sigma <= 3.3 else 2 * math.ceil(3 * blur_sigma) + 1
        kernel = {"type": "iso", "size": size, "sigma_x": float(blur_sigma), "sigma_y": float(blur_sigma)}
        ops.append({"name": "blur", "op": "blur", "kernel": {**kernel, "rotation": 0.0}})
    ops.append({"name": "resize", "op": "resize", "relative_to": "lr", "factor": 1.0, "mode": "bicubic_aa"})
    if sharpen > 0:
        ops.append({"name": "sharpen", "op": "unsharp", "sigma": SHARPEN_SIGMA, "amount": float(sharpen)})
    if jpeg_quality:
        ops.append({"name": "jpeg", "op": "jpeg", "quality": int(jpeg_quality)})
    return {
        "version": degrade.THETA_VERSION,
        "kind": "domain",
        "scale": int(scale),
        "noise_seed": 0,
        "ops": ops,
    }


def start_bank(
    scale: int,
    blur_sigmas: Sequence[float] = DEFAULT_BLUR_SIGMAS,
    jpeg_qualities: Sequence[int] = DEFAULT_JPEG_QUALITIES,
    sharpen_amounts: Sequence[float] = DEFAULT_SHARPEN_AMOUNTS,
) -> tuple[dict, ...]:
    """The grid of start θs (blur-major, then sharpening, then JPEG); see :func:`start_theta`."""
    if not blur_sigmas or not jpeg_qualities or not sharpen_amounts:
        raise ValueError("a start bank needs at least one blur sigma, sharpen amount and JPEG quality")
    return tuple(
        start_theta(scale, s, q, a) for s in blur_sigmas for a in sharpen_amounts for q in jpeg_qualities
    )


def check_bank(bank: Sequence[dict], scale: int) -> None:
    """Raise ValueError unless ``bank`` is a non-empty list of ``domain`` θs of this scale."""
    if not bank:
        raise ValueError("the start bank is empty")
    for i, th in enumerate(bank):
        if not isinstance(th, dict) or th.get("kind") != "domain" or int(th.get("scale", -1)) != scale:
            raise ValueError(f"start bank entry {i} is not a 'domain' θ of scale {scale}: {th!r}")


@dataclass(frozen=True)
class DomainCalibration:
    """What adaptation records for a reference domain; the job's defaults when present.

    ``bank``: start θs the per-sample selection chooses from; ``tau_min``/``tau_max``: the τ range;
    ``weights``: the best-of-k filter's (content, degradation) weights, applied to errors normalised
    per sample (``filter_norm``); ``scores``: what the selection measured, for the record.
    """

    domain: str
    tau_min: int
    tau_max: int
    bank: tuple[dict, ...]
    weights: tuple[float, float] = (0.0, 1.0)
    filter_norm: bool = True
    scores: dict = field(default_factory=dict)
    # the reverse process τ was chosen with ({"kind", "steps", "eta"}; None = the paper's ancestral)
    sampler: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bank"] = [dict(t) for t in self.bank]
        d["weights"] = list(self.weights)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DomainCalibration:
        try:
            cal = cls(
                domain=str(d["domain"]),
                tau_min=int(d["tau_min"]),
                tau_max=int(d["tau_max"]),
                bank=tuple(dict(t) for t in d["bank"]),
                weights=(float(d["weights"][0]), float(d["weights"][1])),
                filter_norm=bool(d.get("filter_norm", True)),
                scores=dict(d.get("scores", {})),
                sampler=None if d.get("sampler") is None else dict(d["sampler"]),
            )
            if cal.sampler is not None:
                from realdgen_core.diffusion import SamplerConfig

                SamplerConfig.from_dict(cal.sampler)  # raises ValueError for a bad one
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise ValueError(f"invalid domain calibration {d!r}: {e}") from e
        if not 0 <= cal.tau_min <= cal.tau_max:
            raise ValueError(
                f"calibration tau range must satisfy 0 <= tau_min <= tau_max, got "
                f"{cal.tau_min}, {cal.tau_max}"
            )
        if min(cal.weights) < 0:
            raise ValueError(f"calibration weights must be non-negative, got {cal.weights}")
        return cal


def from_metadata(metadata: dict) -> DomainCalibration | None:
    """The calibration recorded in checkpoint metadata, or None."""
    d = metadata.get(METADATA_KEY)
    return None if d is None else DomainCalibration.from_dict(d)


# ------------------------------------------------------------------ per-sample start selection


@torch.inference_mode()
def bank_errors(
    degradation_net: torch.nn.Module, hr: Tensor, ref_emb: Tensor, bank: Sequence[dict], device: torch.device
) -> Tensor:
    """‖E_deg(D(HR, θ_b)) − ref_emb‖² / dim for every bank entry b of ONE sample.

    ``hr``: [1,3,H,W] in [0,1] (modcropped), ``ref_emb``: [D]. Returns float32 [len(bank)] on CPU.
    Each D(HR, θ_b) is embedded in one call of the sample's own bank (same shape every time), so the
    result does not depend on the batch the sample came in.
    """
    starts = degrade.apply(hr.detach().to("cpu", torch.float32).expand(len(bank), -1, -1, -1), list(bank))
    emb = degradation_net(starts.to(device)).float()
    return (emb - ref_emb.to(device).float()[None]).pow(2).mean(1).cpu()


def choose_starts(errors: Tensor, k: int) -> list[int]:
    """Bank indices for k candidates: the k lowest errors (stable order). Entries with an infinite
    error are excluded (a domain profile's unchosen entries); cycles when k > the entries left."""
    order = [i for i in torch.sort(errors, stable=True).indices.tolist() if math.isfinite(float(errors[i]))]
    if not order:
        raise ValueError("every start bank entry is excluded (all errors are infinite)")
    return [order[j % len(order)] for j in range(k)]


# ------------------------------------------------------------------ per-domain start choice


@torch.inference_mode()
def domain_start_profile(
    degradation_net: torch.nn.Module,
    hr_tiles: Sequence[Tensor],
    ref_emb: Tensor,
    bank: Sequence[dict],
    device: torch.device | str = "cpu",
    ref_weights: Tensor | None = None,
    aggregate: str = "rank",
) -> dict:
    """Score every bank entry against a whole reference domain and keep the best: the paper's
    "choose the start per domain" (§4 future work), made from the job's own inputs.

    ``hr_tiles``: probe HR tiles [3,H,W] in [0,1] (H, W multiples of the scale); ``ref_emb``:
    [M, D] E_deg embeddings of the domain's references. The score of entry b is the mean over every
    (probe tile h, reference r) pair of ``‖E_deg(D(h, θ_b)) − E_deg(r)‖² / D``, the error the
    per-sample choice uses for one pair. One pair is a noisy measure: E_deg reads the picture's
    content as well as its degradation, and a sample's own HR and reference show different scenes.
    A real domain's LR share one pipeline, so averaging over many pairs removes most of that noise
    (docs/realism.md, "Start choice"). Computed from each entry's mean embedding and mean squared
    norm over the tiles: mean_t ‖e_t − r‖² = mean_t ‖e_t‖² − 2 ē·r + ‖r‖², per reference.

    ``ref_weights`` ([M], ≥ 0; ``reference_weights``): the mean over references becomes a weighted
    mean, so references whose embedding says little about their degradation count less. None or all
    zero: every reference counts the same.

    ``aggregate``: how the references' verdicts are combined into the choice.
    ``rank`` (default): a weighted Borda count. Each reference ranks the bank by its own mean error
    over the probe tiles; the chosen entry has the lowest weighted mean rank (ties: the lower mean
    error), so every reference has one bounded say whatever the scale of its errors.
    ``distance``: the lowest (weighted) mean error above: the squared distance of the entry's mean
    embedding ē_b to the references' weighted centroid, plus the spread mean_t ‖e_tb − ē_b‖² of its
    embeddings over the probe tiles (plus the references' own spread, the same for every entry); the
    references whose errors are large for every entry weigh the most.
    Measured on seven codec pipelines, with `refs_train/` as references (docs/realism.md, "Start
    choice: ranks, not distances"): the SR proxy trained on the job's data gained 0.2–0.6 dB on
    six and was unchanged on one.

    Returns ``{"errors": [len(bank)] floats (the mean error), "ranks": [len(bank)] weighted mean
    ranks (0 = every reference's first choice), "chosen": index, "aggregate", "tiles": n, "refs":
    m, "effective_refs": (Σw)² / Σw²}``.
    """
    if aggregate not in ("rank", "distance"):
        raise ValueError(f"aggregate must be 'rank' or 'distance', got {aggregate!r}")
    if not len(hr_tiles):
        raise ValueError("domain_start_profile needs at least one probe HR tile")
    if ref_emb.ndim != 2 or not ref_emb.shape[0]:
        raise ValueError(f"ref_emb must be [M>0, D], got {tuple(ref_emb.shape)}")
    r = ref_emb.detach().to(device, torch.float64)
    w = torch.ones(r.shape[0], dtype=torch.float64, device=r.device)
    if ref_weights is not None:
        given = torch.as_tensor(ref_weights, dtype=torch.float64).to(r.device).flatten()
        if given.shape[0] != r.shape[0] or not bool(torch.isfinite(given).all()) or bool((given < 0).any()):
            raise ValueError(f"ref_weights must be {r.shape[0]} finite values >= 0, got {tuple(given.shape)}")
        if float(given.sum()) > 0:
            w = given
    w = w / w.sum()
    # per (entry, reference) error averaged over the tiles, from two running sums over the tiles:
    # mean_t ‖e_tb − r‖² = mean_t ‖e_tb‖² − 2 ē_b·r + ‖r‖²
    sq_mean = torch.zeros(len(bank), dtype=torch.float64, device=r.device)
    emb_mean = torch.zeros(len(bank), r.shape[1], dtype=torch.float64, device=r.device)
    for hr in hr_tiles:
        starts = degrade.apply(
            hr.detach().to("cpu", torch.float32)[None].expand(len(bank), -1, -1, -1), list(bank)
        )
        emb = degradation_net(starts.to(device)).to(torch.float64)
        sq_mean += emb.pow(2).sum(1) / len(hr_tiles)
        emb_mean += emb / len(hr_tiles)
    per_ref = (sq_mean[:, None] - 2 * emb_mean @ r.T + r.pow(2).sum(1)[None]) / r.shape[1]  # [B, M]
    errors = (per_ref * w[None]).sum(1).cpu()  # the weighted mean over references
    ranks = per_ref.argsort(dim=0, stable=True).argsort(dim=0, stable=True).to(torch.float64)
    mean_rank = (ranks * w[None]).sum(1).cpu()
    if aggregate == "rank":
        # lowest mean rank; among equal ranks, the lower mean error
        chosen = min(range(len(bank)), key=lambda b: (round(float(mean_rank[b]), 9), float(errors[b]), b))
    else:
        chosen = int(torch.argmin(errors))
    return {
        "errors": [float(e) for e in errors],
        "ranks": [round(float(x), 6) for x in mean_rank],
        "chosen": chosen,
        "aggregate": aggregate,
        "tiles": len(hr_tiles),
        "refs": int(r.shape[0]),
        "effective_refs": round(float(1.0 / w.pow(2).sum()), 2),
    }


def probe_boxes(h: int, w: int, tile: int, k: int) -> list[tuple[int, int]]:
    """Top-left corners ``(y, x)`` of up to ``k`` distinct ``tile`` squares spread over an ``h × w``
    image: the centres of a ``gy × gx`` grid of cells (``gx = ⌈√(k·w/h)⌉``, ``gy = ⌈k/gx⌉``), clipped
    inside the image, ``k`` of them taken evenly in row-major order. ``k = 1`` is the centre tile (to a
    pixel: the offset is rounded, not floored);
    an image of one tile gives one box whatever ``k``."""
    if tile < 1 or h < tile or w < tile or k < 1:
        raise ValueError(f"probe_boxes needs 1 <= tile <= min(h, w) and k >= 1, got {h}x{w}, {tile}, {k}")
    gx = max(1, min(k, math.ceil(math.sqrt(k * w / h))))
    gy = math.ceil(k / gx)
    ys = sorted({min(max(round((i + 0.5) * h / gy - tile / 2), 0), h - tile) for i in range(gy)})
    xs = sorted({min(max(round((i + 0.5) * w / gx - tile / 2), 0), w - tile) for i in range(gx)})
    cells = [(y, x) for y in ys for x in xs]
    return cells if len(cells) <= k else [cells[(j * len(cells)) // k] for j in range(k)]


def spread_probe_crops(images: Iterable, n_images: int, tile: int, n_tiles: int) -> list[np.ndarray]:
    """Up to ``n_tiles`` ``tile`` squares (copies, [tile, tile, 3]) cut from ``images`` (an iterable
    of ``n_images`` [H, W, C] arrays, None for one that could not be read), in order: each image
    takes ``⌈tiles still wanted / images left⌉`` squares spread over it (:func:`probe_boxes`). An image
    that is None or smaller than one tile gives none, one of one tile gives one, and what an image
    did not give passes to the images after it. Stops reading ``images`` once the budget is met.

    What the last images could not give is made up from the images before them: each image also
    keeps up to its share again of further distinct squares (the boxes of a grid twice as fine that
    its own share did not take), and a shortfall at the end takes those, one image at a time in turn.
    So a job whose last inputs are broken or small still measures ``n_tiles`` tiles when its other
    inputs have room (the reserve holds at most about ``n_tiles`` squares in all)."""
    crops: list[np.ndarray] = []
    reserve: list[list[np.ndarray]] = []
    for j, img in enumerate(images):
        if len(crops) >= n_tiles:
            break
        if img is None or img.shape[0] < tile or img.shape[1] < tile:
            continue
        share = max(1, math.ceil((n_tiles - len(crops)) / (n_images - j)))
        taken = probe_boxes(*img.shape[:2], tile, share)
        crops += [np.array(img[y : y + tile, x : x + tile]) for y, x in taken]
        taken_set = set(taken)
        spare = [b for b in probe_boxes(*img.shape[:2], tile, 2 * share) if b not in taken_set][:share]
        reserve.append([np.array(img[y : y + tile, x : x + tile]) for y, x in spare])
    while len(crops) < n_tiles and any(reserve):
        for spare in reserve:
            if spare and len(crops) < n_tiles:
                crops.append(spare.pop(0))
    return crops


# A reference's weight in the domain profile: how far E_deg moves when the reference is blurred a
# little more (Gaussian σ in LR pixels). A flat or dark crop looks the same blurred or not, so its
# embedding carries little about the pipeline and much about the scene; E_deg reads such a crop as
# "blurred" whatever made it (docs/realism.md, "Reference weights").
REF_WEIGHT_BLUR_SIGMA = 0.7


def weight_probe(img: Tensor, sigma: float = REF_WEIGHT_BLUR_SIGMA) -> Tensor:
    """``img`` ([3,h,w] or [N,3,h,w] in [0,1]) blurred by an isotropic Gaussian of ``sigma`` px."""
    size = 2 * math.ceil(3 * sigma) + 1
    x = img[None] if img.dim() == 3 else img
    out = degrade.filter2d(x.float(), degrade.isotropic_gaussian_kernel(size, sigma))
    return out[0] if img.dim() == 3 else out


def reference_weights(emb: Tensor, emb_blurred: Tensor) -> Tensor:
    """Per-reference weights ``‖E_deg(weight_probe(r)) − E_deg(r)‖² / D`` ([M] float64)."""
    if emb.shape != emb_blurred.shape or emb.ndim != 2:
        raise ValueError(
            f"embeddings must both be [M, D], got {tuple(emb.shape)} and {tuple(emb_blurred.shape)}"
        )
    return (emb_blurred.double() - emb.double()).pow(2).mean(1)


def profile_errors(profile: dict, n_bank: int) -> Tensor:
    """A domain profile as per-sample start errors [n_bank]: the chosen entry's score, ∞ elsewhere
    (every candidate of the domain's samples starts from the chosen θ; see ``choose_starts``)."""
    out = torch.full((n_bank,), math.inf)
    c = int(profile["chosen"])
    out[c] = float(profile["errors"][c])
    return out


def theta_label(theta: dict) -> str:
    """A start θ in words: ``blur σ 1.6 + bicubic_aa + JPEG q95``."""
    parts = []
    for op in theta.get("ops", []):
        if op["op"] == "blur":
            parts.append(f"blur σ {op['kernel']['sigma_x']:g}")
        elif op["op"] == "resize":
            parts.append(op.get("mode", "resize"))
        elif op["op"] == "jpeg":
            parts.append(f"JPEG q{op['quality']}")
        elif op["op"] == "unsharp":
            parts.append(f"sharpen {op['amount']:g}")
        else:
            parts.append(str(op["op"]))
    return " + ".join(parts)


def instantiate(theta: dict, noise_seed: int) -> dict:
    """A bank θ with the candidate's own noise seed (no bank op draws noise today; kept for ones that do)."""
    return {**theta, "noise_seed": int(noise_seed)}


# ------------------------------------------------------------------ τ per domain


def split_validation(names: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """(train, validation) indices of a domain's LR files, decided by a hash of each name.

    A file's side depends on its name only (not on the listing or its order), so adding files to a
    domain never moves an old file across; at least one file lands on each side when there are two.
    """
    import hashlib

    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction!r}")

    def position(n: str) -> float:  # a name that is not UTF-8 is listed with surrogate escapes
        return int(hashlib.sha256(n.encode("utf-8", "surrogateescape")).hexdigest()[:12], 16) / 16**12

    keyed = [(position(n), i) for i, n in enumerate(names)]
    val = sorted(i for u, i in keyed if u < fraction)
    train = sorted(i for u, i in keyed if u >= fraction)
    if len(names) >= 2 and not val:
        val = [min(keyed)[1]]
        train = [i for i in train if i != val[0]]
    if len(names) >= 2 and not train:
        train = [max(keyed)[1]]
        val = [i for i in val if i != train[0]]
    return train, val


def calibrate_tau(
    generator,
    hr: Tensor,
    refs: Sequence[Tensor],
    bank: Sequence[dict],
    *,
    tau_grid: Sequence[int] = DEFAULT_TAU_GRID,
    k: int = 4,
    weights: tuple[float, float] = (0.0, 1.0),
    filter_norm: bool = True,
    seed: int = 0,
    start_errors: Tensor | None = None,
) -> tuple[int, dict]:
    """Choose ``tau_max`` for a domain from its validation LR (unpaired), with the start bank in use.

    ``hr``: [N,3,H,W] calibration HR crops (content the domain's LR does not show); ``refs``: N
    validation LR images of the domain (crop i is paired with refs[i]). For every ``tau_max`` of
    the grid, generates the N pairs (τ ~ U{0..tau_max}, the generator's sampler) and measures the
    kept outputs' degradation error to their references (E_deg MSE, what the filter measures).
    Returns the smallest ``tau_max`` whose mean error is within one standard error of the best
    one — a larger τ must buy a measurably closer degradation to be worth the fidelity it costs
    (paper Table 3) — and the per-τ scores.

    ``start_errors`` ([N, len(bank)]): the start each pair draws from; default: each pair's own
    best entry for its own reference (``bank_errors``). A domain profile's ``profile_errors``,
    repeated per pair, makes every pair start from the domain's one chosen entry, as the job does.
    """
    if len(refs) != hr.shape[0] or not len(refs):
        raise ValueError(
            f"calibrate_tau needs one reference per HR crop, got {hr.shape[0]} crops, {len(refs)} refs"
        )
    grid = sorted({int(t) for t in tau_grid})
    if not grid or grid[0] < 0:
        raise ValueError(f"tau_grid must hold non-negative steps, got {tau_grid!r}")
    seeds = [seed * 1_000_003 + i for i in range(hr.shape[0])]
    ref_emb = generator.degradation_embeddings(list(refs))
    if start_errors is not None:
        errors = torch.as_tensor(start_errors, dtype=torch.float32)
        if tuple(errors.shape) != (hr.shape[0], len(bank)):
            raise ValueError(
                f"start_errors must be [{hr.shape[0]}, {len(bank)}] (pairs, bank), got {tuple(errors.shape)}"
            )
    else:
        # the start choice does not depend on τ: embed each pair's bank once for the whole grid
        errors = torch.stack(
            [
                bank_errors(generator.model.degradation, hr[i : i + 1], ref_emb[i], bank, generator.device)
                for i in range(hr.shape[0])
            ]
        )
    scores: dict[str, dict] = {}
    for tau_max in grid:
        res = generator.generate(
            hr,
            ref_embeddings=ref_emb,
            k=k,
            tau_range=(0, tau_max),
            seeds=seeds,
            start_kind="domain",
            start_bank=bank,
            start_bank_errors=errors,
            weights=weights,
            filter_norm=filter_norm,
        )
        rows = torch.arange(hr.shape[0])
        de = res.degradation_errors[rows, res.kept].double()
        ce = res.content_errors[rows, res.kept].double()
        n = de.numel()
        scores[str(tau_max)] = {
            "degradation_error": float(de.mean()),
            "degradation_error_se": float(de.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0,
            "content_error": float(ce.mean()),
        }
    chosen, best = choose_tau_max(scores)
    return chosen, {"per_tau_max": scores, "best_tau_max": best, "pairs": int(hr.shape[0])}


def choose_tau_max(per_tau_max: dict[str, dict[str, float]]) -> tuple[int, int]:
    """(chosen, best) from ``{"τ": {"degradation_error", "degradation_error_se"}}``: ``best`` has the
    lowest mean error; ``chosen`` is the smallest τ whose mean is within one standard error of it (the
    one-SE rule: a larger τ costs diffusion steps and must earn them beyond the noise)."""
    grid = sorted(int(t) for t in per_tau_max)
    best = min(grid, key=lambda t: per_tau_max[str(t)]["degradation_error"])
    limit = per_tau_max[str(best)]["degradation_error"] + per_tau_max[str(best)]["degradation_error_se"]
    return min(t for t in grid if per_tau_max[str(t)]["degradation_error"] <= limit), best
