"""Diffusion maths: schedule values, q_sample, training-loss timestep range, per-row τ sampling."""

from __future__ import annotations

import math

import pytest
import torch

from realdgen_core.diffusion import DiffusionConfig, GaussianDiffusion, Sampler, SamplerConfig


def _gens(seeds):
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def test_schedule_matches_closed_form_and_is_monotone():
    cfg = DiffusionConfig()
    d = GaussianDiffusion(cfg)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert d.betas.dtype == torch.float64
    torch.testing.assert_close(d.alphas_cumprod, torch.cumprod(1 - betas, 0), rtol=0, atol=1e-15)
    assert torch.all(d.alphas_cumprod[1:] < d.alphas_cumprod[:-1])
    # Hand values: ᾱ_0 = 1 − β_0; ᾱ_1 = (1 − β_0)(1 − β_1).
    b1 = 1e-4 + (0.02 - 1e-4) / 999
    assert d.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, abs=1e-15)
    assert d.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - b1), abs=1e-15)
    # Posterior variance: β̃_0 = 0, β̃_t < β_t for t > 0.
    assert d.posterior_variance[0].item() == 0.0
    assert torch.all(d.posterior_variance[1:] < d.betas[1:])
    # Known magnitude: ᾱ at index 299 of the standard linear schedule ≈ 0.4 (well inside (0, 1)).
    assert 0.3 < d.alphas_cumprod[299].item() < 0.5


def test_config_validation_and_roundtrip():
    cfg = DiffusionConfig(num_timesteps=50, max_train_timestep=20, tau_max=10)
    assert DiffusionConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="max_train_timestep"):
        GaussianDiffusion(DiffusionConfig(num_timesteps=10, max_train_timestep=11, tau_max=5))
    with pytest.raises(ValueError, match="tau"):
        GaussianDiffusion(DiffusionConfig(num_timesteps=10, max_train_timestep=5, tau_max=10))
    # τ at or past the last trained timestep would run the UNet where it never learned anything
    with pytest.raises(ValueError, match="tau_max < max_train_timestep=5"):
        GaussianDiffusion(DiffusionConfig(num_timesteps=10, max_train_timestep=5, tau_max=5))
    GaussianDiffusion(DiffusionConfig(num_timesteps=10, max_train_timestep=5, tau_max=4))


def test_q_sample_endpoints():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 8, 8, generator=g)
    x = d.q_sample(x0, torch.zeros(3, dtype=torch.long), noise)
    torch.testing.assert_close(x, x0, atol=0.0101 * noise.abs().max().item() + 1e-4, rtol=0)  # √(1−ᾱ_0)=0.01
    t = torch.tensor([0, 500, 999])
    x = d.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        ab = d.alphas_cumprod[ti].item()
        torch.testing.assert_close(x[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i])
    with pytest.raises(ValueError, match="0-based"):
        d.q_sample(x0, torch.tensor([0, 1, 1000]), noise)


def test_training_loss_draws_t_below_max_train_timestep_and_is_eps_mse():
    d = GaussianDiffusion(DiffusionConfig(num_timesteps=100, max_train_timestep=7, tau_max=5))
    seen = []

    def eps_fn(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    x0 = torch.zeros(64, 3, 4, 4)
    losses = [d.training_loss(eps_fn, x0, torch.Generator().manual_seed(s)) for s in range(8)]
    ts = torch.cat(seen)
    assert int(ts.min()) == 0 and int(ts.max()) == 6  # covers the range, never reaches 7
    assert ts.dtype == torch.long
    # ε̂ = 0 ⇒ loss = E[ε²] ≈ 1; identical generators ⇒ identical loss.
    assert all(0.8 < loss.item() < 1.2 for loss in losses)
    again = d.training_loss(eps_fn, x0, torch.Generator().manual_seed(3))
    assert again.item() == losses[3].item()

    # An oracle eps_fn that knows the noise gets zero loss: recover ε from x_t since x0 = 0.
    def oracle(x_t, t):
        return x_t / d.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1)

    assert d.training_loss(oracle, x0, torch.Generator().manual_seed(1)).item() < 1e-10


