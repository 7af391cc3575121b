"""BasicSR-compatible map-style dataset over RealDGen shards: ``type: RealDGenPairedDataset``.

BasicSR's ``train.py`` wraps every training set in its ``EnlargedSampler`` and hands that sampler
to a ``DataLoader``, which an ``IterableDataset`` refuses. So this class is map-style: ``len`` is
the index's ``total_samples`` and ``__getitem__`` reads one sample with a single ranged read of
its tar (the shard's headers are scanned once per process on first use). BasicSR's sampler does
the shuffling and the DDP split, exactly as for its own ``PairedImageDataset``.

The class registers itself in BasicSR's ``DATASET_REGISTRY`` when ``basicsr`` is importable;
without BasicSR the module still imports and the class works from a plain ``opt`` dict.

Options (the keys BasicSR's paired datasets use, plus ``dataroot``):

    dataroot: s3://bucket/datasets/run1   # dataset URI, or a list of shard URLs
    endpoint_url: ~                       # S3 endpoint; default AWS_ENDPOINT_URL; creds from env
    scale: 4                              # filled in by BasicSR from the top-level scale
    phase: train                          # train: random crop + augment; anything else: whole image
    gt_size: 256                          # HR crop (train phase)
    use_hflip: true
    use_rot: true
    mean: ~                               # optional per-channel normalisation, as in BasicSR
    std: ~
    max_cached_spans: 524288              # samples' header entries kept per process (~0.23 GB)
    max_pixels: 64000000                  # per image, from its header (decompression bombs)
    max_member_bytes: 268435456           # a larger tar member is not read

Shards are untrusted: members other than ``KEY.{hr.png,lr.png,json}`` are never read, and bad
samples (repeated keys, truncated tars, images over the pixel limit, …) are replaced as below.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.reader import (
    MAX_CACHED_SPANS,
    MAX_MEMBER_BYTES,
    MAX_PIXELS,
    BadSample,
    PairTransform,
    ShardRandomAccess,
    resolve_shards,
)

log = logging.getLogger(__name__)

# How many samples to try when one breaks the contract, before giving up loudly: the index itself,
# then substitutes drawn at random from the whole dataset (the next indices would all lie in the
# same lost stretch of a truncated shard).
MAX_SUBSTITUTES = 16


class RealDGenPairedDataset(Dataset):
    """Paired (lq, gt) dataset over RealDGen shards with BasicSR's ``opt`` dict interface.

    Returns ``{'lq', 'gt', 'lq_path', 'gt_path', 'key'}`` with float32 RGB CHW tensors in
    ``[0, 1]`` (normalised when ``mean``/``std`` are set). A sample that breaks the contract is
    counted in :attr:`skipped`, logged, and replaced by a good one drawn at random, so one bad
    sample (or a truncated shard) does not kill a multi-day run; ``MAX_SUBSTITUTES`` bad draws in a
    row raise. Outside ``phase: train`` (validation) every sample is read and decoded once when the
    dataset is built and the bad ones are left out, named in a warning: a substitute would put
    another sample's score under its key, and a raise would end the run at its first validation.
    """

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        if "dataroot" not in opt:
            raise KeyError("RealDGenPairedDataset needs opt['dataroot'] (dataset URI or list of shard URLs)")
        self.phase = opt.get("phase", "train")
        train = self.phase == "train"
        scale = opt.get("scale")
        self.transform = PairTransform(
            gt_size=opt.get("gt_size") if train else None,
            scale=int(scale) if scale is not None else None,
            use_hflip=bool(opt.get("use_hflip", True)) and train,
            use_rot=bool(opt.get("use_rot", True)) and train,
            max_pixels=int(opt.get("max_pixels", MAX_PIXELS)),
        )
        if train and self.transform.gt_size is None:
            raise KeyError("RealDGenPairedDataset: phase 'train' needs opt['gt_size']")
        self.mean = opt.get("mean")
        self.std = opt.get("std")
        endpoint = opt.get("endpoint_url")
        self.skipped: Counter = Counter()
        self.access = ShardRandomAccess(
            resolve_shards(opt["dataroot"], endpoint),
            endpoint,
            max_cached_spans=int(opt.get("max_cached_spans", MAX_CACHED_SPANS)),
            skip=self._skip_member,
            max_member_bytes=int(opt.get("max_member_bytes", MAX_MEMBER_BYTES)),
        )
        self._rng: tuple[int, np.random.Generator] | None = None
        # validation: the usable samples, checked once here (None in training: substitutes)
        self._good: list[int] | None = None if train else self._usable_samples(opt["dataroot"])

    def _usable_samples(self, dataroot) -> list[int]:
        """Every sample read and decoded once; the bad ones are left out and named in a warning, so
        validation scores the same good samples, under their own keys, on every run."""
        good = []
        rng = np.random.default_rng(0)
        for i in range(len(self.access)):
            try:
                files, key, url = self.access.get(i)
                self.transform(files, key, url, rng)
            except BadSample as exc:
                self.skipped[exc.reason] += exc.count
                log.warning("RealDGenPairedDataset (%s): sample %d left out: %s", self.phase, i, exc)
                continue
            good.append(i)
        if not good:
            raise ValueError(
                f"RealDGenPairedDataset ({self.phase}): no usable sample in {dataroot}; "
                f"skipped: {dict(self.skipped)}"
            )
        return good

    def __len__(self) -> int:
        return len(self._good) if self._good is not None else len(self.access)

    def _skip_member(self, exc: BadSample) -> None:
        """A tar member the scan left unread (unsafe name, unexpected extension, too large, …)."""
        self.skipped[exc.reason] += exc.count
        log.warning("RealDGenPairedDataset: %s", exc)

    def _generator(self) -> np.random.Generator:
        # One generator per process, seeded from torch's per-worker seed (which BasicSR derives
        # from its manual seed), instead of the global `random` state BasicSR's own crops use.
        seed = torch.initial_seed()
        if self._rng is None or self._rng[0] != seed:
            self._rng = (seed, np.random.default_rng(seed))
        return self._rng[1]

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        i = self._good[index] if self._good is not None else index
        for _ in range(MAX_SUBSTITUTES):
            try:
                files, key, url = self.access.get(i)  # a sample marked bad by the scan raises here
                out = self.transform(files, key, url, self._generator())
            except BadSample as exc:
                self.skipped[exc.reason] += exc.count
                if self._good is not None:
                    # checked good at construction, bad now (storage changed under the run): a
                    # substitute would be scored (and saved) under another key
                    raise ValueError(
                        f"RealDGenPairedDataset ({self.phase}): sample {i} was usable when the "
                        f"dataset was built and is not now: {exc}"
                    ) from exc
                log.warning("RealDGenPairedDataset: sample %d skipped: %s", i, exc)
                i = int(self._generator().integers(n))
                continue
            if self.mean is not None or self.std is not None:
                mean = torch.tensor(self.mean if self.mean is not None else [0.0] * 3).view(3, 1, 1)
                std = torch.tensor(self.std if self.std is not None else [1.0] * 3).view(3, 1, 1)
                out["lq"] = (out["lq"] - mean) / std
                out["gt"] = (out["gt"] - mean) / std
            return out
        raise RuntimeError(
            f"RealDGenPairedDataset: sample {index} and {MAX_SUBSTITUTES - 1} random substitutes are "
            f"all bad; skipped so far: {dict(self.skipped)}"
        )


def _register() -> bool:
    """Add the class to BasicSR's DATASET_REGISTRY when BasicSR is installed."""
    try:
        from basicsr.utils.registry import DATASET_REGISTRY
    except Exception:  # BasicSR absent (or broken): standalone use still works
        return False
    if "RealDGenPairedDataset" not in DATASET_REGISTRY:
        DATASET_REGISTRY.register(RealDGenPairedDataset)
    return True


REGISTERED_WITH_BASICSR = _register()
