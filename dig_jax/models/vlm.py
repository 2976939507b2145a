"""The composed vision-language model (Qwen2.5-VL / Qwen3-VL): vision tower + text decoder.

Axis legend: B batch, L length, S cache slots, D text width, V vocabulary, N padded patch count,
K kv heads, H head dim, Y decoder layers.

Interface (what the sampler, the GRPO losses and `hf_io` build on)
-----------------------------------------------------------------
Host side (numpy, outside jit; depends on image sizes):
  prepare_inputs(cfg, input_ids, attention_mask, image_grid_thw, pad_patches_to=None)
      -> (position_ids int32[3, B, L], rope_deltas int32[B, 1], VisionInputs | None)
      Checks every image-pad run against its grid (clear error if not). `rope_positions` is that check
      plus the positions, the one implementation shared with generate.batch.build_prompt_batch.

Device side (jit-friendly, static shapes):
  model = QwenVL(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32,
                 vision_attention_block=None, remat="none", attention="dense")
      Decoder layers and ViT blocks are stacked modules (`language_model.layers`, `visual.blocks`:
      parameters with a leading layer axis) run by `lax.scan`; `remat` ("none" | "full" | "dots")
      rematerialises each scanned layer in the backward pass (see `dig_jax.models.layers`); `attention`
      picks the kernel for whole sequences (dense | splash | cudnn | auto, `dig_jax.models.attention`).
  model.forward(input_ids int32[B, L], attention_mask int32[B, L], position_ids int32[3, B, L],
                pixel_values float[N, patch_dim] | None, vision: VisionInputs | None,
                cache: KVCache | None = None, cache_index: int32 scalar | None = None,
                return_hidden: bool = False, image_features=None)
      -> (logits float32[B, L, V]  or  hidden float[B, L, D] after the final norm,  new_cache | None)
      Image features are scattered into the image-pad positions in sequence order across the batch
      (row-major, as HF's masked_scatter). With a cache, the keys/values of these L tokens are written
      at slots [cache_index, cache_index + L) of every layer (cache.keys[y] is layer y's) and attention
      is causal over cache slots, masked by the cache's valid-slot mask, which this call updates with
      `attention_mask`.
      `image_features=(embeds float[N//4, D], deepstack tuple)` (from `encode_images`) may replace
      pixel_values/vision, e.g. to run the vision tower once per prompt and repeat the features; or
      `image_features=PlacedImageFeatures(...)`: features already gathered to their token slots,
      float[B, L, D] like the embeddings and sharded the same way (generate.batch.image_features).
  model.encode_images(pixel_values, vision) -> (embeds float[N//4, D], deepstack tuple of float[N//4, D])
  model.decode(tokens int32[B, 1], position_ids int32[3, B, 1], cache, cache_index, attention_mask=None)
      -> (logits float32[B, 1, V], cache)       one generation step; attention_mask defaults to ones.
  model.lm_head_matrix() -> float[D, V]          (the transposed embedding table when tied)
  init_cache(cfg, batch, max_len, dtype) -> KVCache   (keys/values float[Y, B, S, K, H], valid int32[B, S])
  next_position_ids(cache, rope_deltas) -> int32[3, B, 1]
      The decode-step position: (#valid slots so far) + rope_delta = max prompt position + 1 + k at
      step k, the same on all three axes (as HF's generation). Call it before the step that writes the token.

HF-like convenience: model(input_ids, pixel_values, image_grid_thw, attention_mask) -> logits float32[B, L, V]
does the host preparation and then calls `forward` under jit (retraces per shape; for tests and notebooks).

Positions for teacher-forced scoring: only the prompt's positions come from the host (`rope_positions`,
via generate.batch.build_prompt_batch, with the prompt's rope_deltas). The completion is a text run that
continues from the prompt, so its token j sits at max prompt position + 1 + j on all three axes (what
`get_rope_index` over prompt + completion would give, and what decoding used); `dig_jax.generate.scoring`
computes these on device with `generate.sampler.decode_positions`.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models.config import ModelConfig
from dig_jax.models.layers import DType
from dig_jax.models.rope_index import get_rope_index
from dig_jax.models.text import KVCache, TextDecoder, init_text_cache
from dig_jax.models.vision import VisionTower
from dig_jax.models.vision_inputs import VisionInputs, build_vision_inputs


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: DType = jnp.float32) -> KVCache:
    """An empty KV cache for `batch` sequences of up to `max_len` tokens (prompt bucket + new tokens)."""
    return init_text_cache(cfg.text, batch, max_len, dtype)


def next_position_ids(cache: KVCache, rope_deltas: jax.Array) -> jax.Array:
    """int32[3, B, 1]: the M-RoPE position of the next generated token of each sequence."""
    pos = jnp.sum(cache.valid, axis=1, dtype=jnp.int32) + jnp.asarray(rope_deltas, jnp.int32).reshape(-1)
    return jnp.broadcast_to(pos[None, :, None], (3, pos.shape[0], 1))


def count_image_tokens(grid_thw: np.ndarray, spatial_merge_size: int) -> int:
    """Merged tokens for the given grids: sum(t * h * w) / merge^2."""
    grid_thw = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return int(np.sum(np.prod(grid_thw, axis=1)) // spatial_merge_size**2)


def image_runs(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int) -> list[list[int]]:
    """Per row, the lengths of its runs of image-pad tokens among the valid tokens (one run per image:
    adjacent images are separated by vision_end / vision_start tokens)."""
    out = []
    for ids, m in zip(input_ids, attention_mask):
        is_img = np.concatenate([[False], ids[np.asarray(m).astype(bool)] == image_token_id, [False]])
        edges = np.flatnonzero(np.diff(is_img.astype(np.int8)))
        out.append((edges[1::2] - edges[0::2]).tolist())
    return out


def rope_positions(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray,
                   image_grid_thw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one host-side check of image tokens against grids, and the M-RoPE positions that follow.

    input_ids / attention_mask int[B, L] (padding anywhere; only valid tokens count), image_grid_thw
    int[n, 3] or None (images in row-major order over the batch). Every row's image-pad runs must match
    its grids one by one, since a mismatch would otherwise silently shift every image feature; the
    errors name the row and image. Returns (position_ids int32[3, B, L], rope_deltas int32[B, 1],
    first_image int[B + 1]: row r holds images first_image[r] .. first_image[r + 1] - 1).
    """
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    runs = image_runs(input_ids, attention_mask, cfg.image_token_id)
    merge2 = cfg.vision.spatial_merge_size ** 2
    tokens_per_image = grids.prod(axis=1) // merge2
    n_runs = sum(len(r) for r in runs)
    if n_runs != len(grids):
        n_tokens = sum(sum(r) for r in runs)
        raise ValueError(f"input_ids hold {n_runs} image-pad runs (per row {[len(r) for r in runs]}; "
                         f"{n_tokens} image-pad tokens, id {cfg.image_token_id}) but image_grid_thw has "
                         f"{len(grids)} images ({int(tokens_per_image.sum())} merged tokens)")
    first_image = np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(int)
    for row, row_runs in enumerate(runs):
        for j, n in enumerate(row_runs):
            img = first_image[row] + j
            if n != tokens_per_image[img]:
                raise ValueError(f"prompt row {row}, image {j}: {n} image-pad tokens but image_grid_thw[{img}] = "
                                 f"{grids[img].tolist()} gives {tokens_per_image[img]} merged tokens")
    position_ids, deltas = get_rope_index(input_ids, attention_mask, grids if len(grids) else None,
                                          image_token_id=cfg.image_token_id,
                                          spatial_merge_size=cfg.vision.spatial_merge_size,
                                          video_token_id=cfg.video_token_id)
    return position_ids.astype(np.int32), deltas.astype(np.int32).reshape(-1, 1), first_image


