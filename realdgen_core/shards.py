"""Paired-sample schema of ARCHITECTURE §5 at the bytes level: keys, PNG/JSON encoding, tar I/O.

No storage here: callers hand in file objects. Everything is deterministic so that the same
samples always give the same bytes:

- PNG: Pillow, ``compress_level=6``, no ancillary chunks (no time, no text, no gamma).
- JSON: ``sort_keys``, compact separators, ASCII only.
- tar: USTAR, members sorted by key and within a sample by extension (``hr.png``, ``json``,
  ``lr.png``), ``mtime=0``, ``uid=gid=0``, empty user/group names, mode ``0o644``.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

__all__ = [
    "KEY_RE",
    "MAX_KEY_LEN",
    "REQUIRED_FIELDS",
    "SAMPLE_EXTENSIONS",
    "ShardSchemaError",
    "validate_key",
    "validate_meta",
    "encode_png",
    "decode_png",
    "encode_json",
    "encode_sample",
    "decode_sample",
    "write_tar",
    "read_tar",
    "open_tar",
    "MAX_EXTENDED_HEADER_BYTES",
]

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
MAX_KEY_LEN = 90  # fits a USTAR name field (100 bytes) together with ".hr.png"
SAMPLE_EXTENSIONS = ("hr.png", "json", "lr.png")  # sorted: the member order within a sample
TAR_MTIME = 0

_OPT_STR = (str, type(None))
_OPT_NUM = (float, int, type(None))
REQUIRED_FIELDS: dict[str, tuple[type, ...]] = {
    "scale": (int,),
    "generator": (str,),
    "hr_source": (str,),
    "hr_box": (list,),
    "ref_source": _OPT_STR,
    "model_digest": _OPT_STR,
    "seed": (int,),
    "k": (int,),
    "tau": (int, type(None)),
    "content_error": _OPT_NUM,
    "degradation_error": _OPT_NUM,
}
"""The JSON fields every sample carries (§5) and their allowed types (bool is never an int here)."""


class ShardSchemaError(ValueError):
    """A sample that does not hold to the §5 schema."""


def validate_key(key: str) -> str:
    """Return ``key`` if it matches ``[A-Za-z0-9_-]+`` and fits a tar name; raise otherwise."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ShardSchemaError(f"sample key {key!r} does not match [A-Za-z0-9_-]+")
    if len(key) > MAX_KEY_LEN:
        raise ShardSchemaError(f"sample key {key!r} is longer than {MAX_KEY_LEN} characters")
    return key


def validate_meta(meta: Mapping[str, Any]) -> None:
    """Check the required §5 fields and their types; raise :class:`ShardSchemaError`."""
    for field, kinds in REQUIRED_FIELDS.items():
        if field not in meta:
            raise ShardSchemaError(f"sample json lacks {field!r}")
        value = meta[field]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ShardSchemaError(f"sample json {field!r} has type {type(value).__name__}")
    box = meta["hr_box"]
    if len(box) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in box):
        raise ShardSchemaError(f"sample json 'hr_box' must be 4 ints, got {box!r}")


def _check_image(name: str, img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", None)
        raise ShardSchemaError(f"{name} must be a uint8 HxWx3 array, got {dtype} {shape}")


def encode_png(img: np.ndarray) -> bytes:
    """uint8 HxWx3 → PNG bytes (deterministic: fixed compression, no metadata chunks)."""
    _check_image("image", img)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img), mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 HxWx3 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def encode_json(meta: Mapping[str, Any]) -> bytes:
    """Canonical JSON bytes (sorted keys, compact, ASCII); NaN/inf are refused."""
    return json.dumps(
        meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def encode_sample(key: str, hr: np.ndarray, lr: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """One sample as WebDataset members: ``{"__key__", "hr.png", "lr.png", "json"}``.

    ``hr``/``lr`` are uint8 HxWx3; ``hr`` must be exactly ``meta["scale"]`` times ``lr``.
    """
    validate_key(key)
    _check_image("hr", hr)
    _check_image("lr", lr)
    validate_meta(meta)
    s = meta["scale"]
    if hr.shape[0] != lr.shape[0] * s or hr.shape[1] != lr.shape[1] * s:
        raise ShardSchemaError(f"{key}: hr {hr.shape[:2]} is not {s} x lr {lr.shape[:2]}")
    return {"__key__": key, "hr.png": encode_png(hr), "lr.png": encode_png(lr), "json": encode_json(meta)}


def decode_sample(sample: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Inverse of :func:`encode_sample`: ``(hr, lr, meta)``."""
    return decode_png(sample["hr.png"]), decode_png(sample["lr.png"]), json.loads(sample["json"])


class _CountingWriter:
    """Wraps a write-only file object and counts the bytes that went through it."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj
        self.count = 0

    def write(self, data: bytes) -> int:
        self.fileobj.write(data)
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        if hasattr(self.fileobj, "flush"):
            self.fileobj.flush()


def write_tar(samples: Iterable[Mapping[str, Any]], fileobj: BinaryIO) -> int:
    """Write samples as one uncompressed tar (sorted by key); return the number of bytes written.

    Works on non-seekable file objects (stream mode). Duplicate keys are refused. A member's data
    is bytes, or a callable returning them, called when that member is written: a caller whose
    samples live on disk holds one member in memory at a time, not the shard.
    """
    by_key: dict[str, Mapping[str, Any]] = {}
    for s in samples:
        key = validate_key(s["__key__"])
        if key in by_key:
            raise ShardSchemaError(f"duplicate sample key {key!r}")
        by_key[key] = s
    out = _CountingWriter(fileobj)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        for key in sorted(by_key):
            sample = by_key[key]
            for ext in sorted(k for k in sample if k != "__key__"):
                data = sample[ext]
                if callable(data):
                    data = data()
                if not isinstance(data, bytes | bytearray | memoryview):
                    raise ShardSchemaError(f"{key}.{ext}: member data must be bytes")
                if "/" in ext or ext.startswith("."):
                    raise ShardSchemaError(f"{key}.{ext}: extension must be flat")
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = TAR_MTIME
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(bytes(data)))
    out.flush()
    return out.count


# Most bytes of one extended header (PAX, GNU long name/link) a reader loads: tarfile reads such a
# header whole, before any check of the member it describes can run. A long member name needs
# well under 1 KiB.
MAX_EXTENDED_HEADER_BYTES = 1 << 20
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    def _proc_member(self, tarfile_):
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise tarfile.HeaderError(
                f"extended header of {self.size} bytes (limit {MAX_EXTENDED_HEADER_BYTES}) "
                f"at offset {self.offset}"
            )
        return super()._proc_member(tarfile_)


def open_tar(fileobj: BinaryIO, mode: str) -> tarfile.TarFile:
    """``tarfile.open`` for tars from anywhere (read modes ``r|`` / ``r:``): an extended header larger
    than ``MAX_EXTENDED_HEADER_BYTES`` raises ``tarfile.HeaderError`` (a ``TarError``) instead of
    being read into memory."""
    return tarfile.open(fileobj=fileobj, mode=mode, tarinfo=_BoundedTarInfo)


def read_tar(fileobj: BinaryIO) -> Iterator[dict[str, Any]]:
    """Yield ``{"__key__": key, ext: bytes, ...}`` per sample, in tar order."""
    current: dict[str, Any] | None = None
    with open_tar(fileobj, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
    if current is not None:
        yield current
