"""The reference bank: every reference decoded once (one Ray task, on a GPU when the actors have
one) and, for realdgen, embedded by E_deg; the bank goes to the actors through the object store."""

from __future__ import annotations

import numpy as np

from pipelines.sources import ImageError, SourceItem, load_image
from pipelines.storage import fetch_to_local

__all__ = ["prepare_references"]


def prepare_references(
    refs: list[dict], kind: str, checkpoint: str | None, storage: dict, max_pixels: int, device: str
) -> tuple[list[int], list[str], np.ndarray | None]:
    """Decode every reference once: ``(ok indices, failure reasons, E_deg bank [n_ok, D] or None)``."""
    import torch

    ok: list[int] = []
    errors: list[str] = []
    images = []
    for i, r in enumerate(refs):
        try:
            img = load_image(SourceItem.from_row(r), storage, max_pixels=max_pixels)
        except ImageError as exc:
            errors.append(f"{r['uri']}: {exc.reason}")
            continue
        ok.append(i)
        if kind == "realdgen":
            images.append(torch.from_numpy(img).permute(2, 0, 1).float().div(255.0))
    bank = None
    if kind == "realdgen" and images:
        from realdgen_core.generator import LRGenerator

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = LRGenerator.from_checkpoint(fetch_to_local(checkpoint, storage), device=device)
        bank = gen.degradation_embeddings(images).numpy().astype(np.float32)
    return ok, errors, bank
