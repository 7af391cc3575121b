"""Export a RealDGen dataset to paired image folders plus BasicSR / Real-ESRGAN meta files.

Layout written under ``out_dir`` (a local folder: BasicSR's disk backend reads local files)::

    hr/{key}.png                    the HR member's PNG bytes, copied verbatim (pixel-exact)
    lr/{key}.png                    the LR member's PNG bytes, copied verbatim
    meta_info_basicsr.txt           BasicSR PairedImageDataset ``meta_info_file``:
                                    "{key}.png (H,W,3)" — the GT name relative to
                                    dataroot_gt=hr, the LQ name derived from it in dataroot_lq=lr
    meta_info_realesrgan.txt        Real-ESRGAN RealESRGANPairedDataset ``meta_info``:
                                    "hr/{key}.png, lr/{key}.png" — gt and lq paths relative to
                                    dataroot_gt and dataroot_lq, both set to out_dir
    export.json                     source URI, counts, scale(s), skipped samples

Lines are sorted by key, so the files are the same whatever the shard order. A folder that already
holds an export is refused unless ``overwrite`` (``--overwrite``) replaces it: images of an earlier,
larger export left in ``hr/`` would otherwise be trained on by a tool that reads folders whole.
A shard that yields fewer samples than the index names (cut short, or unreadable) is counted as
``truncated_tar`` / ``shard_error`` with the number of samples lost, so ``pairs`` plus the lost
samples add up to the index's total.

Shards are untrusted input (see :mod:`pipelines.reader`): only members named
``KEY.hr.png``/``KEY.lr.png``/``KEY.json`` with ``KEY`` matching ``[A-Za-z0-9_-]+`` are read, so a
file name is always ``{key}.png`` inside ``hr/`` or ``lr/``; each write is also checked to stay
inside ``out_dir`` and never follows a symbolic link already there. Everything skipped is counted
by reason in ``export.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipelines.reader import (
    KEY_RE,
    MEMBER_REASONS,
    BadSample,
    ShardEntry,
    decode_pair,
    filesystem,
    iter_tar_samples,
    list_shards,
    open_shard,
    png_size,
)
from pipelines.storage import TransientStorageError

log = logging.getLogger(__name__)

BASICSR_META = "meta_info_basicsr.txt"
REALESRGAN_META = "meta_info_realesrgan.txt"


@dataclass
class ExportResult:
    """What :func:`export_dataset` wrote."""

    out_dir: str
    pairs: int
    scales: dict[int, int]
    skipped: Counter = field(default_factory=Counter)
    expected: int | None = None  # the index's total (None: counts unknown)

    @property
    def lost(self) -> int:
        """Samples skipped whole (a member refused unread is not a lost sample)."""
        return sum(n for reason, n in self.skipped.items() if reason not in MEMBER_REASONS)

    def to_dict(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "pairs": self.pairs,
            "expected": self.expected,
            "lost": self.lost,
            "scales": self.scales,
            "skipped": dict(self.skipped),
        }


def iter_raw_samples(
    shards: list[ShardEntry], endpoint_url: str | None = None, on_skip=None
) -> Iterator[dict]:
    """Stream raw samples (``{'__key__', '__url__', 'hr.png', 'lr.png', 'json'}`` bytes) in shard order.

    Read with :func:`pipelines.reader.iter_tar_samples` (untrusted members are never read; a key
    repeated across the shards is skipped; a shard short of its index count reports the missing
    samples). ``on_skip(BadSample)`` hears every skip, a shard that cannot be opened included
    (reason ``shard_error``, counting its samples); without it the first one raises.
    """

    def skip(exc: BadSample) -> None:
        if on_skip is None:
            raise exc
        on_skip(exc)

    if not shards:
        return
    fs = filesystem(shards[0].url, endpoint_url)[0]
    seen: set[str] = set()
    for shard in shards:
        try:
            stream = open_shard(fs, shard.url)
        except TransientStorageError:  # retried for its budget: storage is away, not this shard
            raise
        except Exception as exc:
            message = f"{shard.url}: cannot be opened: {type(exc).__name__}: {exc}"
            skip(BadSample("shard_error", message, shard.samples or 1))
            continue
        with stream:
            yield from iter_tar_samples(stream, shard.url, skip, seen=seen, expected=shard.samples)


def _write_inside(root: str, sub: str, key: str, data: bytes) -> None:
    """Write ``root/sub/{key}.png``: refuses a key that is not ``[A-Za-z0-9_-]+``, a path that would
    resolve outside ``root/sub``, and a symbolic link in its place (never followed)."""
    if not KEY_RE.match(key):
        raise BadSample("bad_key", f"key {key!r} does not match [A-Za-z0-9_-]+; nothing written")
    folder = os.path.realpath(os.path.join(root, sub))
    path = os.path.join(folder, f"{key}.png")
    if os.path.dirname(os.path.realpath(path)) != folder:
        raise BadSample("unsafe_name", f"{key}.png would be written outside {folder}; nothing written")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:  # ELOOP: a symbolic link sits where the file goes
        raise BadSample("unsafe_name", f"cannot write {path}: {exc}; nothing written") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


EXPORT_FILES = (BASICSR_META, REALESRGAN_META, "export.json")


def local_folder_problem(out_dir: str) -> str | None:
    """Why ``out_dir`` cannot be an export's folder (a URI: ``s3://…`` would have become a local
    folder named ``s3:``), or None."""
    if "://" in out_dir:
        return (
            "must be a local folder (BasicSR's disk backend reads local files): export here, then "
            "copy the folder to object storage if the trainer reads it from there"
        )
    return None


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Make ``out_dir/hr`` and ``out_dir/lr`` empty: refuse an earlier export's files unless
    ``overwrite``, which removes them (only the layout's own folders and files)."""
    held = [n for n in EXPORT_FILES if os.path.lexists(os.path.join(out_dir, n))]
    for sub in ("hr", "lr"):
        path = os.path.join(out_dir, sub)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            raise FileExistsError(f"{path} is not a folder; nothing written")
        if os.path.isdir(path) and os.listdir(path):
            held.append(sub + "/")
    if held and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds an export ({', '.join(held)}); pass --overwrite to replace it "
            "or choose another folder"
        )
    for n in EXPORT_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, n))
    for sub in ("hr", "lr"):
        path = os.path.join(out_dir, sub)
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.makedirs(path)


