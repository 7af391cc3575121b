"""Stream RealDGen (HR, LR) shards into torch as BasicSR-style training pairs (ARCHITECTURE §5).

The shard is the unit of distribution. One epoch of :class:`PairedShardDataset` is defined as
follows, and this is what makes "every sample exactly once per epoch" hold for any number of
DDP ranks and DataLoader workers, divisible or not:

1. all ranks and workers list the same shards (from ``_index.json``) and, when shuffling, permute
   them with the same generator seeded by ``(seed, epoch)``;
2. the permuted list is dealt round-robin to ``world_size * num_workers`` slots, slot
   ``rank * num_workers + worker_id`` taking shards ``slot, slot + n_slots, …``. Slots therefore
   get ``floor`` or ``ceil(n_shards / n_slots)`` shards (some get none when there are fewer shards
   than slots); the union over slots is the shard list and no shard goes to two slots.

Because slots may hold different numbers of samples, ranks may see different numbers of batches
in a finite epoch; DDP training loops that need equal step counts per rank should use
``resampled=True`` (endless, step-based) or ``samples_per_epoch`` — see docs/downstream.md.

Images are decoded with Pillow and never resampled: crops are taken at matching positions
(``lq`` box = ``gt`` box / scale) and flips/transposes are applied identically to both.
Samples that break the contract (missing member, not RGB, LR × scale ≠ HR, …) are skipped,
counted in :attr:`PairedShardDataset.skipped` and logged; they never stop training.

Shards may come from anywhere, so every reader here (and export/inspect, which use
:func:`iter_tar_samples` and :func:`scan_tar`) treats them as untrusted input: only regular
members named ``KEY.hr.png``, ``KEY.lr.png`` or ``KEY.json`` with ``KEY`` matching
``[A-Za-z0-9_-]+`` are read at all (``..``, absolute paths, folders, links, odd characters and any
other extension — a ``.pyd``/``.pth``/``.pickle`` among them — are skipped with a reason and
their bytes are never read, let alone unpickled); a key that appears twice, a member that appears
twice in one sample, a member over ``max_member_bytes``, an image over ``max_pixels`` (checked from
the PNG header, before decoding) or not a PNG, and a truncated tar are skipped with a reason too.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import random
import re
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from zlib import error as zlib_error

import braceexpand
import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipelines.storage import TransientStorageError, env_endpoint, open_for_header_scan, with_retries
from realdgen_core.shards import open_tar

log = logging.getLogger(__name__)

INDEX_NAME = "_index.json"
MEMBERS = ("hr.png", "lr.png", "json")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # ARCHITECTURE §5
MAX_PIXELS = 64_000_000  # per image, checked from the header (the job's limits.max_image_pixels default)
MAX_MEMBER_BYTES = 256 * 2**20  # a member larger than this is not read
MAX_JSON_BYTES = 256 * 2**20  # _index.json / _stats.json (a 1,000,000-shard index is ~90 MiB)


# A worker whose first samples all fail stops with an error (a wrong scale or gt_size, not bad data).
MAX_BAD_STREAK = 64
# Reasons that come from the reader's settings, not from the data: a pass in which every sample
# was refused for one of these ends with an error even when it read fewer than MAX_BAD_STREAK.
SETTING_REASONS = frozenset({"scale_mismatch", "too_small"})
# A resampled stream that fails to open this many shards in a row (and at least every shard of the
# list twice) stops: the storage or the list is broken, and drawing again would never end.
MAX_OPEN_FAILURES = 16


class BadSample(ValueError):
    """A sample that breaks the §5 contract; ``reason`` is a short counter name, ``count`` how many
    samples it stands for (a tar cut short loses several at once)."""

    def __init__(self, reason: str, message: str, count: int = 1):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.count = count


# --------------------------------------------------------------------------------------------
# Storage: a dataset URI -> filesystem + shard list
# --------------------------------------------------------------------------------------------


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path, ``file://`` or ``s3://`` URI (or any fsspec URL).

    For s3 the endpoint is ``endpoint_url`` or ``AWS_ENDPOINT_URL``; credentials come only from
    the environment (s3fs/botocore's usual chain), never from arguments.
    """
    if "://" not in uri:
        return fsspec.filesystem("file"), os.path.abspath(uri)
    options: dict = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = endpoint_url or env_endpoint()  # refuses one holding credentials
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


class ProcessFilesystems:
    """One fsspec filesystem per URL protocol, made in (and kept for) the process that uses it.

    A shard list may mix local paths and ``s3://`` URLs: each URL is opened with the filesystem of
    its own protocol. Pickling (to DataLoader workers) drops the filesystems: sockets and event
    loops never cross a process boundary; each process makes its own on first use.
    """

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url
        self._pid: int | None = None
        self._by_protocol: dict[str, fsspec.AbstractFileSystem] = {}

    def __getstate__(self) -> dict:
        return {"endpoint_url": self.endpoint_url, "_pid": None, "_by_protocol": {}}

    def __call__(self, url: str) -> fsspec.AbstractFileSystem:
        if self._pid != os.getpid():
            self._pid, self._by_protocol = os.getpid(), {}
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        fs = self._by_protocol.get(protocol)
        if fs is None:
            fs = self._by_protocol[protocol] = filesystem(url, self.endpoint_url)[0]
        return fs


