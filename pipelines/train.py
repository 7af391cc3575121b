"""Train RealDGen (stages A, B, C) from a `kind: train` manifest, locally or with Ray Train (DDP).

    python pipelines/train.py m.yaml                                    # all stages, this process
    python pipelines/train.py m.yaml --stages B,C                       # these stages (A done in run_dir)
    python pipelines/train.py manifests/train_demo.yaml --overwrite-checkpoint  # the demo checkpoint again
    python pipelines/train.py manifests/adapt.yaml                      # domain adaptation (stage C)
    python pipelines/train.py m.yaml --set compute.backend=ray --set compute.num_workers=4

Run folder (``output.run_dir``, local or ``s3://``)::

    latest.json                     pointer to the newest complete checkpoint (written last)
    ckpt-<NNNNNNNNN>/model.safetensors  model tensors (realdgen_core.checkpoint)
    ckpt-<NNNNNNNNN>/state.pt       optimiser, EMA, step, RNG of the running phase (weights_only)
    logs/<phase>.csv                one row per logged step: step, seconds, losses

A re-run with the same manifest resumes from ``latest.json``: finished phases are skipped and the
running phase continues at its saved step with its saved optimiser/EMA/RNG state. The checkpoint
counter NNNNNNNNN is global over phases, so names sort in run order. Another manifest in the same
run folder is refused (its digest is recorded).

Data: ``data.hr`` and ``data.lr`` components are listed with ``pipelines.sources``; images are
decoded lazily by each worker with a bounded in-memory cache. A broken or too-small image is
skipped and counted (reported at the end), never fatal — unless a source has no usable image.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

if __package__ in (None, ""):  # `python pipelines/train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsspec.implementations.local import LocalFileSystem

from pipelines.manifest import ManifestError, TrainManifest, add_set_option, load_manifest, manifest_digest
from pipelines.sources import ImageError, SourceError, SourceItem, list_source, load_image, name_below_root
from pipelines.storage import (
    EXIT_TEMPFAIL,
    StorageAccessError,
    TransientStorageError,
    get_fs,
    join_uri,
    with_retries,
)
from realdgen_core.checkpoint import CheckpointError
from realdgen_core.train import PHASES, STAGES, Hook, Phase, run_phase
from realdgen_core.train.data import (
    CameraLRSampler,
    MixtureSampler,
    SyntheticLRSampler,
    random_crop,
    to_tensor,
)
from realdgen_core.train.loop import (
    floats,
    load_model_weights,
    read_training_state,
    save_model,
    save_training_state,
)

LATEST = "latest.json"
CKPT_NAME = re.compile(r"ckpt-[0-9]{9}")  # the only names latest.json may point at (no paths)
SUMMARY = "summary.json"  # written by rank 0 of a Ray Train run


# --------------------------------------------------------------------------------------------
# Data: lazily decoded images as a crop sampler
# --------------------------------------------------------------------------------------------


CACHE_MAX_BYTES = 2 << 30  # decoded images kept per sampler (and per DataLoader worker), at most


class DataError(ValueError):
    """A source has no image the run can use (all broken or smaller than the crop): the user's data,
    reported as one ``error:`` line."""


class SourceCropSampler:
    """Random crops of the images of a source, decoded on first use and kept in an LRU cache (as
    uint8, a quarter of float32's bytes: a 12 MP photo holds 36 MB; crops are converted to float).

    Broken images are remembered, skipped and counted in ``skipped`` (reason category -> count);
    images smaller than a requested crop are skipped for that size. Every choice is drawn from the
    generator passed in, so the sequence of crops is reproducible for a given listing.
    """

    def __init__(
        self,
        items: Sequence[SourceItem],
        storage: dict | None,
        cache: int,
        max_pixels: int,
        name: str,
        flip: bool = True,
    ) -> None:
        if not items:
            raise ValueError(f"{name}: the source lists no images")
        self.items, self.storage, self.cache_size, self.max_pixels = list(items), storage, cache, max_pixels
        self.name, self.flip = name, flip
        self.cache: OrderedDict[int, torch.Tensor] = OrderedDict()  # uint8 [3, H, W]
        self.cache_bytes = 0
        self.bad: set[int] = set()
        self.small: dict[int, set[int]] = {}
        self.skipped: Counter[str] = Counter()

    def _image(self, i: int) -> torch.Tensor | None:
        """Image ``i`` as uint8 [3, H, W] (None when it does not decode)."""
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        try:
            arr = load_image(self.items[i], self.storage, max_pixels=self.max_pixels)
            img = torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # a writable copy
        except ImageError as exc:
            self.bad.add(i)
            self.skipped[exc.category] += 1
            print(f"[train] skipping {self.items[i].uri}: {exc.reason}", file=sys.stderr)
            return None
        self.cache[i] = img
        self.cache_bytes += img.numel()
        # bounded by count (data.cache_images) and by bytes: 512 phone photos would be 18 GB
        while self.cache and (len(self.cache) > self.cache_size or self.cache_bytes > CACHE_MAX_BYTES):
            self.cache_bytes -= self.cache.popitem(last=False)[1].numel()
        return img

    def __call__(self, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
        out = []
        small = self.small.setdefault(size, set())
        while len(out) < n:
            if len(self.bad | small) >= len(self.items):
                raise DataError(
                    f"{self.name}: no usable image of at least {size}x{size} "
                    f"({len(self.bad)} broken, {len(small)} too small)"
                )
            i = int(torch.randint(0, len(self.items), (), generator=generator))
            if i in self.bad or i in small:
                continue
            img = self._image(i)
            if img is None:
                continue
            if min(img.shape[-2:]) < size:
                small.add(i)
                self.skipped[f"too small for {size}px crops"] += 1
                continue
            crop = random_crop(img, size, generator).float().div_(255.0)  # = to_tensor's values
            if self.flip and bool(torch.randint(0, 2, (), generator=generator)):
                crop = crop.flip(-1)
            out.append(crop)
        return torch.stack(out).contiguous()


Listings = dict[str, list[SourceItem]]  # a SourceSpec's JSON -> its listing, within one run


def listed(spec, storage: dict, listings: Listings | None = None) -> list[SourceItem]:
    """``list_source(spec)``, taken from (and kept in) ``listings`` when given: the preflight's
    listing serves the training and the calibration of the same process (a large S3 prefix is
    listed once, not three times)."""
    if listings is None:
        return list_source(spec, storage)
    key = spec.model_dump_json()
    if key not in listings:
        listings[key] = list_source(spec, storage)
    return listings[key]


def build_samplers(
    m: TrainManifest, scale: int, stages: Sequence[str], listings: Listings | None = None
) -> dict[str, Any]:
    """{"hr": sampler or None, "lr": sampler or None, "sources": [SourceCropSampler...]} for this worker."""
    storage = m.storage.model_dump()
    made: list[SourceCropSampler] = []

    def source(spec, name: str) -> SourceCropSampler:
        s = SourceCropSampler(
            listed(spec, storage, listings), storage, m.data.cache_images, m.data.max_image_pixels, name
        )
        made.append(s)
        return s

    hr = source(m.data.hr, "data.hr") if m.data.hr is not None else None
    lr = None
    if "C" in stages:
        comps, weights = [], []
        for i, c in enumerate(m.data.lr):
            if c.kind == "images":
                comps.append(source(c.source, f"data.lr[{i}]"))
                if m.calibration.enabled:  # the validation split is the calibration's alone
                    split = calibration_split(comps[-1].items, m.calibration.val_fraction, c.source.uri)
                    comps[-1].items = split[0]
                    if not comps[-1].items:
                        raise ValueError(
                            f"data.lr[{i}]: no image left for training after the validation split"
                        )
            else:
                base = source(c.source, f"data.lr[{i}].source") if c.source is not None else hr
                comps.append(
                    SyntheticLRSampler(base, c.degradations, scale)
                    if c.kind == "synthetic"
                    else CameraLRSampler(base, scale)
                )
            weights.append(c.weight)
        lr = MixtureSampler(comps, weights)
    return {"hr": hr, "lr": lr, "sources": made}


def check_outputs(m: TrainManifest) -> None:
    """``output.checkpoint`` and ``output.run_dir`` on a local disk must be writable where they are
    named: neither may be (or lie under) a file, nor the checkpoint a folder. Checked before any
    training (found at the first export, the training done was lost to a run folder the corrected
    manifest could not resume)."""
    for key, uri, folder in (
        ("output.checkpoint", m.output.checkpoint, False),
        ("output.run_dir", m.output.run_dir, True),
    ):
        if not uri:
            continue
        fs, local = get_fs(uri, m.storage.model_dump())  # the path the run will write, resolved alike
        if not isinstance(fs, LocalFileSystem):
            continue
        path = Path(local)
        if path.is_dir() and not folder:
            raise ManifestError(f"{key}: {uri!r} is a folder; name the .safetensors file to write")
        if path.exists() and not path.is_dir() and folder:
            raise ManifestError(f"{key}: {uri!r} is a file, not a folder")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise ManifestError(f"{key}: {uri!r} lies under {str(parent)!r}, which is a file")
                break


def check_checkpoint_owner(m: TrainManifest, overwrite: bool) -> None:
    """``output.checkpoint`` may hold only this manifest's own export (a run resumed or run again):
    training replaces that file at its first export, so a model another run made there (the demo
    checkpoint a copied manifest still names, another domain's adaptation) is refused before any
    training unless ``overwrite`` (``--overwrite-checkpoint``)."""
    uri = m.output.checkpoint
    if not uri or overwrite:
        return
    from realdgen_core.checkpoint import inspect_checkpoint

    local = _fetch_checkpoint(m, "output.checkpoint", uri)
    if local is None:
        return
    try:
        _, meta, _ = inspect_checkpoint(local)
        owner = meta.get("manifest_digest")
        what = "a model of another training manifest" if owner else "a model not trained by this manifest"
    except (CheckpointError, OSError, ValueError):
        owner, what = None, "a file that is not a readable RealDGen checkpoint"
    if owner != manifest_digest(m):
        raise ManifestError(
            f"output.checkpoint: {uri!r} already holds {what}, which this run would replace at its "
            "first export (any setting changed since counts as another manifest: to continue a run, "
            "run its manifest as it was); name another file, or pass --overwrite-checkpoint to replace it"
        )


def check_tau_grid(m: TrainManifest, config) -> None:
    """The calibration's τ grid stays below the model's ``max_train_timestep`` (its UNet never saw a
    timestep past it; ``generate`` refuses one): found now, not after the whole of stage C."""
    n = config.diffusion.max_train_timestep
    bad = [t for t in m.calibration.tau_grid if int(t) >= n]
    if bad:
        raise ManifestError(
            f"calibration.tau_grid: {bad} at or past the model's max_train_timestep ({n}): its UNet was "
            f"trained on t < {n}; use steps up to {n - 1}"
        )


def _fetch_checkpoint(m: TrainManifest, key: str, uri: str) -> str | None:
    """A local copy of checkpoint ``uri`` (manifest key ``key``), or None when there is no file;
    storage refusing or unavailable is a :class:`ManifestError` naming the key."""
    from pipelines.storage import fetch_to_local

    storage = m.storage.model_dump()
    try:
        fs, path = get_fs(uri, storage)
        if not with_retries(lambda: fs.exists(path), what=f"checking {uri}"):
            return None
        return fetch_to_local(uri, storage)
    except TransientStorageError:  # storage away, the manifest fine: main says so (exit 75)
        raise
    except (StorageAccessError, OSError) as exc:
        raise ManifestError(f"{key}: {exc}") from None


def _checkpoint_config(m: TrainManifest, key: str, uri: str):
    """The model config in the header of checkpoint ``uri`` (manifest key ``key``): a missing,
    truncated or foreign file is a :class:`ManifestError` naming the key."""
    from realdgen_core.checkpoint import inspect_checkpoint

    local = _fetch_checkpoint(m, key, uri)
    if local is None:
        raise ManifestError(f"{key}: file not found (got {uri!r})")
    try:
        return inspect_checkpoint(local)[0]
    except (CheckpointError, OSError) as exc:
        raise ManifestError(f"{key}: {exc}") from None


def check_calibrated_checkpoint(m: TrainManifest) -> None:
    """``--calibrate-only``: output.checkpoint's header, and the τ grid against its model."""
    check_tau_grid(m, _checkpoint_config(m, "output.checkpoint", m.output.checkpoint))


def check_init_checkpoint(m: TrainManifest, calibrate: bool = False) -> None:
    """``init_checkpoint``'s header read before any training: a missing, truncated or foreign file is
    a :class:`ManifestError`, and the manifest's crop sizes are checked against the checkpoint's
    scale, which wins over the manifest's ``scale`` (they were checked against the ignored one).
    ``calibrate``: the calibration's τ grid is checked against the model too (either model)."""
    if not m.init_checkpoint:
        if calibrate:
            from realdgen_core.config import preset

            check_tau_grid(m, preset(m.preset, m.scale))
        return
    from pydantic import ValidationError

    config = _checkpoint_config(m, "init_checkpoint", m.init_checkpoint)
    if calibrate:
        check_tau_grid(m, config)
    if config.scale != m.scale:
        try:
            TrainManifest.model_validate({**m.model_dump(), "scale": config.scale})
        except ValidationError as exc:
            why = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ManifestError(
                f"init_checkpoint is a x{config.scale} model (it wins over scale {m.scale}): {why}"
            ) from None


def check_sources(
    m: TrainManifest, stages: Sequence[str], calibrate: bool, calibrate_only: bool = False
) -> Listings:
    """List every image source this run will read, before any work: a missing, unreadable or empty
    one is a :class:`ManifestError` naming its manifest key (not a worker's traceback later).
    Returns the listings, for the training and calibration of this process."""
    used: list[tuple[str, Any]] = []
    stage_c = "C" in stages
    synthetic_on_hr = any(c.kind != "images" and c.source is None for c in m.data.lr)
    # the smallest image side each trained source must offer at least once (its largest crop), or the
    # run would stop with "no usable image" only when the stage reading it starts (after hours of A/B);
    # HR sides depend on the scale, which an init_checkpoint sets: not checked then
    needs: dict[str, int] = {}
    hr_sides = [m.stage_a.hr_crop] if "A" in stages else []
    hr_sides += [m.stage_b.lr_crop * m.scale] if "B" in stages else []
    hr_sides += [m.stage_c.lr_crop * m.scale] if stage_c and synthetic_on_hr else []
    if m.data.hr is not None and ("A" in stages or "B" in stages or (stage_c and synthetic_on_hr)):
        used.append(("data.hr", m.data.hr))
        if not m.init_checkpoint and not calibrate_only:
            needs["data.hr"] = max(hr_sides)
    split: set[str] = set()  # sources whose listing the calibration splits (train / validation)
    for i, c in enumerate(m.data.lr):
        if c.source is not None and (stage_c or (calibrate and c.kind == "images")):
            used.append((f"data.lr.{i}.source", c.source))
            if c.kind == "images" and (calibrate or m.calibration.enabled):
                split.add(f"data.lr.{i}.source")
            if stage_c and not calibrate_only and (c.kind == "images" or not m.init_checkpoint):
                needs[f"data.lr.{i}.source"] = m.stage_c.lr_crop * (1 if c.kind == "images" else m.scale)
    if calibrate and m.calibration.hr is not None:
        used.append(("calibration.hr", m.calibration.hr))
    storage = m.storage.model_dump()
    listings: Listings = {}
    for key, spec in used:
        try:
            items = listed(spec, storage, listings)
        except (SourceError, OSError, ValueError, StorageAccessError) as exc:
            raise ManifestError(f"{key}: cannot list {spec.uri}: {exc}") from None
        if not items:
            exts = ", ".join(spec.extensions)
            raise ManifestError(f"{key}: no image under {spec.uri} (format {spec.format}, extensions {exts})")
        train, val = (
            calibration_split(items, m.calibration.val_fraction, spec.uri) if key in split else (items, [])
        )
        trained = train if key in split and m.calibration.enabled else items  # stage C reads that side
        if key in needs and trained:
            _check_usable(key, spec.uri, trained, needs[key], storage, m.data.max_image_pixels)
        if key in split:
            side = "validation" if not val else "training" if stage_c and not train else None
            off = "" if calibrate_only else " or set calibration.enabled=false"
            if side:
                raise ManifestError(
                    f"{key}: the calibration's {side} split of {spec.uri} is empty ({len(items)} image(s), "
                    f"calibration.val_fraction {m.calibration.val_fraction}); add images (two or more put "
                    f"one on each side){off}"
                )
            reasons = []
            for item in val:  # the first that decodes is enough: the calibration skips the others
                try:
                    load_image(item, storage, max_pixels=m.data.max_image_pixels)
                    break
                except ImageError as exc:
                    reasons.append(f"{item.uri}: {exc.reason}")
            else:
                raise ManifestError(
                    f"{key}: none of the {len(val)} image(s) of the calibration's validation split of "
                    f"{spec.uri} decodes (e.g. {reasons[0]}); replace them{off}"
                )
    return listings


class NoUsableImage(ManifestError):
    """A trained source holds no image (decodable, within the pixel limit) of its crop size."""


def _check_usable(
    key: str, uri: str, items: Sequence[SourceItem], side: int, storage: dict, max_pixels: int
) -> None:
    """At least one of ``items`` decodes to an image of at least ``side`` px each way (the first such
    ends the check: one decode for a healthy source); else a :class:`ManifestError` with the counts."""
    broken, small, example = 0, 0, ""
    for item in items:
        try:
            h, w = load_image(item, storage, max_pixels=max_pixels).shape[:2]
        except ImageError as exc:
            broken += 1
            example = example or f"{item.uri}: {exc.reason}"
            continue
        if min(h, w) >= side:
            return
        small += 1
        example = example or f"{item.uri}: {w}x{h}"
    raise NoUsableImage(
        f"{key}: no usable image of at least {side}x{side} px under {uri} ({broken} broken, {small} "
        f"smaller, of {len(items)}; e.g. {example}); the crop sizes are stage_a.hr_crop, stage_b/stage_c "
        "lr_crop (x scale on HR)"
    )


def calibration_split(items: Sequence[SourceItem], fraction: float, source_uri: str) -> tuple[list, list]:
    """(train, validation) items of a domain's LR source, by a hash of each item's name below the
    source root (``source_uri``), so a recalibration that spells or moves the folder differently
    holds out the same files."""
    from realdgen_core.calibrate import split_validation

    train, val = split_validation([name_below_root(source_uri, it.uri) for it in items], fraction)
    return [items[i] for i in train], [items[i] for i in val]


def _validation_images(
    m: TrainManifest, listings: Listings | None = None
) -> list[tuple[SourceCropSampler, int]]:
    """The readable images of the validation split of ``data.lr``, as (sampler, index): each is
    decoded once to check it and not kept (cache 0), so a large folder's split is never held."""
    storage = m.storage.model_dump()
    readable: list[tuple[SourceCropSampler, int]] = []
    for i, c in enumerate(m.data.lr):
        if c.kind != "images":
            continue
        items = listed(c.source, storage, listings)
        items = calibration_split(items, m.calibration.val_fraction, c.source.uri)[1]
        sampler = SourceCropSampler(items, storage, 0, m.data.max_image_pixels, f"data.lr[{i}]")
        readable += [(sampler, it) for it in range(len(items)) if sampler._image(it) is not None]
    if not readable:
        raise DataError("calibration: the validation split of data.lr holds no readable image")
    return readable


def _float_image(where: tuple[SourceCropSampler, int]) -> Tensor:
    img = where[0]._image(where[1])
    if img is None:  # readable a moment ago
        raise ValueError(f"calibration: {where[0].items[where[1]].uri} no longer decodes")
    return img.float().div_(255.0)


def calibration_refs(m: TrainManifest) -> list[Tensor]:
    """Every readable image of the validation split (float [3, H, W]); for analysis benches."""
    return [_float_image(w) for w in _validation_images(m)]


def calibration_inputs(
    m: TrainManifest, listings: Listings | None = None
) -> tuple[int, Tensor, list[Tensor]]:
    """What the domain calibration measures on: (the number of readable images in the validation
    split, the ``calibration.pairs`` HR crops, the reference drawn for each crop, decoded when
    drawn), seeded by ``m.seed``."""
    cal_m = m.calibration
    storage = m.storage.model_dump()
    g = torch.Generator().manual_seed(m.seed + 7919)
    readable = _validation_images(m, listings)
    if cal_m.hr is not None:
        hr_src = SourceCropSampler(
            listed(cal_m.hr, storage, listings),
            storage,
            m.data.cache_images,
            m.data.max_image_pixels,
            "calibration.hr",
        )
        hr = hr_src(cal_m.pairs, cal_m.hr_crop, g)
    else:
        from pipelines.demo_data import SPLITS, load_photo

        photos = [to_tensor(load_photo(n)) for n in SPLITS["calibration"]]
        photos = [p for p in photos if min(p.shape[-2:]) >= cal_m.hr_crop]
        if not photos:
            raise ValueError(f"calibration: no default photo is at least {cal_m.hr_crop}px")
        hr = torch.stack([random_crop(photos[i % len(photos)], cal_m.hr_crop, g) for i in range(cal_m.pairs)])
    drawn = [int(j) for j in torch.randint(0, len(readable), (cal_m.pairs,), generator=g)]
    decoded = {j: _float_image(readable[j]) for j in sorted(set(drawn))}
    pair_refs = [decoded[j] for j in drawn]  # a reference drawn twice is the same tensor, as before
    return len(readable), hr, pair_refs


FEW_VALIDATION_IMAGES = 8  # a calibration on fewer validation references says so


def calibrate_checkpoint(m: TrainManifest, listings: Listings | None = None) -> dict:
    """Choose τ for the domain of ``data.lr`` on its validation split and record the calibration
    (``realdgen_core.calibrate.DomainCalibration``) in ``output.checkpoint``'s metadata.

    The weights are untouched (same model digest); the job reads the calibration by default.
    """
    from pipelines.storage import fetch_to_local
    from realdgen_core import calibrate
    from realdgen_core.checkpoint import load_checkpoint, save_checkpoint
    from realdgen_core.diffusion import SamplerConfig
    from realdgen_core.generator import LRGenerator

    cal_m = m.calibration
    storage = m.storage.model_dump()
    t0 = time.time()
    n_refs, hr, pair_refs = calibration_inputs(m, listings)
    local = fetch_to_local(m.output.checkpoint, storage)
    model, meta = load_checkpoint(local)
    sampler = SamplerConfig(kind="ddim", steps=cal_m.sampler_steps, eta=1.0)
    gen = LRGenerator(model, sampler=sampler)
    bank = calibrate.start_bank(
        model.config.scale, cal_m.blur_sigmas, cal_m.jpeg_qualities, cal_m.sharpen_amounts
    )
    weights = (cal_m.content_weight, cal_m.degradation_weight)
    tau_max, scores = calibrate.calibrate_tau(
        gen, hr, pair_refs, bank, tau_grid=cal_m.tau_grid, k=cal_m.k, weights=weights, seed=m.seed
    )
    scores.update(
        validation_images=n_refs, seconds=round(time.time() - t0, 1), sampler_steps=cal_m.sampler_steps
    )
    # the job generates with the sampler τ was chosen with, unless its manifest sets one
    cal = calibrate.DomainCalibration(
        cal_m.domain, 0, tau_max, bank, weights, True, scores, sampler=sampler.to_dict()
    )
    meta = {k: v for k, v in meta.items() if k != "digest"}
    meta[calibrate.METADATA_KEY] = cal.to_dict()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.safetensors"
        save_checkpoint(out, model, meta)
        put_uri(out, m.output.checkpoint, storage)
    print(f"[train] calibration of {cal_m.domain!r}: tau_max {tau_max} ({scores})", file=sys.stderr)
    if n_refs < FEW_VALIDATION_IMAGES:
        print(
            f"[train] warning: τ was chosen on {n_refs} validation image(s) of {cal_m.domain!r} "
            f"(calibration.val_fraction {cal_m.val_fraction} of the domain's LR): its "
            f"{cal_m.pairs} pairs reuse so few references that the choice is mostly chance; give the "
            f"domain more LR images (at least {FEW_VALIDATION_IMAGES} on the validation side)",
            file=sys.stderr,
        )
    return {"domain": cal_m.domain, "tau_max": tau_max, **scores}


def prepare_demo(root: str, scale: int) -> None:
    """The scikit-image demo inputs (pipelines/demo_data.py) + ``ref_hr/``: reference photos at full size."""
    from PIL import Image

    from pipelines.demo_data import SPLITS, load_photo, prepare_demo_inputs

    prepare_demo_inputs(root, scale=scale)
    ref_hr = Path(root) / "ref_hr"
    ref_hr.mkdir(parents=True, exist_ok=True)
    for name in SPLITS["ref_photos"]:
        if not (ref_hr / f"{name}.png").exists():
            tmp = ref_hr / f".{name}.tmp.png"
            Image.fromarray(load_photo(name)).save(tmp)
            tmp.replace(ref_hr / f"{name}.png")


# --------------------------------------------------------------------------------------------
# Run folder: checkpoints (local or object storage), logs, latest pointer
# --------------------------------------------------------------------------------------------


class DamagedCheckpoint(Exception):
    """A checkpoint of the run folder that cannot be loaded (the message names the file)."""


class RunStore:
    """The run folder through fsspec. Checkpoints are written locally, then uploaded; the pointer last."""

    def __init__(self, uri: str, storage: dict | None = None) -> None:
        self.uri = uri
        self.fs, self.root = get_fs(uri, storage)
        self.remote = uri.startswith("s3://")
        self.fs.makedirs(self.root, exist_ok=True)
        self.local_logs = Path(self.root) / "logs" if not self.remote else Path(tempfile.mkdtemp()) / "logs"
        self.local_logs.mkdir(parents=True, exist_ok=True)
        if self.remote:  # continue the CSV logs of an earlier attempt
            for name in self._ls("logs"):
                if name.endswith(".csv"):
                    self.fs.get_file(join_uri(self.root, f"logs/{name}"), str(self.local_logs / name))

    def _ls(self, sub: str = "") -> list[str]:
        path = join_uri(self.root, sub) if sub else self.root
        if self.remote:
            self.fs.invalidate_cache()
        if not self.fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False))

    def latest(self) -> dict | None:
        path = join_uri(self.root, LATEST)
        if self.remote:
            self.fs.invalidate_cache()
        if not self.fs.exists(path):
            return None
        try:
            pointer = json.loads(self.fs.cat_file(path))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(
                f"{path}: not a JSON checkpoint pointer ({exc}); move it away to start over"
            ) from None
        if (
            not isinstance(pointer, dict)
            or not isinstance(pointer.get("manifest_digest"), str)
            or not isinstance(pointer.get("checkpoint"), str)
            or not CKPT_NAME.fullmatch(pointer["checkpoint"])
        ):
            raise ManifestError(
                f"{path}: not a checkpoint pointer written by this tool (it needs 'manifest_digest' and a "
                "'checkpoint' named ckpt-<9 digits> in this run_dir); move it away to start over"
            )
        return pointer

    def write_json(self, name: str, obj) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(json.dumps(obj, indent=1))
            self.put_file(p, name)

    def read_json(self, name: str):
        if self.remote:
            self.fs.invalidate_cache()
        return json.loads(self.fs.cat_file(join_uri(self.root, name)))

    def put_file(self, local: str | Path, name: str) -> None:
        target = join_uri(self.root, name)
        if self.remote:
            self.fs.put_file(str(local), target)
        else:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp"
            shutil.copyfile(local, tmp)
            os.replace(tmp, target)

    def save(self, index: int, model, state: dict, metadata: dict, keep_last: int) -> str:
        name = f"ckpt-{index:09d}"
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(tmp, model, state, metadata)
            for f in ("model.safetensors", "state.pt"):
                self.put_file(Path(tmp) / f, f"{name}/{f}")
        if self.remote:
            for f in self.local_logs.glob("*.csv"):
                self.put_file(f, f"logs/{f.name}")
        pointer = {
            "checkpoint": name,
            "index": index,
            "phase": state["phase"],
            "step": state["step"],
            "completed": state["completed"],
            "manifest_digest": state["manifest_digest"],
        }
        self.write_json(LATEST, pointer)
        for old in [d for d in self._ls() if d.startswith("ckpt-")][:-keep_last]:
            self.fs.rm(join_uri(self.root, old), recursive=True)
        return name

    def load(self, name: str, model) -> dict:
        """Checkpoint ``name`` into ``model``; its training state. A damaged one (a file missing,
        truncated or not ours) is a :class:`DamagedCheckpoint` naming it in the run folder."""
        import pickle

        with tempfile.TemporaryDirectory() as tmp:
            for f in ("model.safetensors", "state.pt"):
                try:
                    self.fs.get_file(join_uri(self.root, f"{name}/{f}"), str(Path(tmp) / f))
                except FileNotFoundError:
                    raise DamagedCheckpoint(f"{join_uri(self.uri, name)}/{f} is missing") from None
            try:
                load_model_weights(Path(tmp) / "model.safetensors", model)
            except CheckpointError as exc:  # its message names the temporary copy: name ours
                reason = str(exc).replace(str(Path(tmp) / "model.safetensors"), "").lstrip(": ")
                raise DamagedCheckpoint(f"{join_uri(self.uri, name)}/model.safetensors: {reason}") from None
            except RuntimeError as exc:  # a whole file of another model: not damage
                raise ManifestError(
                    f"{join_uri(self.uri, name)}/model.safetensors holds another model than this manifest "
                    f"builds (the code changed since it was written?): {str(exc).splitlines()[0][:200]}; "
                    "use a new run_dir"
                ) from None
            try:
                state = read_training_state(Path(tmp) / "state.pt")
            except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
                # torch's own text suggests loading with weights_only=False: never shown or followed
                raise DamagedCheckpoint(
                    f"{join_uri(self.uri, name)}/state.pt is not a readable training state "
                    f"({type(exc).__name__})"
                ) from None
        if not isinstance(state, dict) or not {"phase", "step", "completed", "index"} <= set(state):
            raise DamagedCheckpoint(
                f"{join_uri(self.uri, name)}/state.pt is not a training state of this tool"
            )
        return state

    def load_newest(self, name: str, model) -> tuple[str, dict]:
        """(checkpoint, state) of ``name`` (latest.json's), or of the newest older checkpoint the
        folder keeps (``output.keep_last``) when ``name`` is damaged: a warning names what was passed
        over; none usable is a :class:`ManifestError` saying how to go on."""
        older = sorted((d for d in self._ls() if CKPT_NAME.fullmatch(d) and d < name), reverse=True)
        damaged = []
        for candidate in [name, *older]:
            try:
                state = self.load(candidate, model)
            except DamagedCheckpoint as exc:
                damaged.append(str(exc))
                continue
            for reason in damaged:
                print(f"[train] warning: passing over a damaged checkpoint: {reason}", file=sys.stderr)
            if damaged:
                print(f"[train] resuming from the older {candidate} instead", file=sys.stderr)
            return candidate, state
        raise ManifestError(
            f"output.run_dir {self.uri!r}: no checkpoint there can be resumed ({'; '.join(damaged)}); move "
            "the run folder away to start over, or use a new run_dir"
        )


