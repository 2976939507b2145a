"""Every program a run keeps resident, built through the trainer's own code with the run's real shapes.

  sft_step            `rl.sft.sft_step` on a warm-up batch (when sft.steps > 0)
  policy_reshard      `SamplingLayout.policy`: the once-per-iteration copy of the policy into the sampling
                      layout (when the run has one, `generate.sampling_layout`)
  grpo_generation     `generate.sampler.generate`: prefill + decode loop with the KV cache for prompt +
                      grpo.max_new_tokens, at the rollout batch (prompts_per_batch x group_size rows), on
                      the sampling layout when there is one
  grpo_generation_training_mesh
                      with a sampling layout, the same generation on the training mesh: never run, compiled
                      as the comparison (`Program.comparison`, outside the verdict)
  reference_logprobs  `rl.grpo.reference_logprobs` on the rollout (when grpo.kl_coef > 0)
  grpo_update         `rl.grpo.grpo_step` on one minibatch (prompts / num_minibatches whole groups)
  eval_generation     greedy `generate` at eval.batch_size rows, eval.max_new_tokens new tokens
(the GRPO programs when grpo.steps > 0).

State: the parameters are the model of `assemble.model_constructor` under `nnx.eval_shape`, split into
(graphdef, params) as `training.setup` does and sharded by `sharding.state_shardings`; the optimiser of
each stage is `training.state.optimizer_for`, its state `tx.init` under `jax.eval_shape` with the
shardings `training.state.init_optimizer_state` pins (`sharding.pin_shardings`: a variable's logical
axes, replicated otherwise); the KL reference is `training.state.fresh_reference` under
`jax.eval_shape`, sharded like the parameters it copies.

Data flow, as in `rl.grpo.grpo_iteration`: the reference and the update read the completions and
log-probs the generation returns, with the shardings the compiled generation gives them (on a
sampling layout: as `sampling_layout.to_mesh` places them back, by the batch rule); the generation on a
sampling layout reads the compiled copy's outputs and prompts placed on its mesh; with several
minibatches, each update reads the rows `rl.grpo.minibatches` takes (`jnp.take` of whole groups,
`generate.batch.select_rows`), compiled here to learn their shardings. If a producer does not fit,
its outputs are taken as placed by the batch rule (`sharding.batch_sharding`).

Each program also records what else is live on the chip while it runs (`live_outside`): the resident
state that is not among its arguments (the optimiser state and the reference during generation, the
whole rollout during a minibatch update, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import assemble, sharding
from dig_jax.aot import analysis, flops, inputs, placement
from dig_jax.generate import sampler
from dig_jax.generate.batch import Completions, select_rows
from dig_jax.generate.sampling_layout import SamplingLayout
from dig_jax.models.vlm import init_cache
from dig_jax.processing.examples import ExampleBuilder
from dig_jax.rl import grpo, sft
from dig_jax.training import state as training_state


@dataclasses.dataclass
class RunParts:
    """What the programs of a run are built from (built by `plan.run_parts`)."""

    config: ml_collections.ConfigDict
    model_cfg: object
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: nnx.State  # ShapeDtypeStructs with the trainer's shardings
    builder: ExampleBuilder  # GRPO prompts
    sft_builder: ExampleBuilder  # warm-up examples
    eval_builder: ExampleBuilder  # held-out pairs
    layout: SamplingLayout | None = None  # the rollout's sampling layout (None: it decodes on `mesh`)


@dataclasses.dataclass
class Program:
    """One compiled (or refused) program and what the report needs about it (FLOPs and bytes: `flops`)."""

    name: str
    stage: str  # "sft", "grpo" or "eval": whose resident state is live beside it
    result: analysis.Compiled | None  # None: not compiled (not among the programs asked for)
    arguments: dict[str, int]  # per-chip bytes of its arguments by kind (params, opt_state, batch, ...)
    live_outside: dict[str, int]  # resident bytes per chip live while it runs that are not its arguments
    shapes: dict  # rows, prompt_len, completion_len / new_tokens, images
    flops: float  # analytic FLOPs of one call (see `flops`)
    hbm_bytes: float  # bytes each chip streams per call, a lower bound (see `flops`)
    per_token: dict | None = None  # generation only: FLOPs / HBM bytes / ICI bytes of one decode step
    notes: list[str] = dataclasses.field(default_factory=list)
    comparison: bool = False  # compiled to compare against, never run: outside the verdict


def abstract_params(c: ml_collections.ConfigDict, model_cfg, mesh: Mesh, patches_per_image: int):
    """(graphdef, params) of the configured model: ShapeDtypeStructs carrying the trainer's shardings."""
    with sharding.activate(mesh):
        model = nnx.eval_shape(assemble.model_constructor(c, model_cfg, int(c.seed), patches_per_image))
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = sharding.state_shardings(params, mesh)
    return graphdef, _with_variable_shardings(params, shardings)


