"""The sampling layout: a GRPO iteration that decodes on it equals one that decodes on the training mesh,
the policy is copied into it once per iteration, and its decode moves no parameters.

Oracle: the same iteration (same parameters, batch and key) with `sampling_layout=None`, which samples on
the FSDP training mesh (itself tested against a single device in test_train_loop); and, for the
collectives, the training mesh's own generation program, which must all-gather parameters (else the
check could not fail).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from dig_jax import assemble, sharding
from dig_jax.aot import analysis
from dig_jax.generate import sampler, sampling_layout
from dig_jax.generate.batch import prompt_batch
from dig_jax.generate.sampling_layout import RESHARD_CALLS, SamplingLayout
from dig_jax.rl import grpo
from dig_jax.training import setup as training_setup
from dig_jax.training import state as training_state
from tests.integration.conftest import textual_reward


@pytest.fixture(scope="module")
def grpo_run(train_files, tmp_path_factory):
    """The tiny run on its data=2 x fsdp=2 x tensor=2 training mesh, a GRPO batch of 4 prompts x G=2, and
    the optimiser; the textual reward gives the groups' samples different advantages."""
    from tests.integration import tiny_config

    c = tiny_config.get_config(train_files)
    run = training_setup.setup(c, str(tmp_path_factory.mktemp("sampling_layout")))
    real = run.grpo.reward_fn

    def reward_fn(texts, batch, group_size):
        scores = real(texts, batch, group_size)
        scores["reward"] = scores["reward"] + textual_reward(texts)
        return scores

    run.grpo = dataclasses.replace(run.grpo, reward_fn=reward_fn)
    batch = next(training_state.data_iterator(run, "grpo", run.curriculum.initial_state()))
    tx = training_state.optimizer_for(c, "grpo", run.params)
    return run, batch, tx


def _iteration(run, batch, tx, layout, key):
    """One GRPO iteration from the run's initial parameters; returns (rollout texts, params, metrics)."""
    setup = dataclasses.replace(run.grpo, sampling_layout=layout)
    params = jax.tree.map(lambda x: x.copy(), run.params)  # the update donates its state
    opt_state = training_state.init_optimizer_state(tx, params, run.mesh)
    reference = training_state.fresh_reference(run.config, "grpo", params)
    with sharding.activate(run.mesh):
        params, _, metrics = grpo.grpo_iteration(setup, tx, params, opt_state, reference, batch, key)
    return jax.device_get(params), metrics


def test_auto_picks_tensor_groups_of_the_kv_heads_over_the_data_axis(grpo_run):
    run, _, _ = grpo_run
    layout = run.grpo.sampling_layout
    assert layout is not None, "auto must choose a sampling layout for the fsdp=2 training mesh"
    # 8 devices on one host, 2 KV heads: tensor groups of 2, rows over a data axis of 4.
    assert dict(layout.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert list(layout.mesh.devices.flat) == list(run.mesh.devices.flat)


@pytest.mark.parametrize("tensor", [2, 1], ids=["tensor2", "replicated"])
def test_an_iteration_on_the_sampling_layout_equals_one_on_the_training_mesh(grpo_run, tensor):
    run, batch, tx = grpo_run
    key = jax.random.key(11)
    layout = SamplingLayout.over(list(run.mesh.devices.flat), tensor, assemble.DTYPES[run.config.model.dtype])
    base_params, base = _iteration(run, batch, tx, None, key)
    calls = RESHARD_CALLS["policy"]
    laid_params, laid = _iteration(run, batch, tx, layout, key)
    assert RESHARD_CALLS["policy"] - calls == 1  # one copy of the policy per iteration
    assert layout.reshard_fn(run.params) is layout.reshard_fn(run.params)  # the same jitted copy every iteration
    assert laid["time/reshard"] >= 0 and "time/reshard" not in base

    # Same RNG, same weights: the same sampled answers (hence the same rewards), then the same update.
    for k in ("reward/mean", "reward/std", "grpo/response_length", "grpo/scored_length"):
        assert laid[k] == base[k], k
    for k in ("grpo/loss", "grpo/kl", "grpo/grad_norm", "grpo/ratio_mean"):
        np.testing.assert_allclose(laid[k], base[k], rtol=1e-5, atol=1e-7, err_msg=k)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(laid_params),
                                 jax.tree_util.tree_leaves_with_path(base_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_sampled_tokens_are_the_same_and_come_back_in_the_training_layout(grpo_run):
    run, batch, _ = grpo_run
    layout = run.grpo.sampling_layout
    key = jax.random.key(5)
    common = dict(cfg=run.model_cfg, tokenizer=run.tokenizer, sampling_config=run.grpo.sampling,
                  group_size=run.grpo.group_size, reward_fn=run.grpo.reward_fn, rng=key, mesh=run.mesh,
                  prompt_bucket=run.grpo.prompt_bucket)
    with sharding.activate(run.mesh):
        base = grpo.rollout(nnx.merge(run.graphdef, run.params), batch, **common)
        laid = grpo.rollout(nnx.merge(run.graphdef, layout.policy(run.params)), batch, layout=layout, **common)
    np.testing.assert_array_equal(np.asarray(laid.completions.tokens), np.asarray(base.completions.tokens))
    np.testing.assert_array_equal(np.asarray(laid.completions.mask), np.asarray(base.completions.mask))
    np.testing.assert_allclose(np.asarray(laid.old_logp), np.asarray(base.old_logp), rtol=1e-5, atol=1e-6)
    assert laid.texts == base.texts
    for name, a, b in [("tokens", laid.completions.tokens, base.completions.tokens),
                       ("mask", laid.completions.mask, base.completions.mask), ("old_logp", laid.old_logp, base.old_logp),
                       ("prompts", laid.prompts.input_ids, base.prompts.input_ids)]:
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), name


# ----------------------------------------------------------------------------------------------------
# No parameter crosses the chips while decoding on the sampling layout
# ----------------------------------------------------------------------------------------------------

def _smallest_matrix_shard_bytes(params, mesh) -> int:
    """Bytes per chip of the smallest per-layer weight matrix of the decoder, as sharded on `mesh`."""
    sizes = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if "language_model" in jax.tree_util.keystr(path) and x.ndim == 3:  # stacked [layers, in, out]
            sizes.append(x[0].size * x.dtype.itemsize // math.prod(
                mesh.shape[a] for a in jax.tree.leaves(tuple(x.sharding.spec)) if a))
    return min(sizes)


