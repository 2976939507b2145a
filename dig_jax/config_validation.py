"""Checks a training config before anything compiles; every error names the offending field.

The checks that need the devices (the mesh must divide them, batches must divide the data axes) take the
device count as an argument so they are testable without real hardware.
"""
from __future__ import annotations

import math

import ml_collections

from dig_jax import sharding
from dig_jax.generate import sampling_layout
from dig_jax.rl.curriculum import Curriculum
from dig_jax.models import config as model_config
from dig_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from dig_jax.models.layers import REMAT_POLICIES
from dig_jax.processing.template import CHAT_TEMPLATE_STYLES

_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message starts with the field's dotted path."""


def _fail(field: str, why: str):
    raise ConfigError(f"config.{field}: {why}")


def _positive(c, field: str, allow_zero: bool = False):
    value = _value(c, field)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
        _fail(field, f"must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")
    return value


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """Resolves the (data, fsdp, tensor) mesh shape; -1 in one axis takes the remaining devices.

    The resolution is `sharding.resolve_mesh_shape` (the one the mesh is built with); its errors come
    back worded for the config fields."""
    shape = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
    names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
    for name, s in zip(names, shape):
        if not isinstance(s, int) or (s <= 0 and s != -1):
            _fail(name, f"must be a positive integer or -1, got {s!r}")
    try:
        return sharding.resolve_mesh_shape(shape, num_devices)
    except sharding.MeshShapeError as e:
        if e.reason == "fill":
            _fail("mesh", f"at most one axis may be -1, got data={shape[0]} fsdp={shape[1]} tensor={shape[2]}")
        if e.reason == "divide":
            known = math.prod(s for s in shape if s != -1)
            _fail("mesh", f"fsdp x tensor x data = {known} x ... does not divide the {num_devices} devices")
        d, f, t = e.shape
        _fail("mesh", f"data={d} x fsdp={f} x tensor={t} = {math.prod(e.shape)} devices, "
                      f"but {num_devices} are available")


