"""The sink: workers write the dataset; the driver only counts.

1. **Parts** (:func:`encode_write_batch`, a Ray Data task stage after generation): encodes a
   batch's samples (PNG + JSON) and writes, per shard the batch touches, one part file
   ``<work>/parts/<run id>/<stem>/part-<hash of its keys>.parquet`` holding the batch's input reports and
   samples (bytes included). The name is a pure function of the rows, so a retried task
   rewrites the same file; rows are never lost to a crash because a part is one atomic write.
   The stage returns one small row per (input, batch): key counts, never bytes.
2. **Compaction** (:func:`compact_shard`, a Ray task, spread over the nodes): once the driver has
   heard every input and sample of a shard, a worker reads the shard's parts, drops duplicates
   (a retried batch may have been cut differently; the same key always has the same bytes),
   sorts by key and writes the final ``{stem}.tar``, ``{stem}.parquet`` and ``{stem}_stats.json``
   (last), then deletes the parts. The bytes do not depend on which node wrote them, on batch
   sizes or on actor counts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.generate.config import SinkConfig
from pipelines.generate.stages import ROW_SCHEMA, EncodeSample, _rows, error_category
from pipelines.storage import DatasetStore, read_parquet, shard_stem

__all__ = [
    "PARQUET_SCHEMA",
    "PART_SCHEMA",
    "REPORT_SCHEMA",
    "encode_write_batch",
    "compact_shard",
    "ShardProgress",
    "IncompleteShard",
]

MAX_ERROR_CATEGORIES = 20

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

# One row per input report or sample, as written into part files: the stages' row fields that the
# shard's tar, parquet and stats need (raw pixels and generation details stay behind).
PART_SCHEMA = pa.schema(
    [
        ROW_SCHEMA.field(n)
        for n in (
            "row_type", "input_index", "key", "uri", "status", "error", "n_samples", "width", "height",
            "seconds", "hr_png", "lr_png", "json",
        )
    ]
)  # fmt: skip

# What the driver receives: one row per (input, batch) — counts and keys, never sample bytes.
REPORT_SCHEMA = pa.schema(
    [
        ("shard", pa.int64()),
        ("input_index", pa.int64()),
        ("reported", pa.bool_()),  # this batch carried the input's report row
        ("n_samples", pa.int64()),  # from the report row (samples the input produced)
        ("input_failed", pa.bool_()),
        ("sample_keys", pa.list_(pa.string())),  # samples of this input written in this batch
        ("samples_failed", pa.int64()),
        ("failure", pa.string()),  # the first failure of this input in this batch: "URI: reason"
    ]
)


# Part-file columns that become a sample's tar members.
_MEMBERS = {"hr_png": "hr.png", "json": "json", "lr_png": "lr.png"}


class _Spill:
    """An anonymous local temp file of byte strings: ``put`` appends one and returns a reader."""

    def __enter__(self) -> _Spill:
        self.file = tempfile.TemporaryFile(prefix="realdgen-compact-")
        self.end = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def put(self, data: bytes | None) -> Callable[[], bytes] | None:
        if data is None:  # kept as it came: the tar writer refuses a member without bytes
            return None
        offset, self.end = self.end, self.end + len(data)
        self.file.seek(offset)
        self.file.write(data)
        return functools.partial(self._get, offset, len(data))

    def _get(self, offset: int, size: int) -> bytes:
        self.file.seek(offset)
        out = self.file.read(size)
        if len(out) != size:
            raise OSError(f"compaction spill file: read {len(out)} of {size} bytes at {offset}")
        return out


class IncompleteShard(RuntimeError):
    """Compaction found fewer rows in the parts than the shard's reports promise."""


def parts_prefix(config: SinkConfig, stem: str) -> str:
    """Where this run's parts of one shard live. The run id keeps parts an earlier, interrupted run
    left (whose delete at this run's start failed) out of this run's shards: they may hold another
    model's samples or another version of an image at the same URI."""
    return f"{config.work}/parts/{config.run_id}/{stem}"


def part_name(config: SinkConfig, stem: str, rows: list[dict]) -> str:
    h = hashlib.sha256("\n".join(sorted(f"{r['row_type']}:{r['key']}" for r in rows)).encode()).hexdigest()
    return f"{parts_prefix(config, stem)}/part-{h[:24]}.parquet"


