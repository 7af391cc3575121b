"""Export a RealDGen dataset to paired image folders plus BasicSR / Real-ESRGAN meta files.

Layout written under ``out_dir`` (a local folder: BasicSR's disk backend reads local files)::

    hr/{key}.png                    the HR member's PNG bytes, copied verbatim (pixel-exact)
    lr/{key}.png                    the LR member's PNG bytes, copied verbatim
    meta_info_basicsr.txt           BasicSR PairedImageDataset ``meta_info_file``:
                                    "{key}.png (H,W,3)" — the GT name relative to
                                    dataroot_gt=hr, the LQ name derived from it in dataroot_lq=lr
    meta_info_realesrgan.txt        Real-ESRGAN RealESRGANPairedDataset ``meta_info``:
                                    "hr/{key}.png, lr/{key}.png" — gt and lq paths relative to
                                    dataroot_gt and dataroot_lq, both set to out_dir
    export.json                     source URI, counts, scale(s), skipped samples

Lines are sorted by key, so the files are the same whatever the shard order.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from webdataset.tariterators import group_by_keys, tar_file_expander

from pipelines.reader import BadSample, ShardEntry, decode_pair, filesystem, list_shards

log = logging.getLogger(__name__)

BASICSR_META = "meta_info_basicsr.txt"
REALESRGAN_META = "meta_info_realesrgan.txt"


@dataclass
class ExportResult:
    """What :func:`export_dataset` wrote."""

    out_dir: str
    pairs: int
    scales: dict[int, int]
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "out_dir": self.out_dir,
            "pairs": self.pairs,
            "scales": self.scales,
            "skipped": dict(self.skipped),
        }


def iter_raw_samples(
    shards: list[ShardEntry], endpoint_url: str | None = None, on_error=None
) -> Iterator[dict]:
    """Stream raw samples (``{'__key__', '__url__', 'hr.png', 'lr.png', 'json'}`` bytes) in shard order."""
    fs = filesystem(shards[0].url, endpoint_url)[0] if shards else None

    def opened():
        for shard in shards:
            with fs.open(shard.url, "rb") as stream:
                yield {"url": shard.url, "stream": stream}

    def handler(exc: Exception) -> bool:
        if on_error is None:
            raise exc
        on_error(exc)
        return True

    return group_by_keys(tar_file_expander(opened(), handler=handler), handler=handler)


def export_dataset(
    uri: str, out_dir: str, *, endpoint_url: str | None = None, limit: int | None = None, verify: bool = True
) -> ExportResult:
    """Write ``hr/``, ``lr/`` and both meta files for the dataset at ``uri`` into ``out_dir``.

    ``verify`` decodes both images and checks ``lr × scale == hr`` before writing (bad samples are
    skipped and counted); the PNG bytes are written unchanged either way. ``limit`` stops after
    that many pairs. Keys are unique across a dataset (§5), so ``{key}.png`` never collides.
    """
    os.makedirs(os.path.join(out_dir, "hr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "lr"), exist_ok=True)
    skipped: Counter = Counter()

    def on_error(exc: Exception) -> None:
        skipped["shard_error"] += 1
        log.warning("export: skipping the rest of a shard: %r", exc)

    rows: list[tuple[str, int, int]] = []
    scales: Counter = Counter()
    seen: set[str] = set()
    for raw in iter_raw_samples(list_shards(uri, endpoint_url), endpoint_url, on_error):
        if limit is not None and len(rows) >= limit:
            break
        key = raw["__key__"]
        try:
            if key in seen:
                raise BadSample("duplicate_key", f"{key} appears twice")
            if verify:
                hr, _, meta = decode_pair(raw, key)
                h, w = hr.shape[:2]
                scale = int(meta["scale"])
            else:
                from PIL import Image

                w, h = Image.open(io.BytesIO(raw["hr.png"])).size
                scale = int(json.loads(raw["json"])["scale"])
        except BadSample as exc:
            skipped[exc.reason] += 1
            log.warning("export: skipping %s: %s", key, exc)
            continue
        seen.add(key)
        for sub, member in (("hr", "hr.png"), ("lr", "lr.png")):
            with open(os.path.join(out_dir, sub, f"{key}.png"), "wb") as f:
                f.write(raw[member])
        rows.append((key, h, w))
        scales[scale] += 1
    rows.sort()
    with open(os.path.join(out_dir, BASICSR_META), "w") as f:
        f.writelines(f"{k}.png ({h},{w},3)\n" for k, h, w in rows)
    with open(os.path.join(out_dir, REALESRGAN_META), "w") as f:
        f.writelines(f"hr/{k}.png, lr/{k}.png\n" for k, _, _ in rows)
    result = ExportResult(out_dir, len(rows), dict(scales), skipped)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump({"source": uri, **result.to_dict()}, f, indent=1)
    return result
