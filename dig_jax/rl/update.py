"""What the jitted training steps share: the optimiser update with pinned shardings, and trace counts.

Both steps (`sft.sft_step`, `grpo.grpo_step`) take the model as (graphdef, params) and return new
(params, opt_state) plus metrics, so that tests can call them directly, `jax.jit` can donate the old
buffers, and the same step runs unchanged on one device or on a mesh (the shardings come with the arrays).
"""
from __future__ import annotations

import collections

import optax

from dig_jax import sharding
# Incremented at trace time by every jitted step ("sft_step", "grpo_step", "reference_logprobs"); a test
# asserts that each step compiles once.
TRACE_COUNTS: collections.Counter = collections.Counter()


def apply_updates(tx: optax.GradientTransformation, params, opt_state, grads):
    """One optimiser update; outputs pinned to the inputs' shardings (`sharding.pin_shardings`)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    return sharding.pin_shardings(optax.apply_updates(params, updates)), sharding.pin_shardings(opt_state)
