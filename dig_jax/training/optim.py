"""The optimiser: AdamW with linear warm-up and cosine decay, gradient clipping, accumulation, and an
optional frozen vision tower.

Freezing is done with `optax.multi_transform` over a label tree (`"frozen"` for vision-tower leaves),
so frozen parameters get exactly zero updates and no Adam moments are allocated for them.
"""
from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(peak: float, total_steps: int, warmup_steps: int, end_fraction: float) -> optax.Schedule:
    warmup_steps = min(max(warmup_steps, 0), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else peak, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_fraction)


def _is_vision_path(path) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) in ("visual", "vision") for k in path)


def parameter_labels(params: Any, freeze_vision: bool) -> Any:
    """"frozen" for vision-tower leaves when `freeze_vision`, else "trainable"."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if freeze_vision and _is_vision_path(path) else "trainable", params)


def make_optimizer(params: Any, *, peak_lr: float, total_steps: int, warmup_steps: int, end_fraction: float,
                   weight_decay: float, b1: float, b2: float, clip_norm: float, accum_steps: int,
                   freeze_vision: bool) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(peak_lr, total_steps, warmup_steps, end_fraction)
    chain = []
    if clip_norm and clip_norm > 0:
        chain.append(optax.clip_by_global_norm(clip_norm))
    chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    tx = optax.chain(*chain)
    if accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum_steps)
    if freeze_vision:
        tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                                   parameter_labels(params, True))
    return tx
