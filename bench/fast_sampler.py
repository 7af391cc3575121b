"""Fast sampler vs the paper's ancestral sampler: UNet calls and PSNR to the true LR; prints JSON.

Data: ``../shared/bench/make_codec_pairs.py OUT`` (real codec pipelines; HR tiles of two EVAL
photos with their true LR). For a tile of one eval photo the degradation reference is a true-LR
tile of the OTHER eval photo of the same pipeline (never the tile's own LR), chosen round-robin.
Both samplers run on the same tiles, references, seeds (so the same τ, θ and x_τ) in the same
run; the figure of merit is the PSNR of the kept LR to the true LR, averaged over tiles, and the
loss ``psnr(ancestral) − psnr(fast)`` with a per-tile paired standard error.

    python /work/shared/bench/make_codec_pairs.py /tmp/codec
    python bench/fast_sampler.py --data /tmp/codec --tiles-per-pipeline 4  # ~15 min, 1 thread
    python bench/fast_sampler.py --data /tmp/codec --steps 5,10,20 --eta 1,0

UNet cost is counted, not timed: ``calls`` (network invocations; the per-sample default path
makes one per sample per step) and ``rows`` (row evaluations = the work a packed/continuous GPU
path pays). Bicubic PSNR is printed for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.diffusion import SamplerConfig  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402
from realdgen_core.metrics import psnr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> torch.Tensor:
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _photo(name: str) -> str:
    return name.split("_", 1)[0]


def load_tiles(data: Path, per_pipeline: int) -> list[dict]:
    """Spread ``per_pipeline`` tiles over each pipeline's eval tiles, alternating photos, each with a
    reference from the other photo's true LR (round-robin over that photo's tiles)."""
    items = []
    for pipe in sorted(p for p in data.iterdir() if (p / "hr").is_dir() and (p / "lr").is_dir()):
        names = sorted(f.name for f in (pipe / "hr").glob("*.png"))
        by_photo: dict[str, list[str]] = {}
        for n in names:
            by_photo.setdefault(_photo(n), []).append(n)
        if len(by_photo) < 2:
            raise ValueError(f"{pipe}: needs tiles of at least two eval photos, got {sorted(by_photo)}")
        photos = sorted(by_photo)
        want = -(-per_pipeline // len(photos))
        spread = {
            ph: [lst[int(i)] for i in np.unique(np.linspace(0, len(lst) - 1, min(want, len(lst))).round())]
            for ph, lst in by_photo.items()
        }
        chosen = [n for group in zip(*spread.values(), strict=False) for n in group][:per_pipeline]
        ref_cursor = dict.fromkeys(photos, 0)
        for n in chosen:
            ph = _photo(n)
            others = [m for o in photos if o != ph for m in by_photo[o]]
            ref = others[ref_cursor[ph] % len(others)]
            ref_cursor[ph] += 1
            items.append(
                {
                    "pipeline": pipe.name,
                    "tile": n,
                    "ref": ref,
                    "hr": _load(pipe / "hr" / n),
                    "lr_true": _load(pipe / "lr" / n),
                    "ref_lr": _load(pipe / "lr" / ref),
                }
            )
    if not items:
        raise ValueError(f"no pipelines with hr/ and lr/ under {data} (run make_codec_pairs.py first)")
    return items


class UNetCounter:
    """Counts the UNet's network calls and rows while active."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet, self.calls, self.rows = unet, 0, 0
        self._orig = unet.forward

    def __enter__(self) -> UNetCounter:
        def fwd(x, c, t):
            self.calls += 1
            self.rows += int(x.shape[0])
            return self._orig(x, c, t)

        self.unet.forward = fwd
        return self

    def __exit__(self, *exc) -> None:
        self.unet.forward = self._orig


