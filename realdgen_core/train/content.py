"""Stage A: the content extractor E_cont and HR reconstructor Rec_hr, a VQ-VAE (paper §2.1, Eq. 1-2, A.1-A.2).

Phase ``content_pretrain``: the whole VQ-VAE learns to reconstruct clean HR crops
(L2 + codebook/commitment loss), with dead codes re-seeded from encoder outputs now and then.
Phase ``content_finetune``: decoder and codebook frozen; the encoder sees bicubic_up(D(HR)) and is
trained so that Rec_hr(quantize(E_cont(bicubic_up(D(HR))))) matches the clean HR in L2 (Eq. 2).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from realdgen_core.train.config import ContentStageConfig
from realdgen_core.train.data import CropSampler, bicubic_up, child_generators, degrade_mixed, draw_kinds
from realdgen_core.train.loop import BatchFn, Hook, Phase, run_phase, set_trainable


class _VQReconstruction(nn.Module):
    """Loss of phase 1: ||Rec_hr(q(E_cont(x))) - x||² + VQ loss; remembers code usage for restarts."""

    def __init__(self, content: nn.Module) -> None:
        super().__init__()
        self.content = content
        self.usage = torch.zeros(content.config.codebook_size, dtype=torch.long)
        self.last_h: Tensor | None = None

    def forward(self, hr: Tensor) -> dict[str, Tensor]:
        h = self.content.encode(hr)
        z_q, vq = self.content.quantize(h)
        rec = F.mse_loss(self.content.decode(z_q), hr)
        idx = self.content.quantizer.indices(h)
        if self.usage.device != idx.device:
            self.usage = self.usage.to(idx.device)
        self.usage += torch.bincount(idx.flatten(), minlength=self.usage.numel())  # no host sync
        self.last_h = h.detach()
        return {"loss": rec + vq, "rec": rec.detach(), "vq": vq.detach()}


class ContentPretrain(Phase):
    """Phase 1 of stage A: VQ-VAE on clean HR crops."""

    name = "content_pretrain"

    def __init__(self, model: nn.Module, config: ContentStageConfig, hr: CropSampler, **kw) -> None:
        super().__init__(model, config.pretrain_steps, grad_clip=config.grad_clip, **kw)
        self.config, self.hr = config, hr
        content = model.content
        set_trainable(model, [content])
        self.loss_net = _VQReconstruction(content)
        self._usage_to_save: Tensor | None = None
        self._finish_init(self.loss_net, [{"params": list(content.parameters()), "lr": config.lr}])

    def batch_fn(self) -> BatchFn:
        return functools.partial(clean_batch, self.hr, self.config)

    def gather_for_checkpoint(self) -> None:
        """Each rank counts code usage for its own batches only (summed at the next restart), and
        rank 0 writes the checkpoint: it saves the sum over the ranks, and a resume gives that sum
        to rank 0 and zeros to the others, so the next restart's sum is the uninterrupted run's."""
        usage = self.loss_net.usage.detach().clone()
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(usage)
        self._usage_to_save = usage

    def state_dict(self) -> dict:
        # code usage since the last restart: a resume between two restarts must not count the codes
        # used before the kill as dead
        usage = self.loss_net.usage if self._usage_to_save is None else self._usage_to_save
        self._usage_to_save = None
        return {**super().state_dict(), "vq_usage": usage.detach().cpu().clone()}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        if "vq_usage" in sd:
            usage = sd["vq_usage"].to(self.loss_net.usage.device, torch.long).clone()
            self.loss_net.usage = usage if self.rank == 0 else torch.zeros_like(usage)

    @torch.no_grad()
    def after_step(self) -> None:
        every = self.config.codebook_restart_every
        first = self.step == 0  # data-dependent init: every code re-seeded from the first batch
        if not first and (not every or (self.step + 1) % every):
            return
        if self.world_size > 1 and torch.distributed.is_initialized():
            # a code is dead only when no rank's batches used it (rank 0 decides and broadcasts)
            torch.distributed.all_reduce(self.loss_net.usage)
        weight = self.model.content.quantizer.codebook.weight
        dead = torch.arange(weight.shape[0]) if first else (self.loss_net.usage == 0).nonzero().flatten()
        if dead.numel():
            h = self.loss_net.last_h.permute(0, 2, 3, 1).reshape(-1, weight.shape[1])
            pick = torch.randint(0, h.shape[0], (dead.numel(),), generator=self.generator)
            noise = torch.randn((dead.numel(), weight.shape[1]), generator=self.generator) * 1e-3
            weight[dead.to(weight.device)] = h[pick.to(h.device)] + noise.to(h.device)
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.broadcast(weight.data, src=0)  # every worker keeps rank 0's codebook
        self.loss_net.usage.zero_()


class _EncoderFinetune(nn.Module):
    """Loss of phase 2 (Eq. 1-2): ||Rec_hr(q(E_cont(bicubic_up(D(X))))) - X||² (+ commitment)."""

    def __init__(self, content: nn.Module) -> None:
        super().__init__()
        self.content = content

    def forward(self, up: Tensor, hr: Tensor) -> dict[str, Tensor]:
        z_q, vq = self.content.quantize(self.content.encode(up))
        rec = F.mse_loss(self.content.decode(z_q), hr)
        return {"loss": rec + vq, "rec": rec.detach(), "vq": vq.detach()}


class ContentFinetune(Phase):
    """Phase 2 of stage A: encoder only, on bicubic-upsampled D(HR); decoder and codebook frozen."""

    name = "content_finetune"

    def __init__(self, model: nn.Module, config: ContentStageConfig, hr: CropSampler, **kw) -> None:
        super().__init__(model, config.finetune_steps, grad_clip=config.grad_clip, **kw)
        self.config, self.hr = config, hr
        encoder = model.content.encoder
        set_trainable(model, [encoder])
        self._finish_init(
            _EncoderFinetune(model.content),
            [{"params": list(encoder.parameters()), "lr": config.finetune_lr}],
        )

    def batch_fn(self) -> BatchFn:
        return functools.partial(degraded_batch, self.hr, self.config, self.model.config.scale)


def clean_batch(hr: CropSampler, c: ContentStageConfig, g: torch.Generator) -> tuple[Tensor]:
    """Phase 1's batch: clean HR crops."""
    return (hr(c.batch_size, c.hr_crop, g),)


def degraded_batch(
    hr: CropSampler, c: ContentStageConfig, scale: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Phase 2's batch: (bicubic_up(D(HR crop, θ)), HR crop)."""
    x = hr(c.batch_size, c.hr_crop, g)
    lr, _ = degrade_mixed(x, draw_kinds(c.kinds, c.batch_size, g), scale, child_generators(g, c.batch_size))
    return bicubic_up(lr, scale), x


def train_content_stage(
    model: nn.Module, config: ContentStageConfig, hr: CropSampler, hooks: Sequence[Hook] = (), **kw
) -> None:
    """Stage A in full: the two phases one after the other."""
    run_phase(ContentPretrain(model, config, hr, **kw), hooks)
    run_phase(ContentFinetune(model, config, hr, **kw), hooks)
