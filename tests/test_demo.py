"""The demo pipeline runs end to end at toy scale and writes its report (the learning bar itself is
measured by `make demo`, not asserted here)."""
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "dig_jax.demo", f"--workdir={workdir}", "--num_train_pairs=24",
           "--num_eval_pairs=8", "--workers=1", "--num_rec_scenes=4",
           "--config.demo.resolution=64", "--config.data.min_pixels=4096", "--config.data.max_pixels=4096",
           "--config.sft.steps=2", "--config.sft.batch_size=4", "--config.grpo.steps=2",
           "--config.grpo.prompts_per_batch=2", "--config.grpo.group_size=2", "--config.grpo.max_new_tokens=8",
           "--config.eval.batch_size=4", "--config.eval.max_new_tokens=8", "--config.eval.num_pairs=8",
           "--config.mesh.num_devices=1", "--config.data.allow_truncated_answers=True"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (workdir / "report.md").read_text()
    assert "Held-out F1@0.5 on one-difference pairs" in report
    assert "## Transfer: referring expressions" in report and "| acc@0.5 |" in report
    for name in ("curves.png", "predictions.png", "data_preview.png"):
        assert (workdir / name).stat().st_size > 0
    # Both evaluations ran: after the warm-up (step 2) and after GRPO (step 4).
    assert (workdir / "run" / "eval" / "step_2" / "metrics.json").exists()
    assert (workdir / "run" / "eval" / "step_4" / "metrics.json").exists()
    assert (workdir / "run" / "eval" / "step_4" / "rec" / "predictions.jsonl").exists()
