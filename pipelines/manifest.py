"""Manifest schema: every user-facing job configuration (one pydantic module, strict, documented).

Every manifest is a YAML mapping with a ``kind`` key that selects its model in
``MANIFEST_KINDS``. All models forbid unknown keys, carry a description and bounds per field,
and :func:`load_manifest` turns any validation problem into a :class:`ManifestError` that names
the key path and quotes the bad value, e.g. ``tiling.tile: Input should be >= 8 (got 0)``.

Shared pieces (used by every kind): :class:`StrictModel`, :class:`StorageOptions`,
:class:`SourceSpec`, :class:`ManifestError`, :func:`load_manifest`, :func:`apply_overrides`,
:func:`manifest_digest`. Relative local paths in a manifest are resolved against the current
working directory of the driver (the job's working dir under ``ray job submit``).

Credentials never live in a manifest: object-store access keys come from the environment of
each process (``AWS_ACCESS_KEY_ID`` …); only the endpoint may be configured here.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.storage import endpoint_secret

__all__ = [
    "ManifestError",
    "StrictModel",
    "StorageOptions",
    "SourceSpec",
    "ReferenceSet",
    "GeneratorSpec",
    "TilingSpec",
    "PairingSpec",
    "OutputSpec",
    "LimitsSpec",
    "ActorPoolSpec",
    "ComputeSpec",
    "ProgressSpec",
    "GenerateManifest",
    "MANIFEST_KINDS",
    "load_manifest",
    "parse_manifest",
    "apply_overrides",
    "manifest_digest",
    "manifest_json_schema",
    "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    "png",
    "jpg",
    "jpeg",
    "webp",
    "bmp",
    "tif",
    "tiff",
    "gif",
    "ppm",
    "pgm",
    "pnm",
)

_CREDENTIAL_WORDS = ("secret", "password", "access_key", "token", "credential")
_CREDENTIAL_NAMES = frozenset({"key", "aws_key", "passwd", "session"})  # s3fs / boto parameter names


class ManifestError(ValueError):
    """A manifest that cannot run: the message names the key path and the bad value."""


class StrictModel(BaseModel):
    """Base for every manifest section: unknown keys rejected, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class StorageOptions(StrictModel):
    """How to reach object storage. Never holds credentials (they come from the environment)."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000. Default: AWS_ENDPOINT_URL "
        "from the environment, else the AWS default.",
    )
    region: str | None = Field(None, description="Region name; default from the environment.")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        # user:secret@host would travel in task arguments and logs: credentials come from the env;
        # the value is never echoed: a query could hold a token (X-Amz-Security-Token=…)
        secret = endpoint_secret(v)
        if secret == "userinfo":
            raise ValueError(f"{_HOLDS_CREDENTIALS} (user:password@); set them in the environment")
        if secret == "query":
            raise ValueError(
                f"{_HOLDS_CREDENTIALS} or anything else after '?' or '#': an endpoint is scheme://host[:port][/path]"
            )
        parts = urlsplit(v)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if not parts.hostname or port == -1 or any(c.isspace() for c in v):
            raise ValueError("is not a URL of the form http(s)://host[:port] (a host, and a port of digits)")
        return v


_HOLDS_CREDENTIALS = "must not hold credentials"


def _local_or_s3(v: str) -> str:
    """A source or output URI: a local path, ``file://`` or ``s3://bucket/…``."""
    if "://" in v and not v.startswith(("file://", "s3://")):
        raise ValueError("only local paths, file:// and s3:// URIs are supported")
    if v.startswith("s3://") and not v[len("s3://") :].strip("/"):
        raise ValueError("s3 URI lacks a bucket")
    if v.startswith("s3://") and "@" in v[len("s3://") :].split("/", 1)[0]:
        # key:secret@bucket would travel in task arguments, records and logs
        raise ValueError(f"{_HOLDS_CREDENTIALS} (key:secret@bucket); set them in the environment")
    return v


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


class SourceSpec(StrictModel):
    """A set of images: a folder or glob, WebDataset shards, or a parquet list of URIs.

    ``uri`` is a local path, ``file://`` URI or ``s3://bucket/prefix``.
    - ``format: folder`` — ``uri`` is a folder (listed recursively, filtered by ``extensions``)
      or a glob (``data/hr/*.png``, ``s3://b/p/**/*.jpg``).
    - ``format: webdataset`` — ``uri`` is a folder of ``.tar`` shards or a glob of them; every
      member whose extension is in ``extensions`` is one image (``shard.tar#member``).
    - ``format: parquet`` — ``uri`` is a parquet file (or folder/glob of them) whose ``column``
      holds image URIs; relative entries are resolved against the parquet file's folder.
    """

    uri: str = Field(..., min_length=1, description="Folder, glob, tar folder/glob, or parquet file.")
    format: Literal["folder", "webdataset", "parquet"] = Field(
        "folder", description="How to enumerate the images behind `uri`."
    )
    extensions: tuple[str, ...] = Field(
        IMAGE_EXTENSIONS, min_length=1, description="File extensions (no dot, case-insensitive) kept."
    )
    column: str = Field("uri", min_length=1, description="Parquet column holding image URIs.")
    limit: int | None = Field(
        None, ge=1, description="Keep only the first `limit` images (after sorting); for smoke tests."
    )

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, v: str) -> str:
        return _local_or_s3(v)

    @field_validator("extensions")
    @classmethod
    def _norm_ext(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({e.lower().lstrip(".") for e in v}))

    @property
    def remote(self) -> bool:
        return _is_remote(self.uri)


# --------------------------------------------------------------------------------------------
# kind: generate
# --------------------------------------------------------------------------------------------

GeneratorKind = Literal["realdgen", "realesrgan", "bsrgan", "bicubic"]