def put_uri(local: str | Path, uri: str, storage: dict | None = None) -> None:
    """Copy a local file to a local path or s3:// URI (atomic rename locally)."""
    fs, path = get_fs(uri, storage)
    if uri.startswith("s3://"):
        fs.put_file(str(local), path)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------


class ProgressBar(Hook):
    """tqdm bar per phase; the losses shown are refreshed every ``every`` steps. Without the bar
    (``progress.bar: false``, a Ray Train worker) and ``lines``: a plain line when a phase starts, at
    every tenth of it (with the losses) and when it ends, for logs that are not a terminal."""

    def __init__(self, enabled: bool, every: int = 1, lines: bool = False) -> None:
        self.enabled, self.bar, self.every, self.lines = enabled, None, max(1, every), lines and not enabled
        self.t0 = 0.0

    def on_start(self, phase: Phase) -> None:
        self.t0 = time.time()
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=phase.total_steps, initial=phase.step, desc=phase.name, dynamic_ncols=True)
        elif self.lines:
            at = f" (resumed at step {phase.step})" if phase.step else ""
            print(f"[train] {phase.name}: {phase.total_steps} steps{at}", file=sys.stderr, flush=True)

    def on_step(self, phase: Phase, losses: dict[str, Tensor]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if phase.step % self.every == 0 or phase.step == phase.total_steps:  # a host sync: not every step
                self.bar.set_postfix(
                    {k: f"{v:.4g}" for k, v in floats(losses).items() if k != "grad_norm"}, refresh=False
                )
        elif (
            self.lines and phase.step * 10 // phase.total_steps != (phase.step - 1) * 10 // phase.total_steps
        ):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in floats(losses).items() if k != "grad_norm")
            print(
                f"[train] {phase.name}: step {phase.step}/{phase.total_steps}, {shown}, "
                f"{time.time() - self.t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def on_end(self, phase: Phase) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines:
            print(f"[train] {phase.name}: done ({time.time() - self.t0:.0f} s)", file=sys.stderr, flush=True)


class CSVLog(Hook):
    """``logs/<phase>.csv``: step, unix time, seconds of the step, then every loss. Rows past a resumed
    step (written after the checkpoint an interrupted run resumes from) are dropped on start."""

    def __init__(self, folder: Path, every: int) -> None:
        self.folder, self.every = folder, every
        self.file, self.writer, self.fields = None, None, None

    def on_start(self, phase: Phase) -> None:
        path = self.folder / f"{phase.name}.csv"
        rows = []
        if path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= phase.step]
        self.fields = list(rows[0].keys()) if rows else None
        self.file = path.open("w", newline="")
        if self.fields:
            self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(rows)

    def on_step(self, phase: Phase, losses: dict[str, Tensor]) -> None:
        if phase.step % self.every and phase.step != phase.total_steps:
            return
        row = {
            "step": phase.step,
            "time": round(time.time(), 3),
            "seconds": round(phase.last_step_seconds, 4),
        }
        row.update({k: f"{v:.6g}" for k, v in floats(losses).items()})
        if self.writer is None:
            self.fields = list(row)
            self.writer = csv.DictWriter(self.file, self.fields, extrasaction="ignore")
            self.writer.writeheader()
        self.writer.writerow(row)
        self.file.flush()

    def on_end(self, phase: Phase) -> None:
        if self.file is not None:
            self.file.close()
            self.file, self.writer = None, None


