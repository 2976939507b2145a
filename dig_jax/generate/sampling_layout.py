"""The sampling layout: the devices of the training mesh arranged for decoding, and the moves in and out.

Why: the trainer shards every parameter over the `fsdp` axis (ZeRO-3), so a forward pass on the training
mesh all-gathers each layer's weights before using them. That is cheap for an update, which runs the
gathered weights over thousands of positions, and ruinous for decoding, which runs them over one position
per row per step: on the training mesh every generated token moves the whole model across the
interconnect (for an 8B model on 16 chips, ~16 GB per chip per token in bfloat16).

The sampling layout is a second mesh over the same devices, shaped (data = devices / tensor, fsdp = 1,
tensor): a copy of the policy is tensor-parallel within each group of `tensor` chips (heads, MLP width
and vocabulary split, as the logical rules say) and replicated across groups, and the rollout's rows are
split over `data`. A decode step then moves only activations (two all-reduces per layer within a tensor
group), never weights. The cost is paid once per GRPO iteration instead of once per token:
`SamplingLayout.policy` copies the parameters from the training layout into the sampling layout in one
jitted transfer (cast to the model's computation dtype, which every matmul reads them in anyway), and
`to_mesh` moves the sampled tokens and log-probs back into the training layout for the update.

The axis names are the training mesh's, so the model code, its sharding constraints and the KV cache
(float[layers, B, S, K, H], rows over `data`, KV heads over `tensor`) need no change: the rollout simply
runs under `sharding.activate(layout.mesh)`.

`grpo.sampling_mesh` picks the layout:
  "training"   decode on the training mesh (no copy)
  "tensor=N"   tensor groups of N chips (N = 1: a whole replica per chip, pure data parallelism)
  "auto"       the largest tensor group that stays within one host and divides the KV heads (so decoding
               sends nothing between hosts), or where that copy would not fit in half a chip's HBM,
               the smallest in-host group whose copy does; the training mesh when that is the same
               layout, or when there is one device (`choose_tensor`)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import sharding

# Calls of `SamplingLayout.policy` (a Python-side count per call, not per trace): tests check the policy is
# copied once per GRPO iteration.
RESHARD_CALLS: collections.Counter = collections.Counter()

_TENSOR = re.compile(r"^tensor=(\d+)$")


def parse(spec: str) -> str | int:
    """"auto", "training", or the tensor-group size of "tensor=N"; a ValueError naming the field otherwise."""
    spec = str(spec).strip()
    if spec in ("auto", "training"):
        return spec
    match = _TENSOR.match(spec)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"{spec!r} is not 'auto', 'training' or 'tensor=N' (N >= 1)")
    return int(match.group(1))


def tensor_problem(tensor: int, *, num_devices: int, devices_per_process: int, num_processes: int,
                   rows: int) -> str | None:
    """Why a tensor group of `tensor` chips cannot work, or None: it must divide the devices, leave a data
    axis that divides the rollout's rows, and (on several hosts) lie within one host, since each host
    places only its own rows."""
    if num_devices % tensor:
        return f"tensor={tensor} does not divide the {num_devices} devices"
    data = num_devices // tensor
    if rows % data:
        return (f"tensor={tensor} leaves a data axis of {data}, which does not divide the rollout's {rows} rows "
                "(grpo.prompts_per_batch x grpo.group_size)")
    if num_processes > 1 and devices_per_process % tensor:
        return (f"tensor={tensor}: a tensor group must lie within one host ({devices_per_process} devices each), "
                "since each host places only its own rows")
    return None


def choose_tensor(*, num_devices: int, devices_per_process: int, num_processes: int, rows: int, kv_heads: int,
                  weight_bytes: int, hbm_bytes: int | None) -> int | None:
    """The "auto" tensor-group size (see the module docstring), or None when no group size works.

    Candidates divide the host's device count (a group never spans hosts: nothing crosses them per
    token, and each host places its own rows) and leave a data axis that divides the rows. Preferred:
    the largest that divides the KV heads (each chip then keeps whole heads of the cache). Largest,
    because a decode step streams every weight of the chip's shard from HBM, so a smaller shard is a
    shorter step. With a known HBM size the copy must fit in half of it (the training state and the KV
    cache share the chip); when the preferred group's does not, the smallest group whose copy fits."""
    def fits(t: int) -> bool:
        return hbm_bytes is None or weight_bytes / t <= hbm_bytes / 2

    candidates = [t for t in range(1, devices_per_process + 1)
                  if devices_per_process % t == 0 and num_devices % t == 0 and rows % (num_devices // t) == 0]
    whole_heads = [t for t in candidates if kv_heads % t == 0]
    if whole_heads and fits(whole_heads[-1]):
        return whole_heads[-1]
    return next((t for t in candidates if fits(t)), None)


def resolve(spec: str, *, training_mesh: Mesh, num_processes: int, rows: int, kv_heads: int,
            weight_bytes: int, hbm_bytes: int | None) -> int | None:
    """The tensor-group size of the configured layout, or None to decode on the training mesh."""
    try:
        choice = parse(spec)
    except ValueError as e:
        raise ValueError(f"config.grpo.sampling_mesh: {e}") from None
    num_devices = training_mesh.devices.size
    devices_per_process = num_devices // num_processes
    if choice == "training" or num_devices == 1:
        return None
    if choice == "auto":
        choice = choose_tensor(num_devices=num_devices, devices_per_process=devices_per_process,
                               num_processes=num_processes, rows=rows, kv_heads=kv_heads,
                               weight_bytes=weight_bytes, hbm_bytes=hbm_bytes)
        same = choice is not None and training_mesh.shape["fsdp"] == 1 and training_mesh.shape["tensor"] == choice
        return None if choice is None or same else choice
    problem = tensor_problem(choice, num_devices=num_devices, devices_per_process=devices_per_process,
                             num_processes=num_processes, rows=rows)
    if problem:
        raise ValueError(f"config.grpo.sampling_mesh: {problem}")
    return choice


def for_run(spec: str, *, training_mesh: Mesh, num_processes: int, rows: int, model_cfg, params, dtype,
            hbm_bytes: int | None) -> "SamplingLayout | None":
    """The configured layout of a run (`grpo.sampling_mesh` = `spec`) over the training mesh's devices,
    holding `params` (arrays or ShapeDtypeStructs) cast to `dtype`; None to decode on the training mesh."""
    dtype = jnp.dtype(dtype)
    weight_bytes = sum(int(x.size) for x in jax.tree.leaves(params)) * dtype.itemsize
    tensor = resolve(spec, training_mesh=training_mesh, num_processes=num_processes, rows=rows,
                     kv_heads=model_cfg.text.num_key_value_heads, weight_bytes=weight_bytes, hbm_bytes=hbm_bytes)
    return None if tensor is None else SamplingLayout.over(list(training_mesh.devices.flat), tensor, dtype)


@dataclasses.dataclass(frozen=True)
class SamplingLayout:
    """The sampling mesh (data x 1 x tensor over the training mesh's devices) and the dtype of the copy."""

    mesh: Mesh
    dtype: jnp.dtype

    @classmethod
    def over(cls, devices: Sequence[jax.Device], tensor: int, dtype) -> "SamplingLayout":
        """Tensor groups of consecutive devices (`jax.devices()` lists each host's devices together, so a
        group that divides a host's devices lies within it)."""
        return cls(sharding.make_mesh((-1, 1, tensor), devices), jnp.dtype(dtype))

    @property
    def tensor(self) -> int:
        return int(self.mesh.shape["tensor"])

    def describe(self) -> str:
        return f"data={self.mesh.shape['data']} x tensor={self.tensor} ({self.dtype.name} copy)"

    def reshard_fn(self, params: nnx.State):
        """The jitted copy of `params` (arrays or ShapeDtypeStructs with shardings, in the training layout)
        into this layout; `.lower(params)` lowers it."""
        leaves, treedef = jax.tree.flatten(params)
        targets = jax.tree.leaves(sharding.state_shardings(params, self.mesh))
        variables = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        stacked = tuple((v.get_metadata().get(sharding.LOGICAL_AXES_KEY) or (None,))[0] == sharding.LAYERS_AXIS
                        for v in variables)
        return _reshard_fn(treedef, tuple(x.sharding for x in leaves), tuple(targets), stacked, self.dtype)

    def policy(self, params: nnx.State) -> nnx.State:
        """The policy's parameters in the sampling layout: one jitted transfer (counted in RESHARD_CALLS)."""
        RESHARD_CALLS["policy"] += 1
        return self.reshard_fn(params)(params)


def to_mesh(tree, mesh: Mesh):
    """Batch-major device arrays (the sampled tokens, masks and log-probs) moved onto `mesh` with the
    trainer's batch placement (`sharding.batch_sharding`), in one jitted transfer."""
    leaves, treedef = jax.tree.flatten(tree)
    targets = tuple(sharding.batch_sharding(mesh, x.shape) for x in leaves)
    return jax.tree.unflatten(treedef, _move_fn(targets)(leaves))


@functools.lru_cache(maxsize=16)
def _move_fn(targets: tuple):
    """One jitted identity per target placement (compiled once per input shapes and shardings)."""
    return jax.jit(lambda leaves: leaves, out_shardings=list(targets))


@functools.lru_cache(maxsize=16)
def _reshard_fn(treedef, sources: tuple, targets: tuple, stacked: tuple, dtype: jnp.dtype):
    """One jitted copy per (parameter tree, source and target shardings, dtype), so each iteration's copy
    reuses the compiled transfer. Floating parameters are cast where they are, in the training layout,
    so the transfer moves `dtype` bytes. The two meshes differ in shape, and XLA moves an array between
    them by replicating it first: a stacked parameter (leading `layers` axis) is therefore copied one
    layer at a time (`lax.map`), so at most one layer of it is ever whole on a chip, not the model."""
    def copy_one(x, src, dst, is_stacked):
        cast = x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        if not is_stacked:
            return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(cast, src), dst)
        layer_src, layer_dst = _layer_sharding(src), _layer_sharding(dst)
        return jax.lax.map(lambda layer: jax.lax.with_sharding_constraint(
            jax.lax.with_sharding_constraint(layer, layer_src), layer_dst), cast)

    def copy(leaves):
        return [copy_one(*args) for args in zip(leaves, sources, targets, stacked)]

    jitted = jax.jit(copy, out_shardings=list(targets))

    def reshard(params):
        return jax.tree.unflatten(treedef, jitted(jax.tree.leaves(params)))

    reshard.lower = lambda params: jitted.lower(jax.tree.leaves(params))  # for the AOT plan
    return reshard


def _layer_sharding(stacked: NamedSharding) -> NamedSharding:
    """The sharding of one layer of a stacked parameter (its spec without the unsharded layer axis)."""
    return NamedSharding(stacked.mesh, PartitionSpec(*tuple(stacked.spec)[1:]))
