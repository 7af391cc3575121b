"""The SR proxy's ceiling: what a perfect LR generator would score on it, per codec pipeline; JSON.

The SR proxy (``realdgen_core.probes``, issue 8 §1) trains one small SR net per generator on that
generator's (HR, LR) pairs of the ``sr_proxy.photos`` and scores it on the benchmark's real pairs.
A generator can do no better than to reproduce the true pipeline. This script makes exactly those
pairs (the benchmark's own pipeline, run by ``make_codec_pairs.py``'s ``degrade``, or by
``bench/make_variant_codecs.py`` for its three pipelines, on the very HR tiles of the evaluation's
SR-proxy training set) and trains the SR proxy on them with the manifest's settings, next to plain
bicubic pairs of the same tiles, in the same run and with the same seeds. Where the true pipeline's
pairs do not beat bicubic's, no generator can be ranked first there by this probe. The report's SR
figures of every generator are quoted next to them, and how close each generator's SR training LR
is to the true pipeline's LR of the same boxes (``train_lr_psnr_to_truth``, PSNR in dB).

    python bench/sr_proxy_ceiling.py out/eval_codecs [--manifest manifests/evaluate_codecs.yaml]
        [--benchmark ../shared/bench/make_codec_pairs.py] [--set sr_proxy.steps=1500 ...] [--stride 128]

``--stride N`` trains on more data than the evaluation did: every HR tile (``generation.tile`` ×
scale) of the ``sr_proxy.photos`` on a grid of that stride, bicubic pairs made by D's ``bicubic``
kind (what the job's ``bicubic`` generator applies). With ``--set`` it asks whether any protocol
of this family (more tiles, steps, a wider net) lets the true pipeline's pairs beat bicubic's.

Needs a finished ``kind: evaluate`` run (``<report.dir>/report.json`` and ``work/``) and the
benchmark's tools (ffmpeg, ImageMagick).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from make_variant_codecs import (  # noqa: E402
    DEFAULT_BENCHMARK,
    degrade_variant,
    load_benchmark,
)
from make_variant_codecs import PIPELINES as VARIANTS  # noqa: E402

from pipelines.evaluate_realism import read_dataset, sr_proxy_runs  # noqa: E402
from pipelines.manifest import load_manifest  # noqa: E402


def rgb(path: Path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def shared_bicubic(work: Path, scale: int) -> list:
    """The evaluation's SR-proxy training set as made by the ``bicubic`` generator: sorted
    ``read_dataset`` items ``(key, (hr, lr, meta))`` (the same HR tiles every generator got)."""
    shared = sorted(work.glob("_shared/sr_pairs-*/bicubic"))
    if len(shared) != 1:
        raise SystemExit(f"{work}: expected one _shared/sr_pairs-*/bicubic dataset, found {len(shared)}")
    return sorted(read_dataset(str(shared[0]), scale, False).items())


def eval_pairs(work: Path, pipeline: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The benchmark's real (HR, true LR) eval tiles of one pipeline, as the evaluation copied them."""
    folder = next((work / pipeline).glob("data-*/tiles"))
    return [(rgb(h), rgb(Path(str(h).replace("/hr/", "/lr/")))) for h in sorted(folder.glob("hr/*/*.png"))]


def run_pipeline(mcp, pipeline: str, src: str, dst: str, tmp: str) -> None:
    """Write the LR of image file ``src`` made by ``pipeline`` (the benchmark's or a variant) to ``dst``."""
    if pipeline in VARIANTS:
        degrade_variant(mcp, pipeline, src, dst, tmp)
    else:
        mcp.degrade(pipeline, src, dst, tmp)


