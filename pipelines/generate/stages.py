"""Generation job stages: deterministic planning helpers and the plain callable classes Ray wraps.

Everything here runs without Ray: ``DecodeTile`` and ``GenerateLR`` take a typed, frozen config
(:mod:`pipelines.generate.config`; a mapping with the same keys is accepted) in their constructor
and a ``pyarrow.Table`` batch in ``__call__`` (Ray Data calls them with
``batch_format="pyarrow"``), so unit tests drive them directly.

Rows. One table schema (:data:`ROW_SCHEMA`) flows through all stages. Two row types:

- ``row_type="input"``: exactly one per HR input image; says how many sample rows that input
  produced (``n_samples``) or why it failed (``status="failed"``, ``error``). The driver uses it
  to know when a shard has heard from all its inputs.
- ``row_type="sample"``: one per (tile, reference) pair; carries the raw HR tile, later the
  raw LR, then the encoded PNG/JSON members. A sample that fails later (generation, encoding)
  keeps flowing with ``status="failed"`` so the counts still add up.

Determinism. Keys, per-sample seeds, tile positions and reference choices are pure functions
of the run seed, the input URI and the image size (hashlib, never Python's ``hash``), so they
do not depend on workers, batch sizes or arrival order.
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.generate.config import DecodeConfig, GenerateConfig
from pipelines.sources import ImageError, SourceItem, load_image
from pipelines.storage import StorageAccessError, TransientStorageError

__all__ = [
    "ROW_SCHEMA",
    "derive_seed",
    "base_key",
    "sample_key",
    "tile_boxes",
    "choose_ref",
    "error_category",
    "rows_to_table",
    "DecodeTile",
    "GenerateLR",
    "EncodeSample",
    "build_meta",
    "decode_tile_batch",
    "encode_sample_batch",
]

ROW_SCHEMA = pa.schema(
    [
        ("row_type", pa.string()),
        ("shard", pa.int64()),
        ("input_index", pa.int64()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("n_samples", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("tile_index", pa.int64()),
        ("hr_box", pa.list_(pa.int64())),
        ("seed", pa.int64()),
        ("ref_index", pa.int64()),
        ("ref_source", pa.string()),
        ("ref_set", pa.string()),
        ("domain", pa.string()),
        ("hr", pa.binary()),  # raw uint8 HxWx3 tile (HR edge = tile × scale)
        ("lr", pa.binary()),  # raw uint8 hxwx3
        ("x_start", pa.binary()),  # realdgen: raw uint8 k×h×w×3, D(HR, θ_j) from the decode stage
        ("tile_hr", pa.int64()),
        ("generator", pa.string()),
        ("k", pa.int64()),
        ("tau", pa.int64()),
        ("content_error", pa.float64()),
        ("degradation_error", pa.float64()),
        ("model_digest", pa.string()),
        ("hr_png", pa.binary()),
        ("lr_png", pa.binary()),
        ("json", pa.binary()),
        ("seconds", pa.float64()),
    ]
)

_STEM_RE = re.compile(r"[^A-Za-z0-9_-]+")
_SEED_MASK = (1 << 63) - 1


def derive_seed(run_seed: int, *parts: Any) -> int:
    """63-bit seed from the run seed and any parts (sha256; stable across processes/platforms)."""
    text = "|".join([str(int(run_seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & _SEED_MASK


def base_key(uri: str, digits: int = 10) -> str:
    """Sanitised image stem + ``digits`` hex chars of sha256(uri): ``[A-Za-z0-9_-]+``.

    10 hex chars (40 bits) name every input; the planner gives the rare input whose key another
    already holds 16 (``plan.list_plan``): inputs that share a file name (``image.jpg`` in a million
    folders, ``000001.jpg`` in every tar) reach an even chance of one 40-bit collision at about a
    million. A 10- and a 16-char key never coincide: the hash after the last ``_`` differs in length."""
    name = uri.rsplit("#", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    stem = _STEM_RE.sub("_", stem).strip("_-")[:40] or "img"
    return f"{stem}_{hashlib.sha256(uri.encode()).hexdigest()[:digits]}"


def sample_key(base: str, tile_index: int, ref_slot: int, refs_per_tile: int) -> str:
    key = f"{base}_t{tile_index:03d}"
    return f"{key}_r{ref_slot:02d}" if refs_per_tile > 1 else key


def tile_boxes(
    width: int, height: int, tile_hr: int, mode: str, max_tiles: int, seed: int
) -> list[tuple[int, int, int, int]]:
    """HR tile boxes ``(x0, y0, x1, y1)`` for an image; empty when it is smaller than one tile.

    grid: non-overlapping cells from the top-left; when there are more than ``max_tiles`` cells, a
    seeded subset (kept in row-major order). random: ``max_tiles`` seeded positions (may overlap).
    """
    if width < tile_hr or height < tile_hr:
        return []
    rng = np.random.default_rng(seed)
    if mode == "grid":
        cells = [
            (x, y)
            for y in range(0, height - tile_hr + 1, tile_hr)
            for x in range(0, width - tile_hr + 1, tile_hr)
        ]
        if len(cells) > max_tiles:
            pick = np.sort(rng.choice(len(cells), size=max_tiles, replace=False))
            cells = [cells[i] for i in pick]
    elif mode == "random":
        xs = rng.integers(0, width - tile_hr + 1, size=max_tiles)
        ys = rng.integers(0, height - tile_hr + 1, size=max_tiles)
        cells = list(zip(xs.tolist(), ys.tolist(), strict=True))
    else:
        raise ValueError(f"unknown tiling mode {mode!r}")
    return [(x, y, x + tile_hr, y + tile_hr) for x, y in cells]


def choose_ref(
    pairing: Mapping[str, Any],
    sets: Sequence[Mapping[str, Any]],
    n_refs: int,
    seed: int,
    input_index: int,
    tile_index: int,
    slot: int,
) -> int | None:
    """Index into the flat reference list (sets in manifest order, each sorted by URI), or None.

    - random: uniform over all references, drawn from the sample's seed.
    - round_robin: ``((input_index + tile_index) * refs_per_tile + slot) mod n``.
    - weighted: a set drawn by weight from the sample's seed, then a reference uniformly in it.
    """
    if n_refs == 0:
        return None
    mode = pairing["mode"]
    rpt = int(pairing["refs_per_tile"])
    if mode == "round_robin":
        return ((input_index + tile_index) * rpt + slot) % n_refs
    rng = np.random.default_rng(derive_seed(seed, "ref"))
    if mode == "random":
        return int(rng.integers(0, n_refs))
    if mode == "weighted":
        live = [s for s in sets if s["count"] > 0]
        w = np.array([s["weight"] for s in live], dtype=np.float64)
        chosen = live[int(rng.choice(len(live), p=w / w.sum()))]
        return chosen["start"] + int(rng.integers(0, chosen["count"]))
    raise ValueError(f"unknown pairing mode {mode!r}")


def error_category(error: str | None) -> str:
    """The stable part of an error string (before the first colon), for histograms."""
    if not error:
        return "unknown"
    return error.split(":", 1)[0].strip()[:60] or "unknown"


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with any subset of the columns) → a table with :data:`ROW_SCHEMA`."""
    cols = {f.name: [r.get(f.name) for r in rows] for f in ROW_SCHEMA}
    return pa.Table.from_pydict(cols, schema=ROW_SCHEMA)