@dataclass(frozen=True)
class ShardEntry:
    """One shard: its full URL and, when known, its sample count and size in bytes."""

    url: str
    samples: int | None = None
    bytes: int | None = None

    @property
    def stem(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def read_index(uri: str, endpoint_url: str | None = None) -> dict | None:
    """The dataset's ``_index.json`` as a dict, or None when the run has not written it yet."""
    fs, path = filesystem(uri, endpoint_url)
    fs.invalidate_cache(path)  # object-store listings are cached per filesystem; a run may have moved on
    ipath = _join(path, INDEX_NAME)

    def read() -> dict | None:
        return _read_small_json(fs, ipath, _join(uri, INDEX_NAME)) if fs.exists(ipath) else None

    return with_retries(read, what=f"reading {_join(uri, INDEX_NAME)}")


def _read_small_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict:
    with fs.open(path, "rb") as f:
        return _small_json(f, what)


def open_shard(fs: fsspec.AbstractFileSystem, url: str):
    """``fs.open(url, "rb")`` with its first bytes read, retried through a storage outage
    (``pipelines.storage.with_retries``; a shard that is missing or refused fails at once). The
    first read is part of it: s3fs opens from its listing cache without a request when the folder
    was listed, so the open alone may touch no storage. An outage that outlasts the retry budget
    raises ``TransientStorageError`` (storage away, not this shard's fault: callers stop rather than
    spend the budget again on every shard). A connection lost later in the shard is not retried."""

    def open_and_read() -> Any:
        f = fs.open(url, "rb")
        try:
            f.read(1)
            f.seek(0)
        except BaseException:
            f.close()
            raise
        return f

    return with_retries(open_and_read, what=f"opening {url}")


def _small_json(f, what: str) -> dict:
    """A dataset's own json file, read with a size cap; anything odd is a ValueError naming it."""
    raw = f.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise ValueError(f"{what} is over {MAX_JSON_BYTES} bytes; not a dataset's index")
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not valid json: {type(exc).__name__}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{what} holds a {type(out).__name__}, not an object")
    return out


SHARD_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # output.name may start with _ or -


def _shard_name(name: object, where: str) -> str:
    """A shard name from an index: a plain file name (no folder, no ``..``), ``.tar`` added."""
    if not isinstance(name, str) or not SHARD_NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"{where} names shard {name!r}: not a plain file name inside the dataset")
    return name if name.endswith(".tar") else name + ".tar"


def list_shards(uri: str, endpoint_url: str | None = None) -> list[ShardEntry]:
    """The shards of a dataset, in index order, with counts.

    Uses ``_index.json``. Without one (a run still in progress) it falls back to the shards that
    have their ``_stats.json`` completion marker, with the sample count taken from that file.
    """
    uri = uri.rstrip("/")
    index = read_index(uri, endpoint_url)
    if index is not None:
        try:
            return [
                ShardEntry(
                    _join(uri, _shard_name(s["name"], _join(uri, INDEX_NAME))),
                    int(s["samples"]),
                    s.get("bytes"),
                )
                for s in index["shards"]
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{_join(uri, INDEX_NAME)} is malformed: {exc}") from None
    fs, path = filesystem(uri, endpoint_url)
    try:
        listed = with_retries(lambda: fs.ls(path, detail=False), what=f"listing {uri}")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{uri}: no such dataset (no {INDEX_NAME}, and the folder does not exist)"
        ) from None
    entries = []
    for n in names:
        stats_name = n.removesuffix(".tar") + "_stats.json"
        if n.endswith(".tar") and stats_name in names:
            where, what = _join(path, stats_name), _join(uri, stats_name)
            stats = with_retries(
                lambda where=where, what=what: _read_small_json(fs, where, what), what=f"reading {what}"
            )
            entries.append(ShardEntry(_join(uri, n), stats.get("samples")))
    if not entries:
        raise FileNotFoundError(f"{uri}: no {INDEX_NAME} and no completed shards (*.tar with _stats.json)")
    log.warning("%s has no %s; using %d completed shards", uri, INDEX_NAME, len(entries))
    return entries


GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shard_urls(urls: Sequence[str], endpoint_url: str | None = None) -> list[str]:
    """Shard URLs with WebDataset's brace patterns (``shard-{000000..000009}.tar``) expanded and
    glob patterns (``*``, ``?``, ``[…]``) matched against the storage, sorted. A pattern that
    matches nothing is an error naming it."""
    out: list[str] = []
    for url in urls:
        for u in braceexpand.braceexpand(url):
            if not GLOB_CHARS.search(u):
                out.append(u)
                continue
            fs, path = filesystem(u, endpoint_url)
            if fs.exists(path):  # a file whose name holds a glob character
                out.append(u)
                continue
            hits = sorted(fs.glob(path))
            if not hits:
                raise FileNotFoundError(f"shard pattern {u!r} matches no file")
            prefix = u.split("://", 1)[0] + "://" if "://" in u else ""
            out.extend(prefix + h if prefix and not h.startswith(prefix) else h for h in hits)
    return out


def _exists(url: str, endpoint_url: str | None) -> bool:
    """Whether ``url`` is a file. A folder is not a shard: that is an error naming it."""
    fs, path = filesystem(url, endpoint_url)
    try:
        if fs.isfile(path):
            return True
        if fs.isdir(path):
            raise IsADirectoryError(
                f"{url} is a folder, not a shard: name it as a dataset (its _index.json lists its "
                "shards) or list its .tar files"
            )
        return False
    except PermissionError as exc:
        raise PermissionError(f"cannot read {url}: {exc}") from exc


