"""Demo inputs from photos that ship inside scikit-image: HR content, stand-in LR references, held-out set.

Nothing is downloaded: every photo below is bundled with scikit-image. The LR references are made by
``realdgen_core.camera.camera_standin`` — a camera-like *stand-in* for real LR, not real LR.

Splits (disjoint by photo; ``cat`` is the same picture as ``chelsea`` and is never used):

- ``hr_train``: HR content for training stages A/B and the demo generation job;
- ``ref_photos``: photos turned into stand-in LR references (stage C corpus, demo references);
- ``heldout``: never used in training; the evaluation crops come from here. These are the EVAL
  photos of the realism benchmark (``shared/bench/make_codec_pairs.py``: astronaut, coffee), so
  a checkpoint trained on these splits is never trained on the benchmark's evaluation photos.

Grayscale photos are used as RGB (three equal channels): they add texture and text content.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS: dict[str, tuple[str, ...]] = {
    "hr_train": (
        "chelsea",
        "rocket",
        "hubble_deep_field",
        "immunohistochemistry",
        "motorcycle_left",
        "camera",
        "brick",
        "grass",
        "coins",
        "text",
    ),
    "ref_photos": ("retina", "motorcycle_right", "gravel", "moon", "clock", "page"),
    "heldout": ("astronaut", "coffee"),
    # Default content for domain calibrations (pipelines/train.py `calibration`): photos in neither
    # split of the realism benchmark (shared/bench/make_codec_pairs.py), so calibrating on its
    # refs_train never pairs a reference with its own scene.
    "calibration": ("motorcycle_right", "gravel", "moon", "camera", "brick", "grass", "coins", "clock"),
}

# Every photo `load_photo` gives: scikit-image's bundled pictures (no download; 2-D, 8-bit or binary).
# `sr_proxy.photos` of an evaluate manifest is checked against these names.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cat",
    "cell",
    "checkerboard",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "colorwheel",
    "grass",
    "gravel",
    "horse",
    "hubble_deep_field",
    "immunohistochemistry",
    "logo",
    "microaneurysms",
    "moon",
    "motorcycle_left",
    "motorcycle_right",
    "page",
    "retina",
    "rocket",
    "text",
)

_LAYOUT_VERSION = 3  # 3: the camera parameters moved out of refs/


def load_photo(name: str) -> np.ndarray:
    """One bundled photo (a name in ``PHOTOS``) as uint8 RGB [H, W, 3]."""
    from skimage import data

    if name not in PHOTOS:  # not any attribute of skimage.data: some download, some are not images
        raise ValueError(f"unknown demo photo {name!r} (known: {', '.join(PHOTOS)})")
    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = data.stereo_motorcycle()
        img = left if name == "motorcycle_left" else right
    else:
        try:
            img = getattr(data, name)()
        except AttributeError:
            raise ValueError(f"unknown demo photo {name!r}") from None
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _save_png(path: Path, img: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)


def prepare_demo_inputs(
    root: str | Path, scale: int = 4, refs_per_photo: int = 3, seed: int = 0
) -> dict[str, Path]:
    """Write the demo folders under ``root`` (idempotent) and return them.

    ``root/hr/*.png`` (hr_train photos), ``root/heldout/*.png``, and ``root/refs/*.png``: for every
    ref photo, ``refs_per_photo`` stand-in camera LR images (``scale``× smaller), each with its own
    seeded camera parameters, recorded in ``root/refs_params.json`` (outside the folder: a source
    listing ``refs/`` would name it as a file left out by extension).
    """
    from realdgen_core.camera import camera_standin

    root = Path(root)
    dirs = {"hr": root / "hr", "refs": root / "refs", "heldout": root / "heldout"}
    marker = root / "_prepared.json"
    wanted = {"version": _LAYOUT_VERSION, "scale": scale, "refs_per_photo": refs_per_photo, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return dirs
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    for name in SPLITS["hr_train"]:
        _save_png(dirs["hr"] / f"{name}.png", load_photo(name))
    for name in SPLITS["heldout"]:
        _save_png(dirs["heldout"] / f"{name}.png", load_photo(name))
    params: dict[str, dict] = {}
    for p_idx, name in enumerate(SPLITS["ref_photos"]):
        hr = torch.from_numpy(load_photo(name)).permute(2, 0, 1).float().div(255).unsqueeze(0)
        for i in range(refs_per_photo):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + p_idx * 101 + i)
            lr, (cam,) = camera_standin(hr, scale, [gen])
            out = (lr[0] * 255).round().byte().permute(1, 2, 0).numpy()
            fname = f"{name}_{cam['profile']}_{i}.png"
            _save_png(dirs["refs"] / fname, out)
            params[fname] = cam
    (root / "refs_params.json").write_text(json.dumps(params, indent=1, sort_keys=True))
    (dirs["refs"] / "_params.json").unlink(missing_ok=True)  # where layouts 1 and 2 kept them
    marker.write_text(json.dumps(wanted))
    return dirs


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the demo inputs (scikit-image photos) to a folder.")
    ap.add_argument("root", nargs="?", default="data/demo")
    ap.add_argument("--scale", type=int, default=4)
    args = ap.parse_args()
    for k, v in prepare_demo_inputs(args.root, args.scale).items():
        print(k, v, len(list(v.glob("*.png"))))