def _rows(batch: pa.Table | Mapping[str, Any] | list[dict]) -> list[dict]:
    if isinstance(batch, pa.Table):
        return batch.to_pylist()
    if isinstance(batch, list):
        return [dict(r) for r in batch]
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


# --------------------------------------------------------------------------------------------
# Stage 1: decode + tile + pair (CPU tasks)
# --------------------------------------------------------------------------------------------


class DecodeTile:
    """Input rows (one per HR image) → one ``input`` report row + one ``sample`` row per pair.

    Config (:class:`~pipelines.generate.config.DecodeConfig`): ``seed, scale, tile, tiling_mode,
    max_tiles, max_pixels, max_bytes, storage,
    pairing {mode, refs_per_tile}, refs [{uri, set, domain}], sets [{name, weight, start, count}]``,
    optional ``starts {k, tau_min, tau_max, start_kind}``: also compute realdgen's x_start =
    D(HR, θ_j) for the k candidates here, on the CPU (from the sample's seed, exactly as
    ``LRGenerator.generate`` would), so the GPU actor does not.
    """

    def __init__(self, config: DecodeConfig | Mapping[str, Any]) -> None:
        self.cfg = DecodeConfig.of(config)
        self.tile_hr = int(self.cfg.tile) * int(self.cfg.scale)
        self.starts = self.cfg.starts
        # choose_ref takes the pairing as a mapping (its tests and callers pass plain dicts)
        self.pairing = {"mode": self.cfg.pairing.mode, "refs_per_tile": int(self.cfg.pairing.refs_per_tile)}

    def _add_starts(self, samples: list[dict]) -> None:
        import torch

        from realdgen_core.generator import draw_starts, start_images

        st, s, t = self.starts, int(self.cfg.scale), self.tile_hr
        for r in samples:
            hr = torch.from_numpy(np.frombuffer(r["hr"], np.uint8).reshape(t, t, 3).copy())
            hr = hr.permute(2, 0, 1)[None].float().div_(255.0)
            _, _, thetas = draw_starts(
                1,
                int(st.k),
                s,
                (int(st.tau_min), int(st.tau_max)),
                [int(r["seed"])],
                st.start_kind,
            )
            x = start_images(hr, thetas)[0]  # [k,3,h,w], 8-bit valued
            r["x_start"] = (
                x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy().tobytes()
            )

    def _one(self, row: Mapping[str, Any]) -> list[dict]:
        cfg = self.cfg
        t0 = time.perf_counter()
        base = row["key"]
        report = {
            "row_type": "input",
            "shard": row["shard"],
            "input_index": row["input_index"],
            "key": base,
            "uri": row["uri"],
            "status": "ok",
            "n_samples": 0,
        }
        try:
            img = load_image(
                SourceItem.from_row(row),
                cfg.storage,
                max_pixels=int(cfg.max_pixels),
                max_bytes=cfg.max_bytes,
            )
        except ImageError as exc:
            return [{**report, "status": "failed", "error": exc.reason, "seconds": time.perf_counter() - t0}]
        except (TransientStorageError, StorageAccessError):
            raise  # storage unavailable or refusing us, not a bad input: fail the task, no failure row
        except Exception as exc:  # never let one input sink the shard
            err = f"unexpected: {type(exc).__name__}: {exc}"
            return [{**report, "status": "failed", "error": err, "seconds": time.perf_counter() - t0}]
        h, w = img.shape[:2]
        report.update(width=w, height=h)
        image_seed = derive_seed(cfg.seed, base)
        boxes = tile_boxes(w, h, self.tile_hr, cfg.tiling_mode, int(cfg.max_tiles), image_seed)
        if not boxes:
            err = f"smaller than one tile: {w}x{h} < {self.tile_hr}x{self.tile_hr}"
            return [{**report, "status": "failed", "error": err, "seconds": time.perf_counter() - t0}]
        pairing = self.pairing
        rpt = pairing["refs_per_tile"]
        refs = cfg.refs
        samples = []
        for ti, (x0, y0, x1, y1) in enumerate(boxes):
            tile = np.ascontiguousarray(img[y0:y1, x0:x1])
            for slot in range(rpt):
                key = sample_key(base, ti, slot, rpt)
                seed = derive_seed(cfg.seed, key)
                ri = choose_ref(pairing, cfg.sets, len(refs), seed, row["input_index"], ti, slot)
                ref = refs[ri] if ri is not None else None
                samples.append(
                    {
                        "row_type": "sample",
                        "shard": row["shard"],
                        "input_index": row["input_index"],
                        "key": key,
                        "uri": row["uri"],
                        "status": "ok",
                        "width": w,
                        "height": h,
                        "tile_index": ti,
                        "hr_box": [x0, y0, x1, y1],
                        "seed": seed,
                        "ref_index": ri,
                        "ref_source": ref["uri"] if ref else None,
                        "ref_set": ref["set"] if ref else None,
                        "domain": ref["domain"] if ref else None,
                        "hr": tile.tobytes(),
                        "tile_hr": self.tile_hr,
                    }
                )
        if self.starts:
            try:
                self._add_starts(samples)
            except Exception:  # the actor computes them (and reports a failure there, per sample)
                for r in samples:
                    r["x_start"] = None
        report.update(n_samples=len(samples), seconds=time.perf_counter() - t0)
        return [report, *samples]

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        out: list[dict] = []
        for row in _rows(batch):
            out.extend(self._one(row))
        return rows_to_table(out)