def export_dataset(
    uri: str,
    out_dir: str,
    *,
    endpoint_url: str | None = None,
    limit: int | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``hr/``, ``lr/`` and both meta files for the dataset at ``uri`` into ``out_dir``.

    ``verify`` decodes both images and checks ``lr × scale == hr`` before writing (bad samples are
    skipped and counted); the PNG bytes are written unchanged either way. ``limit`` stops after
    that many pairs. Keys are unique across a dataset (§5), so ``{key}.png`` never collides.
    The dataset is listed before anything is written; a folder holding an earlier export is
    refused (``FileExistsError``) unless ``overwrite``.
    """
    why = local_folder_problem(out_dir)
    if why:
        raise ValueError(f"out_dir {out_dir!r}: {why}")
    shards = list_shards(uri, endpoint_url)
    _prepare_out_dir(out_dir, overwrite)
    skipped: Counter = Counter()

    def on_skip(exc: BadSample) -> None:
        skipped[exc.reason] += exc.count
        log.warning("export: skipping: %s", exc)

    rows: list[tuple[str, int, int]] = []
    scales: Counter = Counter()
    for raw in iter_raw_samples(shards, endpoint_url, on_skip):
        if limit is not None and len(rows) >= limit:
            break
        key = raw["__key__"]
        try:
            if verify:
                hr, _, meta = decode_pair(raw, key)
                h, w = hr.shape[:2]
                scale = int(meta["scale"])
            else:
                missing = [m for m in ("hr.png", "lr.png", "json") if m not in raw]
                if missing:
                    raise BadSample("missing_member", f"{key} lacks {missing}")
                w, h = png_size(raw["hr.png"], f"{key}.hr.png")
                png_size(raw["lr.png"], f"{key}.lr.png")
                try:
                    scale = int(json.loads(raw["json"])["scale"])
                except Exception as exc:
                    raise BadSample("bad_json", f"{key}: json without an int 'scale': {exc}") from None
            for sub, member in (("hr", "hr.png"), ("lr", "lr.png")):
                _write_inside(out_dir, sub, key, raw[member])
        except BadSample as exc:
            on_skip(exc)
            continue
        rows.append((key, h, w))
        scales[scale] += 1
    rows.sort()
    with open(os.path.join(out_dir, BASICSR_META), "w") as f:
        f.writelines(f"{k}.png ({h},{w},3)\n" for k, h, w in rows)
    with open(os.path.join(out_dir, REALESRGAN_META), "w") as f:
        f.writelines(f"hr/{k}.png, lr/{k}.png\n" for k, _, _ in rows)
    counts = [s.samples for s in shards]
    expected = None if limit is not None or None in counts else sum(counts)
    result = ExportResult(out_dir, len(rows), dict(scales), skipped, expected)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"source": uri, **result.to_dict()}, f, indent=1)
    return result
