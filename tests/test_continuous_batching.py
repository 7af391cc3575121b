"""Continuous batching of diffusion rows: same results as the per-sample path, full calls."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from realdgen_core.config import preset
from realdgen_core.diffusion import BatchingStats, GaussianDiffusion, SamplerConfig
from realdgen_core.generator import LRGenerator
from realdgen_core.models import build_model


def _rowwise_eps(x, t, c):
    """Elementwise in the row, so a row's ε̂ is bit-identical whatever its call-mates."""
    return torch.tanh(x * 0.7 + c * 0.3) * (1 + t.float().view(-1, 1, 1, 1) / 500)


def _problem(b, k, seed=0, size=4, tau_hi=300):
    g = torch.Generator().manual_seed(seed)
    n = b * k
    x_start = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    cond = torch.rand(n, 3, size, size, generator=g)
    tau = torch.randint(0, tau_hi + 1, (n,), generator=g)
    return x_start, cond, tau


def _gens(b, k, base=100):
    gs = [torch.Generator().manual_seed(base + i) for i in range(b)]
    return [gs[i // k] for i in range(b * k)]


@pytest.mark.parametrize(
    "sampler", ["ancestral", SamplerConfig("ddim", 10, 1.0), SamplerConfig("ddim", 4, 0.0)]
)
@pytest.mark.parametrize("rows_per_call", [1, 5, 16])
def test_continuous_equals_per_sample_sampling_exactly(sampler, rows_per_call):
    b, k = 6, 4
    x_start, cond, tau = _problem(b, k, tau_hi=120)
    groups = [list(range(i * k, (i + 1) * k)) for i in range(b)]
    ref = d_sample = GaussianDiffusion().sample(
        _rowwise_eps, x_start, tau, _gens(b, k), cond={"c": cond}, row_groups=groups, sampler=sampler
    )
    seen = []

    def eps_fn(x, t, c):
        seen.append((x.shape[0], t.tolist()))
        return _rowwise_eps(x, t, c)

    st = BatchingStats()
    out = GaussianDiffusion().sample_continuous(
        eps_fn,
        x_start,
        tau,
        _gens(b, k),
        rows_per_call=rows_per_call,
        cond={"c": cond},
        sampler=sampler,
        stats=st,
    )
    assert torch.equal(out, ref) and d_sample is ref
    assert all(n == rows_per_call for n, _ in seen)  # every call exactly R rows (padding included)
    useful = sum(len(SamplerConfig.of(sampler).timesteps(v)) for v in tau.tolist())
    assert (
        st.rows_useful == useful and st.calls == len(seen) and st.rows_computed == len(seen) * rows_per_call
    )
    assert st.calls >= math.ceil(useful / rows_per_call)
    if rows_per_call > 1:  # rows at different t share calls
        assert any(len(set(ts)) > 1 for _, ts in seen)


def test_rows_computed_over_useful_at_k4_tau_0_300():
    """The Done-when figure: ≤ 1.05 at k = 4, τ ~ U{0..300}, batches of 2·R to 4·R rows."""

    def zero_eps(x, t, c):
        return torch.zeros_like(x)

    for b, r in [(16, 32), (64, 64), (128, 128)]:
        x_start, cond, tau = _problem(b, 4, seed=b + r, size=1)
        st = BatchingStats()
        GaussianDiffusion().sample_continuous(
            zero_eps, x_start, tau, _gens(b, 4), rows_per_call=r, cond={"c": cond}, stats=st
        )
        assert st.rows_useful == int((tau + 1).sum())
        assert st.padding_ratio <= 1.05, (b, r, st)
    # A static batch padded to its longest row would compute far more (the old packed path).
    assert b * 4 * (int(tau.max()) + 1) / st.rows_useful > 1.3


def test_continuous_validates_rows_per_call():
    x_start, cond, tau = _problem(1, 2)
    with pytest.raises(ValueError, match="rows_per_call .* got 0"):
        GaussianDiffusion().sample_continuous(
            _rowwise_eps, x_start, tau, _gens(1, 2), rows_per_call=0, cond={"c": cond}
        )


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_generator_continuous_matches_per_sample_path_within_tolerance(sampler):
    """Documented tolerance (docs/generate.md): same kept candidate; candidate bytes within one
    8-bit level on ≤ 0.1 % of values; filter errors within 1e-4 relative."""
    model = build_model(preset("tiny", 4), seed=0)
    hr, refs = _images(4, 32, 1), _images(4, 16, 2)
    seeds = [3, 1, 1_000_000_007, 5]
    kw = dict(k=4, tau_range=(0, 40), seeds=seeds, return_candidates=True)
    per_sample = LRGenerator(model, sampler=sampler).generate(hr, refs, **kw)
    cont = LRGenerator(model, rows_per_call=8, sampler=sampler).generate(hr, refs, **kw)
    st = cont.batching
    assert per_sample.batching is None and st.rows_computed == 8 * st.calls
    # Near the lower bound (all rows of the batch, or the longest chain) even in this small batch,
    # where a sample's clock barrier costs a few calls; the old lock-step packing needed ~1.5x.
    chain = max(len(SamplerConfig.of(sampler).timesteps(v)) for v in cont.tau.flatten().tolist())
    assert st.calls <= 1.15 * max(math.ceil(st.rows_useful / 8), chain) + 1
    assert torch.equal(cont.tau, per_sample.tau) and cont.thetas == per_sample.thetas
    assert torch.equal(cont.kept, per_sample.kept)
    diff = (cont.candidates - per_sample.candidates).abs() * 255
    assert diff.max() <= 1.0 + 1e-4 and (diff > 0.5).float().mean() <= 1e-3
    torch.testing.assert_close(cont.content_errors, per_sample.content_errors, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(cont.degradation_errors, per_sample.degradation_errors, rtol=1e-4, atol=1e-9)
    # Batch independence of the continuous path: a sample alone gives its bytes in the batch.
    alone = LRGenerator(model, rows_per_call=8, sampler=sampler).generate(
        hr[2:3], refs[2:3], **{**kw, "seeds": [seeds[2]]}
    )
    assert torch.equal(alone.candidates[0], cont.candidates[2])
