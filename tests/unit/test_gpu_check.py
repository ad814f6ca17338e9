"""benchmarks/gpu_check.py in its --cpu-smoke mode (tiny preset, CPU, no Ray): it runs to
the end and its JSON holds every field a GPU run reports, with values that say the checks
passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_cpu_smoke_reports_every_check() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["benchmark"] == "gpu_check" and out["preset"] == "tiny"
    assert out["device"]["type"] == "cpu" and out["device"]["bf16_supported"] is False
    for mode, trainable in (("expert_only", 465_672), ("full_finetune", 1_107_016)):
        check = out["gradients"][mode]
        assert check["ok"] and check["trainable_params"] == trainable, check
        assert check["without_gradient"] == [] and check["frozen_with_gradient"] == []
        assert check["trainable_params"] + check["frozen_params"] == 1_303_752
        assert check["param_dtypes"] == ["float32"] and check["loss_dtype"] == "float32"
    # The same weights and batch twice on the CPU: the fp32 comparison is exact here.
    assert out["fp32_loss_device_vs_cpu"]["max_abs_diff"] == 0.0
    assert set(out["steps"]) == {"expert_only_video", "expert_only_cache", "full_finetune_video"}
    for variant in out["steps"].values():
        assert variant["steps_timed"] == 4, variant
        assert 0 < variant["step_ms_median"] <= variant["step_ms_max"]
        assert variant["samples_per_s"] > 0 and variant["peak_memory_mb"] > 0
    assert "skipped" in out["ray"] and out["seconds"] > 0
