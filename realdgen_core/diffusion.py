"""Diffusion maths for the Decoupled DDPM: schedule, forward noising, ε-loss and samplers (no network).

Timestep convention (used everywhere in RealDGen): ``t`` is a **0-based index** into the
``num_timesteps``-long schedule. Index ``t`` is the paper's step ``t + 1``:

    ᾱ_t = ∏_{s=0..t} (1 − β_s),     β = linspace(beta_start, beta_end, num_timesteps)

so ``t = 0`` is the least noisy step (the paper's ``t = 1``, after which ``x_0`` is returned
without noise). Training draws ``t ~ U{0..max_train_timestep-1}``; generation starts at
``x_τ = √ᾱ_τ·x_start + √(1−ᾱ_τ)·ε`` and runs the ancestral steps ``t = τ, τ−1, …, 0``,
i.e. exactly ``τ + 1`` network evaluations: ``τ = 0`` is one denoising step, ``τ = 300`` is 301.

Like a diffusers scheduler this module holds only maths: the network comes in as ``eps_fn``.
Every random draw comes from an explicit CPU ``torch.Generator`` and is moved to the data's
device afterwards, so results do not depend on the device's RNG.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from realdgen_core.configs import config_from_dict

EpsFn = Callable[..., Tensor]
"""``eps_fn(x_t [N,C,H,W], t LongTensor[N], **cond_rows) -> ε̂ [N,C,H,W]``."""


@dataclass(frozen=True)
class DiffusionConfig:
    """Schedule and timestep ranges.

    The paper's "maximum diffusion step 500" (A.3) is read as a 1000-step linear schedule whose
    training timesteps are drawn from [0, max_train_timestep) — the SynDiff setting; generation
    starts at τ ~ U{tau_min..tau_max} (Table 3: 300 is best). All four numbers are configurable.
    """

    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    max_train_timestep: int = 500
    tau_min: int = 0
    tau_max: int = 300

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionConfig:
        return config_from_dict(cls, d)


class Sampler(enum.StrEnum):
    """Reverse-process samplers, both starting at a per-row τ.

    - ``ancestral``: the paper's DDPM (Alg. 2): every step t = τ … 0, τ + 1 network calls per row.
    - ``ddim``: DDIM (Song et al. 2021, Eq. 12) on a strided sub-grid of the schedule from the
      row's own τ down to 0 — ``min(steps, τ + 1)`` points of ``round(linspace(τ, 0, n))`` — with
      noise ``σ = eta·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)``. ``eta = 1`` keeps it stochastic
      (the k candidates stay diverse), and with ``steps ≥ τ + 1`` and ``eta = 1`` it *is* the
      ancestral sampler (same update, same draws; tested).
    """

    ANCESTRAL = "ancestral"
    DDIM = "ddim"


@dataclass(frozen=True)
class SamplerConfig:
    """Which sampler runs the reverse process and its knobs (the manifest's generator section reuses
    these defaults). ``steps`` and ``eta`` only matter for ``ddim``."""

    kind: str = "ancestral"
    steps: int = 10
    eta: float = 1.0

    def __post_init__(self) -> None:
        try:
            Sampler(self.kind)
        except ValueError:
            raise ValueError(
                f"sampler kind must be one of {[s.value for s in Sampler]}, got {self.kind!r}"
            ) from None
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or not 1 <= self.steps <= 1000:
            raise ValueError(f"sampler steps must be an int in [1, 1000], got {self.steps!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"sampler eta must be in [0, 1], got {self.eta!r}")

    @classmethod
    def of(cls, sampler: SamplerConfig | Sampler | str | None) -> SamplerConfig:
        """A config from a config, a ``Sampler`` or its name (default knobs)."""
        if sampler is None:
            return cls()
        if isinstance(sampler, SamplerConfig):
            return sampler
        if isinstance(sampler, str):
            return cls(kind=str(sampler))
        raise ValueError(f"sampler must be a SamplerConfig or a sampler name, got {sampler!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SamplerConfig:
        return config_from_dict(cls, d)

    def timesteps(self, tau: int) -> list[int]:
        """The descending 0-based timesteps a row that starts at ``tau`` is evaluated at (one
        network call each); the row's last step always lands on t = 0 and then on x_0."""
        tau = int(tau)
        if self.kind == Sampler.ANCESTRAL:
            return list(range(tau, -1, -1))
        n = min(self.steps, tau + 1)
        if n == 1:
            return [tau]
        # Spacing ≥ 1 (n ≤ τ + 1), so the rounded points are distinct; ends exactly at τ and 0.
        return [round(tau - i * tau / (n - 1)) for i in range(n)]


