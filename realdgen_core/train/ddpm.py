"""Stage C: the Decoupled DDPM (paper §2.2, Alg. 1, A.3-A.5), trained on (real) LR crops only.

c = M(E_cont(bicubic_up(x_lr)), E_deg(x_lr)); loss = ||ε − ε_θ(√ᾱ_t x0 + √(1−ᾱ_t) ε, c, t)||² with
x0 = x_lr in [-1, 1]. Partial fine-tuning (A.5): UNet and M at ``lr``; E_cont's first block and
E_deg's last conv at ``finetune_lr`` (1e-6); the rest of the extractors frozen. The UNet has an EMA
whose weights replace the live ones when the phase ends (that is what gets exported).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from realdgen_core.diffusion import GaussianDiffusion
from realdgen_core.train.config import DiffusionStageConfig
from realdgen_core.train.data import CropSampler, bicubic_up
from realdgen_core.train.loop import EMA, BatchFn, Hook, Phase, run_phase, set_trainable


class _DecoupledDDPMLoss(nn.Module):
    def __init__(
        self, model: nn.Module, diffusion: GaussianDiffusion, content_grad: bool, deg_grad: bool
    ) -> None:
        super().__init__()
        self.content, self.degradation = model.content, model.degradation
        self.modulation, self.unet = model.modulation, model.unet
        self.diffusion = diffusion
        self.content_grad, self.deg_grad = content_grad, deg_grad

    def forward(self, lr: Tensor, up: Tensor, generator: torch.Generator) -> dict[str, Tensor]:
        with torch.set_grad_enabled(self.content_grad):
            f_cont = self.content.encode(up)
        with torch.set_grad_enabled(self.deg_grad):
            f_deg = self.degradation(lr)
        c = self.modulation(f_cont, f_deg)
        loss = self.diffusion.training_loss(lambda x_t, t: self.unet(x_t, c, t), lr * 2.0 - 1.0, generator)
        return {"loss": loss}


def lr_batch(
    lr: CropSampler, c: DiffusionStageConfig, scale: int, g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Stage C's batch: (LR crops, bicubic_up of them)."""
    x = lr(c.batch_size, c.lr_crop, g)
    return x, bicubic_up(x, scale)


class DiffusionTrain(Phase):
    """Stage C: ε-prediction on LR crops with the condition built from the same LR."""

    name = "diffusion"

    def __init__(self, model: nn.Module, config: DiffusionStageConfig, lr: CropSampler, **kw) -> None:
        super().__init__(model, config.steps, grad_clip=config.grad_clip, **kw)
        self.config, self.lr_sampler = config, lr
        mult = model.unet.config.size_multiple
        if config.lr_crop % mult:
            raise ValueError(f"stage C lr_crop {config.lr_crop} must be a multiple of the UNet's {mult}")
        fine: list[nn.Module] = []
        if config.content_trainable == "first_block":
            fine.append(model.content.first_block)
        if config.degradation_trainable == "last_conv":
            fine.append(model.degradation.last_conv)
        elif config.degradation_trainable == "all":
            fine.append(model.degradation)
        main = [model.unet, model.modulation]
        set_trainable(model, main + fine)
        self.ema = EMA(model.unet, config.ema_decay)
        net = _DecoupledDDPMLoss(
            model,
            GaussianDiffusion(model.config.diffusion),
            content_grad=config.content_trainable != "none",
            deg_grad=config.degradation_trainable != "none",
        )
        self._finish_init(
            net,
            [
                {"params": [p for m in main for p in m.parameters()], "lr": config.lr},
                {"params": [p for m in fine for p in m.parameters()], "lr": config.finetune_lr},
            ],
        )

    def batch_fn(self) -> BatchFn:
        return functools.partial(lr_batch, self.lr_sampler, self.config, self.model.config.scale)

    def loss_args(self) -> tuple:
        return (self.generator,)  # t and ε: drawn in the main process, part of the resumable state

    def after_step(self) -> None:
        if self.step < self.config.ema_start:
            decay = 0.0
        else:  # warm-up (1+n)/(10+n) so a short run's EMA is not dominated by the initial weights
            n = self.step - self.config.ema_start
            decay = min(self.config.ema_decay, (1.0 + n) / (10.0 + n))
        self.ema.update(self.model.unet, decay)

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Temporarily put the EMA weights into the UNet (for exporting a usable mid-run model)."""
        live = {k: p.detach().clone() for k, p in self.model.unet.named_parameters()}
        self.ema.copy_to(self.model.unet)
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.model.unet.named_parameters():
                    p.copy_(live[k])

    def finalize(self) -> None:
        self.ema.copy_to(self.model.unet)


def train_diffusion_stage(
    model: nn.Module, config: DiffusionStageConfig, lr: CropSampler, hooks: Sequence[Hook] = (), **kw
) -> None:
    """Stage C in full (one phase); the UNet ends holding its EMA weights."""
    run_phase(DiffusionTrain(model, config, lr, **kw), hooks)
