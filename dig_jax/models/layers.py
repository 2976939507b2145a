"""Building blocks shared by the vision tower and the text decoder of both families.

Every layer follows the Hugging Face numerics exactly, where ports usually break parity: RMSNorm
normalises in float32 and casts back to the input dtype *before* the scale (no 1 + w offset, which
matters in bfloat16); rotary embeddings use the rotate-half (split halves) convention over the full head
dimension, never interleaved pairs.

Stacked layers. Both towers hold their repeated blocks as ONE module whose parameters carry a leading
layer axis (`stack_layers`: `nnx.vmap` over the constructor with one RNG key per layer, logical axis
"layers" prepended) and run them with one `jax.lax.scan` (`scan_layers`). XLA then compiles the block
body once instead of once per layer: compile time and host memory stop growing with depth. Each scanned
body can be rematerialised (`remat`, one of `REMAT_POLICIES`):
  * "none": the scan keeps every intermediate of every layer for the backward pass (fastest, most memory);
  * "full": only each layer's input carry is kept, the whole body is recomputed in the backward pass
    (about one extra forward of compute; activation memory ~ one [B, L, D] per layer);
  * "dots": matmul outputs without batch dimensions are kept (the q/k/v/o and MLP projections, not the
    attention scores, `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`); the rest is recomputed.

Axis legend for shapes: B batch, L length, D model width, F feed-forward width, N heads, H head dim,
Y stacked layers.
`dtype` is the computation dtype, `param_dtype` the storage dtype of parameters.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.sharding import LAYERS_AXIS, LOGICAL_AXES_KEY

DType = jnp.dtype | type

REMAT_POLICIES: tuple[str, ...] = ("none", "full", "dots")


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


class HFParam(NamedTuple):
    """One model parameter and the Hugging Face tensor(s) it holds (the checkpoint mappings' entries).

    hf_names:  one name for a plain parameter; for a stacked one, one name per layer in layer order
               (the parameter is float[Y, ...] and layer i holds the tensor hf_names[i]).
    path:      the parameter's path inside its module (the keys of `nnx.to_flat_state`).
    transform: how ONE HF tensor maps to our layout (of one layer), e.g. "linear" (torch [out, in] ->
               kernel [in, out]) or "copy".
    stacked:   whether `path` has the leading layer axis.
    """

    hf_names: tuple[str, ...]
    path: tuple
    transform: str
    stacked: bool


def hf_param(name: str, path: tuple, transform: str) -> HFParam:
    """The mapping entry of a plain (not stacked) parameter."""
    return HFParam((name,), path, transform, False)


def hf_stacked_param(names: Sequence[str], path: tuple, transform: str) -> HFParam:
    """The mapping entry of a stacked parameter: `names[i]` is layer i's HF tensor."""
    return HFParam(tuple(names), path, transform, True)


# ----------------------------------------------------------------------------------------------------
# Stacked layers, scanned
# ----------------------------------------------------------------------------------------------------

def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` independently initialised `make_layer(rngs)` as one module: every parameter gets a
    leading axis of `num_layers` (float[Y, ...]) and the logical axis "layers" in front of its own."""
    if num_layers < 1:
        raise ValueError(f"stack_layers needs at least one layer, got {num_layers}")

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return make_layer(layer_rngs)

    stacked = build(rngs)
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get(LOGICAL_AXES_KEY)
            if axes is not None:
                node.set_metadata(**{LOGICAL_AXES_KEY: (LAYERS_AXIS,) + tuple(axes)})
    return stacked


def _rematerialise(fn: Callable, remat: str) -> Callable:
    """`fn` wrapped in `jax.checkpoint` per the policy ("none": unchanged). `prevent_cse=False` because
    the function is a scan body, where the scan already keeps XLA from merging forward and recompute."""
    check_remat(remat)
    if remat == "none":
        return fn
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def scan_layers(stack: nnx.Module, body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry: Any,
                xs: Any = None, *, remat: str = "none") -> tuple[Any, Any]:
    """Runs the layers of `stack` (from `stack_layers`) in order with one `jax.lax.scan`.

    body(layer, carry, x) -> (carry, y), where `layer` is a module holding one layer's parameters and
    `x` the layer's slice of `xs` (a pytree with a leading layer axis, or None). Returns (final carry,
    stacked ys). The layers must not change their own state (no mutable variables). `remat` applies to
    each layer's body (see the module docstring).
    """
    graphdef, params = nnx.split(stack)

    def step(c, inputs):
        layer_params, x = inputs
        return body(nnx.merge(graphdef, layer_params), c, x)

    return jax.lax.scan(_rematerialise(step, remat), carry, (params, xs))
