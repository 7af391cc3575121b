"""bench/gpu_suite.py runs end to end in its CPU quick mode and prints every figure as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_suite_quick_mode_on_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_suite.py"),
            "--device",
            "cpu",
            "--quick",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
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
