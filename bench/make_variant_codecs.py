"""Three more codec pipelines for a held-out realism check: x264 (area downscale, CRF 33), MPEG-4
part 2 (bilinear downscale, q 6) and a blurred, triangle-downscaled JPEG q70 camera. None was looked
at while the start choice was designed; same photos, tiles and folder layout as the benchmark's
``make_codec_pairs.py``, whose helpers this reuses (needs ffmpeg and ImageMagick).

    python bench/make_variant_codecs.py OUT [--benchmark ../shared/bench/make_codec_pairs.py]
    python pipelines/evaluate.py manifests/evaluate_codecs.yaml --set root=OUT \\
        --set 'domains=[{"name":"x264-mobile"},{"name":"mpeg4-legacy"},{"name":"mjpeg-cam"}]'

``--photos`` swaps the scenes instead (a held-out check on photos the start choice never saw):
``--photos astronaut,coffee,hubble_deep_field,immunohistochemistry,retina:rocket,chelsea,cat`` is
TRAIN:EVAL (scikit-image RGB photos), and ``--pipelines benchmark`` keeps the benchmark's own four
codecs; ``--pipelines all`` writes those four and the three variants.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from PIL import Image

PIPELINES = ["x264-mobile", "mpeg4-legacy", "mjpeg-cam"]
# A second held-out set (``--pipelines more``), written 2026-12-06 to decide the start bank on more
# pipelines than the seven above; other codecs, resamplers, sharpening, noise without compression.
MORE = ["webp-thumb", "heic-phone", "x264-noisy", "jp2-archive", "jpeg-q25-box", "blur-noise-raw"]


def load_benchmark(path: str):
    """The benchmark's ``make_codec_pairs.py`` as a module (its ``degrade``, ``ffmpeg_frame``, ``main``)."""
    spec = importlib.util.spec_from_file_location("make_codec_pairs", path)
    mcp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcp)
    return mcp


def degrade_variant(mcp, pipeline: str, src: str, dst: str, tmp: str) -> None:
    """Write the LR of image ``src`` made by variant ``pipeline`` to ``dst`` (same contract as the
    benchmark's ``degrade``)."""
    w, h = Image.open(src).size
    lw, lh = w // mcp.SCALE, h // mcp.SCALE
    if pipeline == "x264-mobile":
        args_ = ["-c:v", "libx264", "-crf", "33", "-preset", "fast", "-pix_fmt", "yuv420p"]
        mcp.ffmpeg_frame(src, dst, tmp, f"scale={lw}:{lh}:flags=area", args_, "mp4")
    elif pipeline == "mpeg4-legacy":
        args_ = ["-c:v", "mpeg4", "-q:v", "6", "-pix_fmt", "yuv420p"]
        mcp.ffmpeg_frame(src, dst, tmp, f"scale={lw}:{lh}:flags=bilinear", args_, "avi")
    elif pipeline == "mjpeg-cam":
        small = os.path.join(tmp, "s.jpg")
        resize = ["-filter", "Triangle", "-resize", f"{lw}x{lh}!"]
        mcp.run([mcp.im(), src, "-blur", "0x1.2", *resize, "-quality", "70", small])
        mcp.run([mcp.im(), small, dst])
    elif pipeline in MORE:
        degrade_more(mcp, pipeline, src, dst, tmp, lw, lh)
        return
    else:
        raise ValueError(pipeline)
    out = Image.open(dst).convert("RGB")
    if out.size != (lw, lh):
        raise RuntimeError(f"{pipeline}: got {out.size}, want {(lw, lh)}")
    out.save(dst)


