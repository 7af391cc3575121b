"""Cost of one ``LRGenerator.generate`` call per preset, split by component; prints JSON.

One 256x256 HR tile (x4 -> one 64x64 LR tile), one 64x64 reference, k = 4 candidates, τ fixed
(default 300, i.e. 301 UNet steps per candidate), randomly initialised weights (cost does not
depend on the values). Shares are fractions of the same call's wall time, so they compare across
machines better than the absolute seconds; the ratio row compares each preset with ``tiny``
measured in the same run.

    python bench/generate_cost.py                      # tiny, small, paper
    python bench/generate_cost.py --presets tiny,small --threads 1
    python bench/generate_cost.py --presets paper --steps 10   # measure 10 steps, extrapolate to τ

Components: ``degrade`` (θ draws + D on the HR, x_start), ``content`` (E_cont of the HR),
``degradation`` (E_deg of the reference), ``modulation`` (M), ``unet`` (all sampling steps,
network + update maths), ``filter`` (E_cont(bicubic_up(candidate)) + E_deg(candidate) + errors).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.config import preset  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402
from realdgen_core.models import COMPONENTS, build_model  # noqa: E402


def _smooth_image(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def measure(name: str, *, hr_size: int, k: int, tau: int, steps: int | None, device: str) -> dict:
    model = build_model(preset(name, 4), seed=0)
    params = {c: sum(p.numel() for p in getattr(model, c).parameters()) for c in COMPONENTS}
    gen = LRGenerator(model, device=device)
    hr, ref = _smooth_image(hr_size, 1), _smooth_image(hr_size // 4, 2)
    gen.generate(hr, ref, k=1, tau_range=(0, 0), seeds=[0])  # warm-up: allocator / oneDNN primitives
    run_tau = tau if steps is None else min(tau, steps - 1)
    t0 = time.perf_counter()
    res = gen.generate(hr, ref, k=k, tau_range=(run_tau, run_tau), seeds=[1])
    wall = time.perf_counter() - t0
    t = {key: v for key, v in res.timings.items() if key != "total"}
    extrapolated = run_tau != tau
    if extrapolated:  # every step costs the same: same rows, same shapes
        t["unet"] *= (tau + 1) / (run_tau + 1)
    total = sum(t.values())
    return {
        "preset": name,
        "params": params,
        "params_total": sum(params.values()),
        "tau": tau,
        "unet_steps_per_candidate": tau + 1,
        "measured_steps": run_tau + 1,
        "extrapolated": extrapolated,
        "wall_s": round(total if extrapolated else wall, 3),
        "seconds": {key: round(v, 4) for key, v in t.items()},
        "share": {key: round(v / total, 4) for key, v in t.items()},
        "unet_s_per_step": round(t["unet"] / (tau + 1), 5),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small,paper")
    ap.add_argument("--hr", type=int, default=256, help="HR tile size (LR = HR/4)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tau", type=int, default=300)
    ap.add_argument("--steps", type=int, default=None, help="measure this many steps and extrapolate to tau")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.presets.split(","):
        row = measure(name, hr_size=args.hr, k=args.k, tau=args.tau, steps=args.steps, device=args.device)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)  # partial results survive an interrupt
    base = next((r["wall_s"] for r in rows if r["preset"] == "tiny"), None)
    out = {
        "bench": "generate_cost",
        "setup": {
            "hr": args.hr,
            "lr": args.hr // 4,
            "k": args.k,
            "tau_range": [args.tau, args.tau],
            "device": args.device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.machine(),
        },
        "presets": rows,
        "wall_ratio_to_tiny": {r["preset"]: round(r["wall_s"] / base, 2) for r in rows} if base else None,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
