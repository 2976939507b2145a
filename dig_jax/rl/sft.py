"""Supervised warm-up: the teacher-forced answer NLL and the jitted step.

The model sees the prompt (chat template, both images) and is trained to produce the reference answer;
only answer tokens enter the loss, prompt, image and padding positions never do. Answers are scored with
`generate.scoring.score_completions` (the same scorer as GRPO), which never holds more than a chunk of
`[rows, chunk, V]` logits.

Axis legend: B rows, T answer length, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dig_jax.generate.batch import Completions, PromptBatch
from dig_jax.generate.scoring import score_completions
from dig_jax.rl.update import TRACE_COUNTS, apply_updates

Array = jax.Array


def logits_token_logprobs(logits: Array, targets: Array) -> Array:
    """float32[B, L]: log softmax(logits)[b, t, targets[b, t]], from float[B, L, V] logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sft_loss(logits_or_scorer: Array | Callable[[Array], Array], targets: Array,
             loss_mask: Array) -> tuple[Array, dict[str, Array]]:
    """Teacher-forced cross-entropy averaged over answer tokens only.

    Args:
      logits_or_scorer: float[B, L, V] logits, or a callable `targets -> float32[B, L]` log-probs (the
        step passes the scorer's, which never materialise [B, L, V]).
      targets: int[B, L] the token each position must produce.
      loss_mask: float[B, L], 1 at answer positions, 0 at prompt / image / pad positions.
    Returns:
      (loss, metrics) with metrics {loss, num_tokens, accuracy (logits only)}. The loss is the sum of
      masked negative log-likelihoods divided by the number of answer tokens (at least 1).
    """
    mask = loss_mask.astype(jnp.float32)
    metrics = {}
    if callable(logits_or_scorer):
        logp = logits_or_scorer(targets)
    else:
        logits = logits_or_scorer
        logp = logits_token_logprobs(logits, targets)
        hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
        metrics["accuracy"] = jnp.sum(hit * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    # where, not multiply: a masked position's -inf / NaN log-prob must not leak into loss or gradient.
    nll = jnp.where(mask > 0, -logp, 0.0) * mask
    num_tokens = jnp.sum(mask)
    loss = jnp.sum(nll) / jnp.maximum(num_tokens, 1.0)
    metrics.update(loss=loss, num_tokens=num_tokens)
    return loss, metrics


def sft_objective(graphdef: nnx.GraphDef, params: nnx.State, prompts: PromptBatch, answers: Completions,
                  chunk: int) -> tuple[jax.Array, dict]:
    """Mean negative log-likelihood of the model over answer tokens only: prompt and image positions never enter."""
    model = nnx.merge(graphdef, params)
    logp, _ = score_completions(model, prompts, answers.tokens, answers.mask, chunk=chunk)
    loss, metrics = sft_loss(lambda _: logp, answers.tokens, answers.mask)
    return loss, {"loss": loss, "answer_tokens": metrics["num_tokens"], "token_nll": loss}


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "chunk"), donate_argnames=("params", "opt_state"))
def sft_step(graphdef, tx: optax.GradientTransformation, params, opt_state, prompts: PromptBatch,
             answers: Completions, chunk: int = 64):
    """One supervised step; returns (params, opt_state, metrics)."""
    TRACE_COUNTS["sft_step"] += 1
    (_, metrics), grads = jax.value_and_grad(sft_objective, argnums=1, has_aux=True)(
        graphdef, params, prompts, answers, chunk)
    metrics["grad_norm"] = optax.tree.norm(grads)
    params, opt_state = apply_updates(tx, params, opt_state, grads)
    return params, opt_state, metrics
