"""Batched KV-cache generation for `QwenVL`: one jitted function per (prompt bucket, batch, sampling config).

Why: GRPO needs G sampled completions per prompt with the log-probabilities the policy assigned to them
while sampling; evaluation needs greedy answers. `generate` does both; `scoring.score_completions` gives
the same log-probabilities teacher-forced (they agree to float tolerance on the same weights, tested).

Decoding positions: generated token k (0-based) of row b is fed to the model at
`n_valid[b] + rope_delta[b] + k` = `max_prompt_position[b] + 1 + k`, the same value on all 3 axes. This is
exactly what `get_rope_index` gives over prompt + completion (the completion is one text run), which is
why the scorer can compute completion positions on device with the same formula.

Returned log-probabilities (per generated token):
  * `logprobs`: log softmax of the RAW model logits (temperature 1, no top-k / top-p), evaluated at the
    chosen token. This is the quantity GRPO calls the "old" policy log-prob and what `score_completions`
    computes, so the ratios pi/pi_old start at 1 (to float tolerance) on the sampling weights.
  * `sampling_logprobs`: log-prob of the chosen token under the distribution actually sampled from
    (temperature-scaled, then top-k, then top-p renormalised); 0 under greedy decoding (a point mass).
Positions after a row's EOS hold `pad_token_id` with both log-probs 0 and `completion_mask` 0; the EOS
token itself is part of the completion (mask 1), so a policy can learn to stop.

Axis legend: B batch (rows, after group repetition), Lp padded prompt length, T max new tokens,
D model width, V vocabulary.
"""
from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.generate.batch import PromptBatch, image_features
from dig_jax.models.vlm import init_cache