def _is_dataset_folder(url: str, endpoint_url: str | None) -> bool:
    """An item of a source list that names a whole dataset: no pattern, no ``.tar``, a folder."""
    if url.endswith(".tar") or GLOB_CHARS.search(url) or "{" in url:
        return False
    fs, path = filesystem(url, endpoint_url)
    try:
        return fs.isdir(path)
    except PermissionError as exc:
        raise PermissionError(f"cannot read {url}: {exc}") from exc


def resolve_shards(source: str | Sequence[str], endpoint_url: str | None = None) -> list[ShardEntry]:
    """A dataset URI, or an explicit list of shard URLs, to shard entries.

    An explicit list (or one URL ending in ``.tar``) may use brace and glob patterns
    (:func:`expand_shard_urls`), and may name whole datasets (folders) among its shards, each
    standing for its shards in index order. Sample counts are looked up in the ``_index.json`` next
    to the shards when there is one (so ``len()`` still works); a listed shard that the index does
    not name is checked to exist, so a typo is an error here rather than an empty epoch later.
    """
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        if not source.endswith(".tar"):
            return _dataset_shards(source, endpoint_url)
        source = [source]
    if not source:
        raise ValueError("empty shard list")
    out: list[ShardEntry] = []
    tars: list[str] = []  # consecutive shard URLs, resolved together (one index read per folder)
    for item in [str(u) for u in source]:
        if _is_dataset_folder(item, endpoint_url):
            out.extend(_listed_shards(tars, endpoint_url))
            tars = []
            out.extend(_dataset_shards(item, endpoint_url))
        else:
            tars.append(item)
    out.extend(_listed_shards(tars, endpoint_url))
    return out


def _dataset_shards(uri: str, endpoint_url: str | None) -> list[ShardEntry]:
    try:
        return list_shards(uri, endpoint_url)
    except PermissionError as exc:
        raise PermissionError(f"cannot read {uri}: {exc}") from exc


def _listed_shards(patterns: list[str], endpoint_url: str | None) -> list[ShardEntry]:
    if not patterns:
        return []
    urls = expand_shard_urls(patterns, endpoint_url)
    known: dict[str, ShardEntry] = {}
    for parent in sorted({u.rstrip("/").rsplit("/", 1)[0] for u in urls}):
        try:
            index_entries = list_shards(parent, endpoint_url) if read_index(parent, endpoint_url) else []
        except PermissionError as exc:
            raise PermissionError(f"cannot read {parent}: {exc}") from exc
        except (OSError, ValueError):
            index_entries = []
        known.update({e.url: e for e in index_entries})
    missing = [u for u in urls if u not in known and not _exists(u, endpoint_url)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} listed shard(s) do not exist: {missing[:5]}")
    return [known.get(u, ShardEntry(u)) for u in urls]


# --------------------------------------------------------------------------------------------
# One sample: bytes -> checked uint8 arrays -> crop/augment -> tensors
# --------------------------------------------------------------------------------------------


