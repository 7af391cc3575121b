"""Parameter counts, checkpoint size and CPU forward time per component for the tiny/small/paper presets.

    python bench/model_cost.py [--scale 4] [--presets tiny,small,paper] [--threads 1] [--reps 3]

Prints one JSON document. Times are for one 64x64 LR tile (HR 256x256 at x4), batch 1, on CPU:
the best (min) of ``--reps`` after a warm-up; min, not median, because the CPUs are shared and
noisy. ``paper`` gets a single un-warmed repetition (it is slow). One thread by default: on a
loaded 2-core machine, 2 oneDNN threads spend most of their time waiting for each other.
The ratios compare numbers measured in the same run: ``unet_step_over_condition`` is the cost of
one denoising step relative to building the condition once, and ``generation_tau300_s`` the cost
of one candidate at the largest τ (condition + 300 UNet steps). For tiny/small,
``train_step_b8_s`` is one stage-C style UNet step (forward + backward + Adam) at batch 8 on
64x64 LR tiles (condition networks excluded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realdgen_core.checkpoint import save_checkpoint  # noqa: E402
from realdgen_core.config import preset  # noqa: E402
from realdgen_core.models import RealDGenModel, build_model  # noqa: E402

LR_TILE = 64


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model: RealDGenModel) -> dict[str, int]:
    codebook = _count(model.content.quantizer)
    counts = {
        "content_encoder": _count(model.content.encoder),
        "content_decoder": _count(model.content.decoder),
        "codebook": codebook,
        "E_deg": _count(model.degradation),
        "M": _count(model.modulation),
        "Rec_lr": _count(model.lr_reconstructor),
        "unet": _count(model.unet),
    }
    counts["total"] = sum(counts.values())
    assert counts["total"] == _count(model)
    return counts


def _time(fn, reps: int, warmup: bool) -> float:
    with torch.no_grad():
        if warmup:
            fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def forward_times(model: RealDGenModel, reps: int, warmup: bool) -> dict[str, float]:
    s = model.scale
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 3, LR_TILE * s, LR_TILE * s, generator=g)
    lr = torch.rand(1, 3, LR_TILE, LR_TILE, generator=g)
    x_t = torch.randn(1, 3, LR_TILE, LR_TILE, generator=g)
    t = torch.tensor([150])
    with torch.no_grad():
        content = model.content.encode(hr)
        deg = model.degradation(lr)
        cond = model.modulation(content, deg)
    z_q = model.content.quantize(content)[0]
    out = {
        "E_cont_encode": _time(lambda: model.content.encode(hr), reps, warmup),
        "quantize": _time(lambda: model.content.quantize(content), reps, warmup),
        "Rec_hr_decode": _time(lambda: model.content.decode(z_q), reps, warmup),
        "E_deg": _time(lambda: model.degradation(lr), reps, warmup),
        "M": _time(lambda: model.modulation(content, deg), reps, warmup),
        "Rec_lr": _time(lambda: model.lr_reconstructor(content, deg), reps, warmup),
        "unet_step": _time(lambda: model.unet(x_t, cond, t), reps, warmup),
    }
    out["condition"] = out["E_cont_encode"] + out["E_deg"] + out["M"]
    return {k: round(v, 5) for k, v in out.items()}


def train_step_time(model: RealDGenModel, reps: int) -> float:
    g = torch.Generator().manual_seed(1)
    cond_ch = model.config.unet.cond_channels
    x = torch.randn(8, 3, LR_TILE, LR_TILE, generator=g)
    c = torch.randn(8, cond_ch, LR_TILE, LR_TILE, generator=g)
    t = torch.randint(0, 500, (8,), generator=g)
    opt = torch.optim.Adam(model.unet.parameters(), lr=1e-4)

    def step() -> None:
        loss = model.unet(x, c, t).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return round(min(times), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--presets", default="tiny,small,paper")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    report: dict = {
        "scale": args.scale,
        "lr_tile": [LR_TILE, LR_TILE],
        "hr_tile": [LR_TILE * args.scale] * 2,
        "batch": 1,
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "presets": {},
    }
    for name in args.presets.split(","):
        model = build_model(preset(name, args.scale)).eval()
        entry: dict = {"params": param_counts(model)}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.safetensors"
            t0 = time.perf_counter()
            save_checkpoint(path, model)
            entry["checkpoint_save_s"] = round(time.perf_counter() - t0, 3)
            entry["checkpoint_mb"] = round(path.stat().st_size / 1e6, 3)
        is_paper = name == "paper"
        reps = 1 if is_paper else args.reps
        times = forward_times(model, reps=reps, warmup=not is_paper)
        entry["forward_s"] = times
        entry["forward_reps"] = reps
        entry["unet_step_over_condition"] = round(times["unet_step"] / times["condition"], 3)
        entry["generation_tau300_s"] = round(times["condition"] + 300 * times["unet_step"], 2)
        if not is_paper:
            entry["train_step_b8_s"] = train_step_time(model.train(), reps=args.reps)
        report["presets"][name] = entry
        del model
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
