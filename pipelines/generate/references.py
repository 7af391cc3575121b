"""The reference bank: every reference decoded once (one Ray task, on a GPU when the actors have
one) and, for realdgen, embedded by E_deg; the bank goes to the actors through the object store.

With ``generator.start_choice: domain`` the same task also measures each reference domain's start
profile (``realdgen_core.calibrate.domain_start_profile``) on the plan's probe HR tiles, so the
choice is made once, before any sample is generated, from all of the domain's references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.sources import ImageError, SourceItem, load_image
from pipelines.storage import fetch_to_local

__all__ = ["REFERENCE_MAX_SIDE", "REFERENCE_MIN_SIDE", "prepare_references", "profile_key", "reference_view"]

# E_deg runs at a reference's full resolution (16 residual blocks of 64 channels, then a global
# pool): about 670 B of memory and 10 ms of one CPU core per pixel. A 12 MP photo used as a
# reference needed 8 GB and a 48 MP one ran a 24 GB machine out of memory. A degradation is local,
# so a larger reference is read from its centre crop of at most this many pixels on a side
# (1 MP, under 1 GB); the LR references of real-SR sets (a few hundred pixels a side) are whole.
REFERENCE_MAX_SIDE = 1024
# Smaller than this on a side, an image holds too little to read a degradation from (a few
# pixels; E_deg's receptive field alone is 33 px): skipped like one that does not decode.
REFERENCE_MIN_SIDE = 8


def profile_key(domain: str | None, ref_set: str) -> str:
    """Which start profile a reference (or a sample, by its reference) belongs to: its domain
    label, or its reference set when it has none."""
    return f"domain:{domain}" if domain is not None else f"set:{ref_set}"


def _probe_tiles(
    probe: Sequence[Mapping],
    storage: dict,
    max_pixels: int,
    tile_hr: int,
    n_tiles: int | None = None,
    max_bytes: int | None = None,
) -> list:
    """``tile_hr`` squares of the probe inputs as [3,H,W] floats: with ``n_tiles`` None, the centre
    square of each input; otherwise ``n_tiles`` squares shared over the inputs in order and spread
    over each (``calibrate.spread_probe_crops``). Inputs that fail to decode or are smaller than one
    tile are left out (the job skips them too)."""
    import torch

    from realdgen_core import calibrate

    def decoded():
        for row in probe:
            try:
                yield load_image(
                    SourceItem.from_row(row), storage, max_pixels=max_pixels, max_bytes=max_bytes
                )
            except ImageError:
                yield None

    if n_tiles:
        crops = calibrate.spread_probe_crops(decoded(), len(probe), tile_hr, n_tiles)
    else:
        crops = []
        for img in decoded():
            if img is None or img.shape[0] < tile_hr or img.shape[1] < tile_hr:
                continue
            y, x = (img.shape[0] - tile_hr) // 2, (img.shape[1] - tile_hr) // 2
            crops.append(np.array(img[y : y + tile_hr, x : x + tile_hr]))  # a writable copy
    return [torch.from_numpy(c).permute(2, 0, 1).float().div(255.0) for c in crops]


def reference_view(img: np.ndarray) -> np.ndarray:
    """The part of a decoded reference (HxWx3) E_deg reads: the image itself, or its centre crop
    of ``REFERENCE_MAX_SIDE`` on the longer sides; :class:`ImageError` when it is smaller than
    ``REFERENCE_MIN_SIDE`` on a side."""
    h, w = img.shape[:2]
    if min(h, w) < REFERENCE_MIN_SIDE:
        raise ImageError(
            f"too small: {w}x{h} px, a reference needs at least {REFERENCE_MIN_SIDE} px on a side "
            "to read a degradation from"
        )
    ch, cw = min(h, REFERENCE_MAX_SIDE), min(w, REFERENCE_MAX_SIDE)
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y : y + ch, x : x + cw]


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch intra-op threads set to ``threads`` (None: unchanged) inside, the caller's after."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare_references(
    refs: list[dict],
    kind: str,
    checkpoint: str | None,
    storage: dict,
    max_pixels: int,
    device: str,
    start: Mapping[str, Any] | None = None,
    threads: int | None = None,
    max_bytes: int | None = None,
) -> tuple[list[int], list[str], np.ndarray | None, dict, list[int]]:
    """Decode every reference once: ``(ok indices, failure reasons, E_deg bank [n_ok, D] or None,
    start profiles, indices of the references read from their centre crop)``.

    ``start``: ``{bank, probe (HR input rows), tile_hr, n_tiles, ref_weighting, aggregate}`` when the job
    chooses its start per domain (``ref_weighting`` ``sensitivity``: references weighted by
    ``calibrate.reference_weights``; ``uniform``: all the same; ``aggregate``: ``rank`` or
    ``distance``, see ``calibrate.domain_start_profile``; ``n_tiles``: the probe tiles shared over the
    probe inputs, None = one centre tile each, see ``_probe_tiles``);
    the profiles are then ``{profile_key: domain_start_profile(...) + {"label": ...}}`` (empty when
    no probe tile could be read: the job then chooses per sample).

    ``max_pixels`` / ``max_bytes``: the job's ``limits`` for every image read here (references
    and probe inputs), as for the HR inputs. For realdgen a reference is read through
    :func:`reference_view` (centre crop of ``REFERENCE_MAX_SIDE``; too small: skipped); the other
    kinds only pair with the references and read them whole.

    ``threads``: torch intra-op threads for this call on the CPU (the task runs before the pipeline
    starts, so the job gives it the CPUs the generation will use; restored afterwards).
    """
    import torch

    ok: list[int] = []
    errors: list[str] = []
    cropped: list[int] = []
    # Each reference is embedded as soon as it is decoded and its pixels dropped: the task holds
    # one reference image at a time and 2 x 8 KiB of embeddings per reference, whatever their number.
    embs: list[torch.Tensor] = []
    probe_embs: list[torch.Tensor] = []
    gen = None
    tiles: list = []
    weigh = bool(start) and start.get("ref_weighting", "sensitivity") == "sensitivity"
    with _torch_threads(threads):
        for i, r in enumerate(refs):
            try:
                img = load_image(SourceItem.from_row(r), storage, max_pixels=max_pixels, max_bytes=max_bytes)
                if kind == "realdgen":
                    whole = img.shape[:2]
                    img = reference_view(img)
                    if img.shape[:2] != whole:
                        cropped.append(i)
            except ImageError as exc:
                errors.append(f"{r['uri']}: {exc.reason}")
                continue
            ok.append(i)
            if kind != "realdgen":
                continue
            if gen is None:
                gen, tiles = _embedder(checkpoint, storage, device, start, max_pixels, max_bytes)
            # np.array: a writable copy (a decoded array may be read-only)
            t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)
            del img
            embs.append(gen.degradation_embeddings([t]))
            if tiles and weigh:
                probe_embs.append(gen.reference_probe_embeddings([t]))
        if gen is None:
            return ok, errors, None, {}, cropped
        emb = torch.cat(embs)
        bank = emb.numpy().astype(np.float32)
        profiles: dict = {}
        if tiles:
            probe_emb = torch.cat(probe_embs) if weigh else None
            groups: dict[str, list[int]] = {}
            for j, i in enumerate(ok):
                groups.setdefault(profile_key(refs[i].get("domain"), refs[i]["set"]), []).append(j)
            for key, rows in groups.items():
                profiles[key] = gen.domain_start(
                    tiles,
                    None,
                    start["bank"],
                    ref_weighting=start.get("ref_weighting", "sensitivity"),
                    aggregate=start.get("aggregate", "rank"),
                    ref_embeddings=emb[rows],
                    ref_probe_embeddings=probe_emb[rows] if probe_emb is not None else None,
                )
    return ok, errors, bank, profiles, cropped


def _embedder(
    checkpoint: str | None,
    storage: dict,
    device: str,
    start: Mapping[str, Any] | None,
    max_pixels: int,
    max_bytes: int | None,
) -> tuple[Any, list]:
    """The generator that embeds the references, and the probe HR tiles of the start choice (none
    without ``start``): made when the first reference decodes, so a job whose references all fail
    reads neither."""
    import torch

    from realdgen_core.generator import LRGenerator

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = LRGenerator.from_checkpoint(fetch_to_local(checkpoint, storage), device=device)
    if not start:
        return gen, []
    tile_hr, n_tiles = int(start["tile_hr"]), start.get("n_tiles")
    return gen, _probe_tiles(start["probe"], storage, max_pixels, tile_hr, n_tiles, max_bytes)
