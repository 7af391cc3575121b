"""Generation failures: a broken actor is restarted, a bad sample is a failure row, and both count in
the failure budget; parts and compaction keep every row exactly once."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.generate.sink import ShardBook, ShardProgress, compact_shard, encode_write_batch
from pipelines.generate.stages import DecodeTile, GenerateLR, base_key
from pipelines.storage import DatasetStore, read_parquet
from realdgen_core.shards import read_tar
from tests.shard_factory import decode_config


class Restarted(Exception):
    pass


def _samples(tmp_path, n_images=2):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_images):
        p = tmp_path / f"img{i}.png"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue())
        rows.append({"shard": 0, "input_index": i, "key": base_key(str(p)), "uri": str(p), "path": str(p)})
    decode = DecodeTile(decode_config(seed=1, max_tiles=2))
    return decode(rows).to_pylist()


def _actor(monkeypatch, fail_seed=None, broken=False, restarted=False):
    gen = GenerateLR({"kind": "bicubic", "scale": 2})
    real = gen._generate

    def flaky(rows):
        if broken or any(r["seed"] == fail_seed for r in rows):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(rows)

    def restart(reason):
        raise Restarted(reason)

    monkeypatch.setattr(gen, "_generate", flaky)
    monkeypatch.setattr(gen, "restart", restart)
    monkeypatch.setattr(gen, "_was_restarted", lambda: restarted)
    return gen


def test_broken_actor_restarts_instead_of_writing_failure_rows(tmp_path, monkeypatch):
    rows = _samples(tmp_path)
    with pytest.raises(Restarted, match="illegal memory access"):
        _actor(monkeypatch, broken=True)(rows)


def test_bad_sample_is_a_failure_row_and_its_batch_mates_land(tmp_path, monkeypatch):
    rows = _samples(tmp_path)
    bad = next(r for r in rows if r["row_type"] == "sample")
    out = _actor(monkeypatch, fail_seed=bad["seed"])(rows).to_pylist()
    by_key = {r["key"]: r for r in out if r["row_type"] == "sample"}
    assert by_key[bad["key"]]["status"] == "failed" and "illegal memory access" in by_key[bad["key"]]["error"]
    others = [r for k, r in by_key.items() if k != bad["key"]]
    assert others and all(r["status"] == "ok" and r["lr"] for r in others)


def test_a_restarted_actor_that_is_still_broken_reports_failures(tmp_path, monkeypatch):
    rows = _samples(tmp_path)
    out = _actor(monkeypatch, broken=True, restarted=True)(rows).to_pylist()
    samples = [r for r in out if r["row_type"] == "sample"]
    assert samples and all(r["status"] == "failed" for r in samples)


def test_generation_failures_count_in_the_budget_and_compaction_keeps_rows_once(tmp_path, monkeypatch):
    rows = _samples(tmp_path)
    bad = next(r for r in rows if r["row_type"] == "sample")
    generated = _actor(monkeypatch, fail_seed=bad["seed"])(rows)
    cfg = {"store": str(tmp_path / "ds"), "work": "_work/x", "name": "pairs", "scale": 2}
    # The same rows written twice, cut into different batches (a retried task): parts overlap.
    reports = encode_write_batch(generated, cfg).to_pylist()
    encode_write_batch(generated.slice(0, 3), cfg)
    encode_write_batch(generated.slice(3), cfg)
    st = ShardProgress(0, expected_inputs=2)
    for rep in reports:
        st.add(rep)
    assert st.complete()
    assert st.failed_inputs == {bad["input_index"]}  # a generation failure counts like a decode failure
    assert all(not isinstance(v, bytes) for rep in reports for v in rep.values())  # no bytes to the driver

    cfg.update(digest="d", model_digest=None, generator="bicubic")
    stats = compact_shard(cfg, 0, 2, 0.0)
    n_samples = sum(1 for r in rows if r["row_type"] == "sample")
    assert stats["samples"] == n_samples - 1 and stats["samples_failed"] == 1
    assert stats["inputs_with_failures"] == 1 and stats["writer"]["host"]
    store = DatasetStore(cfg["store"])
    table = read_parquet(store.read_bytes("pairs-000000.parquet")).to_pylist()
    failed = [r for r in table if r["row_type"] == "sample"]
    assert [r["key"] for r in failed] == [bad["key"]]
    assert store.list_prefix("_work/x/parts") == []  # parts removed once the shard is whole
    # a resume names this kept shard's failure too (its input is partial: one sample failed)
    from types import SimpleNamespace

    from pipelines.generate.job import GenerateJob

    job = SimpleNamespace(store=store, complete_stats={"pairs-000000": stats})
    kept = GenerateJob._kept_failures(job, ["pairs-000000"], 10)
    assert kept == [f"{bad['uri']}: {failed[0]['error']}"] and "illegal memory access" in kept[0]
    job.complete_stats = {"pairs-000000": {**stats, "inputs_with_failures": 0, "samples_failed": 0}}
    assert GenerateJob._kept_failures(job, ["pairs-000000"], 10) == []  # stats say none: not read


def test_a_success_wins_over_a_stale_failed_part_of_the_same_key(tmp_path, monkeypatch):
    rows = _samples(tmp_path)
    bad = next(r for r in rows if r["row_type"] == "sample")
    cfg = {"store": str(tmp_path / "ds"), "work": "_work/x", "name": "pairs", "scale": 2}
    # A crashed earlier attempt left a part where one sample had failed (say, a broken GPU) ...
    # (cut into other batches than this run's, so its part files have other names).
    failed_run = _actor(monkeypatch, fail_seed=bad["seed"])(rows)
    encode_write_batch(failed_run.slice(0, 3), cfg)
    encode_write_batch(failed_run.slice(3), cfg)
    # ... and this run generated every sample.
    encode_write_batch(GenerateLR({"kind": "bicubic", "scale": 2})(_samples(tmp_path)), cfg)
    cfg.update(digest="d", model_digest=None, generator="bicubic")
    stats = compact_shard(cfg, 0, 2, 0.0)
    assert stats["samples_failed"] == 0 and stats["samples"] == sum(r["row_type"] == "sample" for r in rows)
    assert stats["parts"] == 3


def test_parts_of_another_run_are_never_read(tmp_path, monkeypatch):
    """An interrupted run (another model: here every sample failed) left parts its successor could not
    delete; this run's compaction reads its own run's parts only, so none of those rows reach the shard."""
    rows = _samples(tmp_path)
    cfg = {"store": str(tmp_path / "ds"), "work": "_work/x", "name": "pairs", "scale": 2}
    old_run = _actor(monkeypatch, broken=True, restarted=True)(rows)
    assert all(r["status"] == "failed" for r in old_run.to_pylist() if r["row_type"] == "sample")
    encode_write_batch(old_run, {**cfg, "run_id": "old"})
    encode_write_batch(
        GenerateLR({"kind": "bicubic", "scale": 2})(_samples(tmp_path)), {**cfg, "run_id": "new"}
    )
    store = DatasetStore(cfg["store"])
    assert (
        len(store.list_prefix("_work/x/parts/old")) == 1 and len(store.list_prefix("_work/x/parts/new")) == 1
    )
    stats = compact_shard({**cfg, "run_id": "new", "digest": "d", "model_digest": None}, 0, 2, 0.0)
    assert stats["parts"] == 1 and stats["samples_failed"] == 0
    assert stats["samples"] == sum(r["row_type"] == "sample" for r in rows)
    assert store.list_prefix("_work/x/parts/new") == [] and len(store.list_prefix("_work/x/parts/old")) == 1


def _part_members(store: DatasetStore, prefix: str) -> dict[str, dict[str, bytes]]:
    """key -> tar members of every successful sample row in the part files (first one seen)."""
    out: dict[str, dict[str, bytes]] = {}
    for name in store.list_prefix(prefix):
        for r in read_parquet(store.read_bytes(name)).to_pylist():
            if r["row_type"] == "sample" and r["status"] == "ok":
                out.setdefault(r["key"], {"hr.png": r["hr_png"], "json": r["json"], "lr.png": r["lr_png"]})
    return out


@pytest.mark.parametrize("failed_part_first", [True, False])
def test_compaction_writes_each_samples_own_bytes_from_the_spill(tmp_path, monkeypatch, failed_part_first):
    """The tar is streamed from a spill file: every member must be the bytes of its own key, whether
    the part with the stale failure is read before or after the parts where that sample succeeded."""
    rows = _samples(tmp_path, n_images=3)
    bad = next(r for r in rows if r["row_type"] == "sample")
    cfg = {"store": str(tmp_path / "ds"), "work": "_work/x", "name": "pairs", "scale": 2}
    encode_write_batch(_actor(monkeypatch, fail_seed=bad["seed"])(rows).slice(0, 4), cfg)  # stale failure
    good = GenerateLR({"kind": "bicubic", "scale": 2})(_samples(tmp_path, n_images=3))
    encode_write_batch(good.slice(0, 5), cfg)
    encode_write_batch(good.slice(2), cfg)  # overlapping retry
    store = DatasetStore(cfg["store"])
    want = _part_members(store, "_work/x/parts")
    assert len(want) == sum(r["row_type"] == "sample" for r in rows) and bad["key"] in want

    def has_failure(name: str) -> bool:
        rows = read_parquet(store.read_bytes(name), columns=["status"]).to_pylist()
        return any(r["status"] != "ok" for r in rows)

    listed = DatasetStore.list_prefix

    def ordered(self, prefix, **kw):  # the order parts are read in (else it follows hashed names)
        return sorted(listed(self, prefix, **kw), key=lambda n: has_failure(n) != failed_part_first)

    monkeypatch.setattr(DatasetStore, "list_prefix", ordered)
    assert has_failure(ordered(store, "_work/x/parts")[0 if failed_part_first else -1])
    cfg.update(digest="d", model_digest=None, generator="bicubic")
    stats = compact_shard(cfg, 0, 3, 0.0)
    with open(tmp_path / "ds" / "pairs-000000.tar", "rb") as f:
        got = {s.pop("__key__"): s for s in read_tar(f)}
    assert list(got) == sorted(want) and got == want
    assert len({m["lr.png"] for m in got.values()}) == len(got)  # distinct samples, not one repeated
    assert stats["bytes"] == (tmp_path / "ds" / "pairs-000000.tar").stat().st_size
    assert not [p.name for p in (tmp_path / "ds").iterdir() if p.name.endswith(".tmp")]


def test_a_compaction_retried_after_its_stats_were_written_finishes_the_clean_up(tmp_path, monkeypatch):
    """A part's delete fails (or the worker dies) after _stats.json was written: Ray runs the task
    again, and the retry must return the complete shard's stats, not fail on the parts now missing."""
    from pipelines.storage import TransientStorageError

    rows = _samples(tmp_path)
    cfg = {"store": str(tmp_path / "ds"), "work": "_work/x", "name": "pairs", "scale": 2}
    generated = GenerateLR({"kind": "bicubic", "scale": 2})(rows)
    encode_write_batch(generated.slice(0, 3), cfg)
    encode_write_batch(generated.slice(3), cfg)
    cfg.update(digest="d", model_digest=None, generator="bicubic", references_digest="refs:a")
    store = DatasetStore(cfg["store"])
    delete, calls = DatasetStore.delete, []

    def flaky(self, name, **kw):
        calls.append(name)
        if len(calls) == 2:
            raise TransientStorageError(f"delete {name}: storage unavailable")
        return delete(self, name, **kw)

    monkeypatch.setattr(DatasetStore, "delete", flaky)
    with pytest.raises(TransientStorageError):
        compact_shard(cfg, 0, 2, 0.0)
    monkeypatch.setattr(DatasetStore, "delete", delete)
    first = store.read_json("pairs-000000_stats.json")
    tar = (tmp_path / "ds" / "pairs-000000.tar").read_bytes()
    assert len(store.list_prefix("_work/x/parts")) == 1  # one part deleted, one left
    assert compact_shard(cfg, 0, 2, 0.0) == first  # the retry (it raised IncompleteShard before)
    assert store.list_prefix("_work/x/parts") == []
    assert (tmp_path / "ds" / "pairs-000000.tar").read_bytes() == tar
    # stats of another run (other references) are not taken for this run's: the shard is compacted
    encode_write_batch(generated, cfg)
    other = {**cfg, "references_digest": "refs:b"}
    assert compact_shard(other, 0, 2, 0.0)["references_digest"] == "refs:b"
    assert store.list_prefix("_work/x/parts") == []


def test_a_report_delivered_again_after_its_shard_completed_opens_no_tracker():
    """A retried task's rows for a shard already sent to compaction are ignored: otherwise the job
    would end with "shard(s) never completed" for a shard it wrote."""

    def rep(shard, i, keys, reported=True):
        return {
            "shard": shard,
            "input_index": i,
            "reported": reported,
            "n_samples": 2,
            "input_failed": False,
            "sample_keys": keys,
            "samples_failed": 0,
        }

    book = ShardBook([1, 1])
    assert book.add(rep(0, 0, ["a_t000"])) == (None, 1, 0, 0)
    st, ok, failed, newly_failed = book.add(rep(0, 0, ["a_t001"], reported=False))
    assert st is not None and st.index == 0 and (ok, failed, newly_failed) == (1, 0, 0)
    assert book.open == {} and book.done == {0}
    assert book.add(rep(0, 0, ["a_t000"])) is None  # the same report again, later
    assert book.open == {}
    assert book.add(rep(1, 1, ["b_t000"]))[0] is None and list(book.open) == [1]
