"""Realism benchmark (``kind: evaluate``): generated LR against true LR of paired domains, via the main job.

    python pipelines/evaluate.py manifests/evaluate_codecs.yaml [--set key.path=value ...]

Per domain (a folder of HR images and their true LR, e.g. one pipeline of
``shared/bench/make_codec_pairs.py`` or a RealSR/DRealSR ``HR/`` + ``LR/`` pair):

1. **Tiles.** Every (HR, LR) pair is checked (HR = LR × scale, bottom/right cropped to it) and cut
   into ``generation.tile``-px LR tiles (HR tiles ``tile × scale``), written under the work folder
   as ``tiles/hr/<group>/<name>.png`` and ``tiles/lr/<group>/<name>.png``. A pair that is exactly
   one tile keeps its name. ``group`` is the photo: ``generation.group_pattern`` on the file stem.
2. **Adaptation** (``adapt.enabled``): ``python pipelines/train.py <adapt.manifest> --set
   init_checkpoint=… --set data.lr.0.source.uri=<refs_train> --set stage_c.steps=… --set
   output.checkpoint=… --set output.run_dir=…`` in a subprocess; its checkpoint replaces the base one
   for this domain. Whatever the adaptation stores in the checkpoint is used as the job uses it.
3. **Generation through the main job** (``pipelines.generate_dataset.run``, one local Ray for the whole
   evaluation): a ``kind: generate`` manifest per run with ``tiling: {tile, grid, max_tiles_per_image:
   1}`` so the whole HR tile maps to the whole LR tile. Honest references (pairing): realdgen runs one
   job per photo group whose ``refs`` are the true LR tiles of the *other* groups, one reference domain
   (one pipeline; a tile's own true LR is never its reference); the baselines (random θ, no
   reference) run one job over all tiles. The shards are read back (``pipelines.reader.decode_pair``)
   and matched to tiles by ``hr_source``; the HR pixels in the shard are checked against the tile.
4. **Metrics against the true LR**, per tile then averaged: PSNR/SSIM (``realdgen_core.metrics``,
   scikit-image), the relative gaps of noise level, Laplacian energy and 8×8 blockiness
   (``realdgen_core.realism``), the classifier two-sample test and the SR proxy
   (``realdgen_core.probes``). SR-proxy training pairs come from other HR photos
   (``sr_proxy.photos``) with the domain's ``refs_train`` as references.
5. **Report** in ``report.dir``: ``report.json``, ``report.md``, PNGs (pipelines/eval_report.py).

Re-running reuses finished work (generate jobs resume; the adapted checkpoint is kept under a name
that hashes its inputs; generated datasets live under a folder named by the checkpoint digest);
``report.fresh: true`` starts over.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.eval_report import CHANCE_METRICS
from pipelines.manifest import (
    EvalDomain,
    EvaluateManifest,
    ManifestError,
    apply_overrides,
    load_manifest,
    parse_manifest,
)
from pipelines.sources import ImageError, local_image_files
from realdgen_core import realism

REPO = Path(__file__).resolve().parent.parent
# RealSR / DRealSR name suffixes (`Canon_001_HR`, `_LR4`, `_x4`), and DIV2K's all-digit LR names (`0801x4`)
_REALSR_SUFFIX = re.compile(r"_(?:HR|LR(\d*)|x(\d+))$", re.IGNORECASE)
_DIV2K_LR = re.compile(r"^(\d+)x(\d+)$", re.IGNORECASE)

__all__ = ["Tile", "DomainTiles", "prepare_domain", "run_evaluation", "group_of"]


# --------------------------------------------------------------------------------------------
# Domains and tiles
# --------------------------------------------------------------------------------------------


@dataclass
class Tile:
    name: str
    group: str
    hr: np.ndarray
    lr: np.ndarray


@dataclass
class DomainTiles:
    name: str
    layout: str
    hr_dir: Path
    lr_dir: Path
    refs_dir: Path | None
    tiles_root: Path
    work: Path  # this domain's work folder (named by the digest of its data)
    tiles: list[Tile]
    notes: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        return sorted({t.group for t in self.tiles})


def group_of(stem: str, pattern: str) -> str:
    """Photo group of a file stem: regex group 1 (else the whole match, else the stem).

    The group names a folder and a reference set (``A-Za-z0-9_-``): other characters become ``_``, and
    a group so changed gets a short hash of its own spelling (``café`` → ``caf_-<8 hex>``), so photos
    whose names differ only there (``猫``, ``咖啡``; ``café``, ``cafè``) stay distinct groups."""
    mt = re.search(pattern, stem)
    g = ((mt.group(1) if mt.groups() else mt.group(0)) if mt else None) or stem
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", g)
    if safe != g:
        safe += "-" + hashlib.sha256(g.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return safe


def _images(folder: Path) -> list[Path]:
    return [Path(p) for p in local_image_files(folder)]


def _source_images(folder: Path) -> list[Path]:
    """The image files of ``folder`` as a job lists a ``format: folder`` source (and train.py the
    adaptation's ``data.lr``): recursively, the default extensions, sorted by path. ``refs_train`` is
    checked and digested by this listing, so files in its sub-folders count as they do for the jobs."""
    from pipelines.manifest import IMAGE_EXTENSIONS
    from pipelines.sources import _ext_ok, _find
    from pipelines.storage import get_fs

    fs, path = get_fs(str(folder))
    return [Path(p) for p in sorted(_find(fs, path)) if _ext_ok(p, IMAGE_EXTENSIONS)]


def _below(path: Path, root: Path) -> str:
    """``path``'s name below the folder ``root`` (``a.png``, ``phoneA/a.png``)."""
    return Path(os.path.relpath(path, root)).as_posix()


def _utf8_named(files: list[Path], root: Path, what: str, notes: list[str]) -> list[Path]:
    """``files`` less those whose names below ``root`` are not valid UTF-8, with a note. The job's
    lister leaves such files out (``pipelines.sources``): they cannot be keyed, recorded or shown, and
    the tile name or digest of one stopped the evaluation."""
    from pipelines.sources import _is_utf8

    ok = [_is_utf8(_below(p, root)) for p in files]
    bad = [_below(p, root) for p, good in zip(files, ok, strict=True) if not good]
    if bad:
        notes.append(
            f"{what}: {len(bad)} file(s) left out, their names are not valid UTF-8 (e.g. {ascii(bad[0])}); "
            "rename them to include them"
        )
    return [p for p, good in zip(files, ok, strict=True) if good]


def _rgb(path: Path) -> np.ndarray:
    """The job's own decoder (16-bit and palette PNGs scaled, EXIF orientation, the pixel limit);
    raises ``pipelines.sources.ImageError`` naming what is wrong with the file."""
    from pipelines.sources import decode_image

    return decode_image(path.read_bytes())


def _align(hr: np.ndarray, lr: np.ndarray, s: int, what: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Crop an (HR, true LR) pair to ``s`` × LR = HR. The LR must be ``HR // s`` px, or one more where the
    HR is not a multiple of ``s`` (a codec that rounds up), or the HR at most 5 % wider than ``s`` × LR (a
    registration crop). Anything else is another scale or another picture: a clear error, not tiles
    that show different parts of the photo."""
    (h, w), (lh, lw) = hr.shape[:2], lr.shape[:2]

    def fits(n: int, ln: int) -> bool:  # HR // s or ⌈HR / s⌉, or an HR up to 5 % wider than s × LR
        return n // s <= ln <= -(-n // s) or s * ln <= n <= 1.05 * s * ln

    if not (lh and lw and fits(h, lh) and fits(w, lw)):
        raise ManifestError(
            f"{what}: HR {w}x{h} and its LR {lw}x{lh} are not a x{s} pair (the LR should be about "
            f"{w // s}x{h // s}); check `scale` and that the names pair the right files"
        )
    lh, lw = min(lh, h // s), min(lw, w // s)
    note = None
    if (lh * s, lw * s) != (h, w) or lr.shape[:2] != (lh, lw):
        if h - s * lh >= s or w - s * lw >= s:  # a registration crop, not HR // s or ⌈HR / s⌉
            _refuse_whole_resize(hr, lr, s, what)
        note = f"{what}: cropped bottom/right to HR {lw * s}x{lh * s} / LR {lw}x{lh}"
    return hr[: lh * s, : lw * s], lr[:lh, :lw], note


RESIZE_MARGIN_DB = 1.0


def _refuse_whole_resize(hr: np.ndarray, lr: np.ndarray, s: int, what: str) -> None:
    """An HR at least ``s`` px wider (or taller) than ``s`` × LR is taken as a registration crop: the LR
    cut from a top-left-aligned x``s`` grid. An LR resized from the *whole* HR to a size near HR / ``s``
    fits the same size test, but its pixels drift from that grid across the picture (by up to 5 %),
    so every metric would compare misaligned tiles. (``HR // s`` and ``⌈HR / s⌉`` drift by less than
    one LR px and are kept.) Both readings are scored (the HR resized to the LR's size either way, one
    kernel, PSNR on Y to the LR); when the whole-picture resize fits the LR better by more than
    ``RESIZE_MARGIN_DB``, the pair is refused with a clear error."""
    from realdgen_core.metrics import psnr

    lh, lw = lr.shape[:2]
    ch, cw = min(lh, hr.shape[0] // s), min(lw, hr.shape[1] // s)

    def down(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BICUBIC))

    crop = psnr(down(hr[: ch * s, : cw * s], (cw, ch)), lr[:ch, :cw], y_channel=True)
    whole = psnr(down(hr, (lw, lh)), lr, y_channel=True)
    if whole > crop + RESIZE_MARGIN_DB:
        h, w = hr.shape[:2]
        raise ManifestError(
            f"{what}: the LR {lw}x{lh} does not line up with the HR {w}x{h} on an x{s} grid from the "
            f"top-left (a resize of the whole HR, x{w / lw:.3f} by {h / lh:.3f}, fits it better: {whole:.1f} "
            f"dB PSNR on Y against {crop:.1f} dB); crop the HR to a multiple of {s} before making its LR, "
            "or fix `scale`"
        )


def _resolve_dirs(m: EvaluateManifest, d: EvalDomain) -> tuple[str, Path, Path, Path | None]:
    base = Path(d.path) if d.path else (Path(m.root) / d.name if m.root else None)
    layout = d.layout
    # folders named explicitly pair as `explicit` (exact names, else suffixes): the layout found
    # under `path` would pin exact names for hr/+lr/ even where the named files carry suffixes
    if layout == "auto" and base is not None and not (d.hr and d.lr):
        if (base / "hr").is_dir() and (base / "lr").is_dir():
            layout = "bench"
        elif (base / "HR").is_dir() and (base / "LR").is_dir():
            layout = "realsr"
    if d.hr and d.lr:
        hr, lr = Path(d.hr), Path(d.lr)
        layout = layout if layout != "auto" else "explicit"
    elif base is None or layout == "auto":
        raise ManifestError(
            f"domains.{d.name}: no hr/+lr/ or HR/+LR/ folders under {str(base)!r} (set `hr` and `lr`)"
        )
    else:
        sub = ("hr", "lr") if layout == "bench" else ("HR", "LR")
        hr, lr = Path(d.hr or base / sub[0]), Path(d.lr or base / sub[1])
    refs = Path(d.refs_train) if d.refs_train else None
    if refs is None and base is not None and (base / "refs_train").is_dir():
        refs = base / "refs_train"
    for what, p in (("hr", hr), ("lr", lr), ("refs_train", refs)):
        if p is not None and not p.is_dir():
            raise ManifestError(f"domains.{d.name}.{what}: not a folder (got {str(p)!r})")
    return layout, hr, lr, refs


def _match_key(stem: str, layout: str) -> str:
    if layout != "realsr":
        return stem
    div2k = _DIV2K_LR.match(stem)
    return div2k.group(1) if div2k else _REALSR_SUFFIX.sub("", stem)


def _lr_by_key(lr_files: list[Path], layout: str, scale: int, what: str) -> dict[str, Path]:
    """True LR files by match key. Two files with one key (`_LR2` and `_LR4` of one photo) keep the
    one whose suffix names this scale; otherwise which one is meant cannot be told: an error."""
    by_key: dict[str, list[Path]] = {}
    for p in lr_files:
        by_key.setdefault(_match_key(p.stem, layout), []).append(p)
    out = {}
    for key, files in by_key.items():
        if len(files) > 1:
            named = [p for p in files if _suffix_scale(p.stem) == scale]
            if len(named) != 1:
                raise ManifestError(
                    f"{what}: true LR files {sorted(p.name for p in files)} pair with the same HR; keep one "
                    f"per photo and scale (a suffix such as _LR{scale} or _x{scale} picks the x{scale} one)"
                )
            files = named
        out[key] = files[0]
    return out


def _is_lr_name(stem: str) -> bool:
    """A RealSR/DIV2K name of an LR file: ``_LR``, ``_LR4``, ``_x2`` (not ``_x1``), ``0801x4``."""
    if _DIV2K_LR.match(stem):
        return True
    mt = _REALSR_SUFFIX.search(stem)
    return bool(mt) and not stem.upper().endswith("_HR") and _suffix_scale(stem) != 1


def _suffix_scale(stem: str) -> int | None:
    div2k = _DIV2K_LR.match(stem)
    if div2k:
        return int(div2k.group(2))
    mt = _REALSR_SUFFIX.search(stem)
    digits = next((g for g in mt.groups() if g), None) if mt else None
    return int(digits) if digits else None


def prepare_domain(m: EvaluateManifest, d: EvalDomain, work: Path) -> DomainTiles:
    """Pair HR with true LR by name, cut both into eval tiles, write them per group under ``work``."""
    layout, hr_dir, lr_dir, refs = _resolve_dirs(m, d)
    s, t = m.scale, m.generation.tile
    hr_files, lr_files = _images(hr_dir), _images(lr_dir)
    notes: list[str] = []
    if hr_dir.resolve() == lr_dir.resolve():  # RealSR V3: Canon_001_HR.png and Canon_001_LR4.png side by side
        layout = "realsr"
        lr_files = [p for p in hr_files if _is_lr_name(p.stem)]
        hr_files = [p for p in hr_files if not _is_lr_name(p.stem)]
    hr_files = _utf8_named(hr_files, hr_dir, "HR", notes)
    lr_files = _utf8_named(lr_files, lr_dir, "LR", notes)
    if layout in ("explicit", "bench") and not {p.stem for p in hr_files} & {p.stem for p in lr_files}:
        # `hr`/`lr` folders whose files carry RealSR/DIV2K suffixes (DRealSR's test_HR/test_LR)
        layout = "realsr"
        notes.append("no HR and LR file share a name: paired by RealSR/DIV2K suffixes (_HR, _LR4, _x4, x4)")
    lr_by_key = _lr_by_key(lr_files, layout, s, f"domains.{d.name}")
    tiles: list[Tile] = []
    unmatched = []
    for hp in hr_files:
        key = _match_key(hp.stem, layout)
        lp = lr_by_key.get(key)
        if lp is None:
            unmatched.append(hp.name)
            continue
        pair = []
        for side, p in (("HR", hp), ("LR", lp)):  # one broken file loses its pair (noted), not the run
            try:
                pair.append(_rgb(p))
            except ImageError as exc:
                notes.append(f"{side} {p.name}: {exc}; pair skipped")
                break
        if len(pair) < 2:
            continue
        hr, lr, note = _align(*pair, s, f"domains.{d.name}: {hp.name} / {lp.name}")
        if note:
            notes.append(note)
        lh, lw = lr.shape[:2]
        group = group_of(hp.stem, m.generation.group_pattern)
        if lh == t and lw == t:
            tiles.append(Tile(key, group, np.ascontiguousarray(hr), np.ascontiguousarray(lr)))
            continue
        cut = 0
        for y in range(0, lh - t + 1, t):
            for x in range(0, lw - t + 1, t):
                if cut >= m.generation.max_tiles_per_image:
                    break
                tiles.append(
                    Tile(
                        f"{key}_{y}_{x}",
                        group,
                        np.ascontiguousarray(hr[y * s : (y + t) * s, x * s : (x + t) * s]),
                        np.ascontiguousarray(lr[y : y + t, x : x + t]),
                    )
                )
                cut += 1
        if cut == 0:
            notes.append(f"{hp.name}: LR {lw}x{lh} is smaller than one {t}-px tile; skipped")
    same = "of the same name" if layout != "realsr" else "(RealSR/DIV2K suffixes)"
    if unmatched:
        notes.append(f"{len(unmatched)} HR image(s) without a true LR {same}, e.g. {unmatched[:3]}")
    paired = {_match_key(hp.stem, layout) for hp in hr_files}
    orphans = sorted(p.name for key, p in lr_by_key.items() if key not in paired)
    if orphans:
        notes.append(f"{len(orphans)} true LR image(s) without an HR {same}, left out, e.g. {orphans[:3]}")
    if not tiles:
        why = "; ".join(notes[:5]) or "no image files"
        raise ManifestError(
            f"domains.{d.name}: no (HR, LR) tile found in {str(hr_dir)!r} / {str(lr_dir)!r} ({why})"
        )
    groups = sorted({x.group for x in tiles})
    if len(groups) < 2:
        raise ManifestError(
            f"domains.{d.name}: one photo group only ({groups[0]!r}, from generation.group_pattern "
            f"{m.generation.group_pattern!r} on the file names); honest references need at least two photos"
        )
    if len(groups) == len(tiles) > 2:
        notes.append(
            f"every tile is its own photo group ({len(tiles)}): if some are cut from the same photo, their "
            "references leak; set generation.group_pattern to name the photo"
        )
    ref_files = _utf8_named(_source_images(refs), refs, "refs_train", notes) if refs is not None else []
    ref_names = [_below(p, refs) for p in ref_files]  # the digest's names: below refs_train
    if refs is not None:
        if not ref_files:
            why = f" ({notes[-1]})" if notes and notes[-1].startswith("refs_train:") else ""
            raise ManifestError(f"domains.{d.name}.refs_train: no image files in {str(refs)!r}{why}")
        bad = []
        # decoded now, so a folder of broken files fails before any job
        for p, name in zip(ref_files, ref_names, strict=True):
            try:
                _rgb(p)
            except ImageError as exc:
                bad.append(f"{name}: {exc}")
        if len(bad) == len(ref_files):
            raise ManifestError(
                f"domains.{d.name}.refs_train: none of its {len(bad)} image files decodes (e.g. {bad[0]})"
            )
        if bad:
            n_bad = f"{len(bad)} of {len(ref_files)}"
            notes.append(f"refs_train: {n_bad} files do not decode, left out (e.g. {bad[0]})")
    names = [x.name for x in tiles]
    if len(set(names)) != len(names):
        raise ManifestError(f"domains.{d.name}: tile names collide (HR names must be unique)")
    # The domain's work folder is named by a digest of its content (tiles, groups, refs_train bytes),
    # so re-generated or edited benchmark data never reuses datasets made from the old data.
    h = hashlib.sha256(json.dumps([m.scale, t, m.generation.group_pattern]).encode())
    for tl in sorted(tiles, key=lambda x: x.name):
        h.update(f"{tl.name}|{tl.group}|".encode())
        h.update(tl.hr.tobytes())
        h.update(tl.lr.tobytes())
    for p, name in zip(ref_files, ref_names, strict=True):  # a file at the top: its name, as before
        h.update(name.encode())
        h.update(p.read_bytes())
    work = work / f"data-{h.hexdigest()[:12]}"
    root = work / "tiles"
    for tl in tiles:
        for kind, img in (("hr", tl.hr), ("lr", tl.lr)):
            p = root / kind / tl.group / f"{tl.name}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            if not p.exists():
                Image.fromarray(img).save(p)
    if refs is None:
        notes.append("no refs_train/: adaptation skipped; SR-proxy references are the domain's true LR tiles")
    return DomainTiles(d.name, layout, hr_dir, lr_dir, refs, root, work, tiles, notes)


# --------------------------------------------------------------------------------------------
# The main job
# --------------------------------------------------------------------------------------------


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def generate_manifest_dict(
    m: EvaluateManifest,
    *,
    kind: str,
    hr: str,
    refs: list[tuple[str, str]],
    out: str,
    checkpoint: str | None,
    tiles_per_image: int,
    tiling_mode: str = "grid",
    max_failure_fraction: float = 0.0,
    domain: str | None = None,
) -> dict:
    """A ``kind: generate`` manifest (raw mapping) for one evaluation run, overrides applied.

    ``refs`` are ``(name, uri)`` sets; each is its own reference domain unless ``domain`` labels
    them all as one (the job then chooses one start from all of them)."""
    gen: dict = {"kind": kind}
    if kind == "realdgen":
        gen["checkpoint"] = checkpoint
        for key in ("k", "tau_min", "tau_max"):
            v = getattr(m.generation, key)
            if v is not None:
                gen[key] = v
    data = {
        "kind": "generate",
        "seed": m.seed,
        "scale": m.scale,
        "hr": {"uri": hr},
        "refs": [{"name": name, "domain": domain or name, "source": {"uri": uri}} for name, uri in refs],
        "generator": gen,
        "tiling": {"tile": m.generation.tile, "mode": tiling_mode, "max_tiles_per_image": tiles_per_image},
        "pairing": {"mode": "random", "refs_per_tile": 1},
        # overwrite: a dataset left by a different manifest is replaced (same manifest: resumed)
        "output": {
            "uri": out,
            "name": "eval",
            "inputs_per_shard": 256,
            "preview": False,
            "mode": "overwrite",
        },
        "limits": {"max_failure_fraction": max_failure_fraction},
        "compute": {
            "batch_size": m.generation.batch_size,
            "actors": {"min": m.generation.actors, "max": m.generation.actors},
            "torch_threads": m.compute.torch_threads,
        },
        "progress": {"bar": False},
    }
    overrides = list(m.generation.overrides)
    if kind == "realdgen":
        overrides += list(m.generation.realdgen_overrides)
    return apply_overrides(data, overrides)


def run_generate(data: dict, log: Callable[[str], None], cwd: Path) -> dict:
    """Validate and run one generate manifest in this process (Ray already up); returns its summary.

    Runs with ``cwd`` as the working directory: the work folder's own inputs are written relative to
    it, so the job records the same URIs — hence the same keys and per-sample seeds — wherever the
    report folder is (the baselines draw the same θ for a tile in every run and every domain).
    Workers read images by absolute path, so only the driver's listing sees the relative URIs.
    """
    from pipelines.generate.job import GenerateJob
    from pipelines.generate.plan import make_plan

    manifest = parse_manifest(data, origin="(evaluate)", kind="generate")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        # the evaluation adapted the checkpoint for this domain itself: its reference sets' labels
        # (one per photo group, for honest pairing) are not the user's to match with the calibration's
        plan = make_plan(manifest, list_now=False, domain_note=False)
        return GenerateJob(manifest, log=lambda s: log(f"    job: {s}")).run(plan)
    finally:
        os.chdir(before)


def read_dataset(
    out: str, scale: int, one_per_image: bool = True
) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    """All samples of a generated dataset: HR file stem (``one_per_image``, checked) or sample key
    → (hr, lr, meta)."""
    from pipelines.reader import decode_pair, list_shards

    found: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}
    for entry in list_shards(out):
        with tarfile.open(entry.url, "r") as tar:
            members: dict[str, dict[str, bytes]] = {}
            for mem in tar:
                if not mem.isfile():
                    continue
                key, _, suffix = mem.name.rsplit("/", 1)[-1].partition(".")
                members.setdefault(key, {})[suffix] = tar.extractfile(mem).read()
        for key, files in members.items():
            hr, lr, meta = decode_pair(files, key, scale)
            src = meta["hr_source"]  # a file, or "<shard>.tar#<member>" for an input inside a shard
            src = src.rsplit("#", 1)[-1] if re.search(r"\.tar#", src) else src
            stem = Path(src).stem if one_per_image else key
            if stem in found:
                raise RuntimeError(f"{out}: two samples for HR {stem!r} (expected one tile per image)")
            found[stem] = (hr, lr, meta)
    return found


# --------------------------------------------------------------------------------------------
# Adaptation
# --------------------------------------------------------------------------------------------


def _yaml_str(path: Path) -> str:
    """A path as a ``--set`` value: quoted, since the value is read as YAML (``#`` starts a comment)."""
    return json.dumps(str(path))


class AdaptationFailed(RuntimeError):
    """A domain's adaptation subprocess failed or ran past ``adapt.timeout_s`` (its log is named)."""


def adapt_manifest_path(m: EvaluateManifest) -> Path:
    """``adapt.manifest``: absolute, else relative to the working directory like the manifest's other
    paths, else to the repository (its own ``manifests/adapt.yaml`` from anywhere)."""
    p = Path(m.adapt.manifest)
    if p.is_absolute():
        return p
    return p.resolve() if p.is_file() else REPO / p


def _adapt_sets(
    m: EvaluateManifest, refs_dir: Path, base_ckpt: str | None, ckpt: Path, folder: Path
) -> list[str]:
    """The adaptation's ``--set`` values (the domain's refs_train, the budget, the outputs), then
    ``adapt.overrides``."""
    sets = [f"data.lr.0.source.uri={_yaml_str(refs_dir.resolve())}", f"stage_c.steps={m.adapt.steps}"]
    if base_ckpt is not None:
        sets.insert(0, f"init_checkpoint={_yaml_str(Path(base_ckpt).resolve())}")
    sets += [
        f"output.checkpoint={_yaml_str(ckpt.resolve())}",
        f"output.run_dir={_yaml_str((folder / 'run').resolve())}",
        f"seed={m.seed}",
        f"compute.torch_threads={m.compute.torch_threads}",
        "progress.bar=false",
    ]
    return sets + list(m.adapt.overrides)


def check_adaptation(m: EvaluateManifest, domain: DomainTiles) -> None:
    """Before Ray starts: the adaptation this domain will run loads, lists its refs_train into a
    calibration split with both sides, and finds a training image (the split's training side, under
    ``data.max_image_pixels``) at least its ``stage_c.lr_crop`` px (each a :class:`ManifestError`
    naming the domain, not an adaptation failing an hour in)."""
    from pipelines.train import NoUsableImage, check_sources

    manifest = adapt_manifest_path(m)
    where = f"domains.{domain.name}: adaptation ({manifest})"
    if not manifest.is_file():
        raise ManifestError(
            f"adapt.manifest: file not found (got {m.adapt.manifest!r}, looked at {str(manifest)!r})"
        )
    assert domain.refs_dir is not None
    folder = domain.work / "adapt-check"
    sets = _adapt_sets(m, domain.refs_dir, m.checkpoint, folder / "adapted.safetensors", folder)
    try:
        tm = load_manifest(manifest, sets, kind="train")
        # lists every source, splits refs_train for the calibration and finds a training-side image
        # of at least stage_c.lr_crop (decoded, under data.max_image_pixels)
        check_sources(tm, tm.stages, tm.calibration.enabled)
    except NoUsableImage as exc:
        raise ManifestError(
            f"{where}: {exc}; add larger LR images or set adapt.overrides to a smaller stage_c.lr_crop"
        ) from None
    except ManifestError as exc:
        raise ManifestError(f"{where}: {exc}") from None


def adapt_checkpoint(
    m: EvaluateManifest, domain: DomainTiles, base_ckpt: str, base_digest: str, work: Path, log
) -> tuple[str, float]:
    """Run the one-command adaptation on the domain's refs_train; returns (checkpoint, seconds)."""
    manifest = adapt_manifest_path(m)
    from pipelines.manifest import manifest_digest

    # (the domain's work folder already names the refs_train content). The resolved manifest's digest
    # holds the defaults too (e.g. the calibration's start bank), so new defaults mean a new adaptation.
    resolved = manifest_digest(load_manifest(manifest, list(m.adapt.overrides), kind="train"))
    inputs = (base_digest, m.adapt.steps, list(m.adapt.overrides), manifest.read_text(), m.seed, resolved)
    tag = _sha(*inputs)[:12]
    folder = work / f"adapt-{tag}"
    ckpt = folder / "adapted.safetensors"
    done = folder / "_done.json"
    if ckpt.exists() and done.exists():
        log(f"  adaptation: reusing {ckpt}")
        return str(ckpt), float(json.loads(done.read_text()).get("seconds", 0.0))
    folder.mkdir(parents=True, exist_ok=True)
    sets = _adapt_sets(m, domain.refs_dir, base_ckpt, ckpt, folder)
    cmd = [
        sys.executable,
        str(REPO / "pipelines" / "train.py"),
        str(manifest),
        *[x for o in sets for x in ("--set", o)],
    ]
    log(f"  adaptation: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": str(m.compute.torch_threads)}
    log_path = folder / "train.log"
    csv_path = folder / "run" / "logs" / "diffusion.csv"
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=out, stderr=subprocess.STDOUT)
        last = time.perf_counter()
        while proc.poll() is None:  # progress from the run's CSV log every 30 s
            time.sleep(1.0)
            if time.perf_counter() - t0 > m.adapt.timeout_s:
                proc.kill()
                proc.wait()
                raise AdaptationFailed(
                    f"domains.{domain.name}: adaptation exceeded adapt.timeout_s = "
                    f"{m.adapt.timeout_s}; log {log_path}"
                )
            if time.perf_counter() - last >= 30 and csv_path.exists():
                last = time.perf_counter()
                rows = csv_path.read_text().strip().splitlines()
                step = rows[-1].split(",", 1)[0] if len(rows) > 1 else "0"
                log(f"  adaptation: step {step}/{m.adapt.steps} ({last - t0:.0f} s)")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not ckpt.exists():
        tail = log_path.read_text()[-2000:]
        raise AdaptationFailed(
            f"domains.{domain.name}: adaptation failed (exit {proc.returncode}); log {log_path}:\n{tail}"
        )
    done.write_text(json.dumps({"seconds": round(seconds, 1), "cmd": cmd[1:]}, indent=1))
    log(f"  adaptation: done in {seconds:.0f} s -> {ckpt}")
    return str(ckpt), seconds


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


# Identical 8-bit tiles have an infinite PSNR, which would make a domain's mean infinite: a tile's PSNR is
# capped at that of 8-bit rounding error (MSE 1/12), the closest two 8-bit pictures can be told to agree.
PSNR_CAP = round(10 * math.log10(255.0**2 * 12), 2)  # 58.92 dB


def tile_metrics(gen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PSNR (capped at ``PSNR_CAP``)/SSIM (RGB, 0–255) and the three statistics of a generated and a true
    LR tile; the gaps relative to the truth's statistic floored at ``realism.GAP_FLOORS``."""
    from realdgen_core.metrics import psnr, ssim

    g, t = realism.lr_stats(gen), realism.lr_stats(truth)
    row = {"psnr": min(psnr(gen, truth), PSNR_CAP), "ssim": ssim(gen, truth)}
    for k in realism.STATS:
        row[k] = g[k]
        row[f"{k}_gap"] = realism.relative_gap(g[k], t[k], realism.GAP_FLOORS[k])
    return row


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return round(float(np.mean(xs)), 4) if xs else float("nan")


def summarise(rows: list[dict]) -> dict:
    keys = ["psnr", "ssim", *realism.STATS, *[f"{k}_gap" for k in realism.STATS]]
    return {k: _mean(r[k] for r in rows) for k in keys}


def _load_demo_photos(names, folder: Path) -> Path:
    """Make ``folder`` hold exactly the bundled photos ``names`` (``<name>.png``): a photo dropped from
    ``sr_proxy.photos`` since the last run into this report folder is deleted, so it leaves the SR-proxy
    training and the folder's listing (``_sr_source_key``) names new datasets. The folder keeps its name,
    so a photo keeps its URI (its job keys and per-sample seeds) whichever photos are beside it."""
    from pipelines.demo_data import load_photo

    folder.mkdir(parents=True, exist_ok=True)
    wanted = {f"{n}.png" for n in names}
    for p in folder.iterdir():
        if p.name in wanted:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    for n in names:
        p = folder / f"{n}.png"
        if not p.exists():  # written whole, then renamed: an interrupted run leaves no partial photo
            tmp = folder / f".{n}.png.tmp"
            Image.fromarray(load_photo(n)).save(tmp, format="PNG")
            tmp.replace(p)
    return folder


def _learned_metric_notices(m: EvaluateManifest) -> list[str]:
    notes = []
    lm = m.learned_metrics
    if lm.lpips_weights is None:
        notes.append(
            "LPIPS skipped: no `learned_metrics.lpips_weights` (pretrained weights cannot be downloaded)"
        )
    elif not Path(lm.lpips_weights).is_file():
        notes.append(f"LPIPS skipped: weights file not found ({lm.lpips_weights})")
    else:
        try:
            import lpips  # noqa: F401
        except ImportError:
            notes.append("LPIPS skipped: weights given but the `lpips` package is not installed")
    if lm.fid_weights is None:
        notes.append("FID skipped: no `learned_metrics.fid_weights` (Inception weights are not bundled)")
    else:
        notes.append(f"FID skipped: not implemented in this build (weights given: {lm.fid_weights})")
    return notes


def _lpips_scores(
    m: EvaluateManifest, pairs: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float | None, str | None]:
    """Mean LPIPS (``lpips`` package, AlexNet, linear layers from the named local file) or a notice.

    The AlexNet backbone comes from torchvision's local cache; nothing is downloaded on purpose, and
    any failure (no package, no cached backbone) becomes a notice rather than an error."""
    lm = m.learned_metrics
    if lm.lpips_weights is None or not Path(lm.lpips_weights).is_file():
        return None, None
    try:
        import lpips
        import torch

        net = lpips.LPIPS(net="alex", model_path=lm.lpips_weights, pretrained=True, verbose=False)
        vals = []
        with torch.no_grad():
            for a, b in pairs:
                ta = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1
                tb = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 127.5 - 1
                vals.append(float(net(ta, tb)))
    except Exception as exc:  # a convenience metric never sinks the evaluation
        return None, f"LPIPS skipped: {type(exc).__name__}: {exc}"[:300]
    return _mean(vals), None


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def _default_log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def evaluate_domain(
    m: EvaluateManifest, d: EvalDomain, dom: DomainTiles, work: Path, sr_hr: str | None, log
) -> tuple[dict, dict]:
    """Measure one prepared domain; returns (its report section, images for the report: tiles + LR per
    generator)."""
    from realdgen_core.checkpoint import checkpoint_digest

    t_dom = time.perf_counter()
    dwork = dom.work
    groups = dom.groups
    log(f"[{d.name}] {len(dom.tiles)} tiles in {len(groups)} photo group(s) {groups}, layout {dom.layout}")
    for n in dom.notes:
        log(f"[{d.name}] note: {n}")
    timings: dict[str, float] = {}
    section: dict = {
        "layout": dom.layout,
        "hr_dir": str(dom.hr_dir),
        "lr_dir": str(dom.lr_dir),
        "refs_train": str(dom.refs_dir) if dom.refs_dir else None,
        "tiles": len(dom.tiles),
        "groups": {g: sum(1 for t in dom.tiles if t.group == g) for g in groups},
        "notes": list(dom.notes),
    }
    ckpt = m.checkpoint
    digest = checkpoint_digest(ckpt) if ckpt else None
    section["base_model_digest"] = digest
    if m.adapt.enabled:
        if dom.refs_dir is None:
            section["notes"].append("adaptation skipped: the domain has no refs_train/")
        else:
            ckpt, secs = adapt_checkpoint(m, dom, ckpt, digest, dwork, log)
            digest = checkpoint_digest(ckpt)
            timings["adapt_s"] = round(secs, 1)
    section["checkpoint"] = ckpt
    section["model_digest"] = digest
    section["adapted"] = bool(m.adapt.enabled and dom.refs_dir is not None)

    truth = {t.name: t.lr for t in dom.tiles}
    hr_tiles = {t.name: t.hr for t in dom.tiles}
    truth_stats = {n: realism.lr_stats(a) for n, a in truth.items()}
    section["truth"] = {k: _mean(s[k] for s in truth_stats.values()) for k in realism.STATS}
    generated: dict[str, dict[str, np.ndarray]] = {}
    metas: dict[str, dict[str, dict]] = {}
    for kind in m.generation.generators:
        t0 = time.perf_counter()
        tag = f"realdgen-{digest[:12]}" if kind == "realdgen" else kind
        found: dict = {}
        if kind == "realdgen":
            for g in groups:
                others = [o for o in groups if o != g]  # never empty: prepare_domain checked
                out = dwork / "gen" / tag / g
                data = generate_manifest_dict(
                    m,
                    kind=kind,
                    hr=f"tiles/hr/{g}",
                    refs=[(f"truelr-{o}", f"tiles/lr/{o}") for o in others],
                    out=str(out.resolve()),
                    checkpoint=str(Path(ckpt).resolve()),
                    tiles_per_image=1,
                    # One pipeline, so one reference domain: with three or more photos the start is
                    # chosen from the true LR of all the other photos together, not once per photo
                    # from a handful of tiles each. (Two photos: the same label as one set alone.)
                    domain="truelr-" + "+".join(others),
                )
                log(
                    f"[{d.name}] {kind}: photo {g} ({section['groups'][g]} tiles), refs = true LR of {others}"
                )
                run_generate(data, log, dwork)
                found.update(read_dataset(str(out), m.scale))
        else:
            out = dwork / "gen" / tag
            data = generate_manifest_dict(
                m,
                kind=kind,
                hr="tiles/hr",
                refs=[],
                out=str(out.resolve()),
                checkpoint=None,
                tiles_per_image=1,
            )
            log(f"[{d.name}] {kind}: {len(dom.tiles)} tiles")
            run_generate(data, log, dwork)
            found.update(read_dataset(str(out), m.scale))
        missing = sorted(set(truth) - set(found))
        if missing:
            raise RuntimeError(
                f"[{d.name}] {kind}: no generated LR for {len(missing)} tile(s), e.g. {missing[:3]}"
            )
        for name, (hr, lr, meta) in found.items():
            if name not in truth:
                raise RuntimeError(f"[{d.name}] {kind}: unexpected sample for {name!r}")
            if meta.get("hr_box") != [0, 0, hr.shape[1], hr.shape[0]] or not np.array_equal(
                hr, hr_tiles[name]
            ):
                raise RuntimeError(f"[{d.name}] {kind}: the shard's HR of {name} is not the whole eval tile")
            if lr.shape != truth[name].shape:
                raise RuntimeError(
                    f"[{d.name}] {kind}: LR of {name} is {lr.shape}, true LR {truth[name].shape}"
                )
        generated[kind] = {n: found[n][1] for n in truth}
        metas[kind] = {n: found[n][2] for n in truth}
        timings[f"generate_{kind}_s"] = round(time.perf_counter() - t0, 1)

    # Full-reference metrics and statistic gaps, per tile.
    gens_out: dict[str, dict] = {}
    names = sorted(truth)
    for kind, lrs in generated.items():
        rows = []
        for n in names:
            r = tile_metrics(lrs[n], truth[n])
            rows.append({"tile": n, "group": next(t.group for t in dom.tiles if t.name == n), **r})
        gens_out[kind] = {"metrics": summarise(rows), "per_tile": rows}
        log(
            f"[{d.name}] {kind}: PSNR {gens_out[kind]['metrics']['psnr']:.2f} dB, SSIM "
            f"{gens_out[kind]['metrics']['ssim']:.3f}, noise gap {gens_out[kind]['metrics']['noise_gap']:.2f}"
        )
        lp, notice = _lpips_scores(m, [(lrs[n], truth[n]) for n in names])
        if lp is not None:
            gens_out[kind]["metrics"]["lpips"] = lp
        if notice and notice not in section["notes"]:
            section["notes"].append(notice)
        if kind == "realdgen":
            ms = [metas[kind][n] for n in names]
            gens_out[kind]["shard_values"] = {
                "tau": [x.get("tau") for x in ms],
                "content_error": [x.get("content_error") for x in ms],
                "degradation_error": [x.get("degradation_error") for x in ms],
                "ref_source": [Path(str(x.get("ref_source"))).name for x in ms],
            }
            own = [n for n, x in zip(names, ms, strict=True) if Path(str(x.get("ref_source"))).stem == n]
            if own:
                raise RuntimeError(f"[{d.name}] a tile was its own reference: {own[:3]}")

    # Classifier two-sample test.
    too_few = classifier_too_few(m, names) if m.classifier.enabled else None
    if too_few:
        section["notes"].append(too_few)
        log(f"[{d.name}] {too_few}")
    if m.classifier.enabled and not too_few:
        import torch

        from realdgen_core.probes import two_sample_test

        torch.set_num_threads(m.compute.torch_threads)
        grp = [next(t.group for t in dom.tiles if t.name == n) for n in names]
        c = m.classifier
        for kind, lrs in generated.items():
            t0 = time.perf_counter()
            runs = [
                two_sample_test(
                    [truth[n] for n in names],
                    [lrs[n] for n in names],
                    grp,
                    steps=c.steps,
                    batch_size=c.batch_size,
                    crop=c.crop,
                    width=c.width,
                    lr=c.lr,
                    seed=m.seed + 1000 * r,
                )
                for r in range(c.repeats)
            ]
            res = pool_classifier_runs(runs)
            gens_out[kind]["classifier"] = res
            gens_out[kind]["metrics"]["classifier_accuracy"] = res["accuracy"]
            gens_out[kind]["metrics"]["classifier_paired_accuracy"] = res["paired_accuracy"]
            gens_out[kind]["metrics"]["classifier_paired_fold_distance"] = res["paired_fold_distance"]
            timings[f"classifier_{kind}_s"] = round(time.perf_counter() - t0, 1)
            lo, hi = res["accuracy_ci95"]
            log(
                f"[{d.name}] {kind}: classifier accuracy {res['accuracy']:.3f} "
                f"(95% CI {lo:.2f}-{hi:.2f}; 0.5 = not told apart), paired {res['paired_accuracy']:.3f} "
                f"(95% CI {res['paired_ci95'][0]:.2f}-{res['paired_ci95'][1]:.2f}), per-fold distance to "
                f"chance {res['paired_fold_distance']:.3f}"
            )

    # SR proxy.
    if m.sr_proxy.enabled:
        section["sr_proxy"] = sr_proxy_domain(
            m, d, dom, dwork, work, sr_hr, ckpt, digest, gens_out, timings, log
        )

    section["generators"] = gens_out
    section["timings"] = {**timings, "domain_s": round(time.perf_counter() - t_dom, 1)}
    images = {"tiles": dom.tiles, "generated": generated}
    return section, images


def _sr_source_key(sr_hr: str, work: Path) -> str:
    """Digest of the SR-proxy HR source (URI + names and sizes of local files): shared baseline
    pairs are regenerated when the photos change."""
    local = (work / sr_hr) if not Path(sr_hr).is_absolute() else Path(sr_hr)
    listing = (
        sorted((str(p.relative_to(local)), p.stat().st_size) for p in local.rglob("*") if p.is_file())
        if "://" not in sr_hr and local.is_dir()
        else []
    )
    return _sha(sr_hr, listing)[:12]


def sr_proxy_runs(pairs, real_pairs, sp, scale: int, seed: int) -> list[dict]:
    """Train the SR proxy ``sp.repeats`` times on ``pairs`` (seeds ``seed + 1000 r``, the other
    settings from the manifest's ``sr_proxy`` section ``sp``) and score each net on ``real_pairs``."""
    from realdgen_core.probes import evaluate_sr_proxy, train_sr_proxy

    runs = []
    for r in range(sp.repeats):
        net, info = train_sr_proxy(
            pairs,
            scale,
            steps=sp.steps,
            batch_size=sp.batch_size,
            crop=sp.crop,
            width=sp.width,
            blocks=sp.blocks,
            lr=sp.lr,
            seed=seed + 1000 * r,
        )
        runs.append({**evaluate_sr_proxy(net, real_pairs, scale), **info})
    return runs


def sr_proxy_domain(m, d, dom, dwork, work, sr_hr, ckpt, digest, gens_out, timings, log) -> dict:
    import torch

    from realdgen_core.probes import evaluate_sr_proxy

    torch.set_num_threads(m.compute.torch_threads)
    sp = m.sr_proxy
    real_pairs = [(t.hr, t.lr) for t in sorted(dom.tiles, key=lambda t: t.name)]
    refs_dir = dom.refs_dir or (dom.tiles_root / "lr")
    out: dict = {
        "train_hr": sr_hr,
        "references": str(refs_dir),
        "bicubic_upsampling": evaluate_sr_proxy(None, real_pairs, m.scale),
    }
    for kind in m.generation.generators:
        t0 = time.perf_counter()
        if kind == "realdgen":
            target = dwork / "sr_pairs" / f"realdgen-{digest[:12]}-{_sr_source_key(sr_hr, work)}"
            refs = [("refs_train", str(refs_dir.resolve()))]
        else:  # random θ, no reference: the same dataset serves every domain
            target = work / "_shared" / f"sr_pairs-{_sr_source_key(sr_hr, work)}" / kind
            refs = []
        data = generate_manifest_dict(
            m,
            kind=kind,
            hr=sr_hr,
            refs=refs,
            out=str(target.resolve()),
            checkpoint=str(Path(ckpt).resolve()) if ckpt else None,
            tiles_per_image=sp.tiles_per_image,
            max_failure_fraction=0.5,
        )
        log(f"[{d.name}] SR proxy: {kind} training pairs")
        run_generate(data, log, work)
        pairs = [
            (hr, lr)
            for _, (hr, lr, _) in sorted(read_dataset(str(target), m.scale, one_per_image=False).items())
        ]
        index = json.loads((target / "_index.json").read_text())
        if index.get("inputs_failed"):  # the job tolerates some (max_failure_fraction): say so
            out.setdefault("inputs_failed", {})[kind] = f"{index['inputs_failed']} of {index['inputs']}"
            log(f"[{d.name}] SR proxy {kind}: {index['inputs_failed']} of {index['inputs']} HR inputs failed")
        runs = sr_proxy_runs(pairs, real_pairs, sp, m.scale, m.seed)
        res = dict(runs[0])
        if len(runs) > 1:  # mean over seeds; the spread says how much a ranking can be trusted
            for k in ("psnr", "ssim"):
                vals = [x[k] for x in runs]
                res[k], res[f"{k}_std"] = round(float(np.mean(vals)), 4), round(float(np.std(vals)), 4)
            res["runs"] = [{k: x[k] for k in ("psnr", "ssim", "last_loss")} for x in runs]
        res.update(train_pairs=len(pairs))
        gens_out[kind]["sr_proxy"] = res
        gens_out[kind]["metrics"]["sr_psnr"] = res["psnr"]
        gens_out[kind]["metrics"]["sr_ssim"] = res["ssim"]
        timings[f"sr_proxy_{kind}_s"] = round(time.perf_counter() - t0, 1)
        log(
            f"[{d.name}] SR proxy {kind}: {res['psnr']:.2f} dB / {res['ssim']:.3f} on the real pairs "
            f"({len(pairs)} train pairs)"
        )
    return out


MIN_CLASSIFIER_TEST_CROPS = 16  # per class, over every held-out fold


def classifier_too_few(m: EvaluateManifest, names: Sequence[str]) -> str | None:
    """Why the classifier test is skipped on this domain, or None. Every tile is held out once (its
    photo's fold) and scored on its non-overlapping ``classifier.crop`` positions, and the accuracy
    pools those crops; with a handful of them it takes a few coarse values and its interval still
    reads as a result, so below ``MIN_CLASSIFIER_TEST_CROPS`` true-LR crops in all the test is left
    out, with this note."""
    t = m.generation.tile
    crop = min(m.classifier.crop, t)
    crops = len(names) * (t // crop) ** 2
    if crops >= MIN_CLASSIFIER_TEST_CROPS:
        return None
    shrunk = f" (classifier.crop {m.classifier.crop} > tile {t}: {t})" if m.classifier.crop > t else ""
    return (
        f"classifier skipped: {crops} held-out test crop(s) of {crop} px{shrunk} per class, fewer than "
        f"{MIN_CLASSIFIER_TEST_CROPS}: too few for an accuracy with a meaningful interval. Use more "
        "tiles (generation.max_tiles_per_image, more pairs) or a smaller classifier.crop"
    )


def pool_classifier_runs(runs: list[dict]) -> dict:
    """One classifier result from seeded repeats: accuracy = mean over the repeats' test crops.

    A repeat changes only the classifier's seed: every repeat scores the same held-out crops. So the
    Wilson interval is that of ONE repeat's crops at the pooled accuracy (pooling the repeats as
    independent crops made it √repeats too narrow); crops of one tile overlap and are correlated,
    so even this interval is a lower bound on the uncertainty."""
    from realdgen_core.probes import fold_distance, wilson_interval

    if len(runs) == 1:
        return runs[0]
    if len({(r["test_crops"], r["test_pairs"]) for r in runs}) != 1:
        raise ValueError("classifier repeats scored different numbers of test crops")
    correct = sum(round(r["accuracy"] * r["test_crops"]) for r in runs)
    total = sum(r["test_crops"] for r in runs)
    accs = [r["accuracy"] for r in runs]
    wins = sum(r["paired_wins"] for r in runs)
    pairs = sum(r["test_pairs"] for r in runs)
    crops1, pairs1 = runs[0]["test_crops"], runs[0]["test_pairs"]
    return {
        "accuracy": round(correct / total, 4),
        "accuracy_ci95": [round(v, 4) for v in wilson_interval(round(correct / total * crops1), crops1)],
        "paired_accuracy": round(wins / pairs, 4),
        "paired_ci95": [round(v, 4) for v in wilson_interval(round(wins / pairs * pairs1), pairs1)],
        "distinct_test_crops": crops1,
        "paired_wins": wins,
        "test_pairs": pairs,
        "paired_repeats": [r["paired_accuracy"] for r in runs],
        "paired_fold_distance": fold_distance([f for r in runs for f in r["folds"]]),
        "accuracy_std": round(float(np.std(accs)), 4),
        "tile_accuracy": round(float(np.mean([r["tile_accuracy"] for r in runs])), 4),
        "test_crops": total,
        "repeats": accs,
        "folds": [f for r in runs for f in r["folds"]],
        "chance": 0.5,
    }


def run_evaluation(m: EvaluateManifest, *, log: Callable[[str], None] = _default_log) -> dict:
    """Run a ``kind: evaluate`` manifest; writes the report folder and returns report.json's dict."""
    import torch

    from pipelines.eval_report import write_report
    from pipelines.generate_dataset import ensure_ray

    t_start = time.perf_counter()
    torch.set_num_threads(m.compute.torch_threads)
    report_dir = Path(m.report.dir)
    work = report_dir / "work"
    if m.report.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(m.compute.torch_threads))
    sr_hr = None
    if m.sr_proxy.enabled:
        if m.sr_proxy.hr is not None:
            uri = m.sr_proxy.hr.uri  # the user's path: absolute, since jobs run in the work folder
            sr_hr = uri if "://" in uri else str(Path(uri).resolve())
        else:
            _load_demo_photos(m.sr_proxy.photos, work / "_shared" / "sr_hr")
            sr_hr = "_shared/sr_hr"  # relative to the work folder (see run_generate)
    if m.checkpoint and not Path(m.checkpoint).is_file():
        raise ManifestError(f"checkpoint: file not found (got {m.checkpoint!r})")
    if m.checkpoint and "realdgen" in m.generation.generators:
        from realdgen_core.checkpoint import CheckpointError, inspect_checkpoint

        try:
            config = inspect_checkpoint(m.checkpoint)[0]
        except (CheckpointError, OSError, ValueError) as exc:
            raise ManifestError(f"checkpoint: not a usable RealDGen checkpoint: {exc}") from None
        if config.scale != m.scale:  # found now, not after the first domain's adaptation and jobs
            raise ManifestError(f"scale: the checkpoint is x{config.scale} (got {m.scale})")
    # Every domain's pairs are read, checked and cut before Ray starts: bad data in the last domain
    # fails now, not after the earlier domains' adaptations and jobs.
    prepared = {d.name: prepare_domain(m, d, work / d.name) for d in m.domains}
    if m.adapt.enabled:
        for dom in prepared.values():
            if dom.refs_dir is not None:
                check_adaptation(m, dom)
    notices = _learned_metric_notices(m)
    for n in notices:
        log(f"notice: {n}")
    started_ray = ensure_ray()
    import logging

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO block per job drowns the progress
    domains: dict[str, dict] = {}
    images: dict[str, dict] = {}
    try:
        for d in m.domains:
            domains[d.name], images[d.name] = evaluate_domain(m, d, prepared[d.name], work, sr_hr, log)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    result = {
        "kind": "evaluate",
        "manifest": m.model_dump(mode="json"),
        "checkpoint": m.checkpoint,
        "definitions": DEFINITIONS,
        "notices": notices,
        "domains": domains,
        "summary": summary_table(domains, m.generation.generators),
        "seconds": round(time.perf_counter() - t_start, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_report(result, images, report_dir, grid_rows=m.report.grid_rows, scale=m.scale)
    log(f"report: {report_dir / 'report.md'} ({result['seconds']:.0f} s)")
    return result


SUMMARY_KEYS = (
    "psnr",
    "ssim",
    "noise_gap",
    "laplacian_gap",
    "blockiness_gap",
    "classifier_accuracy",
    "classifier_paired_accuracy",
    "classifier_paired_fold_distance",
    "sr_psnr",
    "sr_ssim",
)
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "sr_psnr": True, "sr_ssim": True}


def summary_table(domains: dict, generators) -> dict:
    """Per metric and domain: each generator's value, the best generator, realdgen's margin to the
    best baseline (positive = realdgen better)."""
    out: dict = {}
    for key in SUMMARY_KEYS:
        per: dict = {}
        for dname, sec in domains.items():
            vals = {g: sec["generators"][g]["metrics"].get(key) for g in generators if g in sec["generators"]}
            vals = {g: v for g, v in vals.items() if v is not None}
            if not vals:
                continue

            def badness(g, v=vals, k=key):
                if k in CHANCE_METRICS:  # closeness to chance
                    return abs(v[g] - 0.5)
                return -v[g] if HIGHER_IS_BETTER.get(k, False) else v[g]

            best = min(vals, key=badness)
            row = {"values": vals, "best": best}
            base = [g for g in vals if g != "realdgen"]
            if "realdgen" in vals and base:
                bb = min(base, key=badness)
                row["best_baseline"] = bb
                row["realdgen_margin"] = round(badness(bb) - badness("realdgen"), 4)
            per[dname] = row
        if per:
            out[key] = per
    return out


DEFINITIONS = {
    "psnr": "PSNR (dB) of the generated LR tile to the true LR tile, RGB, 0-255, skimage.metrics; "
    "capped at 58.92 dB (8-bit rounding error, MSE 1/12: identical tiles); mean over tiles",
    "ssim": "SSIM (Gaussian window sigma 1.5, mean over RGB channels), skimage.metrics; mean over tiles",
    "noise": "Immerkaer (1996) noise sigma of the luma 0.299R+0.587G+0.114B (0-255): "
    "sqrt(pi/2)/(6(H-2)(W-2)) * sum|Y*N|, N=[[1,-2,1],[-2,4,-2],[1,-2,1]]",
    "laplacian": "mean of (Y*L)^2 over valid pixels, L = 4-neighbour Laplacian [[0,1,0],[1,-4,1],[0,1,0]]",
    "blockiness": "mean |dY| of neighbour pairs straddling 8-px block boundaries / mean |dY| of all other "
    "neighbour pairs (horizontal and vertical pooled); 1 = no blocks",
    "*_gap": "relative gap |g - t| / max(t, floor) of a statistic of the generated (g) and true (t) LR "
    "tile, floor 0.1 (noise), 1.0 (laplacian), 1e-3 (blockiness): below 8-bit rounding's own, only a flat "
    "true tile reaches it; mean over tiles (0 = same statistic)",
    "classifier_accuracy": "held-out crop accuracy of a small CNN trained to tell generated from true LR "
    "crops of the same tiles, leave-one-photo-out folds; threshold = median of the held-out logits "
    "(the held-out set is balanced), so a content shift of an unseen photo's logits does not read as "
    "chance; 0.5 = indistinguishable",
    "classifier_paired_accuracy": "the same classifier's held-out two-alternative forced choice: over "
    "pairs (the true and the generated crop of the same tile and position), the fraction where the "
    "generated crop gets the higher logit (ties half); the content both crops share cancels; 0.5 = "
    "indistinguishable",
    "classifier_paired_fold_distance": "mean over the held-out folds (and repeats) of |paired accuracy "
    "- 0.5|: a fold far below 0.5 (told apart, in the direction opposite to the training photos) "
    "counts as told apart instead of cancelling a fold above; 0 = chance on every fold, lower is better",
    "sr_psnr/sr_ssim": "a small SR net (convs + pixel shuffle, residual on bicubic) trained for a fixed "
    "budget on the generator's pairs of other HR photos (domain refs_train as references), scored on the "
    "domain's real (HR, true LR) tiles, crop_border = scale",
    "references": "realdgen: a tile's reference is drawn (seeded, uniform) from the true LR tiles of the "
    "other photo groups; baselines draw a random theta and use no reference",
}
