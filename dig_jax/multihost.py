"""What changes when a run spans several processes (the hosts of a pod).

Every host runs the same program on its own share of the data. This module owns what crosses hosts:
joining them (`maybe_initialize_distributed`), gathering what host-side code needs whole (`global_batch`,
`to_host`), keeping finite evaluation passes in step when the hosts' shares differ in size
(`lockstep_global_batches`), and agreeing to stop at the same step on preemption (`preemption_sync`).
On one process every function here is the identity or a no-op.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize_distributed(mode: str) -> None:
    """Joins the processes of a pod (`jax.distributed.initialize`) when `mode` says so.

    "auto": on a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several hosts) or when
    JAX_COORDINATOR_ADDRESS is set (GPU hosts without a cluster manager, several CPU processes standing in
    for a pod: then JAX_NUM_PROCESSES and JAX_PROCESS_ID say who is who). "true" always, "false" never.
    """
    multi_host_tpu = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    coordinator = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if mode == "true" or (mode == "auto" and (multi_host_tpu or coordinator)):
        explicit = {}
        for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            value = os.environ.get(env)
            if value:
                if not value.isdigit():
                    raise ValueError(f"{env}={value!r}: expected a non-negative integer")
                explicit[key] = int(value)
        if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a transport
        jax.distributed.initialize(**explicit)


def global_batch(local: dict) -> dict:
    """Every host reads its own share of the data; the host-side preparation (positions, vision indices,
    rewards) then runs on the global batch, identically on every host, so gather the shares.

    On one process this is the identity. On a pod the gathered batch is the global batch on every host
    (it is then placed with each array's sharding, so each device keeps only its part).
    """
    if jax.process_count() == 1:
        return local
    # The collective goes through JAX, which (without x64) would truncate 64-bit values such as the
    # pairs' int64 seeds; they travel as pairs of 32-bit words and are viewed back afterwards.
    words = {k: _as_32bit_words(v) for k, v in local.items()}
    gathered = multihost_utils.process_allgather(words, tiled=True)
    return {k: _from_32bit_words(np.asarray(gathered[k]), np.asarray(local[k]).dtype) for k in local}


def _as_32bit_words(x) -> np.ndarray:
    """A 64-bit array [..] as uint32 [.., 2] (its bytes unchanged); other arrays as they are."""
    x = np.ascontiguousarray(x)
    return x.view(np.uint32).reshape(*x.shape, 2) if x.dtype.itemsize == 8 else x


def _from_32bit_words(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.dtype(dtype).itemsize != 8:
        return x
    return np.ascontiguousarray(x).view(dtype).reshape(x.shape[:-1])


def preemption_sync(step: int) -> bool:
    """On a pod, all hosts agree to stop at the same step when any host got the preemption notice."""
    try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
    except (RuntimeError, ValueError, AttributeError):  # no preemption service (jax.distributed without it)
        return False


def to_host(x) -> np.ndarray:
    """The whole value of `x` as numpy, on every process.

    On one process (or for a replicated array) this is `np.asarray`. On a pod a batch-sharded array
    spans devices of other hosts, which `jax.device_get` cannot read; the host-side steps that follow
    (decoding sampled tokens, scoring them) run on the global batch on every host, so gather it.
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _process_row_counts(n: int) -> list[int]:
    """Rows each process holds this round (the same list on every process)."""
    if jax.process_count() == 1:
        return [n]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(n))).reshape(-1)]


def _pad_rows(batch: dict, rows: int, valid: int) -> dict:
    """`batch` padded to `rows` rows (padding repeats row 0), with `valid` = the first `valid` rows."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if len(v) < rows:
            v = np.concatenate([v, np.repeat(v[:1], rows - len(v), axis=0)])
        out[k] = v
    out["valid"] = np.arange(rows) < valid
    return out


def lockstep_global_batches(local_batches, rows_per_process: int, *, gather=None, row_counts=None):
    """The global batches of a finite evaluation pass, with every process in step.

    Each process reads its own share of the held-out pairs, and the shares need not be equal (records
    split unevenly over processes, a short last batch). Collectives with unequal shapes, or one process
    leaving the loop while the others wait inside a collective, would hang a pod. So every round the
    processes exchange their row counts, each local batch is padded to `rows_per_process` rows (a
    process whose share has run out sends padding only), and the boolean row mask `valid` marks the
    real rows. The pass ends in the same round on every process: when no process has rows left.

    `gather` (local batch -> global batch) and `row_counts` (n -> every process's n) default to the
    multi-host collectives; on one process they are the identity and `[n]`.
    """
    if gather is None:
        from dig_jax.multihost import global_batch as gather
    row_counts = row_counts or _process_row_counts
    iterator, template, first = iter(local_batches), None, True
    while True:
        batch = next(iterator, None)
        n = 0 if batch is None else len(next(iter(batch.values())))
        if n > rows_per_process:
            raise ValueError(f"evaluation batch of {n} rows on process {jax.process_index()}: more than the "
                             f"{rows_per_process} rows per process the pass was set up for")
        counts = row_counts(n)
        if first and min(counts) == 0 and max(counts) > 0:
            empty = [i for i, c in enumerate(counts) if c == 0]
            raise ValueError(f"process(es) {empty} hold no evaluation pairs while others do: give the evaluation "
                             f"files at least as many records as there are processes ({len(counts)})")
        first = False
        if max(counts) == 0:
            return
        if batch is not None:
            template = batch
        yield gather(_pad_rows(batch if batch is not None else template, rows_per_process, n))


# The fields of a batch that host-side scoring reads (rewards, evaluation metrics): a few numbers per pair.
# The pixels and token rows never need to be whole on a host; they are placed from each host's share.
REWARD_FIELDS = ("gt_boxes", "gt_mask", "original_hw", "resized_hw", "num_differences", "kind_ids", "seed",
                 "valid")


def reward_fields(local: dict, keys=REWARD_FIELDS) -> dict:
    """The global batch of only the fields host-side scoring needs (those of `keys` that `local` has).

    Why: rewards are computed on the host for the global batch of decoded samples, so their inputs must
    be global too; gathering the whole batch would also move every host's pixel_values, which the devices
    already receive from their own host (`prompt_batch(..., process_local=True)`).
    """
    return global_batch({k: local[k] for k in keys if k in local})


def process_values(values) -> np.ndarray:
    """int[P, K]: the small integer vector `values` int[K] of every process, in process order (one
    collective; on one process, just `values`). For the layout numbers hosts must agree on."""
    values = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return values
    return np.asarray(multihost_utils.process_allgather(values, tiled=True)).reshape(jax.process_count(), -1)
