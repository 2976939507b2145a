"""The DiG training loop: supervised warm-up, then GRPO through the curriculum phases.

Global step s counts optimiser updates of both stages: steps [0, sft.steps) are supervised, steps
[sft.steps, sft.steps + grpo.steps) are GRPO iterations (one rollout batch each, `grpo.num_minibatches`
updates inside). A checkpoint at step s holds everything needed to continue exactly: parameters,
optimiser state, RNG key, curriculum state, and the position of the data iterator that was being read.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dig_jax import builders, checkpointing, grpo, rewards, rollout, sampling, sharding, steps
from dig_jax.config_validation import validate
from dig_jax.curriculum import Curriculum, CurriculumState
from dig_jax.metrics_log import MetricsLogger
from dig_jax.optim import make_optimizer


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    workdir: str
    model_cfg: object
    mesh: jax.sharding.Mesh
    graphdef: object
    params: object
    tokenizer: object
    builder: object  # GRPO prompts (answers sized for data.max_boxes)
    sft_builder: object  # warm-up examples (answers sized for max(sft.num_differences))
    curriculum: Curriculum


# ======================================================================================================
# Setup
# ======================================================================================================

def setup(c: ml_collections.ConfigDict, workdir: str) -> Run:
    validate(c, len(builders.mesh_devices(c)), jax.process_count())
    tok_path = builders.tokenizer_path(c, workdir, builders.model_family(c))
    tokenizer = builders.load_run_tokenizer(c, tok_path)
    model_cfg = builders.model_config_from(c, tokenizer)
    mesh = builders.make_mesh(c)
    image_hw = builders.dataset_image_hw(c.data.train_files)
    builder = builders.example_builder(c, model_cfg, tok_path, image_hw)
    sft_builder = builders.example_builder(c, model_cfg, tok_path, image_hw,
                                           answer_boxes=max(c.sft.num_differences))
    if c.grpo.steps:
        builders.check_room_for_answers(c, builder, "grpo.max_new_tokens", c.grpo.max_new_tokens)
    with sharding.activate(mesh):
        model = builders.create_model(c, model_cfg, mesh, patches_per_image=builder.patches_per_image)
    graphdef, params = nnx.split(model, nnx.Param)
    return Run(c, workdir, model_cfg, mesh, graphdef, params, tokenizer, builder, sft_builder,
               Curriculum(list(c.curriculum.phases)))


def stage_of(c, step: int) -> str:
    return "sft" if step < c.sft.steps else "grpo"


def optimizer_for(c, stage: str, params):
    """SFT and GRPO each get their own AdamW schedule (moments restart at the stage boundary)."""
    total = c.sft.steps if stage == "sft" else c.grpo.steps * c.grpo.num_minibatches
    lr = c.sft.learning_rate if stage == "sft" else c.optim.learning_rate
    return make_optimizer(params, peak_lr=lr, total_steps=max(total, 1), warmup_steps=c.optim.warmup_steps,
                          end_fraction=c.optim.end_lr_fraction, weight_decay=c.optim.weight_decay, b1=c.optim.b1,
                          b2=c.optim.b2, clip_norm=c.optim.grad_clip_norm, accum_steps=c.optim.grad_accum_steps,
                          freeze_vision=c.model.freeze_vision)


def init_optimizer_state(tx, params, mesh):
    """Adam moments get the parameters' shardings and scalars (the step count) are replicated on the mesh,
    exactly as the steps pin their outputs, so the step's inputs look the same on every call and it
    compiles once."""
    with sharding.activate(mesh):  # the shardings that `steps` pins its outputs to
        return jax.jit(lambda p: steps.pin_shardings(tx.init(p)))(params)


def data_iterator(run: Run, stage: str, cur_state: CurriculumState):
    """The Grain iterator a stage (and curriculum phase) reads; seeded by stage and phase, so a restart
    rebuilds the same stream and the checkpointed position selects the next batch."""
    c = run.config
    if stage == "sft":
        selection = [(tuple(c.sft.num_differences), 1.0)]
        batch, seed, builder = c.sft.batch_size, c.seed * 1000 + 1, run.sft_builder
    else:
        selection = list(run.curriculum.phase(cur_state).mixture())
        batch, seed = c.grpo.prompts_per_batch, c.seed * 1000 + 100 + cur_state.phase_index
        builder = run.builder
    ds = builders.pair_dataset(c, c.data.train_files, builder, batch_size=batch, selection=selection, seed=seed)
    return iter(ds)


# ======================================================================================================
# Checkpoint plumbing
# ======================================================================================================

def _arrays(params, opt_state, rng, reference=None) -> dict:
    """The checkpoint's array items: params alone (for eval/export), the rest as train_state.

    The RNG key is stored as numpy: it lives on one local device, which orbax cannot save on a pod
    (every host holds the same key; a host-local array would need a global sharding first).
    """
    train_state = {"opt_state": opt_state, "rng": np.asarray(jax.random.key_data(rng))}
    if reference is not None:
        train_state["reference"] = nnx.to_pure_dict(reference)
    return {"params": nnx.to_pure_dict(params), "train_state": train_state}


def _filled(state: nnx.State, pure: dict) -> nnx.State:
    """A copy of `state` holding the arrays of `pure` (a restored `nnx.to_pure_dict` tree)."""
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def _fresh_reference(c, stage: str, params):
    """GRPO with a KL term keeps a frozen copy of the policy as it entered GRPO; otherwise None."""
    return jax.tree.map(jnp.copy, params) if stage == "grpo" and c.grpo.kl_coef > 0 else None


def _meta(step: int, cur_state: CurriculumState, stage: str) -> dict:
    return {"step": step, "stage": stage, "curriculum": cur_state.to_dict()}


# ======================================================================================================
# The loop
# ======================================================================================================

def train(c: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes) training in `workdir`; returns the last logged metrics."""
    os.makedirs(workdir, exist_ok=True)
    run = setup(c, workdir)
    total_steps = c.sft.steps + c.grpo.steps
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=c.checkpoint.every,
                                      keep=c.checkpoint.keep, use_async=c.checkpoint.use_async,
                                      keep_steps=(c.sft.steps,) if 0 < c.sft.steps < total_steps else ())
    logger = MetricsLogger(workdir, total_steps=total_steps)
    guard = checkpointing.PreemptionGuard()

    # ---- initial or restored state ---------------------------------------------------------------
    # GRPO's KL reference is the policy as GRPO starts (after the warm-up); it is checkpointed with the
    # rest so that a restart mid-GRPO keeps the same reference.
    step, cur_state = 0, run.curriculum.initial_state()
    rng = jax.random.key(c.seed)
    params = run.params
    latest = ckpt.latest_step()
    saved_stage = None
    if latest is not None:
        meta = ckpt.read_meta(latest)
        step, cur_state = int(meta["step"]), run.curriculum.state_from_dict(meta["curriculum"])
        saved_stage = meta["stage"]
    stage = stage_of(c, min(step, total_steps - 1))
    tx = optimizer_for(c, stage, params)
    opt_state = init_optimizer_state(tx, params, run.mesh)
    reference = _fresh_reference(c, stage, params)
    data = data_iterator(run, stage, cur_state)
    if latest is not None:
        # A checkpoint taken at the last warm-up step holds the warm-up's optimiser and data position:
        # GRPO then starts as an uninterrupted run would, with those fresh and its reference = params.
        at_boundary = saved_stage != stage
        saved_reference = None if at_boundary else reference
        abstract = checkpointing.abstract_like(_arrays(params, opt_state, rng, saved_reference))
        restored, _ = ckpt.restore(abstract, None if at_boundary else data, step=latest)
        train_state = restored["train_state"]
        params = _filled(params, restored["params"])
        rng = jax.random.wrap_key_data(train_state["rng"])
        if at_boundary:
            reference = _fresh_reference(c, stage, params)
        else:
            opt_state = train_state["opt_state"]
            reference = _filled(params, train_state["reference"]) if "reference" in train_state else None
        print(f"resumed from step {latest} ({stage}, phase {run.curriculum.phase(cur_state).name})", flush=True)

    loss_config = grpo.GRPOConfig(eps_low=c.grpo.eps_low, eps_high=c.grpo.eps_high, kl_coef=c.grpo.kl_coef)
    reward_config = rewards.RewardConfig(alpha=c.reward.alpha, lambda1=c.reward.lambda1, lambda2=c.reward.lambda2,
                                         iou_threshold=c.reward.iou_threshold, family=run.model_cfg.family)
    sampling_config = sampling.SamplingConfig(
        max_new_tokens=c.grpo.max_new_tokens, temperature=c.grpo.temperature, top_k=c.grpo.top_k,
        top_p=c.grpo.top_p, eos_token_ids=(run.model_cfg.eos_token_id,), pad_token_id=run.model_cfg.pad_token_id)
    metrics: dict = {}

    # ---- steps -----------------------------------------------------------------------------------
    with sharding.activate(run.mesh):
        while step < total_steps:
            new_stage = stage_of(c, step)
            if new_stage != stage:  # SFT -> GRPO boundary: fresh optimiser and data stream
                stage = new_stage
                tx = optimizer_for(c, stage, params)
                opt_state = init_optimizer_state(tx, params, run.mesh)
                reference = _fresh_reference(c, stage, params)
                data = data_iterator(run, stage, cur_state)
            batch = global_batch(next(data))
            t_start = time.perf_counter()
            if stage == "sft":
                prompts = rollout.prompt_batch(run.model_cfg, batch, mesh=run.mesh, prompt_bucket=c.data.prompt_bucket)
                params, opt_state, out = steps.sft_step(run.graphdef, tx, params, opt_state, prompts,
                                                        rollout.answers(batch, run.mesh),
                                                        chunk=int(c.grpo.scoring_chunk))
                metrics = {f"sft/{k}": float(v) for k, v in jax.device_get(out).items()}
                metrics["time/step"] = time.perf_counter() - t_start
                phase_name = "sft"
            else:
                rng, key = jax.random.split(rng)
                params, opt_state, metrics = grpo_iteration(
                    run, tx, params, opt_state, reference, batch, key, sampling_config, reward_config, loss_config)
                phase_name = run.curriculum.phase(cur_state).name
                cur_state, moved = run.curriculum.update(cur_state, metrics["reward/mean"])
                metrics["curriculum/phase"] = cur_state.phase_index
                if moved:  # the next phase reads a different selection of pairs
                    data = data_iterator(run, stage, cur_state)
            step += 1
            logger.write(step, metrics, phase=phase_name)
            if step % c.log.every == 0 or step == total_steps:
                logger.progress(step, metrics, phase=phase_name,
                                keys=("sft/loss", "reward/mean", "reward/f1", "reward/iou", "grpo/kl"))
            stop = guard.requested or (jax.process_count() > 1 and _preemption_sync(step))
            # Always save the end of the warm-up (kept for good: see the Checkpointer) and of the run.
            ckpt.save(step, _arrays(params, opt_state, rng, reference), _meta(step, cur_state, stage),
                      data, force=stop or step == total_steps or step == c.sft.steps)
            if stop:
                print(f"preemption requested: saved step {step}, exiting", flush=True)
                break
    ckpt.close()
    logger.close()
    guard.restore_handlers()
    run.params = params
    return metrics


