"""Planning: what the job will do, decided before any pixel is generated, without the driver
holding the inputs.

The driver validates the manifest, reads the checkpoint's metadata and checks that every source
exists and holds an image (:func:`preflight`: cheap, before Ray starts, so a bad manifest never
starts a job). The full listing runs as a Ray task (:func:`list_plan`; WebDataset member
indexing fans out as one task per tar): it sorts the inputs, assigns keys and shards, writes
the plan as parquet blocks of many inputs into the output's work folder and returns only
O(shards) metadata (:class:`PlanSummary`). The generation pipeline streams the inputs from
those blocks. The plan is a pure function of the manifest and the inputs.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.generate.config import PlanReadConfig
from pipelines.generate.stages import base_key
from pipelines.manifest import GenerateManifest, ManifestError, manifest_digest
from pipelines.sources import SourceError, SourceItem, index_tar, list_source, written_root
from pipelines.storage import (
    DatasetStore,
    StorageAccessError,
    TransientStorageError,
    fetch_to_local,
    get_fs,
    local_abspath,
    read_parquet,
    shard_stem,
    with_retries,
)

__all__ = [
    "LISTING_DIGEST_PREFIX",
    "PLAN_SCHEMA",
    "Plan",
    "PlanSummary",
    "preflight",
    "list_plan",
    "read_plan_block",
    "work_prefix",
    "block_inputs_for",
]

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("input_index", pa.int64()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("error", pa.string()),
    ]
)
MAX_BLOCK_INPUTS = 256


MAX_SHARDS = 1_000_000  # NAME-000000 … NAME-999999


def work_prefix(digest: str) -> str:
    """The run's scratch folder inside the output (plan blocks, part files); removed at the end."""
    return f"_work/{digest[:16]}"


def block_inputs_for(n_inputs: int, cluster_cpus: int, decode_batch_size: int) -> int:
    """Inputs per plan block: about four blocks per CPU for small jobs, at most 256 per block."""
    want = math.ceil(n_inputs / max(1, 4 * cluster_cpus))
    return max(decode_batch_size, min(MAX_BLOCK_INPUTS, want))


# --------------------------------------------------------------------------------------------
# Checkpoint metadata (one small file, read on the driver)
# --------------------------------------------------------------------------------------------


def checkpoint_info(
    m: GenerateManifest, storage: dict
) -> tuple[str | None, str | None, dict | None, Any, str | None]:
    """(local path, model digest, domain calibration or None, model config, a warning when its
    training is unfinished or None) of a realdgen manifest's checkpoint."""
    if m.generator.kind != "realdgen":
        return None, None, None, None, None
    uri = m.generator.checkpoint
    assert uri is not None
    fs, path = get_fs(uri, storage)
    if not with_retries(lambda: fs.exists(path), what=f"checking {uri}"):
        here = "://" in uri or os.path.isabs(os.path.expanduser(uri))
        where = "" if here else f", relative to the current folder {os.getcwd()}"
        raise ManifestError(f"generator.checkpoint: file not found (got {uri!r}{where})")
    local = fetch_to_local(uri, storage)
    from realdgen_core.checkpoint import CheckpointError, inspect_checkpoint

    try:  # header, config and every tensor's name / shape / dtype: a bad file fails here, not in Ray
        config, metadata, meta = inspect_checkpoint(local)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ManifestError(
            f"generator.checkpoint: not a usable RealDGen checkpoint: {exc} (got {uri!r})"
        ) from None
    if config.scale != m.scale:
        raise ManifestError(f"scale: the checkpoint is x{config.scale} (got {m.scale})")
    return local, metadata["digest"], calibration_of(meta), config, unfinished_training(metadata)


def unfinished_training(metadata: dict) -> str | None:
    """A warning when ``pipelines/train.py`` exported the checkpoint before its training was done
    (``partial``: mid-phase, or with phases still to run) or left parts of it untrained."""
    parts = []
    if metadata.get("partial"):
        parts.append(f"exported before its run finished ({metadata['partial']})")
    if metadata.get("untrained"):
        parts.append(f"never trained: {', '.join(map(str, metadata['untrained']))}")
    if not parts:
        return None
    return f"warning: the checkpoint's training is unfinished: {'; '.join(parts)}"


