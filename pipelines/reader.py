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
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import random
import tarfile
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)

INDEX_NAME = "_index.json"
MEMBERS = ("hr.png", "lr.png", "json")


class BadSample(ValueError):
    """A sample that breaks the §5 contract; ``reason`` is a short counter name."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


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
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


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
    if not fs.exists(ipath):
        return None
    with fs.open(ipath, "rb") as f:
        return json.loads(f.read())


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
                    _join(uri, s["name"] if s["name"].endswith(".tar") else s["name"] + ".tar"),
                    int(s["samples"]),
                    s.get("bytes"),
                )
                for s in index["shards"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{_join(uri, INDEX_NAME)} is malformed: {exc!r}") from exc
    fs, path = filesystem(uri, endpoint_url)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    entries = []
    for n in names:
        stats_name = n.removesuffix(".tar") + "_stats.json"
        if n.endswith(".tar") and stats_name in names:
            with fs.open(_join(path, stats_name), "rb") as f:
                stats = json.loads(f.read())
            entries.append(ShardEntry(_join(uri, n), stats.get("samples")))
    if not entries:
        raise FileNotFoundError(f"{uri}: no {INDEX_NAME} and no completed shards (*.tar with _stats.json)")
    log.warning("%s has no %s; using %d completed shards", uri, INDEX_NAME, len(entries))
    return entries


def resolve_shards(source: str | Sequence[str], endpoint_url: str | None = None) -> list[ShardEntry]:
    """A dataset URI, or an explicit list of shard URLs, to shard entries.

    For an explicit list, sample counts are looked up in the ``_index.json`` next to the shards
    when there is one (so ``len()`` still works), else left unknown.
    """
    if isinstance(source, (str, os.PathLike)):
        source = str(source)
        if not source.endswith(".tar"):
            return list_shards(source, endpoint_url)
        source = [source]
    urls = [str(u) for u in source]
    if not urls:
        raise ValueError("empty shard list")
    known: dict[str, ShardEntry] = {}
    for parent in sorted({u.rstrip("/").rsplit("/", 1)[0] for u in urls}):
        try:
            index_entries = list_shards(parent, endpoint_url) if read_index(parent, endpoint_url) else []
        except (OSError, ValueError):
            index_entries = []
        known.update({e.url: e for e in index_entries})
    return [known.get(u, ShardEntry(u)) for u in urls]


# --------------------------------------------------------------------------------------------
# One sample: bytes -> checked uint8 arrays -> crop/augment -> tensors
# --------------------------------------------------------------------------------------------


def _decode_png(data: bytes, what: str) -> np.ndarray:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:  # any decoder failure is the sample's fault, not the reader's
        raise BadSample("decode_error", f"{what} does not decode: {exc}") from exc
    if img.mode != "RGB":
        raise BadSample("not_rgb", f"{what} has mode {img.mode}, the contract says RGB 8-bit")
    return np.asarray(img)


def decode_pair(files: dict, key: str, scale: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Check and decode one sample's members into ``(hr, lr, meta)``; hr/lr uint8 HWC RGB.

    ``files`` maps member suffixes (``hr.png``, ``lr.png``, ``json``) to bytes. ``scale``, when
    given, must match the sample's json. Raises :class:`BadSample` naming what is wrong.
    """
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
    hr = _decode_png(files["hr.png"], f"{key}.hr.png")
    lr = _decode_png(files["lr.png"], f"{key}.lr.png")
    if hr.shape[0] != lr.shape[0] * s or hr.shape[1] != lr.shape[1] * s:
        raise BadSample(
            "size_mismatch",
            f"{key}: hr {hr.shape[1]}x{hr.shape[0]} is not {s} x lr {lr.shape[1]}x{lr.shape[0]}",
        )
    return hr, lr, meta


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

    def __post_init__(self):
        if self.scale is not None and self.scale < 1:
            raise ValueError(f"scale must be >= 1, got {self.scale}")
        if self.gt_size is not None:
            if self.gt_size < 1:
                raise ValueError(f"gt_size must be positive, got {self.gt_size}")
            if self.scale is not None and self.gt_size % self.scale:
                raise ValueError(f"gt_size {self.gt_size} is not a multiple of scale {self.scale}")

    def __call__(self, files: dict, key: str, shard_url: str, rng: np.random.Generator) -> dict:
        hr, lr, meta = decode_pair(files, key, self.scale)
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
    ):
        super().__init__()
        self.endpoint_url = endpoint_url
        self.shards = resolve_shards(source, endpoint_url)
        self.transform = PairTransform(gt_size, scale, use_hflip, use_rot, return_meta)
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
        self.strict = strict
        self.epoch = 0
        self.skipped: Counter = Counter()
        self._fs_pid: tuple[int, fsspec.AbstractFileSystem] | None = None

    # -- public knobs -------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's shard order and crop draws. With non-persistent DataLoader workers
        (the default) the workers see the new value at the next ``iter(loader)``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Samples in one epoch over all ranks and workers (``total_samples`` of the index)."""
        if self.resampled:
            if self.samples_per_epoch is None:
                raise TypeError(
                    "a resampled PairedShardDataset is endless; pass samples_per_epoch for a length"
                )
            return self.samples_per_epoch
        if any(s.samples is None for s in self.shards):
            raise TypeError("sample counts unknown (no _index.json next to these shards)")
        return sum(s.samples for s in self.shards)

    # -- internals ----------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs_pid"] = None  # a filesystem (sockets, event loop) never crosses a process boundary
        return state

    def _fs(self) -> fsspec.AbstractFileSystem:
        if self._fs_pid is None or self._fs_pid[0] != os.getpid():
            self._fs_pid = (os.getpid(), filesystem(self.shards[0].url, self.endpoint_url)[0])
        return self._fs_pid[1]

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
        fs = self._fs()
        for shard in shards:
            try:
                stream = fs.open(shard.url, "rb")
            except Exception as exc:
                if not self._shard_error(exc, shard.url):
                    return
                continue
            try:
                yield {"url": shard.url, "stream": stream}
            finally:
                stream.close()

    def _shard_error(self, exc: Exception, url: str | None = None) -> bool:
        if self.strict:
            raise exc
        self.skipped["shard_error"] += 1
        log.warning("skipping the rest of shard %s: %r", url or "?", exc)
        return True

    def __iter__(self) -> Iterator[dict]:
        slot, n_slots, worker = self._slot()
        shards = self._shard_stream(slot, n_slots, worker)
        files = tar_file_expander(self._open(shards), handler=self._shard_error)
        samples: Iterator[dict] = group_by_keys(files, handler=self._shard_error)
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
            limit = self.samples_per_epoch // n_slots + (slot < self.samples_per_epoch % n_slots)
        n = 0
        for raw in samples:
            if limit is not None and n >= limit:
                return
            key, url = raw["__key__"], raw.get("__url__", "?")
            try:
                out = self.transform(raw, key, url, rng)
            except BadSample as exc:
                if self.strict:
                    raise
                self.skipped[exc.reason] += 1
                log.warning("skipping sample %s in %s: %s", key, url, exc)
                continue
            n += 1
            yield out


# --------------------------------------------------------------------------------------------
# Random access into shards (for map-style datasets such as BasicSR's)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberSpan:
    """Where one sample's members lie in its tar: one contiguous byte span, member offsets inside."""

    key: str
    start: int
    end: int
    members: dict[str, tuple[int, int]]  # suffix -> (offset from start, size)


