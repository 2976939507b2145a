"""Supervised warm-up loss and the memory-aware token scorer shared with GRPO.

Axis legend: B batch, L sequence length, D model width, V vocabulary, C vocabulary chunk.

Why a chunked scorer: with V = 151936, float32 logits for B=8, L=2048 are 10 GB. Training needs only
log p(target) (and, for monitoring, the entropy) at each position, so `token_logprobs` / `entropy`
stream over vocabulary chunks with an online log-sum-exp, holding float32[B, L, C] at a time; each
chunk is rematerialised in the backward pass (`jax.checkpoint`), so gradients do not store the full
logits either. Chunks are sliced from the projection in place. To score only some positions (e.g. the
completion of a GRPO rollout), slice `hidden` / `targets` to them before calling: cost is linear in B*L.
Measured (XLA temp bytes of value+grad, B=8, L=2048, D=2048, V=151936, bf16): full logits 29.0 GiB,
chunk 8192 2.7 GiB, chunk 2048 1.5 GiB.

Conventions: position t of `logits` / `hidden` predicts token t + 1 of the input, so `targets[:, t]` is
`input_ids[:, t + 1]` and `loss_mask[:, t]` is 1 exactly where that next token is an answer token
(prompt, image and padding positions are 0). `build_sft_targets` makes these arrays on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ---------------------------------------------------------------------------------------------------
# Full-logits path
# ---------------------------------------------------------------------------------------------------
def logits_token_logprobs(logits: Array, targets: Array) -> Array:
    """float32[B, L]: log softmax(logits)[b, t, targets[b, t]], from float[B, L, V] logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def logits_entropy(logits: Array) -> Array:
    """float32[B, L]: entropy of softmax(logits) over V."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------------
# Chunked path: hidden states + output projection
# ---------------------------------------------------------------------------------------------------
def _vocab_axis(lm_head: Array, d: int, layout: str | None) -> int:
    """Which axis of the projection is V: 1 for an lm_head kernel [D, V], 0 for an embedding [V, D]."""
    if lm_head.ndim != 2:
        raise ValueError(f"lm_head must be 2-D ([D, V] or [V, D]), got shape {lm_head.shape}")
    if layout is None:
        rows, cols = lm_head.shape
        if rows == d and cols != d:
            layout = "dv"
        elif cols == d and rows != d:
            layout = "vd"
        else:
            raise ValueError(f"lm_head shape {lm_head.shape} is ambiguous for hidden width {d}: "
                             "pass layout='dv' (lm_head kernel) or 'vd' (tied embedding table)")
    if layout not in ("dv", "vd"):
        raise ValueError(f"layout must be 'dv', 'vd' or None, got {layout!r}")
    d_axis = 0 if layout == "dv" else 1
    if lm_head.shape[d_axis] != d:
        raise ValueError(f"layout {layout!r} needs D={d} on axis {d_axis} of lm_head, got {lm_head.shape}")
    return 1 - d_axis


def _chunked_stats(hidden: Array, lm_head: Array, targets: Array | None, chunk_size: int | None,
                   layout: str | None, want_entropy: bool):
    """One pass over vocabulary chunks: (log-sum-exp, target logit or None, E_p[logit] or None).

    Chunks are sliced out of `lm_head` in place (no padded or transposed copy of the 151936-row
    table). The last chunk is shifted back to end at V; its columns already seen are masked out.
    """
    d = hidden.shape[-1]
    v_axis = _vocab_axis(lm_head, d, layout)
    v = lm_head.shape[v_axis]
    c = v if chunk_size is None else int(chunk_size)
    if c <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    c = min(c, v)
    n = -(-v // c)
    batch_shape = hidden.shape[:-1]
    neg_inf = jnp.float32(-jnp.inf)
    spec = "...d,dc->...c" if v_axis == 1 else "...d,cd->...c"

    @jax.checkpoint
    def body(carry, idx):
        m, s, tgt, ez = carry  # float32[B, L] each: running max, sum exp, target logit, sum exp * z
        first_new = idx * c  # columns below this were covered by earlier chunks
        start = jnp.minimum(first_new, v - c)
        w_c = jax.lax.dynamic_slice_in_dim(lm_head, start, c, axis=v_axis)  # [D, C] or [C, D]
        z = jnp.einsum(spec, hidden, w_c, preferred_element_type=jnp.float32)  # float32[B, L, C]
        col = start + jnp.arange(c)
        fresh = col >= first_new
        z = jnp.where(fresh, z, neg_inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        s = s * scale + jnp.sum(e, axis=-1)
        if want_entropy:
            ez = ez * scale + jnp.sum(e * jnp.where(fresh, z, 0.0), axis=-1)
        if targets is not None:
            local = targets - start
            hit = (targets >= first_new) & (local < c)
            picked = jnp.take_along_axis(z, jnp.clip(local, 0, c - 1)[..., None], axis=-1)[..., 0]
            tgt = tgt + jnp.where(hit, picked, 0.0)
        return (m_new, s, tgt, ez), None

    zeros = jnp.zeros(batch_shape, jnp.float32)
    init = (jnp.full(batch_shape, neg_inf), zeros, zeros, zeros)
    (m, s, tgt, ez), _ = jax.lax.scan(body, init, jnp.arange(n))
    lse = m + jnp.log(s)
    mean_z = ez / s if want_entropy else None
    return lse, (tgt if targets is not None else None), mean_z


def token_logprobs(hidden: Array, lm_head: Array, targets: Array, chunk_size: int | None = 8192,
                   layout: str | None = None) -> Array:
    """float32[B, L] log p(targets) under softmax(hidden @ W), computed over vocabulary chunks.

    Args:
      hidden: float[B, L, D] final-norm hidden states.
      lm_head: float[D, V] (lm_head kernel) or float[V, D] (tied embedding table).
      targets: int[B, L] token ids in [0, V).
      chunk_size: vocabulary columns per chunk (None: all at once).
      layout: "dv" / "vd" to disambiguate when D == V; inferred otherwise.
    """
    lse, tgt, _ = _chunked_stats(hidden, lm_head, targets.astype(jnp.int32), chunk_size, layout, False)
    return tgt - lse


def entropy(hidden: Array, lm_head: Array, chunk_size: int | None = 8192,
            layout: str | None = None) -> Array:
    """float32[B, L] entropy of softmax(hidden @ W); same arguments as `token_logprobs`."""
    lse, _, mean_z = _chunked_stats(hidden, lm_head, None, chunk_size, layout, True)
    return lse - mean_z


def token_logprobs_and_entropy(hidden: Array, lm_head: Array, targets: Array,
                               chunk_size: int | None = 8192,
                               layout: str | None = None) -> tuple[Array, Array]:
    """Both float32[B, L] results of `token_logprobs` and `entropy` in a single pass over V."""
    lse, tgt, mean_z = _chunked_stats(hidden, lm_head, targets.astype(jnp.int32), chunk_size, layout,
                                      True)
    return tgt - lse, lse - mean_z


# ---------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------
def sft_loss(logits_or_scorer: Array | Callable[[Array], Array], targets: Array,
             loss_mask: Array) -> tuple[Array, dict[str, Array]]:
    """Teacher-forced cross-entropy averaged over answer tokens only.

    Args:
      logits_or_scorer: float[B, L, V] logits, or a callable `targets -> float32[B, L]` log-probs (e.g.
        `lambda t: token_logprobs(hidden, lm_head, t)`) for the memory-aware path.
      targets: int[B, L] next-token ids (see module docstring).
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


