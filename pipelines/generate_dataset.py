"""The generation job: HR content + real LR references → paired WebDataset shards (ARCHITECTURE §5).

    python pipelines/generate_dataset.py manifests/demo.yaml            # embedded local Ray
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python pipelines/generate_dataset.py manifests/cluster.yaml     # on a cluster

Flow: validate the manifest and check its paths → plan (sorted inputs, shards of
``output.inputs_per_shard`` inputs, keys) → look at the output (resume / refuse / overwrite) →
take the output lock → prepare the reference bank once (a Ray task; E_deg embeddings for
realdgen, put in the object store) → Ray Data: ``from_items(pending inputs)`` →
``DecodeTile`` (CPU tasks) → ``GenerateLR`` (actor pool, one GPU per actor or CPU actors) →
``EncodeSample`` (CPU tasks) → the driver streams rows, groups them per shard and writes a
shard (tar, parquet, then ``_stats.json`` last) as soon as all its inputs have reported →
``_index.json`` → preview and summary. See docs/generate.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo importable here and in workers
    _ROOT = str(Path(__file__).resolve().parent.parent)
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.manifest import (  # noqa: E402
    GenerateManifest,
    ManifestError,
    load_manifest,
    manifest_digest,
    manifest_json_schema,
)
from pipelines.progress import JobProgress  # noqa: E402
from pipelines.sources import ImageError, SourceError, SourceItem, list_source, load_image  # noqa: E402
from pipelines.stages import (  # noqa: E402
    GenerateLR,
    base_key,
    decode_tile_batch,
    encode_sample_batch,
    error_category,
)
from pipelines.storage import (  # noqa: E402
    INDEX_NAME,
    PREVIEW_NAME,
    DatasetStore,
    RunLock,
    fetch_to_local,
    get_fs,
    shard_stem,
    storage_kwargs,
)

__all__ = ["Plan", "GenerateJob", "JobFailed", "run", "main"]

MAX_ERROR_CATEGORIES = 20


def decode_task_memory(max_image_pixels: int) -> int:
    """Bytes reserved per decode task: the largest admitted image decoded (RGB, 3 B/px) about three
    times over (file bytes, PIL's decode, the converted array), at least 512 MiB. Ray measured
    ~318 MiB for the demo's photos, above the 256 MiB first reserved here."""
    return max(512 * 2**20, 9 * int(max_image_pixels))


def quiet_ray_data_progress() -> None:
    """Send Ray Data's progress-module records to Ray Data's session log file only.

    The job turns Ray Data's progress bars off because it shows its own progress; Ray Data's
    progress module then logs, once, a warning that its bars are disabled. Its records go to the
    ``ray-data.log`` file handler that Ray Data's logging configuration attaches to ``ray.data``
    (or nowhere, under a custom configuration without one); every other Ray Data record keeps its
    console handler.
    """
    try:
        from ray.data._internal.logging import SessionFileHandler
    except ImportError:  # another Ray layout: leave Ray Data's logging as it is
        return
    files = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, SessionFileHandler)]
    progress = logging.getLogger("ray.data._internal.progress")
    progress.propagate = False
    for h in files:
        if h not in progress.handlers:
            progress.addHandler(h)


@contextlib.contextmanager
def native_stderr_to(path: str | None):
    """While inside: native writes to file descriptor 2 go to ``path``; Python's ``sys.stderr``
    (the job's progress and messages, Ray's Python loggers, tracebacks) keeps the console.

    Ray core's C++ logger in a driver writes every ERROR record both to the driver's log file
    (``python-core-driver-*.log`` in the session's log folder) and to stderr, unlike Ray's other
    processes, whose native stderr Ray itself sends to files. Ray Data creates its actors with
    restarts on and its own state as object-store arguments, for which Ray core logs an
    ``E core_worker.cc`` line per driver (ray-project/ray #53727, #57733) that a user cannot act
    on. Sending the driver's native stderr to a file in the same log folder keeps such records
    (a copy of what the driver log holds) off the console and out of ``ray job logs``; worker
    errors still reach both, as Python exceptions and Ray Data's log records. ``None``: no change.
    """
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    console = open(os.dup(2), "w", buffering=1, errors="backslashreplace")  # noqa: SIM115
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    previous = sys.stderr
    # Logging handlers created earlier (Ray's own among them) hold the old stderr object.
    handlers = [
        h
        for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for h in getattr(lg, "handlers", [])
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is previous
    ]
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = console
    for h in handlers:
        h.setStream(console)
    try:
        yield
    finally:
        console.flush()
        for h in handlers:
            h.setStream(previous)
        sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)
        console.close()