def encode_write_batch(batch: pa.Table, config: SinkConfig | Mapping[str, Any]) -> pa.Table:
    """Encode samples, write one part file per shard touched, return key counts per input."""
    config = SinkConfig.of(config)
    rows = _rows(EncodeSample(config.scale)(batch))
    store = DatasetStore(config.store, config.storage)
    by_shard: dict[int, list[dict]] = {}
    for r in rows:
        by_shard.setdefault(int(r["shard"]), []).append(r)
    out: list[dict] = []
    for shard, srows in sorted(by_shard.items()):
        part = [{k: r.get(k) for k in PART_SCHEMA.names} for r in srows]
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(part, schema=PART_SCHEMA), buf, compression="none")
        store.write_bytes(part_name(config, shard_stem(config.name, shard), part), buf.getvalue())
        per_input: dict[int, dict] = {}
        for r in srows:
            rep = per_input.setdefault(
                int(r["input_index"]),
                {
                    "shard": shard,
                    "input_index": int(r["input_index"]),
                    "reported": False,
                    "n_samples": None,
                    "input_failed": False,
                    "sample_keys": [],
                    "samples_failed": 0,
                    "failure": None,
                },
            )
            failed = r["status"] != "ok"
            if r["row_type"] == "input":
                rep.update(reported=True, n_samples=r.get("n_samples") or 0, input_failed=failed)
                if failed and rep["failure"] is None:
                    rep["failure"] = f"{r.get('uri')}: {r.get('error') or r['status']}"
            else:
                rep["sample_keys"].append(r["key"])
                rep["samples_failed"] += failed
                if failed and rep["failure"] is None:
                    rep["failure"] = f"{r.get('uri')} (sample {r['key']}): {r.get('error') or r['status']}"
        out.extend(per_input.values())
    return pa.Table.from_pylist(out, schema=REPORT_SCHEMA)


@dataclass
class ShardProgress:
    """The driver's view of one shard in flight: which inputs reported, which samples landed."""

    index: int
    expected_inputs: int
    started: float = field(default_factory=time.time)
    expected: dict[int, int] = field(default_factory=dict)  # input_index -> n_samples
    keys: dict[int, set[str]] = field(default_factory=dict)
    failed_inputs: set[int] = field(default_factory=set)  # decode failed or a sample failed

    def add(self, rep: Mapping[str, Any]) -> tuple[int, int]:
        """Fold one report row in; returns (new samples ok, new samples failed) for progress."""
        i = int(rep["input_index"])
        if rep["reported"]:
            self.expected[i] = int(rep["n_samples"] or 0)
            if rep["input_failed"]:
                self.failed_inputs.add(i)
        got = self.keys.setdefault(i, set())
        before = len(got)
        got.update(rep["sample_keys"] or ())
        new = len(got) - before
        failed = int(rep["samples_failed"] or 0)
        if failed:
            self.failed_inputs.add(i)
        return max(0, new - failed), min(new, failed)

    def complete(self) -> bool:
        return len(self.expected) == self.expected_inputs and all(
            len(self.keys.get(i, ())) == n for i, n in self.expected.items()
        )


@dataclass
class ShardBook:
    """The driver's shards in flight, by index (``sizes``: inputs per shard). A shard leaves the book
    when complete, to be compacted; a report of it delivered again later (a retried task) adds
    nothing, since every key it promised had landed, and must not open a tracker that never completes."""

    sizes: Sequence[int]
    open: dict[int, ShardProgress] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)

    def add(self, rep: Mapping[str, Any]) -> tuple[ShardProgress | None, int, int, int] | None:
        """Fold one report row in: (the shard's progress if this row completed it, else None; new
        samples ok; new samples failed; inputs newly failed), or None for a row of a shard that has
        already left the book."""
        shard = int(rep["shard"])
        if shard in self.done:
            return None
        st = self.open.get(shard)
        if st is None:
            st = self.open[shard] = ShardProgress(shard, self.sizes[shard])
        before = len(st.failed_inputs)
        ok_new, failed_new = st.add(rep)
        newly_failed = len(st.failed_inputs) - before
        if not st.complete():
            return None, ok_new, failed_new, newly_failed
        del self.open[shard]
        self.done.add(shard)
        return st, ok_new, failed_new, newly_failed


