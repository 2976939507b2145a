"""Kill-and-resume equals the uninterrupted run; SIGTERM leaves a restorable checkpoint; a missing
checkpoint is an error naming the directory.

The uninterrupted reference is conftest's one-device run (2 SFT + 2 GRPO steps). The interrupted run
is stopped by the trainer's own preemption path (the guard reports a request after the first GRPO
step, so the checkpoint holds optimiser moments, the GRPO reference, the RNG key, the curriculum
state and a data-iterator position), then restarted from scratch in the same workdir.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax import assemble
from dig_jax import checkpointing
from dig_jax.training import train
from tests.integration import tiny_config
from tests.integration.conftest import (
    REPO,
    read_metrics,
    run_training,
    single_device,
    textual_reward_recorder,
)
from tests.integration.test_train_loop import final_params


class StopAfter(checkpointing.PreemptionGuard):
    """A preemption guard that reports a request at the `n`-th poll (the loop polls once per step)."""

    def __init__(self, n: int):
        super().__init__(signals=())
        self._polls_left = n

    @property
    def requested(self) -> bool:
        self._polls_left -= 1
        return self._polls_left <= 0


def assert_same_metrics_and_params(resumed, reference) -> None:
    """Every logged number (timings aside) and the final parameters of `resumed` equal `reference`'s."""
    for got, want in zip(resumed.metrics, reference.metrics):
        assert got["phase"] == want["phase"]
        for key, value in want.items():
            if key != "phase" and not key.startswith("time"):
                np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=f"step {want['step']} {key}")
    want, got = final_params(reference), final_params(resumed)
    for path, value in want.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(single_run, train_files, tmp_path, monkeypatch):
    c = single_device(tiny_config.get_config(train_files))
    workdir = str(tmp_path / "interrupted")
    recorded = textual_reward_recorder()
    # Interrupted after step 3 = the first GRPO iteration.
    with monkeypatch.context() as mp:
        mp.setattr(train.checkpointing, "PreemptionGuard", lambda: StopAfter(3))
        run_training(c, workdir, recorded)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=100, use_async=False)
    assert ckpt.all_steps() == [1, 2, 3]
    ckpt.close()
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3]

    # Restarted: the loop resumes from step 3 and does step 4.
    resumed = run_training(c, workdir, recorded)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    # The same samples in the GRPO step after the restart (same RNG key, same prompts) ...
    assert recorded.texts == single_run.recorded.texts
    assert recorded.num_differences == single_run.recorded.num_differences
    # ... every logged number (timings aside) and the same final parameters.
    assert_same_metrics_and_params(resumed, single_run)


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return f.read().count("\n")


@pytest.mark.slow
def test_sigterm_leaves_a_restorable_checkpoint_and_a_rerun_finishes(train_files, tmp_path):
    steps = 40
    workdir = str(tmp_path / "preempted")
    # No periodic checkpoint before the end (orbax writes the very first step regardless): a later
    # checkpoint can only come from the SIGTERM.
    overrides = {"mesh.num_devices": 1, "mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1, "sft.steps": steps,
                 "grpo.steps": 0, "checkpoint.every": 1000, "log.every": 1000}
    cmd = [sys.executable, "-m", "dig_jax.main", f"--config={REPO}/tests/integration/tiny_config.py:{train_files}",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    try:
        deadline = time.time() + 240
        while _lines(metrics_path) < 2:  # two steps done
            assert proc.poll() is None, f"training exited early:\n{proc.stdout.read()[-3000:]}"
            assert time.time() < deadline, "no training step was logged in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "preemption requested: saved step" in out, out[-3000:]

    c = tiny_config.get_config(train_files)
    for k, v in overrides.items():
        section, name = k.split(".")
        c[section][name] = v
    tok = assemble.load_run_tokenizer(c, assemble.tokenizer_path(c, workdir, assemble.model_family(c)))
    _, saved = assemble.restore_model(c, workdir, assemble.model_config_from(c, tok), assemble.make_mesh(c))
    logged = [m["step"] for m in read_metrics(workdir)]
    # A checkpoint off the save interval, at the step the loop stopped: the preemption path wrote it.
    assert 2 <= saved < steps and logged == list(range(1, saved + 1))

    train.train(c, workdir)  # the rerun picks up at `saved` and finishes the job
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, steps + 1))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=100, use_async=False)
    assert ckpt.all_steps()[-2:] == [saved, steps]
    ckpt.close()


