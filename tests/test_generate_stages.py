"""The job's stages as plain callables (no Ray): keys, seeds, tiling, pairing, decode → generate → encode."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.generate.stages import (
    DecodeTile,
    EncodeSample,
    GenerateLR,
    base_key,
    choose_ref,
    derive_seed,
    tile_boxes,
)
from realdgen_core.degrade import degrade
from realdgen_core.shards import KEY_RE, decode_png
from tests.shard_factory import decode_config


def test_keys_and_seeds_are_stable_and_safe():
    k = base_key("s3://b/dir/My Photo.v2.JPG")
    assert KEY_RE.match(k) and k.startswith("My_Photo_v2_") and len(k.rsplit("_", 1)[1]) == 10
    assert base_key("s3://b/x.tar#a/b.c.png").startswith("b_c_")
    assert base_key("a/x.png") != base_key("b/x.png")
    assert derive_seed(1, "k") == derive_seed(1, "k") != derive_seed(2, "k")
    assert 0 <= derive_seed(0, "k") < 2**63


def test_tiling_grid_random_and_too_small():
    assert tile_boxes(100, 70, 32, "grid", 10, 0) == [
        (0, 0, 32, 32),
        (32, 0, 64, 32),
        (64, 0, 96, 32),
        (0, 32, 32, 64),
        (32, 32, 64, 64),
        (64, 32, 96, 64),
    ]
    sub = tile_boxes(100, 70, 32, "grid", 2, 5)
    assert (
        len(sub) == 2
        and sub == tile_boxes(100, 70, 32, "grid", 2, 5)
        and sub != tile_boxes(100, 70, 32, "grid", 2, 6)
    )
    rnd = tile_boxes(100, 70, 32, "random", 3, 1)
    assert len(rnd) == 3
    assert all(0 <= x0 and 0 <= y0 and x1 <= 100 and y1 <= 70 for x0, y0, x1, y1 in rnd)
    assert all((x1 - x0, y1 - y0) == (32, 32) for x0, y0, x1, y1 in rnd)
    assert rnd == tile_boxes(100, 70, 32, "random", 3, 1) != tile_boxes(100, 70, 32, "random", 3, 2)
    assert tile_boxes(31, 100, 32, "grid", 4, 0) == []


def test_pairing_modes():
    sets = [
        {"name": "a", "weight": 1.0, "start": 0, "count": 2},
        {"name": "b", "weight": 1e-9, "start": 2, "count": 3},
    ]
    rr = [choose_ref({"mode": "round_robin", "refs_per_tile": 1}, sets, 5, 0, i, 0, 0) for i in range(7)]
    assert rr == [0, 1, 2, 3, 4, 0, 1]
    # two references per tile: (input + tile) * 2 + slot, so every slot and tile gets its own
    rr2 = {"mode": "round_robin", "refs_per_tile": 2}
    assert [choose_ref(rr2, sets, 5, 0, 1, t, sl) for t in (0, 1) for sl in (0, 1)] == [2, 3, 4, 0]
    w = [choose_ref({"mode": "weighted", "refs_per_tile": 1}, sets, 5, s, 0, 0, 0) for s in range(50)]
    assert set(w) <= {0, 1} and len(set(w)) == 2
    r = [choose_ref({"mode": "random", "refs_per_tile": 1}, sets, 5, s, 0, 0, 0) for s in range(50)]
    assert set(r) == {0, 1, 2, 3, 4}
    assert choose_ref({"mode": "random", "refs_per_tile": 1}, [], 0, 1, 0, 0, 0) is None


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["bicubic", "realesrgan", "bsrgan"])
def test_stages_chain_without_ray(tmp_path, kind):
    rng = np.random.default_rng(0)
    (tmp_path / "a.png").write_bytes(_png(rng.integers(0, 256, (40, 72, 3), dtype=np.uint8)))
    (tmp_path / "b.png").write_bytes(b"nope")
    rows = [
        {
            "shard": 0,
            "input_index": i,
            "key": base_key(str(tmp_path / n)),
            "uri": str(tmp_path / n),
            "path": str(tmp_path / n),
            "offset": None,
            "size": None,
        }
        for i, n in enumerate(["a.png", "b.png"])
    ]
    decode = DecodeTile(decode_config())
    t = decode(rows).to_pylist()
    reports = [r for r in t if r["row_type"] == "input"]
    samples = [r for r in t if r["row_type"] == "sample"]
    assert [r["status"] for r in reports] == ["ok", "failed"] and reports[0]["n_samples"] == 2 == len(samples)
    assert reports[1]["error"].startswith("not an image")
    gen = GenerateLR({"kind": kind, "scale": 2})
    g1 = gen(t).to_pylist()
    g2 = gen(samples[1:] + samples[:1]).to_pylist()  # another batch, another order
    lr1 = {r["key"]: r["lr"] for r in g1 if r["row_type"] == "sample"}
    assert lr1 == {r["key"]: r["lr"] for r in g2}
    enc = [r for r in EncodeSample({"scale": 2})(g1).to_pylist() if r["row_type"] == "sample"]
    assert len(enc) == 2
    for s in enc:
        assert s["hr"] is None and s["lr"] is None
        hr8, lr8 = decode_png(s["hr_png"]), decode_png(s["lr_png"])
        assert hr8.shape == (32, 32, 3) and lr8.shape == (16, 16, 3)
        meta = json.loads(s["json"])
        assert meta["generator"] == kind and meta["ref_source"] == "r0"
        # The sample is exactly D(HR, θ) drawn with the seed its JSON records: the kind and the seed
        # recorded are the ones used, so anyone can rebuild it.
        hr = torch.from_numpy(hr8.copy()).permute(2, 0, 1)[None].float().div(255.0)
        want, _ = degrade(hr, kind, 2, [torch.Generator().manual_seed(meta["seed"])])
        want8 = want.clamp(0, 1).mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(lr8, want8)
    seeds = [json.loads(s["json"])["seed"] for s in enc]
    assert seeds[0] != seeds[1]


def test_worker_refuses_a_checkpoint_replaced_since_the_job_planned():
    """The stats record the planned model's digest; a worker that loads another file at the same URI
    (replaced mid-run) must not write samples under that record."""
    from pathlib import Path

    from realdgen_core.checkpoint import inspect_checkpoint

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "realdgen-small-x4.safetensors"
    digest = inspect_checkpoint(str(ckpt))[1]["digest"]
    ok = GenerateLR({"kind": "realdgen", "scale": 4, "checkpoint": str(ckpt), "model_digest": digest})
    assert ok.model_digest == digest
    with pytest.raises(RuntimeError, match="changed while the job ran"):
        GenerateLR({"kind": "realdgen", "scale": 4, "checkpoint": str(ckpt), "model_digest": "0" * 64})