def calibration_of(meta: dict) -> dict | None:
    """The domain calibration in a checkpoint's safetensors metadata (realdgen_core.calibrate) or None."""
    from realdgen_core.calibrate import METADATA_KEY, DomainCalibration

    try:
        cal = json.loads(meta.get("metadata", "{}")).get(METADATA_KEY)
        return None if cal is None else DomainCalibration.from_dict(cal).to_dict()
    except (ValueError, AttributeError) as exc:
        raise ManifestError(f"generator.checkpoint: invalid domain calibration: {exc}") from None


def checkpoint_calibration(local: str) -> dict | None:
    """The domain calibration recorded in the checkpoint file ``local``, or None."""
    from safetensors import safe_open

    with safe_open(local, framework="pt") as f:
        return calibration_of(f.metadata() or {})


# --------------------------------------------------------------------------------------------
# Preflight (driver, before Ray): the manifest is usable
# --------------------------------------------------------------------------------------------


def _s3_has(fs, path: str, match) -> bool | None:
    """Page through ``list_objects_v2`` below ``path`` and stop at the first key ``match`` accepts:
    True; False when keys exist but none matches; None when there is nothing there at all. Nothing
    is cached (s3fs's ``walk``/``find`` would keep the whole first folder level in its dircache)."""
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    token = None
    seen = False
    while True:
        kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            kw["ContinuationToken"] = token
        resp = fs.call_s3("list_objects_v2", **kw)
        for obj in resp.get("Contents", []):
            seen = True
            if match(obj["Key"]):
                return True
        if not resp.get("IsTruncated"):
            return False if seen else None
        token = resp.get("NextContinuationToken")


def _first_image(spec, storage: dict) -> bool:
    """True as soon as one listed entry could be an input (stops early; no full listing)."""
    from pipelines.sources import _GLOB_CHARS, _ext_ok

    fs, path = get_fs(spec.uri, storage)
    wanted = (".tar",) if spec.format == "webdataset" else (".parquet",) if spec.format == "parquet" else None

    def match(n: str) -> bool:
        return n.endswith(wanted) if wanted is not None else _ext_ok(n, tuple(spec.extensions))

    if _GLOB_CHARS & set(path):
        return any(match(n) for n in fs.glob(path))
    if spec.uri.startswith("s3://"):
        if "/" in path.strip("/") and fs.isfile(path):
            return match(path)
        found = with_retries(lambda: _s3_has(fs, path, match), what=f"list {spec.uri}")
        if found is None:
            raise SourceError(f"not found: {spec.uri}")
        return found
    if not fs.exists(path):
        raise SourceError(f"not found: {path}")
    if fs.isfile(path):
        return match(path)
    stack = [path]
    while stack:  # depth-first with os.scandir: stops at the first match, holds one entry at a time
        with os.scandir(stack.pop()) as it:
            for e in it:
                if e.is_dir(follow_symlinks=True):
                    stack.append(e.path)
                elif match(e.name):
                    return True
    return False


def _no_images(spec, key: str, storage: dict) -> ManifestError:
    if spec.uri.startswith("s3://"):  # a glob in a bucket that does not exist lists nothing too
        try:
            found, bucket = _bucket_exists(spec.uri, storage)
        except (StorageAccessError, TransientStorageError):
            found = True  # nothing more to say than the message below
        if not found:
            return ManifestError(f"{key}.uri: the bucket {bucket!r} does not exist (got {spec.uri!r})")
    if spec.format == "folder" and "://" not in spec.uri and os.path.isfile(spec.uri):
        return ManifestError(
            f"{key}.uri: {spec.uri!r} is a file, not a folder: name its folder, or a glob such as "
            f"'{os.path.dirname(spec.uri) or '.'}/*.png'"
        )
    if spec.format in ("webdataset", "parquet"):
        what = ".tar shards" if spec.format == "webdataset" else ".parquet lists"
        return ManifestError(f"{key}.uri: no {what} found (got {spec.uri!r}, format {spec.format})")
    return ManifestError(f"{key}.uri: no images found (got {spec.uri!r}, extensions {list(spec.extensions)})")


