"""Each training stage lowers its loss on a fixed evaluation batch (tiny preset, CPU, seeded)."""

from __future__ import annotations

import pytest
import torch

from realdgen_core.config import preset
from realdgen_core.diffusion import GaussianDiffusion
from realdgen_core.models import build_model
from realdgen_core.train import (
    ArrayCropSampler,
    ContentFinetune,
    ContentPretrain,
    ContentStageConfig,
    DegradationStageConfig,
    DegradationTrain,
    DiffusionStageConfig,
    DiffusionTrain,
    SyntheticLRSampler,
    run_phase,
)
from realdgen_core.train.data import bicubic_up, child_generators, degrade_mixed
from realdgen_core.train.degradation import triplet_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def model():
    return build_model(preset("tiny", 4), seed=0)


@pytest.fixture()
def hr(photos):
    return ArrayCropSampler(list(photos.values()))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_stage_a_vq_pretrain_loss_falls(model, hr):
    cfg = ContentStageConfig(pretrain_steps=40, finetune_steps=0, batch_size=4, hr_crop=32, lr=2e-3)
    batch = hr(8, 32, _gen(123))

    @torch.no_grad()
    def rec_loss() -> float:
        recon, _ = model.content(batch)
        return float(torch.mean((recon - batch) ** 2))

    before = rec_loss()
    run_phase(ContentPretrain(model, cfg, hr, seed=0))
    after = rec_loss()
    assert after < 0.7 * before, (before, after)


def test_stage_a_encoder_finetune_loss_falls_and_decoder_is_frozen(model, hr):
    run_phase(
        ContentPretrain(model, ContentStageConfig(pretrain_steps=200, batch_size=4, hr_crop=32, lr=3e-3), hr)
    )
    cfg = ContentStageConfig(pretrain_steps=0, finetune_steps=100, batch_size=4, hr_crop=32, finetune_lr=3e-3)
    clean = hr(6, 32, _gen(7))
    lr, _ = degrade_mixed(clean, ["realesrgan", "bsrgan"] * 3, 4, child_generators(_gen(8), 6))
    up = bicubic_up(lr, 4)

    @torch.no_grad()
    def rec_loss() -> float:
        z_q, _ = model.content.quantize(model.content.encode(up))
        return float(torch.mean((model.content.decode(z_q) - clean) ** 2))

    decoder = {k: v.clone() for k, v in model.content.decoder.state_dict().items()}
    codebook = model.content.quantizer.codebook.weight.detach().clone()
    before = rec_loss()
    run_phase(ContentFinetune(model, cfg, hr, seed=0))
    after = rec_loss()
    # The frozen decoder bounds what the encoder alone can gain in 100 tiny steps (~8% measured);
    # a phase that trains nothing would leave the loss exactly equal.
    assert after < 0.98 * before, (before, after)
    for k, v in model.content.decoder.state_dict().items():
        assert torch.equal(v, decoder[k]), f"decoder tensor {k} changed"
    assert torch.equal(model.content.quantizer.codebook.weight, codebook)


def test_stage_b_triplet_and_reconstruction_fall(model, hr):
    cfg = DegradationStageConfig(steps=30, batch_size=4, lr_crop=8, lr=1e-3)
    fixed = triplet_batch(hr, DegradationStageConfig(batch_size=6, lr_crop=8), 4, _gen(99))
    phase = DegradationTrain(model, cfg, hr, seed=0)
    content_before = {k: v.clone() for k, v in model.content.state_dict().items()}

    @torch.no_grad()
    def losses() -> tuple[float, float]:
        out = phase.loss_module(*fixed)
        return float(out["triplet"]), float(out["rec_lr"])

    t0, r0 = losses()
    run_phase(phase)
    t1, r1 = losses()
    assert t1 + r1 < 0.8 * (t0 + r0), ((t0, r0), (t1, r1))
    assert r1 < r0
    for k, v in model.content.state_dict().items():
        assert torch.equal(v, content_before[k]), f"E_cont tensor {k} changed in stage B"


