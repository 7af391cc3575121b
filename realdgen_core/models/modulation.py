"""Modulation network M (and, with an RGB head, Rec_lr): inject a degradation vector into a content map.

Paper A.4, Fig. 8: four modulation layers, each conv -> activation -> modulation unit, then a final
conv. Our modulation unit is adaptive per-channel scale/shift (``modulate``): the 2048-d degradation
vector is first projected once to ``deg_embed_dim`` (one shared Linear + LeakyReLU; this keeps the
2048 x channels cost paid once instead of four times), then each layer predicts its (shift, scale)
with its own Linear.

Output: ``output="none"`` returns the raw conv output (M, the diffusion condition);
``output="sigmoid"`` squashes to (0, 1) (Rec_lr, an RGB LR image in [0, 1]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from realdgen_core.configs import config_from_dict

OUTPUTS = ("none", "sigmoid")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-channel affine modulation: x [B,C,H,W], shift/scale [B,C]."""
    return x * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]


@dataclass(frozen=True)
class ModulationConfig:
    in_channels: int = 3  # channels of the content map (ContentConfig.z_channels)
    hidden_channels: int = 128
    out_channels: int = 64  # UNet cond channels for M; 3 for Rec_lr
    deg_dim: int = 2048  # DegradationExtractorConfig.out_dim
    deg_embed_dim: int = 512
    num_layers: int = 4
    output: str = "none"  # "none" (M) | "sigmoid" (Rec_lr)
    negative_slope: float = 0.2

    def __post_init__(self) -> None:
        for key in (
            "in_channels",
            "hidden_channels",
            "out_channels",
            "deg_dim",
            "deg_embed_dim",
            "num_layers",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModulationConfig.{key} must be a positive int, got {value!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"ModulationConfig.output must be one of {OUTPUTS}, got {self.output!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModulationConfig:
        return config_from_dict(cls, d)


class ModulationLayer(nn.Module):
    """conv -> LeakyReLU -> modulate(shift, scale predicted from the degradation embedding)."""

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int, negative_slope: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.to_shift_scale = nn.Linear(embed_dim, 2 * out_ch)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor, deg_embed: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv(x), self.negative_slope)
        shift, scale = self.to_shift_scale(deg_embed).chunk(2, dim=1)
        return modulate(h, shift, scale)


class ModulationNetwork(nn.Module):
    """forward(content [B,z,h,w], degradation [B,deg_dim]) -> [B,out_channels,h,w]."""

    def __init__(self, config: ModulationConfig) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_channels
        self.deg_proj = nn.Linear(config.deg_dim, config.deg_embed_dim)
        self.layers = nn.ModuleList(
            ModulationLayer(
                config.in_channels if i == 0 else c, c, config.deg_embed_dim, config.negative_slope
            )
            for i in range(config.num_layers)
        )
        self.conv_out = nn.Conv2d(c, config.out_channels, 3, padding=1)

    def forward(self, content: Tensor, degradation: Tensor) -> Tensor:
        if degradation.shape[0] != content.shape[0]:
            raise ValueError(
                f"batch mismatch: content has {content.shape[0]} samples, degradation {degradation.shape[0]}"
            )
        emb = F.leaky_relu(self.deg_proj(degradation), self.config.negative_slope)
        h = content
        for layer in self.layers:
            h = layer(h, emb)
        out = self.conv_out(h)
        return torch.sigmoid(out) if self.config.output == "sigmoid" else out
