"""Downstream reader: pairs, crops, distribution over ranks x workers, S3, BasicSR dataset, training."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from shard_factory import write_dataset
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pipelines.basicsr_dataset import REGISTERED_WITH_BASICSR, RealDGenPairedDataset
from pipelines.inspect_shards import check_contract
from pipelines.reader import BadSample, PairedShardDataset, ShardRandomAccess, epoch_order, slot_shards


def _u8(t: torch.Tensor) -> np.ndarray:
    """[3,H,W] float in [0,1] -> uint8 HWC (exact for 8-bit inputs)."""
    return (t.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def _box_down(a: np.ndarray, s: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).reduce(s))


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory):
    """7 shards (an odd number, the last one short): 20 samples, HR 64, x4."""
    root = str(tmp_path_factory.mktemp("odd"))
    return write_dataset(root, n_samples=20, samples_per_shard=3, hr_size=64, failures_per_shard=0)


# -- distribution -----------------------------------------------------------------------------


@pytest.mark.parametrize("n_shards", [1, 5, 7, 8, 13])
@pytest.mark.parametrize("n_slots", [1, 3, 4, 6, 16])
def test_round_robin_slots_partition_the_shards(n_shards, n_slots):
    order = epoch_order(n_shards, seed=5, epoch=2, shuffle=True)
    dealt = [slot_shards(order, s, n_slots) for s in range(n_slots)]
    flat = [i for d in dealt for i in d]
    assert sorted(flat) == list(range(n_shards))
    sizes = {len(d) for d in dealt}
    assert sizes <= {n_shards // n_slots, -(-n_shards // n_slots)}


def _epoch_keys(uri, *, rank, world_size, workers, epoch, **kw):
    ds = PairedShardDataset(uri, gt_size=16, scale=4, rank=rank, world_size=world_size, seed=11, **kw)
    ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=2, num_workers=workers)
    return [k for batch in loader for k in batch["key"]]


def test_one_epoch_yields_every_key_once_over_2_ranks_x_2_workers(odd_dataset):
    assert len(odd_dataset.shards) == 7
    expected = sorted(odd_dataset.keys)
    per_rank = [_epoch_keys(odd_dataset.uri, rank=r, world_size=2, workers=2, epoch=3) for r in range(2)]
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)), "a key was read twice in one epoch"
    assert sorted(union) == expected
    assert all(per_rank), "a rank got no data"
    ds = PairedShardDataset(odd_dataset.uri, rank=1, world_size=2)
    assert len(ds) == 20  # the epoch length over all ranks, from _index.json


def test_shard_order_depends_on_seed_and_epoch_only(odd_dataset):
    a = _epoch_keys(odd_dataset.uri, rank=0, world_size=1, workers=0, epoch=0)
    b = _epoch_keys(odd_dataset.uri, rank=0, world_size=1, workers=0, epoch=0)
    c = _epoch_keys(odd_dataset.uri, rank=0, world_size=1, workers=0, epoch=1)
    assert a == b
    assert a != c and sorted(a) == sorted(c)
    unshuffled = _epoch_keys(odd_dataset.uri, rank=0, world_size=1, workers=0, epoch=1, shuffle=False)
    assert unshuffled == odd_dataset.keys


def test_resampled_is_endless_and_samples_per_epoch_bounds_it(odd_dataset):
    ds = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4, resampled=True, seed=1)
    with pytest.raises(TypeError):
        len(ds)
    it = iter(ds)
    keys = [next(it)["key"] for _ in range(45)]  # more than one epoch of 20
    assert len(keys) == 45 and set(keys) <= set(odd_dataset.keys)
    # shards are drawn afresh (7 shards of up to 3): one shard repeated would give at most 3 keys
    assert len(set(keys)) >= 12, sorted(set(keys))
    bounded = PairedShardDataset(
        odd_dataset.uri, gt_size=16, scale=4, resampled=True, samples_per_epoch=9, rank=0, world_size=1
    )
    got = [k for b in DataLoader(bounded, batch_size=1, num_workers=2) for k in b["key"]]
    assert len(got) == len(bounded) == 9
    with pytest.raises(ValueError, match="samples_per_epoch"):
        PairedShardDataset(odd_dataset.uri, samples_per_epoch=5)


# -- pixels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [4, 2])
def test_crops_are_aligned_and_augmented_identically(tmp_path, scale):
    # LR is the exact box downsample of HR here, so box-downsampling the gt crop must give the lq
    # crop bit for bit, whatever flip/transpose was applied (both commute with a box filter on an
    # aligned grid). A crop misplaced by one LR pixel or a flip applied to one side only fails.
    fac = write_dataset(
        str(tmp_path / "ds"),
        n_samples=8,
        samples_per_shard=4,
        scale=scale,
        hr_size=64,
        blur_sigma=0,
        noise_sigma=0,
        failures_per_shard=0,
    )
    originals = {}
    for shard in fac.shards:
        with tarfile.open(f"{fac.uri}/{shard}.tar") as tar:
            for m in tar:
                if m.name.endswith(".hr.png"):
                    originals[m.name.split(".")[0]] = np.asarray(Image.open(tar.extractfile(m)))
    ds = PairedShardDataset(fac.uri, gt_size=32, scale=scale, seed=4)
    transforms_seen = set()
    n = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for s in ds:
            n += 1
            assert s["gt"].dtype == torch.float32 and s["gt"].shape == (3, 32, 32)
            assert s["lq"].shape == (3, 32 // scale, 32 // scale)
            assert 0.0 <= float(s["lq"].min()) and float(s["gt"].max()) <= 1.0
            gt, lq = _u8(s["gt"]), _u8(s["lq"])
            np.testing.assert_array_equal(_box_down(gt, scale), lq)
            # where did the crop come from? some dihedral transform of an LR-grid-aligned window
            hr = originals[s["key"]]
            hits = []
            for t in range(8):
                cand = gt
                if t & 4:
                    cand = cand.transpose(1, 0, 2)
                if t & 2:
                    cand = cand[::-1]
                if t & 1:
                    cand = cand[:, ::-1]
                for y in range(0, 64 - 32 + 1, scale):
                    for x in range(0, 64 - 32 + 1, scale):
                        if np.array_equal(hr[y : y + 32, x : x + 32], cand):
                            hits.append(t)
            assert hits, f"{s['key']}: gt crop is not an aligned window of the HR"
            transforms_seen.add(hits[0])
    assert n == 24
    assert len(transforms_seen) >= 3, "augmentation never varies"


def test_whole_images_without_gt_size_are_pixel_exact(odd_dataset):
    ds = PairedShardDataset(odd_dataset.uri, shuffle=False)
    with tarfile.open(f"{odd_dataset.uri}/{odd_dataset.shards[0]}.tar") as tar:
        key = odd_dataset.keys[0]
        hr = np.asarray(Image.open(tar.extractfile(f"{key}.hr.png")))
        lr = np.asarray(Image.open(tar.extractfile(f"{key}.lr.png")))
    first = next(iter(ds))
    assert first["key"] == key
    np.testing.assert_array_equal(_u8(first["gt"]), hr)
    np.testing.assert_array_equal(_u8(first["lq"]), lr)
    assert first["gt_path"].endswith(f"/hr/{key}.png") and first["lq_path"].endswith(f"/lr/{key}.png")


def _member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path):
    fac = write_dataset(str(tmp_path / "ds"), n_samples=4, samples_per_shard=4, failures_per_shard=0)
    meta = json.dumps({"scale": 4}).encode()
    hr, lr = np.zeros((32, 32, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    with tarfile.open(tmp_path / "ds" / "bad-000000.tar", "w") as tar:
        _member(tar, "wrongsize.hr.png", _png(hr))
        _member(tar, "wrongsize.lr.png", _png(np.zeros((9, 8, 3), np.uint8)))
        _member(tar, "wrongsize.json", meta)
        _member(tar, "nojson.hr.png", _png(hr))
        _member(tar, "nojson.lr.png", _png(lr))
        _member(tar, "broken.hr.png", b"\x89PNG not really")
        _member(tar, "broken.lr.png", _png(lr))
        _member(tar, "broken.json", meta)
        _member(tar, "gray.hr.png", _png(hr[..., 0]))
        _member(tar, "gray.lr.png", _png(lr))
        _member(tar, "gray.json", meta)
        _member(tar, "good.hr.png", _png(hr))
        _member(tar, "good.lr.png", _png(lr))
        _member(tar, "good.json", meta)
    # a truncated shard: the reader loses its tail, not the run
    whole = (tmp_path / "ds" / f"{fac.shards[0]}.tar").read_bytes()
    (tmp_path / "ds" / "cut-000000.tar").write_bytes(whole[: len(whole) // 2 + 100])
    shards = [
        f"{fac.uri}/{fac.shards[0]}.tar",
        str(tmp_path / "ds" / "bad-000000.tar"),
        str(tmp_path / "ds" / "cut-000000.tar"),
    ]
    ds = PairedShardDataset(shards, gt_size=16, scale=4, shuffle=False)
    keys = [s["key"] for s in ds]
    assert keys[:4] == fac.keys and keys[4] == "good"
    assert 4 + 1 <= len(keys) < 4 + 1 + 4  # some of the truncated shard's head may survive
    assert ds.skipped["size_mismatch"] == 1
    assert ds.skipped["missing_member"] == 1
    assert ds.skipped["decode_error"] == 1
    assert ds.skipped["not_rgb"] == 1
    assert ds.skipped["truncated_tar"] == 1
    # the truncated copy repeats shard 0's keys: its surviving head is skipped, not read twice
    assert keys == [*fac.keys, "good"] and ds.skipped["duplicate_key"] >= 1
    strict = PairedShardDataset([shards[1]], gt_size=16, scale=4, shuffle=False, strict=True)
    with pytest.raises(BadSample, match="size_mismatch"):
        list(strict)
    with pytest.raises(TypeError):  # no index next to these shards: no known epoch length
        len(PairedShardDataset([shards[1]]))


def test_wrong_scale_is_reported_not_silently_cropped(odd_dataset):
    ds = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=2)
    # 20 samples, fewer than the 64 a refusal streak needs: the pass still ends with an error
    # rather than an empty epoch every epoch
    with pytest.raises(
        ValueError, match=r"every sample this worker read was refused \(\{'scale_mismatch': 20\}\)"
    ):
        list(ds)
    assert ds.skipped["scale_mismatch"] == 20
    with pytest.raises(ValueError, match="multiple of scale"):
        PairedShardDataset(odd_dataset.uri, gt_size=30, scale=4)


# -- S3 -----------------------------------------------------------------------------------------


def test_reads_from_s3_over_http_like_local(s3_server, s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/runs/ds"
    kw = dict(n_samples=10, samples_per_shard=3, hr_size=48, seed=7)
    remote = write_dataset(uri, **kw)
    local = write_dataset(str(tmp_path / "ds"), **kw)
    assert remote.keys == local.keys

    def read_all(u, workers):
        ds = PairedShardDataset(u, shuffle=False)  # endpoint from AWS_ENDPOINT_URL
        loader = DataLoader(ds, batch_size=None, num_workers=workers)
        return {s["key"]: (s["gt"], s["lq"]) for s in loader}, len(ds)

    got_s3, n_s3 = read_all(uri, 2)
    got_local, n_local = read_all(local.uri, 0)
    assert n_s3 == n_local == 10
    assert sorted(got_s3) == sorted(got_local) == sorted(local.keys)
    for k, (gt, lq) in got_local.items():
        assert torch.equal(got_s3[k][0], gt) and torch.equal(got_s3[k][1], lq)
    explicit = PairedShardDataset(
        [f"{uri}/{s}.tar" for s in remote.shards[:2]], endpoint_url=s3_server, shuffle=False
    )
    assert len(explicit) == 6 and [s["key"] for s in explicit] == remote.keys[:6]
    # random access (BasicSR's map-style dataset): one ranged GET per sample
    mapped = RealDGenPairedDataset({"dataroot": uri, "scale": 4, "phase": "val"})
    for i in (0, 4, 9):
        s = mapped[i]
        assert torch.equal(s["gt"], got_local[s["key"]][0]) and torch.equal(s["lq"], got_local[s["key"]][1])
    report = check_contract(uri, scale=4)
    assert report.ok and report.samples == 10, report.problems


def test_a_shard_list_mixing_local_and_s3_reads_each_from_its_own_store(s3_server, s3_bucket, tmp_path):
    """Each URL is opened with its own protocol's filesystem: nothing is skipped as unreadable."""
    uri = f"s3://{s3_bucket}/mixed/ds"
    remote = write_dataset(uri, n_samples=6, samples_per_shard=3, hr_size=48, seed=3)
    local = write_dataset(str(tmp_path / "ds"), n_samples=6, samples_per_shard=3, hr_size=48, seed=4)
    urls = [f"{local.uri}/{local.shards[0]}.tar", f"{uri}/{remote.shards[1]}.tar"]
    want = local.keys_by_shard[local.shards[0]] + remote.keys_by_shard[remote.shards[1]]
    ds = PairedShardDataset(urls, shuffle=False)
    assert len(ds) == 6  # both _index.json files were read, each from its own store
    for workers in (0, 2):  # the filesystems are made again in each worker process
        got = [s["key"] for s in DataLoader(ds, batch_size=None, num_workers=workers)]
        assert sorted(got) == sorted(want), workers
    assert ds.skipped == {}
    mapped = ShardRandomAccess(ds.shards)
    assert [mapped.get(i)[1] for i in range(6)] == want


