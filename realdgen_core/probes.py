"""Small networks trained as measuring instruments: a two-sample classifier and an SR proxy.

Both take uint8 HWC RGB tiles, train for a fixed number of Adam steps from a fixed seed (every
random draw from one ``torch.Generator``; weights initialised inside ``torch.random.fork_rng``),
and return plain numbers, so a report built on them is reproducible on one machine.

- :func:`two_sample_test`: a small CNN learns to tell generated LR crops from true LR crops of the
  same HR tiles. Folds by photo group: it is trained on the tiles of the other groups and tested
  on the held-out group's, so content cannot give the answer. Accuracy 0.5 = indistinguishable.
- :func:`train_sr_proxy` / :func:`evaluate_sr_proxy`: the paper's Table 1 protocol, small — the
  same SR network trained on each generator's (HR, LR) pairs, scored on real pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from realdgen_core.metrics import psnr, ssim

__all__ = [
    "TwoSampleCNN",
    "ProxySR",
    "two_sample_test",
    "wilson_interval",
    "train_sr_proxy",
    "evaluate_sr_proxy",
]


def _tensor(imgs: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 HWC tiles (same size) → float [N, 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float().div(255.0)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class TwoSampleCNN(nn.Module):
    """conv stack (strides 1, 2, 2, 1) → global average → one logit ("generated")."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, w, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(2 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5).mean(dim=(2, 3))).squeeze(1)


def _grid_positions(size: int, crop: int, step: int) -> list[int]:
    return list(range(0, size - crop + 1, step)) or [0]


def _folds(groups: Sequence[str]) -> list[tuple[str, list[int], list[int]]]:
    """(name, train indices, test indices): leave-one-group-out; two index-parity folds for one group."""
    names = sorted(set(groups))
    if len(names) >= 2:
        return [
            (g, [i for i, x in enumerate(groups) if x != g], [i for i, x in enumerate(groups) if x == g])
            for g in names
        ]
    n = len(groups)
    even, odd = list(range(0, n, 2)), list(range(1, n, 2))
    return [("even", odd, even), ("odd", even, odd)] if odd else [("all", even, even)]


