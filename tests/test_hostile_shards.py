"""Shards from anywhere are untrusted input: every reader, export and inspect on hostile tars.

One hand-made dataset holds, besides good samples: member names with ``..``, an absolute path and
odd characters, a key repeated across the shard, a member held twice, pickle members (``.pyd``,
``.pth``, ``.pickle``) whose unpickling would create a marker file, a symbolic link, a
decompression-bomb PNG (81 Mpx in ~240 kB: over the readers' 64 Mpx limit, under Pillow's own
error threshold) and a truncated tar. Each reader must yield only the good samples, say why it
skipped the others, never write outside its output folder and never unpickle anything.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.basicsr_dataset import RealDGenPairedDataset
from pipelines.export import _write_inside, export_dataset
from pipelines.inspect_shards import check_contract, inspect_dataset
from pipelines.reader import BadSample, PairedShardDataset
from pipelines.storage import read_parquet

GOOD = ["good", "good2", "t1"]  # the samples every reader may return (t1: head of the cut shard)


class _Marker:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that something unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 9000, height: int = 9000) -> bytes:
    """A valid RGB PNG of width x height black pixels, compressed to a few hundred kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _sample(tar: tarfile.TarFile, key: str, seed: int, hr_png: bytes | None = None) -> None:
    rng = np.random.default_rng(seed)
    lr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    hr = np.repeat(np.repeat(lr, 4, axis=0), 4, axis=1)
    meta = {"scale": 4, "generator": "bicubic", "hr_source": "x", "hr_box": [0, 0, 32, 32]}
    _add(tar, f"{key}.hr.png", hr_png if hr_png is not None else _png(hr))
    _add(tar, f"{key}.json", json.dumps(meta).encode())
    _add(tar, f"{key}.lr.png", _png(lr))