def test_a_shard_that_lost_most_of_its_samples_does_not_stop_the_map_style_dataset(tmp_path):
    """The lost samples of a truncated shard are a stretch of neighbouring indices: substitutes are
    drawn from the whole dataset, so every index still serves a good sample."""
    root = tmp_path / "ds"
    fac = write_dataset(str(root), n_samples=60, samples_per_shard=30, hr_size=16)
    first = root / f"{fac.shards[0]}.tar"
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    first.write_bytes(first.read_bytes()[: members[3 * 3].offset])  # 3 whole samples of 30 kept
    ds = RealDGenPairedDataset({"dataroot": str(root), "scale": 4, "phase": "train", "gt_size": 16})
    assert len(ds) == 60
    kept = set(fac.keys_by_shard[fac.shards[0]][:3] + fac.keys_by_shard[fac.shards[1]])
    served = [ds[i]["key"] for i in range(len(ds))]  # the old rule (next index) raised on 12 of them
    assert set(served) <= kept
    assert served[3:30].count(served[3]) < 27  # substitutes are drawn, not one neighbour for all
    assert ds.skipped["truncated_tar"] >= 27


def _pair_pngs() -> tuple[bytes, bytes]:
    hr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = []
    for a in (hr, hr[::4, ::4].copy()):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out[0], out[1]


