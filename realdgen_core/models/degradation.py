"""Degradation extractor E_deg: LR image -> 2048-d degradation vector (paper A.1, Fig. 7).

Layout: a 3x3 feature conv, ``num_blocks`` (16) residual blocks (conv-LeakyReLU-conv + identity, no
normalisation: statistics of noise/blur are what we want to keep), then the mapping: adaptive
average pooling to ``pool_size`` x ``pool_size`` and four 1x1 convs with LeakyReLU between them,
ending in ``out_dim`` (2048) channels; with ``pool_size > 1`` the result is averaged over the pooled
grid. The input may be any size; it is taken in [0, 1] and mapped to [-1, 1] internally.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from realdgen_core.configs import config_from_dict


@dataclass(frozen=True)
class DegradationExtractorConfig:
    in_channels: int = 3
    feature_channels: int = 64
    num_blocks: int = 16
    mapping_channels: tuple[int, int, int] = (256, 512, 1024)  # hidden widths of the 4-conv mapping
    out_dim: int = 2048
    pool_size: int = 1
    negative_slope: float = 0.1

    def __post_init__(self) -> None:
        for key in ("in_channels", "feature_channels", "num_blocks", "out_dim", "pool_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DegradationExtractorConfig.{key} must be a positive int, got {value!r}")
        if len(self.mapping_channels) != 3 or any(int(c) < 1 for c in self.mapping_channels):
            raise ValueError(
                "DegradationExtractorConfig.mapping_channels must be three positive widths "
                f"(4 conv layers), got {self.mapping_channels!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DegradationExtractorConfig:
        return config_from_dict(cls, d)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.negative_slope = negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), self.negative_slope))


class DegradationExtractor(nn.Module):
    """forward(lr [B,3,h,w] in [0,1]) -> [B, out_dim]."""

    def __init__(self, config: DegradationExtractorConfig) -> None:
        super().__init__()
        self.config = config
        c = config.feature_channels
        self.feature = nn.Conv2d(config.in_channels, c, 3, padding=1)
        self.blocks = nn.Sequential(
            *(_ResidualBlock(c, config.negative_slope) for _ in range(config.num_blocks))
        )
        widths = (c, *config.mapping_channels, config.out_dim)
        self.mapping = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 1) for i in range(4))

    @property
    def last_conv(self) -> nn.Module:
        """The final 1x1 conv of the mapping: the only part of E_deg trained in stage C (A.5)."""
        return self.mapping[-1]

    def forward(self, lr: Tensor) -> Tensor:
        h = self.blocks(self.feature(lr * 2.0 - 1.0))
        h = F.adaptive_avg_pool2d(h, self.config.pool_size)
        for i, conv in enumerate(self.mapping):
            h = conv(h)
            if i < len(self.mapping) - 1:
                h = F.leaky_relu(h, self.config.negative_slope)
        return h.mean(dim=(2, 3))