def global_batch(local: dict) -> dict:
    """Every host reads its own share of the data; the host-side preparation (positions, vision indices,
    rewards) then runs on the global batch, identically on every host, so gather the shares.

    On one process this is the identity. On a pod the gathered batch is the global batch on every host
    (it is then placed with each array's sharding, so each device keeps only its part).
    """
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    # The collective goes through JAX, which (without x64) would truncate 64-bit values such as the
    # pairs' int64 seeds; they travel as pairs of 32-bit words and are viewed back afterwards.
    words = {k: _as_32bit_words(v) for k, v in local.items()}
    gathered = multihost_utils.process_allgather(words, tiled=True)
    return {k: _from_32bit_words(np.asarray(gathered[k]), np.asarray(local[k]).dtype) for k in local}


def _as_32bit_words(x) -> np.ndarray:
    """A 64-bit array [..] as uint32 [.., 2] (its bytes unchanged); other arrays as they are."""
    x = np.ascontiguousarray(x)
    return x.view(np.uint32).reshape(*x.shape, 2) if x.dtype.itemsize == 8 else x


def _from_32bit_words(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.dtype(dtype).itemsize != 8:
        return x
    return np.ascontiguousarray(x).view(dtype).reshape(x.shape[:-1])


def _preemption_sync(step: int) -> bool:
    """On a pod, all hosts agree to stop at the same step when any host got the preemption notice."""
    from jax.experimental import multihost_utils

    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, ValueError, AttributeError):  # no preemption service (jax.distributed without it)
        return False


