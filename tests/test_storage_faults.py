"""Storage outages: transient errors are retried with backoff, never become failure rows; the lock.

A fault-injecting TCP proxy (tests/faultproxy.py) sits between s3fs and the moto server; taking it
down gives clients connection refused (new connections) and resets (live ones).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from faultproxy import FaultProxy
from PIL import Image

from pipelines.generate.stages import DecodeTile, base_key
from pipelines.sources import ImageError, SourceItem, read_item_bytes
from pipelines.storage import (
    LOCK_NAME,
    RETRY_ENV,
    DatasetStore,
    LockError,
    RunLock,
    StorageAccessError,
    TransientStorageError,
    fetch_to_local,
    get_fs,
    is_transient,
    task_error_message,
    with_retries,
)
from tests.shard_factory import decode_config


@pytest.fixture()
def proxy(s3_server):
    with FaultProxy(int(s3_server.rsplit(":", 1)[1])) as p:
        yield p


@pytest.fixture()
def short_budget(monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "1")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# classification and the retry loop (no network)
# ------------------------------------------------------------------------------------------------


def _client_error(code: str, status: int, op: str = "GetObject"):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


def _translated(err):
    """What s3fs raises for a botocore error (cause set) …"""
    from s3fs.errors import translate_boto_error

    return translate_boto_error(err)


def _raised_in_except(outer, inner):
    """… or raises while handling one (context set, as ``set_cause=False`` does)."""
    try:
        try:
            raise inner
        except Exception:
            raise outer  # noqa: B904 - __context__ is the point
    except Exception as exc:
        return exc


def test_is_transient_classifies_s3fs_botocore_aiohttp_and_os_errors():
    import aiohttp
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    transient = [
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "reset"),
        TimeoutError("timed out"),
        EndpointConnectionError(endpoint_url="http://x"),
        ConnectTimeoutError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
        aiohttp.ServerDisconnectedError(),
        _client_error("SlowDown", 503),
        _client_error("Throttling", 400),
        _client_error("RequestTimeout", 400),
        _client_error("InternalError", 500),
        _client_error("ServiceUnavailable", 503),
        _client_error("BadGateway", 502),
        _translated(_client_error("InternalError", 500)),  # OSError(EREMOTEIO) from ClientError
        _translated(_client_error("SlowDown", 503)),  # OSError(EBUSY)
        _translated(_client_error("503", 503)),
        _translated(_client_error("RequestTimeout", 400)),  # TimeoutError
        _raised_in_except(OSError(5, "Input/output error"), _client_error("InternalError", 500)),
        _raised_in_except(RuntimeError("wrapped"), EndpointConnectionError(endpoint_url="http://x")),
        TransientStorageError("x"),
    ]
    permanent = [
        FileNotFoundError("nope"),
        PermissionError("denied"),
        _client_error("NoSuchKey", 404),
        _client_error("NoSuchBucket", 404),
        _client_error("AccessDenied", 403),
        _client_error("NotImplemented", 501),
        _translated(_client_error("NoSuchKey", 404)),  # FileNotFoundError
        _translated(_client_error("NoSuchBucket", 404)),
        _translated(_client_error("AccessDenied", 403)),  # PermissionError
        json.JSONDecodeError("bad", "x", 0),
        ValueError("invalid data"),
        NoCredentialsError(),
        RuntimeError("something else"),
        OSError(5, "local disk I/O error"),
        # a definite answer on top wins over a transient error it was raised while handling
        _raised_in_except(FileNotFoundError("gone"), ConnectionResetError(104, "reset")),
    ]
    assert [e for e in transient if not is_transient(e)] == []
    assert [e for e in permanent if is_transient(e)] == []


def test_with_retries_backoff_budget_and_permanent_errors(caplog):
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s):
        sleeps.append(s)
        now[0] += s

    calls = [0]

    def flaky():
        calls[0] += 1
        if calls[0] < 4:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    kw = {"sleep": sleep, "clock": lambda: now[0]}
    with caplog.at_level(logging.WARNING, logger="realdgen.storage"):
        assert with_retries(flaky, what="read s3://b/k", budget_s=60, **kw) == "ok"
    assert calls[0] == 4 and len(sleeps) == 3
    assert 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4 and 0.4 <= sleeps[2] <= 0.8
    assert len([r for r in caplog.records if "storage unavailable" in r.message]) == 1  # rate-limited

    def down():
        raise ConnectionResetError(104, "Connection reset by peer")

    sleeps.clear()
    now[0] = 0.0
    with pytest.raises(TransientStorageError, match=r"write s3://b/k: storage unavailable for 30 s"):
        with_retries(down, what="write s3://b/k", budget_s=30, **kw)
    assert max(sleeps) <= 5.0 and abs(sum(sleeps) - 30) < 1e-9  # capped backoff, budget exactly spent

    def missing():
        calls[0] += 1
        raise FileNotFoundError("s3://b/k")

    calls[0] = 0
    with pytest.raises(FileNotFoundError):
        with_retries(missing, what="read", budget_s=30, **kw)
    assert calls[0] == 1

    def inner_spent():
        calls[0] += 1
        raise TransientStorageError("inner: storage unavailable for 120 s")

    calls[0] = 0
    with pytest.raises(TransientStorageError, match="inner"):
        with_retries(inner_spent, what="outer", budget_s=30, **kw)
    assert calls[0] == 1  # an inner budget is not multiplied by an outer one


def test_with_retries_names_refused_credentials_and_leaves_local_permission_errors_alone():
    from botocore.exceptions import NoCredentialsError

    calls = [0]

    def raising(exc):
        def fn():
            calls[0] += 1
            raise exc

        return fn

    for err, match in [
        (_translated(_client_error("ExpiredToken", 400)), r"ExpiredToken"),
        (_translated(_client_error("InvalidAccessKeyId", 403)), r"InvalidAccessKeyId"),
        (_translated(_client_error("403", 403, "HeadObject")), r"\(403\)"),
        (
            _raised_in_except(PermissionError("Access Denied"), _client_error("AccessDenied", 403)),
            "AccessDenied",
        ),
    ]:
        calls[0] = 0
        with pytest.raises(
            StorageAccessError, match=rf"^read s3://b/k: access refused by storage \(.*{match}"
        ):
            with_retries(raising(err), what="read s3://b/k", budget_s=30)
        assert calls[0] == 1  # never retried
    with pytest.raises(StorageAccessError, match=r"^list s3://b: no S3 credentials"):
        with_retries(raising(NoCredentialsError()), what="list s3://b", budget_s=30)
    # a local file's permissions are that file's problem: unchanged (the caller records the input)
    with pytest.raises(PermissionError, match="denied") as info:
        with_retries(raising(PermissionError(13, "denied")), what="read /x.png", budget_s=30)
    assert not isinstance(info.value, StorageAccessError)
    # an inner call's refusal is not wrapped again by an outer one
    inner = StorageAccessError("read s3://b/k: access refused by storage (…)")
    with pytest.raises(StorageAccessError) as info:
        with_retries(raising(inner), what="outer", budget_s=30)
    assert info.value is inner


def test_get_fs_fails_fast_and_stays_credential_free(s3_server):
    fs, _ = get_fs("s3://b/p", {"endpoint_url": s3_server, "key": "SECRET", "secret": "SECRET"})
    assert fs.retries == 1
    retries = fs.config_kwargs["retries"]  # botocore rewrites max_attempts N as total_max_attempts N + 1
    assert retries["mode"] == "standard"
    assert retries.get("max_attempts", retries.get("total_max_attempts", 0) - 1) == 2
    assert fs.config_kwargs["connect_timeout"] <= 10 and fs.config_kwargs["read_timeout"] <= 60
    assert fs.key is None and fs.secret is None and "SECRET" not in repr(fs.storage_args)
    assert fs.endpoint_url == s3_server


# ------------------------------------------------------------------------------------------------
# through the proxy
# ------------------------------------------------------------------------------------------------


def test_store_operations_ride_out_a_short_outage(proxy, s3_bucket, caplog):
    uri = f"s3://{s3_bucket}/ds"
    store = DatasetStore(uri, {"endpoint_url": proxy.url})
    assert store.fs.endpoint_url == proxy.url  # its own s3fs instance, not the moto one
    store.write_bytes("old.bin", b"old bytes")
    assert store.names() == ["old.bin"]
    payload = bytes(range(256)) * 64

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="realdgen.storage"):
        up = proxy.down_for(3.0)
        with ThreadPoolExecutor(4) as pool:
            write = pool.submit(store.write_bytes, "new.bin", payload)
            streamed = pool.submit(store.write_stream, "streamed.bin", lambda f: f.write(payload[::-1]))
            read = pool.submit(store.read_bytes, "old.bin")
            names = pool.submit(store.names)
            fetched = pool.submit(fetch_to_local, f"{uri}/old.bin", {"endpoint_url": proxy.url})
            assert write.result(timeout=30) is None
            assert streamed.result(timeout=30) == len(payload)  # produce's result comes back
            assert read.result(timeout=30) == b"old bytes"
            assert "old.bin" in names.result(timeout=30)
            with open(fetched.result(timeout=30), "rb") as f:
                assert f.read() == b"old bytes"
        up.join()
    took = time.monotonic() - t0
    assert 2.5 < took < 25, took
    assert store.read_bytes("new.bin") == payload
    assert store.read_bytes("streamed.bin") == payload[::-1]
    assert store.names() == ["new.bin", "old.bin", "streamed.bin"] and store.exists("new.bin")
    warned = [r.getMessage() for r in caplog.records if r.name == "realdgen.storage"]
    assert any("storage unavailable" in m and f"{uri}/new.bin" in m for m in warned), warned
    assert not any("testing" in m for m in warned)  # the dummy credentials never reach the log


def test_store_operations_give_up_after_the_budget(proxy, s3_bucket, short_budget):
    uri = f"s3://{s3_bucket}/ds"
    store = DatasetStore(uri, {"endpoint_url": proxy.url})
    store.write_bytes("a.bin", b"a")
    proxy.down()
    try:
        for op, what in (
            (lambda: store.write_bytes("b.bin", b"b"), f"write {uri}/b.bin"),
            (lambda: store.write_stream("b.bin", lambda f: f.write(b"b")), f"write {uri}/b.bin"),
            (lambda: store.read_bytes("a.bin"), f"read {uri}/a.bin"),
            (lambda: store.names(), f"list {uri}"),
            (lambda: store.exists("a.bin"), f"check {uri}/a.bin"),
            (lambda: store.delete("a.bin"), f"delete {uri}/a.bin"),
        ):
            t0 = time.monotonic()
            with pytest.raises(TransientStorageError) as info:
                op()
            took = time.monotonic() - t0
            assert str(info.value).startswith(f"{what}: storage unavailable for "), str(info.value)
            assert "last error: " in str(info.value)
            assert 0.9 < took < 5, (what, took)  # budget 1 s (outage lasts longer)
    finally:
        proxy.up()
    assert store.read_bytes("a.bin") == b"a" and not store.exists("b.bin")


def test_read_item_bytes_outage_is_transient_missing_is_an_image_error(proxy, s3_bucket, monkeypatch):
    opts = {"endpoint_url": proxy.url}
    fs, _ = get_fs(f"s3://{s3_bucket}", opts)
    fs.pipe_file(f"{s3_bucket}/img/a.png", b"png bytes")
    there = SourceItem(f"s3://{s3_bucket}/img/a.png", f"s3://{s3_bucket}/img/a.png")
    gone = SourceItem(f"s3://{s3_bucket}/img/gone.png", f"s3://{s3_bucket}/img/gone.png")
    assert read_item_bytes(there, opts) == b"png bytes"

    monkeypatch.setenv(RETRY_ENV, "60")
    t0 = time.monotonic()
    with pytest.raises(ImageError, match=r"^missing: s3://.*/img/gone.png not found$"):
        read_item_bytes(gone, opts)
    assert time.monotonic() - t0 < 5  # not retried for the budget

    monkeypatch.setenv(RETRY_ENV, "1")
    proxy.down()
    try:
        with pytest.raises(TransientStorageError, match=r"^read s3://.*/img/a.png: storage unavailable"):
            read_item_bytes(there, opts)
        member = SourceItem(f"{there.uri}#m.png", there.path, offset=0, size=3)  # a range read
        with pytest.raises(TransientStorageError):
            read_item_bytes(member, opts, max_bytes=10)
    finally:
        proxy.up()
    assert read_item_bytes(there, opts) == b"png bytes"


def test_listing_rides_out_an_outage_then_gives_up_as_transient(proxy, s3_bucket, monkeypatch):
    """Folder, WebDataset and parquet listings retry transient errors (a raw botocore / aiohttp error
    used to end the job with a traceback); past the budget they raise TransientStorageError, which the
    job's listing task retries; a missing prefix is still "not found" at once."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.manifest import SourceSpec
    from pipelines.sources import SourceError, list_source

    opts = {"endpoint_url": proxy.url}
    fs, _ = get_fs(f"s3://{s3_bucket}", opts)
    fs.pipe_file(f"{s3_bucket}/imgs/a.png", _png(np.zeros((8, 8, 3), np.uint8)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = _png(np.ones((8, 8, 3), np.uint8))
        info = tarfile.TarInfo("k.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    fs.pipe_file(f"{s3_bucket}/wds/s-000000.tar", buf.getvalue())
    table = io.BytesIO()
    pq.write_table(pa.table({"uri": ["../imgs/a.png"]}), table)
    fs.pipe_file(f"{s3_bucket}/lists/l.parquet", table.getvalue())
    specs = {
        "folder": SourceSpec(uri=f"s3://{s3_bucket}/imgs"),
        "webdataset": SourceSpec(uri=f"s3://{s3_bucket}/wds", format="webdataset"),
        "parquet": SourceSpec(uri=f"s3://{s3_bucket}/lists", format="parquet"),
    }
    want = {k: [i.uri for i in list_source(spec, opts)] for k, spec in specs.items()}
    assert want["webdataset"] == [f"s3://{s3_bucket}/wds/s-000000.tar#k.png"]

    monkeypatch.setenv(RETRY_ENV, "60")
    for name, spec in specs.items():
        up = proxy.down_for(2.0)
        t0 = time.monotonic()
        assert [i.uri for i in list_source(spec, opts)] == want[name], name
        up.join()
        assert 1.5 < time.monotonic() - t0 < 30, name
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="not found"):
        list_source(SourceSpec(uri=f"s3://{s3_bucket}/nothing-here"), opts)
    assert time.monotonic() - t0 < 5
    monkeypatch.setenv(RETRY_ENV, "1")
    proxy.down()
    try:
        for spec in specs.values():
            with pytest.raises(TransientStorageError, match="storage unavailable"):
                list_source(spec, opts)
    finally:
        proxy.up()


def test_decode_tile_fails_the_task_on_an_outage_and_records_real_failures(proxy, s3_bucket, short_budget):
    opts = {"endpoint_url": proxy.url}
    fs, _ = get_fs(f"s3://{s3_bucket}", opts)
    rng = np.random.default_rng(0)
    fs.pipe_file(f"{s3_bucket}/hr/a.png", _png(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)))

    def row(i, name):
        uri = f"s3://{s3_bucket}/hr/{name}"
        return {
            "shard": 0,
            "input_index": i,
            "key": base_key(uri),
            "uri": uri,
            "path": uri,
            "offset": None,
            "size": None,
        }

    decode = DecodeTile(decode_config(storage=opts))
    t = decode([row(0, "a.png"), row(1, "missing.png")]).to_pylist()
    reports = [r for r in t if r["row_type"] == "input"]
    assert [r["status"] for r in reports] == ["ok", "failed"]
    assert reports[1]["error"].startswith("missing: ")  # a real failure stays a failure row

    proxy.down()
    try:
        with pytest.raises(TransientStorageError, match="hr/a.png"):
            decode([row(0, "a.png")])  # no failure row: the task fails and Ray retries it
    finally:
        proxy.up()
    assert [r["status"] for r in decode([row(0, "a.png")]).to_pylist() if r["row_type"] == "input"] == ["ok"]


def test_refused_credentials_never_become_failure_rows(s3_server, s3_bucket, storage_refuses):
    """Expired or wrong credentials are not a property of an input: decoding fails the task with
    the URI and what to fix (a failure row would be kept by every resumed run), and the store's
    own operations say the same."""
    import moto.settings

    fs, _ = get_fs(f"s3://{s3_bucket}")
    rng = np.random.default_rng(0)
    uri = f"s3://{s3_bucket}/hr/a.png"
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    fs.pipe_file(f"{s3_bucket}/hr/a.png", _png(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)))
    decode = DecodeTile(decode_config())
    row = {
        "shard": 0,
        "input_index": 0,
        "key": base_key(uri),
        "uri": uri,
        "path": uri,
        "offset": None,
        "size": None,
    }
    assert [r["status"] for r in decode([row]).to_pylist() if r["row_type"] == "input"] == ["ok"]

    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    with pytest.raises(
        StorageAccessError, match=rf"^read {uri}: access refused by storage .*AWS_ACCESS_KEY_ID"
    ):
        decode([row])
    with pytest.raises(StorageAccessError, match=rf"list s3://{s3_bucket}/ds.*access refused"):
        DatasetStore(f"s3://{s3_bucket}/ds").names()


