"""The training state, and the two ways into it: `restore_or_init` (a run's start) and `enter_stage`.

Global step s counts optimiser updates of both stages: steps [0, sft.steps) are supervised, steps
[sft.steps, sft.steps + grpo.steps) are GRPO iterations (one rollout batch each, `grpo.num_minibatches`
updates inside). A checkpoint at step s holds everything needed to continue exactly: parameters,
optimiser state, RNG key, GRPO's reference, the curriculum state, and the position of the data iterator
that was being read.

A stage (warm-up or GRPO) starts with a fresh AdamW schedule, a fresh data stream and, for GRPO with a
KL term, a frozen reference = the policy as GRPO starts. A checkpoint taken at the last warm-up step
holds the warm-up's optimiser and data position, so a run restored there enters GRPO exactly as an
uninterrupted run did: with those fresh.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from dig_jax import assemble, checkpointing, sharding
from dig_jax.rl.curriculum import CurriculumState
from dig_jax.training.optim import make_optimizer
from dig_jax.training.setup import Run


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything the loop changes. Arrays are pytree children; step, stage and curriculum are metadata."""

    params: nnx.State
    opt_state: Any
    rng: jax.Array
    reference: nnx.State | None  # GRPO's frozen KL reference (None in the warm-up or with kl_coef = 0)
    step: int = dataclasses.field(metadata={"static": True})
    stage: str = dataclasses.field(metadata={"static": True})  # "sft" | "grpo"
    curriculum: CurriculumState = dataclasses.field(metadata={"static": True})

    def replace(self, **changes) -> "TrainState":
        return dataclasses.replace(self, **changes)

    def checkpoint_items(self, with_reference: bool = True) -> dict:
        """The checkpoint's array items: params alone (eval/export read only those), the rest as train_state.

        The RNG key is stored as numpy: it lives on one local device, which orbax cannot save on a pod
        (every host holds the same key; a host-local array would need a global sharding first).
        """
        train_state = {"opt_state": self.opt_state, "rng": np.asarray(jax.random.key_data(self.rng))}
        if with_reference and self.reference is not None:
            train_state["reference"] = nnx.to_pure_dict(self.reference)
        return {"params": nnx.to_pure_dict(self.params), "train_state": train_state}

    def meta(self) -> dict:
        return {"step": self.step, "stage": self.stage, "curriculum": self.curriculum.to_dict()}


@dataclasses.dataclass
class Stage:
    """What a stage reads and how it updates: not checkpointed as arrays (the data position is)."""

    name: str
    tx: optax.GradientTransformation
    data: Iterator[dict]


def stage_of(c: ml_collections.ConfigDict, step: int) -> str:
    return "sft" if step < c.sft.steps else "grpo"


def optimizer_for(c: ml_collections.ConfigDict, stage: str, params) -> optax.GradientTransformation:
    """SFT and GRPO each get their own AdamW schedule (moments restart at the stage boundary)."""
    total = c.sft.steps if stage == "sft" else c.grpo.steps * c.grpo.num_minibatches
    lr = c.sft.learning_rate if stage == "sft" else c.optim.learning_rate
    return make_optimizer(params, peak_lr=lr, total_steps=max(total, 1), warmup_steps=c.optim.warmup_steps,
                          end_fraction=c.optim.end_lr_fraction, weight_decay=c.optim.weight_decay, b1=c.optim.b1,
                          b2=c.optim.b2, clip_norm=c.optim.grad_clip_norm, accum_steps=c.optim.grad_accum_steps,
                          freeze_vision=c.model.freeze_vision)


def init_optimizer_state(tx: optax.GradientTransformation, params, mesh):
    """Adam moments get the parameters' shardings and scalars (the step count) are replicated on the mesh,
    exactly as the steps pin their outputs, so the step's inputs look the same on every call and it
    compiles once."""
    with sharding.activate(mesh):  # the shardings that the steps pin their outputs to
        return jax.jit(lambda p: sharding.pin_shardings(tx.init(p)))(params)


