"""Image sources: list inputs (folders/globs, WebDataset shards, parquet URI lists) and decode them.

Listing is deterministic (sorted by URI) and cheap (names and sizes; WebDataset members are
indexed by their byte range inside the tar, so a worker reads one member with a range request).

Decoding is defensive, for inputs nobody has checked: the pixel count is checked from the header
before any pixel is decoded (decompression bombs), EXIF orientation is applied, and every mode
(grayscale, 16-bit, RGBA/LA/palette with transparency, CMYK, YCbCr, …) is converted to RGB
8-bit. Failures raise :class:`ImageError` whose ``reason`` is a short, stable category followed
by details, e.g. ``"truncated: image file is truncated (12 bytes not processed)"``.
Transparent pixels are composited over white.
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import tarfile
import threading
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.storage import (
    StorageAccessError,
    TransientStorageError,
    file_uri_path,
    get_fs,
    local_abspath,
    open_for_header_scan,
    read_parquet,
    with_retries,
)
from realdgen_core.shards import open_tar

log = logging.getLogger("realdgen.sources")

__all__ = [
    "SourceItem",
    "ImageError",
    "SourceError",
    "list_source",
    "index_tar",
    "read_item_bytes",
    "decode_image",
    "load_image",
]

_GLOB_CHARS = set("*?[")
_PIL_LIMIT_LOCK = threading.Lock()


class SourceError(RuntimeError):
    """A source that cannot be listed (missing folder, unreadable parquet, …)."""


class ImageError(ValueError):
    """An input that cannot become an RGB 8-bit image; ``reason`` says why (category: detail)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def category(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass(frozen=True)
class SourceItem:
    """One image: its stable ``uri`` and where its bytes are (``path``, optional byte range)."""

    uri: str  # what the dataset records (hr_source / ref_source)
    path: str  # the URI of the object holding the bytes (the tar for WebDataset members)
    offset: int | None = None  # byte range inside `path` (WebDataset members)
    size: int | None = None  # size in bytes when known from the listing
    error: str | None = None  # found unusable while listing (reading it raises ImageError(error))

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: Mapping) -> SourceItem:
        return cls(row["uri"], row["path"], row.get("offset"), row.get("size"), row.get("error"))


def _uri_of(prefix: str, path: str) -> str:
    return f"{prefix}{path}" if prefix else path


def written_root(spec_uri: str) -> str:
    """The source's root as the manifest writes it: up to its first glob part (``*``, ``?``, ``[``),
    unless the whole local path exists as written (a folder named "[2024] trip")."""
    written = file_uri_path(spec_uri)
    parts = written.rstrip("/").split("/")
    literal = "://" not in written and os.path.exists(os.path.expanduser(written))
    globbed = (i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    cut = len(parts) if literal else next(globbed, len(parts))
    return "/".join(parts[:cut])


def _recorded_uri(spec_uri: str, path: str) -> str:
    """The URI a local image is recorded (and keyed, and seeded) by: the source URI *as written in
    the manifest* joined with the image's path below it, so the same manifest run from another
    working directory or checkout gives the same keys, seeds and bytes. s3 URIs are already
    location-independent and pass through unchanged; a path outside the root stays absolute."""
    user_root = written_root(spec_uri)
    abs_root = local_abspath(user_root or ".")  # "/"-separated, as fsspec lists `path`
    if path == abs_root:
        return user_root or path
    if os.path.isfile(abs_root):  # a single file (e.g. a parquet list): its folder is the root
        user_root, abs_root = posixpath.dirname(user_root), os.path.dirname(abs_root)
    if path.startswith(abs_root.rstrip("/") + "/"):
        rel = path[len(abs_root.rstrip("/")) + 1 :]
        return f"{user_root.rstrip('/')}/{rel}" if user_root else rel
    return path


def name_below_root(spec_uri: str, uri: str) -> str:
    """``uri`` (an item's recorded URI) relative to the source root as written in ``spec_uri``
    (up to its first glob part; a single file's folder): the same file has the same name however
    the root is spelled (relative or absolute, with or without ``file://``) or wherever the folder
    has moved. A URI outside the root is returned unchanged."""
    root = written_root(spec_uri)
    # a parquet list's relative entries are recorded below its folder
    for r in (root, posixpath.dirname(root)) if root.endswith(".parquet") else (root,):
        if r and uri.startswith(r.rstrip("/") + "/"):
            return uri[len(r.rstrip("/")) + 1 :]
    return uri


def _ext_ok(name: str, extensions: tuple[str, ...]) -> bool:
    return name.rsplit(".", 1)[-1].lower() in extensions if "." in name else False


def local_image_files(folder: str | os.PathLike) -> list[str]:
    """The image files directly in a local folder (the manifest's default extensions, any case),
    sorted by path: the evaluation's paired folders and held-out photos."""
    from pipelines.manifest import IMAGE_EXTENSIONS

    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and _ext_ok(e.name, IMAGE_EXTENSIONS))


