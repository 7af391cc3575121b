"""Look inside a RealDGen dataset: statistics, failures, a contact sheet, and the §5 contract check.

:func:`inspect_dataset` makes one streaming pass over the tars (reading only the ``json`` of each
sample, plus the images of the contact-sheet picks, chosen by seeded reservoir sampling) and
reads every shard's parquet for the failures. :func:`check_contract` re-checks the output
contract of ARCHITECTURE §5 with this package's reader; it covers the same points as
``shared/checks/validate_shards.py`` (which stays the independent referee, outside the package).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipelines.reader import (
    BadSample,
    check_member,
    decode_pair,
    filesystem,
    list_shards,
    open_shard,
    read_index,
)
from pipelines.storage import StorageAccessError, TransientStorageError, with_retries
from realdgen_core.shards import open_tar

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<num>\d{6})\.tar$")
REQUIRED_JSON: dict[str, tuple[type, ...]] = {
    "scale": (int,),
    "generator": (str,),
    "hr_source": (str,),
    "hr_box": (list,),
    "ref_source": (str, type(None)),
    "model_digest": (str, type(None)),
    "seed": (int,),
    "k": (int,),
    "tau": (int, type(None)),
    "content_error": (float, int, type(None)),
    "degradation_error": (float, int, type(None)),
}
TAU_BINS = list(range(0, 301, 50)) + [10**9]  # [0,50) … [250,300) [300,…)


def _number(v, integral: bool = False):
    """``v`` when it is a (finite-or-not) number of the right kind (never a bool), else None."""
    kinds = (int,) if integral else (int, float)
    return v if isinstance(v, kinds) and not isinstance(v, bool) else None


def _histogram(values: list[float], bins: int = 10) -> dict:
    """Equal-width histogram of finite values: ``{"edges", "counts", "n", "none"}``."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    out = {"n": len(finite), "none": len(values) - len(finite)}
    if not finite:
        return {**out, "edges": [], "counts": []}
    lo, hi = min(finite), max(finite)
    if hi == lo:
        hi = lo + 1e-9
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    return {**out, "edges": [float(e) for e in edges], "counts": counts.tolist()}


def _tau_histogram(taus: list[int | None]) -> dict:
    counts: Counter = Counter()
    for t in taus:
        if t is None:
            counts["none"] += 1
            continue
        for lo, hi in zip(TAU_BINS, TAU_BINS[1:], strict=False):
            if lo <= t < hi:
                counts[f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"] += 1
                break
    return dict(sorted(counts.items(), key=lambda kv: (kv[0] == "none", len(kv[0]), kv[0])))


def failure_reason(error: str | None) -> str:
    """Group a parquet ``error`` string by its reason: the text before the first ``:``."""
    if not error:
        return "unknown"
    head = str(error).split(":", 1)[0].strip()
    return head if head and len(head) <= 64 else "other"


@dataclass
class InspectReport:
    uri: str
    shards: int = 0
    samples: int = 0
    index_total: int | None = None
    generators: Counter = field(default_factory=Counter)
    scales: Counter = field(default_factory=Counter)
    tau_histogram: dict = field(default_factory=dict)
    content_error_histogram: dict = field(default_factory=dict)
    degradation_error_histogram: dict = field(default_factory=dict)
    attempted: int = 0
    failures: Counter = field(default_factory=Counter)
    unreadable: Counter = field(default_factory=Counter)
    contact_sheet: str | None = None
    contact_keys: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "uri": self.uri,
            "shards": self.shards,
            "samples": self.samples,
            "index_total": self.index_total,
            "generators": dict(self.generators),
            "scales": {str(k): v for k, v in self.scales.items()},
            "tau_histogram": self.tau_histogram,
            "content_error_histogram": self.content_error_histogram,
            "degradation_error_histogram": self.degradation_error_histogram,
            "attempted": self.attempted,
            "failures": dict(self.failures),
            "unreadable": dict(self.unreadable),
            "contact_sheet": self.contact_sheet,
            "contact_keys": self.contact_keys,
        }


