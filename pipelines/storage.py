"""Storage: fsspec/s3fs file systems, dataset folder I/O, shard names, done-markers, the run lock.

Paths are local paths, ``file://`` URIs or ``s3://bucket/prefix``. s3fs takes its endpoint from
the manifest's :class:`~pipelines.manifest.StorageOptions` or ``AWS_ENDPOINT_URL`` and its
credentials from the environment of the process it runs in (never from arguments passed
around, so nothing secret reaches task arguments or logs).

Atomicity: a local file is written to a hidden temporary name and renamed into place; an S3
object is written with one PUT, which is atomic for readers.

Transient failures: every :class:`DatasetStore` operation and :func:`fetch_to_local` runs inside
:func:`with_retries`, which retries errors :func:`is_transient` classifies as passing (connection
refused/reset, timeouts, HTTP 5xx, throttling) with exponential backoff and jitter for a time
budget (``REALDGEN_STORAGE_RETRY_S``, default 120 s) and then raises
:class:`TransientStorageError`. Anything else (missing object, access denied, bad data) propagates
at once. s3fs and botocore are configured to fail fast (5 s connect / 60 s read timeouts, no
s3fs-level retry, botocore ``max_attempts=2``, i.e. at most two quick retries) so this loop owns
the policy.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, BinaryIO, TypeVar

import fsspec

__all__ = [
    "storage_kwargs",
    "get_fs",
    "split_uri",
    "file_uri_path",
    "local_abspath",
    "join_uri",
    "shard_stem",
    "DatasetStore",
    "RunLock",
    "LockError",
    "fetch_to_local",
    "TransientStorageError",
    "StorageAccessError",
    "access_refused",
    "task_error_message",
    "is_transient",
    "with_retries",
    "retry_budget_s",
    "RETRY_ENV",
    "INDEX_NAME",
    "PREVIEW_NAME",
    "LOCK_NAME",
]

INDEX_NAME = "_index.json"
PREVIEW_NAME = "_preview.png"
LOCK_NAME = "_lock.json"
RETRY_ENV = "REALDGEN_STORAGE_RETRY_S"
# A command's exit status when storage stayed unavailable past the retry budget: sysexits'
# EX_TEMPFAIL, the one failure the same command run again fixes (a scheduler may retry it alone).
EXIT_TEMPFAIL = 75
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
DEFAULT_RETRY_S = 120.0

log = logging.getLogger("realdgen.storage")
T = TypeVar("T")

# Part size of the multipart uploads of DatasetStore.write_stream (s3's minimum part is 5 MiB),
# raised for objects that would need more than S3_MAX_PARTS of them (s3's limit; 78 GiB at 8 MiB).
UPLOAD_CHUNK = 8 * 2**20
S3_MAX_PARTS = 10_000


def upload_chunk(size: int) -> int:
    """The multipart part size for an object of ``size`` bytes: ``UPLOAD_CHUNK``, or the smallest
    whole MiB that keeps the upload within ``S3_MAX_PARTS`` parts."""
    need = -(-size // S3_MAX_PARTS)
    return max(UPLOAD_CHUNK, -(-need // 2**20) * 2**20)


# s3fs/botocore fail fast; :func:`with_retries` owns the retry policy.
def _s3_config() -> dict:
    """botocore ``Config`` arguments (a fresh dict per call): short timeouts, few retries.

    botocore counts ``max_attempts`` as retries after the first try (``total_max_attempts``
    would count them all): a refused connection costs about one to two seconds per call."""
    return {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}


_S3FS_RETRIES = 1  # attempts per s3fs call (s3fs's own loop; 1 = no retry of its own)


# ------------------------------------------------------------------------------------------------
# Transient errors and the retry loop
# ------------------------------------------------------------------------------------------------


class TransientStorageError(RuntimeError):
    """Storage stayed unavailable for the whole retry budget (connection, timeout, 5xx, throttling).

    Not a property of the object read or written: the caller should fail the task (so it is
    retried later), never record the input as permanently failed."""


class StorageAccessError(RuntimeError):
    """Object storage refused this process's credentials (none, expired, invalid, or not allowed
    here). Not a property of the object: a job stops and names what to fix instead of recording
    inputs as failed (a failure row is kept by a resumed run, and would never be read again)."""


# S3 error codes that refuse the caller rather than the request (s3fs turns them into PermissionError)
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "AccountProblem",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "NotSignedUp",
        "RequestTimeTooSkewed",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)

# S3 / AWS error codes that mean "try again later".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "OperationAborted",  # "a conflicting conditional operation is in progress; try again"
        "ConditionalRequestConflict",  # 409 from a concurrent conditional write; retry
        "EC2ThrottledException",
    }
)
# Plain OSError errnos of a network that is (for now) not there.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, n)
    for n in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EPIPE",
        "ETIMEDOUT",
        "EHOSTUNREACH",
        "EHOSTDOWN",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EAGAIN",
    )
    if hasattr(errno, n)
)
# Definitely not transient, whatever they were raised from.
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,  # bad data (json.JSONDecodeError, ImageError, …)
    TypeError,
    KeyError,
)


def _client_error_info(exc: BaseException) -> tuple[str, int | None] | None:
    """``(code, http status)`` of a botocore ``ClientError``-like exception, else ``None``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, Mapping):
        return None
    err = response.get("Error") or {}
    meta = response.get("ResponseMetadata") or {}
    code = str(err.get("Code") or "")
    status = meta.get("HTTPStatusCode")
    if status is None and code.isdigit():
        status = int(code)
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    return code, status


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception types of botocore and aiohttp that mean "not reachable right now"."""
    types: list[type[BaseException]] = []
    try:  # connection failures, closed connections, read timeouts, unparsable replies
        from botocore import exceptions as bce
        from botocore.parsers import ResponseParserError

        types += [
            bce.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, proxy
            bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
            bce.IncompleteReadError,
            ResponseParserError,  # throttling replies sometimes arrive as invalid XML (s3fs #484)
        ]
    except ImportError:  # pragma: no cover - botocore ships with s3fs
        pass
    try:  # refused, reset, ServerDisconnected, payload cut short, server timeouts
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _classify(exc: BaseException) -> bool | None:
    """True: transient; False: permanent; None: this link says nothing (look at its cause)."""
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    info = _client_error_info(exc)
    if info is not None:  # an S3 answer: its code / status decide
        code, status = info
        if code in _TRANSIENT_CODES:
            return True
        if status is not None and (status >= 500 or status == 429):
            return code != "NotImplemented"  # 501: the store lacks a feature, retrying won't help
        return False
    if isinstance(exc, _transient_types()):
        return True
    # builtins: ConnectionRefused/Reset/Aborted, BrokenPipe, TimeoutError (socket.timeout,
    # asyncio.TimeoutError, fsspec's FSTimeoutError)
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means "storage is unavailable right now" rather than "this is wrong".

    Transient: connection refused/reset, endpoint connection errors, timeouts, a server that
    closed the connection, HTTP 5xx (but 501), 429 and the S3 codes ``SlowDown``, ``Throttling``,
    ``RequestTimeout``, ``InternalError``, ``ServiceUnavailable`` (and kin). Not transient: a
    missing object or bucket, access denied, invalid data, anything unknown. s3fs translates
    botocore errors into builtins (``OSError(EIO)`` for a 500, ``TimeoutError`` for
    ``RequestTimeout``, …) with the original as ``__cause__`` (or ``__context__``), so the chain is
    walked: the first link that says anything decides.
    """
    for e in _chain(exc):
        verdict = _classify(e)
        if verdict is not None:
            return verdict
    return False


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from (``__cause__``, ``__context__``), breadth first,
    each once, at most 33."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen or len(seen) > 32:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def missing_credentials(exc: BaseException) -> str | None:
    """A user-facing message when ``exc`` (or an error it was raised from) says that no S3
    credentials were found; None otherwise."""
    for e in _chain(exc):
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            return (
                f"no S3 credentials ({e}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                "AWS_PROFILE, or give the machine a role) in the environment of this command; "
                "manifests never hold them"
            )
    return None


