"""RealDGen's three training stages as plain loops with hooks (paper §2.1-2.2, A.1-A.5).

=========  ==========================================  =====================================
stage      phases (run in this order)                  trains
=========  ==========================================  =====================================
A content  ``content_pretrain``, ``content_finetune``  VQ-VAE on clean HR; then E_cont on D(HR)
B degr.    ``degradation``                             E_deg + Rec_lr (triplet + LR rec.)
C DDPM     ``diffusion``                               UNet + M (+ E_cont first block, E_deg last conv)
=========  ==========================================  =====================================

Each phase is built right before it runs (it sets which parameters are trainable), then
``run_phase(phase, hooks)`` loops. ``pipelines/train.py`` adds storage, Ray Train and the manifest.
"""

from __future__ import annotations

from realdgen_core.train.config import ContentStageConfig, DegradationStageConfig, DiffusionStageConfig
from realdgen_core.train.content import ContentFinetune, ContentPretrain, train_content_stage
from realdgen_core.train.data import (
    ArrayCropSampler,
    CameraLRSampler,
    CropSampler,
    MixtureSampler,
    SyntheticLRSampler,
    bicubic_up,
)
from realdgen_core.train.ddpm import DiffusionTrain, train_diffusion_stage
from realdgen_core.train.degradation import DegradationTrain, train_degradation_stage, triplet_accuracy
from realdgen_core.train.loop import EMA, Hook, Phase, load_training_state, run_phase, save_training_state

STAGES: dict[str, tuple[str, ...]] = {
    "A": ("content_pretrain", "content_finetune"),
    "B": ("degradation",),
    "C": ("diffusion",),
}
PHASES: dict[str, type[Phase]] = {
    "content_pretrain": ContentPretrain,
    "content_finetune": ContentFinetune,
    "degradation": DegradationTrain,
    "diffusion": DiffusionTrain,
}

__all__ = [
    "PHASES",
    "STAGES",
    "ArrayCropSampler",
    "CameraLRSampler",
    "ContentFinetune",
    "ContentPretrain",
    "ContentStageConfig",
    "CropSampler",
    "DegradationStageConfig",
    "DegradationTrain",
    "DiffusionStageConfig",
    "DiffusionTrain",
    "EMA",
    "Hook",
    "MixtureSampler",
    "Phase",
    "SyntheticLRSampler",
    "bicubic_up",
    "load_training_state",
    "run_phase",
    "save_training_state",
    "train_content_stage",
    "train_degradation_stage",
    "train_diffusion_stage",
    "triplet_accuracy",
]
