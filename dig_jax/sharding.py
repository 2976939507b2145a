"""The device mesh and the logical-axis rules, in one place.

Parameters carry *logical* axis names as variable metadata (`nnx.Param(value, logical_axes=(...))`),
activations are constrained with `constrain(x, logical_axes)`. This module is the only place that maps
those names onto the physical mesh axes `data`, `fsdp` and `tensor`, so changing a parallelism strategy
is a change of rules, not of model code.

Logical axis names used by the models:
  batch            the batch of sequences; also the image axis -> (data, fsdp)
                   of the ViT's per-image attention blocks
                   (patches viewed as [N/blk, blk, ...], so every device holds whole images)
  length           sequence positions                          -> not sharded
  embed            model width D (text) / vision width         -> fsdp   (ZeRO-3 style parameter sharding)
  mlp              feed-forward width F                        -> tensor
  heads, kv_heads  attention heads N / K                       -> tensor
  head_dim         per-head width H                            -> not sharded
  vocab            vocabulary V                                -> tensor
  patches          flattened image patches (vision sequence)   -> not sharded (sharded by image via
                   "batch" above when images are of one size)
  norm             norm scales/biases                          -> not sharded
  layers           the leading axis of stacked (scanned)       -> not sharded: `lax.scan` slices one
                   decoder layers / ViT blocks                    layer per step, and a sharded layer
                                                                  axis would make every step gather it
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("patches", None),
    ("norm", None),
    ("layers", None),
)

LOGICAL_AXES_KEY = "logical_axes"
LAYERS_AXIS = "layers"  # the logical name of the leading axis of stacked layer parameters


class MeshShapeError(ValueError):
    """A mesh shape that cannot cover the devices. `reason` says which rule failed ("axes": not one entry
    per axis, "fill": more than one -1, "divide": the fixed axes do not divide the devices, "count": the
    product is not the device count), so callers (the config check) can word it for their own fields."""

    def __init__(self, message: str, reason: str, shape: Sequence[int], num_devices: int):
        super().__init__(message)
        self.reason, self.shape, self.num_devices = reason, tuple(shape), num_devices


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       axis_names: Sequence[str] = MESH_AXES) -> tuple[int, ...]:
    """`shape` with its one -1 entry (if any) filled with the remaining devices; the only place that
    resolves and checks a mesh shape. Raises MeshShapeError naming the axes when it cannot work."""
    shape = list(shape)
    if len(shape) != len(axis_names):
        raise MeshShapeError(f"mesh shape {shape} must have one entry per axis {tuple(axis_names)}",
                             "axes", shape, num_devices)
    if shape.count(-1) > 1:
        raise MeshShapeError(f"mesh shape {shape}: at most one axis may be -1", "fill", shape, num_devices)
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise MeshShapeError(f"mesh shape {dict(zip(axis_names, shape))} does not divide the {num_devices} "
                                 "devices", "divide", shape, num_devices)
        shape[shape.index(-1)] = num_devices // known
    if any(s <= 0 for s in shape) or math.prod(shape) != num_devices:
        raise MeshShapeError(f"mesh shape {dict(zip(axis_names, shape))} needs {math.prod(shape)} devices, "
                             f"but {num_devices} are available", "count", shape, num_devices)
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None,
              axis_names: Sequence[str] = MESH_AXES) -> Mesh:
    """Builds a mesh of `shape` over `devices` (default: all). One entry may be -1 (fills the rest).

    Raises a ValueError that names the culprit when the shape does not divide the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices), axis_names)
    return Mesh(np.asarray(devices).reshape(shape), tuple(axis_names))


