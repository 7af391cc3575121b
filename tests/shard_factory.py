"""Write small, valid paired datasets (ARCHITECTURE §5) for the downstream tests and benches.

Independent of the production writer (``realdgen_core/shards.py``): tars are written with the
standard library's ``tarfile`` and images with Pillow, so the reader is tested against the
contract, not against the writer it is meant to consume. The output passes
``shared/checks/validate_shards.py``.

LR images are a real degradation of their HR crop (Gaussian blur, then an exact box downsample by
``scale``, then seeded Gaussian noise), so an SR network trained on them has something to learn.
With ``blur_sigma=0`` and ``noise_sigma=0`` the LR is the exact box downsample of the HR, which
lets tests check crop alignment pixel by pixel.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFilter

GENERATORS = ("realdgen", "realesrgan", "bsrgan", "bicubic")
FAILURE_REASONS = ("decode_error", "too_small", "oom")


@dataclass
class FactoryResult:
    """What the factory wrote, for tests to compare against."""

    uri: str
    name: str
    scale: int
    keys_by_shard: dict[str, list[str]]  # shard stem -> keys in tar order
    generators: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    taus: list = field(default_factory=list)
    hr_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (W, H)

    @property
    def keys(self) -> list[str]:
        return [k for ks in self.keys_by_shard.values() for k in ks]

    @property
    def shards(self) -> list[str]:
        return list(self.keys_by_shard)


def _default_photos() -> dict[str, np.ndarray]:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket"]
    return {n: np.ascontiguousarray(getattr(data, n)()[..., :3]) for n in names}


def degrade(
    hr: np.ndarray, scale: int, rng: np.random.Generator, blur_sigma: float, noise_sigma: float
) -> np.ndarray:
    """HR uint8 HWC -> LR uint8 HWC of size HR/scale: blur, exact box downsample, noise, 8-bit."""
    img = Image.fromarray(hr)
    if blur_sigma > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur_sigma))
    img = img.reduce(scale)  # box filter over scale x scale blocks: exact, no resampling offsets
    lr = np.asarray(img).astype(np.float32)
    if noise_sigma > 0:
        lr = lr + rng.normal(0.0, noise_sigma, size=lr.shape)
    return np.clip(np.rint(lr), 0, 255).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _crop_source(photo: np.ndarray, hr_size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    h, w = photo.shape[:2]
    if h < hr_size or w < hr_size:  # upscale small photos once so a crop fits (bench sizes)
        f = hr_size / min(h, w)
        photo = np.asarray(
            Image.fromarray(photo).resize((int(np.ceil(w * f)), int(np.ceil(h * f))), Image.BICUBIC)
        )
        h, w = photo.shape[:2]
    y0 = int(rng.integers(0, h - hr_size + 1))
    x0 = int(rng.integers(0, w - hr_size + 1))
    return photo[y0 : y0 + hr_size, x0 : x0 + hr_size], [x0, y0, x0 + hr_size, y0 + hr_size]


def write_dataset(
    dest: str,
    *,
    n_samples: int = 12,
    samples_per_shard: int = 4,
    scale: int = 4,
    hr_size: int | Sequence[int] = 64,
    name: str = "pairs",
    photos: Mapping[str, np.ndarray] | None = None,
    failures_per_shard: int = 1,
    blur_sigma: float = 1.2,
    noise_sigma: float = 2.0,
    seed: int = 0,
    endpoint_url: str | None = None,
) -> FactoryResult:
    """Write a dataset of ``n_samples`` pairs in ``ceil(n/samples_per_shard)`` shards to ``dest``.

    ``dest`` is a local folder or an ``s3://bucket/prefix`` URI (endpoint from ``endpoint_url`` or
    ``AWS_ENDPOINT_URL``, credentials from the environment). ``hr_size`` may be a list to cycle
    through several HR sizes (each a multiple of ``scale``). Generators cycle through
    ``GENERATORS``; each shard's parquet also records ``failures_per_shard`` failed attempts
    whose reasons cycle through ``FAILURE_REASONS``.
    """
    photos = dict(photos) if photos is not None else _default_photos()
    sizes = [hr_size] if isinstance(hr_size, int) else list(hr_size)
    if any(s % scale for s in sizes):
        raise ValueError(f"hr_size {sizes} must be multiples of scale {scale}")
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {}
    result = FactoryResult(uri=dest, name=name, scale=scale, keys_by_shard={})
    photo_names = sorted(photos)
    index_shards = []
    n_shards = -(-n_samples // samples_per_shard)
    for s in range(n_shards):
        stem = f"{name}-{s:06d}"
        keys: list[str] = []
        rows: list[dict] = []
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(samples_per_shard):
                i = s * samples_per_shard + j
                if i >= n_samples:
                    break
                src = photo_names[i % len(photo_names)]
                size = sizes[i % len(sizes)]
                hr, box = _crop_source(photos[src], size, rng)
                lr = degrade(hr, scale, rng, blur_sigma, noise_sigma)
                gen = GENERATORS[i % len(GENERATORS)]
                tau = int(rng.integers(0, 301)) if gen == "realdgen" else None
                key = f"{name}_{s:06d}_{j:04d}_{src}"
                meta = {
                    "scale": scale,
                    "generator": gen,
                    "hr_source": f"skimage://{src}",
                    "hr_box": box,
                    "ref_source": "refs/cam0.png" if gen == "realdgen" else None,
                    "model_digest": "sha256:feedbeef" if gen == "realdgen" else None,
                    "seed": int(seed * 100003 + i),
                    "k": 4 if gen == "realdgen" else 1,
                    "tau": tau,
                    "content_error": float(rng.uniform(0, 0.5)) if gen == "realdgen" else None,
                    "degradation_error": float(rng.uniform(0, 0.2)) if gen == "realdgen" else None,
                }
                _add(tar, f"{key}.hr.png", _png(hr))
                _add(tar, f"{key}.lr.png", _png(lr))
                _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                keys.append(key)
                result.generators[gen] += 1
                result.taus.append(tau)
                result.hr_sizes[key] = (size, size)
                rows.append(
                    {
                        "key": key,
                        "status": "ok",
                        "error": None,
                        "generator": gen,
                        "hr_source": meta["hr_source"],
                        "tau": tau,
                    }
                )
        for f in range(failures_per_shard):
            reason = FAILURE_REASONS[(s + f) % len(FAILURE_REASONS)]
            rows.append(
                {
                    "key": f"{name}_{s:06d}_fail{f}",
                    "status": "error",
                    "error": f"{reason}: simulated failure",
                    "generator": GENERATORS[0],
                    "hr_source": "skimage://broken",
                    "tau": None,
                }
            )
            result.failures[reason] += 1
        data = buf.getvalue()
        files[f"{stem}.tar"] = data
        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [
                    ("key", pa.string()),
                    ("status", pa.string()),
                    ("error", pa.string()),
                    ("generator", pa.string()),
                    ("hr_source", pa.string()),
                    ("tau", pa.int64()),
                ]
            ),
        )
        pbuf = io.BytesIO()
        pq.write_table(table, pbuf)
        files[f"{stem}.parquet"] = pbuf.getvalue()
        files[f"{stem}_stats.json"] = json.dumps(
            {
                "shard": stem,
                "samples": len(keys),
                "attempted": len(rows),
                "failed": len(rows) - len(keys),
                "bytes": len(data),
                "seconds": {"total": 0.0},
            }
        ).encode()
        result.keys_by_shard[stem] = keys
        index_shards.append({"name": f"{stem}.tar", "samples": len(keys), "bytes": len(data)})
    files["_index.json"] = json.dumps(
        {
            "shards": index_shards,
            "total_samples": sum(e["samples"] for e in index_shards),
            "manifest_digest": "sha256:factory",
            "model_digest": "sha256:feedbeef",
        },
        indent=1,
    ).encode()
    _put_all(dest, files, endpoint_url)
    return result


def _put_all(dest: str, files: dict[str, bytes], endpoint_url: str | None) -> None:
    # Stats files are the completion markers, so they go after their shard, the index last.
    order = sorted(files, key=lambda n: (n == "_index.json", n.endswith("_stats.json"), n))
    if dest.startswith("s3://"):
        import s3fs

        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        fs = s3fs.S3FileSystem(**({"endpoint_url": endpoint_url} if endpoint_url else {}))
        root = dest[len("s3://") :].rstrip("/")
        for n in order:
            fs.pipe_file(f"{root}/{n}", files[n])
        return
    root = dest[len("file://") :] if dest.startswith("file://") else dest
    os.makedirs(root, exist_ok=True)
    for n in order:
        with open(os.path.join(root, n), "wb") as f:
            f.write(files[n])


def decode_config(**overrides):
    """The ``DecodeTile`` config the stage tests share: x2, 16-px LR tiles on a grid, up to 4 per
    image, one reference ``r0``; keyword arguments override fields."""
    from pipelines.generate.config import DecodeConfig, PairingConfig

    fields = {
        "seed": 3,
        "scale": 2,
        "tile": 16,
        "tiling_mode": "grid",
        "max_tiles": 4,
        "max_pixels": 10**6,
        "pairing": PairingConfig("round_robin", 1),
        "refs": ({"uri": "r0", "set": "s", "domain": None},),
    }
    return DecodeConfig(**{**fields, **overrides})