def test_stage_c_diffusion_loss_falls_with_partial_finetuning(model, hr):
    lr_sampler = SyntheticLRSampler(hr, ("realesrgan", "bsrgan"), 4)
    cfg = DiffusionStageConfig(steps=40, batch_size=4, lr_crop=16, lr=2e-3)
    fixed = lr_sampler(8, 16, _gen(5))
    diffusion = GaussianDiffusion(model.config.diffusion)
    frozen_mid = model.content.encoder.mid.block1.conv1.weight.detach().clone()
    last_conv = model.degradation.last_conv.weight.detach().clone()
    first_block = model.content.first_block.conv_in.weight.detach().clone()

    @torch.no_grad()
    def loss() -> float:
        c = model.condition(bicubic_up(fixed, 4), fixed)
        # Same t and noise every time: the average over 4 draws of a fixed generator.
        return (
            sum(
                float(diffusion.training_loss(lambda x, t: model.unet(x, c, t), fixed * 2 - 1, _gen(s)))
                for s in range(4)
            )
            / 4
        )

    before = loss()
    phase = DiffusionTrain(model, cfg, lr_sampler, seed=0)
    run_phase(phase)
    after = loss()  # the UNet now holds the EMA weights (finalize)
    assert after < 0.85 * before, (before, after)
    assert torch.equal(model.content.encoder.mid.block1.conv1.weight, frozen_mid)  # frozen part of E_cont
    assert not torch.equal(model.degradation.last_conv.weight, last_conv)  # fine-tuned at 1e-6
    assert not torch.equal(model.content.first_block.conv_in.weight, first_block)
    assert (model.degradation.last_conv.weight - last_conv).abs().max() < 1e-3  # tiny lr, tiny change
    lrs = sorted(g["lr"] for g in phase.optimizer.param_groups)
    assert lrs == [1e-6, 2e-3]


def test_stage_b_hard_negatives_are_the_anchors_theta_with_one_level_moved(hr):
    """``hard_negatives``: a negative is D(X, near_theta(θ)) of its own anchor's θ, not a fresh θ."""
    from realdgen_core import degrade as D
    from realdgen_core.train.data import draw_kinds

    b, n, s = 4, 3, 4
    easy = DegradationStageConfig(batch_size=b, lr_crop=8, kinds=("codec",))
    hard = DegradationStageConfig(batch_size=b, lr_crop=8, kinds=("codec",), hard_negatives=1.0)
    lr_a, lr_p, lr_n, hr_a, hr_p = triplet_batch(hr, hard, s, _gen(7))
    e_a, e_p, e_n, e_ha, e_hp = triplet_batch(hr, easy, s, _gen(7))
    # everything drawn before the negatives is the same with or without hard negatives
    for x, y in ((lr_a, e_a), (lr_p, e_p), (hr_a, e_ha), (hr_p, e_hp)):
        assert torch.equal(x, y)
    # rebuild the draws by hand: each negative is its anchor's θ with one level moved, on its content
    g = _gen(7)
    hr_a2, _ = hr(b, 8 * s, g), hr(b * n, 8 * s, g)
    _, th_a = degrade_mixed(hr_a2, draw_kinds(("codec",), b, g), s, child_generators(g, b))
    draw_kinds(("codec",), b * n, g), child_generators(g, b * n)
    assert bool((torch.rand(b * n, generator=g) < 1.0).all())
    near = [D.near_theta(th_a[j // n], g) for j in range(b * n)]
    assert all(t is not None for t in near)  # these codec draws all have a level to move
    expected = D.apply(hr_a.repeat_interleave(n, 0), near)
    assert torch.equal(lr_n, expected)
    # and they are closer to their anchors than fresh-θ negatives of the same content
    gap = lambda neg: float((neg - lr_a.repeat_interleave(n, 0)).abs().mean())  # noqa: E731
    assert gap(lr_n) < gap(e_n), (gap(lr_n), gap(e_n))
    assert not torch.equal(lr_n, lr_a.repeat_interleave(n, 0))