def _with_variable_shardings(state, shardings):
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v, s: v.replace(placement.abstract(v.get_value(), s)), state, shardings, is_leaf=is_var)


def pinned(tree, mesh: Mesh):
    """`tree`'s shapes with the shardings `sharding.pin_shardings` constrains them to."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pin(x):
        if isinstance(x, nnx.Variable):
            return x.replace(placement.abstract(x.get_value(), sharding.variable_sharding(x, mesh)))
        return placement.abstract(x, replicated)

    return jax.tree.map(pin, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_opt_state(c, stage: str, params, mesh: Mesh):
    """(tx, opt_state) of `stage`, as `training.state.enter_stage` builds them, abstractly."""
    tx = training_state.optimizer_for(c, stage, params)
    return tx, pinned(jax.eval_shape(tx.init, params), mesh)


def abstract_reference(c, params):
    """GRPO's frozen reference (`training.state.fresh_reference`), sharded like `params`; None without KL."""
    shapes = jax.eval_shape(lambda p: training_state.fresh_reference(c, "grpo", p), params)
    if shapes is None:
        return None
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda r, p: r.replace(placement.abstract(r.get_value(), p.get_value().sharding)),
                        shapes, params, is_leaf=is_var)


def kv_cache_bytes(parts: RunParts, rows: int, slots: int, mesh: Mesh | None = None) -> int:
    """Per-chip bytes of the sampler's KV cache (`init_cache` in the model dtype) if it is split like the
    batch on `mesh` (default: the training mesh): rows over data x fsdp where they divide, and KV heads
    over tensor where they divide (the cache's total bytes divided accordingly, whatever its layout)."""
    mesh, text = mesh or parts.mesh, parts.model_cfg.text
    cache = jax.eval_shape(lambda: init_cache(parts.model_cfg, rows, slots, assemble.DTYPES[parts.config.model.dtype]))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    split = (shards if rows % shards == 0 else 1) * (
        mesh.shape["tensor"] if text.num_key_value_heads % mesh.shape["tensor"] == 0 else 1)
    return _total_bytes(cache) // split


def _compute_bytes(parts: RunParts) -> int:
    """Every weight in the compute dtype (what the matmuls read once FSDP has gathered it)."""
    return analysis.total_elements(parts.params) * jnp.dtype(assemble.DTYPES[parts.config.model.dtype]).itemsize


# ----------------------------------------------------------------------------------------------------
# The programs
# ----------------------------------------------------------------------------------------------------

def _lowering(mesh: Mesh, fn: Callable, *args, **kwargs) -> Callable[[], object]:
    """A thunk lowering `fn` under the activation-sharding context the training loop runs in."""
    def lower():
        with sharding.activate(mesh):
            return fn.lower(*args, **kwargs)
    return lower


def _generation_fn(graphdef, sampling: sampler.SamplingConfig):
    """`sampler.generate` of the model (graphdef, params), as a jitted function of its arrays."""
    return jax.jit(lambda params, batch, key: sampler.generate(nnx.merge(graphdef, params), batch, key, sampling))


def _replicated_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
    """The sampler's key: one typed key, replicated on the mesh (as `rl.grpo.rollout` places it)."""
    key = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _outputs_or_rows(result: analysis.Compiled | None, shapes, mesh: Mesh):
    """The producer's compiled outputs, or (when it did not fit or was not compiled) its output shapes
    placed by the batch rule."""
    if result is not None and result.fits:
        return analysis.abstract_outputs(result.compiled)
    return placement.rows(shapes, mesh)


