"""Abstract inputs with the shardings the trainer gives its real ones.

The trainer places host batches with `sharding.place_batch` / `place_local_batch` (through
`generate.batch.prompt_batch` and `answers`); those call `jax.device_put`, which a compile-only TPU
device cannot receive, so this module applies the same placement rules to `jax.ShapeDtypeStruct`s:
  * a batch-major array: its batch axis over the mesh's (data, fsdp) axes when the rows divide over
    them (and there is at least one row per shard), otherwise replicated; 0-d arrays replicated;
  * a PromptBatch: its token rows (input_ids, attention_mask, rope_deltas, feature_index) by that rule
    on axis 0, position_ids by that rule on axis 1 (int32[3, B, L]), the distinct images
    (`pixel_values`) and their vision metadata replicated (the vision tower sees every image).
`tests/aot/test_placement.py` checks these against the real `prompt_batch` / `answers` on a CPU mesh.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import sharding
from dig_jax.generate.batch import PromptBatch


def abstract(x, sharding_: NamedSharding | None = None) -> jax.ShapeDtypeStruct:
    """A ShapeDtypeStruct of `x` (an array, a ShapeDtypeStruct or a Python scalar) with the dtype a
    device_put would give it (int64 -> int32 without x64) and `sharding_`."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype), sharding=sharding_)


def rows(tree, mesh: Mesh, axis: int = 0):
    """Every leaf of `tree` placed by the batch rule on `axis`."""
    return jax.tree.map(lambda x: abstract(x, sharding.batch_sharding(mesh, abstract(x).shape, axis)), tree)


def replicated(tree, mesh: Mesh):
    """Every leaf of `tree` replicated on `mesh`."""
    return jax.tree.map(lambda x: abstract(x, NamedSharding(mesh, PartitionSpec())), tree)


def prompts(pb: PromptBatch, mesh: Mesh) -> PromptBatch:
    """The PromptBatch of `pb`'s shapes placed as `prompt_batch(..., mesh=mesh)` places it."""
    row_fields = {name: rows(getattr(pb, name), mesh) for name in
                  ("input_ids", "attention_mask", "rope_deltas", "feature_index")}
    return dataclasses.replace(pb, **row_fields, position_ids=rows(pb.position_ids, mesh, axis=1),
                               pixel_values=replicated(pb.pixel_values, mesh),
                               vision=replicated(pb.vision, mesh))


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s leaves carrying the matching NamedShardings of `shardings`."""
    return jax.tree.map(lambda x, s: abstract(x, s), tree, shardings)
