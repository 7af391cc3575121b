"""The generation job: plan → take the output → stream inputs through decode, generation and the
part writer → compact each shard on a worker as soon as it is whole → index.

The driver coordinates and counts; it never holds sample bytes, nor the list of inputs
(docs/generate.md, "Who writes the dataset"). Its memory and the bytes it receives grow with
the number of shards in flight and with per-input counters, not with pixels.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.generate.config import (
    DecodeConfig,
    GenerateConfig,
    PairingConfig,
    PlanReadConfig,
    SinkConfig,
    StartsConfig,
)
from pipelines.generate.console import (
    driver_native_log_path,
    drop_ray_data_ignore_advice,
    native_stderr_to,
    quiet_ray_data_progress,
    ray_logs_dir,
)
from pipelines.generate.plan import (
    LISTING_DIGEST_PREFIX,
    REFERENCES_DIGEST_PREFIX,
    Plan,
    list_plan,
    make_plan,
    read_plan_block,
    references_digest,
    start_digest,
)
from pipelines.generate.sink import ShardBook, compact_shard, encode_write_batch
from pipelines.generate.stages import GenerateLR, decode_tile_batch
from pipelines.manifest import GenerateManifest, ManifestError, digest_payload, payload_changes
from pipelines.progress import JobProgress
from pipelines.reader import BadSample, check_member, decode_checked_png
from pipelines.sources import ImageError, SourceItem, load_image
from pipelines.storage import (
    INDEX_NAME,
    PREVIEW_NAME,
    DatasetStore,
    RunLock,
    StorageAccessError,
    TransientStorageError,
    env_endpoint,
    read_parquet,
    storage_kwargs,
    task_error_message,
)
from realdgen_core.shards import open_tar

__all__ = [
    "GenerateJob",
    "JobFailed",
    "StorageUnavailable",
    "ensure_ray",
    "run",
    "decode_task_memory",
    "TASK_RETRIES",
]

# Retries of a task stage (decode, part writing, compaction, listing): a lost node, or storage
# still unavailable after the in-task retry budget (pipelines.storage.with_retries).
TASK_RETRIES = 5
# What Ray Data matches (in the exception's text) to retry a map task: TransientStorageError's.
TRANSIENT_MARK = "TransientStorageError"
# CPUs (torch threads) the reference task of a realdgen job may take on a CPU run (measured here from
# 1 to 2 threads only: 1.33 -> 0.80 s per probe tile; the cap keeps a large node's other work going).
REF_TASK_MAX_CPUS = 8
# How long the reference task's CPU count waits for CPUs that Ray has not yet shown as free again.
REF_TASK_SETTLE_S = 2.0


FAILURE_EXAMPLES = 10  # failures the driver keeps, with their URI and reason, for the summary
FAILURES_SHOWN = 5  # of those, how many an error message or the console lists
REFERENCES_SKIPPED_KEPT = 100  # references that did not decode, named in the index (all counted)


class JobFailed(RuntimeError):
    """The job ran but must exit non-zero (failure budget exceeded, output refused, …)."""


class StorageUnavailable(JobFailed):
    """Storage stayed unavailable past the retry budget: nothing was marked failed, and the same
    command run again resumes (the CLI's exit status 75, EX_TEMPFAIL: worth retrying as it is)."""


def decode_task_memory(max_image_pixels: int, max_file_bytes: int = 256 * 2**20) -> int:
    """Bytes reserved per decode task: the largest admitted file's bytes (held while it decodes)
    plus its image at 12 B per pixel, at least 512 MiB. ``sources.decode_image``'s own peak,
    measured on 64 MP images (``bench/decode_memory.py``): 10.1 B/px for RGB PNG and JPEG, 11.1
    for grey and palette PNG, 8.3 for RGBA and 16-bit PNG (12–28 before the conversions were made
    lean, above the 9 B/px then reserved for everything). Ray measured ~318 MiB for the demo's
    photos, above the 256 MiB first reserved here."""
    return max(512 * 2**20, 12 * int(max_image_pixels) + int(max_file_bytes))


def shards_made_otherwise(
    stats: Mapping[str, Mapping], now: Mapping[str, str | None], cropped_now: bool = False
) -> dict[str, list[str]]:
    """``{digest key: [stems]}`` of the complete shards (``stem: its _stats.json``) made over other
    references or starts than ``now`` (``references_digest`` / ``start_digest`` of this run; None:
    not compared). A shard that recorded none (or a v1 references digest, without sizes) is not
    compared, except when a reference E_deg now reads from its centre crop (``cropped_now``): every
    shard from before the crop (2026-12-08) embedded it whole, whatever its stats carry."""
    made: dict[str, list[str]] = {}
    for stem in sorted(stats):
        st = stats[stem]
        for k, v in now.items():
            had = st.get(k)
            if k == "references_digest" and not str(had).startswith(REFERENCES_DIGEST_PREFIX):
                if cropped_now and v is not None:
                    made.setdefault(k, []).append(stem)
                    continue
                had = None  # v1 (no sizes) cannot be compared: as if written before it was recorded
            if v is not None and had not in (None, v):  # absent: written before it was recorded
                made.setdefault(k, []).append(stem)
    return made


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def _retrying(**extra: Any) -> dict:
    return {"max_retries": TASK_RETRIES, "retry_exceptions": [TransientStorageError], **extra}


def workers_log_hint() -> str | None:
    """Where a stalled job's workers' warnings are (storage retries, errors): the embedded Ray does
    not send them to this console (:func:`ensure_ray`), so name its log folder; None when joined to
    a cluster, whose driver output (``ray job logs``) carries them already."""
    logs = ray_logs_dir() if own_local_ray() else None
    if logs is None:
        return None
    return f"the workers' warnings (storage retries, errors) are in {os.path.join(logs, 'worker-*.err')}"


def own_local_ray() -> bool:
    """True when this process started the Ray it is connected to (``ray.init()`` without an
    address started a head node here: :func:`ensure_ray`, or a caller's own ``ray.init``), not
    joined one (``RAY_ADDRESS``, ``ray job submit``, a cluster ``ray start`` runs on this machine):
    no node joins it later, so a resource it lacks now it will not have."""
    import ray

    if not ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        from ray._private import worker
    except ImportError:  # another Ray layout: not known, so not refused
        return False
    return bool(getattr(getattr(worker, "_global_node", None), "head", False))


def ensure_ray() -> bool:
    """Connect to ``RAY_ADDRESS`` (``ray job submit`` sets it) or start a local Ray on loopback.

    Returns True when this call started Ray (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    root = str(Path(__file__).resolve().parent.parent.parent)
    if os.environ.get("RAY_ADDRESS"):
        # Joining a cluster (ray job submit, a RayJob): the workers' warnings (storage retries, an
        # actor restarted, a reference refused) belong in `ray job logs`, which is the driver's output.
        ray.init(log_to_driver=True, configure_logging=False)
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
        if "endpoint_url" not in self.storage:
            # the driver's endpoint, so that workers whose environment lacks it (or names another)
            # reach the same store; an endpoint is not a credential: one holding user:pass@ is
            # refused where s3 is used (get_fs: StorageAccessError, exit 2 before any work)
            with contextlib.suppress(StorageAccessError):
                endpoint = env_endpoint()
                if endpoint:
                    self.storage["endpoint_url"] = endpoint
        self.store = DatasetStore(manifest.output.uri, self.storage)
        # What workers open: s3 URIs as they are, local folders as absolute paths.
        self.store_uri = self.store.uri if self.store.remote else self.store.root
        self.driver_bytes = 0  # bytes of rows the driver received from the pipeline (bench)
        self.lock: RunLock | None = None
        self.complete_stats: dict[str, dict] = {}  # stem -> stats, read by inspect_output
        # keys a foreign dataset's manifest had otherwise ("key: old → new"; from its _index.json)
        self.manifest_changes: list[str] = []

    # ---------------------------------------------------------------- output inspection
    def _dataset_names(self, names: Iterable[str]) -> list[str]:
        return [
            n
            for n in names
            if n.endswith((".tar", ".parquet", "_stats.json")) or n in (INDEX_NAME, PREVIEW_NAME)
        ]

    def _remove_dataset(self, names: Iterable[str]) -> int:
        """Delete the dataset files among ``names``: the index and the completion markers
        (``_stats.json``) first, so a crash part-way never leaves a marker without its tar."""
        files = self._dataset_names(names)
        for n in sorted(files, key=lambda n: not (n.endswith("_stats.json") or n == INDEX_NAME)):
            self.store.delete(n)
        return len(files)

    def inspect_output(self, plan: Plan) -> set[str]:
        """Stems already complete for this plan; refuses (or clears, with overwrite) foreign output.

        A shard is this plan's when its stats name the same manifest digest, the same model (a
        checkpoint replaced at the same path is another model) and the same input listing (an input
        added or removed under ``hr.uri`` moves every later input to another shard). The stats of
        the complete shards are kept in ``complete_stats`` (the run reads their counts and
        references digest from there, not from storage again)."""
        names, complete, lost, foreign, stray, why = self.classify_output(plan)
        if foreign or stray:
            if self.m.output.mode != "overwrite":
                self.store.delete_prefix(plan.work)
                what = (foreign or stray)[:3]
                raise JobFailed(
                    f"output {self.store.uri} holds a dataset written from a different manifest, model or "
                    f"input listing (here: {what_changed(why, self.manifest_changes)}; e.g. {what}); use "
                    "output.mode: overwrite "
                    "(or --set output.mode=overwrite) to replace it, or choose another output.uri"
                    + (
                        ". A key named there that your manifest does not set is a default that another "
                        "RealDGen version sets otherwise: finish such a dataset with the version that "
                        "started it"
                        if self.manifest_changes
                        else ""
                    )
                )
            removed = self._remove_dataset(names)
            self.log(f"overwrite: removed {removed} files of a previous dataset")
            return set()
        for stem, missing in lost.items():
            # the stats go first, or this run's compaction would take them for its own
            self.store.delete(f"{stem}_stats.json")
            self.log(f"{stem}: {', '.join(missing)} missing though its stats exist; generating it again")
        return complete

    def classify_output(
        self, plan: Plan
    ) -> tuple[list[str], set[str], dict[str, list[str]], list[str], list[str], set[str]]:
        """Read-only: ``(names, complete stems, lost, foreign files, stray tars, what differs)`` of
        the output for this plan (``--dry-run`` reports it; the run acts on it, :meth:`inspect_output`).
        ``lost``: stems of this plan whose stats exist but whose tar or parquet is gone (deleted by
        hand, a lost object), with the missing names: not complete. Fills ``complete_stats``
        (complete stems only)."""
        self.complete_stats = {}
        self.manifest_changes = []
        names = self.store.names()
        foreign: list[str] = []
        why: set[str] = set()
        complete: set[str] = set()
        want = {"manifest_digest": plan.digest, "model_digest": plan.model_digest}
        if plan.inputs_digest is not None:
            want["inputs_digest"] = plan.inputs_digest
        for n in names:
            if not (n.endswith("_stats.json") or n == INDEX_NAME):
                continue
            try:
                meta = self.store.read_json(n)
            except TransientStorageError:
                raise
            except Exception:
                meta = {}
            if not isinstance(meta, dict):
                meta = {}
            differ = [k for k, v in want.items() if meta.get(k) != v]
            if "manifest_digest" in differ and meta:
                # name the keys from the settings the digest covered (stats since 2026-12-08, the
                # index since 2026-12-07); the same settings under another digest are another
                # RealDGen version's digest of them
                recorded = meta.get("manifest")
                changes = (
                    payload_changes(recorded, digest_payload(plan.manifest))
                    if isinstance(recorded, dict)
                    else []
                )
                if changes:
                    self.manifest_changes = changes
                else:
                    differ[differ.index("manifest_digest")] = (
                        "manifest_rehashed" if isinstance(recorded, dict) else "manifest_unrecorded"
                    )
            if "inputs_digest" in differ and meta:
                had = meta.get("inputs_digest")
                if had is None:
                    differ[differ.index("inputs_digest")] = "inputs_unrecorded"
                elif not str(had).startswith(LISTING_DIGEST_PREFIX):
                    differ[differ.index("inputs_digest")] = "inputs_v1"
            if differ:
                foreign.append(n)
                why.update(differ)
            elif n.endswith("_stats.json"):
                complete.add(n.removesuffix("_stats.json"))
                self.complete_stats[n.removesuffix("_stats.json")] = meta
        if self.manifest_changes and why & {"manifest_unrecorded", "manifest_rehashed"}:
            # one file named the keys (the index of a dataset whose older stats kept none): those
            why -= {"manifest_unrecorded", "manifest_rehashed"}
            why.add("manifest_digest")
        stems = set(plan.stems)
        stray = [n for n in names if n.endswith(".tar") and n.removesuffix(".tar") not in stems]
        present = set(names)
        lost: dict[str, list[str]] = {}
        for stem in sorted(complete & stems):
            missing = [f"{stem}{ext}" for ext in (".tar", ".parquet") if f"{stem}{ext}" not in present]
            if missing:
                lost[stem] = missing
                self.complete_stats.pop(stem, None)
        return names, (complete & stems) - set(lost), lost, foreign, stray, why

    def _clear_other_work(self, plan: Plan) -> None:
        """Remove scratch folders of runs of other manifests (their parts can never be used)."""
        for name in self.store.list_prefix("_work/", dirs=True):
            if name.rstrip("/") != plan.work:
                self.store.delete_prefix(name)

    # ---------------------------------------------------------------- describe
    def describe(
        self, plan: Plan, complete: set[str] | None = None, actors: tuple[int, int] | None = None
    ) -> dict:
        m = self.m
        return {
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
            "generator": m.generator.kind,
            "inputs": plan.n_inputs,
            "references": len(plan.refs),
            "reference_sets": [{k: s[k] for k in ("name", "domain", "weight", "count")} for s in plan.sets],
            "tile_lr": m.tiling.tile,
            "tile_hr": m.tiling.tile * m.scale,
            "max_pairs": plan.n_inputs * m.tiling.max_tiles_per_image * m.pairing.refs_per_tile,
            "pairing": m.pairing.mode,
            "shards": plan.n_shards,
            "shards_complete": len(complete or ()),
            "inputs_per_shard": m.output.inputs_per_shard,
            "output": m.output.uri,
            "actors": {"min": actors[0], "max": actors[1]} if actors else None,
            "batch_size": m.compute.batch_size,
            "generator_settings": plan.generator_note,
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

    def _decode_memory(self) -> int:
        """The decode tasks' memory reservation, capped at half the smallest node's memory resource:
        a reservation no node can grant makes Ray Data wait forever ("Cluster resources are not
        enough to run any task"), which is worse than decoding one large image at a time."""
        import ray

        want = decode_task_memory(self.m.limits.max_image_pixels, self.m.limits.max_file_bytes)
        mems = [
            n["Resources"].get("memory", 0)
            for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU")
        ]
        smallest = int(min(mems)) if mems else 0
        if smallest and want > smallest // 2:
            self.log(
                f"note: decode tasks reserve {smallest // 2 // 2**20} MiB (half the smallest node's memory), "
                f"less than the {want // 2**20} MiB limits.max_image_pixels and max_file_bytes ask for"
            )
            return max(64 * 2**20, smallest // 2)
        return want

    def _check_output_shared(self, plan: Plan) -> None:
        """A local output folder must be the same folder on every node: workers write the parts and
        the shards. One probe file from the driver, one zero-CPU task pinned to each node looks."""
        import uuid

        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if self.store.remote:
            return
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if len(nodes) < 2:
            return
        probe = os.path.join(self.store.root, plan.work, f".probe-{uuid.uuid4().hex}")
        os.makedirs(os.path.dirname(probe), exist_ok=True)
        with open(probe, "w") as f:
            f.write("realdgen")
        try:
            task = ray.remote(_path_exists)
            refs = [
                task.options(
                    num_cpus=0,
                    max_retries=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                ).remote(probe)
                for n in nodes
            ]
            seen = ray.get(refs, timeout=120)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        blind = [
            n.get("NodeManagerAddress") or n["NodeID"][:12]
            for n, ok in zip(nodes, seen, strict=True)
            if not ok
        ]
        if blind:
            self.store.delete_prefix(plan.work)
            raise JobFailed(
                f"output.uri {self.store.root!r} is a local folder that node(s) {blind} cannot see: workers "
                "write the shards, so a multi-node run needs s3:// or a folder shared by every node"
            )

    def _list(self, plan: Plan) -> None:
        """The listing, as a Ray task: plan blocks land in the work folder, counts come back."""
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        task = ray.remote(list_plan).options(**_retrying(num_cpus=min(1.0, self.m.compute.task_num_cpus)))
        summary = ray.get(
            task.remote(
                plan.manifest,
                store_uri=self.store_uri,
                storage=self.storage,
                cluster_cpus=cpus,
                cwd=os.getcwd(),
            )
        )
        plan.with_listing(summary)

    def run(self, plan: Plan | None = None) -> dict:
        import ray

        t_start = time.perf_counter()
        plan = plan or make_plan(self.m, list_now=False)
        self.plan = plan
        # The plan's manifest has the generator settings resolved (domain calibration or paper).
        self.m = plan.manifest
        warning = ray_working_dir_warning(self.m.output.uri, os.getcwd())
        if warning:
            self.log(warning)
        started_ray = ensure_ray()
        if own_local_ray() and self.m.compute.device == "cuda" and not ray.cluster_resources().get("GPU"):
            # every GPU task would wait forever for a GPU the Ray this process started does not have
            if started_ray:
                ray.shutdown()
            raise JobFailed(
                "compute.device: 'cuda', but the Ray this job started here has no GPU; use 'auto' (a GPU "
                "when there is one) or 'cpu', or submit the job to a cluster with GPUs (ray job submit)"
            )
        lock = self.lock = RunLock(self.store, heartbeat_s=self.m.progress.heartbeat_s)
        try:
            lock.acquire()
        except Exception as exc:
            if started_ray:
                ray.shutdown()
            msg = str(exc)  # the output is named: "The specified bucket does not exist" alone is not enough
            raise JobFailed(msg if self.store.uri in msg else f"output {self.store.uri}: {msg}") from None
        try:
            self.store.clean_temporaries()
            self._check_output_shared(plan)
            try:
                self._list(plan)
            except ManifestError:
                self.store.delete_prefix(plan.work)
                raise
            complete = self.inspect_output(plan)
            self._clear_other_work(plan)
            # Parts an earlier, interrupted run left: every input of a shard that is not complete is
            # generated again, so they are never needed, and they may hold another model's samples
            # or another version of an image at the same URI.
            self.store.delete_prefix(f"{plan.work}/parts")
            return self._run(plan, complete, t_start)
        except (JobFailed, ManifestError):
            raise
        except Exception as exc:
            # In the driver, or raised in a Ray task (which hands the driver only its text).
            refused = task_error_message(exc, StorageAccessError)
            if refused is not None:
                raise JobFailed(
                    f"{refused}. Nothing was marked failed; fix the access and run the same command "
                    "again to resume (complete shards are kept)"
                ) from None
            unavailable = task_error_message(exc, TransientStorageError)
            if unavailable is None:
                raise
            raise StorageUnavailable(
                f"storage unavailable: {unavailable}. Nothing was marked failed; run the same command "
                "again to resume (complete shards are kept)"
            ) from None
        finally:
            lock.release()
            if started_ray:
                ray.shutdown()

    def _check_lock(self) -> None:
        """Stop when the heartbeat found the lock taken over by another job (see RunLock)."""
        if self.lock is not None and self.lock.lost:
            raise JobFailed(self.lock.lost)

    def _checkpoint_for_workers(self, plan: Plan) -> str | None:
        """Absolute local path (same machine or shared FS) or the s3 URI each worker fetches."""
        uri = self.m.generator.checkpoint
        if uri is None:
            return None
        return uri if uri.startswith("s3://") else plan.checkpoint_local

    @staticmethod
    def _ref_task_cpus(settle_s: float = REF_TASK_SETTLE_S) -> int:
        """CPUs (and torch threads) of the reference task on a CPU run: the largest alive node's CPU
        count, at most REF_TASK_MAX_CPUS and the CPUs free now (so it never waits on CPUs that
        something else holds), at least 1. The listing task has only just returned here, and Ray
        shows its CPU as free a moment later (measured: 1 of 2 free right after, so the demo's start
        profile ran on one thread), so the free count is read again until it reaches that many or
        ``settle_s`` has passed."""
        import ray

        node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
        want = max(1, min(REF_TASK_MAX_CPUS, max(node_cpus, default=1)))
        deadline = time.monotonic() + settle_s
        while True:
            free = int(ray.available_resources().get("CPU", 0))
            if free >= want or time.monotonic() >= deadline:
                return max(1, min(want, free))
            time.sleep(0.05)

    def _prepare_refs(self, plan: Plan, num_gpus: float) -> tuple[list[dict], list[dict], Any]:
        import ray

        from pipelines.generate.references import REFERENCE_MAX_SIDE, prepare_references

        m = self.m
        g = m.generator
        if not plan.refs:
            return [], plan.sets, None
        start = None
        if plan.probe:
            start = {
                "bank": g.start_bank,
                "probe": plan.probe,
                "tile_hr": m.tiling.tile * m.scale,
                "n_tiles": g.start_probe_tiles if g.start_probe_layout == "spread" else None,
                "ref_weighting": g.start_ref_weighting,
                "aggregate": g.start_aggregate,
            }
        # On the CPU the reference task (E_deg over the bank on every probe tile: ~1.3 s per tile on
        # one thread) runs before the pipeline starts, so it may use the CPUs the pipeline will:
        # up to REF_TASK_MAX_CPUS threads on the largest node (E_deg's output does not depend on
        # the thread count: bitwise equal at 1, 2 and 4 threads on this project's CPU).
        threads = None if num_gpus or g.kind != "realdgen" else self._ref_task_cpus()
        if start is not None:  # the job's longest silence before the first sample: say what it does
            self.log(
                f"start profile: E_deg over the {len(g.start_bank or ())}-entry start bank on "
                f"{len(plan.probe)} probe inputs x {len(plan.refs)} references, to choose each reference "
                f"domain's start ({'GPU' if num_gpus else f'{threads} CPU thread(s)'}; about a minute "
                "on a CPU) ..."
            )
        task = ray.remote(prepare_references).options(
            num_returns=5, num_gpus=num_gpus, num_cpus=threads or 1, **_retrying()
        )
        ok_ref, err_ref, bank_ref, prof_ref, crop_ref = task.remote(
            plan.refs,
            g.kind,
            self._checkpoint_for_workers(plan),
            self.storage,
            m.limits.max_image_pixels,
            m.compute.device,
            start,
            threads,
            m.limits.max_file_bytes,
        )
        ok, errors, profiles, cropped = ray.get([ok_ref, err_ref, prof_ref, crop_ref])
        for i in cropped:  # recorded in references_digest: its vector is its centre crop's
            plan.refs[i]["crop"] = REFERENCE_MAX_SIDE
        plan.references_skipped = {"count": len(errors), "first": errors[:REFERENCES_SKIPPED_KEPT]}
        for e in errors[:10]:
            self.log(f"reference skipped: {e}")
        if len(errors) > 10:
            self.log(f"... and {len(errors) - 10} more references skipped")
        if not ok:  # nothing was generated: the listing this run wrote is not left behind either
            self.store.delete_prefix(plan.work)
            raise JobFailed("no usable reference: every reference image failed to decode")
        if start is not None:
            if not profiles:
                self.log("start profile: no probe HR tile could be read; choosing the start per sample")
            for key, p in profiles.items():
                how = (
                    f"mean rank {p['ranks'][p['chosen']]:.3g} of {len(p['ranks'])}"
                    if p["aggregate"] == "rank"
                    else f"mean E_deg error {p['errors'][p['chosen']]:.4g}"
                )
                self.log(
                    f"start profile {key}: {p['label']} (bank entry {p['chosen']}, {how} over "
                    f"{p['tiles']} probe tiles x {p['refs']} references, {p['effective_refs']:g} effective)"
                )
        plan.start_profiles = profiles
        refs = [plan.refs[i] for i in ok]
        sets = []
        for s in plan.sets:
            count = sum(1 for r in refs if r["set"] == s["name"])
            start_i = next((j for j, r in enumerate(refs) if r["set"] == s["name"]), 0)
            sets.append({**s, "start": start_i, "count": count})
        return refs, sets, bank_ref if g.kind == "realdgen" else None

    def _configs(
        self, plan: Plan, num_gpus: float, actor_cpus: float, bank_ref: Any
    ) -> tuple[DecodeConfig, GenerateConfig, SinkConfig]:
        m = self.m
        g = m.generator
        # x_start in the CPU decode tasks for the synthetic start kinds (a start chosen against the
        # reference, e.g. a domain calibration, stays with the generator).
        synthetic_start = g.start_kind in ("realesrgan", "bsrgan", "bicubic")
        starts = None
        if g.kind == "realdgen" and m.compute.starts_in_decode and synthetic_start:
            starts = StartsConfig(k=g.k, tau_min=g.tau_min, tau_max=g.tau_max, start_kind=g.start_kind)
        decode = DecodeConfig(
            seed=m.seed,
            scale=m.scale,
            tile=m.tiling.tile,
            tiling_mode=m.tiling.mode,
            max_tiles=m.tiling.max_tiles_per_image,
            max_pixels=m.limits.max_image_pixels,
            max_bytes=m.limits.max_file_bytes,
            storage=self.storage,
            pairing=PairingConfig(mode=m.pairing.mode, refs_per_tile=m.pairing.refs_per_tile),
            refs=tuple({"uri": r["uri"], "set": r["set"], "domain": r["domain"]} for r in plan.refs),
            sets=tuple(plan.sets),
            starts=starts,
        )
        generate = GenerateConfig(
            kind=g.kind,
            scale=m.scale,
            checkpoint=self._checkpoint_for_workers(plan),
            model_digest=plan.model_digest,
            storage=self.storage,
            device="cuda" if num_gpus else "cpu",
            k=g.k,
            tau_min=g.tau_min,
            tau_max=g.tau_max,
            weights=(g.content_weight, g.degradation_weight),
            start_kind=g.start_kind,
            filter_norm=bool(g.filter_norm),
            start_bank=g.start_bank,
            start_profiles={
                k: {"chosen": p["chosen"], "errors": p["errors"]} for k, p in plan.start_profiles.items()
            },
            rows_per_call=g.rows_per_call,
            sampler=g.sampler_config().to_dict(),
            precision=g.precision,
            channels_last=g.channels_last,
            compile=g.compile,
            ref_bank=bank_ref,
            torch_threads=m.compute.torch_threads or max(1, int(actor_cpus)),
        )
        sink = SinkConfig(
            store=self.store_uri,
            storage=self.storage,
            work=plan.work,
            run_id=self.lock.run_id if self.lock is not None else "run",
            name=m.output.name,
            scale=m.scale,
            digest=plan.digest,
            model_digest=plan.model_digest,
            generator=g.kind,
            inputs_digest=plan.inputs_digest,
            references_digest=references_digest(plan.refs),
            start_digest=start_digest(plan.start_profiles),
            manifest=digest_payload(plan.manifest),
        )
        return decode, generate, sink

    def _run(self, plan: Plan, complete: set[str], t_start: float) -> dict:
        import ray

        m = self.m
        c = m.compute
        lo, hi, num_gpus, actor_cpus, _ = self._pool()
        pending = [i for i, s in enumerate(plan.stems) if s not in complete]
        pending_set = set(pending)
        n_pending_inputs = sum(plan.shard_sizes[i] for i in pending)
        self.log(
            f"plan: {plan.n_inputs} inputs, {len(plan.refs)} references, {plan.n_shards} shards "
            f"({len(complete)} complete, {len(pending)} to write), generator {m.generator.kind}, "
            f"actors {lo}..{hi} ({'GPU' if num_gpus else 'CPU'})"
        )
        if plan.generator_note:
            self.log(f"generator: {plan.generator_note}")
        if num_gpus and not ray.cluster_resources().get("GPU"):
            self.log(
                "warning: compute.device asks for GPU actors and the cluster has no GPU now: the job "
                "waits until one joins (an autoscaler adds GPU nodes on demand; otherwise stop it and "
                "use compute.device: auto or cpu)"
            )
        # Every shard complete: nothing to generate, so the references' start profile (a minute of
        # E_deg on the CPU) is not measured again; the index keeps the one the dataset was made with.
        kept_profile = None if pending else self._indexed_start_profile(plan)
        listed_refs = len(plan.refs)
        if kept_profile is None:
            refs, sets, bank_ref = self._prepare_refs(plan, num_gpus)
            if refs and len(refs) != len(plan.refs):
                plan.refs, plan.sets = refs, sets
            decode_cfg, gen_cfg, sink_cfg = self._configs(plan, num_gpus, actor_cpus, bank_ref)
        else:
            self.log("every shard is complete: references and start profile not read again")

        total_inputs = plan.n_inputs
        # references actually used now, and the domain starts chosen from them (None when nothing
        # is generated: nothing to pair); a complete shard made otherwise cannot be resumed into
        now = (
            {}
            if kept_profile is not None
            else {
                "references_digest": sink_cfg.references_digest,
                "start_digest": sink_cfg.start_digest,
            }
        )
        cropped_now = any(r.get("crop") for r in plan.refs)
        made_otherwise = shards_made_otherwise(
            {stem: self.complete_stats.get(stem, {}) for stem in complete}, now, cropped_now
        )
        if made_otherwise and m.output.mode == "overwrite":
            removed = self._remove_dataset(self.store.names())
            n = len({s for stems in made_otherwise.values() for s in stems})
            self.log(
                f"overwrite: {n} complete shards were made over other references or starts than "
                f"now; removed the {removed} files of the previous dataset"
            )
            complete, self.complete_stats = set(), {}
            pending = list(range(len(plan.stems)))
            pending_set, n_pending_inputs = set(pending), plan.n_inputs
        elif made_otherwise:

            def named(stems: list[str]) -> str:
                return f"({', '.join(stems[:3])}{', …' if len(stems) > 3 else ''})"

            if "references_digest" in made_otherwise:
                raise JobFailed(
                    f"the references that decode differ from those the complete shards were paired over "
                    f"{named(made_otherwise['references_digest'])}: {len(plan.refs)} of {listed_refs} "
                    "decode now (skipped ones are logged above). A reference that fails now but did not "
                    "then (a permission error, a file replaced), or the reverse, or one replaced by "
                    "another picture under the same name (another size), pairs the remaining tiles "
                    "differently. Restore the references and rerun, or use output.mode: overwrite to "
                    "regenerate every shard"
                    + (
                        ". Or: a reference larger than 1024 px on a side is read from its centre crop "
                        "since 2026-12-08, and shards made before embedded it whole: finish such a "
                        "dataset with the release that started it"
                        if cropped_now
                        else ""
                    )
                )
            raise JobFailed(
                f"the start chosen for a reference domain differs from the one the complete shards "
                f"started from {named(made_otherwise['start_digest'])} (the chosen starts are logged "
                "above): it is measured on the probe HR inputs, and one that decodes now but did not "
                "then (or the reverse) can change it. Make the inputs readable as they were and rerun, "
                "or use output.mode: overwrite to regenerate every shard"
            )
        failed_inputs = 0  # decode failed, or at least one sample failed (the failure budget)
        for stem in sorted(complete):
            st = self.complete_stats.get(stem, {})  # inspect_output read them: not again
            with contextlib.suppress(TypeError, ValueError):
                failed_inputs += int(st.get("inputs_with_failures", st.get("inputs_failed", 0)))
        budget = m.limits.max_failure_fraction

        def over_budget() -> bool:
            return failed_inputs > budget * total_inputs

        failure_examples: list[str] = []  # this run's first failures, "URI: reason"
        kept_examples: list[str] | None = None  # read once, when needed

        def examples() -> list[str]:
            """This run's first failures, then the kept shards' (a resume names them too)."""
            nonlocal kept_examples
            if kept_examples is None and len(failure_examples) < FAILURE_EXAMPLES:
                kept_examples = self._kept_failures(complete, FAILURE_EXAMPLES)
            return (failure_examples + (kept_examples or []))[:FAILURE_EXAMPLES]

        def budget_error() -> JobFailed:
            first = "; ".join(examples()[:FAILURES_SHOWN])
            return JobFailed(
                f"failure budget exceeded: {failed_inputs} of {total_inputs} inputs failed (decode or "
                f"generation; limits.max_failure_fraction = {budget})"
                + (f". First failures: {first}" if first else "; see the complete shards' parquet files")
            )

        written: list[dict] = []
        compact = ray.remote(compact_shard).options(
            **_retrying(num_cpus=min(1.0, c.task_num_cpus), scheduling_strategy="SPREAD")
        )
        in_flight: dict[Any, int] = {}

        def collect(block: bool) -> None:
            if not in_flight:
                return
            done, _ = ray.wait(
                list(in_flight), num_returns=len(in_flight) if block else 1, timeout=None if block else 0
            )
            for ref in done:
                shard = in_flight.pop(ref)
                try:
                    written.append(ray.get(ref))
                except (TransientStorageError, StorageAccessError):
                    raise
                except Exception as exc:
                    raise JobFailed(f"writing shard {plan.stems[shard]} failed: {exc}") from None

        t_gen = time.perf_counter()
        if pending:
            import ray.data

            ctx = ray.data.DataContext.get_current()
            # The job shows its own progress (samples, pairs/s: pipelines/progress.py); Ray Data's
            # progress module then only says that its bars are off, which belongs in its log file.
            ctx.enable_progress_bars = False
            quiet_ray_data_progress()
            drop_ray_data_ignore_advice()
            ctx.execution_options.preserve_order = False
            # Lost nodes: Ray Data retries its tasks and restarts its actors (its defaults). Storage
            # still unavailable after a task's own retry budget: the task is run again, a few times.
            ctx.retried_map_errors = [TRANSIENT_MARK]
            ctx.max_map_retries = TASK_RETRIES
            blocks = [
                b
                for b in plan.blocks
                if any(s in pending_set for s in range(b["first_shard"], b["last_shard"] + 1))
            ]
            skip = sorted(
                s
                for b in blocks
                for s in range(b["first_shard"], b["last_shard"] + 1)
                if s not in pending_set
            )
            ds = ray.data.from_items([{"name": b["name"]} for b in blocks], override_num_blocks=len(blocks))
            ds = ds.map_batches(
                read_plan_block,
                fn_kwargs={"config": PlanReadConfig(self.store_uri, self.storage, tuple(skip))},
                batch_size=None,
                batch_format="pyarrow",
                num_cpus=0.25,
            )
            ds = ds.map_batches(
                decode_tile_batch,
                fn_kwargs={"config": decode_cfg},
                # A memory reservation for decoding (images up to limits.max_image_pixels) that also
                # keeps decode a separate CPU task stage: Ray Data fuses a task stage into the
                # following actor stage whenever their resource requests are equal.
                memory=self._decode_memory(),
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
                encode_write_batch,
                fn_kwargs={"config": sink_cfg},
                # Never wait for more rows than one generation batch yields: a larger bundle holds
                # finished samples back from the writer (and from the progress display).
                batch_size=min(c.encode_batch_size, c.batch_size),
                batch_format="pyarrow",
                num_cpus=c.task_num_cpus,
            )
            console = contextlib.ExitStack()
            console.enter_context(
                native_stderr_to(driver_native_log_path() if self.native_stderr_to_log else None)
            )
            bar = JobProgress(
                n_pending_inputs,
                m.tiling.max_tiles_per_image * m.pairing.refs_per_tile,
                enabled=m.progress.bar,
                interval_s=m.progress.interval_s,
                stall_hint=workers_log_hint(),
            )
            book = ShardBook(plan.shard_sizes)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    self.driver_bytes += batch.nbytes
                    for rep in batch.to_pylist():
                        folded = book.add(rep)
                        if folded is None:  # a shard already sent to compaction
                            continue
                        st, ok_new, failed_new, newly_failed = folded
                        failed_inputs += newly_failed
                        if rep.get("failure") and len(failure_examples) < FAILURE_EXAMPLES:
                            failure_examples.append(rep["failure"])
                        if rep["reported"]:
                            bar.input_reported(rep["n_samples"], not rep["input_failed"])
                        for _ in range(ok_new):
                            bar.sample_done(True)
                        for _ in range(failed_new):
                            bar.sample_done(False)
                        if st is not None:
                            ref = compact.remote(sink_cfg, st.index, st.expected_inputs, st.started)
                            in_flight[ref] = st.index
                        if over_budget():
                            self._settle(collect)
                            raise budget_error()
                    self._check_lock()
                    collect(block=False)
                collect(block=True)
            finally:
                bar.close()
                console.close()
            if book.open:
                raise JobFailed(f"{len(book.open)} shard(s) never completed: {sorted(book.open)[:5]}")
        gen_wall = time.perf_counter() - t_gen
        n_pairs = sum(s["samples"] for s in written)
        n_samples_failed = sum(s["samples_failed"] for s in written)

        self._check_lock()
        if over_budget():  # also when only the kept shards' failures pass it: no index then
            raise budget_error()
        index = self.write_index(plan, kept_profile)
        self.store.delete_prefix(plan.work)
        # A compaction killed mid-write (a lost node) leaves its temp file; its retry wrote the
        # shard under another temp name. No writer runs now.
        self.store.clean_temporaries()
        summary = {
            "output": self.store.uri if self.store.remote else self.store.root,  # local: absolute
            "generator": m.generator.kind,
            "pairs": n_pairs,
            "total_samples": index["total_samples"],
            "shards_written": len(written),
            "shards_skipped": len(complete),
            "shards": plan.n_shards,
            "inputs": total_inputs,
            "inputs_failed": index["inputs_failed"],
            "samples_failed": n_samples_failed,
            # references that did not decode (each was logged as `reference skipped:` at the start)
            "references_skipped": int((plan.references_skipped or {}).get("count", 0)),
            "seconds": round(time.perf_counter() - t_start, 2),
            "generate_seconds": round(gen_wall, 2),
            "pairs_per_s": round(n_pairs / gen_wall, 3) if gen_wall > 0 and n_pairs else 0.0,
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
            "writers": sorted({s.get("writer", {}).get("node_id") or s.get("host") for s in written}),
            "driver_bytes_received": self.driver_bytes,
            # the first failures, this run's then the kept shards': "URI: reason"
            "failure_examples": examples() if failure_examples or failed_inputs else [],
        }
        if m.output.preview:
            try:
                rows = self.preview_rows(plan, m.output.preview_rows)
                if rows and self.write_preview(rows):
                    summary["preview"] = f"{self.store.uri}/{PREVIEW_NAME}"
            except Exception as exc:  # a preview is a convenience, never a failure
                self.log(f"preview skipped: {exc}")
        return summary

    def _kept_failures(self, complete: Iterable[str], limit: int) -> list[str]:
        """Up to ``limit`` failures ("URI: reason") recorded in the parquet files of kept shards
        that have any (by their stats), in shard order; unreadable files are passed over."""
        out: list[str] = []
        for stem in sorted(complete):
            st = self.complete_stats.get(stem, {})
            if not (st.get("inputs_with_failures") or st.get("inputs_failed") or st.get("samples_failed")):
                continue
            try:
                rows = read_parquet(self.store.read_bytes(f"{stem}.parquet")).to_pylist()
            except Exception:
                continue
            seen: set[str] = set()
            for r in rows:
                if r.get("status") != "ok" and r.get("error") and r.get("uri") not in seen:
                    seen.add(r.get("uri"))
                    out.append(f"{r['uri']}: {r['error']}")
                    if len(out) >= limit:
                        return out
        return out

    def _settle(self, collect) -> None:
        """Before the job stops early: let the shard compactions in flight finish (each leaves a
        complete shard, kept by the next run) and remove temporary files, so the output holds only
        complete shards and the parts a resume needs."""
        with contextlib.suppress(Exception):  # the error that stops the job is the one to report
            collect(block=True)
        with contextlib.suppress(Exception):
            self.store.clean_temporaries()

    # ---------------------------------------------------------------- index and preview
    def _plan_index(self, plan: Plan) -> dict | None:
        """This plan's existing index, or None. ``inspect_output`` has already refused or cleared
        an index of another manifest, model or input listing, so one that is still here is this
        plan's."""
        if INDEX_NAME not in self.store.names():
            return None
        try:
            index = self.store.read_json(INDEX_NAME)
        except TransientStorageError:
            raise
        except Exception:
            return None
        if not isinstance(index, dict) or index.get("manifest_digest") != plan.digest:
            return None
        return index

    def _indexed_start_profile(self, plan: Plan) -> dict | None:
        """The ``start_profile`` of this plan's existing index (``{}`` when the job records none),
        or None when there is no index to take it from (then the references are read as usual).
        The references the index says were skipped are kept for the index this run rewrites."""
        index = self._plan_index(plan)
        if index is None:
            return None
        if isinstance(index.get("references_skipped"), dict):
            plan.references_skipped = index["references_skipped"]
        kept = index.get("start_profile")
        if kept is None:
            return {} if not (plan.refs and plan.probe) else None
        return kept if isinstance(kept, dict) else None

    def write_index(self, plan: Plan, kept_start_profile: dict | None = None) -> dict:
        """Write ``index.json`` from the shards' stats; ``kept_start_profile`` (a previous index's,
        when nothing was generated) stands in for the plan's own start profiles."""
        shards = []
        inputs_failed = 0
        software: list[dict] = []
        for stem in plan.stems:
            stats = self.store.read_json(f"{stem}_stats.json")
            shards.append({"name": f"{stem}.tar", "samples": stats["samples"], "bytes": stats["bytes"]})
            inputs_failed += stats.get("inputs_failed", 0)
            if stats.get("software") and stats["software"] not in software:
                software.append(stats["software"])
        index = {
            "shards": shards,
            "total_samples": sum(s["samples"] for s in shards),
            "manifest_digest": plan.digest,
            "model_digest": plan.model_digest,
            "inputs_digest": plan.inputs_digest,
            "generator": self.m.generator.kind,
            "scale": self.m.scale,
            "inputs": plan.n_inputs,
            "inputs_failed": inputs_failed,
            # what manifest_digest hashed: a re-run with another manifest names the keys it changed
            "manifest": digest_payload(plan.manifest),
            # the versions the shards were written with, in shard order (several: a resume, mixed nodes)
            "software": software,
        }
        if plan.references_skipped is not None:  # references that did not decode: "URI: reason"
            index["references_skipped"] = plan.references_skipped
        if kept_start_profile:
            index["start_profile"] = kept_start_profile
        elif plan.start_profiles:  # the start each reference domain got (generator.start_choice: domain)
            index["start_profile"] = {
                k: {
                    "start": p["label"],
                    "bank_entry": p["chosen"],
                    "probe_tiles": p["tiles"],
                    "probe_layout": self.m.generator.start_probe_layout,
                    "references": p["refs"],
                    "effective_references": p["effective_refs"],
                    "reference_weighting": self.m.generator.start_ref_weighting,
                    "aggregate": p["aggregate"],
                }
                for k, p in plan.start_profiles.items()
            }
        self.store.write_json(INDEX_NAME, index)
        return index

    def preview_rows(self, plan: Plan, n: int) -> list[dict]:
        """The first ``n`` samples of the dataset, read back from the start of its first shards.

        A shard's tar is sorted by key (``write_tar``), so the first samples are its first members:
        the tar is streamed and left once ``n`` samples are whole, never read in full (a cluster
        shard can be gigabytes, and this runs in the driver)."""
        rows: list[dict] = []
        for stem in plan.stems:
            if len(rows) >= n:
                break
            # a kept shard is only as trusted as the output prefix: members are checked (plain
            # names, a size cap) the way every reader checks them
            with self.store.open_read(f"{stem}.tar") as f, open_tar(f, "r|") as tar:
                partial: dict[str, dict[str, bytes]] = {}
                for member in tar:
                    try:
                        key, ext = check_member(member)
                    except BadSample:
                        continue
                    data = tar.extractfile(member)
                    sample = partial.setdefault(key, {})
                    sample[ext] = data.read() if data else b""
                    if len(sample) == 3:  # whole: its members need not be adjacent
                        meta = json.loads(partial.pop(key)["json"])
                        rows.append(
                            {
                                "hr_png": sample["hr.png"],
                                "lr_png": sample["lr.png"],
                                "ref_source": meta.get("ref_source"),
                            }
                        )
                        if len(rows) >= n:
                            break
        return rows[:n]

    def write_preview(self, rows: list[dict]) -> bool:
        """The preview grid of ``rows`` (HR | reference | LR), written beside the shards; False
        when no row decodes."""
        from PIL import Image

        limits = self.m.limits
        tiles, t, mag = [], 0, 1
        for r in rows:
            try:
                hr = decode_checked_png(r["hr_png"], "preview HR", limits.max_image_pixels)
                lr = decode_checked_png(r["lr_png"], "preview LR", limits.max_image_pixels)
            except Exception as exc:  # a bad sample is left out of the preview, not the job
                self.log(f"preview: a sample left out: {type(exc).__name__}: {exc}")
                continue
            t = hr.shape[0]
            mag = max(1, t // lr.shape[0])
            lr_up = np.asarray(Image.fromarray(lr).resize((t, t), Image.Resampling.NEAREST))
            ref_panel = np.full_like(hr, 128)
            if r.get("ref_source"):
                try:
                    ref = next(x for x in self.plan.refs if x["uri"] == r["ref_source"])
                    img = load_image(
                        SourceItem.from_row(ref),
                        self.storage,
                        max_pixels=limits.max_image_pixels,
                        max_bytes=limits.max_file_bytes,
                    )
                    # a centre crop the size of the LR tile, magnified as the LR is: the two
                    # panels show pixels at the same scale (a shrunk reference hides its blocks)
                    ch, cw = min(lr.shape[0], img.shape[0]), min(lr.shape[1], img.shape[1])
                    y, x = (img.shape[0] - ch) // 2, (img.shape[1] - cw) // 2
                    a = img[y : y + ch, x : x + cw].repeat(mag, 0).repeat(mag, 1)[:t, :t]
                    ref_panel[: a.shape[0], : a.shape[1]] = a
                except (StopIteration, ImageError, TransientStorageError):
                    pass
            gap = np.full((t, 4, 3), 255, np.uint8)
            tiles.append(np.concatenate([hr, gap, ref_panel, gap, lr_up], axis=1))
        if not tiles:
            return False
        sep = np.full((4, tiles[0].shape[1], 3), 255, np.uint8)
        rows_and_gaps = [x for tile in tiles for x in (tile, sep)][:-1]
        grid = np.concatenate([preview_header(t, mag), *rows_and_gaps], axis=0)
        buf = io.BytesIO()
        Image.fromarray(grid).save(buf, format="PNG")
        self.store.write_bytes(PREVIEW_NAME, buf.getvalue())
        return True


PREVIEW_HEADER_PX = 14


def preview_header(tile: int, mag: int) -> np.ndarray:
    """The preview's label strip: the names of its three columns (HR | reference | generated LR,
    the last two magnified ``mag``x by pixel repetition) over panels ``tile`` px wide."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (3 * tile + 8, PREVIEW_HEADER_PX), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    labels = ("HR tile", f"reference (centre, x{mag})", f"generated LR (x{mag})")
    if tile < 7 * max(map(len, labels)):  # about 6-7 px per character: narrow panels get short names
        labels = ("HR", "ref", "LR")
    for i, label in enumerate(labels):
        draw.text((i * (tile + 4) + 2, 1), label, fill=(0, 0, 0))
    return np.asarray(strip)


_CHANGED = {
    "manifest_digest": "manifest",
    "manifest_unrecorded": (
        "manifest (its settings are not recorded: written before 2026-12-08 by a RealDGen that may "
        "digest the same YAML differently, e.g. where a default changed since; finish it with the "
        "version that started it)"
    ),
    "manifest_rehashed": (
        "manifest digest (the same settings, digested by another RealDGen version; finish it with "
        "the version that started it)"
    ),
    "model_digest": "model (checkpoint contents)",
    "inputs_digest": "input listing (files added, removed or renamed under hr.uri or a reference source)",
    "inputs_unrecorded": "input listing (not recorded: written before inputs_digest existed)",
    "inputs_v1": "input listing (recorded without the references, before 2026-12-06)",
}


def what_changed(why: set[str], manifest_changes: Sequence[str] = ()) -> str:
    """What differs between an output's dataset and this plan, in words (keys of classify_output);
    ``manifest_changes`` ("key: old → new", :func:`payload_changes`) follow the manifest's."""
    words = [
        f"{_CHANGED[k]} ({'; '.join(manifest_changes)})"
        if k == "manifest_digest" and manifest_changes
        else _CHANGED[k]
        for k in sorted(why)
    ]
    return ", ".join(words) or "shard names"


RAY_WORKING_DIR_MARK = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def ray_working_dir_warning(output_uri: str, cwd: str) -> str | None:
    """A warning when a relative local output would land in Ray's copy of the job's working dir
    (``ray job submit --working-dir``): the dataset then lies in Ray's session folder, which Ray
    deletes, not in the checkout it was submitted from. None otherwise."""
    if "://" in output_uri or os.path.isabs(os.path.expanduser(output_uri)):
        return None
    if RAY_WORKING_DIR_MARK not in cwd + os.sep:
        return None
    where = os.path.join(cwd, output_uri)
    return (
        f"warning: output.uri {output_uri!r} is relative and this driver runs in Ray's copy of the "
        f"working dir, so the dataset goes to {where}, inside Ray's session folder (deleted with it), "
        "not to the folder the job was submitted from: name an absolute path or s3:// to keep it"
    )


def run(manifest: GenerateManifest, *, log=print) -> dict:
    """Plan and run a manifest; returns the summary (raises ManifestError / JobFailed)."""
    return GenerateJob(manifest, log=log).run()