class Checkpointer(Hook):
    """Every ``every`` steps: resumable state (+ export); the end-of-phase save is done by the driver."""

    def __init__(self, ctx: TrainContext, every: int) -> None:
        self.ctx, self.every = ctx, every

    def on_step(self, phase: Phase, losses: dict[str, Tensor]) -> None:
        if phase.step % self.every == 0 and phase.step < phase.total_steps:
            self.ctx.checkpoint(phase, completed=False)


def phase_steps(m: TrainManifest) -> dict[str, int]:
    """Each phase's step count in the manifest."""
    return {
        "content_pretrain": m.stage_a.pretrain_steps,
        "content_finetune": m.stage_a.finetune_steps,
        "degradation": m.stage_b.steps,
        "diffusion": m.stage_c.steps,
    }


def untrained_phases(m: TrainManifest, completed: Sequence[str]) -> list[str]:
    """The phases of each part of a model from scratch (no ``init_checkpoint``) that no phase
    trained: none of the part's phases done in this run folder with steps > 0 (stage A's two phases
    train one content encoder: a fine-tune of 0 steps after a pretraining is a trained part). A model
    with such a part generates from random weights there (``--stages C`` alone, every step 0)."""
    if m.init_checkpoint:
        return []
    steps = phase_steps(m)
    return [
        p
        for phases in STAGES.values()
        if not any(q in completed and steps[q] > 0 for q in phases)
        for p in phases
    ]


