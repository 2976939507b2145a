"""A training run's parts, built once from its config before anything compiles: `Run`.

The construction of each part (tokenizer, model, mesh, example builders) lives in `dig_jax.assemble`,
which evaluation shares; this module decides which parts a training run needs and checks them.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from dig_jax import assemble, sharding
from dig_jax.config_validation import validate
from dig_jax.generate import sampling_layout
from dig_jax.generate.sampler import SamplingConfig
from dig_jax.generate.sampling_layout import SamplingLayout
from dig_jax.processing.examples import ExampleBuilder
from dig_jax.rl import grpo, rewards
from dig_jax.rl.curriculum import Curriculum


@dataclasses.dataclass
class Run:
    """What the loop needs, built once from the config."""

    config: ml_collections.ConfigDict
    workdir: str
    model_cfg: object
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params: nnx.State  # as initialised (random or from init_checkpoint); the loop's state starts here
    tokenizer: object
    tok_path: str  # the tokenizer.json the run uses (evaluators build their examples from it)
    builder: ExampleBuilder  # GRPO prompts (answers sized for data.max_boxes)
    sft_builder: ExampleBuilder  # warm-up examples (answers sized for max(sft.num_differences))
    curriculum: Curriculum
    grpo: grpo.IterationSetup

    @property
    def total_steps(self) -> int:
        return self.config.sft.steps + self.config.grpo.steps


def setup(c: ml_collections.ConfigDict, workdir: str, reward_fn: rewards.RewardFn | None = None) -> Run:
    """Validates `c` and builds the run's parts. `reward_fn` replaces the one `reward.fn` names."""
    validate(c, len(assemble.mesh_devices(c)), jax.process_count())
    tok_path = assemble.tokenizer_path(c, workdir, assemble.model_family(c))
    tokenizer = assemble.load_run_tokenizer(c, tok_path)
    model_cfg = assemble.model_config_from(c, tokenizer)
    mesh = assemble.make_mesh(c)
    image_hw = assemble.dataset_image_hw(c.data.train_files)
    builder = assemble.example_builder(c, model_cfg, tok_path, image_hw)
    sft_builder = assemble.example_builder(c, model_cfg, tok_path, image_hw, answer_boxes=max(c.sft.num_differences))
    if c.grpo.steps:
        assemble.check_room_for_answers(c, builder, "grpo.max_new_tokens", c.grpo.max_new_tokens)
    with sharding.activate(mesh):
        model = assemble.create_model(c, model_cfg, mesh, patches_per_image=builder.patches_per_image)
    graphdef, params = nnx.split(model, nnx.Param)
    layout = _sampling_layout(c, mesh, model_cfg, params)
    iteration = grpo.IterationSetup(
        graphdef=graphdef, model_cfg=model_cfg, tokenizer=tokenizer, mesh=mesh,
        sampling=SamplingConfig.from_config(c.grpo, model_cfg), loss=grpo.GRPOConfig.from_config(c.grpo),
        reward_fn=reward_fn or rewards.reward_fn_from_config(c.reward, model_cfg.family, c.data.chat_template),
        group_size=int(c.grpo.group_size), num_minibatches=int(c.grpo.num_minibatches),
        prompt_bucket=int(c.data.prompt_bucket), scoring_chunk=int(c.grpo.scoring_chunk),
        response_buckets=grpo.response_buckets(int(c.grpo.max_new_tokens), int(c.grpo.response_bucket)),
        transfer_guard=c.log.transfer_guard, sampling_layout=layout)
    return Run(c, workdir, model_cfg, mesh, graphdef, params, tokenizer, tok_path, builder, sft_builder,
               Curriculum(list(c.curriculum.phases)), iteration)


def _sampling_layout(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model_cfg,
                     params: nnx.State) -> SamplingLayout | None:
    """The rollout's sampling layout (`grpo.sampling_mesh`), or None to decode on the training mesh.

    "auto" sizes the copy against the chip's memory limit where the runtime states one (TPU, GPU: the
    `bytes_limit` of `memory_stats`); CPU devices state none, and any tensor group fits there."""
    if not c.grpo.steps:
        return None
    stats = jax.local_devices()[0].memory_stats() or {}  # this host's chip: another host's cannot be asked
    return sampling_layout.for_run(c.grpo.sampling_mesh, training_mesh=mesh, num_processes=jax.process_count(),
                                   rows=int(c.grpo.prompts_per_batch) * int(c.grpo.group_size), model_cfg=model_cfg,
                                   params=params, dtype=assemble.DTYPES[c.model.dtype],
                                   hbm_bytes=stats.get("bytes_limit"))
