"""Typed, frozen configurations of the job's stages, built once on the driver from the manifest.

Each stage takes one of these (Ray pickles it into the task or actor); a plain mapping with the
same keys is accepted too (:meth:`_Config.of`), which keeps the stages easy to drive by hand.
Nothing here holds credentials: ``storage`` is :func:`pipelines.storage.storage_kwargs`'s
endpoint/region only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "PairingConfig",
    "StartsConfig",
    "DecodeConfig",
    "GenerateConfig",
    "SinkConfig",
    "PlanReadConfig",
]

C = TypeVar("C", bound="_Config")


class _Config:
    @classmethod
    def of(cls: type[C], value: C | Mapping[str, Any]) -> C:
        """``value`` itself, or this config built from a mapping (an unknown key is a TypeError)."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(
                f"{cls.__name__}: expected a {cls.__name__} or a mapping, got {type(value).__name__}"
            )
        return cls(**value)


@dataclass(frozen=True)
class PairingConfig(_Config):
    mode: str = "random"
    refs_per_tile: int = 1


@dataclass(frozen=True)
class StartsConfig(_Config):
    """realdgen's x_start = D(HR, θ_j) computed in the decode stage (synthetic start kinds)."""

    k: int
    tau_min: int
    tau_max: int
    start_kind: str


@dataclass(frozen=True)
class DecodeConfig(_Config):
    """Decode + tile + pair (:class:`pipelines.generate.stages.DecodeTile`)."""

    seed: int
    scale: int
    tile: int
    tiling_mode: str = "grid"
    max_tiles: int = 1
    max_pixels: int = 64_000_000
    max_bytes: int | None = None
    storage: Mapping[str, Any] = field(default_factory=dict)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    refs: tuple[dict, ...] = ()  # {uri, set, domain}
    sets: tuple[dict, ...] = ()  # {name, domain, weight, start, count}
    starts: StartsConfig | None = None

    def __post_init__(self) -> None:
        # Built from plain mappings/lists (a hand-written config): the nested parts become typed too.
        if isinstance(self.pairing, Mapping):
            object.__setattr__(self, "pairing", PairingConfig.of(self.pairing))
        if isinstance(self.starts, Mapping):
            object.__setattr__(self, "starts", StartsConfig.of(self.starts))
        object.__setattr__(self, "refs", tuple(dict(r) for r in self.refs or ()))
        object.__setattr__(self, "sets", tuple(dict(x) for x in self.sets or ()))


@dataclass(frozen=True)
class GenerateConfig(_Config):
    """The generation actor (:class:`pipelines.generate.stages.GenerateLR`)."""

    kind: str
    scale: int
    checkpoint: str | None = None
    # the digest the job planned with (and records in the stats): a worker that loads another refuses
    model_digest: str | None = None
    storage: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    k: int = 1
    tau_min: int = 0
    tau_max: int = 0
    weights: tuple[float, float] = (1.0, 1.0)
    start_kind: str = "realesrgan"
    filter_norm: bool = True
    start_bank: Any = None
    # start_choice domain: profile key → {"chosen": bank index, "errors": [len(bank)]}; empty = per sample
    start_profiles: Mapping[str, Any] = field(default_factory=dict)
    rows_per_call: int | None = None
    sampler: Mapping[str, Any] | None = None
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    ref_bank: Any = None  # ndarray [N, D] or a ray.ObjectRef to one
    torch_threads: int | None = None


@dataclass(frozen=True)
class SinkConfig(_Config):
    """Part files and compaction (:mod:`pipelines.generate.sink`)."""

    store: str  # s3 URI or absolute local folder: what every worker opens
    work: str  # the run's scratch prefix inside the store
    name: str  # shard name prefix
    scale: int
    storage: Mapping[str, Any] = field(default_factory=dict)
    run_id: str = "run"  # parts live under <work>/parts/<run_id>/: another run's leftovers are never read
    digest: str | None = None
    model_digest: str | None = None
    generator: str | None = None
    inputs_digest: str | None = None  # of the sorted inputs and references (plan.listing_digest)
    references_digest: str | None = None  # of the references that decoded (plan.references_digest)
    start_digest: str | None = None  # of the domain starts chosen from them (plan.start_digest)
    # what manifest_digest hashed (manifest.digest_payload), kept in each shard's stats so that a
    # resume with another manifest (or another RealDGen's digest of it) names the keys that differ
    manifest: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanReadConfig(_Config):
    """Reading plan blocks (:func:`pipelines.generate.plan.read_plan_block`)."""

    store: str
    storage: Mapping[str, Any] = field(default_factory=dict)
    skip_shards: tuple[int, ...] = ()
