"""Training batches: random crops of in-memory images, and LR made on the fly by D or the camera stand-in.

A *crop sampler* is any callable ``sampler(n, size, generator) -> Tensor[n, 3, size, size]`` (float32,
[0, 1]) that draws every choice from ``generator``. The stages only see samplers, so the same loop reads
a folder of photos here, lazily read shards in ``pipelines/train.py``, or LR synthesised on the fly.
Reading files is not done here (``realdgen_core`` has no storage code): ``pipelines`` decodes images
and hands arrays or a lazy reader in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class CropSampler(Protocol):
    def __call__(self, n: int, size: int, generator: torch.Generator) -> Tensor: ...


def to_tensor(img: np.ndarray) -> Tensor:
    """uint8 HWC RGB -> float32 [3, H, W] in [0, 1]."""
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3, got {img.dtype} {img.shape}")
    return torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div_(255.0)


def to_uint8(x: Tensor) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> uint8 HWC (rounded, clamped)."""
    return x.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def bicubic_up(lr: Tensor, scale: int) -> Tensor:
    """Bicubic upsampling by ``scale`` (torch, align_corners=False), clamped to [0, 1]."""
    return F.interpolate(lr, scale_factor=float(scale), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)


def random_crop(img: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """One random ``size`` x ``size`` crop of [3, H, W] (H, W >= size), offsets from ``generator``."""
    _, h, w = img.shape
    y = int(torch.randint(0, h - size + 1, (), generator=generator))
    x = int(torch.randint(0, w - size + 1, (), generator=generator))
    return img[:, y : y + size, x : x + size]


class ArrayCropSampler:
    """Uniformly random crops (image drawn uniformly, then an offset) of images held in memory.

    Images smaller than a requested crop are never picked for it; if none is large enough the call
    raises ``ValueError`` naming the size. ``flip`` adds a random horizontal flip.
    """

    def __init__(self, images: Sequence[np.ndarray | Tensor], flip: bool = True) -> None:
        if not images:
            raise ValueError("ArrayCropSampler needs at least one image")
        self.images = [to_tensor(im) if isinstance(im, np.ndarray) else im.float() for im in images]
        self.flip = flip

    def __len__(self) -> int:
        return len(self.images)

    def __call__(self, n: int, size: int, generator: torch.Generator) -> Tensor:
        fits = [i for i, im in enumerate(self.images) if min(im.shape[-2:]) >= size]
        if not fits:
            raise ValueError(
                f"no image is at least {size}x{size} (largest: "
                f"{max(min(im.shape[-2:]) for im in self.images)})"
            )
        out = []
        for _ in range(n):
            img = self.images[fits[int(torch.randint(0, len(fits), (), generator=generator))]]
            crop = random_crop(img, size, generator)
            if self.flip and bool(torch.randint(0, 2, (), generator=generator)):
                crop = crop.flip(-1)
            out.append(crop)
        return torch.stack(out).contiguous()


def child_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """``n`` fresh generators seeded from draws of ``generator`` (one per image, as D wants)."""
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def degrade_mixed(
    hr: Tensor, kinds: Sequence[str], scale: int, generators: Sequence[torch.Generator]
) -> tuple[Tensor, list[dict]]:
    """D with a per-image kind: groups the batch by kind and calls ``degrade.degrade`` per group."""
    from realdgen_core import degrade as D

    if len(kinds) != hr.shape[0] or len(generators) != hr.shape[0]:
        raise ValueError("degrade_mixed needs one kind and one generator per image")
    out: list[Tensor | None] = [None] * hr.shape[0]
    thetas: list[dict | None] = [None] * hr.shape[0]
    for kind in dict.fromkeys(kinds):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        lr, th = D.degrade(hr[idx], kind, scale, [generators[i] for i in idx])
        for j, i in enumerate(idx):
            out[i], thetas[i] = lr[j], th[j]
    return torch.stack(out), thetas  # type: ignore[arg-type]


def draw_kinds(kinds: Sequence[str], n: int, generator: torch.Generator) -> list[str]:
    """``n`` kinds drawn uniformly from ``kinds``."""
    return [kinds[int(i)] for i in torch.randint(0, len(kinds), (n,), generator=generator)]


class SyntheticLRSampler:
    """LR crops D(HR crop, θ) with a fresh θ per crop: ``hr`` gives crops of ``size * scale``."""

    def __init__(self, hr: CropSampler, kinds: Sequence[str], scale: int) -> None:
        self.hr, self.kinds, self.scale = hr, tuple(kinds), scale

    def __call__(self, n: int, size: int, generator: torch.Generator) -> Tensor:
        hr = self.hr(n, size * self.scale, generator)
        lr, _ = degrade_mixed(
            hr, draw_kinds(self.kinds, n, generator), self.scale, child_generators(generator, n)
        )
        return lr


class CameraLRSampler:
    """LR crops from the camera stand-in (``realdgen_core.camera``) — a stand-in for real LR, not real LR."""

    def __init__(self, hr: CropSampler, scale: int) -> None:
        self.hr, self.scale = hr, scale

    def __call__(self, n: int, size: int, generator: torch.Generator) -> Tensor:
        from realdgen_core.camera import camera_standin

        hr = self.hr(n, size * self.scale, generator)
        lr, _ = camera_standin(hr, self.scale, child_generators(generator, n))
        return lr


class MixtureSampler:
    """Each crop comes from sampler i with probability weights[i] (drawn per crop)."""

    def __init__(self, samplers: Sequence[CropSampler], weights: Sequence[float] | None = None) -> None:
        if not samplers:
            raise ValueError("MixtureSampler needs at least one sampler")
        w = torch.tensor(list(weights) if weights is not None else [1.0] * len(samplers), dtype=torch.float64)
        if w.numel() != len(samplers) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"MixtureSampler weights must be non-negative, one per sampler: {weights!r}")
        self.samplers, self.weights = list(samplers), w / w.sum()

    def __call__(self, n: int, size: int, generator: torch.Generator) -> Tensor:
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator).tolist()
        out: list[Tensor | None] = [None] * n
        for s in sorted(set(which)):
            idx = [i for i, w in enumerate(which) if w == s]
            crops = self.samplers[s](len(idx), size, generator)
            for j, i in enumerate(idx):
                out[i] = crops[j]
        return torch.stack(out)  # type: ignore[arg-type]
