"""GRPO in one place: rollout, reward, group advantages, the clipped surrogate loss with a k3 KL term,
the jitted policy update, the reference log-probs, and one whole iteration.

Axis legend: P prompts, G group size, N = P * G samples (group members contiguous), T completion length.

An iteration (`grpo_iteration`): copy the policy into the sampling layout when there is one
(`generate.sampling_layout`: decoding there moves activations, not weights), sample G answers per prompt
(`generate.sampler`), bring them back to the training layout, decode them and score
them with the injected reward function (`rewards.REWARD_FNS`, `dig` by default), turn rewards into group
advantages, cut the completions to the response-length bucket of the longest answer (`response_buckets`),
score the samples under the frozen reference when the KL term is on, then take `num_minibatches` policy
updates, each over whole groups. Choices, with the reason for each:
- Advantages use the **sample** standard deviation (ddof=1), as verl / EasyR1 (`torch.std`, unbiased by
  default), TRL (`Tensor.std`) and Tunix (`std(ddof=1)`) do: A_i = (r_i - mean) / (std + eps). A group
  whose rewards are all equal gets A = 0 (no signal), not a division blow-up.
- Clipping is asymmetric (DAPO "clip-higher"): ratio in [1 - eps_low, 1 + eps_high].
- Token-level averaging: the loss is the sum over every completion token of the batch divided by the
  number of such tokens, so long answers are not down-weighted per token.
- KL to the frozen reference with the k3 estimator, kl = exp(ref - logp) - (ref - logp) - 1 (>= 0),
  added to the loss as kl_coef * token-mean(kl). kl_coef = 0 means no reference model is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import multihost, sharding
from dig_jax.generate import sampler
from dig_jax.generate.batch import Completions, PromptBatch, prompt_batch, select_rows
from dig_jax.generate.sampling_layout import SamplingLayout, to_mesh
from dig_jax.generate.scoring import score_completions
from dig_jax.models.config import ModelConfig
from dig_jax.rl.rewards import RewardFn
from dig_jax.rl.update import TRACE_COUNTS, apply_updates

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Loss settings.

    Attributes:
      eps_low: lower clip range, ratio >= 1 - eps_low.
      eps_high: upper clip range, ratio <= 1 + eps_high.
      kl_coef: weight of the k3 KL to the reference policy; 0 disables it (ref_logp may be None).
      adv_eps: added to the group std before dividing.
      scale_by_std: divide by the group std (False gives the Dr. GRPO mean-only baseline).
    """
    eps_low: float = 0.2
    eps_high: float = 0.28
    kl_coef: float = 0.0
    adv_eps: float = 1e-6
    scale_by_std: bool = True

    def __post_init__(self):
        for name in ("eps_low", "eps_high", "kl_coef", "adv_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"GRPOConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.eps_low >= 1:
            raise ValueError(f"GRPOConfig.eps_low must be < 1, got {self.eps_low}")

    @classmethod
    def from_config(cls, grpo: ml_collections.ConfigDict) -> "GRPOConfig":
        """From the config's `grpo` section."""
        return cls(eps_low=grpo.eps_low, eps_high=grpo.eps_high, kl_coef=grpo.kl_coef,
                   scale_by_std=bool(grpo.scale_by_std))


def group_advantages(rewards: Array, group_size: int, eps: float = 1e-6,
                     scale_by_std: bool = True) -> Array:
    """float32[N] advantages from float[N] rewards, N = prompts * group_size, groups contiguous.

    A_i = (r_i - mean_g) / (std_g + eps) with the sample std (ddof=1) of the group g of sample i.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group baseline, got {group_size}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be float[N] with N a multiple of group_size={group_size}, "
                         f"got shape {rewards.shape}")
    grouped = rewards.reshape(-1, group_size)  # [prompts, G]
    centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
    if scale_by_std:
        centred = centred / (jnp.std(grouped, axis=1, ddof=1, keepdims=True) + eps)
    return centred.reshape(-1)


def _masked_mean(x: Array, mask: Array, count: Array) -> Array:
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask) / count


def grpo_loss(logp: Array, old_logp: Array, advantages: Array, completion_mask: Array,
              config: GRPOConfig = GRPOConfig(), ref_logp: Array | None = None,
              entropy: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Clipped-surrogate GRPO loss, token-level averaged, plus the k3 KL term.

    Args:
      logp: float[N, T] log-probs of the sampled completion tokens under the policy being trained.
      old_logp: float[N, T] the same under the policy that sampled them (no gradient flows).
      advantages: float[N] one per completion (broadcast over its tokens).
      completion_mask: float[N, T] 1 on completion tokens (up to and including EOS), 0 elsewhere.
      config: clip ranges and KL coefficient.
      ref_logp: float[N, T] under the frozen reference; required when config.kl_coef > 0.
      entropy: optional float[N, T] policy entropy per position, only reported.
    Returns:
      (loss, metrics). metrics: loss, pg_loss, kl (token mean, 0 when disabled), ratio_mean,
      clip_frac_low / clip_frac_high (fraction of tokens whose gradient the lower / upper clip removes),
      adv_mean / adv_std / adv_min / adv_max over completions, num_tokens, entropy (if given).
    """
    if config.kl_coef > 0 and ref_logp is None:
        raise ValueError("grpo_loss: GRPOConfig.kl_coef > 0 needs ref_logp")
    mask = completion_mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    adv = advantages.astype(jnp.float32)[:, None]  # [N, 1]
    old = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
    log_ratio = jnp.where(mask > 0, logp.astype(jnp.float32) - old, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high)
    pg_tokens = -jnp.minimum(ratio * adv, clipped * adv)  # [N, T]
    pg_loss = _masked_mean(pg_tokens, mask, count)

    if config.kl_coef > 0:
        delta = jnp.where(mask > 0, jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
                          - logp.astype(jnp.float32), 0.0)
        kl = _masked_mean(jnp.exp(delta) - delta - 1.0, mask, count)
    else:
        kl = jnp.zeros((), jnp.float32)
    loss = pg_loss + config.kl_coef * kl

    low = ((ratio < 1.0 - config.eps_low) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + config.eps_high) & (adv > 0)).astype(jnp.float32)
    sample_mask = jnp.any(mask > 0, axis=1)
    n_samples = jnp.maximum(jnp.sum(sample_mask), 1)
    adv_flat = advantages.astype(jnp.float32)
    adv_mean = jnp.sum(jnp.where(sample_mask, adv_flat, 0.0)) / n_samples
    adv_var = jnp.sum(jnp.where(sample_mask, (adv_flat - adv_mean) ** 2, 0.0)) / n_samples
    metrics = {
        "loss": loss,
        "pg_loss": pg_loss,
        "kl": kl,
        "ratio_mean": _masked_mean(ratio, mask, count),
        "clip_frac_low": _masked_mean(low, mask, count),
        "clip_frac_high": _masked_mean(high, mask, count),
        "adv_mean": adv_mean,
        "adv_std": jnp.sqrt(adv_var),
        "adv_min": jnp.min(jnp.where(sample_mask, adv_flat, jnp.inf)),
        "adv_max": jnp.max(jnp.where(sample_mask, adv_flat, -jnp.inf)),
        "num_tokens": jnp.sum(mask),
    }
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.astype(jnp.float32), mask, count)
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# The jitted update and the reference scoring
# ---------------------------------------------------------------------------------------------------
def grpo_objective(graphdef, params, prompts: PromptBatch, completions: Completions, old_logp: Array,
                   ref_logp: Array | None, advantages: Array, loss_config: GRPOConfig,
                   chunk: int) -> tuple[Array, dict]:
    model = nnx.merge(graphdef, params)
    logp, entropy = score_completions(model, prompts, completions.tokens, completions.mask, chunk=chunk,
                                      with_entropy=True)
    return grpo_loss(logp, old_logp, advantages, completions.mask, loss_config, ref_logp=ref_logp,
                     entropy=jax.lax.stop_gradient(entropy))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "loss_config", "chunk"),
                   donate_argnames=("params", "opt_state"))