def driver_native_log_path() -> str | None:
    """``realdgen-driver-<pid>.err`` in this Ray session's log folder, or None when unknown."""
    try:
        import ray

        logs = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:
        return None
    return os.path.join(logs, f"realdgen-driver-{os.getpid()}.err")


PARQUET_SCHEMA = pa.schema(
    [
        ("input_index", pa.int64()),
        ("row_type", pa.string()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("samples", pa.int64()),
        ("samples_failed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
    ]
)


class JobFailed(RuntimeError):
    """The job ran but must exit non-zero (failure budget exceeded, output refused, …)."""


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything decided before any pixel is generated; a pure function of the manifest + inputs."""

    manifest: GenerateManifest
    digest: str
    model_digest: str | None
    checkpoint_local: str | None
    inputs: list[dict]  # {shard, input_index, key, uri, path, offset, size}
    refs: list[dict]  # {uri, path, offset, size, set, domain}
    sets: list[dict]  # {name, domain, weight, start, count}
    stems: list[str]

    @property
    def n_shards(self) -> int:
        return len(self.stems)

    def shard_inputs(self, shard: int) -> list[dict]:
        n = self.manifest.output.inputs_per_shard
        return self.inputs[shard * n : (shard + 1) * n]


def _list(spec, storage: dict, key: str) -> list[SourceItem]:
    try:
        items = list_source(spec, storage)
    except SourceError as exc:
        raise ManifestError(f"{key}.uri: {exc} (got {spec.uri!r})") from None
    except FileNotFoundError as exc:
        raise ManifestError(f"{key}.uri: not found: {exc} (got {spec.uri!r})") from None
    except Exception as exc:
        raise ManifestError(
            f"{key}.uri: cannot be listed: {type(exc).__name__}: {exc} (got {spec.uri!r})"
        ) from None
    if not items:
        raise ManifestError(
            f"{key}.uri: no images found (got {spec.uri!r}, extensions {list(spec.extensions)})"
        )
    return items


def _checkpoint_info(m: GenerateManifest, storage: dict) -> tuple[str | None, str | None, dict | None]:
    """(local path, model digest, domain calibration or None) of a realdgen manifest's checkpoint."""
    if m.generator.kind != "realdgen":
        return None, None, None
    uri = m.generator.checkpoint
    assert uri is not None
    fs, path = get_fs(uri, storage)
    if not fs.exists(path):
        raise ManifestError(f"generator.checkpoint: file not found (got {uri!r})")
    local = fetch_to_local(uri, storage)
    try:
        from safetensors import safe_open

        from realdgen_core.checkpoint import checkpoint_digest

        with safe_open(local, framework="pt") as f:
            meta = f.metadata() or {}
        config = json.loads(meta.get("config", "{}"))
        digest = checkpoint_digest(local)
    except Exception as exc:
        raise ManifestError(f"generator.checkpoint: not a RealDGen checkpoint: {exc} (got {uri!r})") from None
    if config.get("scale") not in (None, m.scale):
        raise ManifestError(f"scale: the checkpoint is x{config.get('scale')} (got {m.scale})")
    return local, digest, _calibration_of(meta)


def _calibration_of(meta: dict) -> dict | None:
    """The domain calibration in a checkpoint's safetensors metadata (realdgen_core.calibrate) or None."""
    from realdgen_core.calibrate import METADATA_KEY, DomainCalibration

    try:
        cal = json.loads(meta.get("metadata", "{}")).get(METADATA_KEY)
        return None if cal is None else DomainCalibration.from_dict(cal).to_dict()
    except (ValueError, AttributeError) as exc:
        raise ManifestError(f"generator.checkpoint: invalid domain calibration: {exc}") from None


def _checkpoint_calibration(local: str) -> dict | None:
    """The domain calibration recorded in the checkpoint file ``local``, or None."""
    from safetensors import safe_open

    with safe_open(local, framework="pt") as f:
        return _calibration_of(f.metadata() or {})


def make_plan(m: GenerateManifest) -> Plan:
    """List inputs and references (sorted), assign shards and keys; raises ManifestError early."""
    storage = storage_kwargs(m.storage)
    if m.demo_inputs:
        from pipelines.demo_data import prepare_demo_inputs

        prepare_demo_inputs(m.demo_inputs, scale=m.scale)
    checkpoint_local, model_digest, calibration = _checkpoint_info(m, storage)
    try:
        m = m.model_copy(update={"generator": m.generator.resolved(calibration)})
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"generator: {exc}") from None
    hr_items = _list(m.hr, storage, "hr")
    per = m.output.inputs_per_shard
    inputs = []
    seen: dict[str, str] = {}
    for i, it in enumerate(hr_items):
        key = base_key(it.uri)
        if key in seen:  # 40 bits of sha256 collided: refuse rather than write duplicate keys
            raise ManifestError(f"hr.uri: inputs {seen[key]!r} and {it.uri!r} map to the same key {key}")
        seen[key] = it.uri
        inputs.append({"shard": i // per, "input_index": i, "key": key, **it.to_row()})
    refs: list[dict] = []
    sets: list[dict] = []
    for si, rs in enumerate(m.refs):
        items = _list(rs.source, storage, f"refs[{si}].source")
        sets.append(
            {"name": rs.name, "domain": rs.domain, "weight": rs.weight, "start": len(refs), "count": 0}
        )
        for it in items:
            refs.append({**it.to_row(), "set": rs.name, "domain": rs.domain})
        sets[-1]["count"] = len(items)
    n_shards = (len(inputs) + per - 1) // per
    stems = [shard_stem(m.output.name, s) for s in range(n_shards)]
    return Plan(m, manifest_digest(m), model_digest, checkpoint_local, inputs, refs, sets, stems)


# --------------------------------------------------------------------------------------------
# Reference bank (one Ray task: validate refs, embed them for realdgen)
# --------------------------------------------------------------------------------------------


def prepare_references(
    refs: list[dict], kind: str, checkpoint: str | None, storage: dict, max_pixels: int, device: str
) -> tuple[list[int], list[str], np.ndarray | None]:
    """Decode every reference once: ``(ok indices, failure reasons, E_deg bank [n_ok, D] or None)``."""
    import torch

    ok: list[int] = []
    errors: list[str] = []
    images = []
    for i, r in enumerate(refs):
        try:
            img = load_image(SourceItem.from_row(r), storage, max_pixels=max_pixels)
        except ImageError as exc:
            errors.append(f"{r['uri']}: {exc.reason}")
            continue
        ok.append(i)
        if kind == "realdgen":
            images.append(torch.from_numpy(img).permute(2, 0, 1).float().div(255.0))
    bank = None
    if kind == "realdgen" and images:
        from realdgen_core.generator import LRGenerator

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = LRGenerator.from_checkpoint(fetch_to_local(checkpoint, storage), device=device)
        bank = gen.degradation_embeddings(images).numpy().astype(np.float32)
    return ok, errors, bank


# --------------------------------------------------------------------------------------------
# Shard assembly and writing
# --------------------------------------------------------------------------------------------


@dataclass
class ShardState:
    index: int
    expected_inputs: int
    reports: dict[int, dict] = field(default_factory=dict)
    samples: dict[str, dict] = field(default_factory=dict)
    expected_samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def complete(self) -> bool:
        return len(self.reports) == self.expected_inputs and len(self.samples) == self.expected_samples


class ShardWriter:
    """Writes one complete shard: tar (atomic), parquet, then ``_stats.json`` last."""

    def __init__(self, store: DatasetStore, plan: Plan) -> None:
        self.store = store
        self.plan = plan

    def write(self, state: ShardState) -> dict:
        from realdgen_core.shards import write_tar

        t0 = time.perf_counter()
        stem = self.plan.stems[state.index]
        ok = [s for s in state.samples.values() if s["status"] == "ok"]
        failed = [s for s in state.samples.values() if s["status"] != "ok"]
        members = [
            {"__key__": s["key"], "hr.png": s["hr_png"], "json": s["json"], "lr.png": s["lr_png"]} for s in ok
        ]
        buf = io.BytesIO()
        nbytes = write_tar(members, buf)
        self.store.write_bytes(f"{stem}.tar", buf.getvalue())

        failed_by_input = Counter(s["input_index"] for s in failed)
        rows = []
        inputs_failed = 0
        errors: Counter[str] = Counter()
        for idx in sorted(state.reports):
            rep = state.reports[idx]
            n_fail = failed_by_input.get(idx, 0)
            status = rep["status"]
            if status == "ok" and n_fail:
                status = "failed" if n_fail == rep["n_samples"] else "partial"
            if status == "failed":
                inputs_failed += 1
            if rep.get("error"):
                errors[error_category(rep["error"])] += 1
            rows.append(
                {
                    "input_index": idx,
                    "row_type": "input",
                    "key": rep["key"],
                    "uri": rep["uri"],
                    "status": status,
                    "error": rep.get("error"),
                    "samples": (rep.get("n_samples") or 0) - n_fail,
                    "samples_failed": n_fail,
                    "width": rep.get("width"),
                    "height": rep.get("height"),
                }
            )
        for s in sorted(failed, key=lambda r: r["key"]):
            errors[error_category(s.get("error"))] += 1
            rows.append(
                {
                    "input_index": s["input_index"],
                    "row_type": "sample",
                    "key": s["key"],
                    "uri": s["uri"],
                    "status": "failed",
                    "error": s.get("error"),
                    "samples": 0,
                    "samples_failed": 1,
                    "width": s.get("width"),
                    "height": s.get("height"),
                }
            )
        rows.sort(key=lambda r: (r["input_index"], r["row_type"] != "input", r["key"]))
        table = pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA)
        pbuf = io.BytesIO()
        pq.write_table(table, pbuf, compression="zstd")
        self.store.write_bytes(f"{stem}.parquet", pbuf.getvalue())

        top = errors.most_common(MAX_ERROR_CATEGORIES)
        hist = dict(top)
        rest = sum(errors.values()) - sum(hist.values())
        if rest:
            hist["other"] = rest
        reports = state.reports.values()
        stats = {
            "shard": stem,
            "manifest_digest": self.plan.digest,
            "model_digest": self.plan.model_digest,
            "generator": self.plan.manifest.generator.kind,
            "inputs": state.expected_inputs,
            "inputs_failed": inputs_failed,
            "samples": len(ok),
            "samples_failed": len(failed),
            "bytes": nbytes,
            "errors": hist,
            "timings": {
                "decode_s": round(sum(r.get("seconds") or 0.0 for r in reports), 4),
                "generate_s": round(sum(s.get("seconds") or 0.0 for s in state.samples.values()), 4),
                "shard_wall_s": round(time.perf_counter() - state.started, 4),
                "write_s": round(time.perf_counter() - t0, 4),
            },
            "host": socket.gethostname(),
            "finished_at": time.time(),
        }
        self.store.write_json(f"{stem}_stats.json", stats)
        return stats


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def ensure_ray() -> bool:
    """Connect to ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local Ray on loopback.

    Returns True when this call started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    root = str(Path(__file__).resolve().parent.parent)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False, configure_logging=False)
    else:
        # Workers of the embedded Ray inherit this environment: make the repo importable there.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        # Ray turns token authentication on for a new local cluster when RAY_AUTH_MODE is unset
        # and prints a notice saying so; choosing it explicitly keeps it on, without the notice
        # (RAY_AUTH_MODE=disabled in the environment still opts out). Ray's config read the
        # environment when ray was imported: refresh it as Ray does when it turns the mode on.
        if "RAY_AUTH_MODE" not in os.environ:
            try:
                from ray._raylet import Config
            except ImportError:  # another Ray layout: keep Ray's default (and its notice)
                Config = None
            if Config is not None:
                os.environ["RAY_AUTH_MODE"] = "token"
                Config.initialize("")
        ray.init(
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    return True


class GenerateJob:
    """Run one generate manifest. ``run()`` returns the summary dict or raises :class:`JobFailed`."""

    def __init__(self, manifest: GenerateManifest, *, log=print, native_stderr_to_log: bool = False) -> None:
        self.m = manifest
        self.log = log
        # The CLI sends the driver's native stderr to the Ray session's log folder while the
        # pipeline runs (see native_stderr_to); library callers keep their streams as they are.
        self.native_stderr_to_log = native_stderr_to_log
        self.storage = storage_kwargs(manifest.storage)
        self.store = DatasetStore(manifest.output.uri, self.storage)

    # ---------------------------------------------------------------- output inspection
    def _dataset_names(self, names: Iterable[str]) -> list[str]:
        return [
            n
            for n in names
            if n.endswith((".tar", ".parquet", "_stats.json")) or n in (INDEX_NAME, PREVIEW_NAME)
        ]

    def inspect_output(self, plan: Plan) -> set[str]:
        """Stems already complete for this digest; refuses (or clears, with overwrite) foreign output."""
        names = self.store.names()
        foreign: list[str] = []
        complete: set[str] = set()
        for n in names:
            if not (n.endswith("_stats.json") or n == INDEX_NAME):
                continue
            try:
                digest = self.store.read_json(n).get("manifest_digest")
            except Exception:
                digest = None
            if digest != plan.digest:
                foreign.append(n)
            elif n.endswith("_stats.json"):
                complete.add(n.removesuffix("_stats.json"))
        stray = [n for n in names if n.endswith(".tar") and n.removesuffix(".tar") not in plan.stems]
        if foreign or stray:
            if self.m.output.mode != "overwrite":
                what = (foreign or stray)[:3]
                raise JobFailed(
                    f"output {self.store.uri} holds a dataset written from a different manifest "
                    f"(e.g. {what}); use output.mode: overwrite (or --set output.mode=overwrite) "
                    "to replace it, or choose another output.uri"
                )
            for n in self._dataset_names(names):
                self.store.delete(n)
            self.log(f"overwrite: removed {len(self._dataset_names(names))} files of a previous dataset")
            return set()
        return complete & set(plan.stems)

    # ---------------------------------------------------------------- describe
    def describe(
        self, plan: Plan, complete: set[str] | None = None, actors: tuple[int, int] | None = None
    ) -> dict:
        m = self.m
        return {
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
            "generator": m.generator.kind,
            "inputs": len(plan.inputs),
            "references": len(plan.refs),
            "reference_sets": [{k: s[k] for k in ("name", "domain", "weight", "count")} for s in plan.sets],
            "tile_lr": m.tiling.tile,
            "tile_hr": m.tiling.tile * m.scale,
            "max_pairs": len(plan.inputs) * m.tiling.max_tiles_per_image * m.pairing.refs_per_tile,
            "pairing": m.pairing.mode,
            "shards": plan.n_shards,
            "shards_complete": len(complete or ()),
            "inputs_per_shard": m.output.inputs_per_shard,
            "output": m.output.uri,
            "actors": {"min": actors[0], "max": actors[1]} if actors else None,
            "batch_size": m.compute.batch_size,
        }

    # ---------------------------------------------------------------- run
    def _pool(self) -> tuple[int, int, float, float, int]:
        """(min actors, max actors, num_gpus per actor, num_cpus per actor, cluster CPUs)."""
        import ray

        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        c = self.m.compute
        use_gpu = c.device == "cuda" or (c.device == "auto" and gpus > 0)
        lo = c.actors.min
        hi = c.actors.max or (max(lo, gpus) if use_gpu else lo)
        if use_gpu:
            return lo, hi, 1.0, 1.0, cpus
        # CPU actors must leave room for at least one decode/encode task, or the pipeline stalls.
        actor_cpus = c.actor_num_cpus
        room = cpus - c.task_num_cpus
        if hi * actor_cpus > room:
            actor_cpus = max(0.01, room / hi) if room > 0 else 0.01
            self.log(
                f"note: {hi} CPU actor(s) x {c.actor_num_cpus} CPU leave no room on {cpus} CPUs; "
                f"using {actor_cpus:.2f} CPU per actor"
            )
        return lo, hi, 0.0, actor_cpus, cpus

    def run(self, plan: Plan | None = None) -> dict:
        import ray

        m = self.m
        t_start = time.perf_counter()
        plan = plan or make_plan(m)
        self.plan = plan
        # The plan's manifest has the generator settings resolved (domain calibration or paper).
        self.m = m = plan.manifest
        started_ray = ensure_ray()
        lock = RunLock(self.store, heartbeat_s=m.progress.heartbeat_s)
        try:
            lock.acquire()
        except Exception as exc:
            if started_ray:
                ray.shutdown()
            raise JobFailed(str(exc)) from None
        try:
            self.store.clean_temporaries()
            complete = self.inspect_output(plan)
            return self._run(plan, complete, t_start)
        finally:
            lock.release()
            if started_ray:
                ray.shutdown()

    def _checkpoint_for_workers(self, plan: Plan) -> str | None:
        """Absolute local path (same machine or shared FS) or the s3 URI each worker fetches."""
        uri = self.m.generator.checkpoint
        if uri is None:
            return None
        return uri if uri.startswith("s3://") else plan.checkpoint_local

    def _prepare_refs(self, plan: Plan, num_gpus: float) -> tuple[list[dict], list[dict], Any]:
        import ray

        m = self.m
        if not plan.refs:
            return [], plan.sets, None
        task = ray.remote(prepare_references).options(num_returns=3, num_gpus=num_gpus, num_cpus=1)
        ok_ref, err_ref, bank_ref = task.remote(
            plan.refs,
            m.generator.kind,
            self._checkpoint_for_workers(plan),
            self.storage,
            m.limits.max_image_pixels,
            m.compute.device,
        )
        ok, errors = ray.get([ok_ref, err_ref])
        for e in errors[:10]:
            self.log(f"reference skipped: {e}")
        if len(errors) > 10:
            self.log(f"... and {len(errors) - 10} more references skipped")
        if not ok:
            raise JobFailed("no usable reference: every reference image failed to decode")
        refs = [plan.refs[i] for i in ok]
        sets = []
        for s in plan.sets:
            count = sum(1 for r in refs if r["set"] == s["name"])
            start = next((j for j, r in enumerate(refs) if r["set"] == s["name"]), 0)
            sets.append({**s, "start": start, "count": count})
        return refs, sets, bank_ref if m.generator.kind == "realdgen" else None

    def _run(self, plan: Plan, complete: set[str], t_start: float) -> dict:
        import ray

        m = self.m
        lo, hi, num_gpus, actor_cpus, _ = self._pool()
        pending_shards = [i for i, s in enumerate(plan.stems) if s not in complete]
        self.log(
            f"plan: {len(plan.inputs)} inputs, {len(plan.refs)} references, {plan.n_shards} shards "
            f"({len(complete)} complete, {len(pending_shards)} to write), generator {m.generator.kind}, "
            f"actors {lo}..{hi} ({'GPU' if num_gpus else 'CPU'})"
        )
        refs, sets, bank_ref = self._prepare_refs(plan, num_gpus)
        if refs and len(refs) != len(plan.refs):
            plan.refs, plan.sets = refs, sets
        writer = ShardWriter(self.store, plan)
        states: dict[int, ShardState] = {i: ShardState(i, len(plan.shard_inputs(i))) for i in pending_shards}
        pending_rows = [
            {k: r.get(k) for k in ("shard", "input_index", "key", "uri", "path", "offset", "size", "error")}
            for i in pending_shards
            for r in plan.shard_inputs(i)
        ]
        written: list[dict] = []
        preview_rows: list[dict] = []
        total_inputs = len(plan.inputs)
        failed_inputs = 0
        for stem in complete:
            try:
                failed_inputs += int(self.store.read_json(f"{stem}_stats.json").get("inputs_failed", 0))
            except Exception:
                pass
        budget = m.limits.max_failure_fraction

        decode_cfg = {
            "seed": m.seed,
            "scale": m.scale,
            "tile": m.tiling.tile,
            "tiling_mode": m.tiling.mode,
            "max_tiles": m.tiling.max_tiles_per_image,
            "max_pixels": m.limits.max_image_pixels,
            "max_bytes": m.limits.max_file_bytes,
            "storage": self.storage,
            "pairing": {"mode": m.pairing.mode, "refs_per_tile": m.pairing.refs_per_tile},
            "refs": [{"uri": r["uri"], "set": r["set"], "domain": r["domain"]} for r in plan.refs],
            "sets": plan.sets,
        }
        # x_start in the CPU decode tasks for the synthetic start kinds (a start chosen against the
        # reference, e.g. a domain calibration, stays with the generator).
        synthetic_start = m.generator.start_kind in ("realesrgan", "bsrgan", "bicubic")
        if m.generator.kind == "realdgen" and m.compute.starts_in_decode and synthetic_start:
            decode_cfg["starts"] = {
                "k": m.generator.k,
                "tau_min": m.generator.tau_min,
                "tau_max": m.generator.tau_max,
                "start_kind": m.generator.start_kind,
            }
        gen_cfg = {
            "kind": m.generator.kind,
            "scale": m.scale,
            "checkpoint": self._checkpoint_for_workers(plan),
            "storage": self.storage,
            "device": "cuda" if num_gpus else "cpu",
            "k": m.generator.k,
            "tau_min": m.generator.tau_min,
            "tau_max": m.generator.tau_max,
            "weights": (m.generator.content_weight, m.generator.degradation_weight),
            "start_kind": m.generator.start_kind,
            "filter_norm": bool(m.generator.filter_norm),
            "start_bank": m.generator.start_bank,
            "rows_per_call": m.generator.rows_per_call,
            "sampler": m.generator.sampler_config().to_dict(),
            "precision": m.generator.precision,
            "channels_last": m.generator.channels_last,
            "compile": m.generator.compile,
            "ref_bank": bank_ref,
            "torch_threads": m.compute.torch_threads or max(1, int(actor_cpus)),
        }

        t_gen = time.perf_counter()
        n_pairs = 0
        n_samples_failed = 0
        if pending_rows:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            # The job shows its own progress (samples, pairs/s: pipelines/progress.py); Ray Data's
            # progress module then only says that its bars are off, which belongs in its log file.
            ctx.enable_progress_bars = False
            quiet_ray_data_progress()
            ctx.execution_options.preserve_order = False
            c = m.compute
            ds = ray.data.from_items(
                pending_rows, override_num_blocks=max(1, len(pending_rows) // c.decode_batch_size)
            )
            ds = ds.map_batches(
                decode_tile_batch,
                fn_kwargs={"config": decode_cfg},
                # A memory reservation for decoding (images up to limits.max_image_pixels) that also
                # keeps decode a separate CPU task stage: Ray Data fuses a task stage into the
                # following actor stage whenever their resource requests are equal.
                memory=decode_task_memory(m.limits.max_image_pixels),
                batch_size=c.decode_batch_size,
                batch_format="pyarrow",
                num_cpus=c.task_num_cpus,
            )
            ds = ds.map_batches(
                GenerateLR,
                fn_constructor_kwargs={"config": gen_cfg},
                batch_size=c.batch_size,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                num_gpus=num_gpus or None,
                num_cpus=actor_cpus if not num_gpus else 1,
            )
            ds = ds.map_batches(
                encode_sample_batch,
                fn_kwargs={"config": {"scale": m.scale}},
                # Never wait for more rows than one generation batch yields: a larger bundle holds
                # finished samples back from the driver (and from the progress display).
                batch_size=min(c.encode_batch_size, c.batch_size),
                batch_format="pyarrow",
                num_cpus=c.task_num_cpus,
            )
            console = contextlib.ExitStack()
            console.enter_context(
                native_stderr_to(driver_native_log_path() if self.native_stderr_to_log else None)
            )
            bar = JobProgress(
                len(pending_rows),
                m.tiling.max_tiles_per_image * m.pairing.refs_per_tile,
                enabled=m.progress.bar,
                interval_s=m.progress.interval_s,
            )
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    for row in batch.to_pylist():
                        st = states[row["shard"]]
                        if row["row_type"] == "input":
                            st.reports[row["input_index"]] = row
                            st.expected_samples += row.get("n_samples") or 0
                            if row["status"] != "ok":
                                failed_inputs += 1
                            bar.input_reported(row.get("n_samples"), row["status"] == "ok")
                        else:
                            st.samples[row["key"]] = row
                            bar.sample_done(row["status"] == "ok")
                        if st.complete():
                            stats = writer.write(st)
                            written.append(stats)
                            n_pairs += stats["samples"]
                            n_samples_failed += stats["samples_failed"]
                            if len(preview_rows) < m.output.preview_rows:
                                ok = sorted(
                                    (s for s in st.samples.values() if s["status"] == "ok"),
                                    key=lambda r: r["key"],
                                )
                                preview_rows.extend(ok[: m.output.preview_rows - len(preview_rows)])
                            del states[row["shard"]]
                        if failed_inputs > budget * total_inputs:
                            raise JobFailed(
                                f"failure budget exceeded: {failed_inputs} of {total_inputs} inputs failed "
                                f"(limits.max_failure_fraction = {budget}); see the shards' parquet files"
                            )
            finally:
                bar.close()
                console.close()
        gen_wall = time.perf_counter() - t_gen
        if states:
            raise JobFailed(f"{len(states)} shard(s) never completed: {sorted(states)[:5]}")

        index = self.write_index(plan)
        summary = {
            "output": self.store.uri,
            "generator": m.generator.kind,
            "pairs": n_pairs,
            "total_samples": index["total_samples"],
            "shards_written": len(written),
            "shards_skipped": len(complete),
            "shards": plan.n_shards,
            "inputs": total_inputs,
            "inputs_failed": failed_inputs,
            "samples_failed": n_samples_failed,
            "seconds": round(time.perf_counter() - t_start, 2),
            "generate_seconds": round(gen_wall, 2),
            "pairs_per_s": round(n_pairs / gen_wall, 3) if gen_wall > 0 and n_pairs else 0.0,
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
        }
        if m.output.preview and preview_rows:
            try:
                self.write_preview(preview_rows)
                summary["preview"] = f"{self.store.uri}/{PREVIEW_NAME}"
            except Exception as exc:  # a preview is a convenience, never a failure
                self.log(f"preview skipped: {exc}")
        if failed_inputs > budget * total_inputs:
            raise JobFailed(
                f"failure budget exceeded: {failed_inputs} of {total_inputs} inputs failed "
                f"(limits.max_failure_fraction = {budget})"
            )
        return summary

    # ---------------------------------------------------------------- index and preview
    def write_index(self, plan: Plan) -> dict:
        shards = []
        inputs_failed = 0
        for stem in plan.stems:
            stats = self.store.read_json(f"{stem}_stats.json")
            shards.append({"name": f"{stem}.tar", "samples": stats["samples"], "bytes": stats["bytes"]})
            inputs_failed += stats.get("inputs_failed", 0)
        index = {
            "shards": shards,
            "total_samples": sum(s["samples"] for s in shards),
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
            "generator": self.m.generator.kind,
            "scale": self.m.scale,
            "inputs": len(plan.inputs),
            "inputs_failed": inputs_failed,
        }
        self.store.write_json(INDEX_NAME, index)
        return index

    def write_preview(self, rows: list[dict]) -> None:
        from PIL import Image

        from realdgen_core.shards import decode_png

        tiles = []
        for r in rows:
            hr = decode_png(r["hr_png"])
            lr = decode_png(r["lr_png"])
            t = hr.shape[0]
            lr_up = np.asarray(Image.fromarray(lr).resize((t, t), Image.Resampling.NEAREST))
            ref_panel = np.full_like(hr, 128)
            if r.get("ref_source"):
                try:
                    ref = next(x for x in self.plan.refs if x["uri"] == r["ref_source"])
                    img = load_image(SourceItem.from_row(ref), self.storage)
                    im = Image.fromarray(img)
                    im.thumbnail((t, t), Image.Resampling.NEAREST)
                    a = np.asarray(im)
                    ref_panel[: a.shape[0], : a.shape[1]] = a
                except Exception:
                    pass
            gap = np.full((t, 4, 3), 255, np.uint8)
            tiles.append(np.concatenate([hr, gap, ref_panel, gap, lr_up], axis=1))
        sep = np.full((4, tiles[0].shape[1], 3), 255, np.uint8)
        grid = np.concatenate([x for t in tiles for x in (t, sep)][:-1], axis=0)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        self.store.write_bytes(PREVIEW_NAME, buf.getvalue())


def run(manifest: GenerateManifest, *, log=print) -> dict:
    """Plan and run a manifest; returns the summary (raises ManifestError / JobFailed)."""
    return GenerateJob(manifest, log=log).run()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="generate_dataset.py", description="Generate paired (HR, realistic LR) WebDataset shards."
    )
    ap.add_argument("manifest", nargs="?", help="manifest YAML (kind: generate)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a manifest value (YAML), e.g. --set compute.batch_size=4",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit without generating")
    ap.add_argument("--print-schema", action="store_true", help="print the manifest JSON schema and exit")
    args = ap.parse_args(argv)
    if args.print_schema:
        print(json.dumps(manifest_json_schema("generate"), indent=2))
        return 0
    if not args.manifest:
        ap.error("a manifest is required")
    try:
        m = load_manifest(args.manifest, args.overrides, kind="generate")
        plan = make_plan(m)  # checks every path before any work
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    job = GenerateJob(m, log=lambda s: print(s, file=sys.stderr, flush=True), native_stderr_to_log=True)
    if args.dry_run:
        complete: set[str] = set()
        try:
            names = set(job.store.names())
            complete = {s for s in plan.stems if f"{s}_stats.json" in names}
        except Exception:
            pass
        c = m.compute
        print(
            json.dumps(job.describe(plan, complete, (c.actors.min, c.actors.max or c.actors.min)), indent=2)
        )
        return 0
    try:
        summary = job.run(plan)
    except JobFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"done: {summary['pairs']} pairs in {summary['shards_written']} shards "
        f"({summary['shards_skipped']} already complete), {summary['pairs_per_s']} pairs/s, "
        f"{summary['inputs_failed']} of {summary['inputs']} inputs failed, {summary['seconds']} s "
        f"-> {summary['output']}",
        file=sys.stderr,
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