# ---------------------------------------------------------------------------------------------------
# Host helper
# ---------------------------------------------------------------------------------------------------
def build_sft_targets(prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                      max_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded teacher-forcing arrays for a batch of (prompt, answer) token sequences.

    The prompt holds everything the model is given (chat template, expanded image pad tokens); the
    answer is what it must produce and should end with the end-of-turn token (<|im_end|>) so that the
    model learns to stop.

    Returns numpy arrays:
      input_ids int32[B, L]: prompt + answer, then pad_id.
      attention_mask int32[B, L]: 1 on real tokens.
      targets int32[B, L]: input_ids shifted left by one (pad_id at the end).
      loss_mask float32[B, L]: 1 where targets[:, t] is an answer token.
    Raises ValueError naming the sample when prompt + answer exceeds max_len or a part is empty.
    """
    if len(prompt_ids) != len(answer_ids):
        raise ValueError(f"build_sft_targets: {len(prompt_ids)} prompts but {len(answer_ids)} answers")
    b = len(prompt_ids)
    input_ids = np.full((b, max_len), pad_id, np.int32)
    attention = np.zeros((b, max_len), np.int32)
    targets = np.full((b, max_len), pad_id, np.int32)
    loss_mask = np.zeros((b, max_len), np.float32)
    for i, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
        p, a = len(prompt), len(answer)
        if p == 0 or a == 0:
            raise ValueError(f"build_sft_targets: sample {i} has an empty {'prompt' if p == 0 else 'answer'}")
        if p + a > max_len:
            raise ValueError(f"build_sft_targets: sample {i} has {p} prompt + {a} answer tokens > "
                             f"max_len {max_len}")
        input_ids[i, :p] = prompt
        input_ids[i, p:p + a] = answer
        attention[i, :p + a] = 1
        targets[i, :p + a - 1] = input_ids[i, 1:p + a]
        loss_mask[i, p - 1:p + a - 1] = 1.0  # logits at t predict token t + 1: answer tokens p .. p+a-1
    return {"input_ids": input_ids, "attention_mask": attention, "targets": targets,
            "loss_mask": loss_mask}