def make_phase(m: TrainManifest, model, samplers: dict, name: str, **kw) -> Phase:
    """Phase ``name`` with the manifest's stage settings and its sampler; ``kw`` go to the Phase
    (rank, world_size, wrap, data_workers, precision); the seed is the manifest's."""
    if name in ("content_pretrain", "content_finetune"):
        return PHASES[name](model, m.stage_a.to_core(), samplers["hr"], seed=m.seed, **kw)
    if name == "degradation":
        return PHASES[name](model, m.stage_b.to_core(), samplers["hr"], seed=m.seed, **kw)
    return PHASES[name](model, m.stage_c.to_core(), samplers["lr"], seed=m.seed, **kw)


class TrainContext:
    """What one worker needs to run phases: model, manifest, samplers, store, rank."""

    def __init__(
        self,
        m: TrainManifest,
        model,
        samplers: dict,
        store: RunStore,
        digest: str,
        *,
        rank: int,
        world_size: int,
        wrap=None,
        completed: list[str],
        index: int,
        planned: Sequence[str] = (),
        lock=None,
    ) -> None:
        self.m, self.model, self.samplers, self.store, self.digest = m, model, samplers, store, digest
        self.rank, self.world_size, self.wrap = rank, world_size, wrap
        self.completed, self.index = list(completed), index
        self.planned = list(planned)  # the phases of this invocation's stages, in order
        self.lock = lock

    def make_phase(self, name: str) -> Phase:
        m = self.m
        return make_phase(
            m,
            self.model,
            self.samplers,
            name,
            rank=self.rank,
            world_size=self.world_size,
            wrap=self.wrap,
            data_workers=m.compute.data_workers,
            precision=m.compute.precision,
        )

    def checkpoint(self, phase: Phase, completed: bool) -> None:
        # another run took the folder over (a storage outage outlived the heartbeat): stop, not race it
        if self.lock is not None and self.lock.lost:
            raise ManifestError(f"output.run_dir: {self.lock.lost}")
        self.index += 1
        phase.gather_for_checkpoint()  # a collective: every rank, before rank 0 writes
        rngs = None
        if self.world_size > 1 and torch.distributed.is_initialized():
            # every rank's generator (each is seeded by its rank): a resume restores each its own
            rngs = [None] * self.world_size
            torch.distributed.all_gather_object(rngs, phase.generator.get_state())
        if self.rank != 0:
            return
        state = phase.state_dict()
        if rngs is not None:
            state["rng_by_rank"] = rngs
        state.update(
            completed=self.completed + ([phase.name] if completed else []),
            manifest_digest=self.digest,
            index=self.index,
        )
        meta = {
            "manifest_digest": self.digest,
            "phase": phase.name,
            "step": phase.step,
            "kind": "train-state",
        }
        self.store.save(self.index, self.model, state, meta, self.m.output.keep_last)
        if self.m.output.checkpoint and (completed or self.m.output.export_every):
            self.export(phase, state["completed"])

    def export(self, phase: Phase | None = None, completed: list[str] | None = None) -> str | None:
        """Write the usable model (UNet = its EMA while stage C runs) to ``output.checkpoint``;
        ``completed``: the phases done when it is written (default: the run's list so far)."""
        if self.rank != 0 or not self.m.output.checkpoint:
            return None
        completed = list(self.completed if completed is None else completed)
        meta = {
            "manifest_digest": self.digest,
            "completed": completed,
            "trained_by": "pipelines/train.py",
        }
        if self.m.init_checkpoint:  # the architecture is the initial checkpoint's, not `preset`'s
            meta["init_checkpoint"] = self.m.init_checkpoint
        else:
            meta["preset"] = self.m.preset
        if phase is not None and phase.step < phase.total_steps:
            meta["partial"] = f"{phase.name} at step {phase.step}/{phase.total_steps}"
        else:
            left = [p for p in self.planned if p not in completed]
            if left:  # written at the end of a phase, with more of this run still to train
                meta["partial"] = f"still to train: {', '.join(left)}"
        untrained = untrained_phases(self.m, completed)
        if untrained:
            meta["untrained"] = untrained
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model.safetensors"
            ema = (
                getattr(phase, "ema_weights", None)
                if phase is not None and phase.step < phase.total_steps
                else None
            )
            if ema is not None:
                with ema():
                    digest = save_model(local, self.model, meta)
            else:
                digest = save_model(local, self.model, meta)
            put_uri(local, self.m.output.checkpoint, self.m.storage.model_dump())
        return digest