def logical_to_spec(logical_axes: Sequence[str | None] | None, rules: Rules = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec.

    With a mesh, mesh axes of size 1 are dropped so specs stay readable; divisibility of the actual
    dimension is settled separately by `_divisible_spec`.
    """
    if logical_axes is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical_axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _divisible_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (a 2-head tiny model on tensor=4, say)."""
    fixed = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        fixed.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*fixed)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    logical = var.get_metadata().get(LOGICAL_AXES_KEY)
    shape = var.get_value().shape
    spec = logical_to_spec(logical, rules, mesh)
    return NamedSharding(mesh, _divisible_spec(spec, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A State of NamedShardings matching `state` (abstract or concrete), from each variable's logical axes."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(constructor: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Creates a module with every parameter born directly in its sharding (never whole on one device).

    The module is traced abstractly with `nnx.eval_shape`, its shardings are derived from the logical
    axes, and a jitted initialiser with those `out_shardings` materialises it.
    """
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.state(constructor())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------------
# Activation constraints
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Context:
    mesh: Mesh
    rules: Rules


_ACTIVE: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("dig_jax_sharding", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context, `constrain` places activations on `mesh` according to `rules`."""
    token = _ACTIVE.set(_Context(mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh | None, Rules]:
    """The mesh and rules of the enclosing `activate` (None and the default rules outside one): what
    kernels that run per shard (`dig_jax.models.attention`) partition over while a step is traced."""
    ctx = _ACTIVE.get()
    return (None, DEFAULT_RULES) if ctx is None else (ctx.mesh, ctx.rules)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; a no-op outside `activate` (single device)."""
    ctx = _ACTIVE.get()
    if ctx is None:
        return x
    spec = _divisible_spec(logical_to_spec(logical_axes, ctx.rules, ctx.mesh), x.shape, ctx.mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))


def data_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a batch-major input array: the batch over the data axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def batch_sharding(mesh: Mesh, shape: Sequence[int], axis: int = 0) -> NamedSharding:
    """The trainer's placement of an array of `shape` whose batch axis is `axis`: that axis over the data
    axes where it divides (and is at least one row per shard); scalars, and batches that do not divide
    (a short last evaluation batch), replicated."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if len(shape) == 0 or shape[axis] % shards or shape[axis] < shards:
        return NamedSharding(mesh, P())
    logical = tuple("batch" if d == axis else None for d in range(len(shape)))
    return NamedSharding(mesh, logical_to_spec(logical, mesh=mesh))


def place_batch(tree, mesh: Mesh | None):
    """Row-major host arrays onto `mesh` by `batch_sharding`."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), batch_sharding(mesh, np.shape(x))), tree)


def place_local_batch(tree, mesh: Mesh, axis: int = 0):
    """Like `place_batch`, but each process passes only ITS rows (equal shares, in process order) and
    places them on its own devices (`jax.make_array_from_process_local_data`), so no host holds or
    sends the global batch. The global batch axis `axis` has rows x process_count rows; it is sharded
    over the data axes where that divides (as `place_batch` decides), and where it does not (a short
    evaluation batch) the arrays, small token rows, are gathered and replicated.

    On one process the result equals `place_batch(tree, mesh)` (for axis 0), array and sharding.
    """
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        rows = x.shape[axis] * n_proc
        if rows % batch_shards == 0 and rows >= batch_shards:
            logical = tuple("batch" if d == axis else None for d in range(x.ndim))
            spec = logical_to_spec(logical, mesh=mesh)
            global_shape = x.shape[:axis] + (rows,) + x.shape[axis + 1:]
            return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x, global_shape)
        if n_proc > 1:
            from jax.experimental import multihost_utils

            x = np.concatenate(list(np.asarray(multihost_utils.process_allgather(x))), axis=axis)
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def pin_shardings(tree):
    """Constrains every array of `tree` (parameters, optimiser state) to the sharding of its logical axes
    (replicated when it has none); a no-op outside `activate`.

    Why: without it XLA picks the output shardings of a step freely (a replicated norm scale may come
    back sharded over fsdp), so the second call sees different input shardings and compiles the whole
    step again. Pinned, the outputs have exactly the shardings of the inputs and each step compiles once.
    """
    def pin(x):
        if isinstance(x, nnx.Variable):
            logical = x.get_metadata().get(LOGICAL_AXES_KEY)
            value = x.get_value()
            return x.replace(constrain(value, logical if logical is not None else (None,) * value.ndim))
        return constrain(x, (None,) * x.ndim) if isinstance(x, jax.Array) else x

    return jax.tree.map(pin, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
