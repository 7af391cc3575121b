"""Export to folders, inspect, contract check and the ``realdgen`` CLI."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_factory import write_dataset

from pipelines.cli import COMMANDS, main
from pipelines.export import BASICSR_META, REALESRGAN_META, export_dataset
from pipelines.inspect_shards import check_contract, inspect_dataset

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = REPO.parent / "shared" / "checks" / "validate_shards.py"
if not VALIDATOR.exists():
    VALIDATOR = Path("/work/shared/checks/validate_shards.py")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """5 shards, 17 samples of two HR sizes, x4, one recorded failure per shard."""
    root = str(tmp_path_factory.mktemp("ds") / "run")
    return write_dataset(root, n_samples=17, samples_per_shard=4, hr_size=[64, 48], seed=2)


def _members(fac) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for shard in fac.shards:
        with tarfile.open(f"{fac.uri}/{shard}.tar") as tar:
            for m in tar:
                key, _, suffix = m.name.partition(".")
                out.setdefault(key, {})[suffix] = tar.extractfile(m).read()
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_export_writes_pixel_exact_folders_and_both_meta_files(dataset, tmp_path):
    out = tmp_path / "export"
    result = export_dataset(dataset.uri, str(out))
    assert result.pairs == 17 and result.scales == {4: 17} and not result.skipped
    members = _members(dataset)
    # a plain PIL folder loop, as any trainer would do
    hr_files = sorted(os.listdir(out / "hr"))
    assert hr_files == sorted(os.listdir(out / "lr")) == sorted(f"{k}.png" for k in dataset.keys)
    for name in hr_files:
        key = name[:-4]
        hr, lr = Image.open(out / "hr" / name), Image.open(out / "lr" / name)
        assert hr.mode == lr.mode == "RGB"
        assert hr.size == (lr.size[0] * 4, lr.size[1] * 4) == dataset.hr_sizes[key]
        assert (out / "hr" / name).read_bytes() == members[key]["hr.png"]
        assert (out / "lr" / name).read_bytes() == members[key]["lr.png"]

    # BasicSR PairedImageDataset meta_info_file: "GT_NAME (H,W,C)"; gt in dataroot_gt, lq = same
    # basename in dataroot_lq (filename_tmpl '{}').
    pairs = []
    for line in (out / BASICSR_META).read_text().splitlines():
        gt_name, shape = line.split(" ")
        h, w, c = (int(v) for v in shape.strip("()").split(","))
        gt, lq = out / "hr" / gt_name, out / "lr" / os.path.basename(gt_name)
        assert Image.open(gt).size == (w, h) and c == 3 and lq.exists()
        pairs.append(gt_name[:-4])
    assert sorted(pairs) == pairs == sorted(dataset.keys)
    # Real-ESRGAN RealESRGANPairedDataset meta_info: "gt_path, lq_path" relative to the dataroots
    seen = []
    for line in (out / REALESRGAN_META).read_text().splitlines():
        gt_rel, lq_rel = line.split(", ")
        assert (out / gt_rel).exists() and (out / lq_rel).exists()
        assert gt_rel == f"hr/{Path(gt_rel).stem}.png" and lq_rel == f"lr/{Path(gt_rel).stem}.png"
        seen.append(Path(gt_rel).stem)
    assert sorted(seen) == sorted(dataset.keys)
    assert json.loads((out / "export.json").read_text())["pairs"] == 17


def test_export_skips_bad_pairs(tmp_path):
    fac = write_dataset(str(tmp_path / "ds"), n_samples=4, samples_per_shard=4, failures_per_shard=0)
    # rewrite the shard with one LR of the wrong size
    members = _members(fac)
    bad = fac.keys[1]
    buf = io.BytesIO()
    Image.new("RGB", (15, 16)).save(buf, format="PNG")
    members[bad]["lr.png"] = buf.getvalue()
    with tarfile.open(f"{fac.uri}/{fac.shards[0]}.tar", "w") as tar:
        for key in fac.keys:
            for suffix in ("hr.png", "lr.png", "json"):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(members[key][suffix])
                tar.addfile(info, io.BytesIO(members[key][suffix]))
    result = export_dataset(fac.uri, str(tmp_path / "out"))
    assert result.pairs == 3 and result.skipped == {"size_mismatch": 1}
    assert bad not in (tmp_path / "out" / REALESRGAN_META).read_text()


def test_inspect_counts_match_the_factory_and_draws_a_sheet(dataset, tmp_path):
    sheet = tmp_path / "sheet.png"
    report = inspect_dataset(dataset.uri, contact_sheet_path=str(sheet), n_pairs=5, seed=1)
    assert report.shards == 5 and report.samples == 17 and report.index_total == 17
    assert report.generators == dataset.generators
    assert report.failures == dataset.failures
    assert report.attempted == 17 + sum(dataset.failures.values())
    assert sum(report.tau_histogram.values()) == 17
    assert report.tau_histogram.get("none", 0) == sum(t is None for t in dataset.taus)
    n_realdgen = dataset.generators["realdgen"]
    assert report.content_error_histogram["n"] == n_realdgen == sum(report.content_error_histogram["counts"])
    assert report.degradation_error_histogram["none"] == 17 - n_realdgen
    # 5 rows of (64 | 64) cells with 4-px padding: tile = largest HR side
    img = Image.open(sheet)
    assert img.size == (2 * 64 + 3 * 4, 5 * 64 + 6 * 4) and img.mode == "RGB"
    assert len(report.contact_keys) == 5 and set(report.contact_keys) <= set(dataset.keys)
    # the left cell of the first row is that pair's HR, the right cell its LR upscaled (nearest)
    key = report.contact_keys[0]
    members = _members(dataset)[key]
    hr = np.asarray(Image.open(io.BytesIO(members["hr.png"])))
    lr = np.asarray(Image.open(io.BytesIO(members["lr.png"])))
    arr = np.asarray(img)
    h, w = hr.shape[:2]
    np.testing.assert_array_equal(arr[4 : 4 + h, 4 : 4 + w], hr)
    np.testing.assert_array_equal(arr[4 : 4 + h, 4 + 64 + 4 : 4 + 64 + 4 + w], lr.repeat(4, 0).repeat(4, 1))
    again = inspect_dataset(dataset.uri, contact_sheet_path=str(tmp_path / "b.png"), n_pairs=5, seed=1)
    assert again.contact_keys == report.contact_keys
    assert (tmp_path / "b.png").read_bytes() == sheet.read_bytes()


def test_contract_check_agrees_with_the_shared_validator(dataset, tmp_path):
    report = check_contract(dataset.uri, scale=4)
    assert report.ok, report.problems
    assert (report.shards, report.samples) == (5, 17)
    ref = subprocess.run(
        [sys.executable, str(VALIDATOR), dataset.uri, "--scale", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ref.returncode == 0, ref.stdout
    # break it: the index lies about a shard, and one shard lost its completion marker
    broken = tmp_path / "broken"
    fac = write_dataset(str(broken), n_samples=6, samples_per_shard=3, seed=9)
    index = json.loads((broken / "_index.json").read_text())
    index["shards"][0]["samples"] += 1
    index["total_samples"] += 5
    (broken / "_index.json").write_text(json.dumps(index))
    (broken / f"{fac.shards[1]}_stats.json").unlink()
    report = check_contract(str(broken))
    text = "\n".join(report.problems)
    assert not report.ok
    assert f"{fac.shards[0]} says 4 samples" in text
    assert f"no {fac.shards[1]}_stats.json" in text
    assert "total_samples" in text
    ref = subprocess.run(
        [sys.executable, str(VALIDATOR), str(broken)], capture_output=True, text=True, timeout=120
    )
    assert ref.returncode == 1


def test_cli_help_inspect_validate_export(dataset, tmp_path, capsys):
    # the console entry, as a user runs it
    top = _cli("--help")
    assert top.returncode == 0
    res = _cli("inspect", dataset.uri, "--contact-sheet", str(tmp_path / "s.png"), "--pairs", "2")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["samples"] == 17 and report["generators"] == dict(dataset.generators)
    assert Image.open(tmp_path / "s.png").size == (2 * 64 + 12, 2 * 64 + 12)

    # the rest in-process (each interpreter start costs seconds on a shared machine)
    for c in COMMANDS:
        assert c.name in top.stdout
        with pytest.raises(SystemExit) as exc:
            main([c.name, "--help"])
        assert exc.value.code == 0 and "dataset" in capsys.readouterr().out
    assert main(["validate", dataset.uri, "--scale", "4"]) == 0
    assert capsys.readouterr().out.strip().endswith("ok")
    # the contact sheet's folder is made; a place it cannot go is named as such, not as the dataset
    sheet = tmp_path / "new" / "dir" / "s.png"
    assert main(["inspect", dataset.uri, "--contact-sheet", str(sheet), "--pairs", "1"]) == 0
    assert sheet.exists() and json.loads(capsys.readouterr().out)["contact_sheet"] == str(sheet)
    (tmp_path / "afile").write_text("x")
    assert main(["inspect", dataset.uri, "--contact-sheet", str(tmp_path / "afile" / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the contact sheet {tmp_path / 'afile' / 's.png'}: ")
    assert "cannot read" not in err
    assert main(["validate", dataset.uri, "--scale", "2", "--no-decode"]) == 1
    assert "expected 2" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "nope")]) == 2
    capsys.readouterr()
    assert main(["export", dataset.uri, str(tmp_path / "exp"), "--limit", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] == 3
    assert len((tmp_path / "exp" / BASICSR_META).read_text().splitlines()) == 3
    # an earlier export is not mixed with a new one: refused, or replaced whole with --overwrite
    assert main(["export", dataset.uri, str(tmp_path / "exp"), "--limit", "2"]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert main(["export", dataset.uri, str(tmp_path / "exp"), "--limit", "2", "--overwrite"]) == 0
    capsys.readouterr()
    assert len(os.listdir(tmp_path / "exp" / "hr")) == 2 == len(os.listdir(tmp_path / "exp" / "lr"))
    # a dataset that cannot be read: one line naming it, nothing created
    for command in (
        ["export", str(tmp_path / "nope"), str(tmp_path / "exp2")],
        ["inspect", str(tmp_path / "nope")],
    ):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {tmp_path / 'nope'}") and "Traceback" not in err
    assert not (tmp_path / "exp2").exists()
    with pytest.raises(SystemExit) as exc:
        main([])  # a subcommand is required
    assert exc.value.code == 2


def test_inspect_and_validate_count_malformed_json_instead_of_crashing(tmp_path):
    """A json that is a list, or holds a string where a number belongs, is counted (inspect) or named
    (validate); before, an AttributeError / TypeError ended both with a traceback."""
    import shutil

    src = write_dataset(str(tmp_path / "src"), n_samples=3, samples_per_shard=3, failures_per_shard=0)
    root = tmp_path / "ds"
    shutil.copytree(src.uri, root)
    tar_path = root / f"{src.shards[0]}.tar"
    with tarfile.open(tar_path) as tar:
        files = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = {
        src.keys[0]: b"[1, 2]",
        src.keys[1]: json.dumps(
            {**json.loads(dict((m.name, d) for m, d in files)[f"{src.keys[1]}.json"]), "tau": "120"}
            | {"content_error": "0.1"}
        ).encode(),
    }
    with tarfile.open(tar_path, "w") as tar:
        for m, data in files:
            key, _, suffix = m.name.partition(".")
            if suffix == "json" and key in bad:
                data = bad[key]
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = inspect_dataset(str(root))
    assert report.samples == 2 and report.unreadable["bad_json"] == 1
    assert report.tau_histogram.get("none", 0) >= 1 and report.content_error_histogram["none"] >= 1
    problems = check_contract(str(root)).problems
    assert any(f"{src.keys[0]}: json is a list" in p for p in problems), problems
    assert any(p.startswith(f"{src.keys[1]}: json 'tau' is a str") for p in problems), problems


def test_export_counts_the_samples_of_a_shard_cut_short_and_exits_1(tmp_path):
    """A tar cut exactly at a header reads as a clean end: only the index's count shows the lost
    samples. Export counts them (pairs + lost = the index's total) and the CLI exits 1."""
    import shutil

    fac = write_dataset(str(tmp_path / "src"), n_samples=8, samples_per_shard=4, failures_per_shard=0)
    root = tmp_path / "cut"
    shutil.copytree(fac.uri, root)
    first = root / f"{fac.shards[0]}.tar"
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    first.write_bytes(first.read_bytes()[: members[3].offset])  # one sample of four kept
    result = export_dataset(str(root), str(tmp_path / "out"))
    assert result.pairs == 5 and result.expected == 8 and result.lost == 3
    assert result.skipped == {"truncated_tar": 3}
    assert main(["export", str(root), str(tmp_path / "out2")]) == 1
    written = json.loads((tmp_path / "out2" / "export.json").read_text())
    assert (written["pairs"], written["expected"], written["lost"]) == (5, 8, 3)


@pytest.mark.skipif(sys.platform != "linux", reason="Linux only: counts threads in /proc/self/task")
def test_reading_shard_parquet_files_starts_no_pyarrow_thread_and_never_aborts_at_exit(tmp_path):
    """Threads pyarrow starts for a read can abort the process at exit in their teardown (exit 134,
    "terminate called without an active exception"): a finished command reported a crash. The
    threaded read_table did so in 1 of 3 processes (`realdgen inspect` 6 of 16 runs), and
    read_table(use_threads=False), which still starts pool threads, failed this test in CI (1 of 8).
    Reading a shard's parquet file, as the tools do, from bytes or a file object, with a column
    chosen or a schema, must start no thread at all (read_table starts two here); and eight fresh
    processes that read so must all exit 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(3):
        pq.write_table(
            pa.table({"key": [f"k{j}" for j in range(50)], "v": list(range(50))}), tmp_path / f"{i}.parquet"
        )
    script = (
        "import glob, os\n"
        "import pyarrow as pa\n"
        "from pipelines.storage import read_parquet\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "schema = pa.schema([('v', pa.int32()), ('key', pa.string())])\n"
        f"for p in sorted(glob.glob({str(tmp_path)!r} + '/*.parquet')):\n"
        "    assert read_parquet(open(p, 'rb').read()).num_rows == 50\n"
        "    with open(p, 'rb') as f:\n"
        "        assert read_parquet(f, columns=['v']).column_names == ['v']\n"
        "    t = read_parquet(open(p, 'rb').read(), schema=schema)\n"
        "    assert t.schema == schema and t.column('v').to_pylist() == list(range(50)), t.schema\n"
        "print(threads() - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    runs = [
        subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        for _ in range(8)
    ]
    assert [r.returncode for r in runs] == [0] * 8, [(r.returncode, r.stderr[-300:]) for r in runs]
    assert {r.stdout.strip() for r in runs} == {"0"}, [r.stdout for r in runs]