def prepare_inputs(cfg: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray | None,
                   image_grid_thw: np.ndarray | None, pad_patches_to: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray, VisionInputs | None]:
    """Host-side preparation: M-RoPE positions, rope deltas and the vision tower's index arrays.

    input_ids int[B, L] (left padded), attention_mask int[B, L] or None, image_grid_thw int[n, 3] or None
    (images in row-major order over the batch). Raises ValueError when the image-pad tokens and the
    grids disagree (`rope_positions`), or when image-pad tokens sit in the padding: `forward` scatters
    features by token id, so a padded image-pad token would take one.
    """
    input_ids = np.asarray(input_ids)
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    n_padded = int(np.sum((input_ids == cfg.image_token_id) & ~(mask > 0)))
    if n_padded:
        raise ValueError(f"prepare_inputs: {n_padded} image-pad tokens (id {cfg.image_token_id}) "
                         "sit at padded positions (attention_mask 0)")
    position_ids, deltas, _ = rope_positions(cfg, input_ids, mask, image_grid_thw)
    vision = None
    if image_grid_thw is not None and len(np.asarray(image_grid_thw).reshape(-1, 3)):
        vision = build_vision_inputs(np.asarray(image_grid_thw).reshape(-1, 3), cfg.vision, cfg.family,
                                     pad_patches_to=pad_patches_to)
    return position_ids, deltas, vision


def scatter_to_positions(is_visual: jax.Array, features: jax.Array) -> jax.Array:
    """Places feature rows float[M, D] at the True positions of is_visual bool[B, L], in row-major order.

    Static-shape version of HF's masked_scatter: row r of `features` goes to the r-th True position.
    Returns float[B, L, D] with zeros at the other positions. The number of True positions must not
    exceed M (checked on the host by `prepare_inputs`).
    """
    b, l = is_visual.shape
    index = jnp.cumsum(is_visual.reshape(-1).astype(jnp.int32)) - 1                 # [B*L]
    index = jnp.clip(index, 0, features.shape[0] - 1).reshape(b, l)
    gathered = jnp.take(features, index, axis=0)                                    # [B, L, D]
    return jnp.where(is_visual[..., None], gathered, jnp.zeros((), features.dtype))


