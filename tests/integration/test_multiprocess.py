"""Two CPU processes stand in for a two-host pod: `dig_jax.main` on each, joined by jax.distributed.

What a pod needs beyond one process, checked here: every host reads its own share of the data and the
host-side steps (decoding samples, scoring) see the global batch; checkpoints are written jointly; and
evaluation stays in step when the hosts' shares of the held-out pairs differ in size (9 pairs over 2
processes at 2 per process per batch: 4 and 5 pairs, so the first runs out a round early). The
evaluation of one checkpoint by two processes must equal its evaluation by one process on a mesh of the
same shape, pair by pair.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import datagen
from data_pipeline.generate import generate_dataset
from tests.integration import tiny_config
from tests.integration.conftest import REPO, read_metrics

# Four devices in all, data-parallel: two per process, or four in one process for the reference.
MESH = ["--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]
EVAL = ["--config.eval.batch_size=4", "--config.eval.num_pairs=100", "--config.eval.max_new_tokens=12"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _command(train_files: str, workdir: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "dig_jax.main", f"--config={REPO}/tests/integration/tiny_config.py:{train_files}",
            f"--workdir={workdir}", "--config.grpo.steps=1", *MESH, *args]


def _run_processes(cmd: list[str], num_processes: int = 2, devices_each: int = 2) -> list[str]:
    """Runs `cmd` as `num_processes` jax.distributed processes; returns their stdouts."""
    port = _free_port()
    procs = []
    for i in range(num_processes):
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def _run_one_process(cmd: list[str], devices: int = 4) -> str:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def _predictions(workdir: str, step: int) -> tuple[dict, dict]:
    eval_dir = os.path.join(workdir, "eval", f"step_{step}")
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        by_seed = {line["seed"]: line for line in map(json.loads, f)}
    return metrics, by_seed


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_evaluate_like_one(train_files, tmp_path):
    eval_dir = str(tmp_path / "eval_data")
    config = datagen.get_config(str(tiny_config.RESOLUTION))
    config.num_differences_min, config.num_differences_max = 1, 2
    generate_dataset(eval_dir, 9, seed=11, workers=1, config=config, num_shards=1, progress=False)
    eval_files = os.path.join(eval_dir, "*.array_record")

    # ---- train on two processes: 2 SFT steps + 1 GRPO iteration, checkpoint every step -------------
    workdir = str(tmp_path / "run")
    _run_processes(_command(train_files, workdir))
    assert [m["phase"] for m in read_metrics(workdir)] == ["sft", "sft", "one"]  # one log, not one per host
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))

    # ---- evaluate step 3 on two processes (unequal shares), then on one process ----------------------
    _run_processes(_command(train_files, workdir, "--mode=eval", f"--config.data.eval_files={eval_files}", *EVAL))
    two_metrics, two = _predictions(workdir, 3)
    os.rename(os.path.join(workdir, "eval"), os.path.join(workdir, "eval_two_processes"))
    out = _run_one_process(_command(train_files, workdir, "--mode=eval", f"--config.data.eval_files={eval_files}",
                                    *EVAL))
    assert "evaluation of step 3 on 9 pairs" in out
    one_metrics, one = _predictions(workdir, 3)

    assert sorted(two) == sorted(one) and len(one) == 9  # every pair once, none twice, no padding rows
    for seed, line in one.items():
        assert two[seed]["answer"] == line["answer"], seed
    assert two_metrics == pytest.approx(one_metrics)