def png_size(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from a PNG's header, without decoding; :class:`BadSample` when the bytes
    are not a PNG or the image has more than ``max_pixels`` pixels (a decompression bomb)."""
    try:
        # Pillow's own bomb check has its own global limit and message; ours is checked below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG"])
    except Image.DecompressionBombError as exc:
        raise BadSample("too_many_pixels", f"{what}: {exc}") from None
    except Exception as exc:
        raise BadSample("decode_error", f"{what} is not a PNG: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadSample("too_many_pixels", f"{what} is {w}x{h} = {w * h} pixels > limit {max_pixels}")
    return w, h


def decode_checked_png(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An untrusted PNG member → uint8 HWC RGB: PNG only, the pixel count checked from the header
    before decoding, 8-bit RGB; :class:`BadSample` naming ``what`` otherwise."""
    png_size(data, what, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=["PNG"])
            img.load()
    except Image.DecompressionBombError as exc:
        raise BadSample("too_many_pixels", f"{what}: {exc}") from None
    except Exception as exc:  # any decoder failure is the sample's fault, not the reader's
        raise BadSample("decode_error", f"{what} does not decode: {exc}") from exc
    if img.mode != "RGB":
        raise BadSample("not_rgb", f"{what} has mode {img.mode}, the contract says RGB 8-bit")
    return np.asarray(img)


def decode_pair(
    files: dict, key: str, scale: int | None = None, max_pixels: int = MAX_PIXELS
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Check and decode one sample's members into ``(hr, lr, meta)``; hr/lr uint8 HWC RGB.

    ``files`` maps member suffixes (``hr.png``, ``lr.png``, ``json``) to bytes. ``scale``, when
    given, must match the sample's json; each image may have at most ``max_pixels`` pixels
    (checked from its header before decoding). Raises :class:`BadSample` naming what is wrong.
    """
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise BadSample("bad_key", f"key {key!r} does not match [A-Za-z0-9_-]+")
    missing = [m for m in MEMBERS if m not in files]
    if missing:
        raise BadSample("missing_member", f"{key} lacks {missing}")
    try:
        meta = json.loads(files["json"])
        s = int(meta["scale"])
    except Exception as exc:
        raise BadSample("bad_json", f"{key}: json unreadable or without an int 'scale': {exc}") from exc
    if scale is not None and s != scale:
        raise BadSample("scale_mismatch", f"{key}: json scale {s}, reader expects {scale}")
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"{key}: json is a {type(meta).__name__}, not an object")
    hr = decode_checked_png(files["hr.png"], f"{key}.hr.png", max_pixels)
    lr = decode_checked_png(files["lr.png"], f"{key}.lr.png", max_pixels)
    if hr.shape[0] != lr.shape[0] * s or hr.shape[1] != lr.shape[1] * s:
        raise BadSample(
            "size_mismatch",
            f"{key}: hr {hr.shape[1]}x{hr.shape[0]} is not {s} x lr {lr.shape[1]}x{lr.shape[0]}",
        )
    return hr, lr, meta


# --------------------------------------------------------------------------------------------
# Untrusted tars: which members are read at all, and how members become samples
# --------------------------------------------------------------------------------------------


def check_member(m: tarfile.TarInfo, max_member_bytes: int = MAX_MEMBER_BYTES) -> tuple[str, str]:
    """``(key, suffix)`` of a member the readers may read, else :class:`BadSample` saying why.

    Readable: a regular file named ``KEY.SUFFIX`` (an optional leading ``./`` aside: no folder,
    no ``..``, not absolute), ``KEY`` matching ``[A-Za-z0-9_-]+``, ``SUFFIX`` one of
    ``hr.png``/``lr.png``/``json``, at most ``max_member_bytes`` bytes. Nothing else is read.
    """
    name = m.name
    if not m.isreg():
        kind = "link" if (m.issym() or m.islnk()) else "folder" if m.isdir() else "special file"
        raise BadSample("not_a_file", f"member {name!r} is a {kind}, not a regular file")
    bare = name[2:] if name.startswith("./") else name
    if bare.startswith("/") or "/" in bare or "\\" in bare or bare in ("", ".", ".."):
        raise BadSample("unsafe_name", f"member {name!r} is not a plain file name (absolute, folder or '..')")
    key, dot, suffix = bare.partition(".")
    if not KEY_RE.match(key):
        raise BadSample("bad_key", f"member {name!r}: key {key!r} does not match [A-Za-z0-9_-]+")
    if suffix not in MEMBERS:
        raise BadSample("unexpected_member", f"member {name!r} is not one of {list(MEMBERS)}; not read")
    if m.size > max_member_bytes:
        raise BadSample("member_too_large", f"member {name!r} has {m.size} bytes > limit {max_member_bytes}")
    return key, suffix


# Reasons check_member gives for one refused member (the sample may still be whole without it)
MEMBER_REASONS = frozenset({"not_a_file", "unsafe_name", "bad_key", "unexpected_member", "member_too_large"})


def _tar_error(url: str, exc: BaseException) -> BadSample:
    text = str(exc) or type(exc).__name__
    truncated = isinstance(exc, EOFError) or "unexpected end" in text or "truncated" in text.lower()
    reason = "truncated_tar" if truncated else "bad_tar"
    return BadSample(reason, f"{url}: {type(exc).__name__}: {text}; the rest of this shard is skipped")


def iter_tar_samples(
    stream,
    url: str,
    skip: Callable[[BadSample], None],
    *,
    seen: set[str] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
    expected: int | None = None,
) -> Iterator[dict]:
    """The samples of one tar stream, in order: ``{"__key__", "__url__", suffix: bytes, …}``.

    Members that :func:`check_member` refuses are skipped unread. A sample whose key was seen
    before (in this tar, or in ``seen``, shared across the shards of one pass), or that holds a
    member twice, is skipped whole: which copy is meant is ambiguous. A truncated or corrupt tar
    ends the shard: the samples before it are kept, the one being read is dropped. Every skip
    calls ``skip(BadSample)`` (reason + message naming the shard and member); ``skip`` may raise.
    With ``expected`` (the index's sample count), a shard read to its end that gave fewer samples
    (yielded or skipped whole) ends with one ``truncated_tar`` skip whose ``count`` is the
    missing number: a tar cut exactly at a header ends without an error, only the count shows it.
    """
    seen = set() if seen is None else seen
    current: dict | None = None
    problem: BadSample | None = None
    accounted = 0  # samples yielded or skipped whole

    def skip_sample(exc: BadSample) -> None:
        nonlocal accounted
        accounted += 0 if exc.reason in MEMBER_REASONS else exc.count  # a refused member is not a lost sample
        skip(exc)

    def check_count() -> None:
        if expected is not None and accounted < expected:
            lost = expected - accounted
            skip(
                BadSample(
                    "truncated_tar", f"{url}: {lost} of its {expected} samples missing (truncated tar)", lost
                )
            )

    def finish():
        if current is None:
            return None
        if problem is not None:
            skip_sample(problem)
            return None
        return current

    try:
        tar = open_tar(stream, "r|")
        for m in tar:
            try:
                key, suffix = check_member(m, max_member_bytes)
            except BadSample as exc:
                skip_sample(BadSample(exc.reason, f"{url}: {exc.message}"))
                continue
            if current is None or key != current["__key__"]:
                done = finish()
                if done is not None:
                    accounted += 1
                    yield done
                current, problem = {"__key__": key, "__url__": url}, None
                if key in seen:
                    problem = BadSample("duplicate_key", f"{url}: key {key} appears again; skipped")
                seen.add(key)
            if problem is not None:
                continue
            if suffix in current:
                problem = BadSample("duplicate_member", f"{url}: {key} holds {suffix} twice; skipped")
                continue
            data = tar.extractfile(m).read()
            if len(data) != m.size:
                raise EOFError(f"member {m.name!r} ends after {len(data)} of {m.size} bytes")
            current[suffix] = data
    except (tarfile.TarError, EOFError, OSError, zlib_error) as exc:
        current = None  # possibly incomplete
        skip_sample(_tar_error(url, exc))
        check_count()
        return
    done = finish()
    if done is not None:
        accounted += 1
        yield done
    check_count()


def paired_random_crop(
    hr: np.ndarray, lr: np.ndarray, gt_size: int, scale: int, rng: np.random.Generator, key: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a ``gt_size`` HR patch and the LR patch at the matching position (``gt_size/scale``).

    The LR top-left is drawn on the LR grid, so the HR box is exactly ``scale`` × the LR box.
    """
    lq_size = gt_size // scale
    h, w = lr.shape[:2]
    if h < lq_size or w < lq_size:
        raise BadSample(
            "too_small",
            f"{key}: lr {w}x{h} is smaller than the lq patch {lq_size} (gt_size {gt_size} / scale {scale})",
        )
    top = int(rng.integers(0, h - lq_size + 1))
    left = int(rng.integers(0, w - lq_size + 1))
    lr = lr[top : top + lq_size, left : left + lq_size]
    hr = hr[top * scale : (top + lq_size) * scale, left * scale : (left + lq_size) * scale]
    return hr, lr


def augment_pair(
    hr: np.ndarray, lr: np.ndarray, rng: np.random.Generator, *, hflip: bool = True, rot: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """BasicSR's ``augment``: hflip, vflip and a 90° rotation (transpose), drawn once per pair."""
    do_h = hflip and rng.random() < 0.5
    do_v = rot and rng.random() < 0.5
    do_t = rot and rng.random() < 0.5
    out = []
    for a in (hr, lr):
        if do_h:
            a = a[:, ::-1]
        if do_v:
            a = a[::-1]
        if do_t:
            a = a.transpose(1, 0, 2)
        out.append(a)
    return out[0], out[1]


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 [3, H, W] in [0, 1] (BasicSR's ``img2tensor`` layout, RGB order)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # PIL-backed arrays are read-only; torch wants to own writable memory
        a = a.copy()
    return torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)


def member_paths(shard_url: str, key: str) -> tuple[str, str]:
    """Virtual ``(gt_path, lq_path)`` of a sample, shaped like the export layout.

    ``{shard}/hr/{key}.png``: BasicSR derives saved-image names from the path's stem, which is
    the key; the shard part says where the pixels came from.
    """
    return f"{shard_url}/hr/{key}.png", f"{shard_url}/lr/{key}.png"


@dataclass(frozen=True)
class PairTransform:
    """Sample bytes -> the BasicSR dict; shared by the iterable and the map-style dataset."""

    gt_size: int | None = None
    scale: int | None = None
    use_hflip: bool = True
    use_rot: bool = True
    return_meta: bool = False
    max_pixels: int = MAX_PIXELS

    def __post_init__(self):
        if self.scale is not None and self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.gt_size is not None:
            if self.gt_size < 1:
                raise ValueError(f"gt_size must be positive, got {self.gt_size}")
            if self.scale is not None and self.gt_size % self.scale:
                raise ValueError(f"gt_size {self.gt_size} is not a multiple of scale {self.scale}")

    def __call__(self, files: dict, key: str, shard_url: str, rng: np.random.Generator) -> dict:
        hr, lr, meta = decode_pair(files, key, self.scale, self.max_pixels)
        s = int(meta["scale"])
        if self.gt_size is not None:
            if self.gt_size % s:
                raise BadSample(
                    "scale_mismatch", f"{key}: gt_size {self.gt_size} not a multiple of scale {s}"
                )
            hr, lr = paired_random_crop(hr, lr, self.gt_size, s, rng, key)
            hr, lr = augment_pair(hr, lr, rng, hflip=self.use_hflip, rot=self.use_rot)
        gt_path, lq_path = member_paths(shard_url, key)
        out = {"lq": to_tensor(lr), "gt": to_tensor(hr), "key": key, "lq_path": lq_path, "gt_path": gt_path}
        if self.return_meta:
            out["meta"] = json.dumps(meta, sort_keys=True)  # a string collates; a dict with None would not
        return out


# --------------------------------------------------------------------------------------------
# Distribution: (rank, worker) slots
# --------------------------------------------------------------------------------------------


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    return rank, world_size


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard order of an epoch: identical on every rank and worker (seeded by seed and epoch only)."""
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def slot_shards(order: Sequence[int], slot: int, n_slots: int) -> list[int]:
    """Round-robin deal: slot ``i`` gets ``order[i::n_slots]``. A partition of ``order``."""
    return list(order[slot::n_slots])


# --------------------------------------------------------------------------------------------
# The iterable dataset
# --------------------------------------------------------------------------------------------


class PairedShardDataset(IterableDataset):
    """(HR, LR) training pairs streamed from WebDataset shards, BasicSR's sample convention.

    Yields ``{'lq': float32 [3,h,w] in [0,1], 'gt': float32 [3,H,W], 'key': str,
    'lq_path': str, 'gt_path': str}`` (+ ``'meta'``, the json as a string, with
    ``return_meta=True``).

    Args:
        source: dataset URI (folder, ``file://``, ``s3://bucket/prefix``) or a list of shard URLs.
        gt_size: HR crop size; ``None`` returns whole images (validation), no augmentation.
        scale: expected SR scale; checked against each sample's json (``None``: take the json's).
        use_hflip, use_rot: BasicSR's augmentations (hflip; vflip + transpose).
        shuffle: permute shards per epoch, seeded by ``(seed, epoch)``.
        shuffle_buffer: samples held in a buffer shuffle after the shard shuffle (0 or 1: off).
        seed: base seed for shard order, buffer shuffle and crops.
        resampled: endless stream; each (rank, worker) slot draws shards with replacement,
            weighted by their sample counts, from its own seeded generator.
        samples_per_epoch: with ``resampled``, end each ``iter()`` after this many samples in
            total (split evenly over slots) so a DataLoader has a length; ``None``: endless.
        rank, world_size: DDP split; default from ``torch.distributed`` when initialised, read
            at construction (build the dataset after ``init_process_group``).
        endpoint_url: S3 endpoint (else ``AWS_ENDPOINT_URL``); credentials only from the env.
        strict: raise on a bad sample instead of skipping and counting it.
        max_pixels: most pixels an HR or LR image may have (checked from its header).
        max_member_bytes: most bytes a tar member may have to be read.
    """

    def __init__(
        self,
        source: str | Sequence[str],
        *,
        gt_size: int | None = None,
        scale: int | None = None,
        use_hflip: bool = True,
        use_rot: bool = True,
        shuffle: bool = True,
        shuffle_buffer: int = 0,
        seed: int = 0,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        endpoint_url: str | None = None,
        return_meta: bool = False,
        strict: bool = False,
        max_pixels: int = MAX_PIXELS,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        super().__init__()
        self.endpoint_url = endpoint_url
        self.shards = resolve_shards(source, endpoint_url)
        self.transform = PairTransform(gt_size, scale, use_hflip, use_rot, return_meta, max_pixels)
        self.max_member_bytes = int(max_member_bytes)
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.resampled = resampled
        if samples_per_epoch is not None and not resampled:
            raise ValueError(
                "samples_per_epoch only applies with resampled=True; a finite epoch is "
                "the index's total_samples"
            )
        self.samples_per_epoch = samples_per_epoch
        self.rank, self.world_size = dist_rank_world(rank, world_size)
        self._split_given = rank is not None or world_size is not None
        self.strict = strict
        self.epoch = 0
        self._last_epoch: int | None = None  # the epoch of this object's last pass in this process
        self.skipped: Counter = Counter()
        self._fs = ProcessFilesystems(endpoint_url)

    # -- public knobs -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and crop draws. With non-persistent DataLoader workers
        (the default) the workers see the new value at the next ``iter(loader)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Finite epoch: samples in one epoch over all ranks and workers (``total_samples`` of the
        index). Resampled: the samples THIS rank yields per ``iter()``, ``samples_per_epoch //
        world_size`` (the same on every rank), so a DataLoader's length is right under DDP."""
        if self.resampled:
            if self.samples_per_epoch is None:
                raise TypeError(
                    "a resampled PairedShardDataset is endless; pass samples_per_epoch for a length"
                )
            return self.samples_per_epoch // self.world_size
        uncounted = [s.url for s in self.shards if s.samples is None]
        if uncounted:
            raise TypeError(
                f"sample counts unknown for {len(uncounted)} shard(s) that no _index.json next to them "
                f"names: {uncounted[:3]}"
            )
        return sum(s.samples for s in self.shards)

    # -- internals ----------------------------------------------------------------------------
    def _slot(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers, worker

    def _shard_stream(self, slot: int, n_slots: int, worker: int) -> Iterator[ShardEntry]:
        if not self.resampled:
            order = epoch_order(len(self.shards), self.seed, self.epoch, self.shuffle)
            for i in slot_shards(order, slot, n_slots):
                yield self.shards[i]
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 1])
        counts = np.array([s.samples or 1 for s in self.shards], dtype=np.float64)
        p = counts / counts.sum()
        while True:
            yield self.shards[int(rng.choice(len(self.shards), p=p))]

    def _open(self, shards: Iterator[ShardEntry]) -> Iterator[dict]:
        failures = 0  # in a row
        limit = max(MAX_OPEN_FAILURES, 2 * len(self.shards))
        for shard in shards:
            try:
                stream = open_shard(self._fs(shard.url), shard.url)
            except TransientStorageError:  # retried for its budget: storage is away, not this shard
                raise
            except Exception as exc:
                if not self._shard_error(exc, shard.url):
                    return
                failures += 1
                if self.resampled and failures >= limit:
                    raise OSError(
                        f"{failures} shard opens in a row failed (last: {shard.url}: "
                        f"{type(exc).__name__}: {exc}); a resampled stream stops rather than draw forever"
                    ) from exc
                continue
            failures = 0
            try:
                yield {"url": shard.url, "stream": stream, "samples": shard.samples}
            finally:
                stream.close()

    def _shard_error(self, exc: Exception, url: str | None = None) -> bool:
        if self.strict:
            raise exc
        self.skipped["shard_error"] += 1
        log.warning("skipping the rest of shard %s: %r", url or "?", exc)
        return True

    def _skip(self, exc: BadSample) -> None:
        if self.strict:
            raise exc
        self.skipped[exc.reason] += exc.count
        log.warning("skipping: %s", exc)

    def _raw_samples(self, shards: Iterator[ShardEntry]) -> Iterator[dict]:
        # Keys of this pass (this rank and worker) per dataset: a repeat within one dataset is
        # skipped. Two datasets made from the same inputs (two domains, two scales) share keys,
        # and a mix of them serves both. A resampled stream draws the same shards again on
        # purpose, so there a key only has to be unique in its shard.
        seen: dict[str, set[str]] = {}
        for opened in self._open(shards):
            dataset = opened["url"].rstrip("/").rsplit("/", 1)[0]
            yield from iter_tar_samples(
                opened["stream"],
                opened["url"],
                self._skip,
                seen=None if self.resampled else seen.setdefault(dataset, set()),
                max_member_bytes=self.max_member_bytes,
                expected=opened["samples"],
            )

    def _check_pass(self, slot: int, n_slots: int) -> None:
        """Warn about set-ups that give wrong data without failing: a pass that repeats the last
        one, a DDP split frozen before ``init_process_group``, a slot without a shard."""
        if self._last_epoch == self.epoch and (self.resampled or self.transform.gt_size is not None):
            log.warning(
                "PairedShardDataset iterated again at epoch %d in this process: the same shards, "
                "order and crops as the last pass; call set_epoch() with a new value for every pass "
                "(and, on resume, the pass or step count reached)",
                self.epoch,
            )
        self._last_epoch = self.epoch
        if (
            self.world_size == 1
            and not self._split_given
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        ):
            log.warning(
                "PairedShardDataset was built before init_process_group: this rank reads every "
                "shard (world_size 1); build it after, or pass rank and world_size"
            )
        if not self.resampled and self.world_size > 1 and slot >= len(self.shards):
            log.warning(
                "rank %d, slot %d of %d gets no shard (%d shards): its epoch is empty and ranks "
                "run unequal numbers of steps; write at least world_size x num_workers shards, "
                "or use resampled=True with samples_per_epoch",
                self.rank,
                slot,
                n_slots,
                len(self.shards),
            )

    def __iter__(self) -> Iterator[dict]:
        slot, n_slots, worker = self._slot()
        self._check_pass(slot, n_slots)
        shards = self._shard_stream(slot, n_slots, worker)
        samples: Iterator[dict] = self._raw_samples(shards)
        if self.shuffle_buffer > 1:
            buf_rng = random.Random(
                int(
                    np.random.SeedSequence([self.seed, self.epoch, self.rank, worker, 3]).generate_state(1)[0]
                )
            )
            samples = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=buf_rng)(
                iter(samples)
            )
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 2])
        limit = None
        if self.resampled and self.samples_per_epoch is not None:
            # The same count on every rank (a DDP step needs every rank), split over its workers;
            # the remainder of samples_per_epoch % world_size is not drawn.
            per_rank = self.samples_per_epoch // self.world_size
            n_workers = n_slots // self.world_size
            limit = per_rank // n_workers + (worker < per_rank % n_workers)
        n = bad_streak = 0
        refused: Counter = Counter()
        for raw in samples:
            if limit is not None and n >= limit:
                return
            key, url = raw["__key__"], raw.get("__url__", "?")
            try:
                out = self.transform(raw, key, url, rng)
            except BadSample as exc:
                if self.strict:
                    raise
                self.skipped[exc.reason] += exc.count
                refused[exc.reason] += 1
                log.warning("skipping sample %s in %s: %s", key, url, exc)
                bad_streak += 1
                if n == 0 and bad_streak >= MAX_BAD_STREAK:
                    # every sample so far refused: a setting (scale, gt_size), not a bad sample;
                    # a resampled stream would otherwise draw forever
                    raise ValueError(
                        f"no usable sample in the first {bad_streak} read by this worker "
                        f"(skipped: {dict(self.skipped)}); check scale / gt_size against the dataset"
                    ) from exc
                continue
            n += 1
            yield out
        if n == 0 and refused and set(refused) <= SETTING_REASONS:
            # every sample of the pass refused by the settings: an epoch of nothing, every epoch
            raise ValueError(
                f"every sample this worker read was refused ({dict(refused)}); check scale / gt_size "
                "against the dataset"
            )


