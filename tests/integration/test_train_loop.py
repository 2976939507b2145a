"""The training loop: sharded equals single-device, every step compiles once, the curriculum moves on,
and the supervised loss counts exactly the answer tokens.

The two reference runs (conftest: 2 SFT + 2 GRPO steps, on 1 device and on a 2x2x2 mesh of 8) are
compared step by step (losses, sampled texts, rewards) and by their final checkpointed parameters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax import assemble
from dig_jax.generate import batch as prompting
from dig_jax.rl import sft
from dig_jax.training import setup as training_setup
from dig_jax.training import state as training_state
from dig_jax.training import train
from tests.integration.conftest import single_device


def final_params(run) -> dict:
    """The newest checkpoint's parameters of a run, restored onto one device, as a flat numpy dict."""
    c = single_device(run.config.copy_and_resolve_references())
    tok = assemble.load_run_tokenizer(c, assemble.tokenizer_path(c, run.workdir, assemble.model_family(c)))
    cfg = assemble.model_config_from(c, tok)
    model, step = assemble.restore_model(c, run.workdir, cfg, assemble.make_mesh(c))
    assert step == c.sft.steps + c.grpo.steps
    return {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def by_step(run, key):
    return [m[key] for m in run.metrics if key in m]


@pytest.mark.slow
def test_sharded_run_equals_single_device(single_run, sharded_run):
    # Supervised steps: the same batches, the same losses.
    np.testing.assert_allclose(by_step(sharded_run, "sft/loss"), by_step(single_run, "sft/loss"), rtol=1e-5)
    assert len(by_step(single_run, "sft/loss")) == 2
    # GRPO: the same key gives the same samples (the sampler's logits agree far below a token flip) ...
    assert sharded_run.recorded.texts == single_run.recorded.texts
    assert len(single_run.recorded.texts) == 2
    # ... hence the same rewards and advantages, and the same update.
    for key in ("reward/mean", "reward/std", "grpo/response_length"):
        np.testing.assert_allclose(by_step(sharded_run, key), by_step(single_run, key), rtol=1e-6, err_msg=key)
    assert min(by_step(single_run, "reward/std")) > 0, "the test reward must give the groups' samples different rewards"
    for key in ("grpo/loss", "grpo/kl", "grpo/entropy", "grpo/grad_norm"):
        np.testing.assert_allclose(by_step(sharded_run, key), by_step(single_run, key), rtol=1e-4, atol=1e-7,
                                   err_msg=key)
    # The final parameters, restored from each run's checkpoint onto one device.
    single, sharded = final_params(single_run), final_params(sharded_run)
    assert single.keys() == sharded.keys()
    initial = training_setup.setup(single_device(single_run.config.copy_and_resolve_references()), single_run.workdir).params
    moved = 0
    for (path, v), init in zip(sorted(single.items()), sorted(
            ("/".join(map(str, k)), np.asarray(v.get_value())) for k, v in nnx.to_flat_state(initial))):
        assert path == init[0]
        np.testing.assert_allclose(sharded[path], v, rtol=1e-4, atol=1e-6, err_msg=path)
        moved += not np.array_equal(v, init[1])
    assert moved == len(single), f"only {moved} of {len(single)} parameters changed during training"


@pytest.mark.slow
def test_each_step_traces_and_compiles_once(sharded_run):
    # 2 SFT steps, 2 GRPO iterations (each: a reference scoring and one policy update), across a
    # curriculum phase change: one trace and one executable per jitted step.
    assert sharded_run.trace_deltas == {"sft_step": 1, "grpo_step": 1, "reference_logprobs": 1}
    assert sharded_run.compile_deltas == {"sft_step": 1, "grpo_step": 1, "reference_logprobs": 1}


@pytest.mark.slow
def test_curriculum_phase_and_data_selection_change(sharded_run):
    phases = [m["phase"] for m in sharded_run.metrics]
    assert phases == ["sft", "sft", "one", "two"]
    assert by_step(sharded_run, "curriculum/phase") == [1, 1]  # after GRPO step 1 the state is in phase 1
    # Phase "one" reads only one-difference pairs, phase "two" only two-difference pairs.
    assert sharded_run.recorded.num_differences == [[1, 1, 1, 1], [2, 2, 2, 2]]


def test_sft_loss_counts_exactly_the_answer_tokens(config, tmp_path):
    """sft.sft_objective against a plain full forward pass: -mean log p(answer token) over the answer mask;
    tokens past the mask do not change it, a token inside the mask does."""
    c = single_device(config)
    run = training_setup.setup(c, str(tmp_path))
    batch = next(training_state.data_iterator(run, "sft", run.curriculum.initial_state()))
    prompts = prompting.prompt_batch(run.model_cfg, batch, mesh=run.mesh, prompt_bucket=c.data.prompt_bucket)
    answers = prompting.answers(batch, run.mesh)
    loss_fn = jax.jit(sft.sft_objective, static_argnums=(0, 4))
    loss, aux = loss_fn(run.graphdef, run.params, prompts, answers, 16)

    # Independent: each row's real prompt tokens then its answer tokens, left padded, one forward pass.
    tokens, mask = np.asarray(batch["answer_ids"]), np.asarray(batch["answer_mask"])
    assert (mask == 0).any() and mask.sum() > 0, "the batch must have padding after some answers"
    rows = [np.concatenate([p[m == 1], a]) for p, m, a in zip(batch["prompt_ids"], batch["prompt_mask"], tokens)]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    attn = np.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, length - len(row):] = row
        attn[r, length - len(row):] = np.concatenate([np.ones(len(row) - tokens.shape[1]), mask[r]])
    model = nnx.merge(run.graphdef, run.params)
    grids = batch["image_grid_thw"].reshape(-1, 3)
    pixels = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
    assert pixels.shape[0] == np.prod(grids, axis=1).sum(), "64 px images: no patch padding expected"
    logp = np.asarray(jax.nn.log_softmax(model(ids, pixels, grids, attn).astype(jnp.float32), axis=-1))
    t = tokens.shape[1]
    nll = [-logp[r, length - t - 1 + j, tokens[r, j]] for r in range(len(rows)) for j in range(t) if mask[r, j]]
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=2e-5)
    assert float(aux["answer_tokens"]) == mask.sum()

    # Garbage after the end of each answer: the loss is unchanged (bit for bit).
    garbage = np.where(mask == 1, tokens, (tokens + 7) % run.model_cfg.text.vocab_size)
    loss_garbage, _ = loss_fn(run.graphdef, run.params, prompts, prompting.answers(
        {"answer_ids": garbage, "answer_mask": mask}, run.mesh), 16)
    assert float(loss_garbage) == float(loss)
    # A changed answer token inside the mask does change it (the check above can fail).
    r, j = np.argwhere(mask == 1)[0]
    changed = tokens.copy()
    changed[r, j] = (changed[r, j] + 1) % run.model_cfg.text.vocab_size
    loss_changed, _ = loss_fn(run.graphdef, run.params, prompts, prompting.answers(
        {"answer_ids": changed, "answer_mask": mask}, run.mesh), 16)
    assert float(loss_changed) != float(loss)