def _unlistable(exc: Exception, spec, key: str) -> ManifestError:
    """The ManifestError for a source that could not be looked at (preflight or listing)."""
    if isinstance(exc, SourceError):
        text = str(exc)  # "not found: PATH" names the path already; say the URI only when it differs
        got = "" if text.endswith(spec.uri) else f" (got {spec.uri!r})"
        return ManifestError(f"{key}.uri: {text}{got}")
    if isinstance(exc, FileNotFoundError):
        where = str(exc)
        return ManifestError(
            f"{key}.uri: not found: {spec.uri!r}" + (f" ({where})" if spec.uri not in where else "")
        )
    if isinstance(exc, StorageAccessError):  # names the URI and what to fix itself
        return ManifestError(f"{key}.uri: {exc}")
    return ManifestError(f"{key}.uri: cannot be listed: {type(exc).__name__}: {exc} (got {spec.uri!r})")


def _check_source(spec, storage: dict, key: str) -> None:
    try:
        found = _first_image(spec, storage)
    except TransientStorageError:  # storage away, the manifest fine: the CLI says so (exit 75)
        raise
    except Exception as exc:
        raise _unlistable(exc, spec, key) from None
    if not found:
        raise _no_images(spec, key, storage)


def _check_start_bank(m: GenerateManifest) -> None:
    """A realdgen job's start bank (given or from the calibration) is applied once to a small grey tile
    here, so an empty, wrong-scale or malformed bank fails before the job, not in every sample."""
    g = m.generator
    if g.kind != "realdgen" or g.start_kind != "domain" or g.start_bank is None:
        return
    import torch

    from realdgen_core import calibrate, degrade

    try:
        calibrate.check_bank(g.start_bank, m.scale)
        side = 16 * m.scale
        degrade.apply(torch.full((len(g.start_bank), 3, side, side), 0.5), list(g.start_bank))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"generator.start_bank: {type(exc).__name__}: {exc}"[:600]) from None


def generator_note(spec, calibration: dict | None, domains: Sequence[str] = ()) -> str | None:
    """One line on where a realdgen job's τ and start come from (``spec``: the resolved
    ``GeneratorSpec``; ``calibration``: the checkpoint's, or None; ``domains``: the manifest's
    reference domains, named when the calibration was made for another). None for other
    generators."""
    if spec.kind != "realdgen":
        return None
    tau = f"τ {spec.tau_min}..{spec.tau_max}"
    if spec.calibration != "auto":
        return f"domain calibration off (generator.calibration): {tau}, start {spec.start_kind}"
    if calibration is None:
        return (
            f"the checkpoint carries no domain calibration, so the paper's settings: {tau}, start "
            f"{spec.start_kind} (an adaptation that finished, or train.py --calibrate-only, records one)"
        )
    note = (
        f"domain calibration {calibration.get('domain')!r} from the checkpoint: {tau}, start "
        f"{spec.start_kind} ({len(spec.start_bank or ())}-entry bank)"
    )
    # the train manifest's default label ("domain") names nothing: no note then
    label = calibration.get("domain")
    others = sorted({d for d in domains if d != label})
    if others and label not in (None, "domain"):
        note += (
            f"; it was calibrated for {label!r}, and this job's references are labelled "
            f"{', '.join(map(repr, others))}: unless they are the references it was adapted on, adapt "
            "the checkpoint on them for their own τ (manifests/adapt.yaml, docs/training.md)"
        )
    return note