def _sample_members(key: str) -> list[tuple[str, bytes]]:
    hr, lr = _pair_pngs()
    return [(f"{key}.hr.png", hr), (f"{key}.lr.png", lr), (f"{key}.json", b'{"scale": 4}')]


def _write_one_shard(root, members: list[tuple[str, bytes]], samples: int, cut_at: str | None = None) -> None:
    """``root/x-000000.tar`` holding ``members`` in order (cut where ``cut_at``'s header starts) and an
    ``_index.json`` that says it holds ``samples`` samples."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if cut_at is not None:
        buf.seek(0)
        with tarfile.open(fileobj=buf) as tar:
            data = data[: tar.getmember(cut_at).offset]
    (root / "x-000000.tar").write_bytes(data)
    index = {"shards": [{"name": "x-000000.tar", "samples": samples}], "total_samples": samples}
    (root / "_index.json").write_text(json.dumps(index))


def test_a_cut_at_a_header_is_counted_even_when_the_shard_also_has_refused_members(tmp_path):
    """A refused member is not a lost sample: it must not hide the samples a cut tar lost."""
    members = [("README.txt", b"hi"), *(m for k in "abcd" for m in _sample_members(k))]
    _write_one_shard(tmp_path, members, samples=4, cut_at="d.hr.png")
    ds = PairedShardDataset(str(tmp_path), scale=4, shuffle=False)
    assert [s["key"] for s in ds] == ["a", "b", "c"]
    assert dict(ds.skipped) == {"unexpected_member": 1, "truncated_tar": 1}


def test_random_access_never_fetches_a_refused_member_lying_inside_a_sample(tmp_path):
    """A sample's one ranged read would span a refused member between its own (any size: it is never
    checked against max_member_bytes); such a sample is read member by member instead."""
    import os

    from fsspec.implementations.local import LocalFileSystem

    from pipelines.reader import ShardRandomAccess, resolve_shards

    hr, lr = _pair_pngs()
    members = [
        ("a.hr.png", hr),
        ("junk.bin", b"\0" * (3 << 20)),
        ("a.lr.png", lr),
        ("a.json", b'{"scale": 4}'),
        *_sample_members("b"),
    ]
    _write_one_shard(tmp_path, members, samples=2)

    class CountingFS(LocalFileSystem):
        reads: list[int] = []

        def cat_file(self, path, start=None, end=None, **kw):
            data = super().cat_file(path, start=start, end=end, **kw)
            self.reads.append(len(data))
            return data

    skipped: list[str] = []
    access = ShardRandomAccess(
        resolve_shards(str(tmp_path)), max_member_bytes=1 << 20, skip=lambda e: skipped.append(e.reason)
    )
    access._fs._pid, access._fs._by_protocol = os.getpid(), {"file": CountingFS()}
    files, key, _ = access.get(0)
    assert key == "a" and files == {"hr.png": hr, "lr.png": lr, "json": members[3][1]}
    assert skipped == ["unexpected_member"]
    assert max(CountingFS.reads) < (1 << 20) and len(CountingFS.reads) == 3  # member by member
    CountingFS.reads.clear()
    files, key, _ = access.get(1)  # an ordinary sample: still one ranged read
    assert key == "b" and files["lr.png"] == lr and len(CountingFS.reads) == 1


def test_random_access_rescans_a_shard_whose_scan_met_a_storage_error(odd_dataset, tmp_path):
    """A shard briefly unreachable while its headers are scanned is a skip for that read only: the
    table is not kept, and the next read scans it again."""
    import os
    import shutil

    from pipelines.reader import ShardRandomAccess, resolve_shards

    root = tmp_path / "ds"
    shutil.copytree(odd_dataset.uri, root)
    access = ShardRandomAccess(resolve_shards(str(root)))
    first = access.shards[0].url
    os.rename(first, first + ".away")
    with pytest.raises(BadSample) as err:
        access.get(0)
    assert err.value.reason == "shard_error"
    os.rename(first + ".away", first)
    assert access.get(0)[1] == odd_dataset.keys[0]


# -- BasicSR-style map dataset -------------------------------------------------------------------


def test_basicsr_dataset_works_with_a_sampler_and_standalone(odd_dataset):
    assert REGISTERED_WITH_BASICSR == (importlib.util.find_spec("basicsr") is not None)
    opt = {
        "dataroot": odd_dataset.uri,
        "scale": 4,
        "phase": "train",
        "gt_size": 32,
        "use_hflip": True,
        "use_rot": True,
    }
    ds = RealDGenPairedDataset(opt)
    assert len(ds) == 20
    # BasicSR hands its EnlargedSampler to the DataLoader; a DistributedSampler is the same shape.
    keys = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1, drop_last=False)
        for batch in loader:
            assert batch["gt"].shape[1:] == (3, 32, 32) and batch["lq"].shape[1:] == (3, 8, 8)
            keys += batch["key"]
    assert sorted(keys) == sorted(odd_dataset.keys)
    val = RealDGenPairedDataset({"dataroot": odd_dataset.uri, "scale": 4, "phase": "val"})
    s = val[5]
    assert s["gt"].shape == (3, 64, 64) and s["lq"].shape == (3, 16, 16)
    assert s["key"] == odd_dataset.keys[5]
    assert s["lq_path"].rsplit("/", 1)[-1] == f"{s['key']}.png"  # BasicSR names outputs by this stem
    with pytest.raises(KeyError, match="gt_size"):
        RealDGenPairedDataset({"dataroot": odd_dataset.uri, "scale": 4, "phase": "train"})


# -- an SR network actually learns from the shards ---------------------------------------------


class _ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(c, c, 3, padding=1)
        )

    def forward(self, x):
        return x + self.body(x)


class SRResNet(nn.Module):
    """SRResNet (no batch norm) for x4: head conv, residual blocks + long skip, two pixel-shuffle x2."""

    def __init__(self, c=32, blocks=4):
        super().__init__()
        self.head = nn.Conv2d(3, c, 3, padding=1)
        self.body = nn.Sequential(*[_ResBlock(c) for _ in range(blocks)])
        self.up = nn.Sequential(
            nn.Conv2d(c, 4 * c, 3, padding=1),
            nn.PixelShuffle(2),
            nn.LeakyReLU(0.1),
            nn.Conv2d(c, 4 * c, 3, padding=1),
            nn.PixelShuffle(2),
            nn.LeakyReLU(0.1),
        )
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x):
        f = self.head(x)
        return self.tail(self.up(f + self.body(f)))


def _train(batches, mismatch: bool) -> list[float]:
    torch.manual_seed(0)
    net = SRResNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for batch in batches:
        lq = batch["lq"].roll(1, dims=0) if mismatch else batch["lq"]  # control: LR of another image
        loss = nn.functional.l1_loss(net(lq), batch["gt"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_srresnet_trains_from_shards(tmp_path, photos):
    # LR = blur + box downsample + noise of the HR: a real degradation to invert.
    fac = write_dataset(
        str(tmp_path / "ds"),
        n_samples=16,
        samples_per_shard=4,
        hr_size=96,
        photos={k: photos[k] for k in ("astronaut", "coffee", "chelsea", "rocket")},
        blur_sigma=1.5,
        noise_sigma=2.0,
        failures_per_shard=0,
        seed=3,
    )
    ds = PairedShardDataset(fac.uri, gt_size=32, scale=4, resampled=True, shuffle_buffer=8, seed=0)
    loader = iter(DataLoader(ds, batch_size=4, num_workers=0))
    batches = [next(loader) for _ in range(60)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: extra threads only spin on a shared 2-core machine
    try:
        losses = _train(batches, mismatch=False)
        control = _train(batches, mismatch=True)
    finally:
        torch.set_num_threads(threads)
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)
    # The drop comes from the pairing, not from learning the colour statistics of the GT: the same
    # network fed the LR of another image of the batch ends far higher (~2x here).
    assert last < 0.75 * np.mean(control[-10:]), (last, np.mean(control[-10:]))
    assert not ds.skipped


def test_resampled_epoch_gives_every_rank_the_same_batches(odd_dataset):
    """samples_per_epoch under DDP: every rank yields N // world_size samples, so every rank runs the
    same number of steps (the remainder went to rank 0's workers, and an all-reduce waited forever);
    len() is the per-rank count, so len(loader) is right."""
    per_rank = []
    for n in (16, 17, 18):
        got = []
        for rank in range(2):
            ds = PairedShardDataset(
                odd_dataset.uri,
                gt_size=16,
                scale=4,
                resampled=True,
                samples_per_epoch=n,
                rank=rank,
                world_size=2,
            )
            loader = DataLoader(ds, batch_size=4, num_workers=2)
            got.append((sum(1 for _ in loader), sum(len(b["key"]) for b in loader), len(ds), len(loader)))
        per_rank.append(got)
        assert got[0] == got[1], (n, got)
        assert got[0][1] == got[0][2] == n // 2
    assert [g[0][3] for g in per_rank] == [2, 2, 3]  # ceil((n // 2) / 4)
    assert all(g[0][0] == g[0][3] for g in per_rank)  # the batches each rank ran = len(loader)


def test_truncation_at_a_header_and_an_unusable_setting_are_reported(odd_dataset, tmp_path):
    """A tar cut exactly where a header starts ends without a tar error: its missing samples are
    counted (streaming) and raise BadSample (random access), instead of a silent drop and a ValueError.
    A setting that refuses every sample stops a resampled stream instead of drawing forever."""
    import shutil

    from pipelines.reader import MAX_BAD_STREAK, ShardRandomAccess, resolve_shards

    root = tmp_path / "cut"
    shutil.copytree(odd_dataset.uri, root)
    first = sorted(root.glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    keep = members[3].offset  # the header of the second sample's first member: one sample kept
    first.write_bytes(first.read_bytes()[:keep])
    ds = PairedShardDataset(str(root), gt_size=16, scale=4, shuffle=False)
    keys = [s["key"] for s in ds]
    assert len(keys) == 18 and ds.skipped["truncated_tar"] == 2 and sum(ds.skipped.values()) == 2
    access = ShardRandomAccess(resolve_shards(str(root)))
    access.get(0)
    for i in (1, 2):
        with pytest.raises(BadSample, match="truncated_tar"):
            access.get(i)
    assert access.get(3)[1] == odd_dataset.keys[3]
    basic = RealDGenPairedDataset({"dataroot": str(root), "scale": 4, "phase": "train", "gt_size": 16})
    got = basic[1]["key"]  # a lost sample: a random good substitute serves
    assert (
        got in odd_dataset.keys and got not in odd_dataset.keys[1:3] and basic.skipped["truncated_tar"] >= 1
    )

    wrong = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=2, resampled=True)
    with pytest.raises(ValueError, match=f"no usable sample in the first {MAX_BAD_STREAK}"):
        next(iter(wrong))
    assert wrong.skipped["scale_mismatch"] == MAX_BAD_STREAK


def test_shard_lists_expand_patterns_and_refuse_what_does_not_exist(odd_dataset, tmp_path):
    """WebDataset-style brace and glob patterns expand to the shards (counts from the index, so
    len() works); a pattern or listed shard that names nothing is an error at construction, not
    an epoch of nothing; a shard no index names is named by len()."""
    import shutil

    from pipelines.reader import resolve_shards

    stems = sorted(p.removesuffix(".tar") for p in odd_dataset.shards)
    braces = f"{odd_dataset.uri}/{stems[0][:-1]}{{0..2}}.tar"
    assert [e.stem for e in resolve_shards(braces)] == stems[:3]
    ds = PairedShardDataset(braces, gt_size=16, scale=4, shuffle=False)
    assert len(ds) == 9 and len(list(ds)) == 9
    globbed = PairedShardDataset([f"{odd_dataset.uri}/*.tar"], gt_size=16, scale=4)
    assert len(globbed) == 20 and len({s["key"] for s in globbed}) == 20
    with pytest.raises(FileNotFoundError, match=r"matches no file"):
        PairedShardDataset(f"{odd_dataset.uri}/nope-*.tar")
    typo = f"{odd_dataset.uri}/{stems[0]}x.tar"
    with pytest.raises(FileNotFoundError, match=r"1 listed shard\(s\) do not exist: .*" + stems[0] + "x.tar"):
        PairedShardDataset([f"{odd_dataset.uri}/{stems[1]}.tar", typo])
    # a real tar beside the dataset that its index does not name: readable, but uncounted
    extra = tmp_path / "ds"
    shutil.copytree(odd_dataset.uri, extra)
    shutil.copy(extra / f"{stems[0]}.tar", extra / "copy.tar")
    mixed = PairedShardDataset([str(extra / f"{stems[0]}.tar"), str(extra / "copy.tar")], gt_size=16, scale=4)
    with pytest.raises(TypeError, match=r"1 shard\(s\) that no _index.json .*copy.tar"):
        len(mixed)
    with pytest.raises(ValueError, match=r"not named by an _index.json.*copy.tar"):
        ShardRandomAccess(mixed.shards)


def test_a_resampled_stream_whose_shards_cannot_be_opened_stops(odd_dataset, tmp_path):
    """Shards gone after construction (storage that refuses, a deleted prefix): a resampled stream
    used to retry them forever (a hang and a flood of requests); it stops after a streak of
    failed opens. A finite epoch skips them and counts them."""
    import shutil

    from pipelines.reader import MAX_OPEN_FAILURES

    root = tmp_path / "gone"
    shutil.copytree(odd_dataset.uri, root)
    ds = PairedShardDataset(str(root), gt_size=16, scale=4, resampled=True, samples_per_epoch=8)
    finite = PairedShardDataset(str(root), gt_size=16, scale=4)
    for tar in root.glob("*.tar"):
        tar.unlink()
    with pytest.raises(OSError, match=r"shard opens in a row failed"):
        next(iter(ds))
    assert ds.skipped["shard_error"] == max(MAX_OPEN_FAILURES, 2 * 7)
    assert list(finite) == [] and finite.skipped["shard_error"] == 7


def test_two_datasets_from_the_same_inputs_mix_in_full(odd_dataset, tmp_path, caplog):
    """Two runs over one HR corpus (two domains, two scales) write the same keys. A list naming
    both, as folders or as shards, yields both in full (each key once per dataset) with any worker
    count; a key repeated within one dataset is still a duplicate. A folder that does not exist is
    an error naming it."""
    import logging
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(odd_dataset.uri, twin)
    for source in ([odd_dataset.uri, str(twin)], [f"{odd_dataset.uri}/*.tar", f"{twin}/*.tar"]):
        for workers in (0, 2):
            ds = PairedShardDataset(source, gt_size=16, scale=4, seed=3)
            assert len(ds) == 40
            keys = [k for b in DataLoader(ds, batch_size=4, num_workers=workers) for k in b["key"]]
            assert len(keys) == 40 and set(np.unique(keys, return_counts=True)[1]) == {2}
            if workers == 0:
                assert ds.skipped["duplicate_key"] == 0
    # within one dataset a repeat stays a repeat: a shard listed twice serves its keys once
    first = sorted(odd_dataset.shards)[0].removesuffix(".tar")
    again = PairedShardDataset([f"{odd_dataset.uri}/{first}.tar"] * 2, gt_size=16, scale=4)
    assert len(list(again)) == 3 and again.skipped["duplicate_key"] == 3
    with pytest.raises(FileNotFoundError, match=r"1 listed shard\(s\) do not exist: .*nowhere"):
        PairedShardDataset([odd_dataset.uri, str(tmp_path / "nowhere")])
    # a second pass at the same epoch repeats the first one's crops: said, not silent
    ds = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4, world_size=3, rank=2)
    with caplog.at_level(logging.WARNING, logger="pipelines.reader"):
        first_pass = [s["lq"] for s in ds]
        second_pass = [s["lq"] for s in ds]
    assert all(torch.equal(a, b) for a, b in zip(first_pass, second_pass, strict=True))
    assert "iterated again at epoch 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipelines.reader"):
        assert list(PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4, world_size=8, rank=7)) == []
    assert "slot 7 of 8 gets no shard (7 shards)" in caplog.text


def test_basicsr_validation_leaves_a_bad_sample_out_instead_of_substituting(tmp_path, monkeypatch):
    """In training a bad sample is replaced by a random good one; in validation that would score
    another sample under its key, so validation checks every sample once and leaves the bad ones
    out (a sample that goes bad after that raises, naming it)."""
    ds_info = write_dataset(
        str(tmp_path / "v"), n_samples=4, samples_per_shard=4, hr_size=64, failures_per_shard=0
    )
    tar = tmp_path / "v" / (sorted(ds_info.shards)[0].removesuffix(".tar") + ".tar")
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    bad_key = members[0][0].name.split(".")[0]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name == f"{bad_key}.lr.png":
                data = b"not a png"
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    opt = {"dataroot": ds_info.uri, "scale": 4}
    val = RealDGenPairedDataset({**opt, "phase": "val"})
    assert len(val) == 3 and val.skipped["decode_error"] == 1
    keys = [val[i]["key"] for i in range(len(val))]
    assert bad_key not in keys and len(set(keys)) == 3
    assert val[0]["lq"].shape == (3, 16, 16)

    def gone_bad(i):
        raise BadSample("decode_error", "the object changed")

    monkeypatch.setattr(val.access, "get", gone_bad)
    with pytest.raises(ValueError, match=r"\(val\): sample \d was usable when the dataset was built"):
        val[0]
    train = RealDGenPairedDataset({**opt, "phase": "train", "gt_size": 32})
    assert len(train) == 4 and train[0]["lq"].shape == (3, 8, 8) and train.skipped["decode_error"] >= 1


def test_an_index_is_untrusted_too(odd_dataset, tmp_path):
    """_index.json names shards; a name outside the dataset folder, deep or huge json are refused
    with an error naming the file, not followed (export would write another folder's pairs)."""
    import shutil

    from pipelines.export import export_dataset

    outside = tmp_path / "elsewhere"
    shutil.copytree(odd_dataset.uri, outside)
    ds = tmp_path / "ds"
    ds.mkdir()
    for bad in ("../elsewhere/pairs-000000", "/abs/pairs-000000", "sub/pairs-000000", ".."):
        (ds / "_index.json").write_text(json.dumps({"shards": [{"name": bad, "samples": 3}]}))
        with pytest.raises(ValueError, match=r"_index.json is malformed: .* names shard .*not a plain file"):
            PairedShardDataset(str(ds))
        with pytest.raises(ValueError, match=r"not a plain file name"):
            export_dataset(str(ds), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "hr").exists() or not any((tmp_path / "out" / "hr").iterdir())
    # names the job writes are fine, output.name may start with _ or -
    shutil.copy(
        f"{odd_dataset.uri}/{sorted(odd_dataset.shards)[0].removesuffix('.tar')}.tar", ds / "_v-000000.tar"
    )
    (ds / "_index.json").write_text(json.dumps({"shards": [{"name": "_v-000000.tar", "samples": 3}]}))
    assert len(list(PairedShardDataset(str(ds), gt_size=16, scale=4))) == 3
    (ds / "_index.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match=r"_index.json is not valid json: RecursionError"):
        PairedShardDataset(str(ds))
    (ds / "_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"_index.json holds a list, not an object"):
        PairedShardDataset(str(ds))


def test_split_warnings_fire_only_where_the_data_would_be_wrong(odd_dataset, monkeypatch, caplog):
    """A dataset built before init_process_group reads every shard on every rank: said. One given
    rank=0, world_size=1 on purpose (rank-0-only validation) is not; nor is a worker without a
    shard when there is one process (num_workers > shards is normal there)."""
    import logging

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    early = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4, rank=None, world_size=None)
    early.world_size, early.rank, early._split_given = 1, 0, False  # as if built before init
    given = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4, rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="pipelines.reader"):
        list(given)
        assert "built before init_process_group" not in caplog.text
        list(early)
        assert "built before init_process_group" in caplog.text
    caplog.clear()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    one_process = PairedShardDataset(odd_dataset.uri, gt_size=16, scale=4)
    with caplog.at_level(logging.WARNING, logger="pipelines.reader"):
        keys = [k for b in DataLoader(one_process, batch_size=4, num_workers=0) for k in b["key"]]
        one_process._check_pass(slot=9, n_slots=10)  # worker 9 of 10, 7 shards, world_size 1
    assert len(keys) == 20 and "gets no shard" not in caplog.text
