"""Host-side glue between batches of examples and the jitted model functions.

`prompt_batch` turns a batch of examples (from `inputs.ExampleBuilder` via the loader) into the sampler's
`PromptBatch` (optionally with each prompt repeated G times for GRPO), placed on the mesh.
`rollout` samples G answers per prompt, decodes them, and scores them with the DiG reward.

Axis legend: P prompts, G group size, B = P * G rows, T max new tokens, M max boxes.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import grpo, rewards, sampling, sharding
from dig_jax.models.config import ModelConfig
from dig_jax.steps import Completions


def _place(tree, mesh: Mesh | None):
    """Row-major arrays: batch axis over the data axes where it divides; everything else replicated."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]

    def put(x):
        x = np.asarray(x)
        if x.ndim >= 1 and x.shape[0] % batch_shards == 0 and x.shape[0] >= batch_shards:
            return jax.device_put(x, sharding.data_sharding(mesh, x.ndim))
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(put, tree)


def prompt_batch(cfg: ModelConfig, batch: dict, *, group_size: int = 1, mesh: Mesh | None = None,
                 prompt_bucket: int = 64) -> sampling.PromptBatch:
    """PromptBatch for the prompts of `batch` (pixel_values float[P, Np, pd], image_grid_thw int[P, 2, 3])."""
    pixel_values = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
    grids = batch["image_grid_thw"].reshape(-1, 3)
    pb = sampling.build_prompt_batch(cfg, batch["prompt_ids"], batch["prompt_mask"], grids, pixel_values,
                                     group_size=group_size, length_multiple=prompt_bucket,
                                     pad_patches_to=pixel_values.shape[0])
    # Token-row arrays are sharded over the batch; the position ids carry the batch on axis 1; the
    # distinct images and their vision inputs are replicated (the tower sees every image).
    out = _place({"input_ids": pb.input_ids, "attention_mask": pb.attention_mask,
                  "rope_deltas": pb.rope_deltas, "feature_index": pb.feature_index}, mesh)
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    if mesh is None:
        position_ids = jax.numpy.asarray(pb.position_ids)
    else:  # int32[3, B, L]: the batch is axis 1 (replicated when it does not divide, e.g. a last eval batch)
        rows = pb.position_ids.shape[1]
        divides = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
        spec = sharding.logical_to_spec((None, "batch", None), mesh=mesh) if divides else PartitionSpec()
        position_ids = jax.device_put(pb.position_ids, NamedSharding(mesh, spec))
    put = (lambda x: jax.numpy.asarray(x)) if mesh is None else (lambda x: jax.device_put(np.asarray(x), replicated))
    return sampling.PromptBatch(
        input_ids=out["input_ids"], attention_mask=out["attention_mask"], position_ids=position_ids,
        rope_deltas=out["rope_deltas"], pixel_values=put(pb.pixel_values),
        vision=jax.tree.map(put, pb.vision), feature_index=out["feature_index"])


def answers(batch: dict, mesh: Mesh | None = None) -> Completions:
    """The supervised targets of `batch` as completions to score."""
    placed = _place({"tokens": batch["answer_ids"].astype(np.int32), "mask": batch["answer_mask"].astype(np.int32)},
                    mesh)
    return Completions(placed["tokens"], placed["mask"])


@dataclasses.dataclass
class Rollout:
    """One GRPO rollout batch on the host and device."""

    prompts: sampling.PromptBatch  # B = P * G rows
    completions: Completions  # int32[B, T]
    old_logp: jax.Array  # float32[B, T] raw-policy log-probs at sampling time
    texts: list[str]
    scores: dict[str, np.ndarray]  # per-row reward metrics, float32[B]
    advantages: np.ndarray  # float32[B]
    seconds: dict[str, float]


def decode_texts(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(tokens, mask)]


def score_texts(texts: list[str], batch: dict, group_size: int, reward_config: rewards.RewardConfig
                ) -> dict[str, np.ndarray]:
    """Reward metrics per text; text i answers prompt i // group_size."""
    rows = np.arange(len(texts)) // group_size
    gt = [batch["gt_boxes"][r][batch["gt_mask"][r]] for r in rows]
    original = [tuple(int(v) for v in batch["original_hw"][r]) for r in rows]
    resized = [tuple(int(v) for v in batch["resized_hw"][r]) for r in rows]
    return rewards.score_batch(texts, gt, original, resized, reward_config)


def rollout(model, batch: dict, *, cfg: ModelConfig, tokenizer, sampling_config: sampling.SamplingConfig,
            group_size: int, reward_config: rewards.RewardConfig, rng: jax.Array, mesh: Mesh | None,
            prompt_bucket: int, adv_eps: float = 1e-6) -> Rollout:
    """Samples `group_size` answers per prompt, decodes and scores them, and computes advantages."""
    t0 = time.perf_counter()
    prompts = prompt_batch(cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=prompt_bucket)
    gen = sampling.generate(model, prompts, rng, sampling_config)
    tokens, mask = sharding.to_host(gen.tokens), sharding.to_host(gen.completion_mask)
    t1 = time.perf_counter()
    texts = decode_texts(tokenizer, tokens, mask)
    scores = score_texts(texts, batch, group_size, reward_config)
    advantages = np.asarray(grpo.group_advantages(scores["reward"], group_size, eps=adv_eps))
    t2 = time.perf_counter()
    placed = _place({"tokens": tokens, "mask": mask}, mesh)
    return Rollout(prompts, Completions(placed["tokens"], placed["mask"]), gen.logprobs, texts, scores,
                   advantages, {"rollout": t1 - t0, "scoring": t2 - t1})


def select_rows(prompts: sampling.PromptBatch, rows: np.ndarray) -> sampling.PromptBatch:
    """The PromptBatch restricted to `rows`: every row-aligned array is taken; the distinct images and
    their vision inputs are kept whole, since `feature_index` [B, Lp] points into their features."""
    rows = jax.numpy.asarray(np.asarray(rows))
    take = lambda x, axis=0: jax.numpy.take(x, rows, axis=axis)
    return sampling.PromptBatch(
        input_ids=take(prompts.input_ids), attention_mask=take(prompts.attention_mask),
        position_ids=take(prompts.position_ids, 1), rope_deltas=take(prompts.rope_deltas),
        pixel_values=prompts.pixel_values, vision=prompts.vision,
        feature_index=None if prompts.feature_index is None else take(prompts.feature_index))