class PlacedImageFeatures(NamedTuple):
    """Image features already at their token slots, float[B, L, D] each, batch-sharded like the embeddings.

    `embeds` replaces the token embedding at every image-pad slot; each DeepStack level is added after
    its decoder layer and is zero off the image slots. Placing per slot keeps every tensor [B, ...], so
    it shards over the batch axes; the row-major scatter of HF's masked_scatter ranks image tokens across
    the whole batch, which a compiler can only do on one flat, unsharded [B * L, D] buffer per level."""
    embeds: jax.Array
    deepstack: tuple[jax.Array, ...]


class QwenVL(nnx.Module):
    """Qwen2.5-VL or Qwen3-VL (chosen by `cfg.family`); see the module docstring for the interface."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32, vision_attention_block: int | None = None, remat: str = "none",
                 attention: str = "dense"):
        """`vision_attention_block`: when every image fed to the model has that many patches (a dataset of
        one image size), the ViT attends inside per-image blocks instead of one masked [N, N] matrix;
        same result, linear instead of quadratic in the number of images (see vision.segment_attention),
        and its activations are sharded by image over the batch mesh axes.
        `remat`: the rematerialisation policy of every scanned decoder layer and ViT block.
        `attention`: the attention kernel of both towers (`dig_jax.models.attention`; the config's
        `model.attention`): "dense", "splash" (TPU), "cudnn" (GPU) or "auto" (by the platform the step
        is compiled for, read from the active mesh)."""
        self.cfg = cfg
        self.dtype = dtype
        self.visual = VisionTower(cfg.vision, cfg.family, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                  attention_block=vision_attention_block, remat=remat, attention=attention)
        self.language_model = TextDecoder(cfg.text, tie_word_embeddings=cfg.tie_word_embeddings, rngs=rngs,
                                          dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)

    # -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: jax.Array, vision: VisionInputs
                      ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Vision tower: (image embeds float[N//4, D], DeepStack features (Qwen3) or ())."""
        embeds, deepstack = self.visual(pixel_values, vision)
        return embeds, tuple(deepstack)

    def forward(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                pixel_values: jax.Array | None = None, vision: VisionInputs | None = None,
                cache: KVCache | None = None, cache_index: jax.Array | int | None = None,
                return_hidden: bool = False,
                image_features: tuple[jax.Array, Sequence[jax.Array]] | PlacedImageFeatures | None = None
                ) -> tuple[jax.Array, KVCache | None]:
        """The jit-friendly core (see the module docstring)."""
        x = self.language_model.embed(input_ids)                                        # [B, L, D]
        deepstack: tuple[jax.Array, ...] = ()
        if image_features is None and pixel_values is not None:
            if vision is None:
                raise ValueError("QwenVL.forward: pixel_values given without VisionInputs (see prepare_inputs)")
            image_features = self.encode_images(pixel_values, vision)
        if isinstance(image_features, PlacedImageFeatures):
            is_image = input_ids == self.cfg.image_token_id                              # [B, L]
            x = jnp.where(is_image[..., None], image_features.embeds.astype(x.dtype), x)
            deepstack = tuple(f.astype(x.dtype) for f in image_features.deepstack)
        elif image_features is not None:
            embeds, levels = image_features
            is_image = input_ids == self.cfg.image_token_id                              # [B, L]
            x = jnp.where(is_image[..., None], scatter_to_positions(is_image, embeds.astype(x.dtype)), x)
            deepstack = tuple(scatter_to_positions(is_image, f.astype(x.dtype)) for f in levels)
        hidden, new_cache = self.language_model(x, position_ids, attention_mask, cache, cache_index, deepstack)
        if return_hidden:
            return hidden, new_cache
        return self.language_model.logits(hidden), new_cache

    def decode(self, tokens: jax.Array, position_ids: jax.Array, cache: KVCache, cache_index,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """One generation step for tokens int32[B, 1] at slot `cache_index`: (logits float32[B, 1, V], cache)."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, jnp.int32)
        return self.forward(tokens, attention_mask, position_ids, cache=cache, cache_index=cache_index)

    def lm_head_matrix(self) -> jax.Array:
        """float[D, V] output projection (for chunked log-prob computation)."""
        return self.language_model.lm_head_matrix()

    def __call__(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None) -> jax.Array:
        """HF-like convenience: host preparation + `forward`; returns logits float32[B, L, V]."""
        input_ids = np.asarray(input_ids)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        position_ids, _, vision = prepare_inputs(self.cfg, input_ids, mask, image_grid_thw)
        if vision is not None:
            n = np.asarray(pixel_values).shape[0]
            if n != vision.segment_ids.shape[0]:
                raise ValueError(f"QwenVL: pixel_values has {n} patch rows but image_grid_thw describes "
                                 f"{vision.segment_ids.shape[0]}")
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                               jnp.asarray(position_ids), None if vision is None else jnp.asarray(pixel_values),
                               vision)


@functools.partial(jax.jit, static_argnums=0)
def _jitted_forward(graphdef, state, input_ids, attention_mask, position_ids, pixel_values, vision):
    """`QwenVL.forward` logits under jit (op-by-op dispatch of a whole VLM is slow even when tiny)."""
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask, position_ids, pixel_values, vision)[0]