def preflight(
    m: GenerateManifest, *, domain_note: bool = True
) -> tuple[GenerateManifest, str, str | None, str | None, str | None]:
    """Check a manifest before any work: ``(manifest with resolved generator, digest, local
    checkpoint, model digest, generator note)``; raises :class:`ManifestError` naming what is wrong.
    ``domain_note=False``: the note does not compare the calibration's domain with the references'
    labels (callers that adapted the checkpoint for these references themselves: the evaluation)."""
    from pipelines.storage import storage_kwargs

    storage = storage_kwargs(m.storage)
    # everything that needs no input first: a manifest refused here has written nothing (the demo
    # inputs included, which are written at the manifest's scale)
    local, model_digest, calibration, config, unfinished = checkpoint_info(m, storage)
    try:
        m = m.model_copy(update={"generator": m.generator.resolved(calibration)})
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"generator: {exc}") from None
    if config is not None and m.generator.tau_max >= config.diffusion.max_train_timestep:
        raise ManifestError(
            f"generator.tau_max: {m.generator.tau_max} is past what the checkpoint's UNet was trained on "
            f"(timesteps below its max_train_timestep, {config.diffusion.max_train_timestep}); "
            f"use at most {config.diffusion.max_train_timestep - 1}"
        )
    _check_start_bank(m)
    _check_output_outside_sources(m)
    _check_output_is_a_folder(m)
    _check_output_bucket(m, storage)
    if m.demo_inputs:
        from pipelines.demo_data import prepare_demo_inputs

        prepare_demo_inputs(m.demo_inputs, scale=m.scale)
    _check_source(m.hr, storage, "hr")
    for si, rs in enumerate(m.refs):
        _check_source(rs.source, storage, f"refs[{si}].source")
    domains = [rs.domain for rs in m.refs if rs.domain is not None] if domain_note else []
    note = generator_note(m.generator, calibration, domains)
    if unfinished:
        note = f"{unfinished}; {note}"
    return m, manifest_digest(m), local, model_digest, note


def _location(uri: str) -> str:
    """A comparable form of a source root or output URI: s3://bucket/key or an absolute path."""
    from pipelines.sources import written_root

    root = written_root(uri)
    if root.startswith("s3://"):
        return root.rstrip("/")
    return local_abspath(root or ".").rstrip("/") or "/"  # "/"-separated on Windows too


def _check_output_outside_sources(m: GenerateManifest) -> None:
    """The output must not lie in (or be) a source folder: its own files would be listed by the next
    run (the preview as an input; a changed listing then refuses the resume)."""
    out = _location(m.output.uri)
    sources = [("hr.uri", m.hr.uri)] + [(f"refs[{i}].source.uri", r.source.uri) for i, r in enumerate(m.refs)]
    for key, uri in sources:
        root = _location(uri)
        if out == root or out.startswith(root + "/"):
            raise ManifestError(
                f"output.uri: {m.output.uri!r} lies inside {key} {uri!r}; the dataset's own files would be "
                "read as inputs by the next run: write it outside the sources"
            )


def _bucket_exists(uri: str, storage: dict) -> tuple[bool, str]:
    """(whether the bucket of the s3 ``uri`` exists, its name), by the listing the job itself makes
    (a policy may allow ListBucket on a prefix only, where HeadBucket is refused): NoSuchBucket is
    FileNotFoundError, 403 is refused (s3fs). Outages are retried (``with_retries``)."""
    fs, _ = get_fs(uri, storage)
    bucket, _, key = written_root(uri)[len("s3://") :].partition("/")  # the key up to a glob part
    prefix = key.rstrip("/") + "/" if key else ""

    def bucket_answers() -> bool:
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
            return True
        except FileNotFoundError:
            return False

    return with_retries(bucket_answers, what=f"checking the bucket of {uri}"), bucket


def _check_output_bucket(m: GenerateManifest, storage: dict) -> None:
    """An s3 output's bucket exists and answers these credentials: a missing bucket is a manifest
    error naming it here, not an unnamed failure of the lock once Ray is up (nothing is created)."""
    if not m.output.uri.startswith("s3://"):
        return
    try:  # outages are retried and then fail as elsewhere (exit 75: run again), not as a manifest error
        found, bucket = _bucket_exists(m.output.uri, storage)
    except StorageAccessError as exc:
        raise ManifestError(f"output.uri: {exc}") from None
    if not found:
        raise ManifestError(
            f"output.uri: the bucket {bucket!r} does not exist (got {m.output.uri!r}); create it, or name "
            "one these credentials can write to"
        )