@pytest.mark.ray
def test_a_refusal_inside_a_ray_data_task_is_named_to_the_driver(ray_local):
    """Ray Data hands the driver only the remote error's text: the job still finds the message."""
    import ray.data

    msg = "read s3://b/hr/a.png: access refused by storage (ClientError: Forbidden): check the credentials"

    def refuse(batch):
        raise StorageAccessError(msg)

    with pytest.raises(Exception) as info:
        for _ in ray.data.range(2).map_batches(refuse).iter_batches():
            pass
    assert not isinstance(info.value, StorageAccessError)  # what reaches the driver is Ray's wrapper
    assert task_error_message(info.value, StorageAccessError) == msg
    assert task_error_message(info.value, TransientStorageError) is None
    assert task_error_message(StorageAccessError(msg), StorageAccessError) == msg


# ------------------------------------------------------------------------------------------------
# the lock
# ------------------------------------------------------------------------------------------------


def test_upload_part_size_keeps_any_object_within_the_s3_part_limit():
    from pipelines.storage import S3_MAX_PARTS, UPLOAD_CHUNK, upload_chunk

    assert upload_chunk(0) == upload_chunk(2**30) == UPLOAD_CHUNK == 8 * 2**20
    assert upload_chunk(S3_MAX_PARTS * UPLOAD_CHUNK) == UPLOAD_CHUNK  # 78.1 GiB: exactly 10 000 parts
    assert upload_chunk(S3_MAX_PARTS * UPLOAD_CHUNK + 1) == 9 * 2**20
    for size in (100 * 2**30, 5 * 2**40):  # 100 GiB, and s3's largest object
        chunk = upload_chunk(size)
        assert (
            chunk % 2**20 == 0 and -(-size // chunk) <= S3_MAX_PARTS and chunk - 2**20 < size / S3_MAX_PARTS
        )


def test_local_run_lock_one_winner_and_never_an_empty_lock_file(tmp_path):
    """Jobs starting at once on one local output: exactly one holds the lock, and the lock file is
    never seen without its holder (it is linked into place whole)."""
    store = DatasetStore(str(tmp_path / "out"))
    for _ in range(5):
        locks = [RunLock(store, heartbeat_s=0.5) for _ in range(4)]
        barrier = threading.Barrier(len(locks))

        def take(lock, barrier=barrier):
            barrier.wait()
            try:
                lock.acquire()
                return True
            except LockError:
                return False

        with ThreadPoolExecutor(len(locks)) as pool:
            won = list(pool.map(take, locks))
        assert sum(won) == 1, won
        holder = json.loads(store.read_bytes(LOCK_NAME))
        assert holder["run_id"] == locks[won.index(True)].run_id
        assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith((".tmp", ".linking"))]
        locks[won.index(True)].release()
        assert not store.exists(LOCK_NAME)