def test_tau_zero_runs_exactly_one_step_and_tau_counts_steps():
    d = GaussianDiffusion()
    calls = []

    def eps_fn(x_t, t):
        calls.append(t.tolist())
        return torch.zeros_like(x_t)

    x = torch.zeros(3, 3, 4, 4)
    d.sample(eps_fn, x, torch.tensor([0, 2, 5]), _gens([1, 2, 3]))
    # Steps are t = 5..0: the τ=0 row takes part only in the last call, τ=2 in the last three.
    assert [len(c) for c in calls] == [1, 1, 1, 2, 2, 3]
    assert calls[0] == [5] and calls[-1] == [0, 0, 0]


def test_tau_zero_step_is_the_deterministic_posterior_mean():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(5)
    x_start = torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    eps_hat = torch.randn(1, 3, 4, 4, generator=g)
    out = d.sample(lambda x, t: eps_hat, x_start, torch.tensor([0]), _gens([9]))
    # Reproduce by hand: x_0' = √ᾱ_0 x + √(1−ᾱ_0) ε with ε the first draw of the generator.
    eps = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(9))
    ab, b = d.alphas_cumprod[0].item(), d.betas[0].item()
    x_tau = math.sqrt(ab) * x_start + math.sqrt(1 - ab) * eps
    expect = (x_tau - b / math.sqrt(1 - ab) * eps_hat) / math.sqrt(1 - b)
    torch.testing.assert_close(out, expect)


def _conv_eps(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 6, 3, 3, generator=g) * 0.2

    def eps_fn(x_t, t, c):
        h = torch.cat([x_t, c], 1)
        return torch.nn.functional.conv2d(h, w, padding=1) * (1 + t.float().view(-1, 1, 1, 1) / 1000)

    return eps_fn


@pytest.mark.parametrize("grouped", [False, True])
def test_per_row_results_independent_of_batch(grouped):
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(11)
    n = 6
    x_start = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.rand(n, 3, 8, 8, generator=g)
    tau = torch.tensor([0, 7, 3, 12, 7, 1])
    seeds = [100 + i for i in range(n)]
    eps_fn = _conv_eps()
    groups = [[i] for i in range(n)] if grouped else None
    batch = d.sample(eps_fn, x_start, tau, _gens(seeds), cond={"c": cond}, row_groups=groups)
    for i in range(n):
        alone = d.sample(
            eps_fn, x_start[i : i + 1], tau[i : i + 1], _gens([seeds[i]]), cond={"c": cond[i : i + 1]}
        )
        if grouped:
            assert torch.equal(alone[0], batch[i])
        else:
            torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)
    # Different τ or seed changes the result; same inputs reproduce it exactly.
    again = d.sample(eps_fn, x_start, tau, _gens(seeds), cond={"c": cond}, row_groups=groups)
    assert torch.equal(again, batch)
    other = d.sample(eps_fn, x_start, tau, _gens([s + 1 for s in seeds]), cond={"c": cond}, row_groups=groups)
    assert not torch.allclose(other, batch)