@pytest.fixture()
def hostile(tmp_path):
    """``(dataset folder, marker path, absolute-escape path)``; the dataset lies 3 folders deep."""
    root = tmp_path / "a" / "b" / "ds"
    root.mkdir(parents=True)
    marker = tmp_path / "UNPICKLED"
    evil = pickle.dumps(_Marker(str(marker)))
    escape = tmp_path / "escape"  # an absolute member name points here
    with tarfile.open(root / "hostile-000000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _sample(tar, "good", 1)
        _add(tar, "good.pyd", evil)  # webdataset's default decoder would unpickle this
        for name in ("../../x", f"{escape}/abs", "odd key;$(id)"):
            _sample(tar, name, 2)
        _add(tar, "dupm.hr.png", b"first")
        _sample(tar, "dupm", 3)  # hr.png a second time
        _add(tar, "evil.pth", evil)
        _add(tar, "evil.pickle", evil)
        link = tarfile.TarInfo("link.hr.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        _sample(tar, "bomb", 4, hr_png=_bomb_png())
        _sample(tar, "good2", 5)
        _sample(tar, "good", 6)  # the key again, not adjacent: ambiguous, never served
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _sample(tar, "t1", 7)
        _sample(tar, "t2", 8)
    whole = buf.getvalue()
    (root / "hostile-000001.tar").write_bytes(whole[: len(whole) // 2 + 700])  # cut inside t2
    index = {
        "shards": [
            {"name": "hostile-000000.tar", "samples": 4, "bytes": 0},  # good, dupm, bomb, good2 groups
            {"name": "hostile-000001.tar", "samples": 2, "bytes": 0},
        ],
        "total_samples": 6,
        "manifest_digest": "x",
        "model_digest": None,
    }
    (root / "_index.json").write_text(json.dumps(index))
    return root, marker, escape


def _files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file() or p.is_symlink()}


def test_paired_shard_dataset_yields_only_good_samples_and_says_why(hostile):
    root, marker, _ = hostile
    ds = PairedShardDataset(str(root), scale=4, shuffle=False)
    keys = [s["key"] for s in ds]
    assert keys == GOOD
    sk = ds.skipped
    assert sk["unsafe_name"] == 6 and sk["bad_key"] == 3  # ../../x and /abs (3 members each), odd key
    assert sk["unexpected_member"] == 3 and sk["not_a_file"] == 1
    assert sk["duplicate_member"] == 1 and sk["duplicate_key"] == 1
    assert sk["too_many_pixels"] == 1 and sk["truncated_tar"] == 1
    assert not marker.exists()
    with pytest.raises(BadSample, match=r"unexpected_member: .*hostile-000000.tar: member 'good.pyd'"):
        list(PairedShardDataset(str(root), scale=4, shuffle=False, strict=True))
    # the pixel limit is the reader's, from the PNG header: a lower one refuses the good ones too
    small = PairedShardDataset(str(root), scale=4, shuffle=False, max_pixels=32 * 32 - 1)
    assert [s["key"] for s in small] == [] and small.skipped["too_many_pixels"] == 4


def test_basicsr_dataset_serves_only_good_samples(hostile):
    root, marker, _ = hostile
    ds = RealDGenPairedDataset({"dataroot": str(root), "scale": 4, "phase": "train", "gt_size": 8})
    assert len(ds) == 6
    keys = {ds[i]["key"] for i in range(len(ds))}
    # "good" is repeated in its shard: the map-style reader serves neither copy
    assert keys == {"good2", "t1"}
    sk = ds.skipped
    for reason in ("unsafe_name", "bad_key", "unexpected_member", "not_a_file"):
        assert sk[reason] > 0, (reason, dict(sk))
    for reason in ("duplicate_key", "duplicate_member", "too_many_pixels"):
        assert sk[reason] > 0, (reason, dict(sk))
    assert sk["truncated_tar"] + sk["missing_member"] > 0
    assert not marker.exists()


@pytest.mark.parametrize("verify", [True, False])
def test_export_writes_nothing_outside_its_folder(hostile, tmp_path, verify):
    root, marker, escape = hostile
    out = root.parent / "out"  # ../../x from out/hr lands in tmp_path/a
    before = _files_under(tmp_path)
    result = export_dataset(str(root), str(out), verify=verify)
    assert result.pairs == 3
    written = _files_under(tmp_path) - before
    expected = {out / sub / f"{k}.png" for sub in ("hr", "lr") for k in GOOD}
    expected |= {out / n for n in ("meta_info_basicsr.txt", "meta_info_realesrgan.txt", "export.json")}
    assert written == expected
    assert not escape.exists() and not (tmp_path / "a" / "x.png").exists()
    assert not marker.exists()
    skipped = json.loads((out / "export.json").read_text())["skipped"]
    for reason in ("unsafe_name", "bad_key", "unexpected_member", "not_a_file", "duplicate_member"):
        assert skipped[reason] > 0, (reason, skipped)
    assert skipped["duplicate_key"] == 1 and skipped["too_many_pixels"] == 1 and skipped["truncated_tar"] == 1
    assert (out / "meta_info_basicsr.txt").read_text().splitlines() == [f"{k}.png (32,32,3)" for k in GOOD]


def test_export_never_follows_a_symlink_in_its_folder(hostile, tmp_path):
    root, _, _ = hostile
    out = tmp_path / "out2"
    (out / "hr").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "hr" / "good.png").symlink_to(victim)
    # a folder holding files is an earlier export: refused, nothing touched
    with pytest.raises(FileExistsError, match="already holds an export"):
        export_dataset(str(root), str(out))
    assert (out / "hr" / "good.png").is_symlink() and victim.read_text() == "keep me"
    # --overwrite removes the link itself (rmtree does not follow links), never the file it names
    result = export_dataset(str(root), str(out), overwrite=True)
    assert victim.read_text() == "keep me"
    assert result.pairs == 3 and not (out / "hr" / "good.png").is_symlink()
    # a link planted after the folder was prepared is refused at the write (O_NOFOLLOW)
    (out / "lr" / "good.png").unlink()
    (out / "lr" / "good.png").symlink_to(victim)
    with pytest.raises(BadSample, match="unsafe_name"):
        _write_inside(str(out), "lr", "good", b"x")
    assert victim.read_text() == "keep me"


def test_inspect_and_contract_check_name_what_is_wrong(hostile, tmp_path):
    root, marker, _ = hostile
    sheet = tmp_path / "sheet.png"
    report = inspect_dataset(str(root), contact_sheet_path=str(sheet), n_pairs=8)
    assert report.samples == 4  # good, bomb, good2, t1: json read, images only for the sheet
    un = report.unreadable
    for reason in ("unsafe_name", "bad_key", "unexpected_member", "not_a_file", "duplicate_member"):
        assert un[reason] > 0, (reason, dict(un))
    assert un["duplicate_key"] == 1 and un["truncated_tar"] == 1 and un["too_many_pixels"] == 1
    assert sorted(report.contact_keys) == sorted(GOOD) and sheet.stat().st_size > 0
    contract = check_contract(str(root))
    assert not contract.ok
    text = "\n".join(contract.problems)
    needles = ("../../x.hr.png", "/abs.hr.png", "odd key", "good.pyd", "link.hr.png", "dupm holds hr.png")
    for needle in needles:
        assert needle in text, (needle, text)
    assert (
        "hostile-000001.tar: unreadable or truncated tar" in text
        and "members of good are not adjacent" in text
    )
    assert not marker.exists()


def test_source_tar_duplicate_member_becomes_a_failure_row(tmp_path, photos, ray_local):
    """The job's own sources: a member repeated in an HR tar is an input that fails, with a reason."""
    from test_generate_job import manifest_dict, run_dict

    from pipelines.manifest import SourceSpec
    from pipelines.sources import ImageError, list_source, load_image

    hr = tmp_path / "hr"
    hr.mkdir()
    with tarfile.open(hr / "src-000000.tar", "w") as tar:
        _add(tar, "a.png", _png(photos["chelsea"][:64, :64]))
        _add(tar, "b.png", _png(photos["coffee"][:64, :64]))
        _add(tar, "a.png", _png(photos["rocket"][:64, :64]))  # same name, other pixels
        _add(tar, "../../evil.png", _png(photos["astronaut"][:64, :64]))
    items = list_source(SourceSpec(uri=str(hr), format="webdataset"))
    assert len(items) == 4 and len({i.uri for i in items}) == 4
    dup = [i for i in items if i.error]
    assert len(dup) == 1 and "duplicate member" in dup[0].error and "'a.png'" in dup[0].error
    with pytest.raises(ImageError, match="duplicate member"):
        load_image(dup[0])
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(np.ascontiguousarray(photos["chelsea"][::8, ::8])).save(refs / "r.png")
    out = tmp_path / "out"
    data = manifest_dict(str(hr), str(refs), str(out), hr__format="webdataset", output__inputs_per_shard=4)
    data["limits"] = {"max_failure_fraction": 0.5}
    summary = run_dict(data)
    assert summary["inputs"] == 4 and summary["inputs_failed"] == 1
    rows = read_parquet((out / "pairs-000000.parquet").read_bytes()).to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"].startswith("duplicate member")
    assert not (tmp_path / "evil.png").exists() and not (tmp_path.parent / "evil.png").exists()
    for p in out.iterdir():  # nothing escaped: keys are sanitised
        assert p.parent == out
    with tarfile.open(out / "pairs-000000.tar") as tar:
        assert all("/" not in n and ".." not in n for n in tar.getnames())
    assert os.listdir(out)


def test_an_oversized_extended_header_is_refused_before_it_is_read(tmp_path):
    """tarfile reads a PAX header whole before any member check runs: one of 3 MB (any size, in a
    hostile tar) is refused as a bad tar instead of being loaded, by every reader."""
    from pipelines.reader import iter_tar_samples, scan_tar
    from realdgen_core.shards import MAX_EXTENDED_HEADER_BYTES, read_tar

    hr = np.zeros((16, 16, 3), np.uint8)
    members = [("a.hr.png", _png(hr)), ("a.lr.png", _png(hr[::4, ::4])), ("a.json", b"{}")]
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, data) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if i == 1:  # a PAX record larger than the limit on the second member
                info.pax_headers = {"comment": "x" * (3 * MAX_EXTENDED_HEADER_BYTES)}
            tar.addfile(info, io.BytesIO(data))
    skips: list[BadSample] = []
    with open(path, "rb") as f:
        assert list(iter_tar_samples(f, str(path), skips.append)) == []  # a, cut mid-sample, is dropped
    assert [s.reason for s in skips] == ["bad_tar"] and "extended header of" in skips[0].message
    import fsspec

    spans, error = scan_tar(fsspec.filesystem("file"), str(path))
    assert error is not None and error.reason == "bad_tar" and "extended header" in error.message
    with open(path, "rb") as f, pytest.raises(tarfile.HeaderError, match="extended header"):
        list(read_tar(f))
