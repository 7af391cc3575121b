"""Diffusion maths for the Decoupled DDPM: schedule, forward noising, ε-loss and samplers (no network)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DiffusionConfig:
    """Schedule and timestep ranges.

    The paper's "maximum diffusion step 500" (A.3) is read as a 1000-step linear schedule whose
    training timesteps are drawn from [0, max_train_timestep) — the SynDiff setting; generation
    starts at τ ~ U{tau_min..tau_max} (Table 3: 300 is best). All four numbers are configurable.
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    max_train_timestep: int = 500
    tau_min: int = 0
    tau_max: int = 300

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        return cls(**d)
