"""The language decoder of both families: Qwen2 (Qwen2.5-VL) and Qwen3 (Qwen3-VL) text models.

One module covers both because they differ only in switches of `TextConfig`:
  * `attention_bias`     q/k/v projections carry biases (Qwen2.5); o_proj never has one.
  * `qk_norm`            per-head RMSNorm on q and k after the projection, before RoPE (Qwen3).
  * `mrope_interleaved`  M-RoPE frequency layout: chunked T..H..W (Qwen2.5) or interleaved THWTHW..T (Qwen3).
  * DeepStack            Qwen3 adds extra visual features to the hidden states after layers 0..k-1; the
                         caller passes them already scattered to sequence positions (zeros elsewhere).

The decoder layers are one stacked module (`layers`, parameters float[Y, ...]) run by one `lax.scan`
(see `dig_jax.models.layers.scan_layers`); the KV cache is one array per keys / values with the same
leading layer axis, carried through the scan and updated in place at each layer's index.

Attention always runs against a key/value buffer with a per-slot validity mask, which makes the plain
forward and the KV-cached forward one code path: without a cache, the buffer is this call's own keys and
the validity mask is the attention mask; with a cache, this call's keys are written at
[cache_index, cache_index + L) and queries attend causally over the cache slots. Slot order is sequence
order, so left padding in a prompt is simply a run of invalid slots.

Axis legend: B batch, L query length, S key length (cache slots), D model width, F feed-forward width,
V vocabulary, N query heads, K key/value heads, G = N // K query heads per KV head, H head dim,
R = H // 2 rotary frequencies, Y decoder layers, J DeepStack levels.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models.attention import attend, kernel_for
from dig_jax.models.config import TextConfig
from dig_jax.models.layers import (Dense, DType, HFParam, RMSNorm, SwiGLU, apply_rotary, check_remat, hf_param,
                                   hf_stacked_param, param, scan_layers, stack_layers)
from dig_jax.sharding import active as active_sharding, constrain


# ----------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------

class KVCache(NamedTuple):
    """A static-size key/value cache (a pytree, so it goes through `jax.jit` as is).

    keys, values: float[Y, B, S, K, H], layer y's keys at [y] (already rotated, as in HF).
    valid:        int32[B, S], 1 where a slot holds a real token, 0 for empty slots and padding.
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]


def init_text_cache(cfg: TextConfig, batch: int, max_len: int, dtype: DType = jnp.float32) -> KVCache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# M-RoPE
# ----------------------------------------------------------------------------------------------------

def mrope_axis_of_frequency(mrope_section: Sequence[int], interleaved: bool) -> np.ndarray:
    """int[R]: which position axis (0 = T, 1 = H, 2 = W) drives each rotary frequency.

    Chunked (Qwen2.5-VL): the first s_T frequencies follow T, the next s_H follow H, the last s_W follow W.
    Interleaved (Qwen3-VL): start from all-T, then indices 1::3 below 3*s_H follow H and indices 2::3
    below 3*s_W follow W (THWTHW...TT). Static numpy, so it is baked into the compiled graph.
    """
    s_t, s_h, s_w = (int(s) for s in mrope_section)
    if not interleaved:
        return np.repeat(np.arange(3), [s_t, s_h, s_w]).astype(np.int32)
    axis = np.zeros(s_t + s_h + s_w, np.int32)
    axis[1:3 * s_h:3] = 1
    axis[2:3 * s_w:3] = 2
    return axis


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig, dtype: DType) -> tuple[jax.Array, jax.Array]:
    """cos, sin float[B, L, H] for 3D positions int[3, B, L] (HF `rotary_emb` + `recomposition_frequencies`).

    Angles are computed in float32 as in HF, then cast to the activation dtype.
    """
    head_dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))  # [R]
    axis = mrope_axis_of_frequency(cfg.mrope_section, cfg.mrope_interleaved)                    # [R]
    pos = jnp.moveaxis(position_ids[axis], 0, -1).astype(jnp.float32)                            # [B, L, R]
    freqs = pos * jnp.asarray(inv_freq, jnp.float32)                                             # [B, L, R]
    emb = jnp.concatenate([freqs, freqs], axis=-1)                                               # [B, L, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


# ----------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------

class Embedding(nnx.Module):
    """Token embedding table weight float[V, D] (same layout as HF's `embed_tokens.weight`)."""

    def __init__(self, vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype: DType, param_dtype: DType):
        self.dtype = dtype
        self.weight = param(rngs, nnx.initializers.normal(0.02), (vocab_size, dim), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight.get_value(), ids, axis=0).astype(self.dtype)


