"""E_cont and Rec_hr: an LDM-style VQ-VAE whose downsampling factor is the SR scale.

Paper A.1/A.2: the VQ-VAE encoder is E_cont and its decoder is Rec_hr. Because the encoder downsamples
by exactly the SR scale, ``encode(HR)`` and ``encode(bicubic_up(LR))`` are both maps on the LR grid,
which is where the diffusion model and its condition live.

Ranges: inputs are RGB in ``[0, 1]``; the network works in ``[-1, 1]`` internally (``encode`` maps
``x -> 2x - 1``) and ``decode`` maps back with ``y -> y/2 + 1/2`` *without clamping*, so the L2
reconstruction losses of Eq. 1-2 keep their gradient; clamp before saving images.

The building blocks (``group_norm``, ``ResnetBlock``, ``SelfAttention``) are also used by the UNet.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from realdgen_core.configs import config_from_dict


def _check_positive(cls_name: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{cls_name}.{key} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class ContentConfig:
    """VQ-VAE widths. ``len(channel_mult)`` levels => downsampling factor ``2**(levels-1)`` == SR scale.

    Defaults are the LDM f4 VQ autoencoder (the ``paper`` preset at x4).
    """

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4)  # one entry per level; x2 uses two levels, x4 three
    num_res_blocks: int = 2  # per encoder level (the decoder uses one more, as in LDM)
    z_channels: int = 3  # channels of the content map E_cont outputs (and of the codebook vectors)
    codebook_size: int = 8192
    commitment_beta: float = 0.25  # VQ-VAE commitment weight β
    mid_attention: bool = True  # self-attention in the middle block (LDM has it; costly at HR/4)
    norm_groups: int = 32  # GroupNorm groups (gcd with the channel count is used)

    def __post_init__(self) -> None:
        _check_positive(
            "ContentConfig",
            in_channels=self.in_channels,
            base_channels=self.base_channels,
            num_res_blocks=self.num_res_blocks,
            z_channels=self.z_channels,
            codebook_size=self.codebook_size,
            norm_groups=self.norm_groups,
        )
        if len(self.channel_mult) < 1:
            raise ValueError("ContentConfig.channel_mult must have at least one level")
        _check_positive("ContentConfig", **{f"channel_mult[{i}]": m for i, m in enumerate(self.channel_mult)})
        if not self.commitment_beta >= 0:
            raise ValueError(f"ContentConfig.commitment_beta must be >= 0, got {self.commitment_beta!r}")

    @property
    def scale(self) -> int:
        """Downsampling factor of the encoder (== the SR scale it is built for)."""
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ContentConfig:
        return config_from_dict(cls, d)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """Per-sample normalisation (never BatchNorm: a sample's output must not depend on its batch)."""
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual; optional additive time embedding (UNet)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, temb_channels: int = 0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels) if temb_channels > 0 else None
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None:
            if temb is None:
                raise ValueError("this ResnetBlock needs a time embedding")
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


FULL_ATTENTION_MAX_SCORES = 2**24
"""Above this many attention scores per (image, head) — 4096 positions, a 64² map — attention runs
in query chunks (``chunked_attention``); at or below it, one SDPA call as before (same bytes)."""