def _exported_state(uri: str, storage: dict, digest: str, completed: list[str]) -> str | None:
    """The digest of the model at ``output.checkpoint`` when it is this run's finished export, else
    None (it must be exported again). A run stopped between its last state checkpoint and the final
    export leaves a mid-phase export there (``partial``), or one of an earlier manifest; a run that
    then finds nothing left to train used to keep it as the result."""
    from pipelines.storage import fetch_to_local
    from realdgen_core.checkpoint import inspect_checkpoint

    try:
        _, meta, _ = inspect_checkpoint(fetch_to_local(uri, storage))
    except (CheckpointError, OSError, ValueError):
        return None
    if meta.get("partial") or meta.get("manifest_digest") != digest or meta.get("completed") != completed:
        print(
            f"[train] {uri} is not this run's finished model "
            f"({meta.get('partial') or 'another manifest or phase list'}): exported again",
            file=sys.stderr,
        )
        return None
    return meta.get("digest")


# --------------------------------------------------------------------------------------------
# One worker's training (local: the only worker; Ray: each TorchTrainer worker)
# --------------------------------------------------------------------------------------------


def build_model_for(m: TrainManifest, device: torch.device):
    from realdgen_core.config import preset
    from realdgen_core.models import build_model

    if m.init_checkpoint:
        from pipelines.storage import fetch_to_local
        from realdgen_core.checkpoint import load_checkpoint

        model, _ = load_checkpoint(fetch_to_local(m.init_checkpoint, m.storage.model_dump()))
    else:
        model = build_model(preset(m.preset, m.scale), seed=m.seed)
    return model.to(device)


