"""Orbax checkpoints of a whole training run: arrays, bookkeeping and the data iterator, together.

One checkpoint step holds several items, written atomically by orbax (a step directory is only visible
once complete, so a crash never leaves a checkpoint that a restart would trust):
  params       the model parameters (alone, so evaluation and export restore them without the rest);
  train_state  optimiser state, RNG key, the GRPO reference parameters;
  meta         JSON bookkeeping: step, stage, curriculum state;
  data         the Grain iterator position, so the batches after a restore are those that would have come.
Array items are restored onto whatever mesh the caller's abstract target describes, so a run saved on 8
devices restores on 1 and vice versa.

`PreemptionGuard` turns SIGTERM (what a TPU VM receives before preemption) into a flag the loop polls
at step boundaries: the loop then saves and exits cleanly instead of dying mid-write.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


class MissingCheckpointError(FileNotFoundError):
    """Raised when a restore is asked for a step or directory that holds no complete checkpoint."""


class Checkpointer:
    """Saves every `save_every` steps (and on demand), keeps the newest `keep`, restores exactly.

    Steps in `keep_steps` (the end of the warm-up, which evaluation compares with the end of GRPO) are
    kept besides the newest `keep`, however long the run goes on.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int, use_async: bool = True,
                 keep_steps: tuple[int, ...] = ()):
        if save_every <= 0:
            raise ValueError(f"checkpoint save_every must be positive, got {save_every}")
        if keep <= 0:
            raise ValueError(f"checkpoint keep must be positive, got {keep}")
        self.directory = os.path.abspath(directory)
        policies = [ocp.checkpoint_managers.LatestN(keep)]
        if keep_steps:
            policies.append(ocp.checkpoint_managers.CustomSteps(sorted(set(keep_steps))))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, create=True, enable_async_checkpointing=use_async,
            cleanup_tmp_directories=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---------------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, arrays: dict[str, Any], meta: dict,
             data_iterator: grain.DatasetIterator | None = None, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether a save was started.

        `arrays` maps item names ("params", "train_state") to pytrees of jax arrays.
        """
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        items["meta"] = ocp.args.JsonSave(meta)
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def read_meta(self, step: int) -> dict:
        """The JSON bookkeeping of `step` alone (to decide what to build before restoring the arrays)."""
        if step not in self.all_steps():
            raise MissingCheckpointError(f"no checkpoint for step {step} in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract: dict[str, Any], data_iterator: grain.DatasetIterator | None = None,
                step: int | None = None) -> tuple[dict[str, Any], dict]:
        """Restores the named array items of `step` (default: the newest) and its meta.

        `abstract` maps item names to pytrees of `jax.ShapeDtypeStruct` with `.sharding` set; the arrays
        are placed there directly (any mesh). Items not named are not read, so evaluation can restore
        "params" alone. The data iterator, when given, is moved to the saved position.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            raise MissingCheckpointError(
                f"no complete checkpoint{'' if step is None else f' for step {step}'} in {self.directory} "
                f"(available steps: {self.all_steps() or 'none'})")
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        items["meta"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except FileNotFoundError as e:
            raise MissingCheckpointError(f"checkpoint step {step} in {self.directory} is incomplete: {e}") from e
        return {name: restored[name] for name in abstract}, restored["meta"]

    def wait(self) -> None:
        """Blocks until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing a pytree of arrays: a restore target.

    numpy leaves stay numpy arrays, so orbax restores them as numpy (host values, no sharding).
    """
    def leaf(x):
        if isinstance(x, np.ndarray):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


class PreemptionGuard:
    """Records SIGTERM instead of dying, so the training loop can checkpoint and exit at a step boundary.

    Only the main thread can install signal handlers; elsewhere (for example inside a test runner's
    worker thread) the guard is inert and `requested` stays False unless `request()` is called.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._event = threading.Event()
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self._event.set()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