def grpo_step(graphdef, tx: optax.GradientTransformation, params, opt_state, prompts: PromptBatch,
              completions: Completions, old_logp, ref_logp, advantages, loss_config: GRPOConfig,
              chunk: int = 64):
    """One GRPO policy update on a minibatch of rollouts; returns (params, opt_state, metrics)."""
    TRACE_COUNTS["grpo_step"] += 1
    (_, metrics), grads = jax.value_and_grad(grpo_objective, argnums=1, has_aux=True)(
        graphdef, params, prompts, completions, old_logp, ref_logp, advantages, loss_config, chunk)
    metrics["grad_norm"] = optax.tree.norm(grads)
    params, opt_state = apply_updates(tx, params, opt_state, grads)
    return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def reference_logprobs(graphdef, params, prompts: PromptBatch, completions: Completions, chunk: int = 64):
    """Log-probs of the completions under frozen parameters (the reference model): float32[N, T]."""
    TRACE_COUNTS["reference_logprobs"] += 1
    logp, _ = score_completions(nnx.merge(graphdef, params), prompts, completions.tokens, completions.mask,
                                chunk=chunk)
    return logp


# ---------------------------------------------------------------------------------------------------
# Rollout: sample, decode, reward, advantages
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Rollout:
    """One GRPO rollout batch on the host and device."""

    prompts: PromptBatch  # N = P * G rows
    completions: Completions  # int32[N, T]
    old_logp: Array  # float32[N, T] raw-policy log-probs at sampling time
    texts: list[str]
    scores: dict[str, np.ndarray]  # per-row reward metrics, float32[N]
    advantages: np.ndarray  # float32[N]
    lengths: np.ndarray  # int[N] tokens of each completion (EOS included), from the host copy of the mask
    seconds: dict[str, float]


