"""The demo pipeline runs end to end at toy scale and writes its report (the learning bar itself is
measured by `make demo`, not asserted here)."""
import json
import os
import subprocess
import sys

import pytest

from dig_jax.eval import stats

# metrics.json key -> (stats metric, true boxes): the rows of the report that carry a standard error
WITH_SE = {"reward": ("reward", None), "f1": ("f1", None), "count_accuracy": ("count_correct", None),
           "by_num_differences/1/f1": ("f1", 1), "by_num_differences/2/f1": ("f1", 2),
           "by_num_differences/1/count_accuracy": ("count_correct", 1),
           "by_num_differences/2/count_accuracy": ("count_correct", 2)}


TOY = ["--num_train_pairs=24", "--num_eval_pairs=8", "--workers=1", "--num_rec_scenes=4",
       "--config.demo.resolution=64", "--config.data.min_pixels=4096", "--config.data.max_pixels=4096",
       "--config.sft.steps=2", "--config.sft.batch_size=4", "--config.grpo.steps=2",
       "--config.grpo.prompts_per_batch=2", "--config.grpo.group_size=2", "--config.grpo.max_new_tokens=8",
       "--config.eval.batch_size=4", "--config.eval.max_new_tokens=8", "--config.eval.num_pairs=8",
       "--config.mesh.num_devices=1", "--config.data.allow_truncated_answers=True"]


def run_demo(workdir, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dig_jax.demo", f"--workdir={workdir}", *TOY, *extra]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _steps(metrics_file) -> list[int]:
    return [json.loads(line)["step"] for line in open(metrics_file) if line.strip()]


@pytest.mark.slow
def test_demo_writes_report(tmp_path):
    workdir = tmp_path / "demo"
    result = run_demo(workdir)
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

    # The uncertainty tables, from the per-pair lines of the two evaluations (dig_jax.eval.stats).
    held_out = report.split("## Held-out metrics")[1].split("Recall by difference kind")[0]
    change = report.split("## After GRPO minus after the warm-up (paired bootstrap)")[1].split("## ")[0]
    assert "| metric | after warm-up | after GRPO | difference | 95 % interval | excludes 0 | difference / SE |" in change
    files = {step: workdir / "run" / "eval" / f"step_{step}" for step in (2, 4)}
    for step, d in files.items():
        metrics = json.loads((d / "metrics.json").read_text())
        rows = stats.read_predictions(str(d / "predictions.jsonl"))
        assert len(rows) == 8 and sorted(r["seed"] for r in rows) == sorted(
            r["seed"] for r in stats.read_predictions(str(files[2] / "predictions.jsonl")))
        for key, (metric, num_gt) in WITH_SE.items():
            if key not in metrics:
                continue
            values = stats.per_pair(rows, metric, num_gt)  # the lines give the evaluator's own metric
            assert values.value == pytest.approx(metrics[key], abs=1e-9), (step, key)
            if len(values.num) >= 2:  # and the report shows it with its standard error
                _, se = stats.ratio_and_se(values.num, values.den)
                assert f"{metrics[key]:.3f} +- {se:.3f}" in held_out.split(f"| {key} |")[1].split("\n")[0], key
    for label, (metric, num_gt) in {"reward": ("reward", None), "f1": ("f1", None),
                                    "count_accuracy": ("count_correct", None)}.items():
        res = stats.bootstrap_files(str(files[2] / "predictions.jsonl"), str(files[4] / "predictions.jsonl"),
                                    metric, num_gt, seed=0)
        line = change.split(f"| {label} |")[1].split("\n")[0]
        assert f"| {res.difference:+.3f} | [{res.low:+.3f}, {res.high:+.3f}] | {'yes' if res.excludes_zero else 'no'} |" in line
    assert "| by_num_differences/1/f1 |" in change

    # Another GRPO seed from this warm-up: nothing rendered or trained again before GRPO, the same
    # warm-up evaluation, GRPO's iterations run and evaluated; the source workdir is left as it was.
    source_metrics = (workdir / "run" / "metrics.jsonl").read_text()
    other = tmp_path / "demo_seed1"
    result = run_demo(other, f"--warmup_from={workdir}", "--config.grpo.seed=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (other / "data" / "train").is_symlink() and "resumed from step 2 (grpo" in result.stdout
    assert _steps(other / "run" / "metrics.jsonl") == [1, 2, 3, 4]
    assert json.loads((other / "run" / "eval" / "step_2" / "metrics.json").read_text()) == \
        json.loads((files[2] / "metrics.json").read_text())
    assert (other / "run" / "eval" / "step_4" / "metrics.json").exists()
    assert (workdir / "run" / "metrics.jsonl").read_text() == source_metrics


def test_warmup_from_a_workdir_without_the_checkpoint_names_it(tmp_path):
    from dig_jax import demo

    (tmp_path / "src" / "run" / "checkpoints" / "5").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"src/run/checkpoints/7"):
        demo.adopt_warmup(str(tmp_path / "src"), str(tmp_path / "dst"), sft_steps=7)
    assert not (tmp_path / "dst").exists()  # nothing written before the check
