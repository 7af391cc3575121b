"""Continuous batching of diffusion rows: rows computed / rows useful, and per-sample agreement; JSON.

Part 1 (hardware independent, no network): for each (rows per batch, rows_per_call R) at k = 4,
τ ~ U{0..300}, the continuous scheduler's rows computed / rows useful, next to what the old
lock-step packing (every t: the active rows padded up to a multiple of R) computed for the
same τ.  Part 2 (``--preset``, a real network on this machine): one ``LRGenerator.generate`` of
the same batch per-sample (``rows_per_call=None``) and continuously batched, in one run: kept
candidates, candidate bytes, UNet calls and wall time of each.

    python bench/continuous_batching.py                          # part 1 + part 2 (tiny, τ ≤ 300)
    python bench/continuous_batching.py --preset small --samples 8 --tau-max 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.config import preset  # noqa: E402
from realdgen_core.diffusion import BatchingStats, GaussianDiffusion, SamplerConfig  # noqa: E402
from realdgen_core.generator import LRGenerator  # noqa: E402
from realdgen_core.models import build_model  # noqa: E402


def scheduler_ratio(samples: int, k: int, r: int, tau_max: int, seed: int, sampler: SamplerConfig) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = samples * k
    tau = torch.randint(0, tau_max + 1, (n,), generator=g)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(samples)]
    st = BatchingStats()
    GaussianDiffusion().sample_continuous(
        lambda x, t, c: torch.zeros_like(x),
        torch.zeros(n, 1, 1, 1),
        tau,
        [gens[i // k] for i in range(n)],
        rows_per_call=r,
        cond={"c": torch.zeros(n, 1, 1, 1)},
        sampler=sampler,
        stats=st,
    )
    lens = [len(sampler.timesteps(v)) for v in tau.tolist()]
    # Old lock-step packing: at each clock c, the active rows in ceil(active / R) calls of R rows.
    lockstep = sum(math.ceil(sum(1 for v in lens if v > c) / r) * r for c in range(max(lens)))
    return {
        "samples": samples,
        "rows": n,
        "rows_per_call": r,
        "calls": st.calls,
        "rows_useful": st.rows_useful,
        "rows_computed": st.rows_computed,
        "computed_over_useful": round(st.padding_ratio, 4),
        "lockstep_computed_over_useful": round(lockstep / st.rows_useful, 4),
        "lower_bound_calls": max(math.ceil(st.rows_useful / r), max(lens)),
    }


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 4), max(2, size // 4), generator=g)
    return F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


def generator_agreement(name: str, samples: int, k: int, r: int, tau_max: int, lr_tile: int, sampler) -> dict:
    model = build_model(preset(name, 4), seed=0)
    hr, refs = _images(samples, lr_tile * 4, 1), _images(samples, lr_tile, 2)
    kw = dict(k=k, tau_range=(0, tau_max), seeds=list(range(samples)), return_candidates=True)
    out = {}
    t0 = time.perf_counter()
    a = LRGenerator(model, sampler=sampler).generate(hr, refs, **kw)
    out["per_sample_seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    c = LRGenerator(model, rows_per_call=r, sampler=sampler).generate(hr, refs, **kw)
    out["continuous_seconds"] = round(time.perf_counter() - t0, 2)
    diff = (a.candidates - c.candidates).abs() * 255
    out.update(
        preset=name,
        samples=samples,
        k=k,
        rows_per_call=r,
        lr_tile=lr_tile,
        same_kept=bool(torch.equal(a.kept, c.kept)),
        candidate_max_diff_levels=float(diff.max()),
        candidate_values_differing=float((diff > 0.5).float().mean()),
        content_error_max_rel_diff=float(
            ((a.content_errors - c.content_errors).abs() / a.content_errors).max()
        ),
        continuous=c.batching.__dict__ | {"computed_over_useful": round(c.batching.padding_ratio, 4)},
        speedup=round(out["per_sample_seconds"] / out["continuous_seconds"], 2),
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tau-max", type=int, default=300)
    ap.add_argument("--sampler", default="ancestral", choices=["ancestral", "ddim"])
    ap.add_argument("--steps", type=int, default=10, help="ddim steps")
    ap.add_argument("--preset", default="tiny", help="part 2 preset ('' skips part 2)")
    ap.add_argument("--samples", type=int, default=16, help="part 2 samples")
    ap.add_argument("--rows-per-call", type=int, default=16, help="part 2 R")
    ap.add_argument("--lr-tile", type=int, default=8, help="part 2 LR tile edge")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sampler = SamplerConfig(args.sampler, steps=args.steps)
    grid = []
    for r in (16, 32, 64, 128):
        for mult in (1, 2, 4):
            grid.append(
                scheduler_ratio(
                    mult * r // args.k, args.k, r, args.tau_max, seed=r * 10 + mult, sampler=sampler
                )
            )
    out = {
        "bench": "continuous_batching",
        "k": args.k,
        "tau_range": [0, args.tau_max],
        "sampler": sampler.to_dict(),
        "scheduler": grid,
        # A batch of ≥ 4·R rows (k = 4: compute.batch_size ≥ R samples) keeps every call full; at
        # 2·R the longest chain (τ_max + 1 calls) is about the whole run and a few calls run short.
        "max_ratio_rows_ge_4R": max(
            g["computed_over_useful"] for g in grid if g["rows"] >= 4 * g["rows_per_call"]
        ),
        "max_ratio_rows_2R": max(
            g["computed_over_useful"] for g in grid if g["rows"] == 2 * g["rows_per_call"]
        ),
    }
    if args.preset:
        out["generator"] = generator_agreement(
            args.preset, args.samples, args.k, args.rows_per_call, args.tau_max, args.lr_tile, sampler
        )
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
