"""Model configuration: ``RealDGenConfig`` (five networks + diffusion schedule) and the presets.

Presets (widths are ours: the paper gives none; see ARCHITECTURE §2 for the anchors):

- ``tiny``: seconds on a CPU, for tests (~0.26 M parameters, half of them the 2048-wide last
  layer of E_deg and the 2048-wide inputs of M / Rec_lr); no content mid-attention; LR sides must
  be multiples of 4 (UNet levels).
- ``small``: a CPU demo; UNet ~1 M parameters, trains at 64x64 LR tiles, whole checkpoint < 20 MB.
- ``paper``: the GPU-cluster sizes. Content autoencoder = LDM f4 VQ (128 channels, 1-2-4, two res
  blocks, 3 latent channels, 8192 codes); UNet = SynDiff's (widths 128/256/512/512, two res blocks,
  attention at the third level); E_deg = 64-channel features, 16 residual blocks, 2048-d output.

Scale: the content autoencoder has ``log2(scale) + 1`` levels (its downsampling factor is the SR
scale), so a preset's content multipliers are truncated for x2 (1-2-4 -> 1-2).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from realdgen_core.diffusion import DiffusionConfig
from realdgen_core.models.content import ContentConfig
from realdgen_core.models.degradation import DegradationExtractorConfig
from realdgen_core.models.modulation import ModulationConfig
from realdgen_core.models.unet import UNetConfig

PRESETS = ("tiny", "small", "paper")
SCALES = (2, 4)

_SECTIONS = {
    "content": ContentConfig,
    "degradation": DegradationExtractorConfig,
    "modulation": ModulationConfig,
    "lr_reconstructor": ModulationConfig,
    "unet": UNetConfig,
    "diffusion": DiffusionConfig,
}


@dataclass(frozen=True)
class RealDGenConfig:
    scale: int
    content: ContentConfig
    degradation: DegradationExtractorConfig
    modulation: ModulationConfig
    lr_reconstructor: ModulationConfig
    unet: UNetConfig
    diffusion: DiffusionConfig = DiffusionConfig()

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"RealDGenConfig.scale must be one of {SCALES}, got {self.scale!r}")
        checks = [
            (
                "content.channel_mult",
                self.content.scale == self.scale,
                f"gives x{self.content.scale}, needs {self.scale.bit_length()} levels for x{self.scale}",
            ),
            (
                "modulation.in_channels",
                self.modulation.in_channels == self.content.z_channels,
                f"{self.modulation.in_channels} != content.z_channels {self.content.z_channels}",
            ),
            (
                "lr_reconstructor.in_channels",
                self.lr_reconstructor.in_channels == self.content.z_channels,
                f"{self.lr_reconstructor.in_channels} != content.z_channels {self.content.z_channels}",
            ),
            (
                "modulation.deg_dim",
                self.modulation.deg_dim == self.degradation.out_dim,
                f"{self.modulation.deg_dim} != degradation.out_dim {self.degradation.out_dim}",
            ),
            (
                "lr_reconstructor.deg_dim",
                self.lr_reconstructor.deg_dim == self.degradation.out_dim,
                f"{self.lr_reconstructor.deg_dim} != degradation.out_dim {self.degradation.out_dim}",
            ),
            (
                "modulation.out_channels",
                self.modulation.out_channels == self.unet.cond_channels,
                f"{self.modulation.out_channels} != unet.cond_channels {self.unet.cond_channels}",
            ),
            (
                "lr_reconstructor.out_channels",
                self.lr_reconstructor.out_channels == 3,
                f"must be 3 (RGB), got {self.lr_reconstructor.out_channels}",
            ),
            (
                "lr_reconstructor.output",
                self.lr_reconstructor.output == "sigmoid",
                f"must be 'sigmoid' (an image in [0,1]), got {self.lr_reconstructor.output!r}",
            ),
            (
                "unet.in_channels/out_channels",
                self.unet.in_channels == 3 and self.unet.out_channels == 3,
                "must both be 3 (RGB LR)",
            ),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"RealDGenConfig.{key}: {why}")

    def to_dict(self) -> dict:
        d: dict = {"scale": self.scale}
        for name in _SECTIONS:
            d[name] = getattr(self, name).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RealDGenConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RealDGenConfig: unknown config key(s) {unknown}")
        missing = sorted(known - set(d) - {"diffusion"})
        if missing:
            raise ValueError(f"RealDGenConfig: missing config key(s) {missing}")
        kwargs: dict = {"scale": d["scale"]}
        for name, section_cls in _SECTIONS.items():
            if name in d:
                try:
                    kwargs[name] = section_cls.from_dict(d[name])
                except TypeError as e:  # DiffusionConfig.from_dict is a plain cls(**d)
                    raise ValueError(f"RealDGenConfig.{name}: {e}") from e
        return cls(**kwargs)


def preset(name: Literal["tiny", "small", "paper"], scale: int = 4) -> RealDGenConfig:
    """A named configuration for SR scale 2 or 4."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    levels = scale.bit_length()  # x2 -> 2 levels, x4 -> 3 levels

    if name == "tiny":
        z, cond = 3, 4
        content = ContentConfig(
            base_channels=8,
            channel_mult=(1, 2, 2)[:levels],
            num_res_blocks=1,
            z_channels=z,
            codebook_size=64,
            # Attention over every LR-grid position costs O((hw)^2): most of tiny's time at a 64x64
            # tile. The attention code path is covered by small/paper (and the UNet).
            mid_attention=False,
            norm_groups=4,
        )
        degradation = DegradationExtractorConfig(
            feature_channels=8, num_blocks=16, mapping_channels=(16, 16, 16), out_dim=2048
        )
        modulation = ModulationConfig(in_channels=z, hidden_channels=8, out_channels=cond, deg_embed_dim=16)
        # Three levels so that attention (level 2 and the middle) runs at 1/4 of the LR side.
        unet = UNetConfig(
            cond_channels=cond,
            base_channels=8,
            channel_mult=(1, 2, 2),
            num_res_blocks=1,
            attention_levels=(2,),
            num_heads=2,
            norm_groups=4,
        )
    elif name == "small":
        z, cond = 3, 16
        content = ContentConfig(
            base_channels=32,
            channel_mult=(1, 2, 2)[:levels],
            num_res_blocks=1,
            z_channels=z,
            codebook_size=1024,
            mid_attention=True,
            norm_groups=8,
        )
        degradation = DegradationExtractorConfig(
            feature_channels=32, num_blocks=16, mapping_channels=(64, 128, 128), out_dim=2048
        )
        modulation = ModulationConfig(in_channels=z, hidden_channels=32, out_channels=cond, deg_embed_dim=64)
        # The paper UNet's multipliers at 1/8 of its width and one res block per level: ~1.1 M parameters.
        unet = UNetConfig(
            cond_channels=cond,
            base_channels=16,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=1,
            attention_levels=(2,),
            num_heads=4,
            norm_groups=8,
        )
    else:
        z, cond = 3, 64
        content = ContentConfig(
            base_channels=128,
            channel_mult=(1, 2, 4)[:levels],
            num_res_blocks=2,
            z_channels=z,
            codebook_size=8192,
            mid_attention=True,
            norm_groups=32,
        )
        degradation = DegradationExtractorConfig(
            feature_channels=64, num_blocks=16, mapping_channels=(256, 512, 1024), out_dim=2048
        )
        modulation = ModulationConfig(
            in_channels=z, hidden_channels=128, out_channels=cond, deg_embed_dim=512
        )
        unet = UNetConfig(
            cond_channels=cond,
            base_channels=128,
            channel_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            attention_levels=(2,),
            num_heads=4,
            norm_groups=32,
        )

    lr_reconstructor = ModulationConfig(
        in_channels=z,
        hidden_channels=modulation.hidden_channels,
        out_channels=3,
        deg_embed_dim=modulation.deg_embed_dim,
        output="sigmoid",
    )
    return RealDGenConfig(
        scale=scale,
        content=content,
        degradation=degradation,
        modulation=modulation,
        lr_reconstructor=lr_reconstructor,
        unet=unet,
        diffusion=DiffusionConfig(),
    )
