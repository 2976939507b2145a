"""Batched KV-cache generation and teacher-forced scoring for `QwenVL`, each one jitted function.

Why this module exists: GRPO needs (a) G sampled completions per prompt with the log-probabilities the
policy assigned to them while sampling, and (b) the log-probabilities of those same completions under the
policy being trained and under the frozen reference model. (a) is `generate`, (b) is `score_completions`;
on the same weights and completions they agree to float tolerance (tested).

Layout of a batch (`PromptBatch`, built on the host by `build_prompt_batch`):
  * prompts are LEFT-padded to a bucketed length Lp, so the last prompt token of every row sits at slot
    Lp-1 and decoding writes slot Lp+k for every row at once; only the bucket, not each prompt length,
    reaches the compiler, so generation compiles once per (bucket, batch, patch bucket, SamplingConfig).
  * position ids are the HF `get_rope_index` ones (3 M-RoPE axes, pads at 0) and the per-row rope deltas
    `max_prompt_position + 1 - n_valid_prompt_tokens` are carried explicitly in the batch (never cached
    on a module; see reference/qwen_vl_spec.md section 7, "stale rope_deltas").

Images and GRPO groups: `pixel_values` holds each distinct image once; the vision tower runs once per
call and `feature_index` gathers its output for every row's image tokens, so the G copies of a prompt
share one image encoding (and, in the training step, one vision backward).

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
D model width, V vocabulary, N image patches (padded), C chunk of completion positions.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Incremented at TRACE time (a Python side effect inside the jitted functions): tests use it to show that
# generation compiles once per bucket. Keys: "generate", "score".
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A left-padded prompt batch with everything the model needs, ready for `generate` / scoring.

    input_ids       int32[B, Lp]    left-padded with the pad id
    attention_mask  int32[B, Lp]    1 on prompt tokens, 0 on the left padding
    position_ids    int32[3, B, Lp] M-RoPE (T, H, W) positions from get_rope_index; 0 on padding
    rope_deltas     int32[B, 1]     max position + 1 - number of valid tokens, per row
    pixel_values    float[N, patch_dim] | None  the DISTINCT images (before group repetition), zero-padded
    vision          VisionInputs | None         host-built static-shape vision metadata for those patches
    feature_index   int32[B, Lp] | None         at each image-pad token, the row of the vision tower's
                                                merged output that it takes (0 elsewhere)

    The vision tower runs once per distinct image; `feature_index` repeats its output for the G copies
    of a prompt (and, through the gather, sums their gradients back into one image encoding). It is
    aligned with `input_ids`, so selecting or sharding rows of the batch is a plain row operation
    (`pixel_values` / `vision` stay whole).
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    rope_deltas: Any
    pixel_values: Any = None
    vision: Any = None
    feature_index: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Generation:
    """What `generate` returns (all device arrays).

    tokens             int32[B, T]   generated ids; pad_token_id after EOS
    logprobs           float32[B, T] raw-model (temperature 1) log-prob of each token; 0 where masked
    sampling_logprobs  float32[B, T] log-prob under the filtered sampling distribution; 0 where masked/greedy
    completion_mask    int32[B, T]   1 up to and including the first EOS
    lengths            int32[B]      number of generated tokens including EOS (T if no EOS)
    """

    tokens: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    completion_mask: jax.Array
    lengths: jax.Array


# ----------------------------------------------------------------------------------------------------
# Host side: bucketing, left padding, group repetition
# ----------------------------------------------------------------------------------------------------

def bucket_length(n: int, multiple: int = 64) -> int:
    """The padded prompt length for `n` tokens: the next multiple of `multiple` (at least one)."""
    if multiple < 1:
        raise ValueError(f"bucket multiple must be >= 1, got {multiple}")
    return max(1, math.ceil(n / multiple)) * multiple


def build_prompt_batch(cfg, input_ids: np.ndarray, attention_mask: np.ndarray,
                       image_grid_thw: np.ndarray | None = None, pixel_values: np.ndarray | None = None, *,
                       group_size: int = 1, length_multiple: int = 64, pad_patches_to: int | None = None,
                       patch_multiple: int = 64) -> PromptBatch:
    """Left-pads prompts to a length bucket, repeats each prompt `group_size` times, builds positions.

    input_ids / attention_mask: int[B0, L] with padding on EITHER side (rows are re-packed to the left,
    which the decoder's slot arithmetic assumes; positions are computed after re-packing, so padding
    direction can never disagree between positions and forward: TRL#5785).
    image_grid_thw: int[n_images, 3] for all images of the batch in row order; pixel_values:
    float[sum(t*h*w), patch_dim] in the same order (the processor's output).

    Group repetition (GRPO): row i becomes rows i*G .. i*G+G-1 (adjacent). Its images are NOT repeated:
    the vision tower encodes each distinct image once and `feature_index` hands the features to all G
    rows (G-1 fewer vision passes per prompt, in generation and in the training step).

    The padded patch count is `pad_patches_to` or the next multiple of `patch_multiple`; together with
    the length bucket it decides recompilation.
    """
    from dig_jax.models.rope_index import get_rope_index
    from dig_jax.models.vision_inputs import build_vision_inputs

    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal [B, L]")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    b0 = input_ids.shape[0]
    n_valid = attention_mask.sum(axis=1)
    if (n_valid == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(n_valid == 0).tolist()} have no valid token")

    # Left-pack and repeat the token rows.
    lp = bucket_length(int(n_valid.max()), length_multiple)
    rows = np.repeat(np.arange(b0), group_size)
    ids = np.full((len(rows), lp), cfg.pad_token_id, np.int32)
    mask = np.zeros((len(rows), lp), np.int32)
    for out_row, row in enumerate(rows):
        valid = input_ids[row][attention_mask[row] == 1]
        ids[out_row, lp - len(valid):] = valid
        mask[out_row, lp - len(valid):] = 1

    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    runs = _image_runs(input_ids, attention_mask, cfg.image_token_id)  # per row: list of run lengths
    merge2 = cfg.vision.spatial_merge_size ** 2
    if sum(len(r) for r in runs) != len(grids):
        raise ValueError(f"input_ids hold {sum(len(r) for r in runs)} image-pad runs (per row "
                         f"{[len(r) for r in runs]}) but image_grid_thw has {len(grids)} images")
    tokens_per_image = grids.prod(axis=1) // merge2
    first_image = np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(int)
    for row in range(b0):
        for j, n in enumerate(runs[row]):
            img = first_image[row] + j
            if n != tokens_per_image[img]:
                raise ValueError(f"prompt row {row}, image {j}: {n} image-pad tokens but image_grid_thw[{img}] = "
                                 f"{grids[img].tolist()} gives {tokens_per_image[img]} merged tokens")

    rep_grids = np.concatenate([grids[first_image[r]:first_image[r + 1]] for r in rows] or [grids], axis=0)
    position_ids, rope_deltas = get_rope_index(ids, mask, rep_grids if len(rep_grids) else None,
                                               image_token_id=cfg.image_token_id,
                                               spatial_merge_size=cfg.vision.spatial_merge_size,
                                               video_token_id=cfg.video_token_id)
    batch = PromptBatch(ids, mask, position_ids.astype(np.int32), rope_deltas.astype(np.int32).reshape(-1, 1))
    if not len(grids):
        return batch

    if pixel_values is None:
        raise ValueError("image_grid_thw given without pixel_values")
    n_patches = int(grids.prod(axis=1).sum())
    if len(pixel_values) != n_patches:
        raise ValueError(f"pixel_values has {len(pixel_values)} rows but image_grid_thw needs {n_patches}")
    n_pad = pad_patches_to or bucket_length(n_patches, patch_multiple)
    if n_pad < n_patches or n_pad % merge2:
        raise ValueError(f"pad_patches_to={n_pad}: need a multiple of {merge2} >= the {n_patches} patches of the batch")
    pix = np.concatenate([pixel_values, np.zeros((n_pad - n_patches, pixel_values.shape[1]), pixel_values.dtype)])
    vision = build_vision_inputs(grids, cfg.vision, cfg.family, pad_patches_to=n_pad)

    # feature_index: for every image-pad token, the merged-feature row (of the tower's output) it takes.
    image_offsets = np.concatenate([[0], np.cumsum(tokens_per_image)])
    feature_index = np.zeros(ids.shape, np.int32)
    for out_row, row in enumerate(rows):
        images = range(first_image[row], first_image[row + 1])
        if len(images):
            feature_index[out_row, ids[out_row] == cfg.image_token_id] = np.concatenate(
                [np.arange(image_offsets[i], image_offsets[i + 1]) for i in images])
    return dataclasses.replace(batch, pixel_values=pix, vision=vision, feature_index=feature_index)


def _image_runs(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int) -> list[list[int]]:
    """Per row, the lengths of its runs of image-pad tokens (one run per image: adjacent images are
    separated by vision_end / vision_start tokens)."""
    out = []
    for ids, m in zip(input_ids, attention_mask):
        is_img = np.concatenate([[False], ids[m == 1] == image_token_id, [False]])
        edges = np.flatnonzero(np.diff(is_img.astype(np.int8)))
        out.append((edges[1::2] - edges[0::2]).tolist())
    return out


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


def _image_features(model, batch: PromptBatch, input_ids: jax.Array):
    """`image_features` for `model.forward` over input_ids int32[B, L] (the prompt, maybe + completion).

    The vision tower runs once over the distinct images; the model scatters feature row r to the r-th
    image-pad token of the batch (row-major), so we list, in that order, the tower row each token takes
    (`feature_index`). Image-pad ids past the prompt (a policy can sample token 151655) are TEXT, as they
    were when generated one by one: they take the token's own embedding and no DeepStack feature.
    """
    if batch.pixel_values is None:
        return None
    embeds, deepstack = model.encode_images(batch.pixel_values, batch.vision)  # float[N//4, D], levels
    b, l = input_ids.shape
    lp = batch.input_ids.shape[1]
    text_row = embeds.shape[0]  # index of the extra row appended below
    src = jnp.full((b, l), text_row, jnp.int32).at[:, :lp].set(jnp.reshape(batch.feature_index, (b, lp)))
    is_img = (input_ids == model.cfg.image_token_id).reshape(-1)  # [B*L]
    slot = jnp.where(is_img, jnp.cumsum(is_img) - 1, b * l)  # rank among image tokens; b*l = dropped
    order = jnp.full((b * l,), text_row, jnp.int32).at[slot].set(src.reshape(-1), mode="drop")  # [B*L]
    as_text = model.language_model.embed(jnp.full((1, 1), model.cfg.image_token_id, jnp.int32))[0]  # [1, D]
    main = jnp.take(jnp.concatenate([embeds, as_text.astype(embeds.dtype)]), order, axis=0)
    levels = tuple(jnp.take(jnp.concatenate([f, jnp.zeros_like(f[:1])]), order, axis=0) for f in deepstack)
    return main, levels


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
    from dig_jax.models.vlm import init_cache

    TRACE_COUNTS["generate"] += 1
    model = nnx.merge(graphdef, state)
    b, lp = batch.input_ids.shape
    t_max = sampling.max_new_tokens
    cache = init_cache(model.cfg, b, lp + t_max, model.dtype if cache_dtype is None else cache_dtype)

    # Prefill: vision tower + whole prompt into slots [0, Lp). Left padding => every row ends at Lp-1.
    hidden, cache = model.forward(batch.input_ids, batch.attention_mask, batch.position_ids, cache=cache,
                                  cache_index=jnp.int32(0), return_hidden=True,
                                  image_features=_image_features(model, batch, batch.input_ids))
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
    _, _, _, _, tokens, lps, slps = jax.lax.while_loop(cond, body, carry)

    is_eos = jnp.isin(tokens, eos)
    lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, t_max).astype(jnp.int32)
    mask = (jnp.arange(t_max)[None, :] < lengths[:, None]).astype(jnp.int32)
    return Generation(tokens, lps, slps, mask, lengths)


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
    hidden, _ = model.forward(ids, attn, pos, return_hidden=True, image_features=_image_features(model, batch, ids))
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