def scan_tar(fs: fsspec.AbstractFileSystem, url: str) -> list[MemberSpan]:
    """Read a tar's headers (not its data) and return its samples in order."""
    grouped: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
    with fs.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, dot, suffix = base.partition(".")
            if not dot:
                continue
            grouped.setdefault(key, {})[suffix.lower()] = (m.offset_data, m.size)
    spans = []
    for key, members in grouped.items():
        start = min(o for o, _ in members.values())
        end = max(o + n for o, n in members.values())
        spans.append(MemberSpan(key, start, end, {s: (o - start, n) for s, (o, n) in members.items()}))
    return spans


class ShardRandomAccess:
    """Global sample index -> sample bytes, one ranged read per sample.

    Sample counts per shard come from the index, so ``len`` needs no scan; each shard's headers
    are scanned on first use in each process (cached for ``max_cached_shards`` shards).
    """

    def __init__(
        self, shards: Sequence[ShardEntry], endpoint_url: str | None = None, max_cached_shards: int = 64
    ):
        if any(s.samples is None for s in shards):
            raise ValueError("random access needs per-shard sample counts (an _index.json)")
        self.shards = list(shards)
        self.endpoint_url = endpoint_url
        self.cum = np.cumsum([0] + [s.samples for s in self.shards]).tolist()
        self.max_cached = max_cached_shards
        self._tables: OrderedDict[int, list[MemberSpan]] = OrderedDict()
        self._fs_pid: tuple[int, fsspec.AbstractFileSystem] | None = None

    def __len__(self) -> int:
        return self.cum[-1]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs_pid"] = None
        return state

    def _fs(self) -> fsspec.AbstractFileSystem:
        if self._fs_pid is None or self._fs_pid[0] != os.getpid():
            self._fs_pid = (os.getpid(), filesystem(self.shards[0].url, self.endpoint_url)[0])
        return self._fs_pid[1]

    def _table(self, si: int) -> list[MemberSpan]:
        if si in self._tables:
            self._tables.move_to_end(si)
            return self._tables[si]
        table = scan_tar(self._fs(), self.shards[si].url)
        if len(table) != self.shards[si].samples:
            raise ValueError(
                f"{self.shards[si].url} holds {len(table)} samples, the index says {self.shards[si].samples}"
            )
        self._tables[si] = table
        while len(self._tables) > self.max_cached:
            self._tables.popitem(last=False)
        return table

    def get(self, index: int) -> tuple[dict, str, str]:
        """``(files, key, shard_url)`` of global sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        si = bisect.bisect_right(self.cum, index) - 1
        span = self._table(si)[index - self.cum[si]]
        url = self.shards[si].url
        blob = self._fs().cat_file(url, start=span.start, end=span.end)
        files = {s: blob[o : o + n] for s, (o, n) in span.members.items()}
        return files, span.key, url
