"""Bytes-level sample schema (realdgen_core/shards.py)."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from realdgen_core.shards import (
    ShardSchemaError,
    decode_sample,
    encode_sample,
    read_tar,
    validate_key,
    write_tar,
)


def meta(**kw):
    m = {
        "scale": 2,
        "generator": "bicubic",
        "hr_source": "a.png",
        "hr_box": [0, 0, 8, 8],
        "ref_source": None,
        "model_digest": None,
        "seed": 3,
        "k": 1,
        "tau": None,
        "content_error": None,
        "degradation_error": None,
    }
    m.update(kw)
    return m


def sample(key, seed=0):
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return encode_sample(key, hr, hr[::2, ::2].copy(), meta(seed=seed))


def test_keys():
    assert validate_key("abc_D-9") == "abc_D-9"
    for bad in ["a.b", "", "a/b", "é", "x" * 91]:
        with pytest.raises(ShardSchemaError):
            validate_key(bad)


def test_encode_checks_schema():
    hr = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ShardSchemaError, match="hr .* is not 2 x lr"):
        encode_sample("k", hr, np.zeros((3, 4, 3), np.uint8), meta())
    with pytest.raises(ShardSchemaError, match="lacks 'tau'"):
        m = meta()
        del m["tau"]
        encode_sample("k", hr, hr[::2, ::2].copy(), m)
    with pytest.raises(ShardSchemaError, match="'k' has type bool"):
        encode_sample("k", hr, hr[::2, ::2].copy(), meta(k=True))
    with pytest.raises(ShardSchemaError, match="uint8"):
        encode_sample("k", hr.astype(np.float32), hr[::2, ::2].copy(), meta())


def test_tar_is_deterministic_sorted_and_roundtrips():
    samples = [sample(k, i) for i, k in enumerate(["c", "a", "b"])]
    b1, b2 = io.BytesIO(), io.BytesIO()
    n1 = write_tar(samples, b1)
    n2 = write_tar(list(reversed(samples)), b2)
    assert b1.getvalue() == b2.getvalue() and n1 == n2 == len(b1.getvalue())
    with tarfile.open(fileobj=io.BytesIO(b1.getvalue())) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [f"{k}.{e}" for k in "abc" for e in ("hr.png", "json", "lr.png")]
    assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
    back = list(read_tar(io.BytesIO(b1.getvalue())))
    assert [s["__key__"] for s in back] == ["a", "b", "c"]
    hr, lr, m = decode_sample(back[1])
    assert m["seed"] == 2 and hr.shape == (8, 8, 3) and (lr == hr[::2, ::2]).all()
    with pytest.raises(ShardSchemaError, match="duplicate"):
        write_tar([samples[0], samples[0]], io.BytesIO())