def test_shared_generator_rows_depend_only_on_their_group():
    """The k candidates of one sample share a generator; other samples must not disturb them."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(3)
    x_start = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.rand(4, 3, 8, 8, generator=g)
    tau = torch.tensor([4, 2, 9, 0])
    eps_fn = _conv_eps(1)
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    both = d.sample(eps_fn, x_start, tau, [ga, ga, gb, gb], cond={"c": cond}, row_groups=[[0, 1], [2, 3]])
    ga2 = torch.Generator().manual_seed(1)
    first = d.sample(eps_fn, x_start[:2], tau[:2], [ga2, ga2], cond={"c": cond[:2]})
    assert torch.equal(first, both[:2])


def test_sample_validates_inputs():
    d = GaussianDiffusion()
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="one generator per row"):
        d.sample(lambda x, t: x, x, torch.tensor([1, 2]), _gens([1]))
    with pytest.raises(ValueError, match="tau"):
        d.sample(lambda x, t: x, x, torch.tensor([1, 1000]), _gens([1, 2]))
    with pytest.raises(ValueError):
        d.sample(lambda x, t: x, x, torch.tensor([1, 2]), _gens([1, 2]), sampler="euler")
    assert Sampler("ancestral") is Sampler.ANCESTRAL and Sampler("ddim") is Sampler.DDIM


# ---------------------------------------------------------------------------------- DDIM (strided)


def test_ddim_grid_starts_at_tau_ends_at_zero_and_bounds_calls():
    spec = SamplerConfig("ddim", steps=10)
    for tau in (0, 1, 5, 9, 10, 11, 150, 300, 999):
        grid = spec.timesteps(tau)
        assert grid[0] == tau and grid[-1] == 0
        assert len(grid) == min(10, tau + 1)
        assert all(a > b for a, b in zip(grid, grid[1:], strict=False))
    assert spec.timesteps(300) == [300, 267, 233, 200, 167, 133, 100, 67, 33, 0]
    assert SamplerConfig().timesteps(3) == [3, 2, 1, 0]  # ancestral: every step
    assert SamplerConfig.from_dict(spec.to_dict()) == spec
    assert SamplerConfig.of("ddim") == SamplerConfig("ddim") and SamplerConfig.of(spec) is spec


def test_sampler_config_validation_names_the_value():
    with pytest.raises(ValueError, match="'euler'"):
        SamplerConfig("euler")
    with pytest.raises(ValueError, match="steps .* got 0"):
        SamplerConfig("ddim", steps=0)
    with pytest.raises(ValueError, match="eta .* got 1.5"):
        SamplerConfig("ddim", eta=1.5)


def test_ddim_counts_calls_per_row_and_mixes_t_in_one_call():
    d = GaussianDiffusion()
    calls = []

    def eps_fn(x_t, t):
        calls.append(t.tolist())
        return torch.zeros_like(x_t)

    tau = torch.tensor([0, 300, 20, 150])
    d.sample(
        eps_fn, torch.zeros(4, 3, 4, 4), tau, _gens([1, 2, 3, 4]), sampler=SamplerConfig("ddim", steps=5)
    )
    assert len(calls) == 5  # ancestral would make 301
    assert sum(len(c) for c in calls) == 1 + 5 + 5 + 5
    assert calls[0] == [300, 20, 150]  # three rows at three different t share the first call
    assert calls[-1] == [0, 0, 0, 0]


def test_ddim_full_grid_eta1_is_the_ancestral_sampler():
    """steps ≥ τ+1 and eta = 1: DDIM's update is DDPM's posterior step with the same draws."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(4)
    x_start = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.rand(5, 3, 8, 8, generator=g)
    tau = torch.tensor([0, 3, 40, 17, 40])
    eps_fn = _conv_eps(2)
    gens_a = _gens([1, 1, 2, 3, 3])
    gens_a = [gens_a[0], gens_a[0], gens_a[2], gens_a[3], gens_a[3]]  # rows 0-1 and 3-4 share one
    gens_b = _gens([1, 1, 2, 3, 3])
    gens_b = [gens_b[0], gens_b[0], gens_b[2], gens_b[3], gens_b[3]]
    anc = d.sample(eps_fn, x_start, tau, gens_a, cond={"c": cond})
    ddim = d.sample(eps_fn, x_start, tau, gens_b, cond={"c": cond}, sampler=SamplerConfig("ddim", steps=1000))
    torch.testing.assert_close(ddim, anc, atol=2e-5, rtol=0)
    # A coarse grid is a different sampler (not silently the ancestral one).
    coarse = d.sample(eps_fn, x_start, tau, _gens([1, 1, 2, 3, 3]), cond={"c": cond}, sampler="ddim")
    assert (coarse[2] - anc[2]).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_ddim_with_the_true_noise_recovers_x0(eta, steps):
    """With the exact ε of a known x0 every step's x̂0 is x0, so any grid and any eta lands on x0;
    wrong coefficients (or a wrong ᾱ at a grid point) do not."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1

    def eps_fn(x_t, t, x0_rows):
        ab = d.alphas_cumprod[t.cpu()].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x0_rows) / (1 - ab).sqrt()

    tau = torch.tensor([300, 57, 999])
    spec = SamplerConfig("ddim", steps=steps, eta=eta)
    out = d.sample(eps_fn, x0, tau, _gens([1, 2, 3]), cond={"x0_rows": x0}, sampler=spec)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)


@pytest.mark.parametrize("steps", [2, 5])
def test_ddim_eta0_with_the_true_noise_stays_on_the_forward_trajectory(steps):
    """eta = 0 and a model that returns the x_τ's own noise n: every x_t the model is handed must be
    √ᾱ_t·x0 + √(1−ᾱ_t)·n exactly (the DDIM update's coefficients at each grid point; the final x0
    alone would not show a wrong one)."""
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(9)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    rid = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 8, 8).contiguous()
    noise: dict[int, torch.Tensor] = {}
    seen: list[int] = []

    def eps_fn(x_t, t, x0_rows, rows):
        ab = d.alphas_cumprod[t.cpu()].to(x_t.dtype).view(-1, 1, 1, 1)
        out = torch.empty_like(x_t)
        for i, r in enumerate(rows[:, 0, 0, 0].long().tolist()):
            if r not in noise:  # the first call of a row is at its τ: keep the noise it was started with
                noise[r] = (x_t[i] - ab[i].sqrt() * x0_rows[i]) / (1 - ab[i]).sqrt()
            else:
                want = ab[i].sqrt() * x0_rows[i] + (1 - ab[i]).sqrt() * noise[r]
                torch.testing.assert_close(x_t[i], want, atol=1e-4, rtol=0)
                seen.append(r)
            out[i] = noise[r]
        return out

    tau = torch.tensor([300, 57, 999])
    spec = SamplerConfig("ddim", steps=steps, eta=0.0)
    out = d.sample(eps_fn, x0, tau, _gens([1, 2, 3]), cond={"x0_rows": x0, "rows": rid}, sampler=spec)
    torch.testing.assert_close(out, x0, atol=2e-4, rtol=0)
    assert sorted(set(seen)) == [0, 1, 2] and len(seen) >= 3 * (steps - 1)


def test_ddim_eta0_draws_only_the_start_noise_and_eta1_keeps_drawing():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(6)
    x_start = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.rand(2, 3, 8, 8, generator=g)
    eps_fn = _conv_eps(3)
    tau = torch.tensor([200, 120])

    def run(eta):
        shared = torch.Generator().manual_seed(1)
        out = d.sample(
            eps_fn, x_start, tau, [shared, shared], cond={"c": cond}, sampler=SamplerConfig("ddim", 8, eta)
        )
        return out, torch.randn(4, generator=shared)

    ref = torch.Generator().manual_seed(1)
    torch.randn((2, 3, 8, 8), generator=ref)  # x_τ's noise only
    after_start = torch.randn(4, generator=ref)
    det, next0 = run(0.0)
    sto, next1 = run(1.0)
    assert torch.equal(next0, after_start)  # eta = 0: no draw after x_τ
    assert not torch.equal(next1, after_start)  # eta = 1: a draw per step
    assert torch.equal(run(1.0)[0], sto) and not torch.allclose(det, sto)


def test_ddim_rows_independent_of_batch_when_grouped():
    d = GaussianDiffusion()
    g = torch.Generator().manual_seed(12)
    n = 5
    x_start = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.rand(n, 3, 8, 8, generator=g)
    tau = torch.tensor([0, 70, 3, 300, 70])
    seeds = [200 + i for i in range(n)]
    eps_fn = _conv_eps(4)
    spec = SamplerConfig("ddim", steps=6)
    groups = [[i] for i in range(n)]
    batch = d.sample(eps_fn, x_start, tau, _gens(seeds), cond={"c": cond}, row_groups=groups, sampler=spec)
    for i in range(n):
        alone = d.sample(
            eps_fn,
            x_start[i : i + 1],
            tau[i : i + 1],
            _gens([seeds[i]]),
            cond={"c": cond[i : i + 1]},
            sampler=spec,
        )
        assert torch.equal(alone[0], batch[i])