def _check_config(config: DiffusionConfig) -> None:
    if config.num_timesteps < 1:
        raise ValueError(f"diffusion.num_timesteps must be >= 1, got {config.num_timesteps}")
    if not 0.0 < config.beta_start <= config.beta_end < 1.0:
        raise ValueError(
            "diffusion betas must satisfy 0 < beta_start <= beta_end < 1, got "
            f"beta_start={config.beta_start}, beta_end={config.beta_end}"
        )
    if not 1 <= config.max_train_timestep <= config.num_timesteps:
        raise ValueError(
            f"diffusion.max_train_timestep must be in [1, num_timesteps={config.num_timesteps}], "
            f"got {config.max_train_timestep}"
        )
    if not 0 <= config.tau_min <= config.tau_max < config.max_train_timestep:
        raise ValueError(
            f"diffusion tau range must satisfy 0 <= tau_min <= tau_max < max_train_timestep="
            f"{config.max_train_timestep} (the UNet is trained on t below it), got "
            f"tau_min={config.tau_min}, tau_max={config.tau_max}"
        )


@dataclass
class BatchingStats:
    """What a continuously batched sampling run computed (hardware-independent cost figures)."""

    calls: int = 0  # network calls, each of exactly rows_per_call rows
    rows_computed: int = 0  # calls × rows_per_call (padding included)
    rows_useful: int = 0  # row evaluations some sample needed (Σ over rows of its grid length)

    @property
    def padding_ratio(self) -> float:
        """rows computed / rows useful (1.0 = every row of every call was useful)."""
        return self.rows_computed / self.rows_useful if self.rows_useful else 1.0

    def add(self, other: BatchingStats) -> None:
        self.calls += other.calls
        self.rows_computed += other.rows_computed
        self.rows_useful += other.rows_useful


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor → ``device`` without a host sync: pinned + non_blocking on CUDA, as is on CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class GaussianDiffusion:
    """Linear-β DDPM maths (ε-prediction). Buffers are float64, computed once, cast on use."""

    def __init__(self, config: DiffusionConfig | None = None) -> None:
        self.config = config or DiffusionConfig()
        _check_config(self.config)
        c = self.config
        betas = torch.linspace(c.beta_start, c.beta_end, c.num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.num_timesteps = c.num_timesteps
        self.betas = betas
        self.alphas = alphas
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = abar_prev
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        # Reverse step: x_{t-1} = 1/√α_t · (x_t − β_t/√(1−ᾱ_t) · ε̂) + σ_t z, with σ_t² the posterior
        # variance β̃_t = β_t (1−ᾱ_{t−1}) / (1−ᾱ_t)  (0 at t = 0, where no noise is added anyway).
        self.recip_sqrt_alphas = 1.0 / alphas.sqrt()
        self.eps_coef = betas / (1.0 - abar).sqrt()
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.posterior_std = self.posterior_variance.sqrt()

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _gather(buf: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """buf[t] cast to like's dtype/device, shaped [N, 1, 1, ...] to broadcast over like."""
        vals = to_device(buf[t.detach().to("cpu", torch.long)], like.device).to(like.dtype)
        return vals.view(-1, *([1] * (like.dim() - 1)))

    def _check_t(self, t: Tensor, n: int, name: str = "t") -> Tensor:
        t = torch.as_tensor(t).to("cpu", torch.long).reshape(-1)
        if t.numel() != n:
            raise ValueError(f"{name} must hold one timestep per sample ({n}), got {t.numel()}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_timesteps):
            raise ValueError(
                f"{name} must be 0-based indices in [0, {self.num_timesteps - 1}], "
                f"got range [{int(t.min())}, {int(t.max())}]"
            )
        return t

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise, with t a LongTensor [N] of 0-based indices."""
        t = self._check_t(t, x0.shape[0])
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise.to(device=x0.device, dtype=x0.dtype)

    def training_loss(
        self, eps_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, generator: torch.Generator
    ) -> Tensor:
        """Algorithm 1: t ~ U{0..max_train_timestep−1}, ε ~ N(0, I), MSE(ε, eps_fn(x_t, t)).

        ``x0`` is the clean LR in [-1, 1]; the condition c is closed over by ``eps_fn``.
        t and ε are drawn on CPU from ``generator`` (t first, then ε) and moved to x0's device.
        """
        n = x0.shape[0]
        t = torch.randint(0, self.config.max_train_timestep, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        # to_device: a copy from pageable host memory would wait for the stream (a host sync every step)
        noise, t_dev = to_device(noise, x0.device).to(x0.dtype), to_device(t, x0.device)
        x_t = self.q_sample(x0, t, noise)
        eps = eps_fn(x_t, t_dev)
        return torch.mean((eps.float() - noise.float()) ** 2)

    # ------------------------------------------------------------------ reverse process
    def sample(
        self,
        eps_fn: EpsFn,
        x_start: Tensor,
        tau: Tensor,
        generators: Sequence[torch.Generator],
        *,
        cond: Mapping[str, Tensor] | None = None,
        row_groups: Sequence[Sequence[int]] | None = None,
        sampler: SamplerConfig | Sampler | str = Sampler.ANCESTRAL,
    ) -> Tensor:
        """Algorithm 2 from a partially noised start, with a different τ per row.

        Args:
            eps_fn: ``eps_fn(x_t, t, **cond_rows)`` → ε̂, evaluated only on active rows.
            x_start: [N, C, H, W] in [-1, 1] (for RealDGen: D(HR) scaled to [-1, 1]).
            tau: LongTensor [N], 0-based start index per row (see the module docstring); row i
                runs the steps t = τ_i … 0 and is left untouched while t > τ_i.
            generators: one CPU generator per row. Rows may share a generator object (e.g. the k
                candidates of one sample); draws for the rows sharing it are made together, in
                row order, only for the rows active at that step, so a generator's draws depend
                only on the rows that use it.
            cond: tensors with a leading dim N, indexed with the active rows and passed to
                ``eps_fn`` as keyword arguments (guided-diffusion's model_kwargs).
            row_groups: rows that share one ``eps_fn`` call (each call gets the active rows of
                one group, in group order). None = one call on all active rows (fastest). Pass
                one group per sample to make a row's result independent of the other samples in
                the batch even where a backend picks kernels by batch size.
            sampler: a :class:`SamplerConfig` or a sampler name — ``"ancestral"`` (posterior
                variance β̃_t, no noise at the last step) or ``"ddim"`` (strided grid from each
                row's τ, ``SamplerConfig.timesteps``; calls hold rows at different t).

        Returns:
            x_0 [N, C, H, W] (not clamped).
        """
        spec = SamplerConfig.of(sampler)
        n = x_start.shape[0]
        if row_groups is None:
            groups = [list(range(n))]
        else:
            groups = [list(g) for g in row_groups]
            flat = sorted(i for g in groups for i in g)
            if flat != list(range(n)):
                raise ValueError("row_groups must partition the rows 0..N-1 exactly once")
        tau, cond, gen_rows, draw, x = self._start(x_start, tau, generators, cond)
        if n == 0:
            return x

        if spec.kind == Sampler.ANCESTRAL:
            return self._ancestral(eps_fn, x, tau, gen_rows, cond, groups, draw)
        return self._strided(eps_fn, x, tau, gen_rows, cond, groups, draw, spec)

    def _start(self, x_start: Tensor, tau: Tensor, generators: Sequence[torch.Generator], cond):
        """Validate the sampling inputs and noise every row to its τ: returns
        ``(tau, cond, gen_rows, draw, x_τ)``; ``gen_rows`` maps each generator object (first-seen
        order) to its rows, and ``draw(rows, g)`` draws their noise together, in row order."""
        n = x_start.shape[0]
        tau = self._check_t(tau, n, "tau")
        if len(generators) != n:
            raise ValueError(f"sample needs one generator per row ({n}), got {len(generators)}")
        cond = dict(cond or {})
        for k, v in cond.items():
            if v.shape[0] != n:
                raise ValueError(f"cond[{k!r}] has leading dim {v.shape[0]}, expected {n}")
        gen_rows: dict[int, tuple[torch.Generator, list[int]]] = {}
        for i, g in enumerate(generators):
            gen_rows.setdefault(id(g), (g, []))[1].append(i)

        def draw(rows_of: list[int], g: torch.Generator) -> Tensor:
            # On the generator's own device: a CUDA generator draws on the GPU (no host copy).
            z = torch.randn(
                (len(rows_of), *x_start.shape[1:]), generator=g, dtype=torch.float32, device=g.device
            )
            return z.to(device=x_start.device, dtype=x_start.dtype)

        x = x_start.clone()
        for g, rows in gen_rows.values():
            idx = torch.tensor(rows, device=x_start.device)
            eps0 = draw(rows, g)
            t_rows = tau[rows]
            x[idx] = (
                self._gather(self.sqrt_alphas_cumprod, t_rows, x_start) * x_start[idx]
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t_rows, x_start) * eps0
            )
        return tau, cond, gen_rows, draw, x

    # ------------------------------------------------------------------ one reverse step, per row
    def step(
        self,
        x_t: Tensor,
        eps: Tensor,
        t: Sequence[int],
        t_next: Sequence[int],
        noise: Tensor | None,
        eta: float = 1.0,
    ) -> Tensor:
        """One DDIM step per row from ``t[i]`` to ``t_next[i]`` (``-1`` = to x_0; ᾱ_{-1} = 1).

        ``x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t``;  ``x_next = √ᾱ_n·x̂0 + √(1−ᾱ_n−σ²)·ε̂ + σ·z`` with
        ``σ = eta·√((1−ᾱ_n)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_n)``. Coefficients are formed in float64 and cast
        once. ``noise`` ([N,...], or None when every σ is 0) is ignored where σ = 0.
        """
        t_idx = torch.as_tensor(list(t), dtype=torch.long)
        n_idx = torch.as_tensor(list(t_next), dtype=torch.long)
        abar_t = self.alphas_cumprod[t_idx]
        abar_n = torch.where(n_idx >= 0, self.alphas_cumprod[n_idx.clamp(min=0)], torch.ones_like(abar_t))
        sigma = eta * ((1.0 - abar_n) / (1.0 - abar_t)).sqrt() * (1.0 - abar_t / abar_n).clamp(min=0).sqrt()
        c_x = (abar_n / abar_t).sqrt()
        c_eps = (1.0 - abar_n - sigma**2).clamp(min=0).sqrt() - c_x * (1.0 - abar_t).sqrt()
        shape = (-1, *([1] * (x_t.dim() - 1)))

        c_x, c_eps, c_sigma = to_device(torch.stack([c_x, c_eps, sigma]).to(x_t.dtype), x_t.device).unbind(0)
        out = c_x.view(shape) * x_t + c_eps.view(shape) * eps.to(x_t.dtype)
        if noise is not None and bool((sigma > 0).any()):
            out = out + c_sigma.view(shape) * noise.to(device=x_t.device, dtype=x_t.dtype)
        return out

    def ancestral_step(self, x_t: Tensor, eps: Tensor, t: Sequence[int], noise: Tensor | None) -> Tensor:
        """The DDPM posterior step of ``_ancestral`` with one t per row (same float ops per row):
        ``1/√α_t·(x_t − β_t/√(1−ᾱ_t)·ε̂) + σ_t·z`` (σ_0 = 0: rows at t = 0 take z = 0)."""
        t_idx = torch.as_tensor(list(t), dtype=torch.long)
        shape = (-1, *([1] * (x_t.dim() - 1)))
        coefs = torch.stack(
            [self.recip_sqrt_alphas[t_idx], self.eps_coef[t_idx], self.posterior_std[t_idx]]
        ).to(x_t.dtype)
        recip, eps_c, std = to_device(coefs, x_t.device).unbind(0)
        out = recip.view(shape) * (x_t - eps_c.view(shape) * eps.to(x_t.dtype))
        if noise is not None:
            out = out + std.view(shape) * noise
        return out

    def sample_continuous(
        self,
        eps_fn: EpsFn,
        x_start: Tensor,
        tau: Tensor,
        generators: Sequence[torch.Generator],
        *,
        rows_per_call: int,
        cond: Mapping[str, Tensor] | None = None,
        sampler: SamplerConfig | Sampler | str = Sampler.ANCESTRAL,
        stats: BatchingStats | None = None,
    ) -> Tensor:
        """The samplers of :meth:`sample` with continuous batching (vLLM-style) of the rows.

        Every ``eps_fn`` call holds exactly ``rows_per_call`` rows (zero rows pad only when fewer
        are pending in all), taken from any sample and at any t. A *sample* is the set of rows that
        share a generator object; it keeps a clock like ``sample``'s (its rows are evaluated at the
        same clock, their draws are made together in row order once all of them have their ε̂), so
        each sample gets the very draws, inputs and float ops of :meth:`sample` — only the other
        rows of its network calls differ.

        Scheduling: each call takes the pending rows of the samples with the most steps left
        (Hu's highest-level-first, ties by sample then row), so a sample whose rows start late
        (small τ) joins when the others have come down to its level and all samples finish
        together: calls stay full until the last few. Measured (``bench/continuous_batching.py``):
        rows computed / rows useful ≤ 1.002 once the batch holds ≥ 4·rows_per_call rows (k = 4,
        τ ~ U{0..300}), 1.05–1.09 at 2·rows_per_call; with fewer rows the longest chain
        (τ_max + 1 calls) bounds the run and calls cannot be filled.

        A row's result then depends on ``rows_per_call`` but not on its call-mates provided the
        backend computes a row independently of the others in a same-shaped batch (true for CPU
        and for fixed cuDNN algorithms). ``stats`` (if given) accumulates calls and rows.
        """
        spec = SamplerConfig.of(sampler)
        r_call = int(rows_per_call)
        if r_call < 1:
            raise ValueError(f"rows_per_call must be a positive int, got {rows_per_call!r}")
        tau, cond, gen_rows, draw, x = self._start(x_start, tau, generators, cond)
        n = x.shape[0]
        if n == 0:
            return x
        device = x.device
        grids = [spec.timesteps(v) for v in tau.tolist()]
        lens = [len(g) for g in grids]
        noisy = spec.kind == Sampler.ANCESTRAL or float(spec.eta) > 0
        samples = list(gen_rows.values())
        clock = [max(lens[r] for r in rows) - 1 for _, rows in samples]
        owner = [0] * n
        for si, (_, rows) in enumerate(samples):
            for r in rows:
                owner[r] = si
        pending = [0] * len(samples)
        heap: list[tuple[int, int, int]] = []
        eps_buf = torch.empty_like(x)
        run = stats if stats is not None else BatchingStats()
        run.rows_useful += sum(lens)

        def enqueue(si: int) -> None:
            active = [r for r in samples[si][1] if lens[r] > clock[si]]
            pending[si] = len(active)
            for r in active:
                heapq.heappush(heap, (-clock[si], si, r))

        def t_at(r: int, c: int) -> int:
            return grids[r][lens[r] - 1 - c]

        def advance(done: list[int]) -> None:
            rows_all: list[int] = []
            t_all: list[int] = []
            t_next: list[int] = []
            zs: list[Tensor] = []
            for si in done:
                g, rows = samples[si]
                c = clock[si]
                active = [r for r in rows if lens[r] > c]
                rows_all += active
                t_all += [t_at(r, c) for r in active]
                t_next += [t_at(r, c - 1) if c > 0 else -1 for r in active]
                if noisy:
                    zs.append(draw(active, g) if c > 0 else x.new_zeros((len(active), *x.shape[1:])))
            idx = to_device(torch.tensor(rows_all), device)
            z = torch.cat(zs) if noisy else None
            if spec.kind == Sampler.ANCESTRAL:
                x[idx] = self.ancestral_step(x[idx], eps_buf[idx], t_all, z)
            else:
                x[idx] = self.step(x[idx], eps_buf[idx], t_all, t_next, z, float(spec.eta))
            for si in done:
                clock[si] -= 1
                if clock[si] >= 0:
                    enqueue(si)

        for si in range(len(samples)):
            enqueue(si)
        while heap:
            take = [heapq.heappop(heap) for _ in range(min(r_call, len(heap)))]
            rows = [r for _, _, r in take]
            m = len(rows)
            idx = to_device(torch.tensor(rows), device)
            t_host = torch.zeros(r_call, dtype=torch.long)
            t_host[:m] = torch.tensor([t_at(r, clock[owner[r]]) for r in rows])
            xin, kw = x[idx], {k: v[idx] for k, v in cond.items()}
            if m < r_call:
                xin = torch.cat([xin, xin.new_zeros((r_call - m, *xin.shape[1:]))])
                kw = {k: torch.cat([v, v.new_zeros((r_call - m, *v.shape[1:]))]) for k, v in kw.items()}
            out = eps_fn(xin, to_device(t_host, device), **kw)
            eps_buf[idx] = out[:m].to(eps_buf.dtype)
            run.calls += 1
            run.rows_computed += r_call
            done = []
            for r in rows:
                si = owner[r]
                pending[si] -= 1
                if pending[si] == 0:
                    done.append(si)
            if done:
                advance(done)
        return x

    def _strided(self, eps_fn, x, tau, gen_rows, cond, groups, draw, spec: SamplerConfig) -> Tensor:
        """Every row walks its own grid (``spec.timesteps(τ_i)``); grids are aligned at their ends, so
        a row with fewer points joins later (as a small τ does in the ancestral loop). At clock c a
        row is active when c < len(grid_i) and is evaluated at grid_i[len − 1 − c]; a group's active
        rows share one call whatever their t. Noise is drawn per generator for its active rows
        (row order) at every clock c > 0 when eta > 0 — no draw on the last step."""
        device = x.device
        grids = [spec.timesteps(v) for v in tau.tolist()]
        lens = [len(g) for g in grids]
        stochastic = float(spec.eta) > 0
        for c in range(max(lens) - 1, -1, -1):
            active = [i for i in range(len(grids)) if lens[i] > c]
            if not active:
                continue
            t_of = {i: grids[i][lens[i] - 1 - c] for i in active}
            e = self._eps_of_groups(eps_fn, x, active, t_of, cond, groups)
            idx = torch.tensor(active, device=device)
            t_next = [grids[i][lens[i] - c] if c > 0 else -1 for i in active]
            z = None
            if c > 0 and stochastic:
                z = self._noise_of_rows(x[idx], active, gen_rows, draw)
            x[idx] = self.step(x[idx], e, [t_of[i] for i in active], t_next, z, float(spec.eta))
        return x

    @staticmethod
    def _eps_of_groups(eps_fn, x: Tensor, active: list[int], t_of: dict, cond, groups) -> Tensor:
        """ε̂ of the ``active`` rows (stacked in that order): one ``eps_fn`` call per group, on the
        group's active rows at their timesteps ``t_of[row]``."""
        act_set = set(active)
        eps = {}
        for grp in groups:
            rows = [i for i in grp if i in act_set]
            if not rows:
                continue
            idx = torch.tensor(rows, device=x.device)
            t_vec = torch.tensor([t_of[i] for i in rows], dtype=torch.long, device=x.device)
            kw = {k: v[idx] for k, v in cond.items()}
            out = eps_fn(x[idx], t_vec, **kw)
            for j, r in enumerate(rows):
                eps[r] = out[j]
        return torch.stack([eps[r] for r in active]).to(x.dtype)

    @staticmethod
    def _noise_of_rows(like: Tensor, active: list[int], gen_rows, draw) -> Tensor:
        """Fresh noise shaped like ``like`` for the ``active`` rows: each generator draws for its own
        active rows together, in row order (so a generator's draws depend only on its rows)."""
        act_set = set(active)
        z = torch.empty_like(like)
        pos_of = {r: j for j, r in enumerate(active)}
        for g, rows in gen_rows.values():
            rows_t = [r for r in rows if r in act_set]
            if rows_t:
                pos = torch.tensor([pos_of[r] for r in rows_t], device=like.device)
                z[pos] = draw(rows_t, g)
        return z

    def _ancestral(self, eps_fn, x, tau, gen_rows, cond, groups, draw) -> Tensor:
        device = x.device
        tau_list = tau.tolist()
        for t in range(int(tau.max()), -1, -1):
            active = [i for i in range(len(tau_list)) if tau_list[i] >= t]
            if not active:
                continue
            e = self._eps_of_groups(eps_fn, x, active, dict.fromkeys(active, t), cond, groups)
            idx = torch.tensor(active, device=device)
            xa = x[idx]
            mean = float(self.recip_sqrt_alphas[t]) * (xa - float(self.eps_coef[t]) * e)
            if t > 0:
                z = self._noise_of_rows(xa, active, gen_rows, draw)
                mean = mean + float(self.posterior_std[t]) * z
            x[idx] = mean
        return x
