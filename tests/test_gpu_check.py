"""scripts/gpu_check.sh --dry-run: every stage of the GPU check (the ViT-S/16 step eager and compiled, the CIFAR main
job on a packed zip, the JSON) on this CPU at tiny sizes; failed stages named, the others still run."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(out: Path, **env) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=300, check=False, env={**os.environ, "OUT": str(out), **env})
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_fills_every_stage(tmp_path):
    proc, result = dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert result["dry_run"] and result["failed"] == []
    assert result["machine"]["torch"] and result["machine"]["cpu_cores"] >= 1
    for name, compiled in (("step_eager", False), ("step_compile", True)):
        step = result[name]
        assert step["rc"] == 0 and step["compile"] is compiled and step["img_per_s"] > 0
        assert step["steps"] == 1 and step["gflop_per_img"] > 0 and step["precision"] == "fp32"
    cifar = result["cifar10"]
    curve = cifar["knn_curve"]
    assert len(curve) >= 2 and curve[0]["step"] == 0 and curve[-1]["step"] == cifar["last_row"]["step"] > 0
    assert all(0 <= point["knn_top1"] <= 100 for point in curve)
    assert cifar["last_row"]["images_seen"] > 0 and "ln_K" in cifar["last_row"]
    assert any("held out for kNN" in line for line in cifar["first_lines"])  # the data came from the unpacked zip
    assert not (tmp_path / "cifar10" / "checkpoint.pth").exists() and (tmp_path / "cifar10" / "log.jsonl").exists()


def test_failed_stages_are_named_and_the_rest_still_run(tmp_path):
    # every stage after the machine fails at once (a bad bench flag, no zip): each still runs and names its own error
    proc, result = dry_run(tmp_path, ZIP=str(tmp_path / "missing.zip"), STEP_FLAGS="--steps 0")
    assert proc.returncode == 1
    assert result["failed"] == ["step_eager", "cifar10", "step_compile"]
    assert result["machine"]["rc"] == 0 and result["machine"]["torch"]  # the figures before the failures stay
    assert "--steps must be at least 1" in result["step_eager"]["error"]
    assert "missing.zip" in result["cifar10"]["error"] and result["cifar10"]["knn_curve"] == []
    assert "--steps must be at least 1" in result["step_compile"]["error"]  # run after a failed stage, not skipped
