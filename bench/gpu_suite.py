"""Every GPU figure of issue 9 in one run, as JSON (< 8 min on one H200; ``--device cpu --quick`` tests it).

Sections (each timed with device syncs; later ones are skipped, and say so, once ``--budget-s``
is spent):

1. ``peak``: a large bf16 matmul — the achievable bf16 rate of this device, measured in this run
   (percentages below are given against it and against ``--peak-tflops``, the datasheet figure).
2. ``unet_forward``: the UNet alone on ``rows_per_call`` random 64² rows: eager fp32, eager bf16,
   bf16 + channels_last, bf16 + channels_last + torch.compile (CUDA only) → TFLOP/s of each.
3. ``generate``: ``LRGenerator.generate`` with continuous batching (``rows_per_call``), bf16,
   k candidates, τ ~ U{0..300}, x_start precomputed on the CPU (the job's decode stage does it;
   its CPU seconds per pair are reported): ancestral and the fast sampler (ddim) → pairs/s,
   rows computed/useful, and useful UNet TFLOP/s (useful rows × FLOPs per row / seconds) over
   the sampling phase and over the whole call; plus the per-sample default path on 2 samples.
4. ``train``: stage C of the preset at its crop (``paper``: batch 8 of 256² LR, A.3) — median
   step time, batch-building time, peak memory; and stage B.

The job through Ray Data is not measured here (GPU images may lack ray); ``bench/job_vs_loop.py``
compares job and loop on any machine that has it.

    python bench/gpu_suite.py                          # cuda, paper preset, full sizes
    python bench/gpu_suite.py --device cpu --quick     # tiny preset, minutes on a CPU (CI)
    python bench/gpu_suite.py --budget-s 240 --out $OUT/suite.json   # on a lent GPU machine
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.config import preset  # noqa: E402
from realdgen_core.diffusion import SamplerConfig  # noqa: E402
from realdgen_core.generator import LRGenerator, draw_starts, start_images  # noqa: E402
from realdgen_core.models import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs (after one warm-up run)."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unet_row_flops(model, lr_tile: int, device: torch.device) -> float:
    """FLOPs of one UNet row (forward) at ``lr_tile``², counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = model.unet
    x = torch.zeros(1, unet.config.in_channels, lr_tile, lr_tile, device=device)
    c = torch.zeros(1, unet.config.cond_channels, lr_tile, lr_tile, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        unet(x, c, t)
    return float(fc.get_total_flops())


def _smooth(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, max(2, size // 8), max(2, size // 8), generator=g)
    return F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def section_peak(device: torch.device, quick: bool) -> dict:
    n = 1024 if quick else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = _timed(lambda: a @ b, device, 3 if quick else 10)
    return {"matmul_n": n, "dtype": str(dtype), "tflops": 2 * n**3 / s / 1e12}


def section_unet(model, args, device: torch.device, row_flops: float) -> dict:
    r, tile = args.rows_per_call, args.lr_tile
    unet = model.unet
    x = torch.randn(r, 3, tile, tile, device=device)
    c = torch.randn(r, unet.config.cond_channels, tile, tile, device=device)
    t = torch.randint(0, 300, (r,), device=device)
    reps = 2 if args.quick else 10
    out = {"rows": r}

    def run(net, dtype, cl):
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        cc = c.contiguous(memory_format=torch.channels_last) if cl else c
        ctx = (
            torch.autocast(device.type, dtype=dtype)
            if dtype is not None
            else torch.autocast(device.type, enabled=False)
        )

        def f():
            with torch.inference_mode(), ctx:
                net(xx, cc, t)

        s = _timed(f, device, reps)
        return {"seconds": s, "tflops": r * row_flops / s / 1e12}

    out["eager_fp32"] = run(unet, None, False)
    if device.type == "cuda":
        out["eager_bf16"] = run(unet, torch.bfloat16, False)
        unet.to(memory_format=torch.channels_last)
        out["bf16_channels_last"] = run(unet, torch.bfloat16, True)
        if args.compile:
            try:
                t0 = time.perf_counter()
                compiled = torch.compile(unet, dynamic=False)
                run(compiled, torch.bfloat16, True)  # compile
                out["compile_seconds"] = time.perf_counter() - t0
                out["bf16_channels_last_compile"] = run(compiled, torch.bfloat16, True)
            except Exception as exc:  # a compiler missing on the image must not sink the suite
                out["bf16_channels_last_compile"] = f"error: {type(exc).__name__}: {exc}"[:500]
                args.compile = False
        unet.to(memory_format=torch.contiguous_format)
    return out


def precompute_starts(hr, k, tau, seeds, workers: int):
    """x_start on the CPU in a thread pool (what the job's decode tasks do); returns (starts, s/pair)."""
    t0 = time.perf_counter()

    def one(i):
        _, _, th = draw_starts(1, k, 4, tau, [seeds[i]], "realesrgan")
        return start_images(hr[i : i + 1], th)[0]

    with ThreadPoolExecutor(max_workers=workers) as ex:
        starts = torch.stack(list(ex.map(one, range(hr.shape[0]))))
    return starts, (time.perf_counter() - t0) * workers / hr.shape[0]


def section_generate(model, args, device: torch.device, row_flops: float, deadline: float) -> dict:
    k, b, r, tile = args.k, args.samples, args.rows_per_call, args.lr_tile
    tau = (0, args.tau_max)
    hr = _smooth(b, tile * 4, 1)
    ref_emb = None
    seeds = list(range(1000, 1000 + b))
    starts, cpu_s = precompute_starts(hr, k, tau, seeds, args.cpu_workers)
    out = {"samples": b, "k": k, "rows_per_call": r, "lr_tile": tile, "tau_range": list(tau)}
    out["starts_cpu_seconds_per_pair"] = cpu_s
    dtype = torch.bfloat16 if device.type == "cuda" else None
    refs = _smooth(b, tile, 2)
    base = LRGenerator(model, device=device)
    ref_emb = base.degradation_embeddings(refs)
    variants = [("ancestral", SamplerConfig()), ("ddim", SamplerConfig("ddim", steps=args.ddim_steps))]
    for name, spec in variants:
        if time.perf_counter() > deadline:
            out[name] = "skipped: budget"
            continue
        gen = LRGenerator(
            model,
            device=device,
            rows_per_call=r,
            dtype=dtype,
            sampler=spec,
            compile=args.compile,
            channels_last=args.channels_last,
        )
        gen.generate(hr[:1], k=1, tau_range=(0, 2), seeds=[0], ref_embeddings=ref_emb[:1])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        res = gen.generate(hr, k=k, tau_range=tau, seeds=seeds, ref_embeddings=ref_emb, starts=starts)
        _sync(device)
        wall = time.perf_counter() - t0
        st = res.batching
        useful_flops = st.rows_useful * row_flops
        out[name] = {
            "sampler": spec.to_dict(),
            "seconds": wall,
            "pairs_per_s": b / wall,
            "unet_seconds": res.timings.get("unet"),
            "timings": res.timings,
            "unet_calls": st.calls,
            "rows_useful": st.rows_useful,
            "rows_computed": st.rows_computed,
            "computed_over_useful": st.padding_ratio,
            "row_steps_per_pair": st.rows_useful / b,
            "useful_tflops_sampling": useful_flops / res.timings["unet"] / 1e12,
            "useful_tflops_call": useful_flops / wall / 1e12,
        }
    if time.perf_counter() < deadline:
        per = LRGenerator(model, device=device, dtype=dtype)
        n = 2
        t0 = time.perf_counter()
        per.generate(
            hr[:n], k=k, tau_range=tau, seeds=seeds[:n], ref_embeddings=ref_emb[:n], starts=starts[:n]
        )
        _sync(device)
        out["per_sample_default"] = {"samples": n, "pairs_per_s": n / (time.perf_counter() - t0)}
    else:
        out["per_sample_default"] = "skipped: budget"
    return out


def section_train(name: str, args, device: torch.device) -> dict:
    from realdgen_core.train import (
        ArrayCropSampler,
        DegradationStageConfig,
        DegradationTrain,
        DiffusionStageConfig,
        DiffusionTrain,
    )

    if args.quick:
        c_cfg = DiffusionStageConfig(steps=10**6, batch_size=2, lr_crop=16)
        b_cfg = DegradationStageConfig(steps=10**6, batch_size=2, lr_crop=16)
    else:  # the paper's stage C (A.3): batch 8 of 256² real-LR crops
        c_cfg = DiffusionStageConfig(steps=10**6, batch_size=8, lr_crop=256)
        b_cfg = DegradationStageConfig(steps=10**6, batch_size=8, lr_crop=64)
    # Stage C trains on real LR crops: an in-memory crop sampler stands in for them (no CPU
    # degradation in its batches); stage B degrades HR crops on the CPU, as in training.
    lr_imgs = ArrayCropSampler(list(_smooth(3, c_cfg.lr_crop + 16, 7)))
    hr = ArrayCropSampler(list(_smooth(3, 4 * b_cfg.lr_crop + 16, 8)))
    model = build_model(preset(name, 4), seed=0).to(device)
    out = {}
    for key, phase in (
        ("C_diffusion", DiffusionTrain(model, c_cfg, lr_imgs)),
        ("B_degradation", DegradationTrain(model, b_cfg, hr)),
    ):
        phase.train_step()  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps, batches = [], []
        for _ in range(args.train_steps):
            t0 = time.perf_counter()
            phase.batch()
            batches.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            phase.train_step()
            _sync(device)
            steps.append(time.perf_counter() - t0)
        res = {"step_s": statistics.median(steps), "batch_s": statistics.median(batches)}
        res["step_without_batch_s"] = res["step_s"] - res["batch_s"]  # train_step draws its batch
        if device.type == "cuda":
            res["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out[key] = res
    out["settings"] = {"C": c_cfg.to_dict(), "B": b_cfg.to_dict()}
    return out


def _guarded(fn, *a):
    """Run one section; an exception becomes its result (the other sections still run)."""
    try:
        return fn(*a)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"[:1000]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny preset and sizes (CPU test of the script)")
    ap.add_argument("--preset", default=None, help="default: paper (tiny with --quick)")
    ap.add_argument(
        "--samples", type=int, default=None, help="pairs per generate call (default 128; quick 4)"
    )
    ap.add_argument("--rows-per-call", type=int, default=None, help="default 128 (quick 8)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tau-max", type=int, default=300)
    ap.add_argument("--lr-tile", type=int, default=None, help="LR tile edge (default 64; quick 8)")
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA"
    )
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="datasheet dense bf16 (H200 SXM: 989)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip later sections after this")
    ap.add_argument("--cpu-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--out",
        default=None,
        help="also write the JSON here after every section (a call cut off by its time limit keeps "
        "the sections it finished)",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --quick)")
    q = args.quick
    args.preset = args.preset or ("tiny" if q else "paper")
    args.samples = args.samples or (4 if q else 128)
    args.rows_per_call = args.rows_per_call or (8 if q else 128)
    args.lr_tile = args.lr_tile or (8 if q else 64)
    args.compile = (device.type == "cuda") if args.compile is None else args.compile
    args.channels_last = (device.type == "cuda") if args.channels_last is None else args.channels_last
    args.cpu_workers = args.cpu_workers or (1 if q else max(1, (torch.get_num_threads() or 1)))
    if q:
        args.tau_max = min(args.tau_max, 60)
        args.train_steps = min(args.train_steps, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out: dict = {
        "bench": "gpu_suite",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "preset": args.preset,
        "quick": q,
        "compile": args.compile,
        "channels_last": args.channels_last,
    }

    def save() -> None:
        if args.out:
            tmp = Path(f"{args.out}.tmp")
            tmp.write_text(json.dumps(out, indent=1, default=float))
            tmp.replace(args.out)

    model = build_model(preset(args.preset, 4), seed=0).to(device).eval()
    row_flops = unet_row_flops(model, args.lr_tile, device)
    out["unet_gflop_per_row"] = row_flops / 1e9
    out["peak"] = _guarded(section_peak, device, q)
    save()
    out["unet_forward"] = _guarded(section_unet, model, args, device, row_flops)
    save()
    out["generate"] = _guarded(section_generate, model, args, device, row_flops, deadline)
    for key in ("ancestral", "ddim"):
        g = out["generate"].get(key)
        if isinstance(g, dict) and "tflops" in out["peak"]:
            g["pct_of_measured_peak"] = 100 * g["useful_tflops_call"] / out["peak"]["tflops"]
            g["pct_of_datasheet_peak"] = 100 * g["useful_tflops_call"] / args.peak_tflops
    save()
    if time.perf_counter() < deadline:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out["train"] = _guarded(section_train, args.preset, args, device)
    else:
        out["train"] = "skipped: budget"
    out["seconds"] = time.perf_counter() - t_start
    save()
    print(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main()