def _node() -> dict:
    info = {"host": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info["node_id"] = ctx.get_node_id()
            info["node_ip"] = ray.util.get_node_ip_address()
    except Exception:
        pass
    return info


@functools.cache
def software() -> dict[str, str]:
    """The versions a shard was written with: RealDGen's and those of the libraries whose code
    decides its bytes (torch: the networks and D; Pillow: the codecs; NumPy), with Python's. The
    digests name the settings and the weights; these name the code, which a reproduction needs too."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        realdgen = version("realdgen")
    except PackageNotFoundError:  # run from a checkout that was not installed
        from realdgen_core import __version__ as realdgen
    # From the installed metadata, not the modules: a compaction task never imports torch (250 MB)
    return {
        "realdgen": realdgen,
        "torch": version("torch"),
        "pillow": version("pillow"),
        "numpy": version("numpy"),
        "python": platform.python_version(),
    }


def _written_by_this_run(
    store: DatasetStore, stem: str, config: SinkConfig, expected_inputs: int
) -> dict | None:
    """The shard's stats when they exist and name this run's manifest, model, inputs and references.

    The job regenerates only shards that are not complete (no such stats at its start), so stats like
    these were written by an earlier attempt of this very compaction."""
    try:
        stats = store.read_json(f"{stem}_stats.json")
    except (FileNotFoundError, ValueError):  # none, or not whole: this attempt writes them
        return None
    want = {
        "manifest_digest": config.digest,
        "model_digest": config.model_digest,
        "inputs_digest": config.inputs_digest,
        "references_digest": config.references_digest,
        "start_digest": config.start_digest,
        "inputs": expected_inputs,
    }
    if not isinstance(stats, dict) or any(stats.get(k) != v for k, v in want.items()):
        return None
    return stats


def compact_shard(
    config: SinkConfig | Mapping[str, Any], index: int, expected_inputs: int, started: float
) -> dict:
    """Read a shard's parts, write its tar, parquet and ``_stats.json`` (last); returns the stats."""
    from realdgen_core.shards import write_tar

    config = SinkConfig.of(config)
    t0 = time.perf_counter()
    store = DatasetStore(config.store, config.storage)
    stem = shard_stem(config.name, index)
    prefix = parts_prefix(config, stem)
    names = store.list_prefix(prefix)
    done = _written_by_this_run(store, stem, config, expected_inputs)
    if done is not None:
        # A retry of this compaction after its _stats.json was written (a part's delete failed, or the
        # worker was lost then): the shard is complete and some parts are gone; finish the clean-up.
        for n in names:
            store.delete(n)
        return done
    inputs: dict[int, dict] = {}
    samples: dict[str, dict] = {}
    # Sample bytes go to a local spill file as each part is read, so the worker holds one part and
    # one tar member at a time, never the whole shard (a cluster shard can be gigabytes).
    with _Spill() as spill:
        for n in names:
            for r in read_parquet(store.read_bytes(n)).to_pylist():
                # A key seen twice (a retried batch, or parts a crashed run left) has the same bytes
                # when it succeeded both times; a success wins over a failure of an earlier attempt.
                rows = inputs if r["row_type"] == "input" else samples
                key = int(r["input_index"]) if r["row_type"] == "input" else r["key"]
                blobs = {member: r.pop(column) for column, member in _MEMBERS.items()}
                if key not in rows or (rows[key]["status"] != "ok" and r["status"] == "ok"):
                    if rows is samples and r["status"] == "ok":
                        r["members"] = {member: spill.put(data) for member, data in blobs.items()}
                    rows[key] = r
        promised = sum(int(r.get("n_samples") or 0) for r in inputs.values())
        if len(inputs) != expected_inputs or len(samples) != promised:
            raise IncompleteShard(
                f"{stem}: parts hold {len(inputs)}/{expected_inputs} inputs and "
                f"{len(samples)}/{promised} samples"
            )
        ok = [s for s in samples.values() if s["status"] == "ok"]
        failed = [s for s in samples.values() if s["status"] != "ok"]
        members = [{"__key__": s["key"], **s["members"]} for s in ok]
        nbytes = store.write_stream(f"{stem}.tar", functools.partial(write_tar, members))

    failed_by_input = Counter(s["input_index"] for s in failed)
    rows = []
    inputs_failed = 0
    errors: Counter[str] = Counter()
    for idx in sorted(inputs):
        rep = inputs[idx]
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
    pbuf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PARQUET_SCHEMA), pbuf, compression="zstd")
    store.write_bytes(f"{stem}.parquet", pbuf.getvalue())

    top = errors.most_common(MAX_ERROR_CATEGORIES)
    hist = dict(top)
    rest = sum(errors.values()) - sum(hist.values())
    if rest:
        hist["other"] = rest
    node = _node()
    stats = {
        "shard": stem,
        "manifest_digest": config.digest,
        "model_digest": config.model_digest,
        "inputs_digest": config.inputs_digest,
        "references_digest": config.references_digest,
        "start_digest": config.start_digest,
        "generator": config.generator,
        "inputs": expected_inputs,
        "inputs_failed": inputs_failed,
        "inputs_with_failures": len(
            {*failed_by_input, *(i for i, r in inputs.items() if r["status"] != "ok")}
        ),
        "samples": len(ok),
        "samples_failed": len(failed),
        "bytes": nbytes,
        "errors": hist,
        "timings": {
            "decode_s": round(sum(r.get("seconds") or 0.0 for r in inputs.values()), 4),
            "generate_s": round(sum(s.get("seconds") or 0.0 for s in samples.values()), 4),
            "shard_wall_s": round(time.time() - started, 4),
            "write_s": round(time.perf_counter() - t0, 4),
        },
        "host": node["host"],
        "writer": node,
        "software": software(),
        "parts": len(names),
        "finished_at": time.time(),
    }
    if config.manifest:  # what manifest_digest hashed: a resume with another manifest names the keys
        stats["manifest"] = dict(config.manifest)
    store.write_json(f"{stem}_stats.json", stats)
    for n in names:
        store.delete(n)
    return stats