def validate(c: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Raises ConfigError naming the first field that cannot work (checked in the order below)."""
    _check_model(c)
    _check_batches(c, num_devices, num_processes)
    _check_optimisation(c)
    _check_data(c)
    _check_curriculum(c)
    _check_reward_eval_and_logging(c)


def _value(c, field: str):
    """The value at a dotted path; a ConfigError naming the field when it is missing."""
    value = c
    for part in field.split("."):
        if part not in value:
            _fail(field, "is missing")
        value = value[part]
    return value


def _check_model(c) -> None:
    if c.model.preset not in model_config.PRESETS:
        _fail("model.preset", f"{c.model.preset!r} is not one of {sorted(model_config.PRESETS)}")
    for field in ("model.dtype", "model.param_dtype"):
        value = c.model[field.split(".")[1]]
        if value not in _DTYPES:
            _fail(field, f"{value!r} is not one of {_DTYPES}")
    if not c.model.init_checkpoint and not c.model.preset.endswith("_tiny"):
        _fail("model.init_checkpoint", f"preset {c.model.preset!r} is full-size: give an HF checkpoint directory "
                                       "(random init is for the tiny presets only)")
    if _value(c, "model.remat") not in REMAT_POLICIES:
        _fail("model.remat", f"{c.model.remat!r} is not one of {REMAT_POLICIES}")
    if _value(c, "model.attention") not in ATTENTION_IMPLEMENTATIONS:
        _fail("model.attention", f"{c.model.attention!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if c.model.vision_position_init not in ("normal", "sincos"):
        _fail("model.vision_position_init", f"{c.model.vision_position_init!r} is not 'normal' or 'sincos'")
    if c.model.vision_position_init == "sincos" and not c.model.preset.startswith("qwen3_vl"):
        _fail("model.vision_position_init", f"'sincos' initialises Qwen3-VL's learned position table; preset "
                                            f"{c.model.preset!r} has none")


def _check_batches(c, num_devices: int, num_processes: int) -> None:
    data, fsdp, _ = mesh_shape(c, num_devices)
    batch_axes = data * fsdp
    in_use = {"sft.batch_size": c.sft.steps > 0, "grpo.prompts_per_batch": c.grpo.steps > 0, "eval.batch_size": True}
    for field, used in in_use.items():
        value = _positive(c, field)
        if not used:
            continue
        if value % batch_axes:
            _fail(field, f"{value} does not divide over the data x fsdp = {batch_axes} batch shards of the mesh")
        if value % num_processes:
            _fail(field, f"{value} does not divide over the {num_processes} processes")
    prompts = c.grpo.prompts_per_batch
    if c.grpo.num_minibatches <= 0 or prompts % c.grpo.num_minibatches:
        _fail("grpo.num_minibatches", f"{c.grpo.num_minibatches} must divide grpo.prompts_per_batch = {prompts} "
                                      "(minibatches hold whole groups)")
    rows = prompts // c.grpo.num_minibatches * c.grpo.group_size
    if c.grpo.steps and rows % batch_axes:
        _fail("grpo.num_minibatches", f"each minibatch of {rows} sequences must divide over the {batch_axes} "
                                      "batch shards")
    _check_sampling_mesh(c, num_devices, num_processes)


def _check_sampling_mesh(c, num_devices: int, num_processes: int) -> None:
    try:
        choice = sampling_layout.parse(_value(c, "grpo.sampling_mesh"))
    except ValueError as e:
        _fail("grpo.sampling_mesh", str(e))
    if c.grpo.steps and isinstance(choice, int):
        problem = sampling_layout.tensor_problem(
            choice, num_devices=num_devices, devices_per_process=num_devices // num_processes,
            num_processes=num_processes, rows=c.grpo.prompts_per_batch * c.grpo.group_size)
        if problem:
            _fail("grpo.sampling_mesh", problem)


def _check_optimisation(c) -> None:
    for field in ("sft.steps", "grpo.steps"):
        _positive(c, field, allow_zero=True)
    for field in ("grpo.group_size", "grpo.max_new_tokens", "optim.learning_rate", "sft.learning_rate",
                  "checkpoint.every", "checkpoint.keep", "log.every", "optim.grad_accum_steps",
                  "data.max_boxes", "data.prompt_bucket", "eval.max_new_tokens"):
        _positive(c, field)
    grpo_seed = _value(c, "grpo.seed")
    if grpo_seed is not None and (isinstance(grpo_seed, bool) or not isinstance(grpo_seed, int) or grpo_seed < 0):
        _fail("grpo.seed", f"must be None (continue the run's key) or an int >= 0, got {grpo_seed!r}")
    if c.grpo.group_size < 2 and c.grpo.steps:
        _fail("grpo.group_size", "GRPO needs at least 2 samples per prompt to normalise advantages")
    if not 0 <= c.grpo.top_p <= 1:
        _fail("grpo.top_p", f"must be in [0, 1], got {c.grpo.top_p}")
    if c.grpo.temperature < 0:
        _fail("grpo.temperature", f"must be >= 0, got {c.grpo.temperature}")
    if c.grpo.reference_dtype not in _DTYPES:
        _fail("grpo.reference_dtype", f"{c.grpo.reference_dtype!r} is not one of {_DTYPES}")
    for field in ("grpo.eps_low", "grpo.eps_high", "grpo.kl_coef"):
        _positive(c, field, allow_zero=True)
    if not isinstance(_value(c, "grpo.scale_by_std"), bool):
        _fail("grpo.scale_by_std", f"must be True or False, got {c.grpo.scale_by_std!r}")
    chunk = _value(c, "grpo.scoring_chunk")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        _fail("grpo.scoring_chunk", f"must be an int >= 1 (completion positions per logits chunk), got {chunk!r}")
    bucket = _value(c, "grpo.response_bucket")
    if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 0:
        _fail("grpo.response_bucket", f"must be an int >= 0 (the smallest response-length bucket; 0 = always "
                                      f"grpo.max_new_tokens), got {bucket!r}")
    if not 0 <= c.reward.alpha <= 1:
        _fail("reward.alpha", f"must be in [0, 1], got {c.reward.alpha}")
    if not 0 < c.reward.iou_threshold <= 1:
        _fail("reward.iou_threshold", f"must be in (0, 1], got {c.reward.iou_threshold}")
    for field in ("reward.count_weight", "reward.extra_box_penalty"):  # ours; 0 = the paper's reward
        weight = _value(c, field)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            _fail(field, f"must be a number >= 0 (0 = the paper's reward), got {weight!r}")


def _check_data(c) -> None:
    if c.data.on_corrupt not in ("error", "skip"):
        _fail("data.on_corrupt", f"{c.data.on_corrupt!r} is not 'error' or 'skip'")
    if (c.sft.steps or c.grpo.steps) and not c.data.train_files:
        _fail("data.train_files", "is empty: give a glob of ArrayRecord shards (python -m data_pipeline.generate)")
    nd = tuple(c.sft.num_differences)
    if not nd or any(not isinstance(n, int) or n < 0 for n in nd) or max(nd) > c.data.max_boxes:
        _fail("sft.num_differences", f"{nd} must be non-negative difference counts <= data.max_boxes "
                                     f"({c.data.max_boxes})")
    _check_chat_template(c)


def _check_chat_template(c) -> None:
    """The template style, and the reasoning budget the generation-cap check adds for "thinking"."""
    template = _value(c, "data.chat_template")
    if template not in CHAT_TEMPLATE_STYLES:
        _fail("data.chat_template", f"{template!r} is not one of {CHAT_TEMPLATE_STYLES}")
    if template == "thinking" and not c.model.preset.startswith("qwen3_vl"):
        _fail("data.chat_template", f"'thinking' is the Qwen3-VL Thinking checkpoints' template; preset "
                                    f"{c.model.preset!r} has none")
    budget = _value(c, "data.reasoning_budget")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        _fail("data.reasoning_budget", f"must be an int >= 0 (tokens of reasoning), got {budget!r}")
    if budget and template != "thinking":
        _fail("data.reasoning_budget", f"{budget} reasoning tokens, but data.chat_template={template!r} has no "
                                       "reasoning block (0 unless 'thinking')")


def _check_curriculum(c) -> None:
    if not c.curriculum.phases and c.grpo.steps:
        _fail("curriculum.phases", "GRPO needs at least one phase")
    if not c.curriculum.phases:
        return
    try:  # the trainer builds the same object; its errors already name `curriculum.phases[i].field`
        curriculum = Curriculum(list(c.curriculum.phases))
    except ValueError as e:
        raise ConfigError(f"config.{e}") from None
    if c.reward.get("fn", "dig") != "dig":
        return
    for i, phase in enumerate(curriculum.phases):
        # Every DiG reward is >= 0 and the threshold is inclusive: such a phase would end at its first window.
        if phase.reward_threshold is not None and phase.reward_threshold <= 0:
            _fail(f"curriculum.phases[{i}].reward_threshold",
                  f"{phase.reward_threshold} is met by every window of DiG rewards (all >= 0), so phase "
                  f"{phase.name!r} would end after its first {phase.window} steps; use None to end it after "
                  "max_steps only")


def _check_reward_eval_and_logging(c) -> None:
    from dig_jax.rl.rewards import REWARD_FNS  # lazily: scipy and the answer parser are not needed above

    fn = _value(c, "reward.fn")
    if not isinstance(fn, str) or fn not in REWARD_FNS:
        _fail("reward.fn", f"{fn!r} is not one of {sorted(REWARD_FNS)}")
    every = _value(c, "eval.every")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        _fail("eval.every", f"must be an int >= 0 (0 = only in --mode=eval), got {every!r}")
    validate_evaluators(c)
    guard = _value(c, "log.transfer_guard")
    if guard not in ("allow", "log", "disallow"):
        _fail("log.transfer_guard", f"{guard!r} is not 'allow', 'log' or 'disallow'")


def validate_evaluators(c) -> None:
    """`eval.evaluators` and the sections of those it lists (also what `--mode=eval` checks first)."""
    evaluators = _value(c, "eval.evaluators")
    if isinstance(evaluators, str) or not isinstance(evaluators, (tuple, list)) or not evaluators \
            or not all(isinstance(name, str) and name for name in evaluators):
        _fail("eval.evaluators", f"must be a non-empty tuple of evaluator names (strings), got {evaluators!r}")
    if "rec" in evaluators:
        _check_rec(c)
    if "perception" in evaluators:
        _check_perception(c)


def _check_question_sizes(c, section: str) -> None:
    for name in ("image_size", "max_text_tokens", "max_new_tokens"):
        value = _value(c, f"{section}.{name}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"{section}.{name}", f"must be a positive int, got {value!r}")
    value = _value(c, f"{section}.max_examples")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(f"{section}.max_examples", f"must be an int >= 0 (0 = all), got {value!r}")


def _check_rec(c) -> None:
    """The REC evaluator's section (only when `eval.evaluators` lists "rec")."""
    from dig_jax.eval import refer  # lazily: the evaluators' modules are not needed for training alone

    data_dir = _value(c, "eval.rec.data_dir")
    if not isinstance(data_dir, str) or not data_dir:
        _fail("eval.rec.data_dir", "the REC evaluator needs the directory prepared by python -m "
                                   "dig_jax.eval.prepare_refcoco --manual_dir=... --data_dir=...")
    splits = _value(c, "eval.rec.splits")
    known = [f"{name}/{split}" for name, (_, _, splits_) in refer.DATASETS.items() for split in splits_]
    if isinstance(splits, str) or not isinstance(splits, (tuple, list)) or not splits:
        _fail("eval.rec.splits", f"must be a non-empty tuple of split names from {known}, got {splits!r}")
    for split in splits:
        if split not in known:
            _fail("eval.rec.splits", f"{split!r} is not one of {known}")
    prompt = _value(c, "eval.rec.prompt")
    if not isinstance(prompt, str) or (prompt and "{expr}" not in prompt):
        _fail("eval.rec.prompt", f"must be empty (the family's prompt) or contain {{expr}}, got {prompt!r}")
    _check_question_sizes(c, "eval.rec")


def _check_perception(c) -> None:
    """The perception evaluator's section (only when `eval.evaluators` lists "perception")."""
    from dig_jax.eval import perception

    benchmarks = _value(c, "eval.perception.benchmarks")
    if isinstance(benchmarks, str) or not isinstance(benchmarks, (tuple, list)) or not benchmarks:
        _fail("eval.perception.benchmarks", f"must be a non-empty tuple of 'kind:path' strings, got {benchmarks!r}")
    for entry in benchmarks:
        kind, sep, path = str(entry).partition(":")
        if not sep or kind not in perception.KINDS or not path:
            _fail("eval.perception.benchmarks", f"{entry!r} is not 'kind:path' with kind one of {perception.KINDS}")
    _check_question_sizes(c, "eval.perception")
