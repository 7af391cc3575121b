"""Networks and presets: shapes, LR-grid content maps, batch invariance, config round trips, gradients."""

from __future__ import annotations

import json

import pytest
import torch

from realdgen_core.config import PRESETS, RealDGenConfig, preset
from realdgen_core.models import (
    VQVAE,
    ConditionalUNet,
    ContentConfig,
    DegradationExtractor,
    ModulationNetwork,
    RealDGenModel,
    UNetConfig,
    build_model,
    modulate,
)

# CPU conv (oneDNN) and GEMM kernels pick batch-size-dependent blockings, so a sample inside a
# batch differs from the same sample alone by float rounding only; measured ~5e-6 at most on
# these tiny nets. Anything batch-coupled (BatchNorm, a batch-wide statistic) is off by >1e-2.
BATCH_ATOL = 5e-5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module", params=[2, 4], ids=["x2", "x4"])
def tiny(request) -> RealDGenModel:
    return build_model(preset("tiny", request.param)).eval()


def test_tiny_shapes(tiny: RealDGenModel) -> None:
    s = tiny.scale
    cfg = tiny.config
    g = _gen()
    hr = torch.rand(2, 3, 16 * s, 24 * s, generator=g)  # non-square on purpose
    lr = torch.rand(2, 3, 16, 24, generator=g)
    with torch.no_grad():
        content = tiny.content.encode(hr)
        assert content.shape == (2, cfg.content.z_channels, 16, 24)  # E_cont(HR) lives on the LR grid
        up = torch.nn.functional.interpolate(lr, scale_factor=s, mode="bicubic", align_corners=False)
        assert tiny.content.encode(up).shape == content.shape  # so does E_cont(bicubic_up(LR))
        z_q, vq_loss = tiny.content.quantize(content)
        assert z_q.shape == content.shape and vq_loss.ndim == 0 and vq_loss.item() >= 0
        # z_q holds codebook vectors only.
        codes = tiny.content.quantizer.codebook.weight
        idx = tiny.content.quantizer.indices(content)
        assert torch.allclose(z_q, codes[idx].permute(0, 3, 1, 2), atol=1e-6)
        # ... and each is the nearest code (brute force check of the argmin).
        flat = content.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
        d = ((flat[:, None, :] - codes[None]) ** 2).sum(-1)
        assert torch.allclose(d.gather(1, idx.reshape(-1, 1)).squeeze(1), d.min(dim=1).values, atol=1e-6)
        recon, _ = tiny.content(hr)
        assert recon.shape == hr.shape
        assert tiny.content.decode(content).shape == hr.shape

        deg = tiny.degradation(lr)
        assert deg.shape == (2, 2048)
        assert tiny.degradation(torch.rand(1, 3, 7, 13, generator=g)).shape == (1, 2048)  # any LR size

        c = tiny.condition(hr, lr)
        assert c.shape == (2, cfg.unet.cond_channels, 16, 24)
        rec_lr = tiny.reconstruct_lr(hr, lr)
        assert rec_lr.shape == lr.shape and rec_lr.min() >= 0 and rec_lr.max() <= 1

        eps = tiny.unet(torch.randn(2, 3, 16, 24, generator=g), c, torch.tensor([0, 499]))
        assert eps.shape == (2, 3, 16, 24) and torch.isfinite(eps).all()


def test_content_scale_matches_sr_scale() -> None:
    for s in (2, 4):
        for name in PRESETS:
            cfg = preset(name, s)
            assert cfg.content.scale == s and len(cfg.content.channel_mult) == s.bit_length()
    assert preset("paper", 2).content.channel_mult == (1, 2)  # paper 1-2-4 truncated for x2
    with pytest.raises(ValueError, match="content.channel_mult"):
        RealDGenConfig(**{**_fields(preset("tiny", 4)), "scale": 2})
    with pytest.raises(ValueError, match="multiple of the scale"):
        build_model(preset("tiny", 4)).content.encode(torch.rand(1, 3, 30, 32))


def _fields(cfg: RealDGenConfig) -> dict:
    return {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}


