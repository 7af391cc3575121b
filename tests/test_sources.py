"""Listing and defensive decoding of input images (pipelines/sources.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.manifest import SourceSpec
from pipelines.sources import ImageError, SourceItem, decode_image, list_source, load_image


def png_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def gradient(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), (x + y) % 256], -1)
    return np.clip(base + rng.integers(0, 16, base.shape), 0, 255).astype(np.uint8)


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h (palette, compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def write_bad_inputs(folder: Path, size: int = 64) -> dict[str, str]:
    """Files of every awkward kind; returns name -> expected outcome ("ok" or a reason category)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = gradient(size, size + 16)
    cases: dict[str, str] = {}

    def put(name: str, data: bytes, outcome: str) -> None:
        (folder / name).write_bytes(data)
        cases[name] = outcome

    put("good_rgb.png", png_bytes(good), "ok")
    put("gray.png", png_bytes(good[..., 0]), "ok")
    put("rgba.png", png_bytes(np.dstack([good, np.full(good.shape[:2], 255, np.uint8)])), "ok")
    put("gray16.png", png_bytes(good[..., 1].astype(np.uint16) * 257), "ok")
    put("palette.png", _save(Image.fromarray(good).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), "ok")
    put("cmyk.jpg", _save(Image.fromarray(good).convert("CMYK"), "JPEG", quality=95), "ok")
    put("exif_rot.jpg", exif_rotated_jpeg(good, 6), "ok")
    for ext, fmt in (("webp", "WEBP"), ("tif", "TIFF"), ("gif", "GIF"), ("bmp", "BMP"), ("ppm", "PPM")):
        put(f"other.{ext}", _save(Image.fromarray(good), fmt), "ok")
    # PostScript named .png: Pillow would hand it to Ghostscript (which runs it) if asked to
    # open any format; only the formats of IMAGE_FORMATS are read
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 0 lineto fill\n"
    put("postscript.png", eps, "not an image")
    full = png_bytes(gradient(size, size, 3))
    put("truncated.png", full[: len(full) // 2], "truncated")
    put("zero.png", b"", "empty file")
    put("text.png", b"this is not an image at all\n" * 10, "not an image")
    corrupt = bytearray(full)
    corrupt[60:200] = bytes(140)
    put("corrupt.png", bytes(corrupt), "corrupt")
    put("tiny.png", png_bytes(gradient(8, 8)), "smaller than one tile")
    put("bomb.png", bomb_png(20000, 20000), "too large")
    return cases


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_convertible_modes_become_rgb8(tmp_path):
    cases = write_bad_inputs(tmp_path)
    ref = gradient(64, 80)
    for name, outcome in cases.items():
        if outcome != "ok":
            continue
        img = decode_image((tmp_path / name).read_bytes())
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
        if name == "exif_rot.jpg":
            # orientation 6 = rotate 90° clockwise to display: 64x80 (HxW) becomes 80x64
            assert img.shape[:2] == (80, 64)
            expected = np.rot90(ref, k=-1)
            assert np.abs(img.astype(int) - expected.astype(int)).mean() < 6
        else:
            assert img.shape[:2] == (64, 80), name
            # the pixels, not only the shape: lossless formats exactly, lossy ones within a few levels
            # (a swapped channel or an inverted CMYK decode is off by tens)
            err = np.abs(img.astype(int) - ref.astype(int))
            if name in ("good_rgb.png", "rgba.png") or name.endswith((".tif", ".tiff", ".bmp", ".ppm")):
                assert err.max() == 0, name
            elif name not in ("gray.png", "gray16.png"):
                assert err.mean() < 6, (name, err.mean())
    gray = decode_image((tmp_path / "gray.png").read_bytes())
    assert (gray[..., 0] == ref[..., 0]).all() and (gray[..., 2] == ref[..., 0]).all()
    g16 = decode_image((tmp_path / "gray16.png").read_bytes())
    assert (g16[..., 0] == ref[..., 1]).all()
    rgba = decode_image((tmp_path / "rgba.png").read_bytes())
    assert (rgba == ref).all()


def test_transparent_pixels_composite_over_white():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., 0] = 200
    arr[:2, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    img = decode_image(png_bytes(arr))
    assert (img[:2] == [200, 0, 0]).all()
    assert (img[2:] == 255).all()


@pytest.mark.parametrize(
    "name,category",
    [
        ("truncated.png", "truncated"),
        ("zero.png", "empty file"),
        ("text.png", "not an image"),
        ("postscript.png", "not an image"),
        ("corrupt.png", "corrupt"),
        ("bomb.png", "too large"),
    ],
)
def test_bad_files_give_clear_reasons(tmp_path, name, category):
    write_bad_inputs(tmp_path)
    with pytest.raises(ImageError) as info:
        decode_image((tmp_path / name).read_bytes(), max_pixels=10_000_000)
    assert info.value.category == category, info.value.reason
    if name == "bomb.png":
        assert "20000x20000" in info.value.reason and "limit 10000000" in info.value.reason


def test_bomb_is_refused_before_decoding(monkeypatch):
    data = bomb_png(5000, 5000)

    def boom(self):  # a decode would call load(); the size check must come first
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(Image.Image, "load", boom)
    with pytest.raises(ImageError, match="too large: 5000x5000"):
        decode_image(data, max_pixels=1_000_000)


def test_min_size_and_file_size_limits(tmp_path):
    with pytest.raises(ImageError, match="too small: 8x8 < 16x16"):
        decode_image(png_bytes(gradient(8, 8)), min_size=(16, 16))
    p = tmp_path / "a.png"
    p.write_bytes(png_bytes(gradient(32, 32)))
    item = SourceItem(str(p), str(p), None, p.stat().st_size)
    with pytest.raises(ImageError, match="file too large"):
        load_image(item, max_bytes=10)
    with pytest.raises(ImageError, match="missing"):
        load_image(SourceItem(str(tmp_path / "nope.png"), str(tmp_path / "nope.png")))


def test_list_folder_glob_webdataset_parquet(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    for n in ["b.png", "a.jpg", "sub/c.PNG", "notes.txt"]:
        (d / n).write_bytes(png_bytes(gradient(16, 16)))
    items = list_source(SourceSpec(uri=str(d)))
    assert [Path(i.uri).name for i in items] == ["a.jpg", "b.png", "c.PNG"]
    assert [Path(i.uri).name for i in list_source(SourceSpec(uri=f"file://{d}/*.png"))] == ["b.png"]
    assert len(list_source(SourceSpec(uri=str(d), limit=2))) == 2

    tar_path = tmp_path / "wds" / "s-000000.tar"
    tar_path.parent.mkdir()
    imgs = {f"k{i}": gradient(16 + i, 20, i) for i in range(3)}
    with tarfile.open(tar_path, "w") as tar:
        for k, arr in imgs.items():
            for ext, data in (("png", png_bytes(arr)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    wds = list_source(SourceSpec(uri=str(tar_path.parent), format="webdataset"))
    assert [i.uri.rsplit("#", 1)[1] for i in wds] == ["k0.png", "k1.png", "k2.png"]
    for it in wds:
        k = it.uri.rsplit("#", 1)[1].split(".")[0]
        assert (load_image(it) == imgs[k]).all()

    pq.write_table(pa.table({"uri": ["imgs/b.png", str(d / "a.jpg"), None]}), tmp_path / "list.parquet")
    pl = list_source(SourceSpec(uri=str(tmp_path / "list.parquet"), format="parquet"))
    assert sorted(Path(i.uri).name for i in pl) == ["a.jpg", "b.png"]
    assert all(load_image(i).shape == (16, 16, 3) for i in pl)


def test_list_missing_source_raises(tmp_path):
    from pipelines.sources import SourceError

    with pytest.raises(SourceError, match="not found"):
        list_source(SourceSpec(uri=str(tmp_path / "nope")))


def test_s3_listing_and_reading(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    arr = gradient(24, 24, 7)
    fs.pipe(f"{s3_bucket}/hr/x.png", png_bytes(arr))
    fs.pipe(f"{s3_bucket}/hr/y.txt", b"x")
    items = list_source(SourceSpec(uri=f"s3://{s3_bucket}/hr"))
    assert [i.uri for i in items] == [f"s3://{s3_bucket}/hr/x.png"]
    assert (load_image(items[0]) == arr).all()


def test_recorded_uris_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """Keys and seeds hash the recorded URI: a relative manifest path run from two checkouts must
    record the same URIs (while the bytes are still read from each checkout's own files)."""
    listings = []
    for copy in ("checkout_a", "checkout_b"):
        root = tmp_path / copy
        (root / "data" / "hr").mkdir(parents=True)
        for name in ("x.png", "y.png"):
            Image.new("RGB", (8, 8)).save(root / "data" / "hr" / name)
        pq.write_table(pa.table({"uri": ["hr/x.png"]}), root / "data" / "list.parquet")
        monkeypatch.chdir(root)
        folder = list_source(SourceSpec(uri="data/hr"))
        glob = list_source(SourceSpec(uri="data/*/y.png"))
        table = list_source(SourceSpec(uri="data/list.parquet", format="parquet"))
        assert all(Path(i.path).is_absolute() and str(root) in i.path for i in folder + glob + table)
        listings.append(([i.uri for i in folder], [i.uri for i in glob], [i.uri for i in table]))
    assert listings[0] == listings[1]
    assert listings[0] == (["data/hr/x.png", "data/hr/y.png"], ["data/hr/y.png"], ["data/hr/x.png"])


def test_a_local_root_is_made_absolute_in_the_form_fsspec_lists_files_in(tmp_path, monkeypatch):
    """On Windows os.path.abspath gives ``C:\\data\\hr`` and fsspec lists ``C:/data/hr/x.png``: no
    listed file started with the root + "/", so every input was recorded by its absolute path (its key
    and seed then depended on where the checkout lies) and an output inside a source folder was not
    refused. A root is now made absolute with "/" separators, checked here with Windows' path rules."""
    import ntpath
    import posixpath
    from types import SimpleNamespace

    import fsspec

    from pipelines import sources
    from pipelines.generate import plan
    from pipelines.manifest import ManifestError
    from pipelines.storage import _abspath_with_slashes, local_abspath

    assert _abspath_with_slashes("C:\\data\\hr\\", ntpath) == "C:/data/hr"
    assert _abspath_with_slashes("C:\\data/hr\\..\\lr", ntpath) == "C:/data/lr"
    assert _abspath_with_slashes("C:\\", ntpath) == "C:/"
    assert _abspath_with_slashes("\\\\server\\share\\hr", ntpath) == "//server/share/hr"
    assert _abspath_with_slashes("/data/hr/", posixpath) == "/data/hr"
    assert _abspath_with_slashes("/data/a\\b", posixpath) == "/data/a\\b"  # a name's own character
    # on the platform the suite runs on: a prefix of what fsspec's local filesystem lists
    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "x.png").write_bytes(b"")
    listed = fsspec.filesystem("file").find(str(tmp_path / "hr"))
    assert listed == [local_abspath(str(tmp_path / "hr")) + "/x.png"], listed
    # a Windows root as written, a file as fsspec lists it there: recorded below the root as written
    monkeypatch.setattr(sources, "local_abspath", lambda p: _abspath_with_slashes(p, ntpath))
    monkeypatch.setattr(plan, "local_abspath", lambda p: _abspath_with_slashes(p, ntpath))
    recorded = sources._recorded_uri("C:\\work\\hr", "C:/work/hr/sub/x.png")
    assert recorded == "C:\\work\\hr/sub/x.png"
    assert sources.name_below_root("C:\\work\\hr", recorded) == "sub/x.png"
    m = SimpleNamespace(
        output=SimpleNamespace(uri="C:\\work\\hr\\ds"), hr=SimpleNamespace(uri="C:\\work\\hr"), refs=[]
    )
    with pytest.raises(ManifestError, match=r"output.uri: .* lies inside hr.uri"):
        plan._check_output_outside_sources(m)


def test_folder_named_like_a_glob_and_names_below_the_root(tmp_path, monkeypatch):
    """A folder called "[2024] trip" is listed as a folder (it was read as a glob: nothing found);
    an item's name below the root is the same however the root is spelled, so the calibration's
    train / validation split does not move when a folder is written relative, absolute or file://."""
    from pipelines.sources import name_below_root

    trip = tmp_path / "[2024] trip"
    (trip / "sub").mkdir(parents=True)
    for n in ("a.png", "sub/b.png"):
        Image.new("RGB", (8, 8)).save(trip / n)
    items = list_source(SourceSpec(uri=str(trip)))
    assert [Path(i.uri).name for i in items] == ["a.png", "b.png"]
    monkeypatch.chdir(tmp_path)
    spellings = ("[2024] trip", "./[2024] trip/", str(trip), f"file://{trip}")
    names = {s: [name_below_root(s, i.uri) for i in list_source(SourceSpec(uri=s))] for s in spellings}
    assert all(v == ["a.png", "sub/b.png"] for v in names.values()), names
    # a parquet list's relative entries sit below its folder; a URI outside the root is kept whole
    assert name_below_root("data/list.parquet", "data/hr/x.png") == "hr/x.png"
    assert name_below_root("data/hr", "data/hrx/y.png") == "data/hrx/y.png"
    assert name_below_root("s3://b/refs", "s3://b/refs/k/x.jpg") == "k/x.jpg"
    assert name_below_root("s3://b/refs/*.jpg", "s3://b/refs/x.jpg") == "x.jpg"


def test_a_file_uri_is_its_path_on_posix_and_loses_the_slash_before_a_windows_drive():
    """``file:///C:/data`` was read as ``/C:/data`` on Windows too (``file://`` cut off): a folder
    ``C:`` below the current drive's root. On Windows the slash before a drive letter goes; on POSIX
    the rest of the URI is the path as written, as before."""
    import os

    from pipelines.storage import _windows_file_path, file_uri_path, split_uri

    assert _windows_file_path("/C:/data/hr") == "C:/data/hr"
    assert _windows_file_path("/d:/") == "d:/"
    assert _windows_file_path("/C:/data/[2024] trip/*.png") == "C:/data/[2024] trip/*.png"  # no decoding
    assert _windows_file_path("/data/hr") == "/data/hr"  # no drive: rooted on the current drive
    assert _windows_file_path("//server/share/x") == "//server/share/x"
    assert _windows_file_path("data/hr") == "data/hr"
    assert file_uri_path("s3://b/k") == "s3://b/k" and file_uri_path("C:/data") == "C:/data"
    if os.name != "nt":
        assert file_uri_path("file:///data/x") == "/data/x"
        assert file_uri_path("file:///C:/data") == "/C:/data"  # a folder named "C:" is a folder here
        assert file_uri_path("file://data/x") == "data/x"
        assert file_uri_path("file:///data/a%20b") == "/data/a%20b"
        assert split_uri("file:///data/x") == ("", "/data/x")


def test_a_name_that_is_not_utf8_is_left_out_with_a_warning(tmp_path, caplog):
    """One Latin-1 file name (a Windows copy, an old camera) must not stop the listing of the rest."""
    import logging
    import os

    folder = tmp_path / "hr"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "ok.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write((folder / "ok.png").read_bytes())
    with caplog.at_level(logging.WARNING, logger="realdgen.sources"):
        items = list_source(SourceSpec(uri=str(folder)))
    assert [Path(it.uri).name for it in items] == ["ok.png"]
    assert (
        "1 file(s) left out, their names are not valid UTF-8" in caplog.text and "caf\\udce9" in caplog.text
    )


def test_tar_header_scans_on_s3_do_not_download_the_members(s3_server, s3_bucket):
    """Indexing a WebDataset source (the job's listing, also run by ``--dry-run`` on a laptop) and the
    reader's header scan read only the headers of a remote tar: with s3fs's default 50 MiB read-ahead
    both fetched the whole shard. Bytes are counted on the wire (a loopback proxy before the server)."""
    import s3fs
    from faultproxy import FaultProxy

    from pipelines.reader import scan_tar
    from pipelines.storage import get_fs

    rng = np.random.default_rng(0)
    member = 3 << 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(4):
            for suffix in ("hr.png", "lr.png"):
                data = rng.integers(
                    0, 256, member // (1 if suffix == "hr.png" else 16), dtype=np.uint8
                ).tobytes()
                info = tarfile.TarInfo(f"s{i:03d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    s3fs.S3FileSystem().pipe(f"{s3_bucket}/wds/shard-000000.tar", buf.getvalue())
    whole = len(buf.getvalue())
    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        storage = {"endpoint_url": proxy.url}
        items = list_source(SourceSpec(uri=f"s3://{s3_bucket}/wds", format="webdataset"), storage)
        listed = proxy.bytes_down
        fs, path = get_fs(f"s3://{s3_bucket}/wds/shard-000000.tar", storage)
        spans, error = scan_tar(fs, path)
        scanned = proxy.bytes_down - listed
    assert len(items) == 8 and [i.size for i in items[:2]] == [member, member // 16]
    assert len(spans) == 4 and error is None
    assert spans[1].members["hr.png"][1] == member
    assert listed < whole / 20, (listed, whole)
    assert scanned < whole / 20, (scanned, whole)


def test_files_left_out_by_extension_are_counted_in_a_warning(tmp_path, caplog):
    """A valid image under an extension the source does not keep (.jfif, .avif) used to vanish
    from the listing without a word."""
    import logging

    folder = tmp_path / "hr"
    (folder / "sub").mkdir(parents=True)
    data = png_bytes(gradient(8, 8))
    for name in ("a.png", "b.jfif", "c.JFIF", "sub/d.avif", "notes", ".DS_Store"):
        (folder / name).write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="realdgen.sources"):
        items = list_source(SourceSpec(uri=str(folder)))
    assert [Path(it.uri).name for it in items] == ["a.png"]
    assert "4 file(s) left out by extension (.jfif: 2, (none): 1, .avif: 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="realdgen.sources"):
        items = list_source(SourceSpec(uri=str(folder), extensions=["png", "jfif", "avif"]))
    assert len(items) == 4 and "left out by extension (" in caplog.text  # 'notes' only
    assert "1 file(s) left out by extension ((none): 1)" in caplog.text


def test_lean_conversions_give_the_same_pixels(monkeypatch):
    """The decode converts 16-bit data in integers and composites alpha strip by strip (the float64
    copies and the whole-image composite peaked at 26-28 B per pixel): the pixels are those of the
    plain formulas, round(v / 257) for every 16-bit value and Pillow's alpha composite over white."""
    from pipelines import sources

    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, format="PNG")
    got = decode_image(buf.getvalue())
    want = np.clip(np.rint(v / 257.0), 0, 255).astype(np.uint8)
    assert got.shape == (256, 256, 3)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)

    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (37, 23, 4), dtype=np.uint8)
    white = Image.new("RGBA", (23, 37), (255, 255, 255, 255))
    whole = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba)).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    monkeypatch.setattr(sources, "_STRIP_PIXELS", 5 * 23)  # strips of 5 rows, the last one of 2
    assert np.array_equal(decode_image(buf.getvalue()), whole)
