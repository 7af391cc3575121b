"""Training throughput of a `kind: train` manifest on this machine's accelerator, and a step plan that fits
a time budget; prints JSON.

For stages B and C (the expensive ones) it measures, in the same run and on the manifest's real data:

- ``inprocess_fp32``: batches built in the training process (``compute.data_workers: 0``), fp32;
- ``workers_fp32``: batches built ahead by ``--workers`` DataLoader processes, fp32;
- ``workers_bf16``: the same with the loss forward under bf16 autocast,

each as seconds per step over ``--steps`` steps with one device sync at the end (the loop itself never
syncs), after ``--warmup`` steps. The plan uses workers, with bf16 only if it is at least 10% faster than
fp32; stage A's phases are timed with that configuration only.
With ``--plan-seconds T`` it scales the manifest's step counts by one factor so that the whole schedule
is expected to take about T seconds with the fastest configuration, and writes the ``--set`` overrides
for ``pipelines/train.py`` to ``--sets-out``.

    python bench/train_gpu.py manifests/train_gpu.yaml --plan-seconds 300 --sets-out /tmp/sets.txt
    python bench/train_gpu.py manifests/train_tiny.yaml --device cpu --steps 2 --warmup 1   # a CPU check
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.manifest import load_manifest  # noqa: E402
from pipelines.train import build_model_for, build_samplers, local_device, make_phase, prepare_demo  # noqa: E402

STEP_KEYS = {
    "content_pretrain": "stage_a.pretrain_steps",
    "content_finetune": "stage_a.finetune_steps",
    "degradation": "stage_b.steps",
    "diffusion": "stage_c.steps",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(phase, steps: int, warmup: int) -> float:
    phase.total_steps = warmup + steps
    for _ in range(warmup):  # also starts the workers and fills their queue
        phase.train_step()
    _sync(phase.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        phase.train_step()
    _sync(phase.device)
    dt = (time.perf_counter() - t0) / steps
    phase.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--plan-seconds", type=float, default=None)
    ap.add_argument("--sets-out", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    m = load_manifest(args.manifest, [], kind="train")
    if m.compute.torch_threads:
        torch.set_num_threads(m.compute.torch_threads)
    device = local_device(args.device)
    if m.data.prepare_demo:
        prepare_demo(m.data.prepare_demo, m.scale)
    samplers = build_samplers(m, m.scale, ("A", "B", "C"))
    model = build_model_for(m, device)
    configs = {"inprocess_fp32": (0, "fp32"), "workers_fp32": (args.workers, "fp32")}
    configs["workers_bf16"] = (args.workers, "bf16")
    result: dict = {
        "manifest": args.manifest,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "workers": args.workers,
        "steps": args.steps,
        "phases": {},
    }

    def timed(name: str, workers: int, precision: str) -> float:
        phase = make_phase(m, model, samplers, name, data_workers=workers, precision=precision)
        return round(seconds_per_step(phase, args.steps, args.warmup), 4)

    for name in ("degradation", "diffusion"):
        res = {label: timed(name, *config) for label, config in configs.items()}
        res["speedup_workers"] = round(res["inprocess_fp32"] / res["workers_fp32"], 2)
        res["speedup_workers_bf16"] = round(res["inprocess_fp32"] / res["workers_bf16"], 2)
        result["phases"][name] = res
        print(json.dumps({name: res}), file=sys.stderr)
    total = {k: sum(result["phases"][p][k] for p in ("degradation", "diffusion")) for k in configs}
    # bf16 only where it pays (>= 10% faster): its rounding is a cost paid in every step
    fastest = "workers_bf16" if total["workers_bf16"] < 0.9 * total["workers_fp32"] else "workers_fp32"
    workers, precision = configs[fastest]
    result["chosen"] = {"config": fastest, "data_workers": workers, "precision": precision}
    for name in ("content_pretrain", "content_finetune"):
        result["phases"][name] = {fastest: timed(name, workers, precision)}
    base = {
        "content_pretrain": m.stage_a.pretrain_steps,
        "content_finetune": m.stage_a.finetune_steps,
        "degradation": m.stage_b.steps,
        "diffusion": m.stage_c.steps,
    }
    per_step = {n: result["phases"][n][fastest] for n in base}
    schedule_s = sum(base[n] * per_step[n] for n in base)
    result["manifest_schedule_s"] = round(schedule_s, 1)
    if args.plan_seconds:
        f = args.plan_seconds / schedule_s
        plan = {n: max(1, int(round(base[n] * f, -1))) for n in base}
        result["plan"] = {
            "factor": round(f, 3),
            "steps": plan,
            "expected_s": round(sum(plan[n] * per_step[n] for n in base), 1),
        }
        sets = [f"--set {STEP_KEYS[n]}={plan[n]}" for n in base]
        sets += [f"--set compute.data_workers={workers}", f"--set compute.precision={precision}"]
        result["plan"]["sets"] = " ".join(sets)
        if args.sets_out:
            Path(args.sets_out).write_text(result["plan"]["sets"] + "\n")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