def access_refused(exc: BaseException) -> str | None:
    """A user-facing reason when ``exc`` (or an error it was raised from) is object storage
    refusing this process's credentials: none found, or an S3 answer 403 / an access code
    (expired token, unknown key id, bad signature, access denied). None otherwise; a local
    file's ``PermissionError`` is None too (that file is the problem, not the credentials)."""
    why = missing_credentials(exc)
    if why is not None:
        return why
    for e in _chain(exc):
        info = _client_error_info(e)
        if info is not None and (info[0] in _ACCESS_CODES or info[1] == 403):
            return (
                f"access refused by storage ({_describe(e)}): check the credentials in this "
                "process's environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, "
                "AWS_PROFILE or the machine's role) and that they may read and write this location"
            )
    return None


def task_error_message(exc: BaseException, cls: type[BaseException]) -> str | None:
    """The message of a ``cls`` error raised in a Ray task, from what reaches the driver: Ray Data
    hands the driver a ``RayTaskError(UserCodeException)`` that keeps only the remote error's
    text (``…\nStorageAccessError: message``), so the last such line is taken. None if absent."""
    mark = f"{cls.__name__}: "
    for e in _chain(exc):
        text = str(e)
        at = text.rfind(mark)
        if at >= 0:  # a Ray wrapper's text (ray.get's is also an instance of cls): its last line
            return text[at + len(mark) :].split("\n", 1)[0].strip() or None
        if isinstance(e, cls):
            return text
    return None


def retry_budget_s() -> float:
    """The retry budget in seconds: ``REALDGEN_STORAGE_RETRY_S``, else 120."""
    raw = os.environ.get(RETRY_ENV)
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            log.warning("ignoring %s=%r (not a number); using %.0f s", RETRY_ENV, raw, DEFAULT_RETRY_S)
    return DEFAULT_RETRY_S


# a URL in a client's error message: its path is cut (an endpoint's path is the user's setting, which
# messages never echo; botocore writes "Could not connect to the endpoint URL: <endpoint/bucket/key>")
_URL_PATH = re.compile(r"(https?://[^/\s\"'<>]+)/[^\s\"'<>]*")


