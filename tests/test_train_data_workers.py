"""Batches built ahead in DataLoader worker processes are the bytes built in-process (a batch depends on
its step alone), a run with workers ends with the same weights, the loss never forces a host sync
(``train_step`` returns tensors), bf16 autocast trains, and ``compute.device: cuda`` without a GPU is a
clear manifest error."""

from __future__ import annotations

import pytest
import torch

from pipelines.train import main as train_main
from realdgen_core.config import preset
from realdgen_core.models import build_model
from realdgen_core.train import (
    ArrayCropSampler,
    DegradationStageConfig,
    DegradationTrain,
    DiffusionStageConfig,
    DiffusionTrain,
    SyntheticLRSampler,
    run_phase,
)
from realdgen_core.train.loop import step_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stage_b(photos, workers: int, seed: int = 5) -> DegradationTrain:
    hr = ArrayCropSampler(list(photos.values()))
    cfg = DegradationStageConfig(steps=4, batch_size=2, lr_crop=16, kinds=("realesrgan", "bsrgan"))
    return DegradationTrain(build_model(preset("tiny", 4), seed=0), cfg, hr, seed=seed, data_workers=workers)


def test_worker_batches_are_the_in_process_bytes(photos):
    phase = _stage_b(photos, workers=0)
    fn = phase.batch_fn()
    here = list(step_batches(fn, 5, phase.name, 0, range(1, 4), workers=0, pin=False))
    ahead = list(step_batches(fn, 5, phase.name, 0, range(1, 4), workers=2, pin=False))
    assert len(here) == len(ahead) == 3
    for a, b in zip(here, ahead, strict=True):
        assert len(a) == 5  # anchors, positives, negatives, their HR
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    # a batch depends on its step (and seed), not on what was drawn before it
    assert not torch.equal(here[0][0], here[1][0])
    assert torch.equal(phase.batch(2)[0], here[1][0])
    other_seed = list(step_batches(fn, 6, phase.name, 0, range(1, 2), workers=0, pin=False))
    assert not torch.equal(other_seed[0][0], here[0][0])


def test_training_with_workers_ends_with_the_same_weights(photos):
    a, b = _stage_b(photos, workers=0), _stage_b(photos, workers=2)
    run_phase(a)
    run_phase(b)
    assert a.step == b.step == 4 and b._batches is None  # workers stopped at the end
    sa, sb = a.model.state_dict(), b.model.state_dict()
    changed = [
        k for k in sa if not torch.equal(sa[k], build_model(preset("tiny", 4), seed=0).state_dict()[k])
    ]
    assert changed, "training changed no weight"
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_train_step_returns_tensors_and_bf16_trains(photos):
    hr = ArrayCropSampler(list(photos.values()))
    lr = SyntheticLRSampler(hr, ("realesrgan",), 4)
    cfg = DiffusionStageConfig(steps=3, batch_size=2, lr_crop=16, lr=1e-3)
    fp32 = DiffusionTrain(build_model(preset("tiny", 4), seed=0), cfg, lr, seed=1)
    bf16 = DiffusionTrain(build_model(preset("tiny", 4), seed=0), cfg, lr, seed=1, precision="bf16")
    l32, l16 = fp32.train_step(), bf16.train_step()
    assert all(isinstance(v, torch.Tensor) and v.requires_grad is False for v in l16.values())
    assert set(l16) == {"loss", "grad_norm"}
    x, y = float(l32["loss"]), float(l16["loss"])
    assert x > 0 and torch.isfinite(torch.tensor(y))
    assert y != x and abs(y - x) / x < 0.2  # bf16 rounding: close to the fp32 loss, not equal
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # weights stay fp32
    with pytest.raises(ValueError, match="precision"):
        DiffusionTrain(build_model(preset("tiny", 4), seed=0), cfg, lr, precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_device_without_gpu_is_a_manifest_error(capsys):
    rc = train_main(["manifests/train_tiny.yaml", "--set", "compute.device=cuda"])
    assert rc == 2
    assert "compute.device is 'cuda' but torch sees no CUDA GPU" in capsys.readouterr().err


def test_source_sampler_cache_is_bounded_by_bytes_and_crops_do_not_depend_on_it(
    photos, tmp_path, monkeypatch
):
    """Decoded images are cached as uint8 under a count and a byte bound; what is evicted is decoded
    again, so the crops are the same whatever the bounds (and equal to float32 decoding's values)."""
    import numpy as np
    from PIL import Image

    from pipelines import train as T
    from pipelines.manifest import SourceSpec
    from pipelines.sources import list_source

    for name, img in photos.items():
        Image.fromarray(np.ascontiguousarray(img[:96, :96])).save(tmp_path / f"{name}.png")
    items = list_source(SourceSpec(uri=str(tmp_path)))
    big = T.SourceCropSampler(items, None, 512, 10**8, "big")
    want = big(12, 32, torch.Generator().manual_seed(4))
    assert len(big.cache) >= 3 and big.cache_bytes == len(big.cache) * 3 * 96 * 96
    assert all(t.dtype == torch.uint8 for t in big.cache.values())
    monkeypatch.setattr(T, "CACHE_MAX_BYTES", 2 * 3 * 96 * 96)  # room for two images
    small = T.SourceCropSampler(items, None, 512, 10**8, "small")
    got = small(12, 32, torch.Generator().manual_seed(4))
    assert len(small.cache) == 2 and small.cache_bytes == 2 * 3 * 96 * 96
    assert torch.equal(got, want) and got.dtype == torch.float32
    # the values are those of the float decode: uint8 / 255
    assert torch.equal(got * 255, (got * 255).round())