def test_moto_honours_if_none_match_on_put_object(s3_server, s3_bucket):
    fs, _ = get_fs(f"s3://{s3_bucket}", {"endpoint_url": s3_server})
    fs.pipe_file(f"{s3_bucket}/x", b"1", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{s3_bucket}/x", b"2", mode="create")
    assert fs.cat_file(f"{s3_bucket}/x") == b"1"


def test_run_lock_race_on_s3_exactly_one_wins_by_conditional_create(s3_server, s3_bucket):
    uri = f"s3://{s3_bucket}/out"
    for _ in range(3):
        locks = [RunLock(DatasetStore(uri, {"endpoint_url": s3_server}), heartbeat_s=0.5) for _ in range(4)]
        barrier = threading.Barrier(len(locks))
        results: list[object] = [None] * len(locks)

        def go(i, locks=locks, barrier=barrier, results=results):
            barrier.wait()
            try:
                locks[i].acquire()
                results[i] = "won"
            except LockError as exc:
                results[i] = exc

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(locks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        winners = [locks[i] for i, r in enumerate(results) if r == "won"]
        assert len(winners) == 1, results
        assert all(isinstance(r, LockError) for r in results if r != "won")
        winner = winners[0]
        assert winner.conditional is True  # the create was the conditional PUT (moto honours it)
        assert json.loads(winner.store.read_bytes(LOCK_NAME))["run_id"] == winner.run_id
        assert winner._create_conditional() is False  # a second conditional create: 412
        winner.release()
        assert not winner.store.exists(LOCK_NAME)


def test_run_lock_takes_over_a_stale_holder_on_s3(s3_server, s3_bucket, caplog):
    store = DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": s3_server})
    stale = {"host": "elsewhere", "pid": 1, "run_id": "dead", "heartbeat": time.time() - 3600}
    store.write_bytes(LOCK_NAME, json.dumps(stale).encode())
    lock = RunLock(store, heartbeat_s=0.5)
    with caplog.at_level("WARNING", logger="realdgen.storage"):
        lock.acquire()
    try:
        assert lock.conditional is True and json.loads(store.read_bytes(LOCK_NAME))["run_id"] == lock.run_id
        # the takeover is said, naming the holder that is gone
        said = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
        assert len(said) == 1 and "(host elsewhere, pid 1, heartbeat 3600 s ago)" in said[0], said
        with pytest.raises(LockError, match="another live job"):
            RunLock(DatasetStore(store.uri, {"endpoint_url": s3_server})).acquire()
    finally:
        lock.release()


def test_a_lock_file_that_is_not_a_lock_is_taken_over_not_a_crash(tmp_path):
    """A _lock.json that is not a JSON object, or whose heartbeat or pid is not a usable number, was
    an AttributeError / ValueError / OverflowError out of the job's look at the lock (a traceback):
    it is treated as no holder, and taken over."""
    import socket

    store = DatasetStore(str(tmp_path / "out"))
    store.ensure()
    for junk in (
        b"[]",
        b'"x"',
        b"{not json",
        json.dumps({"host": socket.gethostname(), "heartbeat": "2026-12-08"}).encode(),
        json.dumps({"host": socket.gethostname(), "pid": "me", "heartbeat": time.time()}).encode(),
        # numbers os.kill cannot take, or that are not a process of this tool's (0: the group)
        b'{"host": "%s", "pid": 1e20, "heartbeat": Infinity}' % socket.gethostname().encode(),
        json.dumps({"host": socket.gethostname(), "pid": 10**20, "heartbeat": time.time()}).encode(),
        json.dumps({"host": socket.gethostname(), "pid": 0, "heartbeat": time.time()}).encode(),
    ):
        store.write_bytes(LOCK_NAME, junk)
        RunLock(store).refuse_if_live_here()  # no live holder here: nothing raised
        lock = RunLock(store, heartbeat_s=0.5)
        lock.acquire()
        try:
            assert json.loads(store.read_bytes(LOCK_NAME))["run_id"] == lock.run_id, junk
        finally:
            lock.release()


class _FakeKernel32:
    """The four kernel32 calls the Windows liveness check makes: a process that OpenProcess opens
    (``exit_code`` set) or refuses with ``error``; the handles it closes are kept."""

    HANDLE = 0x1C4

    def __init__(self, exit_code: int | None = None, error: int = 0, query_fails: bool = False):
        self.exit_code, self.error, self.query_fails = exit_code, error, query_fails
        self.opened: list[tuple] = []
        self.closed: list[int] = []

    def OpenProcess(self, access, inherit, pid):
        self.opened.append((access, inherit, pid))
        return None if self.exit_code is None else self.HANDLE

    def GetExitCodeProcess(self, handle, code):
        assert handle == self.HANDLE
        if self.query_fails:
            return 0
        code.contents.value = self.exit_code
        return 1

    def CloseHandle(self, handle):
        self.closed.append(handle)
        return 1

    def GetLastError(self):
        return self.error


@pytest.mark.parametrize(
    ("kernel32", "alive", "closed"),
    [
        (_FakeKernel32(exit_code=259), True, True),  # STILL_ACTIVE
        (_FakeKernel32(exit_code=0), False, True),  # exited (its handle kept open by someone)
        (_FakeKernel32(exit_code=1), False, True),
        (_FakeKernel32(exit_code=259, query_fails=True), True, True),  # unknown: not taken over
        (_FakeKernel32(error=87), False, False),  # ERROR_INVALID_PARAMETER: no such process
        (_FakeKernel32(error=5), True, False),  # ERROR_ACCESS_DENIED: another user's process
    ],
    ids=["still-active", "exited-0", "exited-1", "query-fails", "no-such-pid", "access-denied"],
)
def test_windows_pid_check_reads_the_exit_code_and_sends_no_signal(kernel32, alive, closed):
    """On Windows os.kill(pid, 0) sends CTRL_C_EVENT to a live holder and raises WinError 87 (not
    ProcessLookupError) for a dead one, so a re-run after a crash failed until _lock.json was
    removed. The Windows check opens the process for query, reads its exit code and closes the
    handle it opened."""
    from pipelines.storage import _pid_alive_windows

    assert _pid_alive_windows(4242, kernel32) is alive
    assert kernel32.opened == [(0x1000, False, 4242)]  # PROCESS_QUERY_LIMITED_INFORMATION
    assert kernel32.closed == ([_FakeKernel32.HANDLE] if closed else [])


def test_run_lock_tells_a_lost_machine_from_a_live_job_on_another_host(s3_server, s3_bucket):
    """A job resubmitted on a new cluster soon after its head pod was lost finds that pod's lock with
    a fresh heartbeat from another host: it watches the heartbeat and takes the lock over once it
    goes stale, instead of failing (and spending a RayJob retry); a holder that keeps beating is
    refused as soon as its heartbeat moves."""
    store = DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": s3_server})

    def holder(run_id):
        return json.dumps({"host": "gone-pod", "pid": 1, "run_id": run_id, "heartbeat": time.time()}).encode()

    store.write_bytes(LOCK_NAME, holder("lost"))
    lock = RunLock(store, heartbeat_s=0.5, stale_s=2.0)
    t0 = time.monotonic()
    lock.acquire()
    try:
        waited = time.monotonic() - t0
        assert 1.5 < waited < 6, waited  # watched until the heartbeat went stale, then took over
        assert json.loads(store.read_bytes(LOCK_NAME))["run_id"] == lock.run_id
    finally:
        lock.release()

    store.write_bytes(LOCK_NAME, holder("alive"))
    stop = threading.Event()

    def beat():
        while not stop.wait(0.3):
            store.write_bytes(LOCK_NAME, holder("alive"))

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(LockError, match="another live job.*host gone-pod"):
            RunLock(store, heartbeat_s=0.5, stale_s=30.0).acquire()
        assert time.monotonic() - t0 < 5  # refused once the heartbeat moved, not after stale_s
    finally:
        stop.set()
        t.join()


def test_run_lock_falls_back_when_the_store_rejects_conditional_writes(s3_server, s3_bucket, monkeypatch):
    store = DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": s3_server})
    real = store.fs.pipe_file  # fsspec puts the sync methods on the instance

    def no_conditional(path, data, mode="overwrite", **kw):
        if mode == "create":
            from s3fs.errors import translate_boto_error

            raise translate_boto_error(_client_error("NotImplemented", 501, "PutObject"))
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", no_conditional)
    lock = RunLock(store, heartbeat_s=0.5)
    lock.acquire()
    try:
        assert lock.conditional is False
        assert json.loads(store.read_bytes(LOCK_NAME))["run_id"] == lock.run_id
        with pytest.raises(LockError):
            RunLock(DatasetStore(store.uri, {"endpoint_url": s3_server})).acquire()
    finally:
        lock.release()


def test_run_lock_heartbeat_survives_an_outage(proxy, s3_bucket, short_budget):
    store = DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": proxy.url})
    lock = RunLock(store, heartbeat_s=0.3)
    lock.acquire()
    try:
        proxy.down_for(2.0).join()
        assert lock._thread is not None and lock._thread.is_alive()
        deadline = time.monotonic() + 10
        while True:  # beats resume once storage is back
            beat = json.loads(store.read_bytes(LOCK_NAME))["heartbeat"]
            if time.time() - beat < 1.0:
                break
            assert time.monotonic() < deadline, "the heartbeat did not resume"
            time.sleep(0.2)
    finally:
        lock.release()
    assert not store.exists(LOCK_NAME)


def test_run_lock_taken_over_during_an_outage_is_given_up_not_overwritten(proxy, s3_server, s3_bucket):
    """Job A's beats fail longer than stale_s; job B takes the lock over. When storage is back, A
    finds B's lock: it stops beating (before, its next beat overwrote B's lock and both wrote the
    output), sets ``lost`` (the job stops on it) and does not delete B's lock on release."""
    a = RunLock(
        DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": proxy.url}), heartbeat_s=0.3, stale_s=1.0
    )
    b_store = DatasetStore(f"s3://{s3_bucket}/out", {"endpoint_url": s3_server})
    b = RunLock(b_store, heartbeat_s=0.3, stale_s=1.0)
    a.acquire()
    try:
        up = proxy.down_for(3.0)
        time.sleep(1.8)  # A's last beat is now older than stale_s
        b.acquire()
        up.join()
        deadline = time.monotonic() + 10
        while a.lost is None:
            assert time.monotonic() < deadline, "A never noticed that B holds the lock"
            time.sleep(0.1)
        assert "taken over by another job" in a.lost
        time.sleep(1.0)  # A beats no more: the lock stays B's
        assert json.loads(b_store.read_bytes(LOCK_NAME))["run_id"] == b.run_id
        a.release()
        assert json.loads(b_store.read_bytes(LOCK_NAME))["run_id"] == b.run_id
        assert b.lost is None
    finally:
        b.release()
    assert not b_store.exists(LOCK_NAME)


def test_write_stream_is_atomic_locally_and_on_s3(tmp_path, s3_server, s3_bucket):
    """A producer that fails half-way leaves neither a partial object nor a temp file behind."""

    def half_then_fail(f):
        f.write(b"partial bytes")
        raise RuntimeError("producer broke")

    big = bytes(range(256)) * 80_000  # 20 MB: a 3-part multipart upload on s3 (UPLOAD_CHUNK 8 MiB)
    for uri in (str(tmp_path / "ds"), f"s3://{s3_bucket}/atomic"):
        store = DatasetStore(uri, {"endpoint_url": s3_server})
        store.write_bytes("keep.bin", b"old")
        with pytest.raises(RuntimeError, match="producer broke"):
            store.write_stream("keep.bin", half_then_fail)
        with pytest.raises(RuntimeError, match="producer broke"):
            store.write_stream("new.bin", half_then_fail)
        assert store.read_bytes("keep.bin") == b"old" and not store.exists("new.bin"), uri
        assert store.write_stream("keep.bin", lambda f: f.write(big)) == len(big)
        assert store.read_bytes("keep.bin") == big and store.names() == ["keep.bin"], uri
    assert not [p.name for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]


def test_download_cache_is_per_user_and_refused_when_others_may_write(tmp_path, monkeypatch):
    import os
    import stat
    import tempfile

    from pipelines.storage import download_cache

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cache = download_cache()
    assert cache == str(tmp_path / f"realdgen-cache-{os.getuid()}")
    assert stat.S_IMODE(os.stat(cache).st_mode) & 0o077 == 0
    os.chmod(cache, 0o777)  # a folder others can plant files in
    with pytest.raises(PermissionError, match="others may write to it"):
        download_cache()


def test_storage_errors_do_not_echo_an_endpoints_path():
    """botocore names the URL it could not reach, endpoint path and key included; the endpoint is the
    user's `storage` setting, which messages never echo: the path is cut, scheme, host and port stay."""
    from botocore.exceptions import EndpointConnectionError

    def down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/hunter2/bkt/key.png")

    with pytest.raises(TransientStorageError) as info:
        with_retries(down, what="read s3://bkt/key.png", budget_s=0, sleep=lambda s: None)
    msg = str(info.value)
    assert (
        "hunter2" not in msg and "http://127.0.0.1:9/…" in msg and msg.startswith("read s3://bkt/key.png")
    ), msg


def test_an_endpoint_nobody_answers_at_names_where_the_endpoint_comes_from():
    """A typo in the endpoint's port is retried like an outage: the message says where to fix it."""
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    def down():
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bkt/key.png")

    with pytest.raises(TransientStorageError) as info:
        with_retries(down, what="read s3://bkt/key.png", budget_s=0, sleep=lambda s: None)
    assert str(info.value).endswith(
        "if this endpoint is the wrong one, fix storage.endpoint_url (--endpoint for realdgen) or "
        "AWS_ENDPOINT_URL"
    )

    def slow():
        raise ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bkt/key.png")

    with pytest.raises(TransientStorageError) as info:  # a server that answers slowly is not misnamed
        with_retries(slow, what="read s3://bkt/key.png", budget_s=0, sleep=lambda s: None)
    assert "endpoint_url" not in str(info.value)


def test_env_endpoint_with_credentials_is_a_setting_to_fix(monkeypatch):
    from pipelines.storage import StorageAccessError, env_endpoint, get_fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://key:hunter2@minio.local:9000")
    with pytest.raises(StorageAccessError) as info:
        get_fs("s3://b/x")
    assert "AWS_ENDPOINT_URL must not hold credentials" in str(info.value)
    assert "hunter2" not in str(info.value)
    get_fs("/tmp/x")  # a local path never reads it
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000/?X-Amz-Security-Token=abc")
    with pytest.raises(StorageAccessError):
        env_endpoint()
    monkeypatch.setenv("AWS_ENDPOINT_URL", " http://127.0.0.1:9000 ")
    assert env_endpoint() == "http://127.0.0.1:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "")
    assert env_endpoint() is None


def test_the_downstream_tools_ride_out_an_outage_without_losing_a_shard(
    proxy, s3_server, s3_bucket, tmp_path
):
    """The SR trainer's reader, `realdgen export` and `realdgen inspect`/`validate` opened shards and
    read listings once: a storage outage of a few seconds at the wrong moment cost a whole shard
    (skipped as `shard_error`, a partial export) or ended the command. They now retry through an
    outage as the job does (missing or refused objects still fail at once): each read here starts
    during a 2 s outage, or a 10 s one after the folder was listed, and must give every sample."""
    from pipelines.export import export_dataset, iter_raw_samples
    from pipelines.inspect_shards import check_contract, inspect_dataset
    from pipelines.reader import PairedShardDataset, filesystem, list_shards
    from tests.shard_factory import write_dataset

    fac = write_dataset(f"s3://{s3_bucket}/ds", n_samples=6, samples_per_shard=3, endpoint_url=s3_server)
    uri, url = fac.uri, proxy.url
    keys = sorted(fac.keys)

    def outage(read, seconds=2.0):
        up = proxy.down_for(seconds)
        try:
            return read()
        finally:
            up.join()

    assert [s.samples for s in outage(lambda: list_shards(uri, url))] == [3, 3]
    shards = list_shards(uri, url)
    fs, path = filesystem(uri, url)

    def listed_then_outage(read):
        # the folder listed first: s3fs then opens a shard from its listing cache, with no request,
        # and the first request is the tar's first read (the outage outlasts s3fs's own retries)
        fs.ls(path, refresh=True)
        return outage(read, 10.0)

    skipped = []
    raw = listed_then_outage(lambda: list(iter_raw_samples(shards, url, skipped.append)))
    assert sorted(r["__key__"] for r in raw) == keys and skipped == []
    ds = PairedShardDataset(uri, endpoint_url=url, shuffle=False, return_meta=True)
    got = outage(lambda: [s["key"] for s in ds])
    assert sorted(got) == keys and not ds.skipped
    result = outage(lambda: export_dataset(uri, str(tmp_path / "export"), endpoint_url=url))
    assert (result.pairs, dict(result.skipped)) == (6, {})
    report = outage(lambda: inspect_dataset(uri, endpoint_url=url))
    assert report.samples == 6 and not report.unreadable, report
    contract = outage(lambda: check_contract(uri, endpoint_url=url))
    assert contract.ok, contract.problems


def test_the_job_exits_75_when_storage_stays_unavailable_before_it_starts(
    proxy, s3_bucket, tmp_path, capsys, short_budget
):
    """Storage unavailable past the retry budget is the one failure worth retrying as it is (the
    same command resumes): it exits 75 (EX_TEMPFAIL), so a scheduler can tell it from a failure
    budget exceeded or an output refused (1) and from an invalid manifest (2)."""
    import yaml
    from test_generate_job import manifest_dict

    from pipelines.generate_dataset import EXIT_TEMPFAIL, main

    data = manifest_dict(f"s3://{s3_bucket}/hr", f"s3://{s3_bucket}/refs", str(tmp_path / "out"))
    data["storage"] = {"endpoint_url": proxy.url}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    proxy.down()
    try:
        assert main([str(path)]) == EXIT_TEMPFAIL == 75
    finally:
        proxy.up()
    err = capsys.readouterr().err
    assert "storage unavailable" in err and "nothing was written, run the command again" in err, err
    assert not (tmp_path / "out").exists()


def test_an_outage_past_the_budget_stops_the_reader_instead_of_skipping_every_shard(
    proxy, s3_server, s3_bucket, short_budget, monkeypatch
):
    """Storage away for longer than the retry budget is not one shard's fault: skipping it would cost
    the budget again on every remaining shard (a resampled stream would try max(16, 2 x shards)
    times). The reader and export raise TransientStorageError at the first shard instead."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: the budget decides
    from pipelines.export import iter_raw_samples
    from pipelines.reader import PairedShardDataset, list_shards
    from tests.shard_factory import write_dataset

    fac = write_dataset(f"s3://{s3_bucket}/ds", n_samples=6, samples_per_shard=3, endpoint_url=s3_server)
    shards = list_shards(fac.uri, proxy.url)
    ds = PairedShardDataset(fac.uri, endpoint_url=proxy.url, shuffle=False)
    proxy.down()
    try:
        with pytest.raises(TransientStorageError, match="opening s3://.*storage unavailable"):
            next(iter(ds))
        skipped = []
        with pytest.raises(TransientStorageError):
            next(iter_raw_samples(shards, proxy.url, skipped.append))
    finally:
        proxy.up()
    assert not ds.skipped and skipped == [], (ds.skipped, skipped)


def test_training_exits_75_when_storage_stays_unavailable(proxy, s3_bucket, tmp_path, capsys, short_budget):
    """pipelines/train.py on an outage: a traceback (listing the sources) or an invalid manifest
    (exit 2, fetching a checkpoint) before; now one line and 75, as the generation job."""
    from pathlib import Path

    import yaml

    from pipelines.train import main

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "manifests" / "train_tiny.yaml").read_text())
    data["data"] = {
        "hr": {"uri": f"s3://{s3_bucket}/hr"},
        "lr": [{"kind": "images", "source": {"uri": f"s3://{s3_bucket}/lr"}}],
    }
    data["storage"] = {"endpoint_url": proxy.url}
    data["output"] = {"run_dir": str(tmp_path / "run"), "checkpoint": str(tmp_path / "model.safetensors")}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    proxy.down()
    try:
        assert main([str(path)]) == 75
    finally:
        proxy.up()
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "storage unavailable" in err and "run the same command again" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "model.safetensors").exists()