class Attention(nnx.Module):
    """Grouped-query self-attention with M-RoPE over a key/value buffer (see the module docstring)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: DType, param_dtype: DType,
                 attention: str = "dense"):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.dtype, self.attention = dtype, attention
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Dense(d, n * h, use_bias=cfg.attention_bias, logical_axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, k * h, use_bias=cfg.attention_bias, logical_axes=("embed", "kv_heads"), **kw)
        self.v_proj = Dense(d, k * h, use_bias=cfg.attention_bias, logical_axes=("embed", "kv_heads"), **kw)
        self.o_proj = Dense(n * h, d, use_bias=False, logical_axes=("heads", "embed"), **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
            self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, key_valid: jax.Array, cache_index,
                 kv: tuple[jax.Array, jax.Array] | None, layer: jax.Array
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x float[B, L, D]; cos/sin float[B, L, H]; key_valid int[B, S] (S = L without a cache).

        kv: the whole cache (keys, values) float[Y, B, S, K, H] or None; this layer (index `layer`, int32
        scalar) writes its L new keys/values at [layer, :, cache_index:cache_index + L] (an in-place
        update of the scan carry) and attends over its own slice. Returns (float[B, L, D], new kv).
        """
        b, l, _ = x.shape
        q = self.q_proj(x).reshape(b, l, self.num_heads, self.head_dim)       # [B, L, N, H]
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)    # [B, L, K, H]
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)    # [B, L, K, H]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos[:, :, None, :], sin[:, :, None, :])
        k = apply_rotary(k, cos[:, :, None, :], sin[:, :, None, :])

        if kv is None:
            mesh, rules = active_sharding()
            if kernel_for(self.attention, mesh) != "dense":  # a whole sequence: the memory-lean kernel
                out = attend(q, k, v, q_segment_ids=key_valid, kv_segment_ids=key_valid, causal=True,
                             implementation=self.attention, mesh=mesh, rules=rules)  # float[B, L, N, H]
                return self.o_proj(out.reshape(b, l, self.num_heads * self.head_dim)), None
            keys, values, new_kv = k, v, None
        else:
            new_kv = tuple(jax.lax.dynamic_update_slice(buf, new[None].astype(buf.dtype), (layer, 0, cache_index, 0, 0))
                           for buf, new in zip(kv, (k, v)))                   # float[Y, B, S, K, H]
            keys, values = (jax.lax.dynamic_index_in_dim(buf, layer, keepdims=False) for buf in new_kv)  # [B, S, K, H]
        s = keys.shape[1]

        # Causal over slots: query i sits in slot cache_index + i and sees slots <= its own that are valid.
        q_slot = cache_index + jnp.arange(l)
        causal = jnp.arange(s)[None, :] <= q_slot[:, None]                    # [L, S]
        mask = causal[None, :, :] & (key_valid[:, None, :] > 0)               # [B, L, S]

        g = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, l, self.num_kv_heads, g, self.head_dim)             # [B, L, K, G, H]
        scores = jnp.einsum("blkgh,bskh->bkgls", qg, keys.astype(self.dtype),
                            preferred_element_type=jnp.float32) * (self.head_dim ** -0.5)
        # A large finite negative (not -inf): a fully masked row (a left-pad query) becomes uniform, not NaN.
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)           # [B, K, G, L, S]
        out = jnp.einsum("bkgls,bskh->blkgh", probs, values.astype(self.dtype))
        out = out.reshape(b, l, self.num_heads * self.head_dim)
        return self.o_proj(out), new_kv


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: DType, param_dtype: DType,
                 attention: str = "dense"):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                                                param_dtype=param_dtype)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=False, rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x, cos, sin, key_valid, cache_index, kv, layer):
        attn, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, cache_index, kv, layer)
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h)), new_kv