class ReferenceSet(StrictModel):
    """One named set of real LR references (a domain), with its mixing weight."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="Name recorded per sample.")
    source: SourceSpec = Field(..., description="Where the reference images are.")
    domain: str | None = Field(None, description="Free-form domain label recorded per sample.")
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative weight for `pairing.mode: weighted`.")


from realdgen_core import calibrate as _calibrate  # noqa: E402 - defaults live in core
from realdgen_core.diffusion import SamplerConfig as _SamplerCfg  # noqa: E402 - defaults live in core


class GeneratorSpec(StrictModel):
    """Which generator makes the LR images, and its sampling settings."""

    kind: GeneratorKind = Field(
        "realdgen", description="realdgen (learned, needs checkpoint + refs) or a synthetic baseline."
    )
    checkpoint: str | None = Field(
        None, description="RealDGen checkpoint (.safetensors; local path, file:// or s3://). realdgen only."
    )
    k: int = Field(4, ge=1, le=64, description="Best-of-k candidates per pair (realdgen).")
    calibration: Literal["auto", "off"] = Field(
        "auto",
        description="realdgen: `auto` takes every τ / start / filter setting left unset here from the "
        "checkpoint's domain calibration (written by adaptation, realdgen_core/calibrate.py); `off`, "
        "or a checkpoint without one, uses the paper's settings (τ ~ U{0..300}, Real-ESRGAN start, "
        "content and degradation errors weighted 1:1, each divided by its mean over the candidates).",
    )
    tau_min: int | None = Field(
        None,
        ge=0,
        le=999,
        description="Smallest start step τ (realdgen; 0 = no diffusion, the candidate is its start). "
        "Unset: calibration, else 0.",
    )
    tau_max: int | None = Field(
        None,
        ge=0,
        le=999,
        description="Largest start step τ (realdgen). Unset: calibration, else 300 (paper Table 3).",
    )
    content_weight: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="Weight of the content error in best-of-k. Unset: calibration, else 1.",
    )
    degradation_weight: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="Weight of the degradation error in best-of-k. Unset: calibration, else 1.",
    )
    filter_norm: bool | None = Field(
        None,
        description="Divide each best-of-k error by its mean over the sample's candidates before "
        "weighting (scale-free weights). Unset: calibration, else true.",
    )
    start_bank: list[dict[str, Any]] | None = Field(
        None,
        description="start_kind `domain`: the start θs to choose from per sample (filled from the "
        "checkpoint's calibration when unset; realdgen_core/calibrate.py).",
    )
    start_choice: Literal["domain", "sample"] = Field(
        "domain",
        description="start_kind `domain`: `domain` scores every bank entry against all of a reference "
        "domain's references on `start_probe_tiles` HR tiles of the job before generating and starts "
        "every sample of that domain from the best entry (recorded in the dataset index); `sample` "
        "chooses per sample from its one reference (noisier: E_deg also reads the scene).",
    )
    start_ref_weighting: Literal["sensitivity", "uniform"] = Field(
        "sensitivity",
        description="start_choice `domain`: how the domain's references are weighted in its profile. "
        "`sensitivity`: by how far E_deg moves when the reference is blurred a little more (flat or "
        "dark crops, which E_deg reads as blurred whatever made them, count less; "
        "realdgen_core/calibrate.py reference_weights); `uniform`: every reference the same.",
    )
    start_aggregate: Literal["rank", "distance"] = Field(
        "rank",
        description="start_choice `domain`: how the references' verdicts make the choice. `rank`: each "
        "reference ranks the bank by its own E_deg error and the lowest weighted mean rank wins (a "
        "Borda count: every reference has one bounded say whatever the scale of its errors); "
        "`distance`: the lowest weighted mean error (the distance of the entry's mean embedding to the "
        "references' weighted centroid plus its spread over the probe tiles; the rule before this "
        "field). docs/realism.md, 'Start choice: ranks, not distances'.",
    )
    start_probe_tiles: int = Field(
        32,
        ge=1,
        le=4096,
        description="start_choice `domain`: HR tiles of the job the domain profile is measured on, "
        "cut from up to this many inputs evenly spaced over the sorted inputs (see start_probe_layout).",
    )
    start_probe_layout: Literal["spread", "centre"] = Field(
        "spread",
        description="start_choice `domain`: how the probe tiles are cut. `spread`: start_probe_tiles "
        "tiles shared over the probe inputs, each input's spread over it, so a job of a few large "
        "photos still measures start_probe_tiles tiles; `centre`: one centre tile per probe input "
        "(the layout before this field; a job of 6 photos measured 6 tiles). docs/realism.md, "
        "'Probe tiles'.",
    )
    rows_per_call: int | None = Field(
        None,
        ge=1,
        le=65536,
        description="realdgen: None = one network call per sample (batch-independent on any backend); "
        "an int packs rows into fixed-size calls (GPU throughput). Part of the data's identity.",
    )
    start_kind: Literal["realesrgan", "bsrgan", "bicubic", "domain"] | None = Field(
        None,
        description="D used to build x_τ from the HR (Alg. 2): a synthetic model, or `domain` (per "
        "sample, the calibration's start θ closest to the reference in E_deg space). Unset: "
        "calibration, else realesrgan.",
    )
    sampler: Literal["ancestral", "ddim"] | None = Field(
        None,
        description="realdgen reverse process: ancestral (the paper's, τ+1 UNet calls per candidate) or "
        "ddim (strided DDIM from each candidate's τ to 0, at most `sampler_steps` calls). Unset: the "
        "sampler the checkpoint's calibration chose τ with, else ancestral.",
    )
    sampler_steps: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="ddim: UNet calls per candidate (grid of min(steps, τ+1) points from τ to 0). Unset: "
        f"the calibration's, else {_SamplerCfg.steps}.",
    )
    sampler_eta: float | None = Field(
        None,
        ge=0,
        le=1,
        description="ddim: stochasticity (1 = DDPM-like noise per step, keeps the k candidates diverse; "
        f"0 = deterministic after x_τ). Unset: the calibration's, else {_SamplerCfg.eta}.",
    )

    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="realdgen UNet precision on GPU actors: auto = bf16 on CUDA (autocast of the UNet "
        "only; encoders, M and the filter stay fp32), fp32 otherwise. CPU actors always run fp32.",
    )
    channels_last: bool = Field(
        False, description="realdgen: UNet in channels-last memory format on CUDA (ignored on CPU)."
    )
    compile: bool = Field(
        False,
        description="realdgen: torch.compile the UNet on CUDA (ignored on CPU); pays with `rows_per_call` "
        "(one call shape); costs a compile per actor start.",
    )

    def sampler_config(self) -> _SamplerCfg:
        """The core ``SamplerConfig`` of this section (unset knobs: the core defaults)."""
        d = _SamplerCfg()
        return _SamplerCfg(
            kind=self.sampler or d.kind,
            steps=d.steps if self.sampler_steps is None else self.sampler_steps,
            eta=d.eta if self.sampler_eta is None else self.sampler_eta,
        )

    def resolved(self, calibration: dict | None) -> GeneratorSpec:
        """Every unset τ / start / filter setting filled in: from ``calibration`` (a checkpoint's
        ``DomainCalibration.to_dict()``) when given and ``calibration: auto``, else the paper's."""
        d = _SamplerCfg()
        paper = {
            "tau_min": 0,
            "tau_max": 300,
            "start_kind": "realesrgan",
            "content_weight": 1.0,
            "degradation_weight": 1.0,
            # scale-free: raw, E_deg's errors are ~1e4x smaller than E_cont's and never decide
            "filter_norm": True,
            "sampler": d.kind,
            "sampler_steps": d.steps,
            "sampler_eta": d.eta,
        }
        if calibration is not None and self.calibration == "auto" and self.kind == "realdgen":
            # the sampler τ was chosen with (calibrations written before it was recorded: the paper's)
            cal_sampler = calibration.get("sampler") or {}
            src = {
                "tau_min": int(calibration["tau_min"]),
                "tau_max": int(calibration["tau_max"]),
                "start_kind": "domain",
                "content_weight": float(calibration["weights"][0]),
                "degradation_weight": float(calibration["weights"][1]),
                "filter_norm": bool(calibration.get("filter_norm", True)),
                "sampler": cal_sampler.get("kind", d.kind),
                "sampler_steps": int(cal_sampler.get("steps", d.steps)),
                "sampler_eta": float(cal_sampler.get("eta", d.eta)),
            }
        else:
            src = paper
        update = {key: value for key, value in src.items() if getattr(self, key) is None}
        start_kind = update.get("start_kind", self.start_kind)
        if start_kind == "domain" and self.start_bank is None:
            if calibration is None:
                raise ValueError(
                    "generator.start_kind: `domain` needs `start_bank` or a checkpoint with a domain "
                    "calibration (run the adaptation, manifests/adapt.yaml)"
                )
            update["start_bank"] = [dict(t) for t in calibration["bank"]]
        if update.get("tau_min", self.tau_min) > update.get("tau_max", self.tau_max):
            raise ValueError(
                f"generator: tau_min ({update.get('tau_min', self.tau_min)}) must be <= tau_max "
                f"({update.get('tau_max', self.tau_max)}) after filling in the calibration"
            )
        return self.model_copy(update=update)

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_uri(cls, v: str | None) -> str | None:
        return None if v is None else _local_or_s3(v)

    @field_validator("calibration", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 (yaml.safe_load, also for --set) reads a bare off / on as false / true.
        return {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _check(self) -> GeneratorSpec:
        if self.tau_min is not None and self.tau_max is not None and self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must be <= tau_max ({self.tau_max})")
        if self.kind == "realdgen" and not self.checkpoint:
            raise ValueError("kind 'realdgen' needs `checkpoint`")
        return self


class TilingSpec(StrictModel):
    """How HR images become HR tiles (sizes in LR pixels; the HR tile is tile × scale)."""

    tile: int = Field(64, ge=8, le=4096, description="Tile edge in LR pixels (e.g. 64/128/256).")
    mode: Literal["grid", "random"] = Field(
        "grid", description="grid: non-overlapping tiles from the top-left; random: seeded positions."
    )
    max_tiles_per_image: int = Field(4, ge=1, le=10_000, description="At most this many tiles per image.")


class PairingSpec(StrictModel):
    """How each HR tile is paired with real LR references."""

    mode: Literal["random", "round_robin", "weighted"] = Field(
        "random",
        description="random: uniform over all refs (seeded per sample); round_robin: by sample index "
        "in plan order; weighted: pick a reference set by weight, then a ref uniformly in it.",
    )
    refs_per_tile: int = Field(1, ge=1, le=64, description="Samples per tile, each with its own reference.")


class OutputSpec(StrictModel):
    """Where and how the dataset is written (ARCHITECTURE §5)."""

    uri: str = Field(..., min_length=1, description="Dataset folder: local path, file:// or s3://.")
    name: str = Field("pairs", pattern=r"^[A-Za-z0-9_-]+$", description="Shard name prefix: NAME-NNNNNN.tar.")
    inputs_per_shard: int = Field(16, ge=1, le=1_000_000, description="HR input images per shard.")
    mode: Literal["resume", "overwrite"] = Field(
        "resume",
        description="resume: skip complete shards, refuse output of another manifest; overwrite: delete "
        "what a different manifest left there, then write.",
    )
    preview: bool = Field(True, description="Write _preview.png (HR | reference | generated LR).")
    preview_rows: int = Field(4, ge=1, le=64, description="Rows in the preview.")

    @field_validator("uri")
    @classmethod
    def _uri_scheme(cls, v: str) -> str:
        return _local_or_s3(v)


class LimitsSpec(StrictModel):
    """Input hygiene and the failure budget."""

    max_image_pixels: int = Field(
        64_000_000, ge=1, le=2_000_000_000, description="Images above this many pixels fail before decoding."
    )
    max_file_bytes: int = Field(
        256 * 1024 * 1024, ge=1, description="Files larger than this fail without being read."
    )
    max_failure_fraction: float = Field(
        0.5, ge=0, le=1, description="Fail the job (exit 1) when more than this fraction of inputs fail."
    )


class ActorPoolSpec(StrictModel):
    """Autoscaling bounds of the generation actor pool."""

    min: int = Field(1, ge=1, le=10_000, description="Actors kept alive.")
    max: int | None = Field(
        None, ge=1, le=10_000, description="Upper bound; default: number of GPUs in the cluster, else `min`."
    )

    @model_validator(mode="after")
    def _check(self) -> ActorPoolSpec:
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class ComputeSpec(StrictModel):
    """Sizing only; nothing here changes the data (excluded from the manifest digest)."""

    actors: ActorPoolSpec = Field(default_factory=ActorPoolSpec, description="Generation actor pool.")
    batch_size: int = Field(8, ge=1, le=4096, description="Tiles per generation batch.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per actor when the cluster has GPUs, CPU actors otherwise."
    )
    decode_batch_size: int = Field(1, ge=1, le=1024, description="Input images per decode task batch.")
    encode_batch_size: int = Field(16, ge=1, le=4096, description="Samples per encode task batch.")
    actor_num_cpus: float = Field(
        1.0, gt=0, le=1024, description="CPUs reserved per CPU generation actor (GPU actors reserve 1 GPU)."
    )
    task_num_cpus: float = Field(1.0, gt=0, le=1024, description="CPUs per decode/encode task.")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch threads per CPU actor.")
    starts_in_decode: bool = Field(
        True,
        description="realdgen: compute x_start = D(HR, θ) of the k candidates in the CPU decode tasks "
        "instead of the generation actor (same bytes; keeps the GPU actor's CPU work small).",
    )


class ProgressSpec(StrictModel):
    """Progress display (excluded from the digest)."""

    bar: bool = Field(
        True,
        description="Show progress on stderr: a tqdm bar on a terminal, otherwise a 'progress:' line "
        "(samples done/expected, inputs, pairs/s) as samples complete.",
    )
    interval_s: float = Field(
        5.0, ge=0, le=3600, description="Least seconds between two 'progress:' lines when not on a terminal."
    )
    heartbeat_s: float = Field(10.0, gt=0, le=3600, description="Lock heartbeat period in seconds.")


class GenerateManifest(StrictModel):
    """kind: generate — HR content + real LR references → paired WebDataset shards."""

    DIGEST_EXCLUDE: ClassVar[dict[str, Any]] = {
        "compute": True,
        "progress": True,
        "storage": True,
        "limits": {"max_failure_fraction"},
        "output": {"uri", "mode", "preview", "preview_rows"},
    }

    kind: Literal["generate"] = Field("generate", description="Manifest kind.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Run seed; sample seeds derive from it.")
    scale: Literal[2, 4] = Field(4, description="SR scale, 2 or 4: HR size = LR size × scale.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object-store endpoint.")
    demo_inputs: str | None = Field(
        None,
        min_length=1,
        description="Local folder: before listing, write the demo inputs there (scikit-image photos as "
        "ROOT/hr, camera stand-in references as ROOT/refs; idempotent). For the embedded demo.",
    )
    hr: SourceSpec = Field(..., description="Clean HR content.")
    refs: list[ReferenceSet] = Field(
        default_factory=list, description="Real LR reference sets (required for realdgen)."
    )
    generator: GeneratorSpec = Field(
        description="LR generator (required: the default kind, realdgen, needs a checkpoint)."
    )
    tiling: TilingSpec = Field(default_factory=TilingSpec, description="HR tiling.")
    pairing: PairingSpec = Field(default_factory=PairingSpec, description="HR tile ↔ reference pairing.")
    output: OutputSpec = Field(..., description="Dataset location and sharding.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec, description="Input limits and failure budget.")
    compute: ComputeSpec = Field(default_factory=ComputeSpec, description="Sizing (not part of the digest).")
    progress: ProgressSpec = Field(default_factory=ProgressSpec, description="Progress display.")

    @model_validator(mode="after")
    def _check(self) -> GenerateManifest:
        if self.generator.kind == "realdgen" and not self.refs:
            raise ValueError("generator.kind 'realdgen' needs at least one reference set in `refs`")
        names = [r.name for r in self.refs]
        if len(set(names)) != len(names):
            raise ValueError(f"reference set names must be unique, got {names}")
        return self


MANIFEST_KINDS: dict[str, type[StrictModel]] = {"generate": GenerateManifest}
"""kind → model. Other manifest kinds register themselves here (e.g. ``MANIFEST_KINDS["train"]``)."""


# --------------------------------------------------------------------------------------------
# Loading, overrides, digest
# --------------------------------------------------------------------------------------------


def _loc(loc: Iterable[Any]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "<root>"


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model_at(model: type[BaseModel] | None, loc: list) -> type[BaseModel] | None:
    """The pydantic model class holding the keys at ``loc`` (list indices and union members
    stepped through), or None where a location is not a model's."""
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[X], list[X], X | None, Annotated[X, …]
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(model: type[BaseModel] | None, loc: list) -> str:
    """`` (did you mean 'tiling'?)`` for a mistyped key, from the keys of the model holding it."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    parent = _model_at(model, loc[:-1])
    if parent is None:
        return ""
    keys = [f.alias or name for name, f in parent.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _format_errors(exc: ValidationError, origin: str, model: type[BaseModel] | None = None) -> str:
    lines = []
    for err in exc.errors(include_url=False):
        # Drop pydantic's internal union/function tags from the location.
        loc = [p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        where = _loc(loc)
        # never echo a value under `storage` (an unknown key or a URL there may hold a credential),
        # nor one refused for holding credentials
        secret = (loc and loc[0] == "storage") or _HOLDS_CREDENTIALS in err["msg"]
        shown = "not shown" if secret else _short(err.get("input"))
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key{_did_you_mean(model, loc)} (value {shown})")
        elif err["type"] == "missing":
            lines.append(f"{where}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            # a check of the whole manifest (or a section) names what is wrong itself: its input
            # is that mapping, `storage` included, so it is not echoed
            got = "" if isinstance(err.get("input"), Mapping) else f" (got {shown})"
            lines.append(f"{where}: {msg}{got}")
    head = f"invalid manifest {origin}" if origin else "invalid manifest"
    return head + ":\n  " + "\n  ".join(lines)


def _reject_credentials(data: Any, path: tuple = ()) -> None:
    if isinstance(data, Mapping):
        for k, v in data.items():
            if isinstance(k, str) and (
                any(w in k.lower() for w in _CREDENTIAL_WORDS) or k.lower() in _CREDENTIAL_NAMES
            ):
                raise ManifestError(
                    f"{_loc(path + (k,))}: credentials must not be in a manifest; "
                    "set them in the environment of the workers (AWS_ACCESS_KEY_ID, …)"
                )
            _reject_credentials(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _reject_credentials(v, path + (i,))


class _OverrideLoader(yaml.SafeLoader):
    """YAML for one ``--set`` value: safe, and a date-like value (2024-05-01) stays text."""


_OverrideLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def override_value(raw: str) -> Any:
    """A ``--set`` value: YAML (numbers, lists, true / false, null), except that text YAML cannot
    parse (``*x``) or would cut at a `` #`` comment (``/data/phone #2``) is kept as written."""
    if not raw.strip():
        return None
    text = raw.strip()
    if re.search(r"\s#", text) and not text.startswith(("'", '"', "[", "{")):
        return text
    try:
        return yaml.load(text, Loader=_OverrideLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply ``key.path=value`` overrides (value parsed by :func:`override_value`) to a raw
    manifest mapping."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ManifestError(f"override {item!r}: expected key.path=value")
        path, raw = item.split("=", 1)
        keys = [k for k in path.strip().split(".") if k]
        if not keys:
            raise ManifestError(f"override {item!r}: empty key path")
        value = override_value(raw)
        node: Any = data
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                try:
                    node = node[int(k)]
                except (ValueError, IndexError):
                    raise ManifestError(f"override {path}: no list element {k!r}") from None
                continue
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict | list):
                raise ManifestError(f"override {path}: {'.'.join(keys[: i + 1])} is not a mapping")
            node = nxt
        last = keys[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = value
            except (ValueError, IndexError):
                raise ManifestError(f"override {path}: no list element {last!r}") from None
        else:
            node[last] = value
    return data


def parse_manifest(data: Any, origin: str = "", kind: str | None = None) -> StrictModel:
    """Validate a raw mapping into its manifest model; raises :class:`ManifestError`."""
    if not isinstance(data, Mapping):
        raise ManifestError(f"manifest {origin}: top level must be a mapping, got {type(data).__name__}")
    _reject_credentials(data)
    chosen = data.get("kind", kind or "generate")
    if kind is not None and chosen != kind:
        raise ManifestError(f"kind: expected {kind!r} (got {chosen!r})")
    model = MANIFEST_KINDS.get(chosen) if isinstance(chosen, str) else None
    if model is None:
        raise ManifestError(f"kind: unknown manifest kind (got {chosen!r}); known: {sorted(MANIFEST_KINDS)}")
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ManifestError(_format_errors(exc, origin, model)) from None


def add_set_option(parser, example: str) -> None:
    """The CLIs' ``--set KEY.PATH=VALUE`` (repeatable; into ``args.overrides``), as
    :func:`load_manifest` applies them; ``example``: a key=value of the CLI's manifest kind."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help=f"override a manifest value (YAML; repeatable), e.g. --set {example}",
    )


def load_manifest(path: str | Path, overrides: Iterable[str] = (), kind: str | None = None) -> StrictModel:
    """Read a YAML manifest (``yaml.safe_load``), apply ``key.path=value`` overrides, validate.

    Raises :class:`ManifestError` naming the key path and the bad value.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"manifest file not found: {str(p)!r}") from None
    except OSError as exc:
        raise ManifestError(f"manifest {str(p)!r} cannot be read: {exc}") from None
    except UnicodeDecodeError:
        raise ManifestError(f"manifest {str(p)!r} is not a text (UTF-8 YAML) file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(f"manifest {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if isinstance(data, Mapping):
        data = apply_overrides(dict(data), overrides)
    return parse_manifest(data, origin=str(p), kind=kind)


def manifest_digest(manifest: StrictModel) -> str:
    """sha256 of the canonical JSON of the manifest minus fields that do not change the data."""
    canon = json.dumps(digest_payload(manifest), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def digest_payload(manifest: StrictModel) -> dict:
    """What :func:`manifest_digest` hashes: the manifest's JSON minus the fields that do not change
    the data (a generation dataset's ``_index.json`` keeps it, to name what a re-run changed)."""
    exclude = getattr(type(manifest), "DIGEST_EXCLUDE", None)
    payload = manifest.model_dump(mode="json", exclude=exclude)
    cal = payload.get("calibration")
    if payload.get("kind") == "train" and isinstance(cal, dict) and not cal.get("enabled"):
        payload.pop("calibration")  # off: training is exactly as before the section existed
    gen = payload.get("generator")
    if isinstance(gen, dict) and gen.get("sampler") in ("ancestral", None):
        # steps/eta do not act on the paper's sampler, and leaving the keys out keeps the digests
        # (so resumability) of datasets written before `generator.sampler*` existed.
        for key in ("sampler", "sampler_steps", "sampler_eta"):
            gen.pop(key, None)
    if isinstance(gen, dict):
        # Settings that did not exist before domain calibrations, at their resolved paper values,
        # keep the digests of datasets written before them.
        for key, default in (("calibration", "auto"), ("filter_norm", False), ("start_bank", None)):
            if gen.get(key, default) == default:
                gen.pop(key, None)
        # Same for the GPU-only knobs at their defaults (CPU bytes never depend on them).
        for key, default in (("precision", "auto"), ("channels_last", False), ("compile", False)):
            if gen.get(key, default) == default:
                gen.pop(key, None)
        if gen.get("kind") != "realdgen" or gen.get("start_choice") != "domain":
            gen.pop("start_ref_weighting", None)  # acts on the per-domain start choice only
            gen.pop("start_aggregate", None)
            gen.pop("start_probe_layout", None)
        else:
            if gen.get("start_aggregate") == "distance":
                gen.pop("start_aggregate", None)  # the rule before the field existed: same digests as then
            if gen.get("start_probe_layout") == "centre":
                gen.pop("start_probe_layout", None)  # likewise the layout before its field
            else:
                # `spread` now makes up what the last inputs could not give from the earlier ones
                # (calibrate.spread_probe_crops): a job that read fewer tiles before may choose
                # another start, so its dataset is never resumed into one made before.
                gen["start_probe_fill"] = "reserve"
        if gen.get("kind") == "realdgen" and gen.get("tau_min") == 0:
            # τ = 0 became "no diffusion" (the candidate is its start). A dataset whose τ range holds
            # 0 was made otherwise before that, so it gets a new digest and is never resumed into.
            gen["tau_zero"] = "start"
        if gen.get("kind") == "bsrgan" or (
            gen.get("kind") == "realdgen" and gen.get("start_kind") == "bsrgan"
        ):
            # BSRGAN θs clip after each resize since 2026-12-07, as BSRGAN's code does: a dataset
            # drawn before that is never resumed into
            gen["bsrgan_resize"] = "clip"
    return payload


def payload_changes(before: dict, after: dict, limit: int = 3) -> list[str]:
    """Up to ``limit`` differences between two :func:`digest_payload` dicts, as
    ``key.path: old → new`` (lists compared whole; a long value shortened), in key order."""
    changes: list[str] = []

    def short(v) -> str:
        text = "(unset)" if v is _UNSET else json.dumps(v, sort_keys=True)
        return text if len(text) <= 40 else text[:37] + "..."

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, _UNSET), b.get(k, _UNSET), f"{path}.{k}" if path else k)
        elif a != b:
            changes.append(f"{path}: {short(a)} → {short(b)}")

    walk(before, after, "")
    return changes[:limit] + ([f"{len(changes) - limit} more"] if len(changes) > limit else [])


_UNSET = object()


def manifest_json_schema(kind: str = "generate") -> dict:
    """JSON schema of one manifest kind (for ``--print-schema``)."""
    return MANIFEST_KINDS[kind].model_json_schema()


# --------------------------------------------------------------------------------------------
# --- kind: train ---  (owned by the training engineer; pipelines/train.py reads it)
# --------------------------------------------------------------------------------------------
# Stage settings reuse realdgen_core.train's dataclasses for their defaults, so each default
# lives in one place; `to_core()` turns a section into that dataclass.

import realdgen_core.train.config as _train_cfg  # noqa: E402 - appended section

_ContentCfg = _train_cfg.ContentStageConfig
_DegradationCfg = _train_cfg.DegradationStageConfig
_DiffusionCfg = _train_cfg.DiffusionStageConfig

_SYNTH = Literal["realesrgan", "bsrgan", "bicubic", "codec"]


class _StageSection(StrictModel):
    CORE: ClassVar[type]

    def to_core(self):
        return self.CORE.from_dict(self.model_dump(mode="python"))


class TrainStageA(_StageSection):
    """Stage A: VQ-VAE on clean HR crops, then the encoder on bicubic_up(D(HR)) (decoder frozen)."""

    CORE: ClassVar[type] = _ContentCfg
    pretrain_steps: int = Field(
        _ContentCfg.pretrain_steps, ge=0, le=10**9, description="VQ-VAE steps on clean HR."
    )
    finetune_steps: int = Field(
        _ContentCfg.finetune_steps, ge=0, le=10**9, description="Encoder fine-tune steps."
    )
    batch_size: int = Field(
        _ContentCfg.batch_size, ge=1, le=4096, description="HR crops per step per worker."
    )
    hr_crop: int = Field(_ContentCfg.hr_crop, ge=8, le=4096, description="HR crop side (multiple of scale).")
    lr: float = Field(_ContentCfg.lr, gt=0, le=1, description="Adam lr of the VQ-VAE phase.")
    finetune_lr: float = Field(
        _ContentCfg.finetune_lr, gt=0, le=1, description="Adam lr of the encoder phase."
    )
    kinds: tuple[_SYNTH, ...] = Field(
        _ContentCfg.kinds, min_length=1, description="D used in the encoder phase."
    )
    codebook_restart_every: int = Field(
        _ContentCfg.codebook_restart_every, ge=0, description="Re-seed unused codes every N steps (0: never)."
    )
    grad_clip: float = Field(_ContentCfg.grad_clip, ge=0, description="Max grad norm (0: off).")


class TrainStageB(_StageSection):
    """Stage B: E_deg with the triplet loss (n positives/negatives) + LR reconstruction; E_cont frozen."""

    CORE: ClassVar[type] = _DegradationCfg
    steps: int = Field(_DegradationCfg.steps, ge=0, le=10**9, description="Optimiser steps.")
    batch_size: int = Field(
        _DegradationCfg.batch_size, ge=1, le=4096, description="Anchors per step per worker."
    )
    lr_crop: int = Field(_DegradationCfg.lr_crop, ge=4, le=4096, description="LR crop side.")
    lr: float = Field(_DegradationCfg.lr, gt=0, le=1, description="Adam lr (paper: 1e-4).")
    n: int = Field(
        _DegradationCfg.n, ge=1, le=64, description="Positives and negatives per anchor (paper: 3)."
    )
    margin: float = Field(_DegradationCfg.margin, ge=0, description="Triplet margin (paper: 0.01).")
    rec_weight: float = Field(
        _DegradationCfg.rec_weight, ge=0, description="Weight of the LR reconstruction."
    )
    kinds: tuple[_SYNTH, ...] = Field(_DegradationCfg.kinds, min_length=1, description="D kinds for θ draws.")
    grad_clip: float = Field(_DegradationCfg.grad_clip, ge=0, description="Max grad norm (0: off).")
    hard_negatives: float = Field(
        _DegradationCfg.hard_negatives,
        ge=0,
        le=1,
        description="Share of negatives that are the anchor's θ with one level moved one step.",
    )


class TrainStageC(_StageSection):
    """Stage C: the Decoupled DDPM on LR crops, with partial fine-tuning of the extractors (A.5)."""

    CORE: ClassVar[type] = _DiffusionCfg
    steps: int = Field(_DiffusionCfg.steps, ge=0, le=10**9, description="Optimiser steps.")
    batch_size: int = Field(
        _DiffusionCfg.batch_size, ge=1, le=4096, description="LR crops per step per worker."
    )
    lr_crop: int = Field(_DiffusionCfg.lr_crop, ge=4, le=4096, description="LR crop side (paper: 256).")
    lr: float = Field(_DiffusionCfg.lr, gt=0, le=1, description="Adam lr of the UNet and M (paper: 1e-4).")
    finetune_lr: float = Field(
        _DiffusionCfg.finetune_lr, gt=0, le=1, description="lr of the extractor parts (1e-6)."
    )
    ema_decay: float = Field(_DiffusionCfg.ema_decay, ge=0, lt=1, description="EMA decay of the UNet.")
    ema_start: int = Field(_DiffusionCfg.ema_start, ge=0, description="Step from which the EMA averages.")
    content_trainable: Literal["first_block", "none"] = Field(
        _DiffusionCfg.content_trainable, description="Part of E_cont fine-tuned (paper: its first block)."
    )
    degradation_trainable: Literal["last_conv", "all", "none"] = Field(
        _DiffusionCfg.degradation_trainable,
        description="Part of E_deg fine-tuned (paper: its last conv; manifests/adapt.yaml: `none`).",
    )
    grad_clip: float = Field(_DiffusionCfg.grad_clip, ge=0, description="Max grad norm (0: off).")


class TrainLRSource(StrictModel):
    """One component of stage C's LR corpus (a crop's component is drawn by `weight`).

    - ``images``: LR images as they are (real LR: a folder/shards of a camera or domain);
    - ``synthetic``: D(HR crop, θ) with a fresh θ per crop, kinds from `degradations`;
    - ``camera``: the camera-like stand-in of realdgen_core.camera on HR crops (a stand-in, not real LR).
    ``source`` is the LR images (images) or the HR images to degrade (synthetic/camera; default `data.hr`).
    """

    kind: Literal["images", "synthetic", "camera"] = Field(..., description="How the LR crops are made.")
    source: SourceSpec | None = Field(None, description="Images to read (see above).")
    degradations: tuple[_SYNTH, ...] = Field(
        ("realesrgan", "bsrgan"), min_length=1, description="synthetic only."
    )
    weight: float = Field(1.0, gt=0, le=1e6, description="Relative share of crops.")

    @model_validator(mode="after")
    def _check(self) -> TrainLRSource:
        if self.kind == "images" and self.source is None:
            raise ValueError("kind 'images' needs `source`")
        return self


class TrainData(StrictModel):
    """Training images. HR feeds stages A and B; `lr` is stage C's corpus."""

    prepare_demo: str | None = Field(
        None,
        description="Write the scikit-image demo inputs (pipelines/demo_data.py) under this local folder "
        "first (hr/, refs/, heldout/, plus ref_hr/: the reference photos at full size).",
    )
    hr: SourceSpec | None = Field(
        None, description="Clean HR images (stages A, B; default HR of synthetic LR)."
    )
    lr: list[TrainLRSource] = Field(default_factory=list, description="Stage C corpus components.")
    cache_images: int = Field(512, ge=1, le=10**7, description="Decoded images kept in memory per worker.")
    max_image_pixels: int = Field(64_000_000, ge=1, description="Larger images are skipped before decoding.")


class TrainOutput(StrictModel):
    """Where the run's state goes and where the final checkpoint is exported."""

    run_dir: str = Field(
        ..., min_length=1, description="Checkpoints + CSV logs: local path, file:// or s3://."
    )
    checkpoint: str | None = Field(
        None, description="Export the final model here (.safetensors; local or s3://)."
    )
    checkpoint_every: int = Field(200, ge=1, le=10**9, description="Save resumable state every N steps.")
    keep_last: int = Field(2, ge=1, le=1000, description="Resumable checkpoints kept per run.")
    export_every: bool = Field(
        True, description="Also refresh `checkpoint` at every save (a usable partial model if the run stops)."
    )

    @field_validator("run_dir", "checkpoint")
    @classmethod
    def _uri_scheme(cls, v: str | None) -> str | None:
        return None if v is None else _local_or_s3(v)


class TrainCompute(StrictModel):
    """Where training runs (excluded from the digest)."""

    backend: Literal["local", "ray"] = Field(
        "local", description="local: this process; ray: Ray Train TorchTrainer, one DDP worker per GPU/slot."
    )
    num_workers: int = Field(1, ge=1, le=4096, description="Ray workers (one per GPU with use_gpu).")
    use_gpu: bool = Field(False, description="One GPU per Ray worker (DDP over NCCL); CPU workers use gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs reserved per Ray worker.")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads per worker.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="local backend: auto = the first CUDA GPU when torch sees one, else the CPU."
    )
    data_workers: int = Field(
        0,
        ge=0,
        le=256,
        description="DataLoader worker processes building the next batches (crops + degradations) while "
        "the model trains; 0 = in this process. The batches are the same bytes either way.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: the loss forward under torch.autocast(bfloat16); weights stay float32."
    )


class TrainProgress(StrictModel):
    """Progress display and loss logging (excluded from the digest)."""

    bar: bool = Field(True, description="tqdm bar per phase on stderr (rank 0).")
    log_every: int = Field(1, ge=1, description="Write a CSV loss row every N steps.")


class TrainCalibration(StrictModel):
    """Domain calibration after stage C (realdgen_core/calibrate.py): τ and the start bank for the
    domain of `data.lr`'s `images` components, recorded in the exported checkpoint and used by the
    generation job by default. A hash of each LR file's name puts it in the validation split, which
    stage C then never reads."""

    enabled: bool = Field(False, description="Calibrate and record the result in output.checkpoint.")
    domain: str = Field("domain", min_length=1, max_length=200, description="Name recorded with it.")
    val_fraction: float = Field(
        0.25, ge=0.05, le=0.9, description="Share of the domain's LR files held out for calibration."
    )
    hr: SourceSpec | None = Field(
        None,
        description="Calibration HR content (never the domain's own scenes). Default: scikit-image "
        "photos of pipelines/demo_data.py SPLITS['calibration'].",
    )
    pairs: int = Field(12, ge=1, le=4096, description="(HR crop, validation LR) pairs per τ tried.")
    hr_crop: int = Field(256, ge=16, le=4096, description="HR crop side (a multiple of the scale).")
    tau_grid: tuple[int, ...] = Field(
        (0, 25, 50, 100, 200, 300), min_length=1, description="tau_max values tried (0-based steps)."
    )
    blur_sigmas: tuple[float, ...] = Field(
        _calibrate.DEFAULT_BLUR_SIGMAS, min_length=1, description="Start bank: HR blur σ (px)."
    )
    jpeg_qualities: tuple[int, ...] = Field(
        _calibrate.DEFAULT_JPEG_QUALITIES, min_length=1, description="Start bank: JPEG qualities (0 = none)."
    )
    sharpen_amounts: tuple[float, ...] = Field(
        _calibrate.DEFAULT_SHARPEN_AMOUNTS,
        min_length=1,
        description="Start bank: unsharp-mask amounts on the LR before the JPEG (0 = none).",
    )
    k: int = Field(4, ge=1, le=64, description="Best-of-k while calibrating (as the job uses).")
    content_weight: float = Field(0.0, ge=0, le=1e6, description="Filter weight of the content error.")
    degradation_weight: float = Field(1.0, ge=0, le=1e6, description="Filter weight of the E_deg error.")
    sampler_steps: int = Field(10, ge=1, le=1000, description="DDIM steps while calibrating τ.")

    @model_validator(mode="after")
    def _bank_is_valid(self) -> TrainCalibration:
        # build the bank now (any scale) so that a bad σ / quality / amount fails before training
        try:
            _calibrate.start_bank(4, self.blur_sigmas, self.jpeg_qualities, self.sharpen_amounts)
        except ValueError as exc:
            raise ValueError(f"start bank: {exc}") from None
        return self


class TrainManifest(StrictModel):
    """kind: train — RealDGen's three-stage training (A content, B degradation, C Decoupled DDPM)."""

    DIGEST_EXCLUDE: ClassVar[dict[str, Any]] = {"compute": True, "progress": True, "storage": True}

    kind: Literal["train"] = Field("train", description="Manifest kind.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Run seed (model init, crops, θ draws).")
    preset: Literal["tiny", "small", "paper"] = Field(
        "small", description="Model preset (realdgen_core.config)."
    )
    scale: Literal[2, 4] = Field(4, description="SR scale.")
    init_checkpoint: str | None = Field(
        None,
        description="Start from this checkpoint instead of a fresh model (continue / domain adaptation); "
        "its config wins over preset/scale.",
    )
    stages: tuple[Literal["A", "B", "C"], ...] = Field(
        ("A", "B", "C"), min_length=1, description="Stages to run."
    )
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object-store endpoint.")
    data: TrainData = Field(..., description="Training images.")
    stage_a: TrainStageA = Field(default_factory=TrainStageA, description="Stage A settings.")
    stage_b: TrainStageB = Field(default_factory=TrainStageB, description="Stage B settings.")
    stage_c: TrainStageC = Field(default_factory=TrainStageC, description="Stage C settings.")
    output: TrainOutput = Field(..., description="Run folder and export.")
    compute: TrainCompute = Field(default_factory=TrainCompute, description="Local or Ray Train.")
    progress: TrainProgress = Field(default_factory=TrainProgress, description="Progress and logs.")
    calibration: TrainCalibration = Field(
        default_factory=TrainCalibration, description="Domain calibration of τ and the start (adaptation)."
    )

    @field_validator("init_checkpoint")
    @classmethod
    def _init_checkpoint_uri(cls, v: str | None) -> str | None:
        return None if v is None else _local_or_s3(v)

    @model_validator(mode="after")
    def _check(self) -> TrainManifest:
        if self.calibration.enabled:
            if not self.output.checkpoint:
                raise ValueError("calibration.enabled needs `output.checkpoint` (where it is recorded)")
            if not any(c.kind == "images" for c in self.data.lr):
                raise ValueError("calibration.enabled needs a `data.lr` component of kind `images`")
            if self.calibration.hr_crop % self.scale:
                raise ValueError(f"calibration.hr_crop {self.calibration.hr_crop} is not a multiple of scale")
        if ("A" in self.stages or "B" in self.stages) and self.data.hr is None:
            raise ValueError("stages A and B need `data.hr`")
        if "C" in self.stages:
            if not self.data.lr:
                raise ValueError("stage C needs at least one `data.lr` component")
            for i, comp in enumerate(self.data.lr):
                if comp.kind != "images" and comp.source is None and self.data.hr is None:
                    raise ValueError(f"data.lr[{i}] ({comp.kind}) needs `source` or `data.hr`")
        if self.stage_a.hr_crop % self.scale:
            raise ValueError(
                f"stage_a.hr_crop {self.stage_a.hr_crop} is not a multiple of scale {self.scale}"
            )
        return self


MANIFEST_KINDS["train"] = TrainManifest
__all__ += [
    "TrainManifest",
    "TrainCalibration",
    "TrainData",
    "TrainLRSource",
    "TrainOutput",
    "TrainCompute",
    "TrainProgress",
    "TrainStageA",
    "TrainStageB",
    "TrainStageC",
]


# --------------------------------------------------------------------------------------------
# --- kind: evaluate ---  (realism benchmark; pipelines/evaluate_realism.py reads it)
# --------------------------------------------------------------------------------------------
# Paired domains (HR tiles + their true LR) → adaptation (optional) → the main job with every
# generator kind → metrics against the truth → report folder. See docs/evaluate.md.


class EvalDomain(StrictModel):
    """One paired domain: HR images and their true LR (same file names), plus unpaired LR of it.

    Layouts (``layout: auto`` picks by the sub-folders present in ``path``):
    - ``bench``: ``hr/`` + ``lr/`` (+ ``refs_train/``), as written by make_codec_pairs.py;
    - ``realsr``: ``HR/`` + ``LR/`` (RealSR / DRealSR); names match after dropping a trailing
      ``_HR`` / ``_LR<n>`` / ``_x<n>`` from the stem.
    ``hr`` / ``lr`` / ``refs_train`` name the folders explicitly and win over the layout.
    """

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="Domain name (report key).")
    path: str | None = Field(None, min_length=1, description="Local domain folder; default: `root`/`name`.")
    layout: Literal["auto", "bench", "realsr"] = Field("auto", description="Folder convention.")
    hr: str | None = Field(None, min_length=1, description="Explicit HR folder (local).")
    lr: str | None = Field(None, min_length=1, description="Explicit true-LR folder (local).")
    refs_train: str | None = Field(
        None,
        min_length=1,
        description="Unpaired LR of the domain (adaptation, SR-proxy references); default "
        "`refs_train/` when present, else none (adaptation skipped, SR proxy uses the true LR).",
    )


class EvalAdapt(StrictModel):
    """Optional per-domain adaptation: the project's one-command `pipelines/train.py` run."""

    enabled: bool = Field(False, description="Adapt the checkpoint on each domain's `refs_train`.")
    manifest: str = Field(
        "manifests/adapt.yaml",
        min_length=1,
        description="kind: train manifest (relative: to the working directory where that file exists, "
        "else to the repo, whose manifests/adapt.yaml is the default).",
    )
    steps: int = Field(200, ge=1, le=10**7, description="stage_c.steps of the adaptation run.")
    overrides: tuple[str, ...] = Field(
        (), description="Extra `key.path=value` overrides for the adaptation manifest."
    )
    timeout_s: float = Field(7200, gt=0, le=10**6, description="Kill the adaptation after this long.")


class EvalGeneration(StrictModel):
    """How the main job (kind: generate) is run for each domain and generator."""

    generators: tuple[GeneratorKind, ...] = Field(
        ("realdgen", "realesrgan", "bsrgan", "bicubic"), min_length=1, description="Kinds compared."
    )
    k: int | None = Field(None, ge=1, le=64, description="realdgen best-of-k; None: the job's default.")
    tau_min: int | None = Field(None, ge=0, le=999, description="realdgen τ min; None: the job's default.")
    tau_max: int | None = Field(None, ge=0, le=999, description="realdgen τ max; None: the job's default.")
    overrides: tuple[str, ...] = Field(
        (), description="`key.path=value` overrides applied to every generated kind: generate manifest."
    )
    realdgen_overrides: tuple[str, ...] = Field(
        (), description="Overrides for the realdgen jobs only (e.g. generator.sampler=ddim)."
    )
    tile: int = Field(
        64,
        ge=8,
        le=4096,
        description="Eval tile edge in LR pixels (the job's minimum, 8); pairs are cut to it.",
    )
    max_tiles_per_image: int = Field(
        64, ge=1, le=100_000, description="Eval tiles cut from one larger pair (grid, top-left first)."
    )
    group_pattern: str = Field(
        r"^([^_]+)",
        min_length=1,
        description="Regex on the file stem; group 1 (else the match) names the photo. A tile's "
        "reference is drawn from the true LR of the OTHER photos (one job per photo).",
    )
    batch_size: int = Field(4, ge=1, le=4096, description="compute.batch_size of the jobs.")
    actors: int = Field(1, ge=1, le=1024, description="Generation actors per job.")

    @field_validator("group_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        import re

        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v


class EvalClassifier(StrictModel):
    """Classifier two-sample test: a small CNN tells generated LR crops from true LR crops.

    Folds by photo group (train on the other photos, test on this one), so content cannot help.
    """

    enabled: bool = Field(True, description="Run the test.")
    steps: int = Field(300, ge=1, le=10**6, description="Adam steps per fold.")
    batch_size: int = Field(32, ge=2, le=4096, description="Crops per step (half real, half generated).")
    crop: int = Field(32, ge=4, le=1024, description="Crop edge in LR pixels (positions on the 8-px grid).")
    width: int = Field(16, ge=4, le=512, description="Channels of the CNN (cost ~ width²).")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate.")
    repeats: int = Field(
        1, ge=1, le=100, description="Seeded repeats, pooled (narrower interval, repeats × the cost)."
    )


class EvalSRProxy(StrictModel):
    """SR proxy (paper Table 1, small): one small SR net per generator, scored on the real pairs.

    Training pairs: the generator's LR of HR tiles that are neither the eval photos nor the
    benchmark's training photos, with the domain's `refs_train` as references.
    """

    enabled: bool = Field(True, description="Run the SR proxy.")
    hr: SourceSpec | None = Field(
        None, description="HR images for the training pairs; default: scikit-image photos in `photos`."
    )
    photos: tuple[str, ...] = Field(
        ("motorcycle_left", "motorcycle_right", "camera", "brick", "grass", "gravel", "moon", "clock"),
        min_length=1,
        description="Bundled scikit-image photos (pipelines/demo_data.PHOTOS) used when `hr` is None.",
    )
    tiles_per_image: int = Field(2, ge=1, le=10_000, description="Training tiles per HR image.")
    steps: int = Field(300, ge=1, le=10**6, description="Adam steps per generator.")
    batch_size: int = Field(16, ge=1, le=4096, description="LR crops per step.")
    crop: int = Field(24, ge=4, le=1024, description="LR crop edge of training crops.")
    width: int = Field(32, ge=4, le=512, description="Channels of the SR net.")
    blocks: int = Field(2, ge=1, le=64, description="Hidden conv layers of the SR net.")
    lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate.")
    repeats: int = Field(
        1, ge=1, le=100, description="Seeded repeats per generator, averaged (report gives the spread)."
    )

    @field_validator("photos")
    @classmethod
    def _known_photos(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from pipelines.demo_data import PHOTOS

        unknown = [n for n in v if n not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown photo(s) {unknown}; the bundled photos are {', '.join(PHOTOS)}")
        return v


class EvalLearnedMetrics(StrictModel):
    """Metrics that need pretrained weights: only from local files, skipped with a notice otherwise."""

    lpips_weights: str | None = Field(
        None, description="Local LPIPS weights file (needs the `lpips` package)."
    )
    fid_weights: str | None = Field(None, description="Local Inception weights for FID (not bundled).")


class EvalReportSpec(StrictModel):
    """Where the report goes."""

    dir: str = Field(..., min_length=1, description="Local report folder (report.md, report.json, PNGs).")
    grid_rows: int = Field(6, ge=1, le=256, description="Tiles per domain in the grid image.")
    fresh: bool = Field(
        False, description="Delete the run's work folder first (otherwise finished jobs are reused)."
    )


class EvalCompute(StrictModel):
    """Sizing (does not change the numbers beyond float noise)."""

    torch_threads: int = Field(1, ge=1, le=256, description="torch threads here and per generation actor.")


class EvaluateManifest(StrictModel):
    """kind: evaluate — realism of generated LR against true LR of paired domains (issue 8)."""

    kind: Literal["evaluate"] = Field("evaluate", description="Manifest kind.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Seed of the jobs, crops, classifier and SR proxy.")
    scale: Literal[2, 4] = Field(4, description="SR scale, 2 or 4: HR size = LR size × scale.")
    checkpoint: str | None = Field(
        None, description="RealDGen checkpoint (local .safetensors); needed when realdgen is compared."
    )
    root: str | None = Field(None, description="Folder holding one sub-folder per domain (`domains[].path`).")
    domains: list[EvalDomain] = Field(..., min_length=1, description="Paired domains to measure.")
    adapt: EvalAdapt = Field(default_factory=EvalAdapt, description="Per-domain adaptation.")
    generation: EvalGeneration = Field(default_factory=EvalGeneration, description="The main job's runs.")
    classifier: EvalClassifier = Field(default_factory=EvalClassifier, description="Two-sample test.")
    sr_proxy: EvalSRProxy = Field(default_factory=EvalSRProxy, description="SR proxy.")
    learned_metrics: EvalLearnedMetrics = Field(
        default_factory=EvalLearnedMetrics, description="LPIPS / FID from local weights."
    )
    report: EvalReportSpec = Field(..., description="Report folder.")
    compute: EvalCompute = Field(default_factory=EvalCompute, description="Threads.")

    @model_validator(mode="after")
    def _check(self) -> EvaluateManifest:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domain names must be unique, got {names}")
        for i, d in enumerate(self.domains):
            if d.path is None and self.root is None and (d.hr is None or d.lr is None):
                raise ValueError(f"domains[{i}] ({d.name}) needs `path`, `root`, or both `hr` and `lr`")
        if "realdgen" in self.generation.generators and not self.checkpoint:
            raise ValueError("generation.generators includes realdgen: set `checkpoint`")
        if self.adapt.enabled and not self.checkpoint:
            raise ValueError("adapt.enabled needs `checkpoint`")
        return self


MANIFEST_KINDS["evaluate"] = EvaluateManifest
__all__ += [
    "EvaluateManifest",
    "EvalDomain",
    "EvalAdapt",
    "EvalGeneration",
    "EvalClassifier",
    "EvalSRProxy",
    "EvalLearnedMetrics",
    "EvalReportSpec",
    "EvalCompute",
]
