"""GRPO: group-normalised advantages, the clipped surrogate loss with a k3 KL term, minibatching.

Axis legend: N samples (prompts x group size G, group members contiguous), T completion length.

Pure functions on per-token log-probs, so the trainer can score them however it likes (see
`sft.token_logprobs`). Choices, with the reason for each:
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

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def split_minibatches(batch: Any, num_minibatches: int, seed: int | None = None) -> list[Any]:
    """Split a rollout batch (a pytree of arrays with a common leading axis N) into equal minibatches.

    Deterministic: with seed=None the order is kept; with an int seed the samples are permuted by
    numpy's default_rng(seed) first (same seed, same split). Raises when N is not divisible.
    """
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError("split_minibatches: the batch has no arrays")
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("split_minibatches: every leaf needs the same leading axis, got "
                         f"{sorted(sizes, key=str)}")
    (n,) = sizes
    if num_minibatches < 1 or n % num_minibatches:
        raise ValueError(f"split_minibatches: {n} samples do not split into {num_minibatches} "
                         "equal minibatches")
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    parts: Sequence[np.ndarray] = np.split(order, num_minibatches)
    return [jax.tree.map(lambda x, idx=idx: x[idx], batch) for idx in parts]