def _check_output_is_a_folder(m: GenerateManifest) -> None:
    """A local output is a folder, or will be one: neither it nor a folder above it is a file."""
    out = _location(m.output.uri)
    if out.startswith("s3://"):
        return
    path = out
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
    if not os.path.isdir(path):
        what = "is a file" if path == out else f"lies under {path!r}, which is a file"
        raise ManifestError(f"output.uri: {m.output.uri!r} {what}, not a folder")


# --------------------------------------------------------------------------------------------
# Listing (a Ray task in the job; in-process for --dry-run)
# --------------------------------------------------------------------------------------------


@dataclass
class PlanSummary:
    """What the listing returns to the driver: O(shards + references), never the inputs."""

    n_inputs: int
    shard_sizes: list[int]
    blocks: list[dict]  # {name, first_shard, last_shard, rows}
    refs: list[dict]  # {uri, path, offset, size, error, set, domain}
    sets: list[dict]  # {name, domain, weight, start, count}
    error: str | None = None  # a ManifestError message (no images, key collision, …)
    probe: list[dict] = field(default_factory=list)  # HR input rows the domain start profile reads
    inputs_digest: str | None = None  # listing_digest of the sorted inputs and references


def ray_tar_indexer(tars: list[tuple[str, str]], extensions: tuple[str, ...], storage: Mapping | None):
    """Index WebDataset shards as Ray tasks (one per tar), results in order."""
    import ray

    # a tar whose storage stayed unavailable for index_tar's own retry budget is tried again
    task = ray.remote(index_tar).options(
        num_cpus=0.25, max_retries=5, retry_exceptions=[TransientStorageError]
    )
    pending = [task.remote(t, r, extensions, storage) for t, r in tars]
    return ray.get(pending)


def _listed(spec, storage: dict, key: str, map_tars) -> list[SourceItem]:
    try:
        items = list_source(spec, storage, map_tars=map_tars)
    except (SourceError, FileNotFoundError) as exc:
        raise _unlistable(exc, spec, key) from None
    if not items:
        raise _no_images(spec, key, storage)
    return items


