"""The fast (strided DDIM) sampler through LRGenerator, the manifest and the GenerateLR stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from realdgen_core.config import preset
from realdgen_core.diffusion import SamplerConfig
from realdgen_core.generator import LRGenerator
from realdgen_core.models import build_model


@pytest.fixture(scope="module")
def model4():
    return build_model(preset("tiny", 4), seed=0)


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


class _CountRows:
    """Wraps the UNet's forward to count calls and rows."""

    def __init__(self, unet):
        self.unet, self.calls, self.rows = unet, 0, 0
        self._orig = unet.forward

    def __enter__(self):
        def fwd(x, c, t):
            self.calls += 1
            self.rows += x.shape[0]
            return self._orig(x, c, t)

        self.unet.forward = fwd
        return self

    def __exit__(self, *exc):
        self.unet.forward = self._orig


def test_ddim_generator_makes_far_fewer_unet_calls(model4):
    hr, refs = _images(3, 32, 1), _images(3, 16, 2)
    seeds = [5, 6, 7]
    anc = LRGenerator(model4)
    fast = LRGenerator(model4, sampler=SamplerConfig("ddim", steps=6))
    with _CountRows(model4.unet) as ca:
        ra = anc.generate(hr, refs, k=4, tau_range=(0, 300), seeds=seeds)
    with _CountRows(model4.unet) as cf:
        rf = fast.generate(hr, refs, k=4, tau_range=(0, 300), seeds=seeds)
    # Same τ and θ draws (they come before any sampling noise) ...
    assert torch.equal(ra.tau, rf.tau) and ra.thetas == rf.thetas
    # ... ancestral: per sample max τ + 1 calls and Σ(τ+1) rows; ddim: ≤ 6 calls per sample.
    assert ca.calls == int((ra.tau.max(1).values + 1).sum()) and ca.rows == int((ra.tau + 1).sum())
    assert cf.calls <= 6 * 3 and cf.rows == int(torch.clamp(rf.tau + 1, max=6).sum())
    assert ca.rows / cf.rows > 10
    assert rf.lr.shape == ra.lr.shape and torch.equal(rf.lr, torch.round(rf.lr * 255) / 255)
    assert not torch.equal(rf.lr, ra.lr)


def test_ddim_sample_alone_equals_sample_in_batch(model4):
    hr, refs = _images(4, 32, 3), _images(4, 16, 4)
    seeds = [11, 12, 13, 14]
    gen = LRGenerator(model4, sampler="ddim")
    full = gen.generate(hr, refs, k=3, tau_range=(0, 300), seeds=seeds, return_candidates=True)
    alone = gen.generate(hr[2:3], refs[2:3], k=3, tau_range=(0, 300), seeds=[13], return_candidates=True)
    assert torch.equal(alone.candidates[0], full.candidates[2]) and torch.equal(alone.lr[0], full.lr[2])
    # eta = 1 keeps the k candidates of a sample distinct.
    c = full.candidates[0]
    assert all(not torch.equal(c[i], c[j]) for i in range(3) for j in range(i + 1, 3))


def test_ddim_with_a_full_grid_matches_ancestral_bytes(model4):
    """steps ≥ τ+1, eta = 1 is the ancestral sampler up to float rounding (same draws)."""
    hr, refs = _images(2, 32, 5), _images(2, 16, 6)
    a = LRGenerator(model4).generate(hr, refs, k=2, tau_range=(0, 20), seeds=[1, 2], return_candidates=True)
    d = LRGenerator(model4, sampler=SamplerConfig("ddim", steps=1000)).generate(
        hr, refs, k=2, tau_range=(0, 20), seeds=[1, 2], return_candidates=True
    )
    diff = (a.candidates - d.candidates).abs() * 255
    assert diff.max() <= 1.0 and (diff > 0).float().mean() < 0.01


def test_manifest_sampler_keys_and_digest(tmp_path):
    from pipelines.manifest import ManifestError, manifest_digest, parse_manifest

    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(b"x")

    def parse(**gen):
        data = {
            "kind": "generate",
            "hr": {"uri": str(tmp_path)},
            "output": {"uri": str(tmp_path / "out")},
            "generator": {"kind": "bicubic", **gen},
        }
        return parse_manifest(data)

    base = parse()
    # unset: the calibration's sampler, else (here) the paper's
    assert base.generator.sampler is None and base.generator.sampler_config() == SamplerConfig()
    assert base.generator.resolved(None).sampler == "ancestral"
    assert manifest_digest(base) == manifest_digest(parse(sampler="ancestral"))
    fast = parse(sampler="ddim", sampler_steps=8, sampler_eta=0.5)
    assert fast.generator.sampler_config() == SamplerConfig("ddim", 8, 0.5)
    # Ancestral digests do not see the ddim-only knobs (and stay those of older manifests).
    assert manifest_digest(parse(sampler_steps=3)) == manifest_digest(base)
    assert manifest_digest(fast) != manifest_digest(base)
    assert manifest_digest(fast) != manifest_digest(parse(sampler="ddim", sampler_steps=9, sampler_eta=0.5))
    with pytest.raises(ManifestError, match="generator.sampler"):
        parse(sampler="euler")
    with pytest.raises(ManifestError, match="sampler_steps"):
        parse(sampler="ddim", sampler_steps=0)


def test_generate_stage_passes_the_sampler(tmp_path, model4):
    from pipelines.generate.stages import GenerateLR
    from realdgen_core.checkpoint import save_checkpoint

    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, model4)
    hr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    bank = np.random.default_rng(1).random((1, model4.config.degradation.out_dim)).astype(np.float32)
    cfg = {
        "kind": "realdgen",
        "scale": 4,
        "checkpoint": str(path),
        "k": 2,
        "tau_min": 0,
        "tau_max": 300,
        "weights": (1.0, 1.0),
        "start_kind": "realesrgan",
        "ref_bank": bank,
        "sampler": {"kind": "ddim", "steps": 4, "eta": 1.0},
    }
    stage = GenerateLR(cfg)
    assert stage.generator.sampler == SamplerConfig("ddim", 4, 1.0)
    row = {"row_type": "sample", "status": "ok", "hr": hr.tobytes(), "tile_hr": 32, "seed": 3, "ref_index": 0}
    with _CountRows(stage.generator.model.unet) as cnt:
        out = stage([dict(row)]).to_pylist()[0]
    assert out["status"] == "ok" and len(out["lr"]) == 8 * 8 * 3
    assert cnt.calls <= 4
    # The row holds the kept candidate of the same call made directly, with its own τ and errors
    # (not candidate 0's): the seed, the reference and the sampler reached the generator.
    x = torch.from_numpy(hr.copy()).permute(2, 0, 1)[None].float().div(255.0)
    res = stage.generator.generate(
        x, k=2, tau_range=(0, 300), seeds=[3], ref_embeddings=torch.from_numpy(bank), start_kind="realesrgan"
    )
    j = int(res.kept[0])
    want = res.lr[0].mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(np.frombuffer(out["lr"], np.uint8).reshape(8, 8, 3), want)
    assert out["tau"] == int(res.tau[0, j]) and out["k"] == 2
    assert out["content_error"] == pytest.approx(float(res.content_errors[0, j]), rel=1e-6)
    assert out["degradation_error"] == pytest.approx(float(res.degradation_errors[0, j]), rel=1e-6)
    assert res.tau[0, 0] != res.tau[0, 1] or res.content_errors[0, 0] != res.content_errors[0, 1]