def _find(fs, path: str) -> dict[str, dict]:
    """Files under ``path`` (a folder, a single file, or a glob) with their info."""
    if _GLOB_CHARS & set(path) and not fs.exists(path):  # a folder named "[2024] trip" is a folder
        found = fs.glob(path, detail=True)
        return {p: info for p, info in found.items() if info.get("type") != "directory"}
    if not fs.exists(path):
        raise SourceError(f"not found: {path}")
    if fs.isfile(path):
        return {path: fs.info(path)}
    return fs.find(path, detail=True)


def index_tar(
    tar_uri: str, recorded: str, extensions: tuple[str, ...], storage: Mapping | None = None
) -> list[SourceItem]:
    """The image members of one WebDataset shard, by byte range. Never raises for a bad shard.

    A shard that cannot be read as a tar, or that ends early (cut off inside a member, or before
    its end-of-archive blocks), still yields what could be indexed; what is lost becomes an item
    with an ``error``, so it is recorded as a failure row of the job instead of stopping it:
    a member cut off inside its data fails as ``truncated``, and a shard that cannot be walked
    (or whose tail is missing) gets one ``unreadable shard`` item for the members that cannot be
    listed. Storage errors (the shard could not be fetched at all) are retried while they are
    transient (:func:`~pipelines.storage.with_retries`), then propagate, so that the listing is
    retried rather than the shard recorded as bad.
    """

    def index() -> list[SourceItem]:
        return _index_tar(tar_uri, recorded, extensions, storage)

    return with_retries(index, what=f"indexing {tar_uri}")


