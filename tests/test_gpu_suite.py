"""bench/gpu_suite.py runs end to end in its CPU quick mode and prints every figure as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> dict:
    """Run ``bench/<script>`` with one OpenMP thread from the repo root; its JSON output."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_gpu_suite_quick_mode_on_cpu(tmp_path):
    saved = tmp_path / "suite.json"
    out = _bench("gpu_suite.py", "--device", "cpu", "--quick", "--threads", "1", "--out", str(saved))
    # --out: what a GPU call cut off by its time limit brings back, written after every section
    assert json.loads(saved.read_text()) == json.loads(json.dumps(out))
    assert out["bench"] == "gpu_suite" and out["quick"] and out["preset"] == "tiny"
    assert out["unet_gflop_per_row"] > 0 and out["peak"]["tflops"] > 0
    assert out["unet_forward"]["eager_fp32"]["tflops"] > 0
    gen = out["generate"]
    anc, ddim = gen["ancestral"], gen["ddim"]
    for g in (anc, ddim):
        assert g["pairs_per_s"] > 0 and g["useful_tflops_call"] > 0 and g["computed_over_useful"] >= 1.0
        assert g["rows_computed"] == g["unet_calls"] * gen["rows_per_call"]
        assert 0 < g["pct_of_measured_peak"] and 0 < g["pct_of_datasheet_peak"]
    assert ddim["rows_useful"] < anc["rows_useful"] and ddim["unet_calls"] < anc["unet_calls"]
    assert gen["per_sample_default"]["pairs_per_s"] > 0 and gen["starts_cpu_seconds_per_pair"] > 0
    train = out["train"]
    assert train["C_diffusion"]["step_s"] > 0 and train["B_degradation"]["step_s"] > 0
    assert train["settings"]["C"]["lr_crop"] == 16


def test_train_gpu_bench_plans_steps_for_a_budget_on_cpu(tmp_path):
    """bench/train_gpu.py on the tiny manifest: three configurations timed, one factor for every stage,
    and the --set line pipelines/train.py takes."""
    sets = tmp_path / "sets.txt"
    out = _bench(
        "train_gpu.py",
        "manifests/train_tiny.yaml",
        "--device=cpu",
        "--steps=1",
        "--warmup=1",
        "--workers=1",
        "--plan-seconds=20",
        f"--sets-out={sets}",
    )
    for phase in ("degradation", "diffusion"):
        r = out["phases"][phase]
        assert all(r[k] > 0 for k in ("inprocess_fp32", "workers_fp32", "workers_bf16"))
        assert r["speedup_workers"] == round(r["inprocess_fp32"] / r["workers_fp32"], 2)
    chosen = out["chosen"]["config"]
    per_step = {p: out["phases"][p][chosen] for p in out["plan"]["steps"]}
    base = {
        "content_pretrain": 20,
        "content_finetune": 20,
        "degradation": 20,
        "diffusion": 20,
    }  # the manifest's
    f = out["plan"]["factor"]
    assert abs(f - 20 / sum(base[p] * per_step[p] for p in base)) < 1e-2 * f
    for p, n in out["plan"]["steps"].items():  # rounded to tens (the factor above is rounded to 3 digits)
        assert n % 10 == 0 or n == 1
        assert abs(n - base[p] * f) <= 5.5
    line = sets.read_text().split()
    assert f"stage_c.steps={out['plan']['steps']['diffusion']}" in line
    assert f"compute.precision={out['chosen']['precision']}" in line and "compute.data_workers=1" in line
