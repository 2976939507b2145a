"""Evaluation keeps the processes of a pod in step when their shares of the held-out pairs differ.

The processes are simulated by threads: `row_counts` and `gather` exchange values through a barrier,
as the multi-host collectives would. A process that left the loop early would leave the others blocked
at the barrier, which times out and fails the test instead of hanging it.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dig_jax.multihost import lockstep_global_batches


class _Exchange:
    """All-gather across `n` threads: each passes its value, each gets the list of all of them."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=20)
        self.slots = [None] * n

    def __call__(self, index: int, value):
        self.slots[index] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return values


def _run_processes(batch_sizes: list[list[int]], rows: int) -> list:
    """Runs one simulated process per entry of `batch_sizes` (its local batches' row counts)."""
    exchange = _Exchange(len(batch_sizes))
    results = [None] * len(batch_sizes)

    def process(index: int):
        start, local = 1000 * index, []
        for n in batch_sizes[index]:  # row ids: 1000 * process + running number, so every row is unique
            local.append({"seed": np.arange(start, start + n), "image": np.full((n, 2, 2), index, np.uint8)})
            start += n

        def gather(batch):
            parts = exchange(index, batch)
            return {k: np.concatenate([p[k] for p in parts]) for k in batch}

        try:
            results[index] = list(lockstep_global_batches(local, rows, gather=gather,
                                                          row_counts=lambda n: exchange(index, n)))
        except Exception as e:  # noqa: BLE001  (the test inspects what each process raised)
            results[index] = e

    threads = [threading.Thread(target=process, args=(i,)) for i in range(len(batch_sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a simulated process is still blocked"
    return results


@pytest.mark.parametrize("batch_sizes", [
    [[4, 4, 2], [4, 3]],  # unequal shares and short last batches
    [[4], [4, 4, 4]],  # one process runs out two rounds early
    [[3, 3], [3, 3], [3, 1]],  # three processes
])
def test_every_process_sees_the_same_global_batches_and_every_pair_once(batch_sizes):
    rows = 4
    results = _run_processes(batch_sizes, rows)
    for r in results:
        assert not isinstance(r, Exception), r
    first = results[0]
    assert len(first) == max(len(s) for s in batch_sizes)  # the pass ends in the same round everywhere
    for other in results[1:]:
        assert len(other) == len(first)
        for a, b in zip(first, other):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    for batch in first:
        assert len(batch["seed"]) == rows * len(batch_sizes)  # fixed shape: one compiled program
    real = np.concatenate([b["seed"][b["valid"]] for b in first])
    expected = np.concatenate([1000 * i + np.arange(sum(s)) for i, s in enumerate(batch_sizes)])
    np.testing.assert_array_equal(np.sort(real), np.sort(expected))  # every pair exactly once
    padded = np.concatenate([b["image"][~b["valid"]] for b in first])
    assert padded.shape[1:] == (2, 2)


def test_a_process_without_pairs_fails_on_every_process_naming_it():
    results = _run_processes([[4, 4], []], rows=4)
    for r in results:
        assert isinstance(r, ValueError)
        assert "process(es) [1] hold no evaluation pairs" in str(r)


def test_one_process_pads_only_its_short_last_batch():
    batches = [{"seed": np.arange(4)}, {"seed": np.arange(4, 6)}]
    out = list(lockstep_global_batches(batches, 4, gather=lambda b: b))
    assert [b["valid"].tolist() for b in out] == [[True] * 4, [True, True, False, False]]
    np.testing.assert_array_equal(out[1]["seed"], [4, 5, 4, 4])
    with pytest.raises(ValueError, match="more than the 3 rows per process"):
        list(lockstep_global_batches(batches, 3, gather=lambda b: b))
