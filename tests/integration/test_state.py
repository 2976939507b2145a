"""The train state's two entries (`restore_or_init`, `enter_stage`), the injected GRPO reward and
`grpo.scale_by_std`, checked against a finished reference run and hand-computed advantages."""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax import checkpointing
from dig_jax.config_validation import ConfigError
from dig_jax.rl import grpo
from dig_jax.training import setup as training_setup
from dig_jax.training import state as training_state
from tests.integration import tiny_config
from tests.integration.conftest import single_device
from tests.integration.test_train_loop import final_params


def _flat(params) -> dict:
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(params)}


def _checkpointer(workdir: str) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=100, use_async=False)


def _restore(c, workdir: str):
    run = training_setup.setup(c, workdir)
    ckpt = _checkpointer(workdir)
    try:
        state, stage = training_state.restore_or_init(run, ckpt)
    finally:
        ckpt.close()
    return run, state, stage


def _adam_count(opt_state) -> int:
    counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(opt_state)
              if any(getattr(p, "name", None) == "count" for p in path)]
    assert counts, "the optimiser state has no step count"
    return max(counts)


@pytest.mark.slow
def test_an_empty_workdir_starts_the_warmup_from_the_initial_parameters(train_files, tmp_path):
    c = single_device(tiny_config.get_config(train_files))
    run, state, stage = _restore(c, str(tmp_path))
    assert (state.step, state.stage, stage.name) == (0, "sft", "sft")
    assert state.curriculum == run.curriculum.initial_state()
    assert state.reference is None  # no KL reference during the warm-up
    assert _adam_count(state.opt_state) == 0
    want, got = _flat(run.params), _flat(state.params)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


@pytest.mark.slow
def test_a_finished_run_restores_its_last_grpo_state(single_run, train_files):
    c = single_device(tiny_config.get_config(train_files))
    total = c.sft.steps + c.grpo.steps
    _, state, stage = _restore(c, single_run.workdir)
    assert (state.step, state.stage, stage.name) == (total, "grpo", "grpo")
    assert state.curriculum.phase_index == 1  # the one-step first phase has ended
    assert state.reference is not None and _adam_count(state.opt_state) == c.grpo.steps
    want, got = final_params(single_run), _flat(state.params)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=0, atol=0, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("reference_dtype", ["float32", "bfloat16"])
def test_the_last_warmup_checkpoint_enters_grpo_with_a_fresh_optimiser_and_reference(single_run, train_files,
                                                                                     tmp_path, reference_dtype):
    c = single_device(tiny_config.get_config(train_files))
    c.grpo.reference_dtype = reference_dtype
    workdir = str(tmp_path)
    shutil.copytree(os.path.join(single_run.workdir, "checkpoints", str(c.sft.steps)),
                    os.path.join(workdir, "checkpoints", str(c.sft.steps)))
    _, state, stage = _restore(c, workdir)
    assert (state.step, state.stage, stage.name) == (c.sft.steps, "grpo", "grpo")
    assert _adam_count(state.opt_state) == 0  # the warm-up's moments are not carried into GRPO
    params, reference = _flat(state.params), _flat(state.reference)
    for path in params:  # the KL reference is the policy as GRPO starts, stored in grpo.reference_dtype
        assert reference[path].dtype == np.dtype(jnp.dtype(reference_dtype)), path
        np.testing.assert_array_equal(reference[path], params[path].astype(reference[path].dtype), err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_rollout_uses_the_injected_reward_and_the_configured_advantages(train_files, tmp_path, scale_by_std):
    c = single_device(tiny_config.get_config(train_files))
    c.grpo.scale_by_std = scale_by_std
    seen = []

    def reward_fn(texts, batch, group_size):  # sample i of N gets reward i**2 / N**2: distinct within groups
        seen.append((len(texts), group_size, np.asarray(batch["num_differences"]).shape))
        n = len(texts)
        return {"reward": (np.arange(n, dtype=np.float32) ** 2) / n ** 2}

    run = training_setup.setup(c, str(tmp_path), reward_fn=reward_fn)
    assert run.grpo.loss.scale_by_std is scale_by_std
    batch = next(training_state.data_iterator(run, "grpo", run.curriculum.initial_state()))
    g = c.grpo.group_size
    ro = grpo.rollout(nnx.merge(run.graphdef, run.params), batch, cfg=run.model_cfg, tokenizer=run.tokenizer,
                      sampling_config=run.grpo.sampling, group_size=g, reward_fn=run.grpo.reward_fn,
                      rng=jax.random.key(0), mesh=run.mesh, prompt_bucket=c.data.prompt_bucket, loss_config=run.grpo.loss)
    n = c.grpo.prompts_per_batch * g
    assert seen == [(n, g, (c.grpo.prompts_per_batch,))]
    rewards = (np.arange(n) ** 2 / n ** 2).reshape(-1, g)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    want = centred / (rewards.std(axis=1, ddof=1, keepdims=True) + 1e-6) if scale_by_std else centred
    np.testing.assert_allclose(ro.advantages, want.reshape(-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ro.scores["reward"], rewards.reshape(-1), rtol=1e-6)


def test_an_unknown_reward_function_names_the_field(train_files, tmp_path):
    c = single_device(tiny_config.get_config(train_files))
    c.reward.fn = "no_such_reward"
    with pytest.raises((ConfigError, ValueError), match=r"config\.reward\.fn"):
        training_setup.setup(c, str(tmp_path))
