"""Three more codec pipelines for a held-out realism check: x264 (area downscale, CRF 33), MPEG-4
part 2 (bilinear downscale, q 6) and a blurred, triangle-downscaled JPEG q70 camera. None was looked
at while the start choice was designed; same photos, tiles and folder layout as the benchmark's
``make_codec_pairs.py``, whose helpers this reuses (needs ffmpeg and ImageMagick).

    python bench/make_variant_codecs.py OUT [--benchmark ../shared/bench/make_codec_pairs.py]
    python pipelines/evaluate.py manifests/evaluate_codecs.yaml --set root=OUT \\
        --set 'domains=[{"name":"x264-mobile"},{"name":"mpeg4-legacy"},{"name":"mjpeg-cam"}]'
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

from PIL import Image

PIPELINES = ["x264-mobile", "mpeg4-legacy", "mjpeg-cam"]


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
    else:
        raise ValueError(pipeline)
    out = Image.open(dst).convert("RGB")
    if out.size != (lw, lh):
        raise RuntimeError(f"{pipeline}: got {out.size}, want {(lw, lh)}")
    out.save(dst)


DEFAULT_BENCHMARK = Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_codec_pairs.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK), help="path of make_codec_pairs.py")
    args = ap.parse_args()
    mcp = load_benchmark(args.benchmark)
    mcp.degrade = lambda pipeline, src, dst, tmp: degrade_variant(mcp, pipeline, src, dst, tmp)
    mcp.PIPELINES = PIPELINES
    mcp.main(args.out)


if __name__ == "__main__":
    main()