# --------------------------------------------------------------------------------------------
# Random access into shards (for map-style datasets such as BasicSR's)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpan:
    """Where one sample's members lie in its tar: one contiguous byte span, member offsets inside.

    ``problem`` (reason, message) marks a sample that must not be read (a repeated key, a member
    held twice, or the place of samples a truncated tar lost); reading it raises that BadSample.
    """

    key: str
    start: int
    end: int
    members: dict[str, tuple[int, int]]  # suffix -> (offset from start, size)
    problem: tuple[str, str] | None = None
    # the span holds more than its members and their headers (a refused member lies between them):
    # each member is read on its own, so a refused member's bytes are never fetched
    gapped: bool = False


SPAN_SLACK = 4096  # bytes per member a contiguous span may hold besides member data (header, padding)
# Header tables kept per process, counted in samples (a span is ~0.45 kB): BasicSR's shuffled sampler
# touches every shard every epoch, and a table evicted too early means a rescan per sample.
MAX_CACHED_SPANS = 1 << 19


def scan_tar(
    fs: fsspec.AbstractFileSystem,
    url: str,
    skip: Callable[[BadSample], None] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> tuple[list[MemberSpan], BadSample | None]:
    """Read a tar's headers (not its data): ``(samples in order, the tar error that ended the
    scan or None)``. Members :func:`check_member` refuses are left out (``skip`` is told)."""
    grouped: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    problems: dict[str, tuple[str, str]] = {}
    last = None
    error = None
    try:
        with open_for_header_scan(fs, url) as f, open_tar(f, "r:") as tar:
            for m in tar:
                try:
                    key, suffix = check_member(m, max_member_bytes)
                except BadSample as exc:
                    if skip is not None:
                        skip(BadSample(exc.reason, f"{url}: {exc.message}"))
                    continue
                if key in grouped and key != last and key not in problems:
                    problems[key] = ("duplicate_key", f"{url}: key {key} appears twice; skipped")
                elif suffix in grouped.get(key, {}) and key not in problems:
                    problems[key] = ("duplicate_member", f"{url}: {key} holds {suffix} twice; skipped")
                grouped.setdefault(key, {})[suffix] = (m.offset_data, m.size)
                last = key
    except (tarfile.TarError, EOFError) as exc:
        error = _tar_error(url, exc)
    except OSError as exc:  # storage, not the tar: a table cut here must not be kept for good
        raise BadSample(
            "shard_error", f"{url}: {type(exc).__name__}: {exc}; scanned again at its next read"
        ) from None
    spans = []
    for key, members in grouped.items():
        start = min(o for o, _ in members.values())
        end = max(o + n for o, n in members.values())
        rel = {s: (o - start, n) for s, (o, n) in members.items()}
        gapped = end - start > sum(n for _, n in members.values()) + SPAN_SLACK * len(members)
        spans.append(MemberSpan(key, start, end, rel, problems.get(key), gapped))
    return spans, error


class ShardRandomAccess:
    """Global sample index -> sample bytes, one ranged read per sample.

    Sample counts per shard come from the index, so ``len`` needs no scan; each shard's headers
    are scanned on first use in each process (tables kept up to ``max_cached_spans`` samples in
    all, about 0.23 GB per process at the default: every shard of a dataset up to 524,288 samples).
    """

    def __init__(
        self,
        shards: Sequence[ShardEntry],
        endpoint_url: str | None = None,
        max_cached_spans: int = MAX_CACHED_SPANS,
        skip: Callable[[BadSample], None] | None = None,
        max_member_bytes: int = MAX_MEMBER_BYTES,
    ):
        self.skip = skip
        self.max_member_bytes = int(max_member_bytes)
        uncounted = [s.url for s in shards if s.samples is None]
        if uncounted:
            raise ValueError(
                f"random access needs per-shard sample counts: {len(uncounted)} shard(s) are not named "
                f"by an _index.json next to them: {uncounted[:3]}"
            )
        self.shards = list(shards)
        self.endpoint_url = endpoint_url
        self.cum = np.cumsum([0] + [s.samples for s in self.shards]).tolist()
        self.max_cached = int(max_cached_spans)
        self._tables: OrderedDict[int, list[MemberSpan]] = OrderedDict()
        self._cached_spans = 0
        self._fs = ProcessFilesystems(endpoint_url)

    def __len__(self) -> int:
        return self.cum[-1]

    def _table(self, si: int) -> list[MemberSpan]:
        if si in self._tables:
            self._tables.move_to_end(si)
            return self._tables[si]
        url = self.shards[si].url
        table, error = scan_tar(self._fs(url), url, self.skip, self.max_member_bytes)
        expected = self.shards[si].samples
        cut_at_header = error is None and len(table) < expected
        if cut_at_header:
            # cut exactly at a header: tarfile just stops, so the count is the only sign (the
            # samples before the cut are whole)
            msg = f"{url}: holds {len(table)} samples, the index says {expected} (truncated tar)"
            error = BadSample("truncated_tar", msg)
        if error is not None and len(table) <= expected:
            # A truncated tar: its lost samples keep their places in the index, and each read of
            # one raises the tar's error (a skip for the caller), so the other shards stay usable.
            problem = (error.reason, error.message)
            if table and table[-1].problem is None and not cut_at_header:
                last = table[-1]
                table[-1] = MemberSpan(last.key, last.start, last.end, last.members, problem, last.gapped)
            table += [MemberSpan("?", 0, 0, {}, problem)] * (expected - len(table))
        if len(table) != expected:
            raise ValueError(f"{url} holds {len(table)} samples, the index says {expected}")
        self._tables[si] = table
        self._cached_spans += len(table)
        while len(self._tables) > 1 and self._cached_spans > self.max_cached:
            self._cached_spans -= len(self._tables.popitem(last=False)[1])
        return table

    def get(self, index: int) -> tuple[dict, str, str]:
        """``(files, key, shard_url)`` of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        si = bisect.bisect_right(self.cum, index) - 1
        span = self._table(si)[index - self.cum[si]]
        url = self.shards[si].url
        if span.problem is not None:
            raise BadSample(*span.problem)
        fs = self._fs(url)
        if span.gapped:
            a = span.start
            files = {s: fs.cat_file(url, start=a + o, end=a + o + n) for s, (o, n) in span.members.items()}
        else:
            blob = fs.cat_file(url, start=span.start, end=span.end)
            files = {s: blob[o : o + n] for s, (o, n) in span.members.items()}
        if any(len(files[s]) != n for s, (_, n) in span.members.items()):
            raise BadSample("truncated_tar", f"{url}: sample {span.key} ends early (truncated tar)")
        return files, span.key, url