def _index_tar(
    tar_uri: str, recorded: str, extensions: tuple[str, ...], storage: Mapping | None
) -> list[SourceItem]:
    fs, p = get_fs(tar_uri, storage)
    size = fs.size(p)
    items: list[SourceItem] = []
    seen: dict[str, int] = {}
    end = 0  # where the last member's data (padded to 512-byte blocks) ends
    problem: str | None = None
    try:
        with open_for_header_scan(fs, p) as f, open_tar(f, "r:") as tar:
            for m in tar:
                end = m.offset_data + -(-m.size // 512) * 512
                if not (m.isfile() and _ext_ok(m.name, extensions)):
                    continue
                uri = f"{recorded}#{m.name}"
                err = None
                if m.offset_data + m.size > size:
                    stop = m.offset_data + m.size
                    err = f"truncated: member {m.name!r} ends at byte {stop} of a {size}-byte shard {tar_uri}"
                elif m.name in seen:
                    # Two members under one name: which is "the" image is ambiguous (tar
                    # extraction keeps the last). The first stays the input; each later one
                    # becomes an input of its own that fails with this reason (a failure row).
                    seen[m.name] += 1
                    err = f"duplicate member: {m.name!r} appears {seen[m.name]} times in {tar_uri}"
                    uri = f"{uri}~dup{seen[m.name] - 1}"
                else:
                    seen[m.name] = 1
                items.append(SourceItem(uri, tar_uri, m.offset_data, m.size, err))
    except (tarfile.TarError, EOFError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if (
        problem is None
        and size - end < 1024
        and not (items and items[-1].error and items[-1].error.startswith("truncated"))
    ):
        problem = f"no end-of-archive marker after byte {end} of {size}"
    if problem is not None:
        err = f"unreadable shard: {tar_uri} ({problem}); members after the {len(items)} listed cannot be read"
        items.append(SourceItem(f"{recorded}#<unreadable>", tar_uri, None, None, err))
    return items


def _index_tars_here(tars, extensions, storage):
    return [index_tar(t, r, extensions, storage) for t, r in tars]


def list_source(spec, storage: Mapping | None = None, map_tars=None) -> list[SourceItem]:
    """All images of a :class:`~pipelines.manifest.SourceSpec`, sorted by URI, ``limit`` applied.

    ``map_tars(tars, extensions, storage)``: indexes WebDataset shards (``tars`` is a list of
    ``(tar_uri, recorded_uri)``) and returns one member list per tar, in order; by default each
    tar is indexed here with :func:`index_tar`, one after another (the job fans them out as Ray
    tasks)."""
    prefix = "s3://" if spec.uri.startswith("s3://") else ""
    fs, path = get_fs(spec.uri, storage)

    def recorded(p: str) -> str:
        return _uri_of(prefix, p) if prefix else _recorded_uri(spec.uri, p)

    if prefix:
        fs.invalidate_cache()
    exts = tuple(spec.extensions)
    items: list[SourceItem] = []

    def find() -> dict[str, dict]:  # transient storage errors are retried; "not found" is not
        return with_retries(lambda: _find(fs, path), what=f"listing {spec.uri}")

    def read_column(p: str) -> list:
        def read() -> list:
            with fs.open(p, "rb") as f:
                return read_parquet(f, columns=[spec.column]).column(spec.column).to_pylist()

        return with_retries(read, what=f"reading {p}")

    if spec.format == "folder":
        other: Counter[str] = Counter()  # extensions left out, said once (not silently dropped)
        for p, info in find().items():
            if _ext_ok(p, exts):
                items.append(SourceItem(recorded(p), _uri_of(prefix, p), None, info.get("size")))
            elif not posixpath.basename(p).startswith("."):
                other[posixpath.splitext(p)[1].lower() or "(none)"] += 1
        if other:
            log.warning(
                "%s: %d file(s) left out by extension (%s); the source's `extensions` keeps %s: "
                "add an extension to include its files",
                spec.uri,
                sum(other.values()),
                ", ".join(f"{e}: {n}" for e, n in sorted(other.items(), key=lambda x: (-x[1], x[0]))[:6]),
                ", ".join(exts),
            )
    elif spec.format == "webdataset":
        tars = [(_uri_of(prefix, p), recorded(p)) for p in sorted(q for q in find() if q.endswith(".tar"))]
        indexed = (map_tars or _index_tars_here)(tars, exts, storage)
        for members in indexed:
            items.extend(members)
    elif spec.format == "parquet":
        for p in sorted(q for q in find() if q.endswith(".parquet")):
            base = posixpath.dirname(p)
            for u in read_column(p):
                if not u:
                    continue
                if "://" in u:
                    ref = file_uri_path(u)
                    items.append(SourceItem(ref, ref, None, None))
                elif u.startswith("/"):
                    items.append(SourceItem(u, u, None, None))
                else:  # relative to the parquet file: recorded relative to the source, like folders
                    joined = posixpath.join(base, u)
                    items.append(SourceItem(recorded(joined), _uri_of(prefix, joined), None, None))
    else:  # pragma: no cover - the manifest forbids it
        raise SourceError(f"unknown source format {spec.format!r}")
    uniq = {it.uri: it for it in items}
    unnamed = [u for u in uniq if not _is_utf8(u)]
    if unnamed:
        # A name that is not UTF-8 (listed with surrogate escapes) cannot be keyed, recorded in a
        # parquet or shown: the file is left out, and said so, rather than stopping the listing.
        log.warning(
            "%s: %d file(s) left out, their names are not valid UTF-8 (e.g. %s); rename them to include them",
            spec.uri,
            len(unnamed),
            ascii(unnamed[0]),
        )
        for u in unnamed:
            del uniq[u]
    out = [uniq[u] for u in sorted(uniq)]
    return out[: spec.limit] if spec.limit else out


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_item_bytes(item: SourceItem, storage: Mapping | None = None, max_bytes: int | None = None) -> bytes:
    """The bytes of one image; raises :class:`ImageError` (missing/too big/unreadable).

    Transient storage errors (connection refused/reset, timeouts, 5xx, throttling) are retried
    (:func:`~pipelines.storage.with_retries`); if storage stays unavailable for the whole budget
    :class:`~pipelines.storage.TransientStorageError` is raised, never :class:`ImageError`: an
    input that was only unavailable must not become a permanent failure row. Nor one that storage
    would not give these credentials (expired, invalid, not allowed):
    :class:`~pipelines.storage.StorageAccessError`.
    """
    if item.error:
        raise ImageError(item.error)
    if max_bytes is not None and item.size is not None and item.size > max_bytes:
        raise ImageError(f"file too large: {item.size} bytes > limit {max_bytes}")
    fs, path = get_fs(item.path, storage)

    def fetch() -> bytes:
        if item.offset is not None:
            return fs.cat_file(path, start=item.offset, end=item.offset + (item.size or 0))
        if max_bytes is not None and item.size is None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise ImageError(f"file too large: {size} bytes > limit {max_bytes}")
        return fs.cat_file(path)

    try:
        data = with_retries(fetch, what=f"read {item.uri}")
    except (TransientStorageError, StorageAccessError):
        raise  # the task fails (and is retried while storage is only unavailable); no failure row
    except FileNotFoundError:
        raise ImageError(f"missing: {item.uri} not found") from None
    except ImageError:
        raise
    except Exception as exc:  # a local file's permissions and the like become a failure row, not a crash
        raise ImageError(f"unreadable: {type(exc).__name__}: {exc}") from None
    return data


# Rows converted at a time on the alpha path: the composite of a whole 64 MP image held three
# more full-size copies (26 B per pixel in all, where an RGB image takes 10).
_STRIP_PIXELS = 1 << 22


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Any Pillow mode → uint8 HxWx3 (16-bit scaled, alpha composited over white)."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit data (PNG 16-bit gray opens as "I" or "I;16"); 32-bit "I" clipped to 16 bits.
        # round(v / 257) in integers, in place (float64 copies took 28 B per pixel): v / 257 is
        # never a half, so floor((v + 128) / 257) is the same value
        a = np.array(im, dtype=np.int32)
        np.clip(a, 0, 65535, out=a)
        a += 128
        a //= 257
        g = a.astype(np.uint8)
        del a
        return np.repeat(g[..., None], 3, axis=2)
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = a * 255.0 if np.nanmax(a) <= 1.0 else a
        g = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        w, h = rgba.size
        out = np.empty((h, w, 3), np.uint8)
        rows = max(1, _STRIP_PIXELS // w)
        for y in range(0, h, rows):  # a pixel's composite depends on that pixel only
            strip = rgba.crop((0, y, w, min(h, y + rows)))
            white = Image.new("RGBA", strip.size, (255, 255, 255, 255))
            out[y : y + strip.height] = np.asarray(Image.alpha_composite(white, strip).convert("RGB"))
        return out
    if mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


# What an input may be, by content (the extension filter only looks at names). Pillow identifies
# files by their bytes: without this list a ".png" holding PostScript would be handed to
# Ghostscript (EPS), and other rarely used plugins would parse untrusted bytes. (A camera's
# multi-picture JPEG, MPO, is opened by the JPEG plugin.)
# AVIF and HEIF (a plugin such as pillow-heif) where this Pillow has them: a name it does not know
# would make every open fail, so the list is filtered by what is registered.
IMAGE_FORMATS = (
    "PNG",
    "JPEG",
    "WEBP",
    "BMP",
    "TIFF",
    "GIF",
    "PPM",
    "TGA",
    "JPEG2000",
    "ICO",
    "AVIF",
    "HEIF",
)


def _readable_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def decode_image(
    data: bytes,
    *,
    max_pixels: int = 64_000_000,
    min_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Bytes → uint8 HxWx3 RGB, EXIF-oriented. Raises :class:`ImageError` with a clear reason.

    ``max_pixels`` is checked from the header before decoding; ``min_size`` is (width, height)
    after orientation.
    """
    if len(data) == 0:
        raise ImageError("empty file: 0 bytes")
    try:
        # Pillow's own global bomb check would fire first (with its own limit and message);
        # switch it off for this open only: our limit is checked right below, before decoding.
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(io.BytesIO(data), formats=_readable_formats())
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except Image.DecompressionBombError as exc:
        raise ImageError(f"too large: {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image: unrecognised format ({len(data)} bytes; read: {', '.join(_readable_formats())})"
        ) from None
    except Exception as exc:
        raise ImageError(f"corrupt: {type(exc).__name__}: {exc}") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageError(f"corrupt: header says {w}x{h}")
        if w * h > max_pixels:
            raise ImageError(f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
        try:
            im.seek(0)
            prev = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    im.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = prev
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            text = str(exc)
            cat = "truncated" if "truncat" in text.lower() or isinstance(exc, EOFError) else "corrupt"
            raise ImageError(f"{cat}: {type(exc).__name__}: {text}") from None
        except Exception as exc:
            raise ImageError(f"corrupt: {type(exc).__name__}: {exc}") from None
        try:
            # in place: without an orientation to undo, exif_transpose returns a full copy
            ImageOps.exif_transpose(im, in_place=True)
        except Exception:  # a broken EXIF block is not worth losing the image over
            pass
        rgb = _to_rgb8(im)
    if min_size is not None and (rgb.shape[1] < min_size[0] or rgb.shape[0] < min_size[1]):
        raise ImageError(f"too small: {rgb.shape[1]}x{rgb.shape[0]} < {min_size[0]}x{min_size[1]}")
    return np.ascontiguousarray(rgb)


MAX_FILE_BYTES = 256 * 2**20  # the default for every image read (the job's limits.max_file_bytes)


def load_image(
    item: SourceItem,
    storage: Mapping | None = None,
    *,
    max_pixels: int = 64_000_000,
    max_bytes: int | None = MAX_FILE_BYTES,
    min_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Read and decode one :class:`SourceItem` (see :func:`decode_image`); a file (or tar member)
    over ``max_bytes`` fails before it is read (None: no limit)."""
    data = read_item_bytes(item, storage, max_bytes)
    return decode_image(data, max_pixels=max_pixels, min_size=min_size)
