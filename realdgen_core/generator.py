"""LRGenerator: realistic LR for (HR, real LR reference) pairs — Alg. 2 plus the best-of-k filter (§2.3, A.6).

For every sample i (one CPU ``torch.Generator`` seeded from ``seeds[i]``) and each of its k
candidates j, in this order: τ_ij ~ U{tau_range} (inclusive, 0-based schedule indices, see
``realdgen_core.diffusion``), then θ_ij of D (``degrade.sample_theta``). Then

    x_start_ij = 2·D(HR_i, θ_ij) − 1                       (Alg. 2 prints D(x_lr); §2.3 means the HR)
    c_i        = M(E_cont(HR_i), E_deg(ref_i))
    cand_ij    = reverse process from x_τ = √ᾱ_τ·x_start + √(1−ᾱ_τ)·ε down to t = 0, 8-bit quantised
                 (``sampler``: the paper's ancestral DDPM, τ+1 UNet calls; or strided DDIM, ≤ steps);
                 for τ = 0, x_start itself (no noise, no UNet call: "no diffusion")
    content_error_ij     = mean((E_cont(bicubic_up(cand_ij)) − E_cont(HR_i))²)   (MSE over the content map)
    degradation_error_ij = mean((E_deg(cand_ij) − E_deg(ref_i))²)                 (MSE over the 2048 dims)
    kept_i = argmin_j  w_c·content_error_ij + w_d·degradation_error_ij            (first index on ties)

Batch independence. CPU convolutions are not bit-identical across batch sizes (measured: ~1e-6
differences for every preset when the same rows run in a batch of 1, 4 or 16), which after 300
steps and 8-bit rounding would make a sample's pixels depend on its batch. So no network call
ever mixes rows whose shape or membership depends on other samples:

- ``rows_per_call=None`` (default): every network call holds the rows of exactly one sample (its
  HR, its reference, or its active candidates), so a sample makes the very same calls alone or in
  any batch — nothing is assumed about the backend. Costs one call per sample per step.
- ``rows_per_call=R``: continuous batching (``GaussianDiffusion.sample_continuous``): every UNet
  call holds exactly R pending rows of any samples at any t (zero rows pad only the last calls);
  the throughput path for GPUs. Keep B·k ≥ 4·R so calls stay full (rows computed / useful ≈ 1.001).
  The encoders and the filter run in fixed-size packed calls of R rows. A row's result then
  depends on R, never on its batch-mates, provided the backend computes a row independently of
  its position inside a same-shaped batch — true for the CPU backend (tested) and for fixed cuDNN
  algorithms (leave ``cudnn.benchmark`` off). R is part of a dataset's identity: changing it may
  flip low bits.

Precision: everything runs in float32; on CUDA, ``dtype=torch.bfloat16`` autocasts the UNet only
(>99% of the cost; the encoders, M and the filter stay float32 so the filter's ranking is not
decided by bf16 noise). On CPU the dtype knob is ignored and everything stays float32.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from realdgen_core import calibrate, degrade
from realdgen_core.diffusion import BatchingStats, GaussianDiffusion, Sampler, SamplerConfig
from realdgen_core.models import RealDGenModel

_FROM_HWC = "torch.from_numpy(a).permute(2, 0, 1).float() / 255"


def _is_int(x) -> bool:
    """An integer (Python, numpy or a 0-d integer tensor), not a bool or a float."""
    if isinstance(x, Tensor):
        return x.dim() == 0 and not torch.is_floating_point(x) and x.dtype != torch.bool
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class GenerationResult:
    """What ``LRGenerator.generate`` returns; all tensors on CPU."""

    lr: Tensor  # [B,3,h,w] kept candidate, 8-bit quantised, [0,1]
    content_errors: Tensor  # [B,k] float32
    degradation_errors: Tensor  # [B,k] float32
    kept: Tensor  # [B] long, index of the kept candidate
    tau: Tensor  # [B,k] long, τ used per candidate (0-based schedule index)
    thetas: list[list[dict]]  # θ of D used to build x_start, per sample per candidate
    candidates: Tensor | None = None  # [B,k,3,h,w] all candidates (only with return_candidates=True)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase of this call
    batching: BatchingStats | None = None  # UNet calls/rows of this call (continuous batching only)


def bicubic_up(lr: Tensor, scale: int) -> Tensor:
    """Bicubic ×scale (torch, align_corners=False), clamped to [0, 1] — as in training (train.data)."""
    return F.interpolate(lr, scale_factor=float(scale), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


def quantize_8bit(x: Tensor) -> Tensor:
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0


def draw_starts(
    b: int, k: int, scale: int, tau_range: tuple[int, int], seeds: Sequence[int], start_kind: str
) -> tuple[list[torch.Generator], Tensor, list[list[dict]]]:
    """Each sample's first draws: τ_ij then θ_ij for j < k, from ``Generator().manual_seed(seed_i)``.

    Returns the generators (positioned after these draws), τ [b,k] and θ [b][k]. Cheap (no
    image work), so a stage that only needs x_start can redo it and hand ``start_images`` on.
    """
    gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    lo, hi = int(tau_range[0]), int(tau_range[1])
    tau = torch.empty((b, k), dtype=torch.long)
    thetas: list[list[dict]] = []
    for i, g in enumerate(gens):
        row = []
        for j in range(k):
            tau[i, j] = int(torch.randint(lo, hi + 1, (), generator=g))
            row.append(degrade.sample_theta(start_kind, scale, g))
        thetas.append(row)
    return gens, tau, thetas


def start_images(hr: Tensor, thetas: Sequence[Sequence[dict]]) -> Tensor:
    """x_start before scaling: D(HR_i, θ_ij) on the CPU → [B,k,3,h,w] in [0,1], 8-bit valued (D ends
    by rounding to 8 bit, so uint8 carries it losslessly). ``hr``: [B,3,H,W], modcropped."""
    hr_cpu = hr.detach().to("cpu", torch.float32)
    return torch.stack(
        [degrade.apply(hr_cpu[i : i + 1].expand(len(th), -1, -1, -1), th) for i, th in enumerate(thetas)]
    )


def _pad_to_multiple(x: Tensor, m: int) -> Tensor:
    """Pad bottom/right of [N,C,h,w] to multiples of m (reflect where possible, else replicate)."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not ph and not pw:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class LRGenerator:
    """Generates realistic LR images from a trained RealDGen model (GPU work of the dataset job).

    Args:
        model: a ``RealDGenModel`` (moved to ``device`` and set to eval mode).
        device: where the networks run. Random draws are always made on CPU.
        digest: the checkpoint digest recorded in the dataset (``None`` for an unsaved model).
        rows_per_call: ``None`` = one network call per sample; an int = fixed-size packed calls
            (see the module docstring).
        dtype: ``torch.bfloat16`` autocasts the UNet on CUDA; ignored on CPU (float32).
        channels_last: run the UNet in channels-last memory format (CUDA only; ignored on CPU).
        compile: ``torch.compile`` the UNet (CUDA only; ignored on CPU). Pays with
            ``rows_per_call`` (one shape per call); per-sample calls vary in size and recompile.
        device_noise: draw the sampling noise on ``device`` from one device generator per sample
            (seeded from the sample's CPU generator). ``None`` = on CUDA only. CPU runs keep the
            CPU generators (today's bytes); bytes then depend on the device *type* only.
        sampler: the reverse-process sampler: ``"ancestral"`` (the paper's, default), ``"ddim"``
            (strided DDIM from each row's τ, default 10 steps, eta 1) or a ``SamplerConfig``.
    """

    def __init__(
        self,
        model: RealDGenModel,
        device: str | torch.device = "cpu",
        digest: str | None = None,
        *,
        rows_per_call: int | None = None,
        dtype: torch.dtype | None = None,
        sampler: SamplerConfig | Sampler | str = Sampler.ANCESTRAL,
        device_noise: bool | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if rows_per_call is not None and (not isinstance(rows_per_call, int) or rows_per_call < 1):
            raise ValueError(f"rows_per_call must be None or a positive int, got {rows_per_call!r}")
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype!r}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.digest = digest
        self.metadata: dict = {"digest": digest} if digest else {}  # from_checkpoint: the file's
        self.calibration: calibrate.DomainCalibration | None = None  # from_checkpoint: the file's
        self.rows_per_call = rows_per_call
        self.sampler = SamplerConfig.of(sampler)
        self.device_noise = (self.device.type == "cuda") if device_noise is None else bool(device_noise)
        self.diffusion = GaussianDiffusion(model.config.diffusion)
        use_autocast = self.device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
        self.autocast_dtype = dtype if use_autocast else None
        on_cuda = self.device.type == "cuda"
        self.channels_last = bool(channels_last) and on_cuda
        if self.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
        self._unet = self.model.unet
        if compile and on_cuda:
            self._unet = torch.compile(self.model.unet, dynamic=False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> LRGenerator:
        """Load a safetensors checkpoint (``realdgen_core.checkpoint``); ``digest`` from its metadata.

        The checkpoint's metadata is kept as ``metadata``, and its domain calibration (what the job
        uses by default: τ range, start bank, filter weights) as ``calibration``
        (:class:`~realdgen_core.calibrate.DomainCalibration`, None when it has none); see
        :meth:`domain_start` and docs/interfaces.md ("Generating as the job does")."""
        from realdgen_core.checkpoint import load_checkpoint

        model, metadata = load_checkpoint(path, device=device)
        gen = cls(model, device=device, digest=metadata.get("digest"), **kwargs)
        gen.metadata = metadata
        gen.calibration = calibrate.from_metadata(metadata)
        return gen

    def domain_start(
        self,
        probe_tiles: Sequence[Tensor],
        refs: Tensor | Sequence[Tensor] | None,
        bank: Sequence[dict],
        *,
        ref_weighting: str = "sensitivity",
        aggregate: str = "rank",
        ref_embeddings: Tensor | None = None,
        ref_probe_embeddings: Tensor | None = None,
    ) -> dict:
        """The job's start choice for one reference domain (``generator.start_choice: domain``): the
        bank entry whose ``D(tile, θ)`` the references rank closest in E_deg over every probe HR tile.

        ``probe_tiles``: HR tiles [3,H,W] in [0,1] of the inputs to generate (the job cuts 32 spread
        over them); ``refs``: the domain's LR references; ``ref_weighting``: ``sensitivity`` (the job's
        default, :func:`calibrate.reference_weights`) or ``uniform``; ``aggregate``: ``rank`` or
        ``distance``; ``ref_embeddings``: ``degradation_embeddings(refs)`` when already computed, and
        ``ref_probe_embeddings``: :meth:`reference_probe_embeddings` of them. With both (or
        ``ref_embeddings`` alone when ``ref_weighting`` is ``uniform``), ``refs`` may be None: the job
        embeds each reference as it decodes it and keeps no image.
        Returns :func:`calibrate.domain_start_profile`'s dict plus ``label``; pass
        ``calibrate.profile_errors(profile, len(bank))`` (one row per sample) as ``start_bank_errors``."""
        if ref_weighting not in ("sensitivity", "uniform"):
            raise ValueError(f"ref_weighting must be 'sensitivity' or 'uniform', got {ref_weighting!r}")
        ref_list = self._as_image_list(refs, "refs") if refs is not None else None
        if ref_list is None and (
            ref_embeddings is None or (ref_weighting == "sensitivity" and ref_probe_embeddings is None)
        ):
            raise ValueError(
                "refs may be None only with ref_embeddings (and ref_probe_embeddings when ref_weighting "
                "is 'sensitivity')"
            )
        tiles = self._as_image_list(list(probe_tiles), "probe_tiles")
        emb = self.degradation_embeddings(ref_list) if ref_embeddings is None else ref_embeddings
        weights = None
        if ref_weighting == "sensitivity":
            probe = ref_probe_embeddings
            if probe is None:
                probe = self.reference_probe_embeddings(ref_list)
            weights = calibrate.reference_weights(emb, probe)
        profile = calibrate.domain_start_profile(
            self.model.degradation, tiles, emb, bank, self.device, ref_weights=weights, aggregate=aggregate
        )
        profile["label"] = calibrate.theta_label(bank[profile["chosen"]])
        return profile

    def reference_probe_embeddings(self, refs: Tensor | Sequence[Tensor]) -> Tensor:
        """E_deg of each reference blurred by :func:`calibrate.weight_probe` ([N, 2048]): with
        ``degradation_embeddings(refs)``, what :func:`calibrate.reference_weights` weighs a reference by
        in :meth:`domain_start`."""
        blurred = [calibrate.weight_probe(r) for r in self._as_image_list(refs, "refs")]
        return self.degradation_embeddings(blurred)

    @property
    def scale(self) -> int:
        return self.model.config.scale

    # ------------------------------------------------------------------ batching policy
    def _run(
        self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], groups: Sequence[Sequence[int]]
    ) -> Tensor:
        """fn over the rows of ``inputs`` so that a row's result never depends on the other rows.

        ``groups`` lists the rows of each sample (used when ``rows_per_call`` is None).
        """
        n = inputs[0].shape[0]
        if self.rows_per_call is None:
            out: Tensor | None = None
            for rows in groups:
                if not rows:
                    continue
                idx = torch.tensor(list(rows), device=inputs[0].device)
                o = fn(*(x[idx] for x in inputs))
                if out is None:
                    out = o.new_empty((n, *o.shape[1:]))
                out[idx] = o
            assert out is not None
            return out
        r = self.rows_per_call
        outs = []
        for s in range(0, n, r):
            chunk = [x[s : s + r] for x in inputs]
            m = chunk[0].shape[0]
            if m < r:
                chunk = [torch.cat([c, c.new_zeros((r - m, *c.shape[1:]))]) for c in chunk]
            outs.append(fn(*chunk)[:m])
        return torch.cat(outs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def degradation_embeddings(self, refs: Tensor | Sequence[Tensor]) -> Tensor:
        """E_deg of real LR references: [N,3,h,w] in [0,1] (or a list of [3,h,w] of any sizes) -> [N, 2048].

        Each reference is embedded on its own (or in fixed-size packed calls), so a reference's
        embedding does not depend on the bank it was computed with. Returned on CPU, float32.
        """
        refs_list = self._as_image_list(refs, "refs")
        if not refs_list:
            return torch.zeros((0, self.model.config.degradation.out_dim))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(refs_list):
            by_size.setdefault(tuple(r.shape[-2:]), []).append(i)
        out = torch.empty((len(refs_list), self.model.config.degradation.out_dim))
        for rows in by_size.values():
            x = torch.stack([refs_list[i] for i in rows]).to(self.device, torch.float32)
            emb = self._run(self.model.degradation, [x], [[j] for j in range(len(rows))])
            out[torch.tensor(rows)] = emb.float().cpu()
        return out

    @staticmethod
    def _as_image_list(imgs: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
        what = f"{name} must be a [N,3,h,w] float tensor in [0,1] or a list of [3,h,w] ones"
        if isinstance(imgs, Tensor):
            if imgs.dim() != 4 or imgs.shape[1] != 3:
                raise ValueError(f"{name} must be [N,3,h,w] in [0,1], got shape {tuple(imgs.shape)}")
            degrade.check_unit_images(imgs, name)
            return list(imgs)
        if isinstance(imgs, (str, bytes)) or not isinstance(imgs, Sequence):
            raise ValueError(f"{what}, got {type(imgs).__name__} (an HxWx3 uint8 array a: {_FROM_HWC})")
        out = []
        for i, r in enumerate(imgs):
            if not isinstance(r, Tensor):
                got = f"{type(r).__name__} at [{i}]"
                raise ValueError(f"{what}, got {got} (an HxWx3 uint8 array a: {_FROM_HWC})")
            r = r[0] if r.dim() == 4 and r.shape[0] == 1 else r
            if r.dim() != 3 or r.shape[0] != 3:
                raise ValueError(f"{name}[{i}] must be [3,h,w] in [0,1], got shape {tuple(r.shape)}")
            degrade.check_unit_images(r, f"{name}[{i}]")
            out.append(r)
        return out

    @torch.inference_mode()
    def generate(
        self,
        hr: Tensor,
        refs: Tensor | Sequence[Tensor] | None = None,
        *,
        k: int = 4,
        tau_range: tuple[int, int] = (0, 300),
        seeds: Sequence[int],
        ref_embeddings: Tensor | None = None,
        weights: tuple[float, float] = (1.0, 1.0),
        start_kind: str = "realesrgan",
        return_candidates: bool = False,
        starts: Tensor | None = None,
        start_bank: Sequence[dict] | None = None,
        start_bank_errors: Tensor | None = None,
        filter_norm: bool = True,
    ) -> GenerationResult:
        """Generate one realistic LR per HR (best of k candidates).

        Args:
            hr: [B,3,H,W] in [0,1]; modcropped (bottom/right) to a multiple of the scale.
            refs: real LR references, one per sample ([B,3,h,w], a list of B [3,h,w] of any sizes,
                or a single reference [1,3,h,w] shared by all samples).
            k: candidates per sample (k = 1 disables the filter).
            tau_range: (lo, hi), inclusive 0-based start indices; τ ~ U{lo..hi} per candidate.
                τ = 0 means no diffusion: the candidate is its start, D(HR, θ). (Noising to schedule
                index 0 and denoising it changed a start by ~1.1 grey levels std, measured: the UNet
                leaves most of that step's noise, σ ≈ 1.3 grey levels, in; docs/realism.md, "τ = 0".)
            seeds: one int per sample; the sample's every draw comes from ``Generator().manual_seed(seed)``.
            ref_embeddings: E_deg of the references ([B,2048] or [1,2048]), instead of ``refs``
                (from ``degradation_embeddings``, so a pipeline embeds its reference bank once).
            weights: (w_content, w_degradation) of the filter's combined error.
            start_kind: the kind of D that degrades the HR into x_start.
            return_candidates: also return all k candidates ([B,k,3,h,w]).
            starts: D(HR_i, θ_ij) already computed elsewhere (``start_images(hr, draw_starts(...)[2])``,
                e.g. in the job's CPU decode stage), [B,k,3,h,w] in [0,1]; τ and θ are still
                drawn here (cheap) so that the sampling noise that follows them is the same.
            start_bank: with ``start_kind="domain"``: the start θs of a domain calibration
                (``realdgen_core.calibrate``); each sample's k candidates start from the bank entries
                whose D(HR_i, θ) is closest to its reference in E_deg space (one per candidate, best
                first). τ and a noise seed per candidate are still drawn from the sample's generator.
            start_bank_errors: [B, len(start_bank)] E_deg errors of the bank already computed for
                these samples and references (``calibrate.bank_errors``), e.g. reused across τ.
            filter_norm: divide each error by its mean over the sample's k candidates before
                weighting, so the two terms weigh as ``weights`` say whatever their scales (the
                default). Raw errors (False) are not the paper's "smallest errors" in both terms:
                E_deg errors are ~1e4x smaller than E_cont errors for the demo checkpoint, so raw
                1:1 keeps the candidate of least content error whatever the reference.
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            self._sync()
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

        cfg = self.model.config
        s = self.scale
        hr, b = self._check_generate_args(hr, k, tau_range, seeds, weights, start_kind)
        if (refs is None) == (ref_embeddings is None):
            raise ValueError("pass exactly one of refs or ref_embeddings")
        hr = degrade.modcrop(hr, s).to(torch.float32)
        H, W = hr.shape[-2:]
        h, w = H // s, W // s

        # 1. Per-sample draws: τ then θ for each candidate, from the sample's own generator.
        domain_start = start_kind == "domain"
        if domain_start:
            if start_bank is None:
                raise ValueError("start_kind='domain' needs start_bank (a domain calibration's start θs)")
            if starts is not None:
                raise ValueError("start_kind='domain' chooses its starts here; do not pass starts")
            calibrate.check_bank(start_bank, s)
            if start_bank_errors is not None and tuple(start_bank_errors.shape) != (b, len(start_bank)):
                raise ValueError(
                    f"start_bank_errors must be [B, len(start_bank)] = {(b, len(start_bank))}, "
                    f"got {tuple(start_bank_errors.shape)}"
                )
        gens, tau, thetas = draw_starts(b, k, s, tau_range, seeds, "bicubic" if domain_start else start_kind)
        if domain_start:
            ref_emb_sel = self._reference_embeddings(refs, ref_embeddings, b)
            for i in range(b):
                if start_bank_errors is not None:
                    errs = start_bank_errors[i]
                else:
                    errs = calibrate.bank_errors(
                        self.model.degradation, hr[i : i + 1], ref_emb_sel[i], start_bank, self.device
                    )
                idx = calibrate.choose_starts(errs, k)
                # the bicubic draw above consumed one noise seed per candidate: reuse it
                thetas[i] = [
                    calibrate.instantiate(start_bank[j], thetas[i][c]["noise_seed"])
                    for c, j in enumerate(idx)
                ]
        if starts is None:
            starts = start_images(hr, thetas)
        elif tuple(starts.shape) != (b, k, 3, h, w):
            raise ValueError(f"starts must be [B,k,3,h,w] = {(b, k, 3, h, w)}, got {tuple(starts.shape)}")
        else:
            degrade.check_unit_images(starts, "starts")
        x_start = (starts.reshape(b * k, 3, h, w).to(self.device, torch.float32) * 2.0 - 1.0).contiguous()
        lap("degrade")
        if self.device_noise:
            # Sampling noise from one device generator per sample, seeded by the sample's CPU
            # generator after its τ/θ draws: draws happen on the device, no host copies.
            gens = [
                torch.Generator(self.device).manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
                for g in gens
            ]

        # 2. Condition c = M(E_cont(HR), E_deg(ref)), one row per sample.
        hr_dev = hr.to(self.device)
        per_sample = [[i] for i in range(b)]
        content_hr = self._run(self.model.content.encode, [hr_dev], per_sample)
        lap("content")
        ref_emb = ref_emb_sel if domain_start else self._reference_embeddings(refs, ref_embeddings, b)
        ref_emb = ref_emb.to(self.device)
        lap("degradation")
        cond = self._run(self.model.modulation, [content_hr, ref_emb], per_sample)
        lap("modulation")

        # 3. Sampling: all B·k candidates; per-row τ; noise from the owning sample's generator.
        m = cfg.unet.size_multiple
        cond_rows = cond.repeat_interleave(k, dim=0)
        x_start_p = _pad_to_multiple(x_start, m)
        cond_p = _pad_to_multiple(cond_rows, m)
        row_gens = [g for g in gens for _ in range(k)]
        sample_rows = [list(range(i * k, (i + 1) * k)) for i in range(b)]
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype
            else nullcontext()
        )

        def unet_rows(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
            if self.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
                c = c.contiguous(memory_format=torch.channels_last)
            with autocast:
                return self._unet(x_t, c, t).float().contiguous()

        batching = None
        diffused = tau.reshape(-1) > 0
        if not bool(diffused.any()):
            # τ = 0 everywhere: every candidate is its start; no UNet call (see the module docstring).
            x0 = x_start_p
        elif self.rows_per_call is None:
            # One call per sample per step (its active candidates); diffusion groups the rows.
            x0 = self.diffusion.sample(
                unet_rows,
                x_start_p,
                tau.reshape(-1),
                row_gens,
                cond={"c": cond_p},
                row_groups=sample_rows,
                sampler=self.sampler,
            )
        else:
            # Continuous batching: every UNet call holds exactly rows_per_call rows of any samples.
            batching = BatchingStats()
            x0 = self.diffusion.sample_continuous(
                unet_rows,
                x_start_p,
                tau.reshape(-1),
                row_gens,
                rows_per_call=self.rows_per_call,
                cond={"c": cond_p},
                sampler=self.sampler,
                stats=batching,
            )
        cands = quantize_8bit((x0[..., :h, :w].float() + 1.0) * 0.5)
        if bool(diffused.any()) and not bool(diffused.all()):
            # Mixed τ: the τ = 0 rows take their start as it is. They were sampled along with the others (a
            # sample's noise draws, and so its τ > 0 rows' pixels, do not depend on which τ are 0).
            kept = quantize_8bit((x_start[~diffused.to(x_start.device)] + 1.0) * 0.5)
            cands[~diffused.to(cands.device)] = kept.to(cands)
        lap("unet")

        # 4. Best-of-k filter on the 8-bit candidates (what would be written).
        content_c = self._run(lambda x: self.model.content.encode(bicubic_up(x, s)), [cands], sample_rows)
        deg_c = self._run(self.model.degradation, [cands], sample_rows)
        content_err = (
            (content_c.float() - content_hr.float().repeat_interleave(k, 0)).pow(2).flatten(1).mean(1)
        )
        deg_err = (deg_c.float() - ref_emb.float().repeat_interleave(k, 0)).pow(2).mean(1)
        content_err = content_err.view(b, k).cpu()
        deg_err = deg_err.view(b, k).cpu()
        if filter_norm:
            eps = torch.finfo(torch.float32).tiny
            combined = float(weights[0]) * content_err / content_err.mean(1, keepdim=True).clamp_min(eps)
            combined = combined + float(weights[1]) * deg_err / deg_err.mean(1, keepdim=True).clamp_min(eps)
        else:
            combined = float(weights[0]) * content_err + float(weights[1]) * deg_err
        kept = torch.argmin(combined, dim=1)
        cands = cands.view(b, k, 3, h, w).cpu()
        lr = cands[torch.arange(b), kept].contiguous()
        lap("filter")
        timings["total"] = sum(timings.values())
        return GenerationResult(
            lr=lr,
            content_errors=content_err,
            degradation_errors=deg_err,
            kept=kept,
            tau=tau,
            thetas=thetas,
            candidates=cands if return_candidates else None,
            timings=timings,
            batching=batching,
        )

    # ------------------------------------------------------------------ validation
    def _check_generate_args(self, hr, k, tau_range, seeds, weights, start_kind) -> tuple[Tensor, int]:
        if not isinstance(hr, Tensor) or hr.dim() != 4 or hr.shape[1] != 3:
            shape = tuple(hr.shape) if isinstance(hr, Tensor) else type(hr).__name__
            raise ValueError(f"hr must be a [B,3,H,W] tensor in [0,1], got {shape}")
        degrade.check_unit_images(hr, "hr")
        b = hr.shape[0]
        s = self.scale
        if hr.shape[-2] < s or hr.shape[-1] < s:
            raise ValueError(f"hr of size {tuple(hr.shape[-2:])} is smaller than the scale {s}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        # the UNet never saw a timestep at or past max_train_timestep (training draws t below it)
        n_t = self.model.config.diffusion.max_train_timestep
        if len(tau_range) != 2 or not all(_is_int(t) for t in tau_range):
            raise ValueError(f"tau_range must be two ints (lo, hi), got {tau_range!r}")
        if not 0 <= int(tau_range[0]) <= int(tau_range[1]) < n_t:
            raise ValueError(
                f"tau_range must be (lo, hi) with 0 <= lo <= hi < {n_t} (the checkpoint's "
                f"max_train_timestep: its UNet was trained on t < {n_t}), got {tau_range!r}"
            )
        if len(seeds) != b:
            raise ValueError(f"seeds must hold one int per sample ({b}), got {len(seeds)}")
        if not all(_is_int(x) for x in seeds):
            raise ValueError(f"seeds must be ints, got {list(seeds)!r}")
        if (
            len(weights) != 2
            or not all(math.isfinite(float(w)) for w in weights)
            or min(float(weights[0]), float(weights[1])) < 0
        ):
            raise ValueError(
                f"weights must be two non-negative floats (content, degradation), got {weights!r}"
            )
        if start_kind not in (*degrade.KINDS, "domain"):
            raise ValueError(f"start_kind must be one of {(*degrade.KINDS, 'domain')}, got {start_kind!r}")
        return hr, b

    def _reference_embeddings(self, refs, ref_embeddings: Tensor | None, b: int) -> Tensor:
        """E_deg of the references, [B, D] float32 on CPU."""
        if ref_embeddings is None:
            emb = self.degradation_embeddings(refs)
        else:
            emb = torch.as_tensor(ref_embeddings).detach().float().cpu()
        return self._broadcast_refs(emb, b)

    def _broadcast_refs(self, emb: Tensor, b: int) -> Tensor:
        d = self.model.config.degradation.out_dim
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2 or emb.shape[1] != d or emb.shape[0] not in (1, b):
            raise ValueError(f"reference embeddings must be [{b},{d}] or [1,{d}], got {tuple(emb.shape)}")
        return emb.expand(b, d).contiguous() if emb.shape[0] == 1 else emb
