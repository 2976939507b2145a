"""No implicit host <-> device transfer inside the steps, once their inputs are placed.

Inputs are placed explicitly (prompt_batch / answers / device_put); generation, scoring and the SFT
step then run under `jax.transfer_guard("disallow")`, which raises on any implicit transfer: a numpy
array or Python value turned into a device array behind our back, or a device value read on the host
(`float(x)`, `np.asarray(x)`) inside the step. Such transfers serialise the host and the devices and,
on a pod, can move data between hosts (big_vision guards its train loop the same way).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dig_jax import sharding
from dig_jax.generate import batch as prompting
from dig_jax.generate import sampler, scoring
from dig_jax.models import config as C
from dig_jax.models.vlm import QwenVL
from dig_jax.rl import sft
from tests.test_multihost_placement import dig_batch


def _tiny_cfg():
    cfg = C.qwen2_5_vl_tiny(1024)
    return dataclasses.replace(cfg, image_token_id=1000, video_token_id=1001, vision_start_token_id=1002,
                               vision_end_token_id=1003, eos_token_id=1004, pad_token_id=1005)


def test_generate_score_and_sft_step_make_no_implicit_transfer():
    cfg = _tiny_cfg()
    mesh = sharding.make_mesh((2, 2, 2))
    model = sharding.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh)
    batch = dig_batch(cfg, 4)
    sampling = sampler.SamplingConfig(max_new_tokens=4, temperature=1.0, eos_token_ids=(cfg.eos_token_id,),
                                      pad_token_id=cfg.pad_token_id)
    graphdef, params = nnx.split(model)
    del model
    tx = optax.adamw(1e-3)
    with sharding.activate(mesh):
        # Explicit placement, outside the guard.
        prompts = prompting.prompt_batch(cfg, batch, group_size=2, mesh=mesh, prompt_bucket=16)
        targets = prompting.answers(batch, mesh)
        sft_prompts = prompting.prompt_batch(cfg, batch, mesh=mesh, prompt_bucket=16)
        rng = jax.device_put(jax.random.key(0), NamedSharding(mesh, PartitionSpec()))
        opt_state = jax.jit(lambda p: sharding.pin_shardings(tx.init(p)))(params)  # as training.state does
        for _ in range(2):  # the first call compiles, the second is the steady state
            model = nnx.merge(graphdef, params)  # sft_step donates the previous parameters
            with jax.transfer_guard("disallow"):
                gen = sampler.generate(model, prompts, rng, sampling)
                logp, _ = scoring.score_completions_jit(model, prompts, gen.tokens, gen.completion_mask, chunk=8)
                params, opt_state, metrics = sft.sft_step(graphdef, tx, params, opt_state, sft_prompts, targets,
                                                          chunk=8)
                jax.block_until_ready((gen, logp, params, metrics))
    assert np.isfinite(jax.device_get(metrics["loss"]))
    assert jax.device_get(logp).shape == (8, 4)