def test_unet_sizes_divisible_by_levels() -> None:
    cfg = UNetConfig(
        cond_channels=2,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        norm_groups=4,
    )
    unet = ConditionalUNet(cfg).eval()
    for h, w in [(4, 4), (12, 20), (8, 36)]:
        with torch.no_grad():
            out = unet(torch.randn(1, 3, h, w), torch.randn(1, 2, h, w), torch.tensor([7]))
        assert out.shape == (1, 3, h, w)
    with pytest.raises(ValueError, match="multiple of 4"):
        unet(torch.randn(1, 3, 6, 8), torch.randn(1, 2, 6, 8), torch.tensor([7]))


def test_timestep_and_condition_change_the_output() -> None:
    model = build_model(preset("tiny", 4)).eval()
    g = _gen(1)
    x = torch.randn(1, 3, 8, 8, generator=g)
    c = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        a = model.unet(x, c, torch.tensor([10]))
        assert not torch.allclose(a, model.unet(x, c, torch.tensor([400])), atol=1e-4)
        assert not torch.allclose(a, model.unet(x, c + 1.0, torch.tensor([10])), atol=1e-4)
        # The degradation vector changes the condition; the content map too.
        content = torch.randn(1, 3, 8, 8, generator=g)
        d1, d2 = torch.randn(2, 1, 2048, generator=g)
        assert not torch.allclose(model.modulation(content, d1), model.modulation(content, d2), atol=1e-4)


def test_per_sample_batch_invariance(tiny: RealDGenModel) -> None:
    """A sample's outputs alone and inside a batch agree: only per-sample normalisation is used."""
    s = tiny.scale
    g = _gen(2)
    n = 2
    hr = torch.rand(n, 3, 8 * s, 8 * s, generator=g)
    lr = torch.rand(n, 3, 8, 8, generator=g)
    x_t = torch.randn(n, 3, 8, 8, generator=g)
    t = torch.tensor([123, 499])

    def outputs(i: slice) -> list[torch.Tensor]:
        content = tiny.content.encode(hr[i])
        deg = tiny.degradation(lr[i])
        c = tiny.modulation(content, deg)
        recon = tiny.content.decode(tiny.content.quantize(content)[0])
        rec_lr = tiny.lr_reconstructor(content, deg)
        return [content, recon, deg, c, rec_lr, tiny.unet(x_t[i], c, t[i])]

    with torch.no_grad():
        batched = outputs(slice(0, n))
        for k in range(n):
            alone = outputs(slice(k, k + 1))
            for b, a in zip(batched, alone, strict=True):
                assert (b[k : k + 1] - a).abs().max().item() <= BATCH_ATOL
    # The quantiser's code choice is per sample (integers: exact).
    h = batched[0]
    idx = tiny.content.quantizer.indices(h)
    for k in range(n):
        assert torch.equal(idx[k : k + 1], tiny.content.quantizer.indices(h[k : k + 1]))


def test_batch_coupling_would_be_caught() -> None:
    """The tolerance above is tight enough to catch a batch-wide normalisation."""
    x = torch.rand(3, 4, 8, 8, generator=_gen(3))
    bn = torch.nn.BatchNorm2d(4).train()
    with torch.no_grad():
        assert (bn(x)[:1] - bn(x[:1])).abs().max().item() > BATCH_ATOL


def test_no_batchnorm_or_dropout_anywhere() -> None:
    for name in PRESETS:
        with torch.device("meta"):  # the paper preset too: built without memory or init cost
            model = RealDGenModel(preset(name, 4))
        for m in model.modules():
            assert not isinstance(m, torch.nn.modules.batchnorm._BatchNorm | torch.nn.Dropout), m


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("scale", [2, 4])
def test_config_round_trip_json(name: str, scale: int) -> None:
    cfg = preset(name, scale)
    back = RealDGenConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert isinstance(back.unet.channel_mult, tuple) and isinstance(back.content, ContentConfig)
    assert back.diffusion == cfg.diffusion