def _take_rows(x, rows: np.ndarray):
    return None if x is None else jnp.take(x, jnp.asarray(rows), axis=0)


def grpo_iteration(run: Run, tx, params, opt_state, reference, batch, key, sampling_config, reward_config,
                   loss_config):
    """Rollout -> reward -> advantages -> `num_minibatches` policy updates. Returns new state and metrics."""
    c = run.config
    group = int(c.grpo.group_size)
    model = nnx.merge(run.graphdef, params)
    ro = rollout.rollout(model, batch, cfg=run.model_cfg, tokenizer=run.tokenizer, sampling_config=sampling_config,
                         group_size=group, reward_config=reward_config, rng=key, mesh=run.mesh,
                         prompt_bucket=int(c.data.prompt_bucket), adv_eps=loss_config.adv_eps)
    t0 = time.perf_counter()
    ref_logp = None
    if reference is not None:
        ref_logp = jax.block_until_ready(steps.reference_logprobs(
            run.graphdef, reference, ro.prompts, ro.completions, chunk=int(c.grpo.scoring_chunk)))
    ro.seconds["scoring"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    n_prompts = batch["prompt_ids"].shape[0]
    per_mb = n_prompts // c.grpo.num_minibatches
    update_metrics = []
    advantages = jnp.asarray(ro.advantages)
    for mb in range(c.grpo.num_minibatches):
        rows = np.arange(mb * per_mb * group, (mb + 1) * per_mb * group)
        if c.grpo.num_minibatches == 1:
            prompts, comps, old, ref, adv = ro.prompts, ro.completions, ro.old_logp, ref_logp, advantages
        else:
            prompts = rollout.select_rows(ro.prompts, rows)
            comps = steps.Completions(_take_rows(ro.completions.tokens, rows), _take_rows(ro.completions.mask, rows))
            old, ref, adv = (_take_rows(x, rows) for x in (ro.old_logp, ref_logp, advantages))
        params, opt_state, out = steps.grpo_step(run.graphdef, tx, params, opt_state, prompts, comps, old, ref, adv,
                                                 loss_config, chunk=int(c.grpo.scoring_chunk))
        update_metrics.append(jax.device_get(out))
    ro.seconds["update"] = time.perf_counter() - t0

    s = ro.scores
    lengths = sharding.to_host(ro.completions.mask).sum(axis=1)
    metrics = {
        "reward/mean": float(s["reward"].mean()), "reward/std": float(s["reward"].std()),
        "reward/f1": float(s["f1"].mean()), "reward/iou": float(s["mean_iou"].mean()),
        "reward/format": float(s["format_ok"].mean()),
        "grpo/response_length": float(lengths.mean()),
    }
    for key_ in update_metrics[0]:
        metrics[f"grpo/{key_}"] = float(np.mean([float(m[key_]) for m in update_metrics]))
    for key_, seconds in ro.seconds.items():
        metrics[f"time/{key_}"] = seconds
    return params, opt_state, metrics