def test_the_warmup_checkpoint_outlives_the_newest_k(tmp_path):
    """Only the newest `keep` checkpoints stay, plus `keep_steps` (the end of the warm-up) for good."""
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, save_every=1, keep=2, use_async=False, keep_steps=(3,))
    for step in range(1, 9):
        ckpt.save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step})
    assert ckpt.all_steps() == [3, 7, 8]
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"params": {"w": jax.ShapeDtypeStruct((2,), jnp.float32, sharding=one_device)}}
    restored, _ = ckpt.restore(abstract, step=3)
    np.testing.assert_array_equal(restored["params"]["w"], [3.0, 3.0])
    ckpt.close()
    with pytest.raises(ValueError, match="keep must be positive"):
        checkpointing.Checkpointer(directory, save_every=1, keep=0)


def test_missing_checkpoint_names_the_directory(tmp_path, config):
    directory = str(tmp_path / "checkpoints")
    ckpt = checkpointing.Checkpointer(directory, save_every=1, keep=1, use_async=False)
    with pytest.raises(checkpointing.MissingCheckpointError, match=directory):
        ckpt.restore({"params": {}})
    with pytest.raises(checkpointing.MissingCheckpointError, match=f"step 7 in {directory}"):
        ckpt.read_meta(7)
    ckpt.close()
    # Through the public restore used by eval / export.
    c = single_device(config)
    tok = assemble.load_run_tokenizer(c, assemble.tokenizer_path(c, str(tmp_path), assemble.model_family(c)))
    with pytest.raises(checkpointing.MissingCheckpointError, match=directory):
        assemble.restore_model(c, str(tmp_path), assemble.model_config_from(c, tok), assemble.make_mesh(c), step=3)


@pytest.mark.slow
def test_resume_at_the_warmup_grpo_boundary_equals_uninterrupted(single_run, train_files, tmp_path, monkeypatch):
    """Stopped right after the last warm-up step, whose checkpoint holds the warm-up's optimiser and data
    stream: the restart must begin GRPO exactly as the uninterrupted run did."""
    c = single_device(tiny_config.get_config(train_files))
    workdir = str(tmp_path / "boundary")
    recorded = textual_reward_recorder()
    with monkeypatch.context() as mp:
        mp.setattr(train.checkpointing, "PreemptionGuard", lambda: StopAfter(c.sft.steps))
        run_training(c, workdir, recorded)
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, c.sft.steps + 1))
    resumed = run_training(c, workdir, recorded)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    assert recorded.texts == single_run.recorded.texts
    assert_same_metrics_and_params(resumed, single_run)


@pytest.mark.slow
def test_a_grpo_seed_gives_an_independent_grpo_stage_that_still_resumes_exactly(single_run, train_files, tmp_path,
                                                                               monkeypatch):
    """`grpo.seed` changes GRPO's samples (not the warm-up's), and a run stopped at the warm-up/GRPO
    boundary and restarted with it equals the uninterrupted run with it: GRPO runs resumed from one
    warm-up checkpoint are then independent seeds of the GRPO stage."""
    c = single_device(tiny_config.get_config(train_files))
    c.grpo.seed = 1
    uninterrupted = run_training(c, str(tmp_path / "whole"), textual_reward_recorder())
    sft = c.sft.steps
    # The warm-up is untouched by grpo.seed; GRPO samples other answers.
    for got, want in zip(uninterrupted.metrics[:sft], single_run.metrics[:sft]):
        assert {k: v for k, v in got.items() if not k.startswith(("time", "phase"))} == \
            pytest.approx({k: v for k, v in want.items() if not k.startswith(("time", "phase"))}, rel=1e-6)
    assert uninterrupted.recorded.texts != single_run.recorded.texts

    workdir = str(tmp_path / "boundary")
    with monkeypatch.context() as mp:
        mp.setattr(train.checkpointing, "PreemptionGuard", lambda: StopAfter(sft))
        run_training(c, workdir, textual_reward_recorder())
    resumed = run_training(c, workdir, textual_reward_recorder())
    assert resumed.recorded.texts == uninterrupted.recorded.texts
    assert_same_metrics_and_params(resumed, uninterrupted)