# Incremented at TRACE time (a Python side effect inside the jitted functions): tests use it to show that
# generation compiles once per bucket.
TRACE_COUNTS: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------------------------------
# Configuration and containers
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens; hashable because it is a static argument of the jitted generator.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before the filters.
    top_k: keep the k largest logits (0 = off). Setting it also makes top-p cheap (the nucleus is searched
        among k candidates instead of sorting the whole 151k vocabulary every step).
    top_p: nucleus: keep the smallest prefix of the probability-sorted candidates whose mass reaches
        top_p (the most likely token is always kept; 1.0 = off). Applied after top-k.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_token_ids: tuple[int, ...] = (151645,)
    pad_token_id: int = 151643

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"SamplingConfig.{field}: {why}")

        if self.max_new_tokens < 1:
            fail("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            fail("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            fail("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.eos_token_ids, tuple) or not self.eos_token_ids:
            fail("eos_token_ids", f"must be a non-empty tuple of ints, got {self.eos_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_config(cls, grpo, model_cfg) -> "SamplingConfig":
        """GRPO's sampling: the config's `grpo` section, stop and pad ids from the model config."""
        return cls(max_new_tokens=grpo.max_new_tokens, temperature=grpo.temperature, top_k=grpo.top_k,
                   top_p=grpo.top_p, eos_token_ids=(model_cfg.eos_token_id,), pad_token_id=model_cfg.pad_token_id)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns (all device arrays).

    tokens             int32[B, T]   generated ids; pad_token_id after EOS
    logprobs           float32[B, T] raw-model (temperature 1) log-prob of each token; 0 where masked
    sampling_logprobs  float32[B, T] log-prob under the filtered sampling distribution; 0 where masked/greedy
    completion_mask    int32[B, T]   1 up to and including the first EOS
    lengths            int32[B]      number of generated tokens including EOS (T if no EOS)
    steps              int32[]       tokens the decode loop produced per row: the longest length, since
                                     the loop stops once every row has emitted EOS (T at most)
    """

    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    completion_mask: jax.Array
    lengths: jax.Array
    steps: jax.Array

# ----------------------------------------------------------------------------------------------------
# Token selection
# ----------------------------------------------------------------------------------------------------

def token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[tokens] without materialising the normalised vector: float32[B]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Picks one token per row from float[B, V] logits: returns (int32[B], sampling log-prob float32[B]).

    Greedy when temperature == 0 (log-prob 0: a point mass). Otherwise temperature, then top-k, then
    top-p (nucleus) on the candidates, then a categorical draw; the returned log-prob is that of the
    renormalised filtered distribution.
    """
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[:1], jnp.float32)
    scaled = logits / sampling.temperature
    if sampling.top_k:
        cand, idx = jax.lax.top_k(scaled, min(sampling.top_k, scaled.shape[-1]))  # [B, k], descending
    elif sampling.top_p < 1.0:
        idx = jnp.argsort(-scaled, axis=-1)  # full sort: pass top_k to bound this per-step cost
        cand = jnp.take_along_axis(scaled, idx, axis=-1)
    else:
        cand, idx = scaled, None
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(cand, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
        cand = jnp.where(mass_before < sampling.top_p, cand, -jnp.inf)  # keeps the first token always
    choice = jax.random.categorical(key, cand, axis=-1)
    lp = token_logprob(cand, choice)
    tokens = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), lp


# ----------------------------------------------------------------------------------------------------
# Model plumbing shared by the generator and the scorer
# ----------------------------------------------------------------------------------------------------

def project_logits(model, hidden: jax.Array) -> jax.Array:
    """hidden float[..., D] -> float32[..., V] through `model.lm_head_matrix()` float[D, V].

    Same numerics as the model's own logits (operands in the model dtype, float32 accumulation), so the
    sampler, the scorer and `model.forward(...)` logits agree.
    """
    w = model.lm_head_matrix().astype(model.dtype)
    return jnp.einsum("...d,dv->...v", hidden.astype(model.dtype), w, preferred_element_type=jnp.float32)


def decode_positions(prompt_mask: jax.Array, rope_deltas: jax.Array, steps: int) -> jax.Array:
    """int32[3, B, steps]: the position of generated token k = 0..steps-1 of each row.

    = n_valid_prompt + rope_delta + k = max prompt position + 1 + k, equal on the three M-RoPE axes.
    """
    first = prompt_mask.sum(axis=-1).astype(jnp.int32) + rope_deltas[:, 0].astype(jnp.int32)  # [B]
    pos = first[:, None] + jnp.arange(steps, dtype=jnp.int32)[None, :]
    return jnp.broadcast_to(pos[None], (3,) + pos.shape)


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------

def _generate_impl(graphdef, state, batch: PromptBatch, rng, sampling: SamplingConfig, cache_dtype) -> Generation:
    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, state)
    b, lp = batch.input_ids.shape
    t_max = sampling.max_new_tokens
    cache = init_cache(model.cfg, b, lp + t_max, model.dtype if cache_dtype is None else cache_dtype)

    # Prefill: vision tower + whole prompt into slots [0, Lp). Left padding => every row ends at Lp-1.
    hidden, cache = model.forward(batch.input_ids, batch.attention_mask, batch.position_ids, cache=cache,
                                  cache_index=jnp.int32(0), return_hidden=True,
                                  image_features=image_features(model, batch, batch.input_ids))
    first_pos = decode_positions(batch.attention_mask, batch.rope_deltas, 1)  # int32[3, B, 1]: token 0
    eos = jnp.asarray(sampling.eos_token_ids, jnp.int32)

    def choose(k, logits, done):
        tok, slp = sample_tokens(logits, jax.random.fold_in(rng, k), sampling)
        lp_k = token_logprob(logits, tok)
        tok = jnp.where(done, sampling.pad_token_id, tok)
        return tok, jnp.where(done, 0.0, lp_k), jnp.where(done, 0.0, slp), done | jnp.isin(tok, eos)

    tok, lp0, slp0, done = choose(0, project_logits(model, hidden[:, -1]), jnp.zeros((b,), bool))
    tokens = jnp.full((b, t_max), sampling.pad_token_id, jnp.int32).at[:, 0].set(tok)
    lps = jnp.zeros((b, t_max), jnp.float32).at[:, 0].set(lp0)
    slps = jnp.zeros((b, t_max), jnp.float32).at[:, 0].set(slp0)

    def cond(carry):
        k, _, _, done, *_ = carry
        return (k < t_max) & ~jnp.all(done)

    def body(carry):
        # Feed token k-1 into slot Lp+k-1 at position first+k-1, then choose token k.
        k, prev, cache, done, tokens, lps, slps = carry
        hidden, cache = model.forward(prev[:, None], jnp.ones((b, 1), jnp.int32), first_pos + (k - 1), cache=cache,
                                      cache_index=lp + k - 1, return_hidden=True)
        tok, lp_k, slp_k, done = choose(k, project_logits(model, hidden[:, 0]), done)
        put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, k))
        return k + 1, tok, cache, done, put(tokens, tok), put(lps, lp_k), put(slps, slp_k)

    carry = (jnp.int32(1), tok, cache, done, tokens, lps, slps)
    steps, _, _, _, tokens, lps, slps = jax.lax.while_loop(cond, body, carry)

    is_eos = jnp.isin(tokens, eos)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, t_max).astype(jnp.int32)
    mask = (jnp.arange(t_max)[None, :] < lengths[:, None]).astype(jnp.int32)
    return Generation(tokens, lps, slps, mask, lengths, steps)


_generate_jit = jax.jit(_generate_impl, static_argnames=("graphdef", "sampling", "cache_dtype"))


def generate(model: nnx.Module, batch: PromptBatch, rng: jax.Array, sampling: SamplingConfig,
             cache_dtype=None) -> Generation:
    """Samples up to `sampling.max_new_tokens` tokens for every row of `batch`, as one jitted call.

    One prefill (vision tower + prompt) fills KV-cache slots [0, Lp); a `lax.while_loop` then decodes
    one token per step into slot Lp+k and stops as soon as every row has emitted an EOS. `rng` is one
    key per call; step k uses `fold_in(rng, k)`, so a call is reproducible from its key. The cache
    holds keys/values in `cache_dtype` (default: the model's computation dtype), Lp + T slots per row.
    Compiles once per (Lp, B, patch bucket, sampling config, cache dtype, model graph).
    """
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, batch, rng, sampling, cache_dtype)