def local_device(name: str) -> torch.device:
    """``compute.device`` of the local backend: ``auto`` is the first CUDA GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ManifestError("compute.device is 'cuda' but torch sees no CUDA GPU here")
    return torch.device(name)


def train_worker(manifest: dict, stages: Sequence[str], **kw) -> dict:
    """Run the requested stages on this worker; returns a summary (rank 0's is the one that matters)."""
    return run_worker(manifest, stages, **kw)[0]


def run_worker(
    manifest: dict,
    stages: Sequence[str],
    rank: int = 0,
    world_size: int = 1,
    wrap=None,
    device: str | torch.device = "cpu",
    bar: bool | None = None,
    listings: Listings | None = None,
    lock=None,
):
    """(summary, trained model) of this worker; ``listings``: the sources as the driver listed
    them, when it is this process (see :func:`check_sources`); ``lock``: the run folder's
    ``RunLock`` this process holds (each save first checks that no other run took it over)."""
    m = TrainManifest.model_validate(manifest)
    if m.compute.torch_threads:
        torch.set_num_threads(m.compute.torch_threads)
    digest = manifest_digest(m)
    device = torch.device(device)
    model = build_model_for(m, device)
    store = RunStore(m.output.run_dir, m.storage.model_dump())
    latest = store.latest()
    state, completed, index = None, [], 0
    if latest is not None:
        if latest["manifest_digest"] != digest:
            raise ManifestError(
                f"output.run_dir {m.output.run_dir!r} holds a run of another manifest "
                f"(digest {latest['manifest_digest'][:12]}…; every setting but compute, progress and "
                "storage counts, output paths and source spellings too); resume with that manifest "
                "as it was, or use a new run_dir"
            )
        resumed, state = store.load_newest(latest["checkpoint"], model)
        completed, index = list(state["completed"]), int(state["index"])
        print(
            f"[train] rank {rank}: resuming from {resumed} "
            f"({state['phase']} step {state['step']}, done: {completed})",
            file=sys.stderr,
        )
    samplers = build_samplers(m, model.config.scale, stages, listings)
    ctx = TrainContext(
        m,
        model,
        samplers,
        store,
        digest,
        rank=rank,
        world_size=world_size,
        wrap=wrap,
        completed=completed,
        index=index,
        planned=[p for stage in stages for p in STAGES[stage]],
        lock=lock,
    )
    untrained = untrained_phases(m, ctx.planned + completed)
    if untrained and rank == 0:
        print(
            f"[train] warning: the model's {', '.join(untrained)} part(s) will not be trained "
            "(not among the stages run now nor done in this run folder, or 0 steps), and no "
            "init_checkpoint gives them weights: the exported model is marked untrained there",
            file=sys.stderr,
        )
    show = (m.progress.bar if bar is None else bar) and rank == 0
    t_start, timings = time.time(), {}
    for stage in stages:
        for name in STAGES[stage]:
            if name in ctx.completed:
                continue
            phase = ctx.make_phase(name)
            if state is not None and state["phase"] == name:
                phase.load_state_dict(state)
                by_rank = state.get("rng_by_rank")
                if by_rank is not None and len(by_rank) == world_size:
                    phase.generator.set_state(by_rank[rank])
                elif world_size > 1:
                    print(
                        f"[train] rank {rank}: the checkpoint holds no generator state for this world "
                        f"size ({world_size}); continuing from rank 0's",
                        file=sys.stderr,
                    )
            hooks: list[Hook] = [
                ProgressBar(show, m.progress.log_every, lines=rank == 0),
                Checkpointer(ctx, m.output.checkpoint_every),
            ]
            if rank == 0:
                hooks.insert(1, CSVLog(store.local_logs, m.progress.log_every))
            t0, s0 = time.time(), phase.step
            run_phase(phase, hooks)
            timings[name] = {"steps": phase.step - s0, "seconds": round(time.time() - t0, 2)}
            ctx.checkpoint(phase, completed=True)
            ctx.completed.append(name)
    digest_out = None
    if ctx.completed and rank == 0 and m.output.checkpoint:
        storage = m.storage.model_dump()
        fs, path = get_fs(m.output.checkpoint, storage)
        current = None
        if not timings and fs.exists(path):
            current = _exported_state(m.output.checkpoint, storage, digest, ctx.completed)
        if current is None:
            digest_out = ctx.export()
        else:
            # Nothing trained now: the model was exported when its last phase finished, and writing
            # it again would drop what `--calibrate-only` has recorded in it since.
            digest_out = current
    skipped = Counter()
    for s in samplers["sources"]:
        skipped.update({f"{s.name}: {k}": v for k, v in s.skipped.items()})
    summary = {
        "completed": ctx.completed,
        "timings": timings,
        "wall_seconds": round(time.time() - t_start, 1),
        # DataLoader workers skip in their own copies of the samplers: their counts never reach
        # this process (each skip is printed as a "[train] skipping" line by the worker)
        "skipped_images": dict(skipped)
        if not m.compute.data_workers
        else f"not counted with compute.data_workers={m.compute.data_workers}: see the log's skip lines",
        "run_dir": m.output.run_dir,
        "checkpoint": m.output.checkpoint,
        "model_digest": digest_out,
        "rank": rank,
        "world_size": world_size,
    }
    if skipped and rank == 0:
        print(f"[train] skipped images: {dict(skipped)}", file=sys.stderr)
    return summary, model


def _ray_train_loop(config: dict) -> None:
    """Ray Train worker: DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    if config.get("cwd") and os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def wrap(module):
        if world == 1:
            return module
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    summary, model = run_worker(
        config["manifest"], config["stages"], rank=rank, world_size=world, wrap=wrap, device=device, bar=False
    )
    # Fingerprint of every replica's weights: identical when DDP kept the workers in sync.
    h = hashlib.sha256()
    for v in model.state_dict().values():
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    hashes: list = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(hashes, h.hexdigest())
    else:
        hashes = [h.hexdigest()]
    summary["replica_hashes"] = hashes
    ray.train.report({"completed": len(summary["completed"])})
    if rank == 0:  # the driver reads it back from the run folder (any node can reach it)
        RunStore(summary["run_dir"], config["manifest"]["storage"]).write_json(SUMMARY, summary)


def run_with_ray(m: TrainManifest, stages: Sequence[str]) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    scratch = tempfile.mkdtemp(prefix="realdgen-train-")
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={
            "manifest": m.model_dump(mode="json"),
            "stages": list(stages),
            # Ray Train moves each worker into its trial folder: relative paths of the manifest are
            # meant against the driver's folder (under `ray job submit`, the same unpacked working
            # dir on every node)
            "cwd": os.getcwd(),
        },
        scaling_config=ScalingConfig(
            num_workers=m.compute.num_workers,
            use_gpu=m.compute.use_gpu,
            resources_per_worker={"CPU": m.compute.cpus_per_worker},
        ),
        run_config=RunConfig(name=f"realdgen-train-{int(time.time())}", storage_path=scratch),
    )
    trainer.fit()
    return RunStore(m.output.run_dir, m.storage.model_dump()).read_json(SUMMARY)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("manifest", help="a `kind: train` manifest (YAML)")
    ap.add_argument(
        "--stages", default=None, help="comma-separated subset of A,B,C (default: the manifest's)"
    )
    add_set_option(ap, "stage_c.steps=5000")
    ap.add_argument(
        "--calibrate-only",
        action="store_true",
        help="train nothing: (re)calibrate output.checkpoint on the domain of data.lr (the manifest's "
        "`calibration` section, enabled or not) and record it there",
    )
    ap.add_argument(
        "--overwrite-checkpoint",
        action="store_true",
        help="let this run replace an output.checkpoint that another manifest's run (or anything "
        "else) wrote; without it such a file is refused before any training",
    )
    args = ap.parse_args(argv)
    try:
        m = load_manifest(args.manifest, args.overrides, kind="train")
        stages = tuple(s.strip().upper() for s in args.stages.split(",")) if args.stages else m.stages
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ManifestError(f"--stages: unknown stage(s) {bad}; choose from A,B,C")
        if "C" in stages and not m.data.lr:
            raise ManifestError("--stages C needs `data.lr` in the manifest")
        if ("A" in stages or "B" in stages) and m.data.hr is None:
            raise ManifestError("stages A/B need `data.hr` in the manifest")
        # the local backend's device; Ray workers take theirs from compute.use_gpu (the driver,
        # often a head node without a GPU, never trains)
        device = local_device(m.compute.device) if m.compute.backend != "ray" else None
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if m.data.prepare_demo:
        prepare_demo(m.data.prepare_demo, m.scale)
    try:
        check_outputs(m)
        if not args.calibrate_only:  # a calibration records into the file it names, trains nothing
            check_checkpoint_owner(m, args.overwrite_checkpoint)
        listings = check_sources(
            m, stages, args.calibrate_only or m.calibration.enabled, calibrate_only=args.calibrate_only
        )
        if not args.calibrate_only:
            check_init_checkpoint(m, calibrate=m.calibration.enabled)
        else:  # the model calibrated is output.checkpoint's
            check_calibrated_checkpoint(m)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransientStorageError as exc:
        print(f"error: {exc}; nothing was trained, run the same command again", file=sys.stderr)
        return EXIT_TEMPFAIL
    lock = None
    if not args.calibrate_only:
        # one run at a time in a run folder: a second one "resumed" from the first's checkpoints
        # mid-run and the two deleted each other's (the generation job's lock, with its heartbeat)
        from pipelines.storage import DatasetStore, LockError, RunLock

        lock = RunLock(DatasetStore(m.output.run_dir, m.storage.model_dump()))
        try:
            lock.acquire()
        except TransientStorageError as exc:
            print(f"error: output.run_dir: {exc}; run the same command again", file=sys.stderr)
            return EXIT_TEMPFAIL
        except (LockError, StorageAccessError) as exc:
            print(f"error: output.run_dir: {exc}", file=sys.stderr)
            return 1
    try:
        return _run(m, stages, args.calibrate_only, device, listings, lock)
    except KeyboardInterrupt:
        done = ""
        if not args.calibrate_only:
            try:
                kept = RunStore(m.output.run_dir, m.storage.model_dump()).latest()
            except Exception:  # noqa: BLE001 - the message only; the interrupt is what is reported
                kept = None
            done = (
                f"; the state of its last checkpoint ({kept['checkpoint']}, {kept['phase']} step "
                f"{kept['step']}) is kept in {m.output.run_dir}: run the same command to resume from it"
                if kept
                else "; before its first checkpoint: nothing to resume, the same command starts over"
            )
        print(f"[train] interrupted{done}", file=sys.stderr)
        return 130
    except (ManifestError, CheckpointError, StorageAccessError, DataError) as exc:
        # found once the run reads them: a run folder of another manifest, a bad init_checkpoint,
        # storage refusing the credentials, a source with no usable image
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TransientStorageError as exc:  # the checkpoints written so far are kept: a re-run resumes
        print(f"error: {exc}; run the same command again to resume", file=sys.stderr)
        return EXIT_TEMPFAIL
    finally:
        if lock is not None:
            lock.release()


def _held_out_warning(m: TrainManifest) -> str | None:
    """For ``--calibrate-only``: a warning when ``output.run_dir`` holds this manifest's run, its
    stage C done, trained with the calibration off: stage C then read every file of the LR sources,
    the validation split included, so the split τ is chosen on is not held out."""
    if m.calibration.enabled or not any(c.kind == "images" and c.source is not None for c in m.data.lr):
        return None
    try:
        fs, root = get_fs(m.output.run_dir, m.storage.model_dump())
        if not fs.exists(join_uri(root, LATEST)):  # (a RunStore would create the folder)
            return None
        latest = RunStore(m.output.run_dir, m.storage.model_dump()).latest()
    except (ManifestError, OSError, StorageAccessError):
        return None
    if not latest or latest.get("manifest_digest") != manifest_digest(m):
        return None
    if "diffusion" not in latest.get("completed", []) and latest.get("phase") != "diffusion":
        return None
    return (
        f"[train] warning: {m.output.run_dir} trained stage C of this checkpoint with this manifest and "
        "the calibration off, so it read every file of data.lr, the validation split included: τ is "
        "chosen on images the model was trained on (train with calibration.enabled: true to hold the "
        "split out)"
    )


def _run(m: TrainManifest, stages, calibrate_only: bool, device, listings: Listings, lock=None) -> int:
    if calibrate_only:
        warning = _held_out_warning(m)
        if warning:
            print(warning, file=sys.stderr)
        m = m.model_copy(update={"calibration": m.calibration.model_copy(update={"enabled": True})})
        try:
            TrainManifest.model_validate(m.model_dump())
        except ValueError as exc:
            print(f"error: --calibrate-only: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({"calibration": calibrate_checkpoint(m, listings)}, indent=1))
        return 0
    if m.compute.backend == "ray":
        summary = run_with_ray(m, stages)
    else:
        summary = train_worker(m.model_dump(mode="json"), stages, device=device, listings=listings, lock=lock)
    if m.calibration.enabled:
        summary["calibration"] = calibrate_checkpoint(m, listings)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