def degrade_more(mcp, pipeline: str, src: str, dst: str, tmp: str, lw: int, lh: int) -> None:
    """The ``MORE`` pipelines (ImageMagick and ffmpeg; deterministic: fixed seeds)."""
    size = f"{lw}x{lh}!"
    if pipeline == "x264-noisy":  # a dim, noisy stream: grain, lanczos, x264 CRF 26
        args_ = ["-c:v", "libx264", "-crf", "26", "-preset", "medium", "-pix_fmt", "yuv420p"]
        vf = f"scale={lw}:{lh}:flags=lanczos,noise=alls=10:allf=t:all_seed=3"
        mcp.ffmpeg_frame(src, dst, tmp, vf, args_, "mp4")
    else:
        mid = os.path.join(tmp, {"webp-thumb": "m.webp", "heic-phone": "m.heic", "jp2-archive": "m.jp2",
                                 "jpeg-q25-box": "m.jpg", "blur-noise-raw": "m.png"}[pipeline])  # fmt: skip
        steps = {
            "webp-thumb": ["-filter", "Catrom", "-resize", size, "-quality", "40"],
            "heic-phone": ["-filter", "Lanczos", "-resize", size, "-unsharp", "0x1+0.8+0", "-quality", "35"],
            "jp2-archive": ["-filter", "Mitchell", "-resize", size, "-quality", "30"],
            "jpeg-q25-box": ["-filter", "Box", "-resize", size, "-quality", "25",
                             "-sampling-factor", "4:2:0"],
            "blur-noise-raw": ["-blur", "0x1.5", "-filter", "Catrom", "-resize", size, "-seed", "7",
                               "-attenuate", "0.35", "+noise", "Gaussian"],
        }[pipeline]  # fmt: skip
        mcp.run([mcp.im(), src, *steps, mid])
        mcp.run([mcp.im(), mid, dst])
    out = Image.open(dst).convert("RGB")
    if out.size != (lw, lh):
        raise RuntimeError(f"{pipeline}: got {out.size}, want {(lw, lh)}")
    out.save(dst)


DEFAULT_BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_codec_pairs.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK), help="path of make_codec_pairs.py")
    ap.add_argument(
        "--pipelines",
        choices=["variants", "benchmark", "all", "more"],
        default="variants",
        help="the three variants (default), the benchmark's own four, all seven, or the six MORE ones",
    )
    ap.add_argument(
        "--photos", default=None, help="TRAIN:EVAL photo names, comma-separated (default: the benchmark's)"
    )
    args = ap.parse_args()
    mcp = load_benchmark(args.benchmark)
    if args.photos:
        mcp.TRAIN, mcp.EVAL = parse_photos(args.photos)
    own, own_degrade = list(mcp.PIPELINES), mcp.degrade

    def degrade(pipeline: str, src: str, dst: str, tmp: str) -> None:
        if pipeline in own:
            own_degrade(pipeline, src, dst, tmp)
        else:
            degrade_variant(mcp, pipeline, src, dst, tmp)

    mcp.degrade = degrade
    sets = {"variants": PIPELINES, "benchmark": own, "all": own + PIPELINES, "more": MORE}
    mcp.PIPELINES = sets[args.pipelines]
    mcp.main(args.out)


def parse_photos(spec: str) -> tuple[list[str], list[str]]:
    """``"a,b:c,d"`` -> (TRAIN, EVAL); each name must be a scikit-image RGB photo, the splits disjoint,
    and EVAL at least two photos (a tile's reference comes from another eval photo)."""
    from skimage import data

    if spec.count(":") != 1:
        raise SystemExit(f"--photos {spec!r}: want TRAIN:EVAL, e.g. astronaut,retina:rocket,cat")
    train, ev = ([n.strip() for n in part.split(",") if n.strip()] for part in spec.split(":"))
    for n in train + ev:
        fn = getattr(data, n, None)
        try:
            arr = fn() if callable(fn) else None
        except Exception as e:  # e.g. a photo that scikit-image would have to download
            raise SystemExit(f"--photos: {n!r} cannot be loaded here: {e}") from None
        if not hasattr(arr, "ndim") or arr.ndim != 3 or arr.shape[2] < 3:
            raise SystemExit(f"--photos: {n!r} is not a scikit-image RGB photo")
    if set(train) & set(ev):
        raise SystemExit(f"--photos: {sorted(set(train) & set(ev))} in both TRAIN and EVAL")
    if len(ev) < 2 or not train:
        raise SystemExit("--photos: want at least one TRAIN and two EVAL photos")
    return train, ev


if __name__ == "__main__":
    main()