def run_sampler(
    gen: LRGenerator, items: list[dict], *, k: int, tau: tuple[int, int], seed: int, batch: int
) -> dict:
    lrs: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with UNetCounter(gen.model.unet) as cnt:
        for s in range(0, len(items), batch):
            chunk = items[s : s + batch]
            hr = torch.stack([it["hr"] for it in chunk])
            emb = gen.degradation_embeddings([it["ref_lr"] for it in chunk])
            seeds = [seed * 1_000_003 + s + i for i in range(len(chunk))]
            res = gen.generate(hr, k=k, tau_range=tau, seeds=seeds, ref_embeddings=emb)
            lrs.extend(res.lr)
    wall = time.perf_counter() - t0
    ps = [psnr(lr, it["lr_true"]) for lr, it in zip(lrs, items, strict=True)]
    return {"psnr": ps, "calls": cnt.calls, "rows": cnt.rows, "seconds": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="make_codec_pairs.py output folder")
    ap.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "realdgen-small-x4.safetensors"))
    ap.add_argument("--tiles-per-pipeline", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tau-min", type=int, default=0)
    ap.add_argument("--tau-max", type=int, default=300)
    ap.add_argument("--steps", default="10", help="comma list of ddim steps")
    ap.add_argument("--eta", default="1", help="comma list of ddim eta")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="tiles per generate call")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    items = load_tiles(Path(args.data), args.tiles_per_pipeline)
    tau = (args.tau_min, args.tau_max)
    common = {"k": args.k, "tau": tau, "seed": args.seed, "batch": args.batch}
    anc_gen = LRGenerator.from_checkpoint(args.checkpoint)
    anc = run_sampler(anc_gen, items, **common)
    bic = [
        psnr(
            F.interpolate(it["hr"][None], scale_factor=0.25, mode="bicubic", antialias=True)[0].clamp(0, 1),
            it["lr_true"],
        )
        for it in items
    ]
    pipes = sorted({it["pipeline"] for it in items})

    def by_pipe(values: list[float]) -> dict[str, float]:
        return {
            p: float(np.mean([v for v, it in zip(values, items, strict=True) if it["pipeline"] == p]))
            for p in pipes
        }

    out = {
        "bench": "fast_sampler",
        "checkpoint": Path(args.checkpoint).name,
        "digest": anc_gen.digest,
        "data": str(args.data),
        "tiles": len(items),
        "pipelines": {p: sum(it["pipeline"] == p for it in items) for p in pipes},
        "k": args.k,
        "tau_range": list(tau),
        "threads": args.threads,
        "ancestral": {
            "unet_calls": anc["calls"],
            "unet_rows": anc["rows"],
            "seconds": round(anc["seconds"], 2),
            "psnr_mean": float(np.mean(anc["psnr"])),
            "psnr_by_pipeline": by_pipe(anc["psnr"]),
        },
        "bicubic_psnr_mean": float(np.mean(bic)),
        "fast": [],
    }
    for steps in (int(v) for v in args.steps.split(",")):
        for eta in (float(v) for v in args.eta.split(",")):
            spec = SamplerConfig("ddim", steps=steps, eta=eta)
            gen = LRGenerator(anc_gen.model, digest=anc_gen.digest, sampler=spec)
            r = run_sampler(gen, items, **common)
            d = np.asarray(anc["psnr"]) - np.asarray(r["psnr"])
            out["fast"].append(
                {
                    "sampler": spec.to_dict(),
                    "unet_calls": r["calls"],
                    "unet_rows": r["rows"],
                    "seconds": round(r["seconds"], 2),
                    "calls_ratio": anc["calls"] / r["calls"],
                    "rows_ratio": anc["rows"] / r["rows"],
                    "psnr_mean": float(np.mean(r["psnr"])),
                    "psnr_loss_db": float(d.mean()),
                    "psnr_loss_stderr_db": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None,
                    "psnr_by_pipeline": by_pipe(r["psnr"]),
                    "ok": bool(anc["calls"] / r["calls"] >= 10 and d.mean() <= 0.2),
                }
            )
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