def _describe(exc: BaseException) -> str:
    text = _URL_PATH.sub(r"\1/…", str(exc).strip().replace("\n", " "))
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


_UNREACHABLE = ("EndpointConnectionError", "ConnectionRefusedError", "gaierror", "ClientConnectorError")


def _endpoint_hint(exc: BaseException) -> str:
    """For an endpoint nobody answers at (refused, unknown host): a wrong setting looks the same as
    an outage, so say where the endpoint comes from. Empty otherwise (timeouts, 5xx, throttling)."""
    if any(type(e).__name__ in _UNREACHABLE for e in _chain(exc)):
        where = f"storage.endpoint_url (--endpoint for realdgen) or {ENDPOINT_ENV}"
        return f"; if this endpoint is the wrong one, fix {where}"
    return ""


def with_retries(
    fn: Callable[[], T],
    *,
    what: str,
    budget_s: float | None = None,
    initial_s: float = 0.2,
    max_backoff_s: float = 5.0,
    log_every_s: float = 5.0,
    sleep: Callable[[float], Any] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried on transient errors (:func:`is_transient`) until ``budget_s`` is spent.

    Backoff is exponential from ``initial_s`` up to ``max_backoff_s``, each wait drawn uniformly
    from its upper half (jitter), never past the budget; the last attempt is made when the
    budget runs out. Then :class:`TransientStorageError` is raised, naming ``what`` and the last
    error. Storage refusing the credentials (:func:`access_refused`) raises
    :class:`StorageAccessError` naming ``what``; other non-transient errors propagate unchanged
    at once; a :class:`TransientStorageError`
    from an inner call (whose own budget is spent) too. Retries are logged to
    ``realdgen.storage`` at most once every ``log_every_s``. ``budget_s`` defaults to
    :func:`retry_budget_s`. ``fn`` must be safe to repeat (whole-object reads and PUTs are).
    """
    budget = retry_budget_s() if budget_s is None else max(0.0, float(budget_s))
    start = clock()
    delay = initial_s
    attempts = 0
    last_log = -float("inf")
    while True:
        try:
            out = fn()
        except (TransientStorageError, StorageAccessError):
            raise
        except Exception as exc:
            if not is_transient(exc):
                why = access_refused(exc)
                if why is not None:
                    raise StorageAccessError(f"{what}: {why}") from exc
                raise
            attempts += 1
            now = clock()
            elapsed = now - start
            remaining = budget - elapsed
            if remaining <= 0:
                raise TransientStorageError(
                    f"{what}: storage unavailable for {elapsed:.0f} s "
                    f"({attempts} attempt{'s' if attempts != 1 else ''}; last error: {_describe(exc)})"
                    f"{_endpoint_hint(exc)}"
                ) from exc
            if now - last_log >= log_every_s:
                last_log = now
                log.warning(
                    "%s: storage unavailable (%s); retrying, %.0f s of %.0f s budget left%s",
                    what,
                    _describe(exc),
                    remaining,
                    budget,
                    _endpoint_hint(exc),
                )
            sleep(min(remaining, random.uniform(delay / 2, delay)))
            delay = min(max_backoff_s, delay * 2)
            continue
        if attempts:
            log.info("%s: storage reachable again after %d failed attempts", what, attempts)
        return out


def storage_kwargs(options: Any | None) -> dict:
    """Plain, picklable, credential-free storage options (``endpoint_url``, ``region``)."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        raw = dict(options)
    else:
        raw = options.model_dump() if hasattr(options, "model_dump") else dict(vars(options))
    return {k: v for k, v in raw.items() if k in ("endpoint_url", "region") and v}


def endpoint_secret(value: str) -> str | None:
    """What an endpoint URL carries that could be a secret, or None: ``"userinfo"`` (``user:password@``
    before the host) or ``"query"`` (anything after ``?`` or ``#``, e.g. ``X-Amz-Security-Token=``).
    The one test behind the manifest's ``storage.endpoint_url``, the CLIs' ``--endpoint`` and
    ``AWS_ENDPOINT_URL`` (:func:`env_endpoint`); each refuses without echoing the value."""
    rest = value.split("://", 1)[-1]
    if "@" in rest.split("/", 1)[0]:
        return "userinfo"
    if "?" in rest or "#" in rest:
        return "query"
    return None


def env_endpoint() -> str | None:
    """``AWS_ENDPOINT_URL`` from this process's environment, None when unset or empty.

    Raises :class:`StorageAccessError` (a setting to fix, not an outage to retry) when it holds
    credentials (``user:password@``; botocore then refuses every request with an HTTP client error
    that a job would retry for its whole budget) or a query; the value is never echoed."""
    value = os.environ.get(ENDPOINT_ENV, "").strip()
    if not value:
        return None
    if endpoint_secret(value):
        raise StorageAccessError(
            f"{ENDPOINT_ENV} must not hold credentials or anything after '?' or '#' (value not shown): "
            "give scheme://host[:port] there and the credentials in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY"
        )
    return value


def get_fs(uri: str, options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URI; s3 endpoint from options or ``AWS_ENDPOINT_URL``."""
    opts = storage_kwargs(options)
    if uri.startswith("s3://"):
        import s3fs

        kwargs: dict[str, Any] = {"config_kwargs": _s3_config()}
        endpoint = opts.get("endpoint_url") or env_endpoint()
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        region = opts.get("region") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["client_kwargs"] = {"region_name": region}
        fs = s3fs.S3FileSystem(**kwargs)
        fs.retries = _S3FS_RETRIES  # an instance attribute (s3fs has no constructor argument for it)
        return fs, uri[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(file_uri_path(uri)))


# Remote tar header scans read in 64 KiB blocks: with s3fs's default 50 MiB read-ahead every seek to
# the next header fetched the members' data too (a scan downloaded the whole shard).
HEADER_SCAN_OPEN = {"block_size": 1 << 16, "cache_type": "readahead"}


def open_for_header_scan(fs: fsspec.AbstractFileSystem, path: str):
    """``fs.open(path, "rb")`` for reading a tar's headers without its members' data."""
    from fsspec.implementations.local import LocalFileSystem

    return fs.open(path, "rb", **({} if isinstance(fs, LocalFileSystem) else HEADER_SCAN_OPEN))


def file_uri_path(uri: str) -> str:
    """The local path a ``file://`` URI names (``file:///data/x``: ``/data/x``); any other string as
    it is. The rest of the URI is taken as written, not percent-decoded, as fsspec's local
    filesystem takes it, so a manifest means the same folder to both."""
    if not uri.startswith("file://"):
        return uri
    path = uri[len("file://") :]
    return _windows_file_path(path) if os.name == "nt" else path


def _windows_file_path(path: str) -> str:
    """A ``file://`` URI's rest on Windows: ``/C:/data`` (from ``file:///C:/data``) is ``C:/data``.
    Kept, the leading slash made ``C:`` a folder name below the current drive's root (``C:\\C:\\data``,
    which cannot exist). The drive test is fsspec's (``make_path_posix``); separators stay ``/``,
    so the root as written still splits into its parts."""
    return path[1:] if re.match(r"/[A-Za-z]:", path) else path


def local_abspath(path: str) -> str:
    """``path`` (``~`` expanded) made absolute and ``/``-separated, the form fsspec's local
    filesystem lists files in. On Windows os.path.abspath gives ``C:\\data\\hr`` where fsspec lists
    ``C:/data/hr/x.png``, so a prefix test between the two never held. On POSIX: os.path.abspath."""
    return _abspath_with_slashes(path, os.path)


def _abspath_with_slashes(path: str, pathmod: ModuleType) -> str:
    """:func:`local_abspath` with a platform's path module (``ntpath``, ``posixpath``): the same as
    fsspec's ``make_path_posix`` of an absolute path (``C:/d``, ``//server/share/d``)."""
    return pathmod.abspath(pathmod.expanduser(path)).replace(pathmod.sep, "/")


def split_uri(uri: str) -> tuple[str, str]:
    """``(scheme_prefix, path)``: ``("s3://", "b/p")`` or ``("", "/abs/p")``."""
    if uri.startswith("s3://"):
        return "s3://", uri[len("s3://") :]
    return "", file_uri_path(uri)


def join_uri(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name.lstrip("/")


def shard_stem(name: str, index: int) -> str:
    """Deterministic, zero-padded shard name: ``NAME-NNNNNN``."""
    return f"{name}-{index:06d}"


def download_cache() -> str:
    """This user's download folder, ``$TMPDIR/realdgen-cache-<uid>`` (mode 0700). One shared by every
    user would fail for the second one (permissions) or hand them a file another user placed there,
    so a folder that is not ours, or that others may write to, is refused."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    cache = os.path.join(tempfile.gettempdir(), f"realdgen-cache-{uid}")
    os.makedirs(cache, mode=0o700, exist_ok=True)
    st = os.stat(cache)
    if hasattr(os, "getuid") and (st.st_uid != uid or st.st_mode & 0o022):
        raise PermissionError(
            f"download cache {cache} is not owned by this user (uid {uid}) or others may write to it; "
            "remove it, or set TMPDIR to a folder of your own"
        )
    return cache


def read_parquet(source: bytes | BinaryIO, *, columns: list[str] | None = None, schema: Any = None):
    """One parquet file (its bytes, or a binary file object read whole) as a ``pyarrow.Table``, read
    without starting any of pyarrow's threads. Threads pyarrow starts for a read (its I/O and CPU
    pools; ``pq.read_table`` starts them even with ``use_threads=False``) can abort the process at
    exit in their teardown ("terminate called without an active exception", exit 134), so a job or
    command that finished its work would report a crash: measured with pyarrow 26.0.1, 4 of 12 runs
    of a script reading three small files with ``read_table``, and 1 of 8 in CI with
    ``read_table(use_threads=False)``. ``ParquetFile`` over an in-memory buffer, read on the calling
    thread, starts none. The files read here are one shard's rows, one plan block or one listing.

    ``columns`` keeps only those columns; ``schema`` selects and casts the table to it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = source if isinstance(source, bytes | bytearray | memoryview) else source.read()
    table = pq.ParquetFile(pa.BufferReader(data)).read(columns=columns, use_threads=False)
    return table.select(schema.names).cast(schema) if schema is not None else table


def fetch_to_local(uri: str, options: Mapping | None = None) -> str:
    """Local path of ``uri``: itself when local, else a cached download (keyed by URI).

    The download is retried on transient errors (:func:`with_retries`)."""
    if not uri.startswith("s3://"):
        return get_fs(uri)[1]
    fs, path = get_fs(uri, options)
    cache = download_cache()

    def fetch() -> str:
        info = fs.info(path)
        tag = hashlib.sha256(f"{uri}|{info.get('size')}|{info.get('ETag', '')}".encode()).hexdigest()[:16]
        local = os.path.join(cache, f"{tag}-{os.path.basename(path)}")
        if not os.path.exists(local):
            tmp = f"{local}.{uuid.uuid4().hex}.tmp"
            try:
                fs.get_file(path, tmp)
                os.replace(tmp, local)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return local

    return with_retries(fetch, what=f"fetch {uri}")


class DatasetStore:
    """A dataset folder (local or s3): list names, read/write whole objects atomically, delete.

    Every operation is retried on transient storage errors (:func:`with_retries`; ``budget_s``
    overrides the default budget) and raises :class:`TransientStorageError` when storage stays
    unavailable; other errors (a missing object, access denied) propagate at once.
    """

    def __init__(self, uri: str, options: Mapping | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.options = storage_kwargs(options)
        self.fs, self.root = get_fs(self.uri, self.options)
        self.remote = self.uri.startswith("s3://")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _what(self, verb: str, name: str | None = None) -> str:
        return f"{verb} {join_uri(self.uri, name) if name else self.uri}"

    def ensure(self) -> None:
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def names(self, *, budget_s: float | None = None) -> list[str]:
        """Sorted names of the objects directly in the folder (fresh listing, no cache)."""
        return with_retries(self._names, what=self._what("list"), budget_s=budget_s)

    def _names(self) -> list[str]:
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

    def exists(self, name: str, *, budget_s: float | None = None) -> bool:
        def probe() -> bool:
            if self.remote:
                self.fs.invalidate_cache(self.path(name))
                return self.fs.exists(self.path(name))
            return os.path.exists(self.path(name))

        return with_retries(probe, what=self._what("check", name), budget_s=budget_s)

    def read_bytes(self, name: str, *, budget_s: float | None = None) -> bytes:
        def read() -> bytes:
            if self.remote:
                return self.fs.cat_file(self.path(name))
            with open(self.path(name), "rb") as f:
                return f.read()

        return with_retries(read, what=self._what("read", name), budget_s=budget_s)

    def open_read(self, name: str) -> BinaryIO:
        """A file object reading ``name`` from the start (buffered ranged reads on s3): for reading
        the beginning of a large object without fetching it whole. Not retried: callers use it where
        a failure is acceptable (the preview)."""
        if self.remote:
            return self.fs.open(self.path(name), "rb")
        return open(self.path(name), "rb")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes, *, budget_s: float | None = None) -> None:
        """Write a whole object atomically (temp + rename locally; one PUT on s3).

        A retried PUT rewrites the whole object, so retrying is idempotent."""
        data = bytes(data)
        with_retries(lambda: self._write(name, data), what=self._what("write", name), budget_s=budget_s)

    def _write(self, name: str, data: bytes) -> None:
        if self.remote:
            self.fs.pipe_file(self.path(name), data)
            return
        self._write_local(name, lambda f: f.write(data))

    def _write_local(self, name: str, produce: Callable[[BinaryIO], T]) -> T:
        """``produce(f)`` into a temp file next to the target, fsync'd and renamed over it."""
        final = self.path(name)
        folder, base = os.path.split(final)
        os.makedirs(folder, exist_ok=True)  # names may hold folders (the run's _work/ scratch)
        tmp = os.path.join(folder, f".{base}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                out = produce(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return out

    def write_stream(
        self, name: str, produce: Callable[[BinaryIO], T], *, budget_s: float | None = None
    ) -> T:
        """Write an object that ``produce(f)`` streams into a file, atomically; returns its result.

        For objects too large to hold in memory (a shard's tar). Locally ``produce`` writes a temp
        file next to the target, renamed over it when complete, retried like :meth:`write_bytes`
        (so ``produce`` must be safe to call again). On s3 it writes a file in a local temp folder
        (``TMPDIR``: room for the object is needed there), uploaded under the retry budget in
        ``upload_chunk`` parts (8 MiB up to 78 GiB; one PUT below two parts' size; s3fs holds at
        most its concurrency × one part in memory); the object appears only when the upload completes."""
        what = self._what("write", name)
        if not self.remote:
            return with_retries(lambda: self._write_local(name, produce), what=what, budget_s=budget_s)
        with tempfile.TemporaryDirectory(prefix="realdgen-upload-") as folder:
            local = os.path.join(folder, "object")
            with open(local, "wb") as f:
                out = produce(f)
            chunk = upload_chunk(os.path.getsize(local))
            upload = functools.partial(self.fs.put_file, local, self.path(name), chunksize=chunk)
            with_retries(upload, what=what, budget_s=budget_s)
        return out

    def write_json(self, name: str, obj: Any, *, indent: int | None = 2) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode())

    def delete(self, name: str, *, budget_s: float | None = None) -> None:
        def rm() -> None:
            with contextlib.suppress(FileNotFoundError):
                if self.remote:
                    self.fs.rm_file(self.path(name))
                else:
                    os.unlink(self.path(name))

        with_retries(rm, what=self._what("delete", name), budget_s=budget_s)

    def list_prefix(self, prefix: str, *, dirs: bool = False) -> list[str]:
        """Sorted names (relative to the folder) of the objects below ``prefix``, any depth;
        ``dirs``: the sub-folders directly below ``prefix`` instead. Empty when there are none."""

        def ls() -> list[str]:
            base = self.path(prefix.rstrip("/"))
            if self.remote:
                self.fs.invalidate_cache(base)
            try:
                if dirs:
                    found = [p for p in self.fs.ls(base, detail=True) if p["type"] == "directory"]
                    paths = [p["name"] for p in found]
                else:
                    paths = self.fs.find(base)
            except FileNotFoundError:
                return []
            cut = len(self.root.rstrip("/")) + 1
            return sorted(p.rstrip("/")[cut:] for p in paths if not p.rsplit("/", 1)[-1].startswith("."))

        return with_retries(ls, what=self._what("list", prefix), budget_s=None)

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below ``prefix`` (a scratch folder); nothing there is fine.

        What could not be removed is logged as a warning, not raised: s3fs drops the per-object
        errors of a bulk delete, and a local ``rmtree`` may meet a file it may not remove. Callers
        delete scratch whose leftovers are never read again (parts live under a run id)."""

        def rm() -> None:
            base = self.path(prefix.rstrip("/"))
            if self.remote:
                self.fs.invalidate_cache(base)
                paths = self.fs.find(base)
                if paths:
                    self.fs.rm(paths)
                    self.fs.invalidate_cache(base)
                    left = len(self.fs.find(base))
                    if left:
                        log.warning(
                            "%s: %d of %d objects were not deleted",
                            self._what("delete", prefix),
                            left,
                            len(paths),
                        )
            elif os.path.isdir(base):
                shutil.rmtree(base, ignore_errors=True)
                if os.path.exists(base):
                    log.warning("%s: some files could not be removed", self._what("delete", prefix))
                parent = os.path.dirname(base)
                while parent.startswith(self.root.rstrip("/") + "/"):  # drop emptied _work/ folders
                    with contextlib.suppress(OSError):
                        os.rmdir(parent)
                    parent = os.path.dirname(parent)

        with_retries(rm, what=self._what("delete", prefix), budget_s=None)

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
    """Whether process ``pid`` on this host is still running (a lock holder's)."""
    if os.name == "nt":
        # Not os.kill(pid, 0): on Windows signal 0 is CTRL_C_EVENT, so a live holder could be sent
        # Ctrl+C, and a dead pid raises OSError (WinError 87), not ProcessLookupError.
        return _pid_alive_windows(pid, _kernel32())
    return _pid_alive_posix(pid)


def _pid_alive_posix(pid: int) -> bool:
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


_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000  # enough to read an exit code, granted more widely
_STILL_ACTIVE = 259  # GetExitCodeProcess's code for a process that has not exited
_ERROR_ACCESS_DENIED = 5


def _pid_alive_windows(pid: int, kernel32: Any) -> bool:
    """Whether process ``pid`` runs, asked of ``kernel32`` (its OpenProcess, GetExitCodeProcess,
    CloseHandle and GetLastError) without sending it anything. A pid that cannot be opened is gone
    (ERROR_INVALID_PARAMETER) unless access is denied: then it runs under another user. A process
    that exited with code 259 reads as alive; its heartbeat still goes stale."""
    import ctypes

    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return kernel32.GetLastError() == _ERROR_ACCESS_DENIED
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.pointer(code)):
            return True  # unknown: a live job's lock is not taken over on a guess
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


@functools.cache
def _kernel32() -> Any:  # pragma: no cover - Windows only
    """kernel32 with the argument types :func:`_pid_alive_windows` needs (a HANDLE is pointer-sized)."""
    import ctypes

    dll = ctypes.WinDLL("kernel32", use_last_error=True)
    dll.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
    dll.OpenProcess.restype = ctypes.c_void_p
    dll.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    dll.CloseHandle.argtypes = (ctypes.c_void_p,)
    # GetLastError called through ctypes may read an error the interpreter set after OpenProcess
    # returned; with use_last_error ctypes saves the error right after each call.
    dll.GetLastError = ctypes.get_last_error
    return dll


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code (``"PreconditionFailed"``, ``"NotImplemented"``, …) in ``exc``'s chain."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        info = _client_error_info(e)
        if info is not None:
            return info[0] or (str(info[1]) if info[1] is not None else None)
        todo.extend((e.__cause__, e.__context__))
    return None


# Answers of a store that does not do conditional writes (fall back to write-then-verify).
_NO_CONDITIONAL_CODES = frozenset({"NotImplemented", "501", "InvalidArgument", "InvalidRequest", "400"})


@dataclass
class RunLock:
    """``_lock.json`` in the output folder: host, pid, run id and a heartbeat.

    Acquire refuses when a live job holds it; a lock whose pid is dead on this host, or whose
    heartbeat is older than ``stale_s``, is taken over.

    Creating it: locally ``O_CREAT | O_EXCL``. On s3 a conditional PUT (``If-None-Match: *``,
    s3fs ``pipe_file(mode="create")``): exactly one of several jobs starting together creates
    it; the others get ``412 PreconditionFailed`` and apply the liveness rules to the holder.
    The creator still reads the lock back once (covers a store that silently ignores the
    header). A stale holder is taken over by a plain overwrite followed by the same read-back
    (best effort: two jobs taking over the same stale lock in the same instant could both win;
    the shard writes are atomic and deterministic, so the worst case is duplicated work, not a
    corrupt dataset). A store that rejects the header (``501 NotImplemented`` / ``400``) gets
    that write-then-verify for the create too (logged once per lock). ``conditional`` records
    what the last acquire used: ``True`` (conditional create), ``False`` (fallback) or ``None``.

    Every storage call is retried through outages (:func:`with_retries`); the heartbeat thread
    never dies of one: a failed beat is logged and the next one tried on schedule.
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
        self.conditional: bool | None = None
        self.lost: str | None = None  # set by the heartbeat when another job holds the lock now
        if self.stale_s is None:
            self.stale_s = max(30.0, 6 * self.heartbeat_s)

    def _payload(self) -> bytes:
        return json.dumps(
            {"host": self.host, "pid": self.pid, "run_id": self.run_id, "heartbeat": time.time()}
        ).encode()

    def _holder(self, budget_s: float | None = None) -> dict | None:
        """The lock's holder; None when there is none or the file is not one (not a JSON object, or
        a heartbeat that is not a number): such a file is taken over like a dead holder's."""
        try:
            holder = json.loads(self.store.read_bytes(LOCK_NAME, budget_s=budget_s))
        except (FileNotFoundError, json.JSONDecodeError, ValueError):
            return None
        if not isinstance(holder, dict):
            return None
        try:
            beat, pid = float(holder.get("heartbeat", 0)), int(holder.get("pid", -1))
        except (TypeError, ValueError, OverflowError):
            return None
        if not math.isfinite(beat) or not 1 <= pid < 2**31:  # this tool writes a real pid
            return None
        return holder

    def _is_live(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return False
        if holder.get("host") == self.host:
            return _pid_alive(int(holder.get("pid", -1)))
        return True

    def _refuse_if_live(self, holder: dict | None) -> None:
        """Raise :class:`LockError` while ``holder`` is a live job. A holder on another host whose
        heartbeat is still fresh may be a job whose machine is gone (a head pod lost, the job
        resubmitted on a new cluster within ``stale_s``): it is watched until its heartbeat moves
        (alive: refused) or goes stale (taken over by the caller), ``stale_s`` at most."""
        if holder is None or holder.get("run_id") == self.run_id:
            return
        if not self._is_live(holder):
            self._taking_over(holder)
            return
        if holder.get("host") != self.host:
            watched = self._watch(holder)
            if watched is None:
                now = self._holder()
                if now is not None and now.get("run_id") != holder.get("run_id"):
                    self._refuse_if_live(now)  # released, then taken by another job meanwhile
                elif now is not None:  # not when it was released (a job that finished)
                    self._taking_over(holder)
                return
            holder = watched
        raise LockError(
            f"{self.store.uri} is being written by another live job "
            f"(host {holder.get('host')}, pid {holder.get('pid')}, heartbeat "
            f"{time.time() - float(holder.get('heartbeat', 0)):.0f}s ago); "
            f"wait for it or remove {LOCK_NAME} if it is dead"
        )

    def refuse_if_live_here(self) -> None:
        """Raise :class:`LockError` when a live job on this host holds the lock: a cheap look before
        a slow start-up (a local Ray takes seconds). :meth:`acquire` still takes the lock and judges
        holders on other hosts."""
        holder = self._holder()
        if holder is not None and holder.get("host") == self.host and self._is_live(holder):
            self._refuse_if_live(holder)

    def _taking_over(self, holder: dict) -> None:
        """Say that the lock of a job that is gone is taken over (a job killed, its machine lost)."""
        pid_gone = holder.get("host") == self.host and not _pid_alive(int(holder.get("pid", -1)))
        log.warning(
            "%s: taking over %s from a job that is gone (host %s, pid %s%s, heartbeat %.0f s ago); "
            "its complete shards are kept",
            self.store.uri,
            LOCK_NAME,
            holder.get("host"),
            holder.get("pid"),
            ", no longer running" if pid_gone else "",
            time.time() - float(holder.get("heartbeat", 0)),
        )

    def _watch(self, holder: dict) -> dict | None:
        """``holder`` if it proves alive (its heartbeat moves), None once it is stale or gone."""
        beat = holder.get("heartbeat")
        # at most stale_s from now, also for a heartbeat stamped ahead of this clock (skew)
        deadline = min(float(beat or 0), time.time()) + self.stale_s
        log.warning(
            "%s: %s is held by host %s (heartbeat %.0f s ago); watching it for up to %.0f s to tell a "
            "live job from one whose machine is gone",
            self.store.uri,
            LOCK_NAME,
            holder.get("host"),
            time.time() - float(beat or 0),
            max(0.0, deadline - time.time()),
        )
        poll = min(5.0, self.heartbeat_s)
        while True:
            left = deadline - time.time()
            if left <= 0:
                return None
            time.sleep(min(poll, left + 0.05))
            now = self._holder()
            if now is None:
                return None
            if now.get("run_id") != holder.get("run_id") or now.get("heartbeat") != beat:
                return now if self._is_live(now) else None

    def _create_conditional(self) -> bool | None:
        """Conditional PUT: True created, False someone holds it, None not supported here."""
        store = self.store
        path = store.path(LOCK_NAME)
        payload = self._payload()

        def put() -> bool | None:
            try:
                store.fs.pipe_file(path, payload, mode="create")
                return True
            except Exception as exc:
                code = _error_code(exc)
                if isinstance(exc, FileExistsError) or code in ("PreconditionFailed", "412"):
                    return False
                if code in _NO_CONDITIONAL_CODES:
                    log.info(
                        "%s: the store rejects conditional writes (%s); creating %s by write-then-verify",
                        store.uri,
                        code,
                        LOCK_NAME,
                    )
                    return None
                raise

        return with_retries(put, what=store._what("create", LOCK_NAME))

    def _create_local(self) -> bool:
        """Create the lock file with its contents in one step: written to a temp file, then hard-linked
        to ``LOCK_NAME``, which fails if it exists. (An empty file created first and written after
        would let a second job read no holder in between and take the lock over.) Where the file
        system has no hard links, an exclusive create is the fallback. True: created."""
        path = self.store.path(LOCK_NAME)
        # not ".*.tmp": another job's clean_temporaries must not delete it between write and link
        tmp = self.store.path(f".{LOCK_NAME}.{self.run_id}.linking")
        try:
            with open(tmp, "wb") as f:
                f.write(self._payload())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except OSError:  # no hard links here
                pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._payload())
        return True

    def _write_and_verify(self) -> None:
        self.store.write_bytes(LOCK_NAME, self._payload())
        self._verify()

    def _verify(self) -> None:
        time.sleep(0.05)
        check = self._holder()
        if not check or check.get("run_id") != self.run_id:
            raise LockError(f"{self.store.uri}: lost the race for {LOCK_NAME} to another job")

    def acquire(self) -> None:
        self.store.ensure()
        self.conditional = None
        if not self.store.remote:
            if self._create_local():
                self._start_heartbeat()
                return
            holder = self._holder()
            self._refuse_if_live(holder)
            self._write_and_verify()
            self._start_heartbeat()
            return
        created = self._create_conditional()
        self.conditional = created is not None
        if created:
            self._verify()
        else:
            holder = self._holder()
            if created is False and holder is not None and holder.get("run_id") == self.run_id:
                # A retried create whose first attempt did land (its answer was lost): ours.
                self._start_heartbeat()
                return
            self._refuse_if_live(holder)
            self._write_and_verify()  # a stale (or vanished) holder: take over
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            last_log = -float("inf")
            while not self._stop.wait(self.heartbeat_s):
                try:
                    # Beats missed for longer than stale_s (an outage this job survived) let another
                    # job take the lock over: then stop beating (overwriting its lock would let both
                    # write the same prefix) and say so; the job checks ``lost`` and stops.
                    holder = self._holder(budget_s=self.heartbeat_s)
                    if holder is None or holder.get("run_id") != self.run_id:
                        self.lost = (
                            f"{self.store.uri}: {LOCK_NAME} was taken over by another job "
                            + (
                                f"(host {holder.get('host')}, pid {holder.get('pid')})"
                                if holder
                                else "(or removed)"
                            )
                            + " after this job's heartbeats failed for longer than "
                            f"{self.stale_s:.0f} s; this job stops so that only one writes the output"
                        )
                        log.error("%s", self.lost)
                        return
                    # A budget of one period: an outage costs beats, never the thread.
                    self.store.write_bytes(LOCK_NAME, self._payload(), budget_s=self.heartbeat_s)
                except Exception as exc:  # never let the heartbeat end (or crash the job)
                    now = time.monotonic()
                    if now - last_log >= max(30.0, self.heartbeat_s):
                        last_log = now
                        log.warning(
                            "%s: lock heartbeat failed (%s); still trying every %.0f s",
                            self.store.uri,
                            _describe(exc),
                            self.heartbeat_s,
                        )

        self._thread = threading.Thread(target=beat, name="realdgen-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if it is still ours (best effort: if storage
        is unreachable the lock is left behind and goes stale after ``stale_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.heartbeat_s + 5.0))
        if self.lost:
            return  # another job's lock now: never delete it
        try:
            holder = self._holder()
            if holder is not None and holder.get("run_id") == self.run_id:
                self.store.delete(LOCK_NAME)
        except Exception as exc:
            log.warning(
                "%s: could not release %s (%s); it goes stale after %.0f s",
                self.store.uri,
                LOCK_NAME,
                _describe(exc),
                self.stale_s,
            )

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