def decode_texts(tokenizer, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(tokens, mask)]


def rollout(model, batch: dict, *, cfg: ModelConfig, tokenizer, sampling_config: sampler.SamplingConfig,
            group_size: int, reward_fn: RewardFn, rng: Array, mesh: Mesh | None, prompt_bucket: int,
            loss_config: GRPOConfig = GRPOConfig(), transfer_guard: str = "allow",
            layout: SamplingLayout | None = None) -> Rollout:
    """Samples `group_size` answers per prompt, decodes and scores them, and computes advantages.

    `batch` is this host's share of the prompts; the sampled tokens and the reward's fields are gathered
    from every host, so the reward and the advantages are those of the global batch, on every host.

    With a sampling `layout`, `model` is the policy's copy in it (`SamplingLayout.policy`): the prompts
    are placed on its mesh, decoding runs there (and its KV cache lives there), and the sampled tokens,
    mask and log-probs come back in the training layout of `mesh`, beside the prompts placed there
    again for the update. Without one, everything stays on `mesh`.

    `transfer_guard` applies to the jitted sampler call ("disallow": any implicit host <-> device
    transfer inside it is an error; everything it reads was placed explicitly).
    """
    t0 = time.perf_counter()
    sampling_mesh = mesh if layout is None else layout.mesh
    prompts = prompt_batch(cfg, batch, group_size=group_size, mesh=sampling_mesh, prompt_bucket=prompt_bucket,
                           process_local=True)
    if mesh is not None:  # the key (the same on every host) is replicated over the mesh, as the sampler reads it
        replicated = jax.device_put(np.asarray(jax.random.key_data(rng)),
                                    NamedSharding(sampling_mesh, PartitionSpec()))
        rng = jax.random.wrap_key_data(replicated, impl=jax.random.key_impl(rng))
    on_layout = contextlib.nullcontext() if layout is None else sharding.activate(layout.mesh)
    with jax.transfer_guard(transfer_guard), on_layout:
        gen = sampler.generate(model, prompts, rng, sampling_config)
    if layout is not None:  # while the decode runs: the update's inputs in the training layout
        prompts = prompt_batch(cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=prompt_bucket,
                               process_local=True)
        gen = dataclasses.replace(gen, **to_mesh({"tokens": gen.tokens, "completion_mask": gen.completion_mask,
                                                  "logprobs": gen.logprobs}, mesh))
    tokens, mask = multihost.to_host(gen.tokens), multihost.to_host(gen.completion_mask)
    t1 = time.perf_counter()
    texts = decode_texts(tokenizer, tokens, mask)
    scores = reward_fn(texts, multihost.reward_fields(batch), group_size)  # gathered: no pixels
    advantages = np.asarray(group_advantages(scores["reward"], group_size, eps=loss_config.adv_eps,
                                             scale_by_std=loss_config.scale_by_std))
    t2 = time.perf_counter()
    # The update scores the sampled tokens where the sampler left them (no second upload).
    return Rollout(prompts, Completions(gen.tokens, gen.completion_mask), gen.logprobs, texts, scores, advantages,
                   mask.sum(axis=1), {"rollout": t1 - t0, "scoring": t2 - t1})


