"""The jitted training steps: supervised warm-up and the GRPO policy update, as pure functions.

Both take the model as (graphdef, params) and return new (params, opt_state) plus metrics, so that tests
can call them directly, `jax.jit` can donate the old buffers, and the same step runs unchanged on one
device or on a mesh (the shardings come with the arrays).

Both score answers the same way: `sampling.score_completions` runs the model over prompt + completion
and computes log-probabilities only at completion positions, in vocabulary-sized chunks.

Axis legend: B rows (prompts x group), T completion length.
"""
from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dig_jax import grpo, sharding, sft
from dig_jax.sampling import PromptBatch, score_completions

# Incremented at trace time; a test asserts that each step compiles once.
TRACE_COUNTS: collections.Counter = collections.Counter()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Completions:
    """Token sequences to score after the prompts of a PromptBatch.

    tokens  int32[B, T]   answer / sampled tokens (padding after the end)
    mask    int32[B, T]   1 on tokens that count (up to and including <|im_end|>)
    """

    tokens: jax.Array
    mask: jax.Array


def pin_shardings(tree):
    """Constrains every array of `tree` (parameters, optimiser state) to the sharding of its logical axes
    (replicated when it has none); a no-op outside `sharding.activate`.

    Why: without it XLA picks the output shardings of a step freely (a replicated norm scale may come
    back sharded over fsdp), so the second call sees different input shardings and compiles the whole
    step again. Pinned, the outputs have exactly the shardings of the inputs and each step compiles once.
    """
    def pin(x):
        if isinstance(x, nnx.Variable):
            logical = x.get_metadata().get(sharding.LOGICAL_AXES_KEY)
            value = x.get_value()
            return x.replace(sharding.constrain(value, logical if logical is not None else (None,) * value.ndim))
        return sharding.constrain(x, (None,) * jnp.ndim(x)) if isinstance(x, jax.Array) else x

    return jax.tree.map(pin, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _apply_updates(tx, params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return pin_shardings(optax.apply_updates(params, updates)), pin_shardings(opt_state)


def sft_loss(graphdef: nnx.GraphDef, params: nnx.State, prompts: PromptBatch, answers: Completions,
             chunk: int) -> tuple[jax.Array, dict]:
    """Mean negative log-likelihood over answer tokens only: prompt and image positions never enter."""
    model = nnx.merge(graphdef, params)
    logp, _ = score_completions(model, prompts, answers.tokens, answers.mask, chunk=chunk)
    loss, metrics = sft.sft_loss(lambda _: logp, answers.tokens, answers.mask)
    return loss, {"loss": loss, "answer_tokens": metrics["num_tokens"], "token_nll": loss}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "chunk"), donate_argnames=("params", "opt_state"))
def sft_step(graphdef, tx: optax.GradientTransformation, params, opt_state, prompts: PromptBatch,
             answers: Completions, chunk: int = 64):
    """One supervised step; returns (params, opt_state, metrics)."""
    TRACE_COUNTS["sft_step"] += 1
    (_, metrics), grads = jax.value_and_grad(sft_loss, argnums=1, has_aux=True)(
        graphdef, params, prompts, answers, chunk)
    metrics["grad_norm"] = optax.tree.norm(grads)
    params, opt_state = _apply_updates(tx, params, opt_state, grads)
    return params, opt_state, metrics


def grpo_objective(graphdef, params, prompts: PromptBatch, completions: Completions, old_logp: jax.Array,
                   ref_logp: jax.Array | None, advantages: jax.Array, loss_config: grpo.GRPOConfig,
                   chunk: int) -> tuple[jax.Array, dict]:
    model = nnx.merge(graphdef, params)
    logp, entropy = score_completions(model, prompts, completions.tokens, completions.mask, chunk=chunk,
                                      with_entropy=True)
    return grpo.grpo_loss(logp, old_logp, advantages, completions.mask, loss_config, ref_logp=ref_logp,
                          entropy=jax.lax.stop_gradient(entropy))


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "loss_config", "chunk"),
                   donate_argnames=("params", "opt_state"))
def grpo_step(graphdef, tx: optax.GradientTransformation, params, opt_state, prompts: PromptBatch,
              completions: Completions, old_logp, ref_logp, advantages, loss_config: grpo.GRPOConfig,
              chunk: int = 64):
    """One GRPO policy update on a minibatch of rollouts; returns (params, opt_state, metrics)."""
    TRACE_COUNTS["grpo_step"] += 1
    (_, metrics), grads = jax.value_and_grad(grpo_objective, argnums=1, has_aux=True)(
        graphdef, params, prompts, completions, old_logp, ref_logp, advantages, loss_config, chunk)
    metrics["grad_norm"] = optax.tree.norm(grads)
    params, opt_state = _apply_updates(tx, params, opt_state, grads)
    return params, opt_state, metrics


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def reference_logprobs(graphdef, params, prompts: PromptBatch, completions: Completions, chunk: int = 64):
    """Log-probs of the completions under frozen parameters (the reference model): float32[B, T]."""
    TRACE_COUNTS["reference_logprobs"] += 1
    logp, _ = score_completions(nnx.merge(graphdef, params), prompts, completions.tokens, completions.mask,
                                chunk=chunk)
    return logp
