"""Teacher-forced scoring: log-probabilities of given completions after a `PromptBatch`.

The supervised loss, the GRPO update and the reference model all score answers this way. Only the T
hidden states that predict completion tokens reach the output projection, C positions at a time, so the
float32 logits held at once are [B, C, V], never [B, L, V].

Axis legend: B rows, Lp padded prompt length, T completion length, D model width, V vocabulary,
C chunk of completion positions.
"""
from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.generate.batch import PromptBatch, image_features
from dig_jax.generate.sampler import decode_positions, project_logits

# Incremented at trace time: tests use it to show that scoring compiles once per bucket.
TRACE_COUNTS: collections.Counter = collections.Counter()
# ----------------------------------------------------------------------------------------------------
# Teacher-forced scoring
# ----------------------------------------------------------------------------------------------------

def chunked_token_logprobs(model, hidden: jax.Array, targets: jax.Array, chunk: int = 64,
                           with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """log p(targets) from hidden float[B, T, D], computing float32[B, C, V] logits C positions at a time.

    Each chunk is rematerialised in the backward pass (`jax.checkpoint`), so neither pass ever holds
    more than one chunk of full-vocabulary logits. Returns (float32[B, T], entropy float32[B, T] | None).
    """
    b, t, d = hidden.shape
    chunk = min(chunk, t)
    n = math.ceil(t / chunk)
    pad = n * chunk - t
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)  # [n, B, C, D]
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)  # [n, B, C]

    @jax.checkpoint
    def one(xs):
        h_c, y_c = xs
        logits = project_logits(model, h_c)  # float32[B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, y_c[..., None], axis=-1)[..., 0] - lse
        if not with_entropy:
            return lp, jnp.zeros_like(lp)
        return lp, lse - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)

    lp, ent = jax.lax.map(one, (h, y))
    unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
    return unchunk(lp), (unchunk(ent) if with_entropy else None)


def score_completions(model: nnx.Module, batch: PromptBatch, completions: jax.Array, completion_mask: jax.Array,
                      *, chunk: int = 64, with_entropy: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """Teacher-forced log-probs float32[B, T] of `completions` int32[B, T] after the prompts of `batch`.

    One forward (no cache) over prompt + completion. Completion positions continue each row's prompt at
    `max prompt position + 1 + j`, which is what get_rope_index gives over the concatenation (tested),
    computed on device so that this function stays traceable. The completion mask extends the attention
    mask, so tokens after EOS are invisible. A sampled image-pad id in a completion is scored as the
    ordinary token it was during decoding (no image feature). Only the T hidden states that predict completion tokens
    (slots Lp-1 .. Lp+T-2) reach the lm_head, in chunks of `chunk` positions. Masked positions are 0.
    Traceable: call it inside a jitted / differentiated loss (GRPO), or use `score_completions_jit`.
    Returns (logprobs, entropy of the temperature-1 distribution or None).
    """
    lp_len = batch.input_ids.shape[1]
    t = completions.shape[1]
    completions = jnp.asarray(completions, jnp.int32)
    mask = jnp.asarray(completion_mask, jnp.int32)
    ids = jnp.concatenate([jnp.asarray(batch.input_ids, jnp.int32), completions], axis=1)
    attn = jnp.concatenate([jnp.asarray(batch.attention_mask, jnp.int32), mask], axis=1)
    pos = jnp.concatenate([jnp.asarray(batch.position_ids, jnp.int32),
                           decode_positions(jnp.asarray(batch.attention_mask), jnp.asarray(batch.rope_deltas), t)],
                          axis=2)
    hidden, _ = model.forward(ids, attn, pos, return_hidden=True, image_features=image_features(model, batch, ids))
    hidden = hidden[:, lp_len - 1:lp_len - 1 + t]  # float[B, T, D]: the states that predict the completion
    lp, ent = chunked_token_logprobs(model, hidden, completions, chunk, with_entropy)
    lp = jnp.where(mask == 1, lp, 0.0)
    return lp, (jnp.where(mask == 1, ent, 0.0) if with_entropy else None)


def _score_impl(graphdef, state, batch, completions, completion_mask, chunk, with_entropy):
    TRACE_COUNTS["score"] += 1
    return score_completions(nnx.merge(graphdef, state), batch, completions, completion_mask, chunk=chunk,
                             with_entropy=with_entropy)


_score_jit = jax.jit(_score_impl, static_argnames=("graphdef", "chunk", "with_entropy"))


def score_completions_jit(model: nnx.Module, batch: PromptBatch, completions, completion_mask, *,
                          chunk: int = 64, with_entropy: bool = False):
    """`score_completions` as one jitted call (compiles once per shape bucket); e.g. the reference model."""
    graphdef, state = nnx.split(model)
    return _score_jit(graphdef, state, batch, completions, completion_mask, chunk, with_entropy)
