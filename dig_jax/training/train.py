"""The DiG training loop: supervised warm-up, then GRPO through the curriculum phases.

Reads top to bottom: set up the run, restore (or initialise) its state, loop over steps (enter the next
stage at its boundary, read a batch, update, log, evaluate every `eval.every` steps, checkpoint), close.
The state and its stages are `training.state`; the updates are `rl.sft` and `rl.grpo`.
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
from flax import nnx

from dig_jax import checkpointing, multihost, sharding
from dig_jax.eval import registry
from dig_jax.eval.run import in_training_evaluators
from dig_jax.generate.batch import answers, prompt_batch
from dig_jax.rl import grpo, rewards, sft
from dig_jax.training.metrics_log import MetricsLogger
from dig_jax.training.setup import Run, setup
from dig_jax.training.state import Stage, TrainState, data_iterator, enter_stage, restore_or_init, stage_of

PROGRESS_KEYS = ("sft/loss", "reward/mean", "reward/f1", "reward/iou", "grpo/kl")


def train(c: ml_collections.ConfigDict, workdir: str, reward_fn: rewards.RewardFn | None = None) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last logged metrics.

    `reward_fn` replaces the GRPO reward that `reward.fn` names (tests inject their own).
    """
    os.makedirs(workdir, exist_ok=True)
    run = setup(c, workdir, reward_fn)
    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every, keep=c.checkpoint.keep,
        use_async=c.checkpoint.use_async, keep_steps=(c.sft.steps,) if 0 < c.sft.steps < run.total_steps else ())
    logger = MetricsLogger(workdir, total_steps=run.total_steps)
    guard = checkpointing.PreemptionGuard()
    evaluators = in_training_evaluators(c, run.model_cfg, run.tokenizer, run.tok_path, run.mesh,
                                        run.builder.patches_per_image)
    state, stage = restore_or_init(run, ckpt)
    metrics: dict = {}

    with sharding.activate(run.mesh):
        while state.step < run.total_steps:
            if stage_of(c, state.step) != stage.name:  # SFT -> GRPO: fresh optimiser, reference and data
                state, stage = enter_stage(run, state, stage_of(c, state.step))
            batch = next(stage.data)  # this host's share: each host places only its own rows
            update = sft_update if stage.name == "sft" else grpo_update
            state, metrics, phase_name = update(run, stage, state, batch)
            if evaluators and state.step % c.eval.every == 0:
                model = nnx.merge(run.graphdef, state.params)
                metrics.update({f"eval/{k}": v for k, v in
                                registry.run_evaluators(evaluators, model, state.step, workdir).items()})
            logger.write(state.step, metrics, phase=phase_name)
            if state.step % c.log.every == 0 or state.step == run.total_steps:
                logger.progress(state.step, metrics, phase=phase_name, keys=PROGRESS_KEYS)
            stop = guard.requested or (jax.process_count() > 1 and multihost.preemption_sync(state.step))
            # Always save the end of the warm-up (kept for good: see the Checkpointer) and of the run.
            ckpt.save(state.step, state.checkpoint_items(), state.meta(), stage.data,
                      force=stop or state.step in (run.total_steps, c.sft.steps))
            if stop:
                print(f"preemption requested: saved step {state.step}, exiting", flush=True)
                break
    ckpt.close()
    logger.close()
    guard.restore_handlers()
    run.params = state.params
    return metrics


def sft_update(run: Run, stage: Stage, state: TrainState, batch: dict) -> tuple[TrainState, dict, str]:
    """One supervised step on `batch`."""
    c = run.config
    t_start = time.perf_counter()
    prompts = prompt_batch(run.model_cfg, batch, mesh=run.mesh, prompt_bucket=c.data.prompt_bucket,
                           process_local=True)
    targets = answers(batch, run.mesh, process_local=True)
    with jax.transfer_guard(c.log.transfer_guard):
        params, opt_state, out = sft.sft_step(run.graphdef, stage.tx, state.params, state.opt_state, prompts,
                                              targets, chunk=int(c.grpo.scoring_chunk))
    metrics = {f"sft/{k}": float(v) for k, v in jax.device_get(out).items()}
    metrics["time/step"] = time.perf_counter() - t_start
    return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics, "sft"


def grpo_update(run: Run, stage: Stage, state: TrainState, batch: dict) -> tuple[TrainState, dict, str]:
    """One GRPO iteration on `batch`; moves the curriculum on (and re-opens the data stream) when it says so."""
    rng, key = jax.random.split(state.rng)
    params, opt_state, metrics = grpo.grpo_iteration(run.grpo, stage.tx, state.params, state.opt_state,
                                                     state.reference, batch, key)
    phase_name = run.curriculum.phase(state.curriculum).name
    cur_state, moved = run.curriculum.update(state.curriculum, metrics["reward/mean"])
    metrics["curriculum/phase"] = cur_state.phase_index
    state = state.replace(params=params, opt_state=opt_state, rng=rng, step=state.step + 1, curriculum=cur_state)
    if moved:  # the next phase reads a different selection of pairs
        stage.data = data_iterator(run, state.stage, state.curriculum)
    return state, metrics, phase_name
