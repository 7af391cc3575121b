"""Settings of the three training stages (A content, B degradation, C Decoupled DDPM) as frozen dataclasses.

The train manifest (``pipelines/manifest.py``, kind ``train``) reuses these classes, so every default
lives here once. Step counts are per phase; stage A has two phases (VQ-VAE pre-training on clean HR,
then encoder fine-tuning on degraded inputs), stages B and C one each.

Paper numbers (A.1-A.5) are the defaults where the paper gives them: triplet n = 3, margin 0.01,
lr 1e-4 for E_deg and the DDPM, 1e-6 for the extractor fine-tuning of stage C, batch 8 of LR crops.
Crop sizes and step counts are small CPU-friendly defaults, not the paper's (256x256 LR, 100 epochs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from realdgen_core.configs import config_from_dict

SYNTHETIC_KINDS = ("realesrgan", "bsrgan", "bicubic", "codec")


def _check(cls_name: str, ok: bool, key: str, value) -> None:
    if not ok:
        raise ValueError(f"{cls_name}.{key}: invalid value {value!r}")


def _check_kinds(cls_name: str, kinds: tuple[str, ...]) -> None:
    bad = [k for k in kinds if k not in SYNTHETIC_KINDS]
    _check(cls_name, bool(kinds) and not bad, "kinds", kinds)


@dataclass(frozen=True)
class ContentStageConfig:
    """Stage A: E_cont + Rec_hr (Eq. 1-2).

    Phase 1 trains the whole VQ-VAE on clean HR crops (reconstruction L2 + VQ loss). Phase 2 freezes
    the decoder and the codebook and fine-tunes the encoder on bicubic_up(D(HR)) against the clean HR.
    """

    pretrain_steps: int = 1000
    finetune_steps: int = 1000
    batch_size: int = 8
    hr_crop: int = 128  # HR crop side; a multiple of the scale
    lr: float = 2e-4  # phase 1 (VQ-VAE) Adam lr
    finetune_lr: float = 1e-4  # phase 2; the paper uses 1e-5 for a week on 8 GPUs, we have minutes
    kinds: tuple[str, ...] = ("realesrgan", "bsrgan")  # D used to degrade the phase-2 inputs
    # Dead-code restart in phase 1: every this many steps, codes unused since the last restart are
    # re-seeded from encoder outputs of the current batch (keeps a small dataset from collapsing the
    # codebook onto a few vectors). 0 disables it.
    codebook_restart_every: int = 50
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        n = type(self).__name__
        for key in ("pretrain_steps", "finetune_steps", "codebook_restart_every"):
            _check(n, getattr(self, key) >= 0, key, getattr(self, key))
        _check(n, self.batch_size >= 1, "batch_size", self.batch_size)
        _check(n, self.hr_crop >= 8, "hr_crop", self.hr_crop)
        _check(n, self.lr > 0 and self.finetune_lr > 0, "lr", (self.lr, self.finetune_lr))
        _check(n, self.grad_clip >= 0, "grad_clip", self.grad_clip)
        _check_kinds(n, self.kinds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ContentStageConfig:
        return config_from_dict(cls, d)


@dataclass(frozen=True)
class DegradationStageConfig:
    """Stage B: E_deg with the triplet loss (Eq. 3-4) + LR reconstruction through Rec_lr (Eq. 5-6).

    Per anchor D(X, θ): n positives D(X'_i, θ) (same θ re-applied to other HR crops) and n negatives
    D(X, θ_i) (fresh θ_i, kind drawn from ``kinds``). E_cont is frozen.
    """

    steps: int = 1000
    batch_size: int = 8  # anchors per step; each step degrades batch_size * (1 + 2n) crops
    lr_crop: int = 32  # LR crop side (HR crops are lr_crop * scale)
    lr: float = 1e-4
    n: int = 3
    margin: float = 0.01
    rec_weight: float = 1.0  # weight of L_rl against L_cl
    kinds: tuple[str, ...] = ("realesrgan", "bsrgan")
    grad_clip: float = 1.0
    # share of negatives that are *hard*: the anchor's own θ with one level moved one step
    # (``degrade.near_theta``) instead of a fresh θ, so E_deg must tell levels apart, not only kinds
    hard_negatives: float = 0.0

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check(n, self.steps >= 0, "steps", self.steps)
        _check(n, self.batch_size >= 1, "batch_size", self.batch_size)
        _check(n, 0.0 <= self.hard_negatives <= 1.0, "hard_negatives", self.hard_negatives)
        _check(n, self.lr_crop >= 4, "lr_crop", self.lr_crop)
        _check(n, self.lr > 0, "lr", self.lr)
        _check(n, self.n >= 1, "n", self.n)
        _check(n, self.margin >= 0, "margin", self.margin)
        _check(n, self.rec_weight >= 0, "rec_weight", self.rec_weight)
        _check(n, self.grad_clip >= 0, "grad_clip", self.grad_clip)
        _check_kinds(n, self.kinds)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DegradationStageConfig:
        return config_from_dict(cls, d)


@dataclass(frozen=True)
class DiffusionStageConfig:
    """Stage C: the Decoupled DDPM (Alg. 1) on LR crops only, with partial fine-tuning (A.5).

    Trainable: UNet and M at ``lr``; E_cont's first block and E_deg's last conv at ``finetune_lr``
    (``content_trainable``/``degradation_trainable`` choose; domain adaptation may fine-tune all of E_deg).
    """

    steps: int = 2000
    batch_size: int = 8
    lr_crop: int = 64  # LR crop side; a multiple of the UNet's size_multiple
    lr: float = 1e-4
    finetune_lr: float = 1e-6
    ema_decay: float = 0.999
    ema_start: int = 0  # step from which the EMA tracks (before it, EMA = current weights)
    content_trainable: str = "first_block"  # "first_block" | "none"
    degradation_trainable: str = "last_conv"  # "last_conv" | "all" | "none"
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        n = type(self).__name__
        _check(n, self.steps >= 0, "steps", self.steps)
        _check(n, self.batch_size >= 1, "batch_size", self.batch_size)
        _check(n, self.lr_crop >= 4, "lr_crop", self.lr_crop)
        _check(n, self.lr > 0 and self.finetune_lr > 0, "lr", (self.lr, self.finetune_lr))
        _check(n, 0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay)
        _check(n, self.ema_start >= 0, "ema_start", self.ema_start)
        _check(
            n, self.content_trainable in ("first_block", "none"), "content_trainable", self.content_trainable
        )
        _check(
            n,
            self.degradation_trainable in ("last_conv", "all", "none"),
            "degradation_trainable",
            self.degradation_trainable,
        )
        _check(n, self.grad_clip >= 0, "grad_clip", self.grad_clip)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionStageConfig:
        return config_from_dict(cls, d)