def list_plan(
    m: GenerateManifest,
    *,
    store_uri: str | None,
    storage: dict,
    cluster_cpus: int = 1,
    use_ray: bool = True,
    cwd: str | None = None,
) -> PlanSummary:
    """List, sort, key and shard the inputs; write plan blocks into ``store_uri``'s work folder
    (``None``: write nothing, as --dry-run does); list the references.

    Runs in a Ray task in the job: the sorted input list lives only in that worker. ``cwd``: the
    driver's working folder, against which relative local source paths are resolved (they are
    recorded as written, so keys do not depend on where the job runs).
    """
    if cwd is not None and os.path.isdir(cwd) and os.getcwd() != cwd:
        here = os.getcwd()
        os.chdir(cwd)
        try:
            return list_plan(
                m, store_uri=store_uri, storage=storage, cluster_cpus=cluster_cpus, use_ray=use_ray
            )
        finally:
            os.chdir(here)
    map_tars: Callable | None = ray_tar_indexer if use_ray else None
    try:
        hr_items = _listed(m.hr, storage, "hr", map_tars)
        per = m.output.inputs_per_shard
        rows: list[dict] = []
        seen: dict[str, str] = {}
        for i, it in enumerate(hr_items):
            key = base_key(it.uri)
            if key in seen:  # 40 bits of sha256 collided (one file name in ~1M inputs): 64 bits for this one
                key = base_key(it.uri, digits=16)
            if key in seen:  # and 64 bits too: refuse rather than write duplicate keys
                raise ManifestError(f"hr.uri: inputs {seen[key]!r} and {it.uri!r} map to the same key {key}")
            seen[key] = it.uri
            rows.append({"shard": i // per, "input_index": i, "key": key, **it.to_row()})
        del seen
        refs: list[dict] = []
        sets: list[dict] = []
        for si, rs in enumerate(m.refs):
            items = _listed(rs.source, storage, f"refs[{si}].source", map_tars)
            sets.append(
                {"name": rs.name, "domain": rs.domain, "weight": rs.weight, "start": len(refs), "count": 0}
            )
            refs.extend({**it.to_row(), "set": rs.name, "domain": rs.domain} for it in items)
            sets[-1]["count"] = len(items)
    except ManifestError as exc:
        return PlanSummary(0, [], [], [], [], error=str(exc))
    n = len(rows)
    n_shards = (n + per - 1) // per
    if n_shards > MAX_SHARDS:  # NAME-NNNNNN.tar: six digits (the output contract)
        return PlanSummary(
            0,
            [],
            [],
            [],
            [],
            error=f"output.inputs_per_shard: {n} inputs make {n_shards} shards, more than the {MAX_SHARDS} "
            f"that six-digit shard names allow; raise it to at least {-(-n // MAX_SHARDS)}",
        )
    shard_sizes = [min(per, n - s * per) for s in range(n_shards)]
    size = block_inputs_for(n, cluster_cpus, m.compute.decode_batch_size)
    blocks = []
    store = DatasetStore(store_uri, storage) if store_uri else None
    prefix = work_prefix(manifest_digest(m))
    inputs_digest = listing_digest(rows, refs)
    for b, start in enumerate(range(0, n, size)):
        part = rows[start : start + size]
        name = f"{prefix}/plan/inputs-{b:06d}.parquet"
        if store is not None:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(part, schema=PLAN_SCHEMA), buf)
            store.write_bytes(name, buf.getvalue())
        blocks.append(
            {
                "name": name,
                "first_shard": part[0]["shard"],
                "last_shard": part[-1]["shard"],
                "rows": len(part),
            }
        )
    return PlanSummary(
        n, shard_sizes, blocks, refs, sets, probe=probe_rows(m, rows), inputs_digest=inputs_digest
    )


LISTING_DIGEST_PREFIX = "listing2:sha256:"  # v2 covers the references too ("sha256:": inputs only)


def listing_digest(rows: list[dict], refs: list[dict] = ()) -> str:
    """Digest of the sorted input listing (each input's key and URI, in order) and of the
    references (each one's set and URI, in order). Shards are cut from the input order and tiles are
    paired by reference position, so a dataset is resumed only into the listing it was written from:
    an input added, removed or renamed under ``hr.uri`` changes which inputs every later shard
    holds, a reference added or removed changes every later pairing."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r['key']}\t{r['uri']}\n".encode())
    h.update(b"references\n")
    for r in refs:
        h.update(f"{r['set']}\t{r['uri']}\n".encode())
    return LISTING_DIGEST_PREFIX + h.hexdigest()


REFERENCES_DIGEST_PREFIX = "refs2:sha256:"  # v2 covers each reference's listed size ("refs:": set + URI)


def references_digest(refs: Sequence[Mapping]) -> str | None:
    """Digest of the references that decoded (set, URI and listed size, in order): what the samples
    are paired over. A reference that fails to decode is dropped at run time, so one that fails in
    one run and not in another (a permission error, a file replaced) pairs the tiles differently, and
    one replaced by another picture under the same name (another size) pairs them with other content;
    a run whose digest differs from a complete shard's is refused. A reference E_deg read from its
    centre crop (``crop``: larger than ``REFERENCE_MAX_SIDE``, since 2026-12-08) is marked, so a
    dataset that embedded it whole is not resumed with its crop's vector. None when there are no
    references."""
    if not refs:
        return None
    h = hashlib.sha256()
    for r in refs:
        crop = f"\tcrop{r['crop']}" if r.get("crop") else ""
        h.update(f"{r['set']}\t{r['uri']}\t{r.get('size')}{crop}\n".encode())
    return REFERENCES_DIGEST_PREFIX + h.hexdigest()


def start_digest(profiles: Mapping[str, Mapping]) -> str | None:
    """Digest of the start each reference domain chose (``generator.start_choice: domain``): the bank
    entry every sample of the domain starts from. It is measured again on each run from the probe HR
    inputs, so a probe that decoded in one run and fails in another can change it; a run whose digest
    differs from a complete shard's is refused. None when no domain start is chosen."""
    if not profiles:
        return None
    h = hashlib.sha256()
    for key in sorted(profiles):
        h.update(f"{key}\t{int(profiles[key]['chosen'])}\n".encode())
    return "start:sha256:" + h.hexdigest()


def probe_rows(m: GenerateManifest, rows: list[dict]) -> list[dict]:
    """The HR inputs a domain start profile is measured on (``generator.start_choice: domain``):
    ``start_probe_tiles`` rows evenly spaced over the sorted inputs (the same ones on every run of the
    plan); none when the job does not choose its start per domain."""
    g = m.generator
    if g.kind != "realdgen" or g.start_kind != "domain" or g.start_choice != "domain" or not rows:
        return []
    n = min(int(g.start_probe_tiles), len(rows))
    return [rows[(j * len(rows)) // n] for j in range(n)]


def read_plan_block(batch: pa.Table, config: PlanReadConfig | Mapping[str, Any]) -> pa.Table:
    """Ray Data stage: plan block names → their input rows, minus shards already complete."""
    config = PlanReadConfig.of(config)
    store = DatasetStore(config.store, config.storage)
    skip = set(config.skip_shards)
    tables = []
    for name in batch.column("name").to_pylist():
        t = read_parquet(store.read_bytes(name), schema=PLAN_SCHEMA)
        if skip:
            keep = [s not in skip for s in t.column("shard").to_pylist()]
            t = t.filter(pa.array(keep, pa.bool_()))
        tables.append(t)
    return pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()


# --------------------------------------------------------------------------------------------
# The plan the job runs
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything decided before any pixel is generated: O(shards + references) on the driver."""

    manifest: GenerateManifest
    digest: str
    model_digest: str | None
    checkpoint_local: str | None
    n_inputs: int = 0
    shard_sizes: list[int] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    refs: list[dict] = field(default_factory=list)
    sets: list[dict] = field(default_factory=list)
    probe: list[dict] = field(default_factory=list)
    start_profiles: dict = field(default_factory=dict)  # profile key → domain start profile (job)
    # references that did not decode ({"count", "first": ["URI: reason", …]}); None: not read
    references_skipped: dict | None = None
    listed: bool = False
    inputs_digest: str | None = None
    generator_note: str | None = None  # where a realdgen job's τ and start come from (generator_note)

    @property
    def stems(self) -> list[str]:
        return [shard_stem(self.manifest.output.name, s) for s in range(len(self.shard_sizes))]

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def work(self) -> str:
        return work_prefix(self.digest)

    def with_listing(self, s: PlanSummary) -> Plan:
        if s.error:
            raise ManifestError(s.error)
        self.n_inputs, self.shard_sizes, self.blocks = s.n_inputs, s.shard_sizes, s.blocks
        self.refs, self.sets, self.listed = s.refs, s.sets, True
        self.probe, self.inputs_digest = s.probe, s.inputs_digest
        return self


def make_plan(m: GenerateManifest, *, list_now: bool = True, domain_note: bool = True) -> Plan:
    """Preflight, and (``list_now``) list in this process without writing anything (--dry-run);
    ``domain_note``: see :func:`preflight`."""
    from pipelines.storage import storage_kwargs

    m, digest, local, model_digest, note = preflight(m, domain_note=domain_note)
    plan = Plan(m, digest, model_digest, local, generator_note=note)
    if list_now:
        plan.with_listing(list_plan(m, store_uri=None, storage=storage_kwargs(m.storage), use_ray=False))
    return plan