def data_iterator(run: Run, stage: str, cur_state: CurriculumState) -> Iterator[dict]:
    """The Grain iterator a stage (and curriculum phase) reads; seeded by stage and phase, so a restart
    rebuilds the same stream and the checkpointed position selects the next batch."""
    c = run.config
    if stage == "sft":
        selection = [(tuple(c.sft.num_differences), 1.0)]
        batch, seed, builder = c.sft.batch_size, c.seed * 1000 + 1, run.sft_builder
    else:
        selection = list(run.curriculum.phase(cur_state).mixture())
        batch, seed = c.grpo.prompts_per_batch, c.seed * 1000 + 100 + cur_state.phase_index
        if c.grpo.seed is not None:  # an independent GRPO stream (phases stay < 100 apart)
            seed += 100_000 * (c.grpo.seed + 1)
        builder = run.builder
    ds = assemble.pair_dataset(c, c.data.train_files, builder, batch_size=batch, selection=selection, seed=seed)
    return iter(ds)


def fresh_reference(c: ml_collections.ConfigDict, stage: str, params):
    """GRPO with a KL term keeps a frozen copy of the policy as it entered GRPO (floating parameters
    stored in `grpo.reference_dtype`, sharded like the policy); otherwise None."""
    if stage != "grpo" or c.grpo.kl_coef <= 0:
        return None
    dtype = jnp.dtype(c.grpo.reference_dtype)

    def cast(x):  # always a new buffer: the update step donates the policy's
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else jnp.copy(x)

    return jax.tree.map(cast, params)


def stage_rng(c: ml_collections.ConfigDict, stage: str, rng: jax.Array) -> jax.Array:
    """The key a stage starts from: the run's key as the previous stage left it, or, for GRPO with
    `grpo.seed` set, that key folded with it, so that GRPO stages started from one warm-up checkpoint
    sample independently of each other (the warm-up's key alone would give every such run the same draws)."""
    if stage != "grpo" or c.grpo.seed is None:
        return rng
    return jax.random.fold_in(rng, c.grpo.seed)


def enter_stage(run: Run, state: TrainState, stage: str) -> tuple[TrainState, Stage]:
    """Starts `stage` from `state`: a fresh optimiser, reference, data stream and `stage_rng`."""
    tx = optimizer_for(run.config, stage, state.params)
    opt_state = init_optimizer_state(tx, state.params, run.mesh)
    reference = fresh_reference(run.config, stage, state.params)
    data = data_iterator(run, stage, state.curriculum)
    rng = stage_rng(run.config, stage, state.rng)
    return state.replace(opt_state=opt_state, reference=reference, rng=rng, stage=stage), Stage(stage, tx, data)


def _filled(state: nnx.State, pure: dict) -> nnx.State:
    """A copy of `state` holding the arrays of `pure` (a restored `nnx.to_pure_dict` tree)."""
    state = jax.tree.map(lambda x: x, state)
    nnx.replace_by_pure_dict(state, pure)
    return state


def restore_or_init(run: Run, ckpt: checkpointing.Checkpointer) -> tuple[TrainState, Stage]:
    """The state of the newest checkpoint in the workdir, or the initial state; and the stage it is in."""
    c = run.config
    state = TrainState(params=run.params, opt_state=None, rng=jax.random.key(c.seed), reference=None, step=0,
                       stage="", curriculum=run.curriculum.initial_state())
    latest = ckpt.latest_step()
    saved_stage = None
    if latest is not None:
        meta = ckpt.read_meta(latest)
        state = state.replace(step=int(meta["step"]), curriculum=run.curriculum.state_from_dict(meta["curriculum"]))
        saved_stage = meta["stage"]
    state, stage = enter_stage(run, state, stage_of(c, min(state.step, run.total_steps - 1)))
    if latest is None:
        return state, stage

    continuing = saved_stage == stage.name  # else: saved at the last warm-up step, GRPO starts fresh
    abstract = checkpointing.abstract_like(state.checkpoint_items(with_reference=continuing))
    restored, _ = ckpt.restore(abstract, stage.data if continuing else None, step=latest)
    saved = restored["train_state"]
    params = _filled(state.params, restored["params"])
    state = state.replace(params=params, rng=jax.random.wrap_key_data(saved["rng"]))
    if continuing:
        reference = _filled(state.reference, saved["reference"]) if "reference" in saved else None
        state = state.replace(opt_state=saved["opt_state"], reference=reference)
    else:  # entering GRPO from the warm-up's last checkpoint, as the loop does at the boundary
        state = state.replace(reference=fresh_reference(c, stage.name, params),
                              rng=stage_rng(c, stage.name, state.rng))
    print(f"resumed from step {latest} ({stage.name}, phase {run.curriculum.phase(state.curriculum).name})",
          flush=True)
    return state, stage
