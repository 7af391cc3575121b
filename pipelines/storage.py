"""Storage: fsspec/s3fs file systems, dataset folder I/O, shard names, done-markers, the run lock.

Paths are local paths, ``file://`` URIs or ``s3://bucket/prefix``. s3fs takes its endpoint from
the manifest's :class:`~pipelines.manifest.StorageOptions` or ``AWS_ENDPOINT_URL`` and its
credentials from the environment of the process it runs in (never from arguments passed
around, so nothing secret reaches task arguments or logs).

Atomicity: a local file is written to a hidden temporary name and renamed into place; an S3
object is written with one PUT, which is atomic for readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

__all__ = [
    "storage_kwargs",
    "get_fs",
    "split_uri",
    "join_uri",
    "shard_stem",
    "DatasetStore",
    "RunLock",
    "LockError",
    "fetch_to_local",
    "INDEX_NAME",
    "PREVIEW_NAME",
    "LOCK_NAME",
]

INDEX_NAME = "_index.json"
PREVIEW_NAME = "_preview.png"
LOCK_NAME = "_lock.json"


def storage_kwargs(options: Any | None) -> dict:
    """Plain, picklable, credential-free storage options (``endpoint_url``, ``region``)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        raw = dict(options)
    else:
        raw = options.model_dump() if hasattr(options, "model_dump") else dict(vars(options))
    return {k: v for k, v in raw.items() if k in ("endpoint_url", "region") and v}


def get_fs(uri: str, options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URI; s3 endpoint from options or ``AWS_ENDPOINT_URL``."""
    opts = storage_kwargs(options)
    if uri.startswith("s3://"):
        import s3fs

        kwargs: dict[str, Any] = {}
        endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        region = opts.get("region") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        return s3fs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(path))


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme_prefix, path)``: ``("s3://", "b/p")`` or ``("", "/abs/p")``."""
    if uri.startswith("s3://"):
        return "s3://", uri[len("s3://") :]
    return "", uri[len("file://") :] if uri.startswith("file://") else uri


def join_uri(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name.lstrip("/")


def shard_stem(name: str, index: int) -> str:
    """Deterministic, zero-padded shard name: ``NAME-NNNNNN``."""
    return f"{name}-{index:06d}"


def fetch_to_local(uri: str, options: Mapping | None = None) -> str:
    """Local path of ``uri``: itself when local, else a cached download (keyed by URI)."""
    if not uri.startswith("s3://"):
        return get_fs(uri)[1]
    fs, path = get_fs(uri, options)
    cache = os.path.join(tempfile.gettempdir(), "realdgen-cache")
    os.makedirs(cache, exist_ok=True)
    info = fs.info(path)
    tag = hashlib.sha256(f"{uri}|{info.get('size')}|{info.get('ETag', '')}".encode()).hexdigest()[:16]
    local = os.path.join(cache, f"{tag}-{os.path.basename(path)}")
    if not os.path.exists(local):
        tmp = f"{local}.{uuid.uuid4().hex}.tmp"
        fs.get_file(path, tmp)
        os.replace(tmp, local)
    return local


class DatasetStore:
    """A dataset folder (local or s3): list names, read/write whole objects atomically, delete."""

    def __init__(self, uri: str, options: Mapping | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.options = storage_kwargs(options)
        self.fs, self.root = get_fs(self.uri, self.options)
        self.remote = self.uri.startswith("s3://")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def ensure(self) -> None:
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def names(self) -> list[str]:
        """Sorted names of the objects directly in the folder (fresh listing, no cache)."""
        if self.remote:
            self.fs.invalidate_cache(self.root)
            try:
                entries = self.fs.ls(self.root, detail=False, refresh=True)
            except FileNotFoundError:
                return []
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)
        if not os.path.isdir(self.root):
            return []
        return sorted(n for n in os.listdir(self.root) if os.path.isfile(os.path.join(self.root, n)))

    def exists(self, name: str) -> bool:
        if self.remote:
            self.fs.invalidate_cache(self.path(name))
            return self.fs.exists(self.path(name))
        return os.path.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        if self.remote:
            return self.fs.cat_file(self.path(name))
        with open(self.path(name), "rb") as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a whole object atomically (temp + rename locally; one PUT on s3)."""
        if self.remote:
            self.fs.pipe_file(self.path(name), bytes(data))
            return
        self.ensure()
        final = self.path(name)
        tmp = os.path.join(self.root, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def write_json(self, name: str, obj: Any, *, indent: int | None = 2) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.remote:
                self.fs.rm_file(self.path(name))
            else:
                os.unlink(self.path(name))

    def clean_temporaries(self) -> None:
        """Remove temp files a crashed writer left behind (local only; s3 has none)."""
        if self.remote or not os.path.isdir(self.root):
            return
        for n in os.listdir(self.root):
            if n.startswith(".") and n.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.root, n))


class LockError(RuntimeError):
    """Another live job holds the output's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped) is not alive for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class RunLock:
    """``_lock.json`` in the output folder: host, pid, run id and a heartbeat.

    Acquire refuses when a live job holds it; a lock whose pid is dead on this host, or whose
    heartbeat is older than ``stale_s``, is taken over. On s3 the create is write-then-verify
    (best effort: two jobs starting in the same second could both win; the shard writes are
    still atomic and deterministic, so the worst case is duplicated work, not a corrupt dataset).
    """

    store: DatasetStore
    heartbeat_s: float = 10.0
    stale_s: float | None = None

    def __post_init__(self) -> None:
        self.run_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.stale_s is None:
            self.stale_s = max(30.0, 6 * self.heartbeat_s)

    def _payload(self) -> bytes:
        return json.dumps(
            {"host": self.host, "pid": self.pid, "run_id": self.run_id, "heartbeat": time.time()}
        ).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.store.read_bytes(LOCK_NAME))
        except (FileNotFoundError, json.JSONDecodeError, ValueError):
            return None

    def _is_live(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return False
        if holder.get("host") == self.host:
            return _pid_alive(int(holder.get("pid", -1)))
        return True

    def acquire(self) -> None:
        self.store.ensure()
        if not self.store.remote:
            path = self.store.path(LOCK_NAME)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(self._payload())
                self._start_heartbeat()
                return
            except FileExistsError:
                pass
        holder = self._holder()
        if holder is not None and holder.get("run_id") != self.run_id and self._is_live(holder):
            raise LockError(
                f"{self.store.uri} is being written by another live job "
                f"(host {holder.get('host')}, pid {holder.get('pid')}, heartbeat "
                f"{time.time() - float(holder.get('heartbeat', 0)):.0f}s ago); "
                f"wait for it or remove {LOCK_NAME} if it is dead"
            )
        self.store.write_bytes(LOCK_NAME, self._payload())
        time.sleep(0.05)
        check = self._holder()
        if not check or check.get("run_id") != self.run_id:
            raise LockError(f"{self.store.uri}: lost the race for {LOCK_NAME} to another job")
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                with contextlib.suppress(Exception):
                    self.store.write_bytes(LOCK_NAME, self._payload())

        self._thread = threading.Thread(target=beat, name="realdgen-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("run_id") == self.run_id:
            self.store.delete(LOCK_NAME)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