def contact_sheet(
    pairs: list[tuple[np.ndarray, np.ndarray]], tile: int | None = None, columns: int = 1, pad: int = 4
) -> Image.Image:
    """One row per pair: HR | LR upscaled by nearest neighbour to the HR size.

    Each pair occupies a ``2*tile + pad`` by ``tile`` cell (``tile`` = the largest HR side when
    not given; HR pasted at the top-left unscaled when it fits, else shrunk to fit). Cells are
    laid out in ``columns`` columns on a white background.
    """
    if not pairs:
        raise ValueError("no pairs for a contact sheet")
    tile = tile or max(max(hr.shape[:2]) for hr, _ in pairs)
    rows = -(-len(pairs) // columns)
    cell_w, cell_h = 2 * tile + pad, tile
    sheet = Image.new(
        "RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), (255, 255, 255)
    )
    for i, (hr, lr) in enumerate(pairs):
        r, c = divmod(i, columns)
        hr_img = Image.fromarray(hr)
        lr_img = Image.fromarray(lr).resize(hr_img.size, Image.NEAREST)
        if max(hr_img.size) > tile:  # only for a fixed tile smaller than the image
            f = tile / max(hr_img.size)
            size = (max(1, round(hr_img.width * f)), max(1, round(hr_img.height * f)))
            hr_img, lr_img = hr_img.resize(size, Image.NEAREST), lr_img.resize(size, Image.NEAREST)
        x, y = pad + c * (cell_w + pad), pad + r * (cell_h + pad)
        sheet.paste(hr_img, (x, y))
        sheet.paste(lr_img, (x + tile + pad, y))
    return sheet


def inspect_dataset(
    uri: str,
    *,
    endpoint_url: str | None = None,
    contact_sheet_path: str | None = None,
    n_pairs: int = 8,
    seed: int = 0,
    tile: int | None = None,
    columns: int = 1,
    max_shards: int | None = None,
) -> InspectReport:
    """Statistics of a dataset, and optionally a contact sheet PNG of ``n_pairs`` random pairs.

    Counts come from each sample's json (the contract's fields), failures from the parquet rows
    whose ``status`` is not ``ok`` (grouped by :func:`failure_reason` of ``error``, or by a
    ``reason`` column when the writer provides one). ``max_shards`` limits the pass for a quick
    look at a very large dataset. The contact-sheet picks are a seeded reservoir sample, so the
    same ``seed`` on the same dataset gives the same sheet.
    """
    from pipelines.export import iter_raw_samples

    report = InspectReport(uri)
    shards = list_shards(uri, endpoint_url)
    index = read_index(uri, endpoint_url)
    report.index_total = index.get("total_samples") if index else None
    if max_shards is not None:
        shards = shards[:max_shards]
    report.shards = len(shards)
    taus: list = []
    content_errors: list = []
    degradation_errors: list = []
    rng = np.random.default_rng(seed)
    reservoir: list[dict] = []

    def on_skip(exc: BadSample) -> None:  # untrusted members and broken tars: counted by reason
        report.unreadable[exc.reason] += exc.count
        log.warning("inspect: skipping: %s", exc)

    for raw in iter_raw_samples(shards, endpoint_url, on_skip):
        try:
            meta = json.loads(raw["json"])
        except Exception:
            meta = None
        if not isinstance(meta, dict):  # unreadable, or a list / string / number
            report.unreadable["bad_json"] += 1
            continue
        report.samples += 1
        report.generators[str(meta.get("generator"))] += 1
        scale = meta.get("scale")
        report.scales[scale if isinstance(scale, int) and not isinstance(scale, bool) else str(scale)] += 1
        # a value of the wrong type counts as "none" in its histogram, never stops the report
        taus.append(_number(meta.get("tau"), integral=True))
        content_errors.append(_number(meta.get("content_error")))
        degradation_errors.append(_number(meta.get("degradation_error")))
        if contact_sheet_path and n_pairs > 0:  # reservoir sampling (Algorithm R), seeded
            if len(reservoir) < n_pairs:
                reservoir.append(raw)
            else:
                j = int(rng.integers(0, report.samples))
                if j < n_pairs:
                    reservoir[j] = raw
    report.tau_histogram = _tau_histogram(taus)
    report.content_error_histogram = _histogram(content_errors)
    report.degradation_error_histogram = _histogram(degradation_errors)
    _read_failures(shards, endpoint_url, report)

    if contact_sheet_path and reservoir:
        pairs = []
        for raw in sorted(reservoir, key=lambda r: r["__key__"]):
            try:
                hr, lr, _ = decode_pair(raw, raw["__key__"])
            except BadSample as exc:
                report.unreadable[exc.reason] += exc.count
                continue
            pairs.append((hr, lr))
            report.contact_keys.append(raw["__key__"])
        if pairs:
            sheet = contact_sheet(pairs, tile=tile, columns=columns)
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            try:
                fs, path = filesystem(contact_sheet_path, endpoint_url)
                if "://" not in contact_sheet_path:
                    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with fs.open(path, "wb") as f:
                    f.write(buf.getvalue())
            except Exception as exc:
                raise ContactSheetError(
                    f"cannot write the contact sheet {contact_sheet_path}: {type(exc).__name__}: {exc}"
                ) from None
            report.contact_sheet = contact_sheet_path
    return report


class ContactSheetError(OSError):
    """The dataset was read; the contact sheet could not be written where asked."""


def _read_failures(shards, endpoint_url, report: InspectReport) -> None:
    from pipelines.storage import read_parquet

    fs = filesystem(shards[0].url, endpoint_url)[0] if shards else None
    for shard in shards:
        ppath = shard.url[: -len(".tar")] + ".parquet"
        try:
            table = read_parquet(with_retries(lambda p=ppath: fs.cat_file(p), what=f"reading {ppath}"))
        except TransientStorageError:  # retried for its budget: storage is away, not this shard
            raise
        except Exception:
            report.unreadable["missing_parquet"] += 1
            continue
        cols = set(table.column_names)
        if "status" not in cols:
            report.unreadable["parquet_without_status"] += 1
            continue
        report.attempted += table.num_rows
        statuses = table.column("status").to_pylist()
        reasons = table.column("reason").to_pylist() if "reason" in cols else None
        errors = table.column("error").to_pylist() if "error" in cols else [None] * table.num_rows
        for i, st in enumerate(statuses):
            if st != "ok":
                r = reasons[i] if reasons and reasons[i] else failure_reason(errors[i])
                report.failures[r] += 1


# --------------------------------------------------------------------------------------------
# Contract check (§5)
# --------------------------------------------------------------------------------------------


@dataclass
class ContractReport:
    uri: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "uri": self.uri,
            "shards": self.shards,
            "samples": self.samples,
            "ok": self.ok,
            "problems": self.problems,
        }


