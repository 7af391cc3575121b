"""The GPU-throughput path on CPU: x_start from the decode stage, device-side noise, GPU-only knobs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.generate.stages import DecodeTile, EncodeSample, GenerateLR, base_key
from realdgen_core.config import preset
from realdgen_core.generator import LRGenerator, draw_starts, start_images
from realdgen_core.models import build_model


@pytest.fixture(scope="module")
def model4():
    return build_model(preset("tiny", 4), seed=0)


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def test_precomputed_starts_give_the_same_bytes(model4):
    hr, refs = _images(3, 32, 1), _images(3, 16, 2)
    seeds = [8, 9, 10]
    gen = LRGenerator(model4)
    base = gen.generate(hr, refs, k=3, tau_range=(0, 15), seeds=seeds, return_candidates=True)
    _, tau, thetas = draw_starts(3, 3, 4, (0, 15), seeds, "realesrgan")
    starts = start_images(hr, thetas)
    assert torch.equal(tau, base.tau) and thetas == base.thetas
    assert torch.equal(starts, torch.round(starts * 255) / 255)  # uint8 carries it losslessly
    pre = gen.generate(hr, refs, k=3, tau_range=(0, 15), seeds=seeds, starts=starts, return_candidates=True)
    assert torch.equal(pre.candidates, base.candidates) and torch.equal(pre.kept, base.kept)
    # Wrong starts are used as given (the caller's contract), wrong shapes are refused.
    other = gen.generate(hr, refs, k=3, tau_range=(0, 15), seeds=seeds, starts=starts.flip(0))
    assert not torch.equal(other.lr, base.lr)
    with pytest.raises(ValueError, match="starts must be"):
        gen.generate(hr, refs, k=3, tau_range=(0, 15), seeds=seeds, starts=starts[:, :2])


def test_device_noise_is_deterministic_batch_independent_and_a_different_stream(model4):
    hr, refs = _images(3, 32, 3), _images(3, 16, 4)
    seeds = [1, 2, 3]
    kw = dict(k=2, tau_range=(0, 12), return_candidates=True)
    cpu = LRGenerator(model4)
    dev = LRGenerator(model4, device_noise=True)
    assert cpu.device_noise is False  # auto: on CUDA only
    a = dev.generate(hr, refs, seeds=seeds, **kw)
    b = dev.generate(hr, refs, seeds=seeds, **kw)
    alone = dev.generate(hr[1:2], refs[1:2], seeds=[2], **kw)
    assert torch.equal(a.candidates, b.candidates) and torch.equal(alone.candidates[0], a.candidates[1])
    assert torch.equal(a.tau, cpu.generate(hr, refs, seeds=seeds, **kw).tau)
    assert not torch.equal(a.candidates, cpu.generate(hr, refs, seeds=seeds, **kw).candidates)


def test_gpu_only_knobs_are_ignored_on_cpu(model4):
    hr, refs = _images(1, 32, 5), _images(1, 16, 6)
    kw = dict(k=2, tau_range=(0, 5), seeds=[4])
    plain = LRGenerator(model4).generate(hr, refs, **kw)
    g = LRGenerator(model4, dtype=torch.bfloat16, channels_last=True, compile=True)
    assert g.autocast_dtype is None and not g.channels_last and g._unet is g.model.unet
    assert torch.equal(g.generate(hr, refs, **kw).lr, plain.lr)


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_stage_starts_give_the_same_dataset_bytes(tmp_path, model4):
    from realdgen_core.checkpoint import save_checkpoint

    ckpt = tmp_path / "tiny.safetensors"
    save_checkpoint(ckpt, model4)
    rng = np.random.default_rng(0)
    (tmp_path / "a.png").write_bytes(_png(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)))
    rows = [
        {
            "shard": 0,
            "input_index": 0,
            "key": base_key(str(tmp_path / "a.png")),
            "uri": str(tmp_path / "a.png"),
            "path": str(tmp_path / "a.png"),
            "offset": None,
            "size": None,
        }
    ]
    gen_cfg = {
        "kind": "realdgen",
        "scale": 4,
        "checkpoint": str(ckpt),
        "k": 2,
        "tau_min": 0,
        "tau_max": 10,
        "weights": (1.0, 1.0),
        "start_kind": "bsrgan",
        "ref_bank": rng.random((2, model4.config.degradation.out_dim)).astype(np.float32),
        "rows_per_call": 4,
    }
    decode_cfg = {
        "seed": 3,
        "scale": 4,
        "tile": 8,
        "tiling_mode": "grid",
        "max_tiles": 3,
        "max_pixels": 10**6,
        "max_bytes": None,
        "storage": {},
        "pairing": {"mode": "round_robin", "refs_per_tile": 1},
        "refs": [{"uri": "r0", "set": "s", "domain": None}, {"uri": "r1", "set": "s", "domain": None}],
        "sets": [],
    }
    starts_cfg = {"k": 2, "tau_min": 0, "tau_max": 10, "start_kind": "bsrgan"}
    plain = DecodeTile(decode_cfg)(rows).to_pylist()
    with_starts = DecodeTile({**decode_cfg, "starts": starts_cfg})(rows).to_pylist()
    samples = [r for r in with_starts if r["row_type"] == "sample"]
    assert len(samples) == 3 and all(len(r["x_start"]) == 2 * 8 * 8 * 3 for r in samples)
    assert all(r.get("x_start") is None for r in plain)
    gen = GenerateLR(gen_cfg)
    calls = []
    orig = gen.generator.generate

    def spy(*a, **kw):
        calls.append(kw.get("starts") is not None)
        return orig(*a, **kw)

    gen.generator.generate = spy
    out_plain = EncodeSample({"scale": 4})(gen(plain)).to_pylist()
    out_starts = EncodeSample({"scale": 4})(gen(with_starts)).to_pylist()
    assert calls == [False, True]
    key = lambda rows: {r["key"]: (r["lr_png"], r["json"]) for r in rows if r["row_type"] == "sample"}  # noqa: E731
    assert key(out_plain) == key(out_starts) and len(key(out_plain)) == 3
    assert all(r["x_start"] is None for r in out_starts)


def test_manifest_gpu_knobs_and_digest(tmp_path):
    from pipelines.manifest import ManifestError, manifest_digest, parse_manifest

    def parse(gen=None, compute=None):
        data = {
            "kind": "generate",
            "hr": {"uri": str(tmp_path)},
            "output": {"uri": str(tmp_path / "out")},
            "generator": {"kind": "bicubic", **(gen or {})},
            "compute": compute or {},
        }
        return parse_manifest(data)

    base = parse()
    assert base.generator.precision == "auto" and base.compute.starts_in_decode is True
    assert not base.generator.channels_last and not base.generator.compile
    assert manifest_digest(parse(compute={"starts_in_decode": False})) == manifest_digest(base)
    assert manifest_digest(parse({"precision": "auto"})) == manifest_digest(base)
    assert manifest_digest(parse({"precision": "bf16"})) != manifest_digest(base)
    assert manifest_digest(parse({"compile": True})) != manifest_digest(base)
    with pytest.raises(ManifestError, match="generator.precision"):
        parse({"precision": "fp8"})
