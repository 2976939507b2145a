"""Construction of a run's parts from its config: tokenizer, model config, mesh, model, example builders,
datasets, and a model restored from a training checkpoint.

Shared by training, evaluation and export so that all three see the same model and the same inputs;
that is why it lives beside `sharding` and not inside `training` (evaluation must not import the trainer).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipeline import loader
from dig_jax import checkpointing, sharding
from dig_jax.config_validation import ConfigError, mesh_shape
from dig_jax.models import hf_config, hf_io
from dig_jax.processing.examples import ExampleBuilder, InputSpec, max_answer_tokens
from dig_jax.models import config as model_config
from dig_jax.models.vision import sincos_position_table
from dig_jax.models.vlm import QwenVL
from dig_jax.processing import (ImageProcessorConfig, build_tiny_tokenizer, load_tokenizer,
                                special_token_ids)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_config_from(c: ml_collections.ConfigDict, tokenizer=None) -> model_config.ModelConfig:
    """The preset (or the checkpoint's config.json), with `model.overrides` applied field by field.

    With a compact tokenizer (`model.compact_tokenizer`), the special-token ids come from the tokenizer
    and the vocabulary shrinks to the tokenizer's size rounded up to a multiple of 128.
    """
    if c.model.init_checkpoint:
        path = os.path.join(c.model.init_checkpoint, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.model.init_checkpoint: no config.json in {c.model.init_checkpoint}")
        import json

        with open(path) as f:
            cfg = hf_config.config_from_hf(json.load(f))
    else:
        cfg = model_config.preset(c.model.preset)
    changed = {}
    for section, fields in c.model.overrides.items():
        if section not in ("text", "vision"):
            raise ValueError(f"config.model.overrides.{section}: sections are 'text' and 'vision'")
        sub = getattr(cfg, section)
        for field, value in fields.items():
            if not hasattr(sub, field):
                raise ValueError(f"config.model.overrides.{section}.{field}: {section} config has no such field")
            value = tuple(value) if isinstance(getattr(sub, field), tuple) else value
            sub = dataclasses.replace(sub, **{field: value})
        changed[section] = sub
    if c.model.compact_tokenizer:
        if tokenizer is None:
            raise ValueError("config.model.compact_tokenizer: the model config needs the tokenizer's ids")
        vocab = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 128) * 128
        changed["text"] = dataclasses.replace(changed.get("text", cfg.text), vocab_size=vocab)
        cfg = dataclasses.replace(cfg, **special_token_ids(tokenizer))
    if changed:  # both sections at once: the model config validates their consistency
        cfg = dataclasses.replace(cfg, **changed)
    return cfg


def model_family(c: ml_collections.ConfigDict) -> str:
    """The family of the configured model (needed before the tokenizer, hence before the model config)."""
    if c.model.init_checkpoint:
        return model_config_from(_without_compact(c)).family
    return model_config.preset(c.model.preset).family


def _without_compact(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(c.to_dict())
    c.model.compact_tokenizer = False
    return c


def mesh_devices(c: ml_collections.ConfigDict) -> list:
    n = int(c.mesh.get("num_devices", 0) or 0)
    devices = jax.devices()
    if n < 0 or n > len(devices):
        raise ValueError(f"config.mesh.num_devices={n}: {len(devices)} devices are available")
    return devices[:n] if n else devices


def make_mesh(c: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    devices = mesh_devices(c)
    return sharding.make_mesh(mesh_shape(c, len(devices)), devices)


def tokenizer_path(c: ml_collections.ConfigDict, workdir: str, family: str) -> str:
    """The configured tokenizer.json, or the project's tiny tokenizer built once into the workdir."""
    if c.model.tokenizer_path:
        path = c.model.tokenizer_path
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config.model.tokenizer_path: {path} does not exist")
        return path
    if c.model.init_checkpoint:
        path = os.path.join(c.model.init_checkpoint, "tokenizer.json")
        if os.path.exists(path):
            return path
    compact = bool(c.model.compact_tokenizer)
    out = os.path.join(workdir, "tokenizer_compact" if compact else "tokenizer")
    path = os.path.join(out, "tokenizer.json")
    if not os.path.exists(path):
        _build_and_publish_tiny_tokenizer(out, family, compact)
    return path


def _build_and_publish_tiny_tokenizer(out: str, family: str, compact: bool) -> None:
    """Builds the tiny tokenizer in a private directory, then moves its files into `out`.

    Every host of a pod runs this on the shared workdir at the same moment. Building in place let one
    host read `tokenizer.json` while another was still writing it (a truncated JSON). Here each process
    writes its own copy and `os.replace`s the files in (atomic on one filesystem; the build is
    deterministic, so whichever copy lands last is the same bytes), `tokenizer.json` last: once it exists,
    so do its side files.
    """
    os.makedirs(out, exist_ok=True)
    private = tempfile.mkdtemp(prefix=".building-", dir=out)
    try:
        build_tiny_tokenizer(private, family=family, compact=compact)
        names = sorted(os.listdir(private), key=lambda name: name == "tokenizer.json")
        for name in names:
            os.replace(os.path.join(private, name), os.path.join(out, name))
    finally:
        shutil.rmtree(private, ignore_errors=True)


def load_run_tokenizer(c: ml_collections.ConfigDict, path: str):
    return load_tokenizer(path, require_real_ids=not c.model.compact_tokenizer)


def model_constructor(c: ml_collections.ConfigDict, cfg: model_config.ModelConfig, seed: int = 0,
                      patches_per_image: int | None = None):
    """A zero-argument constructor of the configured QwenVL (for eval_shape and sharded init).

    `patches_per_image`: DiG datasets have one image size, so the ViT can attend per image
    (`QwenVL(vision_attention_block=...)`), which is exact and much cheaper for large batches.
    """
    dtype, param_dtype = DTYPES[c.model.dtype], DTYPES[c.model.param_dtype]
    sincos_positions = c.model.vision_position_init == "sincos" and not c.model.init_checkpoint

    def construct() -> QwenVL:
        model = QwenVL(cfg, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype,
                       vision_attention_block=patches_per_image, remat=c.model.remat,
                       attention=c.model.attention)
        if sincos_positions:  # Qwen3-VL's learned ViT position table (config validation checks the family)
            table = sincos_position_table(cfg.vision.num_position_embeddings, cfg.vision.hidden_size)
            model.visual.pos_embed.weight.set_value(jnp.asarray(table, param_dtype))
        return model

    return construct


def create_model(c: ml_collections.ConfigDict, cfg: model_config.ModelConfig, mesh,
                 patches_per_image: int | None = None) -> QwenVL:
    """Random init (sharded from birth) or an HF checkpoint loaded straight into its shardings."""
    constructor = model_constructor(c, cfg, int(c.seed), patches_per_image)
    if c.model.init_checkpoint:
        return hf_io.load_into(nnx.eval_shape(constructor), cfg, c.model.init_checkpoint, mesh=mesh)
    return sharding.create_sharded(constructor, mesh)


def image_processor_config(c: ml_collections.ConfigDict, cfg: model_config.ModelConfig) -> ImageProcessorConfig:
    """The family's image preprocessing, cut to the model's patch geometry.

    Mean/std come from the family preset; patch, temporal patch and merge sizes come from the model's
    vision config, so a model with overridden geometry (e.g. `spatial_merge_size=1`) gets prompts with as
    many image tokens as its vision tower emits.
    """
    v = cfg.vision
    overrides = {"patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                 "merge_size": v.spatial_merge_size}
    if c.data.min_pixels:
        overrides["min_pixels"] = int(c.data.min_pixels)
    if c.data.max_pixels:
        overrides["max_pixels"] = int(c.data.max_pixels)
    return ImageProcessorConfig.for_family(cfg.family, **overrides)


def check_room_for_answers(c: ml_collections.ConfigDict, builder: ExampleBuilder, field: str, limit: int) -> None:
    """Fails naming `field` when its `limit` of new tokens is too short for an answer of `data.max_boxes` boxes.

    A cap below the longest answer truncates every answer with many boxes: GRPO then learns that fewer
    boxes score better and evaluation can never count high, silently. Under the Thinking template the
    answer follows the reasoning block, and a completion cut before `</think>` has no answer at all, so
    the cap must also hold `data.reasoning_budget` tokens of reasoning and the block's close (counted in
    the builder's answer). Smoke tests that only need a few tokens from a random model say so with
    `data.allow_truncated_answers`.
    """
    if c.data.allow_truncated_answers:
        return
    answer = max_answer_tokens(builder, int(c.data.max_boxes))
    need = answer + int(c.data.reasoning_budget)
    if limit < need:
        reasoning = (f" after data.reasoning_budget={c.data.reasoning_budget} tokens of reasoning"
                     if c.data.reasoning_budget else "")
        raise ConfigError(
            f"config.{field}: {limit} new tokens cannot hold an answer of data.max_boxes={c.data.max_boxes} "
            f"boxes{reasoning}, which takes up to {need} tokens with this tokenizer and prompt format; raise it "
            f"to at least {need} (or set data.allow_truncated_answers=True for a smoke test)")


def dataset_image_hw(pattern: str) -> tuple[int, int]:
    """The rendered image size of a dataset, from its first shard's first record."""
    paths = loader.list_shards(pattern)
    if not paths:
        raise FileNotFoundError(f"no ArrayRecord shard matches {pattern!r}")
    from data_pipeline import schema

    reader = loader.open_reader(paths[0])
    try:
        record = schema.decode(reader.read([0])[0])
    finally:
        reader.close()
    return tuple(record["image_a"].shape[:2])


def example_builder(c: ml_collections.ConfigDict, cfg: model_config.ModelConfig, tok_path: str, image_hw,
                    keep_images: bool = False, answer_boxes: int | None = None) -> ExampleBuilder:
    """The per-example transform; answers are padded for `answer_boxes` boxes (default data.max_boxes).

    The supervised warm-up pads only for the most differences it reads (`sft.num_differences`), so a
    one-difference warm-up does not score ~3x more padding than answer.
    """
    spec = InputSpec(family=cfg.family, image_cfg=image_processor_config(c, cfg), prompt_text=c.data.prompt,
                     add_vision_id=bool(c.data.add_vision_id), label_mode=c.data.label,
                     max_boxes=int(c.data.max_boxes), prompt_bucket=int(c.data.prompt_bucket), answer_len=1,
                     keep_images=keep_images, chat_template=c.data.chat_template)
    probe = ExampleBuilder(spec, tok_path, image_hw, require_real_ids=not c.model.compact_tokenizer)
    answer_len = max_answer_tokens(probe, int(answer_boxes or c.data.max_boxes)) + 2
    return ExampleBuilder(dataclasses.replace(spec, answer_len=answer_len), tok_path, image_hw,
                          require_real_ids=not c.model.compact_tokenizer)


def pair_dataset(c: ml_collections.ConfigDict, files: str, builder: ExampleBuilder, *, batch_size: int,
                 selection, seed: int, shuffle: bool = True, num_epochs: int | None = None,
                 corrupt: loader.CorruptRecords | None = None):
    """This process's share of a Grain pipeline of model-ready examples (`batch_size` is global)."""
    per_process = batch_size // jax.process_count()
    return loader.make_pair_dataset(
        files, batch_size=per_process, seed=seed, max_boxes=int(c.data.max_boxes), selection=selection,
        num_threads=int(c.data.num_threads), on_corrupt=c.data.on_corrupt, corrupt_records=corrupt,
        transform=builder, shuffle=shuffle, num_epochs=num_epochs, drop_remainder=shuffle)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the training checkpoints in `workdir` (none when it has no checkpoints directory)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    ckpt = checkpointing.Checkpointer(directory, save_every=1, keep=10**6, use_async=False)
    try:
        return sorted(ckpt.all_steps())
    finally:
        ckpt.close()


def restore_model(c: ml_collections.ConfigDict, workdir: str, model_cfg: model_config.ModelConfig, mesh,
                  step: int | None = None, patches_per_image: int | None = None) -> tuple[QwenVL, int]:
    """The model of a training checkpoint, its parameters placed directly onto `mesh` (any shape).

    Only the "params" item is read; the optimiser state is never materialised.
    """
    abstract_model = nnx.eval_shape(model_constructor(c, model_cfg, 0, patches_per_image))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    shardings = sharding.state_shardings(abstract_params, mesh)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_params), nnx.to_pure_dict(shardings))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=10**6, use_async=False)
    try:
        steps = ckpt.all_steps()
        step = max(steps, default=None) if step is None or step < 0 else step
        if step not in steps:
            raise checkpointing.MissingCheckpointError(
                f"{workdir}/checkpoints holds steps {sorted(steps)}, not {'any' if step is None else step} "
                "(config.eval.checkpoint_step; with no checkpoint, config.model.init_checkpoint=HF_DIR evaluates "
                "that model)")
        restored, _ = ckpt.restore({"params": target}, step=step)
    finally:
        ckpt.close()
    nnx.replace_by_pure_dict(abstract_params, restored["params"])
    return nnx.merge(graphdef, abstract_params), step