class TextDecoder(nnx.Module):
    """Embedding, decoder layers (stacked, scanned), final norm and the (tied or untied) LM head.

    Attribute names follow HF (`embed_tokens`, `layers.self_attn.q_proj` with layer i at index i of the
    leading axis, `norm`, `lm_head`) so the checkpoint mapping in `dig_jax.models.hf_io` reads as a rename.
    `remat` ("none" | "full" | "dots") rematerialises each scanned layer (see `dig_jax.models.layers`).
    `attention` (`dig_jax.models.attention.ATTENTION_IMPLEMENTATIONS`) picks the kernel for whole-sequence
    calls (training, scoring); calls with a KV cache (prefill, decode steps) stay dense over the cache.
    """

    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, rngs: nnx.Rngs,
                 dtype: DType = jnp.float32, param_dtype: DType = jnp.float32, remat: str = "none",
                 attention: str = "dense"):
        check_remat(remat)
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r, attention=attention, **kw),
                                   cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.lm_head = (None if tie_word_embeddings else
                        Dense(cfg.hidden_size, cfg.vocab_size, use_bias=False, logical_axes=("embed", "vocab"),
                              rngs=rngs, **kw))

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """int[B, L] -> float[B, L, D]."""
        return constrain(self.embed_tokens(input_ids), ("batch", "length", "embed"))

    def __call__(self, x: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int | None = None,
                 deepstack: Sequence[jax.Array] = ()) -> tuple[jax.Array, KVCache | None]:
        """Runs the decoder layers and the final norm.

        x:              float[B, L, D] input embeddings (image features already merged in).
        position_ids:   int[3, B, L] M-RoPE positions (T, H, W).
        attention_mask: int[B, L], 1 for real tokens, 0 for padding.
        cache, cache_index: optional KVCache and the slot (int32 scalar) where these L tokens go.
        deepstack:      float[B, L, D] per DeepStack level, added after layer j (zeros off visual positions).
        Returns (hidden float[B, L, D] after the final norm, the updated cache or None).
        """
        num_layers = self.cfg.num_hidden_layers
        if len(deepstack) > num_layers:
            raise ValueError(f"{len(deepstack)} DeepStack levels but only {num_layers} decoder layers")
        cos, sin = mrope_cos_sin(position_ids, self.cfg, self.dtype)
        attention_mask = attention_mask.astype(jnp.int32)
        if cache is None:
            key_valid, cache_index = attention_mask, 0
        else:
            if cache_index is None:
                raise ValueError("TextDecoder: a cache was given without cache_index")
            cache_index = jnp.asarray(cache_index, jnp.int32)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache_index))
        x = constrain(x.astype(self.dtype), ("batch", "length", "embed"))
        add_deepstack = _deepstack_adder(deepstack, x.dtype)

        def body(layer: DecoderLayer, carry, i):
            x, kv = carry
            x, kv = layer(x, cos, sin, key_valid, cache_index, kv, i)
            return (constrain(add_deepstack(x, i), ("batch", "length", "embed")), kv), None

        kv = None if cache is None else (cache.keys, cache.values)
        (x, kv), _ = scan_layers(self.layers, body, (x, kv), jnp.arange(num_layers, dtype=jnp.int32),
                                 remat=self.remat)
        x = self.norm(x)
        new_cache = None if cache is None else KVCache(kv[0], kv[1], key_valid)
        return x, new_cache

    def lm_head_matrix(self) -> jax.Array:
        """The output projection float[D, V] (the embedding table transposed when tied)."""
        if self.lm_head is None:
            return self.embed_tokens.weight.get_value().T
        return self.lm_head.kernel.get_value()

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float[B, L, D] -> float32[B, L, V], accumulated in float32."""
        w = self.lm_head_matrix().astype(self.dtype)
        return jnp.einsum("bld,dv->blv", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)


def _deepstack_adder(deepstack: Sequence[jax.Array], dtype: DType):
    """add(x, i): x + deepstack[i] for layer i < J, else x, inside the scan without a zero level per layer.

    The J levels float[B, L, D] are stacked once (float[J, B, L, D]); layer i reads level min(i, J - 1)
    and keeps it only when i < J.
    """
    if not deepstack:
        return lambda x, i: x
    levels = jnp.stack([d.astype(dtype) for d in deepstack])  # float[J, B, L, D]
    last = len(deepstack) - 1

    def add(x: jax.Array, i: jax.Array) -> jax.Array:
        level = jax.lax.dynamic_index_in_dim(levels, jnp.minimum(i, last), keepdims=False)  # float[B, L, D]
        return jnp.where(i <= last, x + level, x)

    return add


# ----------------------------------------------------------------------------------------------------
# Checkpoint name mapping
# ----------------------------------------------------------------------------------------------------

def text_param_mapping(cfg: TextConfig) -> list[HFParam]:
    """Every decoder weight: HF name(s) below `model.language_model.`, path inside TextDecoder, transform.

    The stacked layer parameters (`layers/...`, float[Y, ...]) list `layers.{i}.<name>` for i < Y.
    Transforms as in `dig_jax.models.hf_io`: "linear" (torch [out, in] <-> our kernel [in, out]) or "copy".
    The untied `lm_head` lives outside `model.language_model` in HF and is added by `hf_io`.
    """
    out = [hf_param("embed_tokens.weight", ("embed_tokens", "weight"), "copy"),
           hf_param("norm.weight", ("norm", "weight"), "copy")]

    def layer(name: str, path: tuple, transform: str):
        names = [f"layers.{i}.{name}" for i in range(cfg.num_hidden_layers)]
        out.append(hf_stacked_param(names, ("layers",) + path, transform))

    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer(f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), "linear")
        if cfg.attention_bias and proj != "o_proj":
            layer(f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), "copy")
    if cfg.qk_norm:
        layer("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), "copy")
        layer("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), "copy")
    for proj in ("gate_proj", "up_proj", "down_proj"):
        layer(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), "linear")
    layer("input_layernorm.weight", ("input_layernorm", "weight"), "copy")
    layer("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), "copy")
    return out