def true_pairs(mcp, pipeline: str, hrs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HR, the pipeline's LR of it) for every HR tile, through the benchmark's own encoders."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, hr in enumerate(hrs):
            src, dst = os.path.join(tmp, f"hr{i}.png"), os.path.join(tmp, f"lr{i}.png")
            Image.fromarray(hr).save(src)
            run_pipeline(mcp, pipeline, src, dst, tmp)
            out.append((hr, rgb(Path(dst))))
    return out


def whole_photo_lr(mcp, pipeline: str, name: str, tmp: str) -> tuple[np.ndarray, np.ndarray]:
    """(the photo, the pipeline's LR of it cropped to a multiple of 16 and encoded as one frame),
    as the benchmark makes its own pairs."""
    from pipelines.demo_data import load_photo

    img = load_photo(name)
    h, w = (img.shape[0] // 16) * 16, (img.shape[1] // 16) * 16
    src, dst = os.path.join(tmp, "src.png"), os.path.join(tmp, "lr.png")
    Image.fromarray(img[:h, :w]).save(src)
    run_pipeline(mcp, pipeline, src, dst, tmp)
    return img, rgb(Path(dst))


def whole_photo_pairs(
    mcp, pipeline: str, photos: list[str], size: int, stride: int, scale: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HR tile, its crop of the pipeline's LR of the WHOLE photo), cut on the same grid as
    ``grid_tiles`` (same tiles, same order). Tiles that leave the 16-aligned photo are an error."""
    out = []
    lt = size // scale
    with tempfile.TemporaryDirectory() as tmp:
        for name in photos:
            img, lr = whole_photo_lr(mcp, pipeline, name, tmp)
            for y, x in grid_positions(img.shape[:2], size, stride):
                ly, lx = y // scale, x // scale
                if ly + lt > lr.shape[0] or lx + lt > lr.shape[1]:
                    raise SystemExit(
                        f"{name}: tile at {(y, x)} leaves the 16-aligned photo; use another stride"
                    )
                out.append(
                    (
                        np.ascontiguousarray(img[y : y + size, x : x + size]),
                        np.ascontiguousarray(lr[ly : ly + lt, lx : lx + lt]),
                    )
                )
    return out


def truth_crops(mcp, pipeline: str, items, scale: int, cache: dict | None = None) -> list[np.ndarray | None]:
    """For each ``(key, (hr, lr, meta))`` of a generated dataset (``read_dataset``'s items), the true
    pipeline's LR of the same box of the whole photo (``meta["hr_box"]``), or None where the box
    leaves the 16-aligned crop the benchmark encodes. ``cache`` keeps each photo's LR across calls
    (one pipeline)."""
    truth: dict[str, np.ndarray] = {} if cache is None else cache
    out: list[np.ndarray | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        for _, (_hr, lr, meta) in items:
            name = Path(meta["hr_source"].rsplit("#", 1)[-1]).stem
            if name not in truth:
                truth[name] = whole_photo_lr(mcp, pipeline, name, tmp)[1]
            x0, y0, x1, y1 = meta["hr_box"]
            want = truth[name][y0 // scale : y1 // scale, x0 // scale : x1 // scale]
            out.append(want if want.shape == lr.shape else None)
    return out


def psnr_to_truth(truths: list[np.ndarray | None], lrs: list[np.ndarray]) -> float | None:
    """Mean PSNR (dB) of ``lrs`` to their true LR, over the boxes that have one."""
    from skimage.metrics import peak_signal_noise_ratio

    vals = [
        peak_signal_noise_ratio(t, lr, data_range=255)
        for t, lr in zip(truths, lrs, strict=True)
        if t is not None
    ]
    return round(float(np.mean(vals)), 3) if vals else None


def train_lr_fidelity(mcp, pipeline: str, datasets: dict[str, Path], scale: int) -> dict:
    """Mean PSNR (dB) of each generator's SR-proxy training LR to the true pipeline's LR of the
    same box of the whole photo: how close the data the proxy learns from is to the domain."""
    out: dict = {}
    cache: dict = {}
    for gen, folder in datasets.items():
        items = sorted(read_dataset(str(folder), scale, False).items())
        out[gen] = psnr_to_truth(
            truth_crops(mcp, pipeline, items, scale, cache), [lr for _, (_, lr, _) in items]
        )
    return out


def grid_positions(shape: tuple[int, int], size: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of every ``size`` tile of an image of ``shape`` on a grid of ``stride``
    (row-major)."""
    h, w = shape
    return [(y, x) for y in range(0, h - size + 1, stride) for x in range(0, w - size + 1, stride)]


def grid_tiles(photos: list[str], size: int, stride: int) -> list[np.ndarray]:
    """Every ``size`` tile of each photo on a grid of ``stride`` (top-left first, row-major)."""
    from pipelines.demo_data import load_photo

    out = []
    for name in photos:
        img = load_photo(name)
        out += [
            np.ascontiguousarray(img[y : y + size, x : x + size])
            for y, x in grid_positions(img.shape[:2], size, stride)
        ]
    return out


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    from realdgen_core import degrade
    from realdgen_core.train.data import to_tensor, to_uint8

    lr, _ = degrade.degrade(to_tensor(hr)[None], "bicubic", scale, [torch.Generator().manual_seed(0)])
    return to_uint8(lr[0])


def score(pairs, real, sp, scale: int, seed: int, repeats: int | None = None) -> dict:
    """SR proxy trained on ``pairs`` (``repeats`` seeded nets, default ``sp.repeats``), scored on
    ``real``: the mean PSNR and each net's."""
    if repeats is not None:
        sp = sp.model_copy(update={"repeats": repeats})
    runs = [r["psnr"] for r in sr_proxy_runs(pairs, real, sp, scale, seed)]
    return {"psnr": round(float(np.mean(runs)), 3), "runs": runs}


def common_args(description: str) -> argparse.ArgumentParser:
    """The arguments every SR-proxy bench shares: the run, its manifest, the benchmark, threads, --set."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("report_dir", help="report.dir of a finished kind: evaluate run")
    ap.add_argument("--manifest", default=str(ROOT / "manifests" / "evaluate_codecs.yaml"))
    ap.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK), help="path of make_codec_pairs.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="manifest override, e.g. sr_proxy.steps=1500 (the protocol's budget; repeatable)",
    )
    return ap


def main() -> None:
    ap = common_args(__doc__.split("\n\n")[0])
    ap.add_argument(
        "--stride", type=int, default=0, help="cut grid tiles of sr_proxy.photos (0 = the report's)"
    )
    ap.add_argument(
        "--whole-photo",
        action="store_true",
        help="with --stride: the true LR is cut from the pipeline's LR of the whole photo (how the benchmark "
        "makes its own pairs), not the pipeline run on each HR tile alone",
    )
    args = ap.parse_args()
    if args.whole_photo and (not args.stride or args.stride % 4):
        ap.error("--whole-photo needs --stride, a multiple of the scale")
    torch.set_num_threads(args.threads)
    m = load_manifest(args.manifest, args.set, kind="evaluate")
    sp = m.sr_proxy
    mcp = load_benchmark(args.benchmark)
    rep_dir = Path(args.report_dir)
    report = json.loads((rep_dir / "report.json").read_text())
    work = rep_dir / "work"
    if args.stride:
        hrs = grid_tiles(sp.photos, m.generation.tile * m.scale, args.stride)
        bicubic = [(hr, bicubic_lr(hr, m.scale)) for hr in hrs]
    else:
        bicubic = [(hr, lr) for _, (hr, lr, _) in shared_bicubic(work, m.scale)]
        hrs = [hr for hr, _ in bicubic]
    out: dict = {
        "settings": sp.model_dump(),
        "stride": args.stride or None,
        "whole_photo": args.whole_photo,
        "train_tiles": len(hrs),
    }
    for name, dom in report["domains"].items():
        if name not in mcp.PIPELINES and name not in VARIANTS:
            out[name] = {"skipped": "no known pipeline of that name"}
            continue
        real = eval_pairs(work, name)
        t0 = time.perf_counter()
        if args.whole_photo:
            truth = whole_photo_pairs(
                mcp, name, list(sp.photos), m.generation.tile * m.scale, args.stride, m.scale
            )
            assert all(np.array_equal(a, b) for (a, _), b in zip(truth, hrs, strict=True))
        else:
            truth = true_pairs(mcp, name, hrs)
        res = {
            "bicubic_pairs": score(bicubic, real, sp, m.scale, m.seed),
            "true_pipeline_pairs": score(truth, real, sp, m.scale, m.seed),
            "report_sr_psnr": {g: v["metrics"].get("sr_psnr") for g, v in dom["generators"].items()},
            "bicubic_upsampling": dom["sr_proxy"]["bicubic_upsampling"]["psnr"],
        }
        res["ceiling_margin_db"] = round(res["true_pipeline_pairs"]["psnr"] - res["bicubic_pairs"]["psnr"], 3)
        # the newest realdgen SR dataset here (a work folder keeps older ones), the shared baselines'
        datasets = {
            kind.name: kind
            for kind in sorted(work.glob("_shared/sr_pairs-*/*"))
            if (kind / "_index.json").is_file()
        }
        own = sorted(
            (work / name).glob("data-*/sr_pairs/realdgen-*/_index.json"), key=lambda p: p.stat().st_mtime
        )
        if own:
            datasets["realdgen"] = own[-1].parent
        res["train_lr_psnr_to_truth"] = train_lr_fidelity(mcp, name, datasets, m.scale)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = res
        print(
            f"{name}: true pipeline {res['true_pipeline_pairs']['psnr']:.2f} dB, bicubic pairs "
            f"{res['bicubic_pairs']['psnr']:.2f} dB",
            file=sys.stderr,
            flush=True,
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