def sft_program(parts: RunParts, compile_fn) -> Program:
    """`rl.sft.sft_step` on a warm-up batch of sft.batch_size examples."""
    c, mesh = parts.config, parts.mesh
    tx, opt_state = abstract_opt_state(c, "sft", parts.params, mesh)
    batch = inputs.host_batch(parts.sft_builder, int(c.sft.batch_size))
    prompts = placement.prompts(inputs.prompt_shapes(parts.model_cfg, batch, group_size=1,
                                                     prompt_bucket=int(c.data.prompt_bucket)), mesh)
    targets = placement.rows(inputs.answer_shapes(batch), mesh)
    lower = _lowering(mesh, sft.sft_step, parts.graphdef, tx, parts.params, opt_state, prompts, targets,
                      chunk=int(c.grpo.scoring_chunk))
    rows, lp, la = targets.tokens.shape[0], prompts.input_ids.shape[1], targets.tokens.shape[1]
    shapes = {"rows": rows, "prompt_len": lp, "completion_len": la, "images": 2 * rows}
    return Program(
        "sft_step", "sft", compile_fn("sft_step", lower),
        arguments=_bytes_by_name(params=parts.params, opt_state=opt_state, batch=(prompts, targets)),
        live_outside={}, shapes=shapes,
        flops=flops.update_flops(parts.model_cfg, patches_per_image=parts.sft_builder.patches_per_image, **shapes),
        hbm_bytes=flops.update_bytes(_compute_bytes(parts), analysis.shard_bytes(parts.params)))


def grpo_programs(parts: RunParts, compile_fn) -> list[Program]:
    """In the order an iteration runs them: the copy of the policy into the sampling layout (when there
    is one), the generation, the reference log-probs (with KL) and one minibatch update. With a sampling
    layout, the generation on the training mesh is compiled too, as the comparison the report draws
    (`Program.comparison`: not part of the run)."""
    c, mesh, cfg, layout = parts.config, parts.mesh, parts.model_cfg, parts.layout
    tx, opt_state = abstract_opt_state(c, "grpo", parts.params, mesh)
    reference = abstract_reference(c, parts.params)
    resident = _bytes_by_name(params=parts.params, opt_state=opt_state, reference=reference)
    batch = inputs.host_batch(parts.builder, int(c.grpo.prompts_per_batch))
    prompt_shapes = inputs.prompt_shapes(cfg, batch, group_size=int(c.grpo.group_size),
                                         prompt_bucket=int(c.data.prompt_bucket))
    prompts = placement.prompts(prompt_shapes, mesh)
    sampling = sampler.SamplingConfig.from_config(c.grpo, cfg)
    beside = {"opt_state": resident["opt_state"], "reference": resident["reference"]}
    gen_args = dict(patches_per_image=parts.builder.patches_per_image)
    programs = []
    if layout is None:
        programs.append(generation_program(parts, "grpo_generation", "grpo", prompts, sampling, compile_fn,
                                           live_outside=beside, **gen_args))
    else:
        programs.append(reshard_program(parts, compile_fn, beside))
        copy = _outputs_or_copy(programs[-1].result, parts)
        programs.append(generation_program(parts, "grpo_generation", "grpo", placement.prompts(prompt_shapes, layout.mesh),
                                           sampling, compile_fn, live_outside={"params": resident["params"], **beside},
                                           params=copy, mesh=layout.mesh, **gen_args))
        programs[-1].notes.append(f"on the sampling layout {layout.describe()}; its outputs return to the training "
                                  "mesh by the batch rule (`sampling_layout.to_mesh`)")
        programs.append(generation_program(parts, "grpo_generation_training_mesh", "grpo", prompts, sampling,
                                           compile_fn, live_outside=beside, **gen_args))
        programs[-1].comparison = True
        programs[-1].notes.append("not run: the same generation on the training mesh, for comparison")
    rows = prompts.input_ids.shape[0]
    generated = programs[0 if layout is None else 1].result
    if layout is None:
        out = _outputs_or_rows(generated, _generation_shapes(rows, sampling.max_new_tokens), mesh)
    else:  # `sampling_layout.to_mesh` places them by the batch rule on the training mesh
        out = placement.rows(_generation_shapes(rows, sampling.max_new_tokens), mesh)
    rollout = {"prompts": prompts, "completions": Completions(out.tokens, out.completion_mask),
               "old_logp": out.logprobs, "ref_logp": None}
    if reference is not None:
        programs.append(reference_program(parts, compile_fn, reference, rollout, resident))
        rollout["ref_logp"] = _outputs_or_rows(programs[-1].result, out.logprobs, mesh)
    rollout["advantages"] = placement.rows(jax.ShapeDtypeStruct((rows,), jnp.float32), mesh)
    programs.append(update_program(parts, compile_fn, tx, opt_state, rollout, resident))
    return programs