# ---------------------------------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IterationSetup:
    """What a GRPO iteration needs besides the training state; built once per run."""

    graphdef: nnx.GraphDef
    model_cfg: ModelConfig
    tokenizer: object
    mesh: Mesh | None
    sampling: sampler.SamplingConfig
    loss: GRPOConfig
    reward_fn: RewardFn
    group_size: int
    num_minibatches: int = 1
    prompt_bucket: int = 64
    scoring_chunk: int = 64
    response_buckets: tuple[int, ...] = ()  # see `response_buckets`; () = always sampling.max_new_tokens
    transfer_guard: str = "allow"  # around the jitted calls: "disallow" makes implicit transfers errors
    sampling_layout: SamplingLayout | None = None  # None: decode on the training mesh (`generate.sampling_layout`)


def response_buckets(max_new_tokens: int, smallest: int) -> tuple[int, ...]:
    """The completion lengths the reference scoring and the update compile for: powers of two from
    `smallest` that are below the cap, then the cap (`smallest` = 0: the cap only, no bucketing).

    An iteration scores its completions over the bucket of its longest answer, not over the whole cap:
    positions past every answer's end are masked out of the loss and invisible to attention, so dropping
    them changes no value, only the work (and each bucket compiles once)."""
    if smallest <= 0 or smallest >= max_new_tokens:
        return (max_new_tokens,)
    return tuple(smallest * 2 ** i for i in range(math.ceil(math.log2(max_new_tokens / smallest)))) + (max_new_tokens,)


