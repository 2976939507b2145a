"""Building blocks shared by the vision tower and the text decoder of both families.

Every layer follows the Hugging Face numerics exactly, where ports usually break parity: RMSNorm
normalises in float32 and casts back to the input dtype *before* the scale (no 1 + w offset, which
matters in bfloat16); rotary embeddings use the rotate-half (split halves) convention over the full head
dimension, never interleaved pairs.

Axis legend for shapes: B batch, L length, D model width, F feed-forward width, N heads, H head dim.
`dtype` is the computation dtype, `param_dtype` the storage dtype of parameters.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.sharding import LOGICAL_AXES_KEY

DType = jnp.dtype | type


def param(rngs: nnx.Rngs, init, shape: Sequence[int], param_dtype: DType,
          logical_axes: Sequence[str | None]) -> nnx.Param:
    """A parameter that carries its logical axis names (read by `dig_jax.sharding`)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"parameter of shape {tuple(shape)} given {len(logical_axes)} logical axes {logical_axes}")
    return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), **{LOGICAL_AXES_KEY: tuple(logical_axes)})


class Dense(nnx.Module):
    """y = x @ kernel + bias, kernel float[in, out] (the transpose of torch's Linear weight)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, logical_axes: tuple[str | None, str | None],
                 rngs: nnx.Rngs, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
                 init_std: float = 0.02):
        self.dtype = dtype
        self.kernel = param(rngs, nnx.initializers.normal(init_std), (in_features, out_features), param_dtype, logical_axes)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, (logical_axes[1],))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias.get_value().astype(self.dtype)
        return y


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the text decoder's MLP (no biases) and the Qwen2.5-VL ViT's (with
    biases). One implementation, so both follow HF identically; the attribute names are the HF ones
    (`gate_proj`, `up_proj`, `down_proj`), which the checkpoint mappings rely on."""

    def __init__(self, dim: int, hidden: int, *, use_bias: bool, rngs: nnx.Rngs, dtype: DType = jnp.float32,
                 param_dtype: DType = jnp.float32):
        kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Dense(dim, hidden, logical_axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(dim, hidden, logical_axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, dim, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:  # float[..., D] -> float[..., D]
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nnx.Module):
    """HF Qwen RMSNorm: y = weight * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype). No (1 + w) offset."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype: DType = jnp.float32,
                 logical_axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (logical_axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight.get_value().astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm with weight and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype: DType = jnp.float32,
                 logical_axis: str = "norm"):
        self.eps = eps
        self.weight = param(rngs, nnx.initializers.ones, (dim,), param_dtype, (logical_axis,))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, (logical_axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight.get_value().astype(jnp.float32) + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis (split halves, the HF / NeoX convention)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, with cos/sin broadcast over the heads axis by the caller."""
    return x * cos + rotate_half(x) * sin