def _check_json(key: str, meta: dict, problems: list[str]) -> None:
    for name, kinds in REQUIRED_JSON.items():
        if name not in meta:
            problems.append(f"{key}: json lacks {name!r}")
        elif isinstance(meta[name], bool) or not isinstance(meta[name], kinds):
            problems.append(f"{key}: json {name!r} is a {type(meta[name]).__name__}")


def _check_sample(
    key: str, files: dict[str, bytes], scale: int | None, decode_images: bool, problems: list[str]
) -> None:
    """The per-sample checks of :func:`check_contract` (members, json, scale, PNG decode)."""
    missing = [m for m in ("hr.png", "lr.png", "json") if m not in files]
    if missing:
        problems.append(f"{key}: missing {missing}")
        return
    try:
        meta = json.loads(files["json"])
    except Exception as exc:
        problems.append(f"{key}: json does not parse: {exc}")
        return
    if not isinstance(meta, dict):
        problems.append(f"{key}: json is a {type(meta).__name__}, not an object")
        return
    _check_json(key, meta, problems)
    if scale is not None and meta.get("scale") != scale:
        problems.append(f"{key}: scale {meta.get('scale')}, expected {scale}")
    if decode_images and isinstance(meta.get("scale"), int):
        try:
            decode_pair(files, key)
            for member in ("hr.png", "lr.png"):
                if Image.open(io.BytesIO(files[member])).format != "PNG":
                    problems.append(f"{key}: {member} is not a PNG")
        except BadSample as exc:
            problems.append(str(exc))