def bucket_for(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `length` positions (buckets ascending, the last one the cap)."""
    return next((b for b in buckets if b >= length), buckets[-1])


def truncated(ro: Rollout, t: int) -> Rollout:
    """`ro` with completions, masks and sampling log-probs cut to their first `t` positions (all the
    answers' tokens must lie in them)."""
    if t >= ro.completions.tokens.shape[1]:
        return ro
    if int(ro.lengths.max()) > t:
        raise ValueError(f"truncated: an answer has {int(ro.lengths.max())} tokens, more than the bucket's {t}")
    cut = lambda x: x[:, :t]  # noqa: E731
    return dataclasses.replace(ro, completions=Completions(cut(ro.completions.tokens), cut(ro.completions.mask)),
                               old_logp=cut(ro.old_logp))


def minibatches(ro: Rollout, ref_logp: Array | None, num_minibatches: int, group_size: int, mesh: Mesh | None):
    """Yields (prompts, completions, old_logp, ref_logp, advantages) per minibatch of whole groups, in order.

    The advantages are placed with the batch sharding of the rows they weigh."""
    advantages = sharding.place_batch(ro.advantages, mesh)
    if num_minibatches == 1:
        yield ro.prompts, ro.completions, ro.old_logp, ref_logp, advantages
        return
    n_prompts = ro.advantages.shape[0] // group_size
    per_mb = n_prompts // num_minibatches * group_size
    take = lambda x, rows: None if x is None else jnp.take(x, jax.device_put(rows), axis=0)
    for mb in range(num_minibatches):
        rows = np.arange(mb * per_mb, (mb + 1) * per_mb)
        comps = Completions(take(ro.completions.tokens, rows), take(ro.completions.mask, rows))
        yield (select_rows(ro.prompts, rows), comps, *(take(x, rows) for x in (ro.old_logp, ref_logp, advantages)))


def grpo_iteration(setup: IterationSetup, tx, params, opt_state, reference, batch: dict, key: Array):
    """Rollout -> reward -> advantages -> `num_minibatches` policy updates. Returns new state and metrics."""
    layout = setup.sampling_layout
    t0 = time.perf_counter()
    policy = params if layout is None else jax.block_until_ready(layout.policy(params))  # once per iteration
    reshard_seconds = time.perf_counter() - t0
    ro = rollout(nnx.merge(setup.graphdef, policy), batch, cfg=setup.model_cfg, tokenizer=setup.tokenizer,
                 sampling_config=setup.sampling, group_size=setup.group_size, reward_fn=setup.reward_fn, rng=key,
                 mesh=setup.mesh, prompt_bucket=setup.prompt_bucket, loss_config=setup.loss,
                 transfer_guard=setup.transfer_guard, layout=layout)
    del policy  # the sampling copy's HBM is free again before the update
    if layout is not None:
        ro.seconds["reshard"] = reshard_seconds
    if setup.response_buckets:
        ro = truncated(ro, bucket_for(int(ro.lengths.max()), setup.response_buckets))
    t0 = time.perf_counter()
    ref_logp = None
    if reference is not None:
        with jax.transfer_guard(setup.transfer_guard):
            ref_logp = reference_logprobs(setup.graphdef, reference, ro.prompts, ro.completions,
                                          chunk=setup.scoring_chunk)
        ref_logp = jax.block_until_ready(ref_logp)
    ro.seconds["scoring"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    update_metrics = []
    for prompts, comps, old, ref, adv in minibatches(ro, ref_logp, setup.num_minibatches, setup.group_size, setup.mesh):
        with jax.transfer_guard(setup.transfer_guard):
            params, opt_state, out = grpo_step(setup.graphdef, tx, params, opt_state, prompts, comps, old, ref,
                                               adv, setup.loss, chunk=setup.scoring_chunk)
        update_metrics.append(jax.device_get(out))
    ro.seconds["update"] = time.perf_counter() - t0
    return params, opt_state, iteration_metrics(ro, update_metrics)


# Per-row reward metrics that an iteration logs (as their batch means) when the reward function returns them.
_LOGGED_SCORES = {"f1": "reward/f1", "mean_iou": "reward/iou", "format_ok": "reward/format"}


def iteration_metrics(ro: Rollout, update_metrics: list[dict]) -> dict[str, float]:
    s = ro.scores
    metrics = {"reward/mean": float(s["reward"].mean()), "reward/std": float(s["reward"].std())}
    metrics.update({name: float(s[key].mean()) for key, name in _LOGGED_SCORES.items() if key in s})
    metrics["grpo/response_length"] = float(ro.lengths.mean())
    metrics["grpo/scored_length"] = float(ro.completions.tokens.shape[1])  # the response bucket
    for key in update_metrics[0]:
        metrics[f"grpo/{key}"] = float(np.mean([float(m[key]) for m in update_metrics]))
    for key, seconds in ro.seconds.items():
        metrics[f"time/{key}"] = seconds
    return metrics
