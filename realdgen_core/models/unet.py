"""Conditional UNet ε_θ(x_t, c, t) of the Decoupled DDPM, working on the LR grid.

The spatial condition c (output of M) is concatenated to x_t at the input; the timestep goes through
a sinusoidal embedding and an MLP and is added inside every ResnetBlock. Levels follow
``channel_mult`` (widths ``base_channels * m``), ``num_res_blocks`` per level on the way down and
one more on the way up (DDPM/guided-diffusion layout with skip connections), self-attention at the
levels listed in ``attention_levels`` (0 = full LR resolution) and always in the middle block.
H and W must be divisible by ``2**(len(channel_mult)-1)``. No dropout: training draws no hidden
randomness from the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from realdgen_core.configs import config_from_dict
from realdgen_core.models.content import Downsample, ResnetBlock, SelfAttention, Upsample, group_norm


@dataclass(frozen=True)
class UNetConfig:
    """Defaults: the SynDiff-like ``paper`` UNet (widths 128/256/512/512, attention at the third level)."""

    in_channels: int = 3
    cond_channels: int = 64
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (2,)
    num_heads: int = 4
    norm_groups: int = 32

    def __post_init__(self) -> None:
        for key in (
            "in_channels",
            "cond_channels",
            "out_channels",
            "base_channels",
            "num_res_blocks",
            "num_heads",
            "norm_groups",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"UNetConfig.{key} must be a positive int, got {value!r}")
        if len(self.channel_mult) < 1 or any(int(m) < 1 for m in self.channel_mult):
            raise ValueError(f"UNetConfig.channel_mult must be positive ints, got {self.channel_mult!r}")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < len(self.channel_mult)]
        if bad:
            raise ValueError(f"UNetConfig.attention_levels {bad} outside 0..{len(self.channel_mult) - 1}")
        for lvl in self.attention_levels:
            if (self.base_channels * self.channel_mult[lvl]) % self.num_heads:
                raise ValueError(f"UNetConfig: width of level {lvl} is not divisible by num_heads")

    @property
    def size_multiple(self) -> int:
        """H and W of the input must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        return config_from_dict(cls, d)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (integer or float) timesteps: [B] -> [B, dim] (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class _Stage(nn.Module):
    """One ResnetBlock (+ optional attention): the unit whose output is a skip connection."""

    def __init__(self, in_ch: int, out_ch: int, temb: int, groups: int, heads: int, attention: bool) -> None:
        super().__init__()
        self.res = ResnetBlock(in_ch, out_ch, groups, temb_channels=temb)
        self.attn = SelfAttention(out_ch, groups, heads) if attention else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        return self.attn(self.res(x, temb))


class ConditionalUNet(nn.Module):
    """forward(x_t [B,3,h,w], cond [B,c,h,w], t LongTensor[B]) -> ε̂ [B,3,h,w]."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch, mult, g, heads = config.base_channels, config.channel_mult, config.norm_groups, config.num_heads
        temb = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(config.in_channels + config.cond_channels, ch, 3, padding=1)

        skip_channels = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        cur = ch
        for lvl, m in enumerate(mult):
            stages = nn.ModuleList()
            for _ in range(config.num_res_blocks):
                stages.append(_Stage(cur, ch * m, temb, g, heads, lvl in config.attention_levels))
                cur = ch * m
                skip_channels.append(cur)
            self.down.append(stages)
            if lvl < len(mult) - 1:
                self.downsample.append(Downsample(cur))
                skip_channels.append(cur)
            else:
                self.downsample.append(nn.Identity())

        self.mid1 = ResnetBlock(cur, cur, g, temb_channels=temb)
        self.mid_attn = SelfAttention(cur, g, heads if cur % heads == 0 else 1)
        self.mid2 = ResnetBlock(cur, cur, g, temb_channels=temb)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl in reversed(range(len(mult))):
            stages = nn.ModuleList()
            for _ in range(config.num_res_blocks + 1):
                stages.append(
                    _Stage(
                        cur + skip_channels.pop(),
                        ch * mult[lvl],
                        temb,
                        g,
                        heads,
                        lvl in config.attention_levels,
                    )
                )
                cur = ch * mult[lvl]
            self.up.append(stages)
            self.upsample.append(Upsample(cur) if lvl > 0 else nn.Identity())

        self.norm_out = group_norm(cur, g)
        self.conv_out = nn.Conv2d(cur, config.out_channels, 3, padding=1)

    def forward(self, x_t: Tensor, cond: Tensor, t: Tensor) -> Tensor:
        m = self.config.size_multiple
        if x_t.shape[-2] % m or x_t.shape[-1] % m:
            raise ValueError(f"UNet input size {tuple(x_t.shape[-2:])} is not a multiple of {m}")
        if cond.shape[-2:] != x_t.shape[-2:]:
            raise ValueError(f"condition size {tuple(cond.shape[-2:])} != x_t size {tuple(x_t.shape[-2:])}")
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels))

        h = self.conv_in(torch.cat([x_t, cond], dim=1))
        skips = [h]
        for stages, down in zip(self.down, self.downsample, strict=True):
            for stage in stages:
                h = stage(h, temb)
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)

        for stages, up in zip(self.up, self.upsample, strict=True):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), temb)
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
