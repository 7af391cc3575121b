"""RealDGen networks: E_cont/Rec_hr (VQ-VAE), E_deg, M and Rec_lr (modulation networks), the conditional UNet.

``RealDGenModel`` only holds the five components and composes the condition
``c = M(E_cont(x), E_deg(lr))``; the diffusion maths live in ``realdgen_core.diffusion`` and the
training stages in ``realdgen_core.train``. Every network uses per-sample normalisation only
(GroupNorm, never BatchNorm) and no dropout, so a sample's output does not depend on its batch
up to float rounding: on CPU, oneDNN convolutions and GEMMs pick batch-size-dependent blockings,
so a sample alone and inside a batch differ by ~1e-6 (max 5e-6 measured on ``tiny``), not bit for
bit (tests/test_models.py bounds it at 5e-5). Callers that need bit-identical pixels whatever the
batch must run the networks per sample (batch 1), or quantise with a margin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from realdgen_core.models.content import VQVAE, ContentConfig
from realdgen_core.models.degradation import DegradationExtractor, DegradationExtractorConfig
from realdgen_core.models.modulation import ModulationConfig, ModulationNetwork, modulate
from realdgen_core.models.unet import ConditionalUNet, UNetConfig

if TYPE_CHECKING:  # config.py imports this package; a runtime import here would be circular
    from realdgen_core.config import RealDGenConfig

COMPONENTS = ("content", "degradation", "modulation", "lr_reconstructor", "unet")

__all__ = [
    "COMPONENTS",
    "ConditionalUNet",
    "ContentConfig",
    "DegradationExtractor",
    "DegradationExtractorConfig",
    "ModulationConfig",
    "ModulationNetwork",
    "RealDGenModel",
    "UNetConfig",
    "VQVAE",
    "build_model",
    "modulate",
]


class RealDGenModel(nn.Module):
    """The five networks of RealDGen; parameter names are ``<component>.<param>`` (the checkpoint names)."""

    def __init__(self, config: RealDGenConfig) -> None:
        super().__init__()
        self.config = config
        self.content = VQVAE(config.content)  # E_cont (encode) + Rec_hr (decode)
        self.degradation = DegradationExtractor(config.degradation)  # E_deg
        self.modulation = ModulationNetwork(config.modulation)  # M
        self.lr_reconstructor = ModulationNetwork(config.lr_reconstructor)  # Rec_lr
        self.unet = ConditionalUNet(config.unet)  # ε_θ

    @property
    def scale(self) -> int:
        return self.config.scale

    def condition(self, hr_or_up_lr: Tensor, lr: Tensor) -> Tensor:
        """c = M(E_cont(x), E_deg(lr)).

        ``hr_or_up_lr`` [B,3,H,W] in [0,1] is the content source at HR size (an HR image at generation,
        bicubic-upsampled LR at training); ``lr`` [B,3,h,w] in [0,1] is the degradation source (any
        size). Returns [B, unet.cond_channels, H/s, W/s].
        """
        return self.modulation(self.content.encode(hr_or_up_lr), self.degradation(lr))

    def reconstruct_lr(self, hr: Tensor, lr: Tensor) -> Tensor:
        """Rec_lr(E_cont(hr), E_deg(lr)) in (0,1), [B,3,H/s,W/s] (Eq. 5)."""
        return self.lr_reconstructor(self.content.encode(hr), self.degradation(lr))

    def forward(self, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x_t, c, t)."""
        return self.unet(x_t, cond, t)


def build_model(config: RealDGenConfig, seed: int = 0) -> RealDGenModel:
    """Freshly initialised model whose weights depend only on ``(config, seed)``.

    torch's initialisers draw from the global generator, so it is seeded inside ``fork_rng``: the
    caller's global RNG state is left untouched and never read.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RealDGenModel(config)