# --------------------------------------------------------------------------------------------
# Stage 2: generation (actors; one per GPU, or CPU actors)
# --------------------------------------------------------------------------------------------


def _resolve(value: Any) -> Any:
    """ray.ObjectRef → its value (only imports ray when handed a ref)."""
    if type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


class GenerateLR:
    """Sample rows with an HR tile → the same rows with an LR (raw bytes) and generation fields.

    Config (:class:`~pipelines.generate.config.GenerateConfig`): ``kind, scale, checkpoint (local
    path), device, k, tau_min, tau_max,
    weights, start_kind, rows_per_call, sampler ({kind, steps, eta}; default ancestral),
    precision (auto | fp32 | bf16; auto = bf16 on CUDA), channels_last, compile (CUDA only),
    ref_bank (ndarray [N, D] or ray.ObjectRef), torch_threads``.
    Loads the model once in ``__init__``. Per-sample ``torch.Generator`` seeded from the row's
    seed, so a sample's pixels do not depend on its batch.
    """

    def __init__(self, config: GenerateConfig | Mapping[str, Any]) -> None:
        import torch

        self.cfg = GenerateConfig.of(config)
        self.kind = self.cfg.kind
        self.scale = int(self.cfg.scale)
        if self.cfg.torch_threads:
            torch.set_num_threads(int(self.cfg.torch_threads))
        device = self.cfg.device or "cpu"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.generator = None
        self.bank = None
        self.model_digest = None
        if self.kind == "realdgen":
            from pipelines.storage import fetch_to_local
            from realdgen_core.diffusion import SamplerConfig
            from realdgen_core.generator import LRGenerator

            path = fetch_to_local(self.cfg.checkpoint, self.cfg.storage)
            sampler = SamplerConfig.from_dict(dict(self.cfg.sampler or {}))
            precision = self.cfg.precision or "auto"
            if precision not in ("auto", "fp32", "bf16"):
                raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
            bf16 = precision == "bf16" or (precision == "auto" and str(device).startswith("cuda"))
            self.generator = LRGenerator.from_checkpoint(
                path,
                device=device,
                rows_per_call=self.cfg.rows_per_call,
                sampler=sampler,
                dtype=torch.bfloat16 if bf16 else None,
                channels_last=bool(self.cfg.channels_last),
                compile=bool(self.cfg.compile),
            )
            self.model_digest = self.generator.digest
            if self.cfg.model_digest is not None and self.model_digest != self.cfg.model_digest:
                # replaced at the same URI after the job planned: its samples would carry another
                # model than the stats and index record
                raise RuntimeError(
                    f"generator.checkpoint {self.cfg.checkpoint} changed while the job ran (digest "
                    f"{self.model_digest}, planned with {self.cfg.model_digest}); run the job again"
                )
            bank = _resolve(self.cfg.ref_bank)
            if bank is not None:
                # a read-only view of Ray's object store, shared by the actors on a node and only
                # ever indexed: torch's warning about non-writable arrays does not apply
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    self.bank = torch.as_tensor(np.asarray(bank, dtype=np.float32))
            else:
                self.bank = None
        # start_choice domain: each profile as the per-sample start errors it stands for, built once
        self.start_errors = {}
        if self.cfg.start_profiles and self.cfg.start_kind == "domain":
            from realdgen_core import calibrate

            n = len(self.cfg.start_bank)
            self.start_errors = {
                k: calibrate.profile_errors(p, n) for k, p in self.cfg.start_profiles.items()
            }

    def _generate(self, rows: list[dict]) -> None:
        import torch

        t = self.cfg
        tile = rows[0]["tile_hr"]
        hr = np.stack([np.frombuffer(r["hr"], np.uint8).reshape(tile, tile, 3) for r in rows])
        x = torch.from_numpy(hr).permute(0, 3, 1, 2).float().div_(255.0)
        seeds = [int(r["seed"]) for r in rows]
        if self.kind == "realdgen":
            if self.bank is None or any(r["ref_index"] is None for r in rows):
                raise RuntimeError("realdgen needs a reference for every sample")
            emb = self.bank[torch.tensor([int(r["ref_index"]) for r in rows])]
            starts = None
            if all(r.get("x_start") for r in rows):  # computed by the decode stage
                k, lt = int(t.k), tile // self.scale
                raw = np.stack([np.frombuffer(r["x_start"], np.uint8).reshape(k, lt, lt, 3) for r in rows])
                starts = torch.from_numpy(raw).permute(0, 1, 4, 2, 3).float().div_(255.0)
            bank_errors = self._profile_errors(rows) if self.start_errors else None
            res = self.generator.generate(
                x.to(self.device),
                k=int(t.k),
                tau_range=(int(t.tau_min), int(t.tau_max)),
                seeds=seeds,
                ref_embeddings=emb.to(self.device),
                weights=tuple(t.weights),
                start_kind=t.start_kind,
                starts=starts,
                start_bank=t.start_bank,
                start_bank_errors=bank_errors,
                filter_norm=bool(t.filter_norm),
            )
            lr = res.lr
            kept = res.kept.tolist()
            for i, r in enumerate(rows):
                j = kept[i]
                r.update(
                    k=int(t.k),
                    tau=int(res.tau[i, j]),
                    content_error=float(res.content_errors[i, j]),
                    degradation_error=float(res.degradation_errors[i, j]),
                    model_digest=self.model_digest,
                )
        else:
            from realdgen_core.degrade import degrade

            gens = [torch.Generator().manual_seed(s) for s in seeds]
            lr, _ = degrade(x, self.kind, self.scale, gens)
            for r in rows:
                r.update(k=1, tau=None, content_error=None, degradation_error=None, model_digest=None)
        lr8 = lr.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for i, r in enumerate(rows):
            r["lr"] = np.ascontiguousarray(lr8[i]).tobytes()
            r["generator"] = self.kind
            r["x_start"] = None

    def _profile_errors(self, rows: list[dict]):
        """[B, len(bank)] start errors from the domain profile of each row's reference (every
        candidate starts from the domain's chosen entry); see ``calibrate.profile_errors``."""
        import torch

        from pipelines.generate.references import profile_key

        out = []
        for r in rows:
            if r.get("ref_set") is None:  # the health probe (healthy()): any profile will do
                out.append(next(iter(self.start_errors.values())))
                continue
            errors = self.start_errors.get(profile_key(r.get("domain"), r["ref_set"]))
            if errors is None:
                raise RuntimeError(f"no start profile for reference set {r['ref_set']!r}")
            out.append(errors)
        return torch.stack(out)

    def healthy(self, tile_hr: int) -> bool:
        """Can this actor still generate? One sample of a flat grey tile, fixed seed, first reference."""
        probe = {
            "tile_hr": tile_hr,
            "hr": np.full((tile_hr, tile_hr, 3), 128, np.uint8).tobytes(),
            "seed": 0,
            "ref_index": 0,
            "x_start": None,
        }
        try:
            self._generate([probe])
        except Exception:
            return False
        return True

    def restart(self, reason: str) -> None:
        """End this actor's process: Ray restarts the actor (Ray Data asks for unlimited restarts)
        and runs the batch again on the fresh one, so its samples never become failure rows."""
        import logging
        import os

        logging.getLogger("realdgen.generate").error("generation actor unhealthy, restarting: %s", reason)
        os._exit(70)

    def _was_restarted(self) -> bool:
        try:
            import ray

            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:
            return False

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        rows = _rows(batch)
        todo = [r for r in rows if r["row_type"] == "sample" and r["status"] == "ok"]
        if todo:
            t0 = time.perf_counter()
            try:
                self._generate(todo)
            except Exception as batch_exc:
                # Retry one by one so a single bad sample does not fail its batch-mates.
                errors = []
                for r in todo:
                    try:
                        self._generate([r])
                    except Exception as exc:
                        errors.append(exc)
                        r.update(status="failed", error=f"generation: {type(exc).__name__}: {exc}", hr=None)
                # Every sample failed and a known-good probe fails too: the actor (its device, its
                # model) is broken, not the samples. A first-generation actor is restarted; one
                # that was already restarted reports failure rows, which count in the job's
                # failure budget, so a broken cluster fails loudly instead of looping.
                if (
                    len(errors) == len(todo)
                    and not self._was_restarted()
                    and not self.healthy(int(todo[0]["tile_hr"]))
                ):
                    self.restart(f"{type(batch_exc).__name__}: {batch_exc}")
            per = (time.perf_counter() - t0) / len(todo)
            for r in todo:
                r["seconds"] = (r.get("seconds") or 0.0) + per
        return rows_to_table(rows)