def check_contract(
    uri: str, *, endpoint_url: str | None = None, scale: int | None = None, decode_images: bool = True
) -> ContractReport:
    """Check a dataset against ARCHITECTURE §5 and return every problem found.

    Checks: shard names ``NAME-NNNNNN.tar``; each shard has its parquet and ``_stats.json``; tars
    are readable, flat, with keys matching ``[A-Za-z0-9_-]+``, a sample's members adjacent and
    keys unique across the dataset; each sample has ``hr.png``, ``lr.png`` and ``json``; PNGs
    decode as RGB and ``hr = scale × lr``; the json has the required fields with the right
    types (and ``scale`` as given); ``_index.json`` lists exactly the shards with their sample
    counts and byte sizes, the total, and both digests. ``decode_images=False`` skips the
    image decode (much faster, structure only).
    """
    import tarfile

    report = ContractReport(uri)
    problems = report.problems
    fs, root = filesystem(uri, endpoint_url)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    listed_names = with_retries(lambda: fs.ls(root, detail=False), what=f"listing {uri}")
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed_names)
    tars = [n for n in names if n.endswith(".tar")]
    if not tars:
        problems.append("no .tar shards")
    seen: set[str] = set()
    found: dict[str, tuple[int, int]] = {}
    for name in tars:
        stem = name[: -len(".tar")]
        if not SHARD_RE.match(name):
            problems.append(f"{name}: name is not NAME-NNNNNN.tar")
        for companion, what in ((f"{stem}_stats.json", "completion marker"), (f"{stem}.parquet", "parquet")):
            if companion not in names:
                problems.append(f"{name}: no {companion} ({what})")
        # Streamed, one sample's members in memory at a time (a whole tar was read into memory and
        # copied: about twice the shard's size).
        shard_keys: set[str] = set()
        current: tuple[str, dict[str, bytes]] | None = None

        def finish(sample: tuple[str, dict[str, bytes]] | None) -> None:
            if sample is not None:
                _check_sample(sample[0], sample[1], scale, decode_images, problems)

        try:
            with open_shard(fs, f"{root}/{name}") as f, open_tar(f, "r|") as tar:
                for m in tar:
                    try:  # untrusted: a member that is not KEY.{hr.png,lr.png,json} is never read
                        key, suffix = check_member(m)
                    except BadSample as exc:
                        problems.append(f"{name}: {exc}")
                        continue
                    if current is None or key != current[0]:
                        finish(current)
                        if key in shard_keys:
                            problems.append(f"{name}: members of {key} are not adjacent")
                        elif key in seen:
                            problems.append(f"{name}: key {key} also appears earlier in the dataset")
                        shard_keys.add(key)
                        seen.add(key)
                        current = (key, {})
                    if suffix in current[1]:
                        problems.append(f"{name}: {key} holds {suffix} twice")
                    member = tar.extractfile(m).read()
                    if len(member) != m.size:
                        got = len(member)
                        problems.append(f"{name}: member {m.name!r} is truncated ({got} of {m.size} B)")
                    current[1][suffix] = member
        except StorageAccessError as exc:  # this shard refused; the others are still checked
            problems.append(f"{name}: {exc}")
            continue
        except (tarfile.TarError, EOFError, OSError) as exc:
            problems.append(f"{name}: unreadable or truncated tar: {type(exc).__name__}: {exc}")
            continue
        finish(current)
        found[stem] = (len(shard_keys), fs.size(f"{root}/{name}"))
    report.shards = len(found)
    report.samples = sum(n for n, _ in found.values())

    if "_index.json" not in names:
        problems.append(
            "no _index.json (the generation job writes it when a run finishes; one that stopped early, "
            "by its failure budget, an outage or an interrupt, left none: run the same job again, with the "
            "same RealDGen version, to finish it)"
        )
        return report
    try:
        what = f"reading {uri}/_index.json"
        raw_index = with_retries(lambda: fs.cat_file(f"{root}/_index.json"), what=what)
        index = json.loads(raw_index)
        listed = {e["name"].removesuffix(".tar"): e for e in index["shards"]}
    except Exception as exc:
        problems.append(f"_index.json unreadable: {exc}")
        return report
    if set(listed) != set(found):
        problems.append(
            f"_index.json lists {sorted(set(listed) - set(found))[:5]} not in the folder and "
            f"misses {sorted(set(found) - set(listed))[:5]}"
        )
    for stem, (n, size) in sorted(found.items()):
        entry = listed.get(stem)
        if entry is not None and (entry.get("samples") != n or entry.get("bytes") != size):
            problems.append(
                f"_index.json: {stem} says {entry.get('samples')} samples / {entry.get('bytes')} B, "
                f"the tar holds {n} / {size}"
            )
    if index.get("total_samples") != report.samples:
        problems.append(
            f"_index.json total_samples {index.get('total_samples')} != {report.samples} in the shards"
        )
    for name in ("manifest_digest", "model_digest"):
        if name not in index:
            problems.append(f"_index.json lacks {name!r}")
    return report