def two_sample_test(
    real: Sequence[np.ndarray],
    generated: Sequence[np.ndarray],
    groups: Sequence[str],
    *,
    steps: int = 300,
    batch_size: int = 32,
    crop: int = 32,
    width: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    augment: bool = True,
) -> dict:
    """Held-out accuracy of a CNN telling ``generated[i]`` from ``real[i]`` (paired tiles, same size).

    Training crops: a random tile of the training fold, a random position on the 8-px grid (so both
    classes keep the codec's block phase), one of the 8 flips/transposes (``augment``), half real
    and half generated per batch. Test: every
    non-overlapping ``crop`` position of every held-out tile, both classes; ``accuracy`` is over
    those crops (with a Wilson 95 % interval), ``tile_accuracy`` over tiles (mean logit of a tile's
    crops), ``paired_accuracy`` over pairs: the real and the generated crop of the same tile and
    position, called right when the generated one has the higher logit (a two-alternative forced
    choice; the content both crops share cancels, so it ranks generators where the unpaired figure's
    interval cannot). The held-out set is balanced by construction, so the decision threshold is the median of
    its logits (``_balanced_correct``): a held-out photo shifts every logit by its content, and with a
    threshold of 0 that shift alone gave exactly 0.5 for a classifier that ranked the two classes
    apart (``fixed_threshold_accuracy`` keeps that figure). 0.5 = chance. With a few dozen tiles
    the interval is wide (±0.09 for 120 crops), and a classifier that memorises its training fold
    can stay near 0.5 on the held-out photo: a value near 0.5 means "not told apart by this
    budget", not proof of indistinguishability.
    """
    if not (len(real) == len(generated) == len(groups)) or not real:
        raise ValueError("real, generated and groups must be non-empty and of equal length")
    xr, xg = _tensor(real), _tensor(generated)
    if xr.shape != xg.shape:
        raise ValueError(f"real {tuple(xr.shape)} and generated {tuple(xg.shape)} tiles differ in shape")
    h, w = xr.shape[2:]
    crop = min(crop, h, w)
    g = torch.Generator().manual_seed(seed)
    ys, xs = _grid_positions(h, crop, 8), _grid_positions(w, crop, 8)
    test_ys, test_xs = _grid_positions(h, crop, crop), _grid_positions(w, crop, crop)
    correct = total = tile_correct = tile_total = fixed_correct = 0
    paired_wins, paired_total = 0.0, 0
    folds_out = []
    for fi, (name, train_idx, test_idx) in enumerate(_folds(list(groups))):
        net = _seeded(seed + fi, lambda: TwoSampleCNN(width))
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        half = max(1, batch_size // 2)
        tidx = torch.tensor(train_idx)
        labels = torch.cat([torch.zeros(half), torch.ones(half)])
        net.train()
        for _ in range(steps):
            crops = []
            for src in (xr, xg):
                pick = tidx[torch.randint(0, len(train_idx), (half,), generator=g)]
                py = torch.randint(0, len(ys), (half,), generator=g)
                px = torch.randint(0, len(xs), (half,), generator=g)
                flips = torch.randint(0, 8, (half,), generator=g).tolist()
                for i, a, b, f in zip(pick.tolist(), py.tolist(), px.tolist(), flips, strict=True):
                    y0, x0 = ys[a], xs[b]
                    c = src[i, :, y0 : y0 + crop, x0 : x0 + crop]
                    if augment:  # the 8 flips/transposes of the square: the 8-px grid stays aligned
                        c = c.flip(2) if f & 1 else c
                        c = c.flip(1) if f & 2 else c
                        c = c.transpose(1, 2) if f & 4 else c
                    crops.append(c)
            loss = F.binary_cross_entropy_with_logits(net(torch.stack(crops)), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()

        def test_crops(src: torch.Tensor, i: int) -> torch.Tensor:
            return torch.stack(
                [src[i, :, y0 : y0 + crop, x0 : x0 + crop] for y0 in test_ys for x0 in test_xs]
            )

        with torch.no_grad():  # [class, tile, crop] logits of the held-out tiles
            logits = torch.stack(
                [torch.stack([net(test_crops(src, i)) for i in test_idx]) for src in (xr, xg)]
            )
        # The held-out set holds as many real as generated crops, so "generated" = the upper half of
        # its logits (threshold = their median). A fixed threshold of 0 reads a shift of every logit of
        # an unseen photo (its content, not its degradation) as one class for all: exactly 0.5 however
        # well the crops are ranked. A median threshold keeps chance at 0.5 (no information: the halves
        # are a coin toss) and counts a classifier that ranks generated above real as telling them apart.
        f_correct, f_total = _balanced_correct(logits.flatten(1))
        t_correct, t_total = _balanced_correct(logits.mean(2))
        tile_correct += t_correct
        tile_total += t_total
        fixed_correct += int((logits[0] <= 0).sum() + (logits[1] > 0).sum())
        # Paired (two-alternative forced choice): the real and the generated crop of the same tile
        # and position, the one with the higher logit called generated. The content term of a logit
        # is the same for both crops of a pair and cancels; ties (no information) count half.
        diff = logits[1] - logits[0]
        f_paired = float((diff > 0).sum()) + 0.5 * float((diff == 0).sum())
        paired_wins += f_paired
        paired_total += diff.numel()
        correct += f_correct
        total += f_total
        folds_out.append(
            {
                "held_out": name,
                "train_tiles": len(train_idx),
                "test_tiles": len(test_idx),
                "accuracy": round(f_correct / f_total, 4),
                "paired_accuracy": round(f_paired / diff.numel(), 4),
                "final_loss": round(loss.item(), 4),
            }
        )
    return {
        "accuracy": round(correct / total, 4),
        "accuracy_ci95": [round(v, 4) for v in wilson_interval(correct, total)],
        "paired_accuracy": round(paired_wins / paired_total, 4),
        "paired_ci95": [round(v, 4) for v in wilson_interval(round(paired_wins), paired_total)],
        "paired_wins": paired_wins,
        "test_pairs": paired_total,
        "paired_fold_distance": fold_distance(folds_out),
        "tile_accuracy": round(tile_correct / tile_total, 4),
        "fixed_threshold_accuracy": round(fixed_correct / total, 4),
        "test_crops": total,
        "folds": folds_out,
        "chance": 0.5,
    }


def fold_distance(folds: Sequence[dict]) -> float:
    """Mean over held-out folds of ``|paired_accuracy − 0.5|``: 0 = chance on every fold.

    A fold far *below* 0.5 is a classifier that separates the two classes on the held-out photo in
    the direction opposite to its training photos; pooled with a fold far above, it averages to
    near 0.5. This figure counts both as told apart. Under the null it is above 0 by the folds'
    sampling noise (about 0.07 for 36 pairs a fold), the same for every generator of one run."""
    if not folds:
        raise ValueError("no folds")
    return round(float(np.mean([abs(f["paired_accuracy"] - 0.5) for f in folds])), 4)


def _balanced_correct(scores: torch.Tensor) -> tuple[int, int]:
    """(correct, total) when the upper half of ``scores`` [2, n] (row 0 real, row 1 generated) is
    called generated. Scores tied at the cut count half right each (no information, no credit)."""
    flat = scores.flatten().double()
    n = flat.numel()
    cut = flat.sort().values[n // 2 - 1 : n // 2 + 1].mean()  # the median of an even-sized set
    real, gen = scores[0].double(), scores[1].double()
    right = (real < cut).sum() + (gen > cut).sum()
    ties = (real == cut).sum() + (gen == cut).sum()
    return int(right) + int(ties) // 2, n


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % for z = 1.96).

    For the two-sample test it treats test crops as independent; crops of one tile are not, so the
    true interval is wider — read it as a lower bound on the uncertainty."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


class ProxySR(nn.Module):
    """A few 3×3 convs + pixel shuffle, residual on bicubic upsampling (trains in seconds on a CPU)."""

    def __init__(self, scale: int, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2)]
        for _ in range(blocks):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(width, 3 * scale * scale, 3, padding=1), nn.PixelShuffle(scale)]
        self.body = nn.Sequential(*layers)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(lr, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return up + self.body(lr - 0.5)


def train_sr_proxy(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    scale: int,
    *,
    steps: int = 300,
    batch_size: int = 16,
    crop: int = 32,
    width: int = 32,
    blocks: int = 3,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[ProxySR, dict]:
    """Train :class:`ProxySR` with L1 on random aligned crops (and flips) of ``(hr, lr)`` uint8 pairs."""
    if not pairs:
        raise ValueError("no training pairs")
    hr = _tensor([p[0] for p in pairs])
    lrs = _tensor([p[1] for p in pairs])
    if hr.shape[2] != lrs.shape[2] * scale or hr.shape[3] != lrs.shape[3] * scale:
        raise ValueError(f"hr {tuple(hr.shape)} is not {scale} x lr {tuple(lrs.shape)}")
    h, w = lrs.shape[2:]
    crop = min(crop, h, w)
    g = torch.Generator().manual_seed(seed)
    net = _seeded(seed, lambda: ProxySR(scale, width, blocks))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    first = last = None
    for step in range(steps):
        idx = torch.randint(0, len(pairs), (batch_size,), generator=g).tolist()
        ys = torch.randint(0, h - crop + 1, (batch_size,), generator=g).tolist()
        xs = torch.randint(0, w - crop + 1, (batch_size,), generator=g).tolist()
        flips = torch.rand(batch_size, 2, generator=g).tolist()
        lo, hi = [], []
        for i, y0, x0, (fh, fv) in zip(idx, ys, xs, flips, strict=True):
            a = lrs[i, :, y0 : y0 + crop, x0 : x0 + crop]
            b = hr[i, :, y0 * scale : (y0 + crop) * scale, x0 * scale : (x0 + crop) * scale]
            if fh < 0.5:
                a, b = a.flip(2), b.flip(2)
            if fv < 0.5:
                a, b = a.flip(1), b.flip(1)
            lo.append(a)
            hi.append(b)
        loss = F.l1_loss(net(torch.stack(lo)), torch.stack(hi))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        last = loss.item()
    net.eval()
    return net, {"steps": steps, "first_loss": round(first, 5), "last_loss": round(last, 5)}


@torch.no_grad()
def evaluate_sr_proxy(
    net: ProxySR | None, pairs: Sequence[tuple[np.ndarray, np.ndarray]], scale: int
) -> dict:
    """PSNR/SSIM (RGB, 0–255, ``crop_border = scale``) of ``net(lr)`` to ``hr`` per pair.

    ``net=None`` measures plain bicubic upsampling (the floor any SR net should beat).
    """
    out = {"psnr": [], "ssim": []}
    for hr, lr in pairs:
        x = _tensor([lr])
        y = (
            F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
            if net is None
            else net(x)
        )
        sr = y.clamp(0, 1).mul(255).round().byte()[0].permute(1, 2, 0).numpy()
        out["psnr"].append(psnr(sr, hr, crop_border=scale))
        out["ssim"].append(ssim(sr, hr, crop_border=scale))
    return {
        "psnr": round(float(np.mean(out["psnr"])), 4),
        "ssim": round(float(np.mean(out["ssim"])), 4),
        "per_tile_psnr": [round(v, 4) for v in out["psnr"]],
    }