# --------------------------------------------------------------------------------------------
# Stage 3: encode (CPU tasks)
# --------------------------------------------------------------------------------------------


def build_meta(row: Mapping[str, Any], scale: int) -> dict:
    """The sample's JSON (ARCHITECTURE §5 fields plus provenance)."""
    return {
        "scale": int(scale),
        "generator": row["generator"],
        "hr_source": row["uri"],
        "hr_box": [int(v) for v in row["hr_box"]],
        "ref_source": row.get("ref_source"),
        "ref_set": row.get("ref_set"),
        "domain": row.get("domain"),
        "model_digest": row.get("model_digest"),
        "seed": int(row["seed"]),
        "k": int(row["k"]),
        "tau": None if row.get("tau") is None else int(row["tau"]),
        "content_error": row.get("content_error"),
        "degradation_error": row.get("degradation_error"),
        "tile_index": int(row["tile_index"]),
        "source_size": [int(row["width"]), int(row["height"])],
    }


class EncodeSample:
    """Sample rows with raw HR/LR → PNG + canonical JSON members (raw pixels dropped).

    Config keys: ``scale``.
    """

    def __init__(self, config: Mapping[str, Any] | int) -> None:
        self.scale = int(config if isinstance(config, int) else config["scale"])

    def __call__(self, batch: pa.Table | Mapping[str, Any]) -> pa.Table:
        from realdgen_core.shards import encode_sample

        rows = _rows(batch)
        for r in rows:
            if r["row_type"] != "sample" or r["status"] != "ok":
                r["hr"] = r["lr"] = r["x_start"] = None
                continue
            try:
                t = int(r["tile_hr"])
                hr = np.frombuffer(r["hr"], np.uint8).reshape(t, t, 3)
                lt = t // self.scale
                lr = np.frombuffer(r["lr"], np.uint8).reshape(lt, lt, 3)
                meta = build_meta(r, self.scale)
                files = encode_sample(r["key"], hr, lr, meta)
                r.update(hr_png=files["hr.png"], lr_png=files["lr.png"], json=files["json"])
            except Exception as exc:
                r.update(status="failed", error=f"encode: {type(exc).__name__}: {exc}")
            r["hr"] = r["lr"] = r["x_start"] = None
        return rows_to_table(rows)


def decode_tile_batch(batch: pa.Table, config: Mapping[str, Any]) -> pa.Table:
    """Task form of :class:`DecodeTile` (Ray Data runs plain functions as stateless tasks)."""
    return DecodeTile(config)(batch)


def encode_sample_batch(batch: pa.Table, config: Mapping[str, Any]) -> pa.Table:
    """Task form of :class:`EncodeSample`."""
    return EncodeSample(config)(batch)