def _generation_hlo(run, batch, mesh, params) -> str:
    prompts = prompt_batch(run.model_cfg, batch, group_size=run.grpo.group_size, mesh=mesh,
                           prompt_bucket=run.grpo.prompt_bucket)
    key = jax.device_put(jax.random.key_data(jax.random.key(0)), jax.sharding.NamedSharding(mesh,
                                                                                         jax.sharding.PartitionSpec()))
    fn = jax.jit(lambda p, b, k: sampler.generate(nnx.merge(run.graphdef, p), b, jax.random.wrap_key_data(k),
                                                  run.grpo.sampling))
    with sharding.activate(mesh):
        return fn.lower(params, prompts, key).compile().as_text()


def test_decoding_on_the_sampling_layout_all_gathers_no_parameter(grpo_run):
    """Read from the compiled generation with the plan's own HLO reader: per decode step (the loop of
    unknown trip count), the training mesh all-gathers at least a weight shard's bytes; the sampling
    layout gathers less than the smallest one (a few bytes of per-row scalars), so no parameter."""
    run, batch, _ = grpo_run
    layout = run.grpo.sampling_layout
    smallest = _smallest_matrix_shard_bytes(run.params, run.mesh)

    def gathered_per_step(mesh, params):
        per_step = analysis.collective_bytes(_generation_hlo(run, batch, mesh, params), num_devices=8)
        return per_step.per_unknown_iteration.get("all-gather", 0)

    on_training = gathered_per_step(run.mesh, run.params)
    assert on_training >= smallest, "the FSDP training mesh gathers its weights to decode (so the check can fail)"
    on_layout = gathered_per_step(layout.mesh, layout.policy(run.params))
    assert on_layout < smallest, f"{on_layout} bytes all-gathered per decode step on the sampling layout"


# ----------------------------------------------------------------------------------------------------
# Choosing and checking a layout
# ----------------------------------------------------------------------------------------------------

def test_parse():
    assert sampling_layout.parse("auto") == "auto" and sampling_layout.parse("training") == "training"
    assert sampling_layout.parse("tensor=4") == 4
    for bad in ("tensor=0", "tp=4", "4", ""):
        with pytest.raises(ValueError, match="not 'auto', 'training' or 'tensor=N'"):
            sampling_layout.parse(bad)


def test_auto_stays_within_a_host_divides_the_kv_heads_and_fits():
    choose = lambda **kw: sampling_layout.choose_tensor(**{  # noqa: E731
        "num_devices": 32, "devices_per_process": 4, "num_processes": 8, "rows": 256, "kv_heads": 8,
        "weight_bytes": 16 * 2 ** 30, "hbm_bytes": 95 * 2 ** 30, **kw})
    assert choose() == 4  # the whole host
    assert choose(kv_heads=2) == 2  # whole KV heads per chip
    assert choose(rows=16) == 4 and choose(rows=4) is None  # no group leaves a data axis dividing 4 rows
    assert choose(hbm_bytes=8 * 2 ** 30) == 4  # 4 GiB per chip within half of 8 GiB
    assert choose(hbm_bytes=6 * 2 ** 30) is None  # 4 GiB > 3 GiB, and a group cannot span hosts
    assert choose(hbm_bytes=None) == 4  # no stated limit (CPU): the host's group
    # One host of 8 chips, 2 KV heads: whole heads allow tensor=2 (8 GiB per chip), which does not fit in
    # half of 12 GiB, so the smallest group that does: 4 (4 GiB; the cache's heads split unevenly).
    one_host = dict(num_devices=8, devices_per_process=8, num_processes=1, rows=16, kv_heads=2)
    assert choose(**one_host, hbm_bytes=None) == 2
    assert choose(**one_host, hbm_bytes=12 * 2 ** 30) == 4


def test_an_impossible_tensor_group_is_refused_with_its_reason():
    problem = lambda t, **kw: sampling_layout.tensor_problem(t, **{  # noqa: E731
        "num_devices": 8, "devices_per_process": 4, "num_processes": 2, "rows": 8, **kw})
    assert problem(2) is None
    assert "does not divide the 8 devices" in problem(3)
    assert "does not divide the rollout's 6 rows" in problem(1, rows=6)
    assert "within one host" in problem(8)
