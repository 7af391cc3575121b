"""Stage B: the degradation extractor E_deg (paper §2.1, Eq. 3-6, A.1).

For an anchor D(X, θ) the positives are D(X'_i, θ) — the *same* θ re-applied to other HR crops with
``degrade.apply`` — and the negatives D(X, θ_i) with fresh θ_i (or, for a ``hard_negatives`` share of
them, θ itself with one level moved one step, ``degrade.near_theta``); the triplet loss (Eq. 4) with L2
distances pulls same-θ embeddings together across contents and pushes different-θ embeddings of the
same content apart. LR reconstruction (Eq. 5-6) makes the embedding complete: Rec_lr(E_cont(HR),
E_deg(LR)) must rebuild the LR. E_cont stays frozen.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from realdgen_core.train.config import DegradationStageConfig
from realdgen_core.train.data import CropSampler, child_generators, degrade_mixed, draw_kinds
from realdgen_core.train.loop import BatchFn, Hook, Phase, run_phase, set_trainable


def l2_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distance over the last dim (with a tiny epsilon so the gradient at 0 is finite)."""
    return ((a - b).pow(2).sum(-1) + 1e-12).sqrt()


def triplet_terms(anchor: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """d(anchor, pos_i) and d(anchor, neg_i): anchor [B,D], pos/neg [B,n,D] -> two [B,n] tensors."""
    return l2_distance(anchor[:, None], pos), l2_distance(anchor[:, None], neg)


class _TripletAndReconstruction(nn.Module):
    def __init__(self, model: nn.Module, n: int, margin: float, rec_weight: float) -> None:
        super().__init__()
        self.content, self.degradation, self.rec_lr = model.content, model.degradation, model.lr_reconstructor
        self.n, self.margin, self.rec_weight = n, margin, rec_weight

    def forward(
        self, lr_a: Tensor, lr_p: Tensor, lr_n: Tensor, hr_a: Tensor, hr_p: Tensor
    ) -> dict[str, Tensor]:
        b, n = lr_a.shape[0], self.n
        emb = self.degradation(torch.cat([lr_a, lr_p, lr_n]))
        e_a, e_p, e_n = emb[:b], emb[b : b + b * n].view(b, n, -1), emb[b + b * n :].view(b, n, -1)
        d_ap, d_an = triplet_terms(e_a, e_p, e_n)
        l_cl = F.relu(d_ap - d_an + self.margin).sum(1).mean()  # Eq. 4, summed over i, mean over anchors
        with torch.no_grad():  # E_cont is frozen in this stage
            c_a, c_p = self.content.encode(hr_a), self.content.encode(hr_p)
        content = torch.cat([c_a, c_p, c_a.repeat_interleave(n, 0)])
        l_rl = F.mse_loss(self.rec_lr(content, emb), torch.cat([lr_a, lr_p, lr_n]))  # Eq. 5-6
        return {
            "loss": l_cl + self.rec_weight * l_rl,
            "triplet": l_cl.detach(),
            "rec_lr": l_rl.detach(),
            "triplet_acc": (d_ap < d_an).float().mean().detach(),
        }


class DegradationTrain(Phase):
    """Stage B: E_deg + Rec_lr trained with L_cl + rec_weight · L_rl."""

    name = "degradation"

    def __init__(self, model: nn.Module, config: DegradationStageConfig, hr: CropSampler, **kw) -> None:
        super().__init__(model, config.steps, grad_clip=config.grad_clip, **kw)
        self.config, self.hr = config, hr
        set_trainable(model, [model.degradation, model.lr_reconstructor])
        params = list(model.degradation.parameters()) + list(model.lr_reconstructor.parameters())
        self._finish_init(
            _TripletAndReconstruction(model, config.n, config.margin, config.rec_weight),
            [{"params": params, "lr": config.lr}],
        )

    def batch_fn(self) -> BatchFn:
        return functools.partial(triplet_batch, self.hr, self.config, self.model.config.scale)


def triplet_batch(hr: CropSampler, config: DegradationStageConfig, scale: int, g: torch.Generator):
    """(lr_anchor [B], lr_pos [B·n], lr_neg [B·n], hr_anchor [B], hr_pos [B·n]); pos/neg are anchor-major."""
    from realdgen_core import degrade as D

    b, n, size = config.batch_size, config.n, config.lr_crop * scale
    hr_a = hr(b, size, g)
    hr_p = hr(b * n, size, g)
    lr_a, th_a = degrade_mixed(hr_a, draw_kinds(config.kinds, b, g), scale, child_generators(g, b))
    lr_p = D.apply(hr_p, [th_a[i] for i in range(b) for _ in range(n)])  # same θ, other content
    hr_n, kinds_n, gens_n = (
        hr_a.repeat_interleave(n, 0),
        draw_kinds(config.kinds, b * n, g),
        child_generators(g, b * n),
    )
    if config.hard_negatives <= 0:
        lr_n, _ = degrade_mixed(hr_n, kinds_n, scale, gens_n)  # same content, other θ
        return lr_a, lr_p, lr_n, hr_a, hr_p
    hard = (torch.rand(b * n, generator=g) < config.hard_negatives).tolist()
    near = [D.near_theta(th_a[j // n], g) if hard[j] else None for j in range(b * n)]
    lr_n = lr_a.new_empty((b * n, *lr_a.shape[1:]))
    fresh = [j for j in range(b * n) if near[j] is None]  # not drawn hard, or the anchor has no level
    if fresh:
        lr_n[fresh] = degrade_mixed(
            hr_n[fresh], [kinds_n[j] for j in fresh], scale, [gens_n[j] for j in fresh]
        )[0]
    moved = [j for j in range(b * n) if near[j] is not None]
    if moved:
        lr_n[moved] = D.apply(hr_n[moved], [near[j] for j in moved])
    return lr_a, lr_p, lr_n, hr_a, hr_p


@torch.no_grad()
def triplet_accuracy(extractor: nn.Module, lr_a: Tensor, lr_p: Tensor, lr_n: Tensor) -> float:
    """Share of (anchor, pos_i, neg_i) triplets with d(anchor, pos_i) < d(anchor, neg_i)."""
    b = lr_a.shape[0]
    n = lr_p.shape[0] // b
    e_a, e_p, e_n = extractor(lr_a), extractor(lr_p).view(b, n, -1), extractor(lr_n).view(b, n, -1)
    d_ap, d_an = triplet_terms(e_a, e_p, e_n)
    return float((d_ap < d_an).float().mean())


def train_degradation_stage(
    model: nn.Module, config: DegradationStageConfig, hr: CropSampler, hooks: Sequence[Hook] = (), **kw
) -> None:
    """Stage B in full (one phase)."""
    run_phase(DegradationTrain(model, config, hr, **kw), hooks)