def test_config_rejects_bad_values() -> None:
    d = preset("tiny").to_dict()
    d["unet"]["not_a_key"] = 1
    with pytest.raises(ValueError, match="not_a_key"):
        RealDGenConfig.from_dict(d)
    d = preset("tiny").to_dict()
    d["modulation"]["out_channels"] = 5
    with pytest.raises(ValueError, match="modulation.out_channels"):
        RealDGenConfig.from_dict(d)
    with pytest.raises(ValueError, match="scale"):
        preset("tiny", 3)
    with pytest.raises(ValueError, match="preset"):
        preset("huge")  # type: ignore[arg-type]


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model(preset("tiny", 4))
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model(preset("tiny", 4))
    c = build_model(preset("tiny", 4), seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_gradients_reach_stage_c_trainables() -> None:
    """Stage C trains E_cont.first_block and E_deg.last_conv through the condition and the UNet."""
    model = build_model(preset("tiny", 4))
    g = _gen(4)
    hr = torch.rand(2, 3, 32, 32, generator=g)
    lr = torch.rand(2, 3, 8, 8, generator=g)
    c = model.condition(hr, lr)
    eps = model.unet(torch.randn(2, 3, 8, 8, generator=g), c, torch.tensor([3, 300]))
    eps.pow(2).mean().backward()
    for module in (model.content.first_block, model.degradation.last_conv, model.modulation, model.unet):
        grads = [p.grad for p in module.parameters()]
        assert grads and all(gr is not None for gr in grads)
        assert sum(gr.abs().sum().item() for gr in grads) > 0
    # first_block / last_conv are real submodules (named parameters a trainer can select).
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].startswith("content.encoder.first_block.")
        for p in model.content.first_block.parameters()
    )
    assert {names[id(p)] for p in model.degradation.last_conv.parameters()} == {
        "degradation.mapping.3.weight",
        "degradation.mapping.3.bias",
    }
    # The decoder is untouched by the diffusion loss.
    assert all(p.grad is None for p in model.content.decoder.parameters())


def test_vq_straight_through_and_losses() -> None:
    vq = VQVAE(
        ContentConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, codebook_size=16, norm_groups=4)
    )
    x = torch.rand(2, 3, 16, 16, generator=_gen(5))
    recon, vq_loss = vq(x)
    loss = (recon - x).pow(2).mean() + vq_loss
    loss.backward()
    assert vq.first_block.conv_in.weight.grad.abs().sum() > 0  # through the straight-through estimator
    assert vq.quantizer.codebook.weight.grad.abs().sum() > 0  # codebook loss


def test_degradation_extractor_and_modulation_helpers() -> None:
    cfg = preset("tiny", 4)
    e = DegradationExtractor(cfg.degradation)
    assert len(e.blocks) == 16 and len(e.mapping) == 4 and e.last_conv.out_channels == 2048
    m = ModulationNetwork(cfg.modulation)
    assert len(m.layers) == 4
    x = torch.randn(1, 2, 3, 3)
    y = modulate(x, torch.tensor([[1.0, -1.0]]), torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(y[0, 0], x[0, 0] + 1) and torch.allclose(y[0, 1], 2 * x[0, 1] - 1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_preset_sizes() -> None:
    tiny = build_model(preset("tiny", 4))
    assert _count(tiny) < 300_000
    small = build_model(preset("small", 4))
    assert 0.7e6 < _count(small.unet) < 1.5e6
    assert _count(small) * 4 < 20e6  # float32 checkpoint under 20 MB
    # paper: instantiate only to count (meta device: no memory, no init cost).
    with torch.device("meta"):
        paper = RealDGenModel(preset("paper", 4))
    assert 50e6 < _count(paper.content) < 60e6  # LDM f4 VQ autoencoder is ~55 M
    assert 80e6 < _count(paper.unet) < 130e6
    enc_levels = paper.content.config.channel_mult
    assert enc_levels == (1, 2, 4) and paper.content.config.codebook_size == 8192
    assert paper.degradation.config.feature_channels == 64 and len(paper.degradation.blocks) == 16
