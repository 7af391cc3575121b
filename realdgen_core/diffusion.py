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
    """Reverse-process samplers. Only the paper's ancestral DDPM exists today; the seam is here so a
    faster sampler that can also start at τ (e.g. DDIM on a strided grid) lands without rewrites."""

    ANCESTRAL = "ancestral"


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
    if not 0 <= config.tau_min <= config.tau_max < config.num_timesteps:
        raise ValueError(
            f"diffusion tau range must satisfy 0 <= tau_min <= tau_max < num_timesteps="
            f"{config.num_timesteps}, got tau_min={config.tau_min}, tau_max={config.tau_max}"
        )


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
        vals = buf[t.detach().to("cpu", torch.long)]
        return vals.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))

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
        noise = noise.to(device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        eps = eps_fn(x_t, t.to(x0.device))
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
        sampler: Sampler | str = Sampler.ANCESTRAL,
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
            sampler: only ``"ancestral"`` (posterior variance β̃_t, no noise at the last step).

        Returns:
            x_0 [N, C, H, W] (not clamped).
        """
        sampler = Sampler(sampler)
        n = x_start.shape[0]
        tau = self._check_t(tau, n, "tau")
        if len(generators) != n:
            raise ValueError(f"sample needs one generator per row ({n}), got {len(generators)}")
        cond = dict(cond or {})
        for k, v in cond.items():
            if v.shape[0] != n:
                raise ValueError(f"cond[{k!r}] has leading dim {v.shape[0]}, expected {n}")
        if row_groups is None:
            groups = [list(range(n))]
        else:
            groups = [list(g) for g in row_groups]
            flat = sorted(i for g in groups for i in g)
            if flat != list(range(n)):
                raise ValueError("row_groups must partition the rows 0..N-1 exactly once")
        if n == 0:
            return x_start.clone()

        # Rows sharing a generator object draw together (first-seen order of the generator).
        gen_rows: dict[int, tuple[torch.Generator, list[int]]] = {}
        for i, g in enumerate(generators):
            gen_rows.setdefault(id(g), (g, []))[1].append(i)

        def draw(rows_of: list[int], g: torch.Generator) -> Tensor:
            z = torch.randn((len(rows_of), *x_start.shape[1:]), generator=g, dtype=torch.float32)
            return z.to(device=x_start.device, dtype=x_start.dtype)

        x = torch.empty_like(x_start)
        for g, rows in gen_rows.values():
            idx = torch.tensor(rows, device=x_start.device)
            eps0 = draw(rows, g)
            t_rows = tau[rows]
            x[idx] = (
                self._gather(self.sqrt_alphas_cumprod, t_rows, x_start) * x_start[idx]
                + self._gather(self.sqrt_one_minus_alphas_cumprod, t_rows, x_start) * eps0
            )

        if sampler is Sampler.ANCESTRAL:
            return self._ancestral(eps_fn, x, tau, gen_rows, cond, groups, draw)
        raise ValueError(f"unknown sampler {sampler!r}")  # pragma: no cover - enum guards this

    def _ancestral(self, eps_fn, x, tau, gen_rows, cond, groups, draw) -> Tensor:
        device = x.device
        tau_list = tau.tolist()
        for t in range(int(tau.max()), -1, -1):
            active = [i for i in range(len(tau_list)) if tau_list[i] >= t]
            if not active:
                continue
            act_set = set(active)
            eps = {}
            for grp in groups:
                rows = [i for i in grp if i in act_set]
                if not rows:
                    continue
                idx = torch.tensor(rows, device=device)
                t_vec = torch.full((len(rows),), t, dtype=torch.long, device=device)
                kw = {k: v[idx] for k, v in cond.items()}
                out = eps_fn(x[idx], t_vec, **kw)
                for j, r in enumerate(rows):
                    eps[r] = out[j]
            idx = torch.tensor(active, device=device)
            e = torch.stack([eps[r] for r in active]).to(x.dtype)
            xa = x[idx]
            mean = float(self.recip_sqrt_alphas[t]) * (xa - float(self.eps_coef[t]) * e)
            if t > 0:
                z = torch.empty_like(xa)
                pos_of = {r: j for j, r in enumerate(active)}
                for g, rows in gen_rows.values():
                    rows_t = [r for r in rows if r in act_set]
                    if rows_t:
                        pos = torch.tensor([pos_of[r] for r in rows_t], device=device)
                        z[pos] = draw(rows_t, g)
                mean = mean + float(self.posterior_std[t]) * z
            x[idx] = mean
        return x