CHUNK_SCORES_BUDGET = 2**27
"""Scores materialised per chunk, over the whole batch and all heads (512 MiB in fp32)."""


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, budget: int | None = None) -> Tensor:
    """softmax(q·kᵀ/√d)·v over query chunks: [b, heads, n, d] → [b, heads, n, d].

    Memory O(chunk·n) instead of O(n²) whatever SDPA kernel the device offers (the fused
    memory-efficient kernels do not take every head size; the math fallback materialises all n²
    scores: 128 GiB for stage C of the ``paper`` preset, whose content encoder attends over the
    256² positions of a 1024² HR crop). Under autograd each chunk is checkpointed (recomputed in
    the backward pass), so the scores are never all alive at once there either. ``budget``:
    scores per chunk over batch and heads (default ``CHUNK_SCORES_BUDGET``).
    """
    b, h, n, _ = q.shape
    budget = CHUNK_SCORES_BUDGET if budget is None else int(budget)
    chunk = max(1, min(n, budget // max(1, b * h * k.shape[-2])))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for s in range(0, n, chunk):
        qs = q[:, :, s : s + chunk]
        if grad:
            outs.append(
                torch.utils.checkpoint.checkpoint(
                    F.scaled_dot_product_attention, qs, k, v, use_reentrant=False
                )
            )
        else:
            outs.append(F.scaled_dot_product_attention(qs, k, v))
    return torch.cat(outs, dim=2)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions of a feature map, with a residual.

    Maps with more than 4096 positions attend in query chunks (``chunked_attention``), so memory
    stays linear in the positions (stage C of the ``paper`` preset at 256² LR crops).
    """

    def __init__(self, channels: int, groups: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [b, heads, hw, d]
        if (h * w) ** 2 <= FULL_ATTENTION_MAX_SCORES:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = chunked_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (right/bottom) padding: exact /2 for even sizes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _EncoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks)
        )
        self.downsample = Downsample(out_ch) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class _FirstBlock(nn.Module):
    """conv_in + the first encoder level: the part of E_cont fine-tuned in stage C (A.5)."""

    def __init__(self, cfg: ContentConfig) -> None:
        super().__init__()
        ch = cfg.base_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.level = _EncoderLevel(
            ch, ch * cfg.channel_mult[0], cfg.num_res_blocks, cfg.norm_groups, len(cfg.channel_mult) > 1
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.level(self.conv_in(x))


class _MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block1 = ResnetBlock(ch, ch, groups)
        self.attn = SelfAttention(ch, groups) if attention else nn.Identity()
        self.block2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


class ContentEncoder(nn.Module):
    """[B,3,H,W] in [-1,1] -> continuous content map [B,z,H/s,W/s] (after the 1x1 quant conv)."""

    def __init__(self, cfg: ContentConfig) -> None:
        super().__init__()
        mult, ch, g = cfg.channel_mult, cfg.base_channels, cfg.norm_groups
        self.first_block = _FirstBlock(cfg)
        self.levels = nn.ModuleList(
            _EncoderLevel(ch * mult[i - 1], ch * mult[i], cfg.num_res_blocks, g, i < len(mult) - 1)
            for i in range(1, len(mult))
        )
        top = ch * mult[-1]
        self.mid = _MidBlock(top, g, cfg.mid_attention)
        self.norm_out = group_norm(top, g)
        self.conv_out = nn.Conv2d(top, cfg.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.first_block(x)
        for level in self.levels:
            h = level(h)
        h = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class _DecoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_blocks)
        )
        self.upsample = Upsample(out_ch) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.upsample(x)


class ContentDecoder(nn.Module):
    """Rec_hr: [B,z,h,w] -> [B,3,h*s,w*s] in (about) [-1,1]."""

    def __init__(self, cfg: ContentConfig) -> None:
        super().__init__()
        mult, ch, g = cfg.channel_mult, cfg.base_channels, cfg.norm_groups
        top = ch * mult[-1]
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, top, 3, padding=1)
        self.mid = _MidBlock(top, g, cfg.mid_attention)
        # Top level first; level i upsamples unless it is the full-resolution level 0.
        levels = []
        in_ch = top
        for i in reversed(range(len(mult))):
            levels.append(_DecoderLevel(in_ch, ch * mult[i], cfg.num_res_blocks + 1, g, i > 0))
            in_ch = ch * mult[i]
        self.levels = nn.ModuleList(levels)
        self.norm_out = group_norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with the VQ-VAE codebook + commitment loss and straight-through grads."""

    # Rows of the distance matrix computed at once (bounds memory at 8192 codes: 4096x8192 fp32 = 128 MB).
    chunk_rows = 4096

    def __init__(self, codebook_size: int, dim: int, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def indices(self, h: Tensor) -> Tensor:
        """Index of the nearest code for every position: [B,z,h,w] -> LongTensor [B,h,w].

        Computed per sample (and in fixed row chunks inside a sample), so a sample's codes do not
        depend on the batch it is in.
        """
        e = self.codebook.weight
        e_sq = (e * e).sum(1)
        out = []
        for sample in h.detach():
            flat = sample.flatten(1).t()  # [hw, z]
            idx = []
            for rows in flat.split(self.chunk_rows):
                # |r - e|^2 = |r|^2 - 2 r.e + |e|^2; |r|^2 is constant per row so it is dropped.
                idx.append(torch.argmin(e_sq[None, :] - 2.0 * rows @ e.t(), dim=1))
            out.append(torch.cat(idx).reshape(sample.shape[1:]))
        return torch.stack(out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.indices(h)
        e = self.codebook(idx).permute(0, 3, 1, 2)  # [B,z,h,w]
        loss = F.mse_loss(e, h.detach()) + self.beta * F.mse_loss(h, e.detach())
        z_q = h + (e - h).detach()  # straight-through estimator
        return z_q, loss


class VQVAE(nn.Module):
    """E_cont (``encode``) + codebook (``quantize``) + Rec_hr (``decode``); downsampling factor == scale."""

    def __init__(self, config: ContentConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ContentEncoder(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.z_channels, config.commitment_beta)
        self.decoder = ContentDecoder(config)

    @property
    def scale(self) -> int:
        return self.config.scale

    @property
    def first_block(self) -> nn.Module:
        """The encoder's conv_in + first level: the only part of E_cont trained in stage C (A.5)."""
        return self.encoder.first_block

    def encode(self, x: Tensor) -> Tensor:
        """E_cont: RGB [B,3,H,W] in [0,1] -> continuous (pre-quantisation) content map [B,z,H/s,W/s].

        H and W must be multiples of ``scale``.
        """
        s = self.scale
        if x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of the scale {s}")
        return self.encoder(x * 2.0 - 1.0)

    def quantize(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(z_q with straight-through gradient, scalar VQ loss = codebook + β·commitment)."""
        return self.quantizer(h)

    def decode(self, z: Tensor) -> Tensor:
        """Rec_hr: [B,z,h,w] -> RGB [B,3,h*s,w*s], mapped back to [0,1] (not clamped)."""
        return self.decoder(z) * 0.5 + 0.5

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstruction in [0,1]-scale, VQ loss)."""
        z_q, vq_loss = self.quantize(self.encode(x))
        return self.decode(z_q), vq_loss