def sampling_copy(parts: RunParts):
    """The policy's copy in the sampling layout, abstractly: the shapes and shardings
    `SamplingLayout.policy` gives it."""
    layout = parts.layout
    shardings = sharding.state_shardings(parts.params, layout.mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def copy(v, s):
        x = v.get_value()
        dtype = layout.dtype if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return v.replace(jax.ShapeDtypeStruct(x.shape, dtype, sharding=s))

    return jax.tree.map(copy, parts.params, shardings, is_leaf=is_var)


def _outputs_or_copy(result: analysis.Compiled | None, parts: RunParts):
    """The compiled copy's outputs as the parameter tree, or (not compiled) `sampling_copy`."""
    copy = sampling_copy(parts)
    if result is None or not result.fits:
        return copy
    leaves = jax.tree.leaves(analysis.abstract_outputs(result.compiled))
    return jax.tree.unflatten(jax.tree.structure(copy), leaves)


def reshard_program(parts: RunParts, compile_fn, live_outside: dict[str, int]) -> Program:
    """`SamplingLayout.policy`: the once-per-iteration copy of the parameters into the sampling layout.
    Its collectives are the reshard's bytes; it streams the parameter shard in and the copy out."""
    fn = parts.layout.reshard_fn(parts.params)
    copy_bytes = analysis.shard_bytes(sampling_copy(parts))
    return Program(
        "policy_reshard", "grpo", compile_fn("policy_reshard", lambda: fn.lower(parts.params)),
        arguments=_bytes_by_name(params=parts.params), live_outside=live_outside,
        shapes={"rows": 0, "tensor": parts.layout.tensor}, flops=0.0,
        hbm_bytes=float(analysis.shard_bytes(parts.params) + copy_bytes),
        notes=[f"copies the policy into {parts.layout.describe()}: {copy_bytes / 2 ** 30:.2f} GiB per chip"])


def _scoring_shapes(parts: RunParts, rollout: dict) -> dict:
    prompts, tokens = rollout["prompts"], rollout["completions"].tokens
    return {"rows": tokens.shape[0], "prompt_len": prompts.input_ids.shape[1], "completion_len": tokens.shape[1],
            "images": prompts.pixel_values.shape[0] // parts.builder.patches_per_image}


def reference_program(parts: RunParts, compile_fn, reference, rollout: dict, resident: dict[str, int]) -> Program:
    """`rl.grpo.reference_logprobs` of the frozen reference on the whole rollout."""
    prompts, completions = rollout["prompts"], rollout["completions"]
    lower = _lowering(parts.mesh, grpo.reference_logprobs, parts.graphdef, reference, prompts, completions,
                      chunk=int(parts.config.grpo.scoring_chunk))
    shapes = _scoring_shapes(parts, rollout)
    return Program(
        "reference_logprobs", "grpo", compile_fn("reference_logprobs", lower),
        arguments=_bytes_by_name(reference=reference, batch=(prompts, completions)),
        live_outside={"params": resident["params"], "opt_state": resident["opt_state"],
                      "rollout.old_logp": analysis.shard_bytes(rollout["old_logp"])},
        shapes=shapes, flops=flops.scoring_flops(parts.model_cfg, patches_per_image=parts.builder.patches_per_image,
                                                 **shapes),
        hbm_bytes=float(_compute_bytes(parts) + resident["reference"]))


def update_program(parts: RunParts, compile_fn, tx, opt_state, rollout: dict, resident: dict[str, int]) -> Program:
    """`rl.grpo.grpo_step` on the first minibatch of the rollout (all of it with one minibatch)."""
    c = parts.config
    n_mb = int(c.grpo.num_minibatches)
    batch_args = tuple(rollout[k] for k in ("prompts", "completions", "old_logp", "ref_logp", "advantages"))
    notes = []
    if n_mb > 1:
        batch_args = _minibatch(batch_args, rollout["completions"].tokens.shape[0] // n_mb, parts.mesh)
        notes.append("each minibatch keeps the rollout's distinct images whole (select_rows): the vision tower "
                     "runs over all of them in every minibatch update")
    lower = _lowering(parts.mesh, grpo.grpo_step, parts.graphdef, tx, parts.params, opt_state, *batch_args,
                      grpo.GRPOConfig.from_config(c.grpo), chunk=int(c.grpo.scoring_chunk))
    shapes = _scoring_shapes(parts, rollout)
    shapes["rows"] //= n_mb
    beside = {"reference": resident["reference"]}
    if n_mb > 1:  # the whole rollout stays live while its minibatches are taken from it
        beside.update(_bytes_by_name(**{f"rollout.{k}": v for k, v in rollout.items()}))
    return Program(
        "grpo_update", "grpo", compile_fn("grpo_update", lower),
        arguments=_bytes_by_name(params=parts.params, opt_state=opt_state, batch=batch_args),
        live_outside=beside, shapes=shapes,
        flops=flops.update_flops(parts.model_cfg, patches_per_image=parts.builder.patches_per_image, **shapes),
        hbm_bytes=flops.update_bytes(_compute_bytes(parts), resident["params"]), notes=notes)


def _bytes_by_name(**trees) -> dict[str, int]:
    """Per-chip bytes of each named tree (see `analysis.shard_bytes`)."""
    return {name: analysis.shard_bytes(tree) for name, tree in trees.items()}


def _generation_shapes(rows: int, new_tokens: int) -> sampler.Generation:
    """The shapes of a `sampler.Generation` of `rows` rows (see its docstring)."""
    def struct(dtype, shape=(rows, new_tokens)):
        return jax.ShapeDtypeStruct(shape, dtype)
    return sampler.Generation(struct(jnp.int32), struct(jnp.float32), struct(jnp.float32), struct(jnp.int32),
                              struct(jnp.int32, (rows,)), struct(jnp.int32, ()))


def _minibatch(args, per_mb: int, mesh: Mesh):
    """The first minibatch's arguments, taken as `rl.grpo.minibatches` takes them, with the shardings
    the compiled take gives them (the batch rule's, should even that not fit)."""
    take_rows = np.arange(per_mb)

    def take(prompts, completions, old_logp, ref_logp, advantages):
        pick = lambda x: None if x is None else jnp.take(x, jax.device_put(take_rows), axis=0)  # noqa: E731
        comps = Completions(pick(completions.tokens), pick(completions.mask))
        return select_rows(prompts, take_rows), comps, pick(old_logp), pick(ref_logp), pick(advantages)

    result = analysis.compile_program("minibatch_rows", _lowering(mesh, jax.jit(take), *args))
    return _outputs_or_rows(result, jax.eval_shape(take, *args), mesh)


def generation_program(parts: RunParts, name: str, stage: str, prompts, sampling: sampler.SamplingConfig,
                       compile_fn, *, live_outside: dict[str, int], patches_per_image: int, params=None,
                       mesh: Mesh | None = None) -> Program:
    """`sampler.generate` over `prompts` with `params` on `mesh` (default: the trainer's parameters on
    the training mesh); its FLOPs, bytes and per-decode-step figures."""
    mesh, cfg = mesh or parts.mesh, parts.model_cfg
    params = parts.params if params is None else params
    key = _replicated_key(mesh)
    lower = _lowering(mesh, _generation_fn(parts.graphdef, sampling), params, prompts, key)
    rows, lp, t = prompts.input_ids.shape[0], prompts.input_ids.shape[1], sampling.max_new_tokens
    images = prompts.pixel_values.shape[0] // patches_per_image  # the distinct images (no patch padding)
    kv = kv_cache_bytes(parts, rows, lp + t, mesh)
    shard = analysis.shard_bytes(params)
    # FSDP parameters are gathered (in the compute dtype) before use; unsharded over fsdp, a chip reads
    # only its own copy.
    weights = _compute_bytes(parts) if mesh.shape["fsdp"] > 1 else 0
    per_token = {"flops": rows * flops.token_flops(cfg, lp + t), "hbm_bytes": flops.decode_step_bytes(weights, shard, kv),
                 "kv_cache_bytes": kv}
    shapes = {"rows": rows, "prompt_len": lp, "new_tokens": t, "images": images}
    return Program(
        name, stage, compile_fn(name, lower), arguments=_bytes_by_name(params=params, batch=(prompts, key)),
        live_outside=live_outside, shapes=shapes,
        flops=flops.generation_flops(cfg, rows=rows, prompt_len=lp, new_tokens=t, images=images,
                                     patches_per_image=patches_per_image),
        hbm_bytes=weights + shard + (t - 1) * per_token["hbm_bytes"], per_token=per_token,
        notes=[f"the decode loop stops when every row has emitted EOS: figures are for all {t} new tokens"])


def eval_program(parts: RunParts, compile_fn, live_outside: dict[str, int]) -> Program:
    """Evaluation's greedy generation (the sampling config `eval.dig.DigEvaluator` builds)."""
    c, cfg = parts.config, parts.model_cfg
    batch = inputs.host_batch(parts.eval_builder, int(c.eval.batch_size))
    prompts = placement.prompts(inputs.prompt_shapes(cfg, batch, group_size=1, prompt_bucket=int(c.data.prompt_bucket)),
                                parts.mesh)
    greedy = sampler.SamplingConfig(max_new_tokens=int(c.eval.max_new_tokens), temperature=0.0,
                                    eos_token_ids=(cfg.eos_token_id,), pad_token_id=cfg.pad_token_id)
    return generation_program(parts, "eval_generation", "eval", prompts, greedy, compile_fn, live_outside=live_outside,
                              patches_per_image=parts.eval_builder.patches_per_image)


def _total_bytes(tree) -> int:
    """Bytes of the whole (unsharded) arrays of `tree`."""
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


PROGRAMS = ("sft_step", "policy_reshard", "grpo_generation", "grpo_generation_training_mesh", "reference_logprobs",
            "grpo_update", "eval_generation")


def build_all(parts: RunParts, only: tuple[str, ...] | None = None,
              compile_fn=analysis.compile_program) -> tuple[list[Program], dict[str, int]]:
    """Every program of the run (or those named in `only`), compiled in the order the run first calls
    them, and the resident state per chip by component (parameters, optimiser state, reference)."""
    unknown = sorted(set(only or ()) - set(PROGRAMS))
    if unknown:
        raise ValueError(f"unknown program(s) {unknown}; the programs are {', '.join(PROGRAMS)}")
    c = parts.config
    if only is not None:  # the others are neither lowered nor compiled (their outputs: the batch rule)
        compile_any = compile_fn
        compile_fn = lambda name, lower: compile_any(name, lower) if name in only else None  # noqa: E731
    programs = []
    resident = {"params": analysis.shard_bytes(parts.params)}
    if c.sft.steps > 0:
        programs.append(sft_program(parts, compile_fn))
    if c.grpo.steps > 0:
        programs += grpo_programs(parts, compile_fn)
    stage = "grpo" if c.grpo.steps > 0 else "sft"
    _, opt_state = abstract_opt_state(c, stage, parts.params, parts.mesh)
    resident["opt_state"] = analysis.shard_bytes(opt_state)
    resident["reference"] = analysis.shard_bytes(abstract_reference(c, parts.params)) if stage == "grpo" else 0
    in_loop = bool(c.eval.get("every", 0))
    live = {k: v for k, v in resident.items() if k != "params"} if in_loop else {}
    programs.append(eval_program(parts, compile_fn, live))
    if not in_loop:
        programs[-1].notes.append("eval.every = 0: evaluation runs as its own --mode=eval process (parameters only)")
    return [p for p in programs if p.result is not None], resident
