"""Fixtures for the trainer tests: one tiny rendered dataset per session, the tiny run config, and the
two reference training runs (one device, eight devices) that several test files compare against.

The reference runs use `textual_reward`: the real DiG reward of a randomly initialised model is 0 for
every sample (it never writes valid JSON), which makes every advantage 0 and the GRPO gradient pure
rounding noise that Adam then blows up to full-size updates. Adding a deterministic function of the
sampled text gives the samples of a group different rewards, so the GRPO updates that the tests compare
are real policy-gradient updates.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import re

import numpy as np
import pytest

from tests.integration import tiny_config
from tests.tiny_data import render_tiny_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PAIRS = 24


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA compilation cache for this directory's tests and the CLI runs they start.

    Why: each training run builds a new optax transformation, a static argument of the jitted steps, so
    every run re-traces and re-compiles them; most runs here share their programs (same model, same
    shapes), and the cache turns their XLA compilations into disk reads. Results are unaffected.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    directory = str(tmp_path_factory.mktemp("xla_cache"))
    previous_dir, previous_env = jax.config.jax_compilation_cache_dir, os.environ.get("JAX_COMPILATION_CACHE_DIR")
    cc.reset_cache()  # the cache is set up at the first compilation; earlier tests may have compiled
    jax.config.update("jax_compilation_cache_dir", directory)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    yield directory
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", previous_dir)
    if previous_env is None:
        os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    else:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = previous_env


@pytest.fixture(scope="session")
def train_files(tmp_path_factory) -> str:
    """Glob of the ArrayRecord shards of a tiny rendered dataset (24 pairs, 1-2 differences, 64 px)."""
    return render_tiny_dataset(str(tmp_path_factory.mktemp("dig_data")), NUM_PAIRS, seed=3, differences=(1, 2),
                               num_shards=2)


@pytest.fixture
def config(train_files):
    return tiny_config.get_config(train_files)


def single_device(c):
    """`c` on the first device alone (the reference for sharded runs)."""
    c.mesh.num_devices = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c


# ----------------------------------------------------------------------------------------------------
# A reward with signal, and a recorder of what GRPO read
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Recorded:
    """What each GRPO rollout saw: the number of differences of its prompts and its sampled texts."""

    num_differences: list = dataclasses.field(default_factory=list)
    texts: list = dataclasses.field(default_factory=list)

    def wrap(self, real):
        """The reward function `real` plus `textual_reward`, recording what each rollout saw."""
        def reward_fn(texts, batch, group_size):
            scores = real(texts, batch, group_size)
            scores["reward"] = scores["reward"] + textual_reward(texts)
            self.num_differences.append(np.asarray(batch["num_differences"]).tolist())
            self.texts.append(list(texts))
            return scores

        return reward_fn


def textual_reward(texts) -> np.ndarray:
    """A deterministic reward in [0, 1) from the text alone: different samples get different rewards."""
    return np.array([(sum(map(ord, t)) % 97) / 97.0 for t in texts], np.float32)


def textual_reward_recorder() -> Recorded:
    """A recorder whose `wrap` adds `textual_reward` to a real reward function and records its batches."""
    return Recorded()


# ----------------------------------------------------------------------------------------------------
# Reference runs, shared by test_train_loop and test_resume
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    workdir: str
    config: object
    metrics: list  # the lines of metrics.jsonl
    recorded: Recorded
    trace_deltas: dict  # rl.update.TRACE_COUNTS increase during the run
    compile_deltas: dict  # XLA compilations of each jitted step during the run


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


class _CompileCounter(logging.Handler):
    """Counts XLA compilations per jitted function from JAX's `jax_log_compiles` records.

    Why not `TRACE_COUNTS` alone: a step can trace once yet compile twice, when its second call sees
    different input shardings (XLA chose the outputs' shardings of the first call freely).
    """

    PATTERN = re.compile(r"Finished XLA compilation of jit\((\w+)\)")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.counts = collections.Counter()

    def emit(self, record):
        match = self.PATTERN.match(record.getMessage())
        if match:
            self.counts[match.group(1)] += 1


@contextlib.contextmanager
def count_compiles():
    import jax

    counter, logger = _CompileCounter(), logging.getLogger("jax")
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    logger.addHandler(counter)
    propagate, logger.propagate = logger.propagate, False  # counted here, not printed
    try:
        yield counter.counts
    finally:
        logger.removeHandler(counter)
        logger.propagate = propagate
        jax.config.update("jax_log_compiles", previous)


def run_training(c, workdir: str, recorded: Recorded) -> RunResult:
    import jax

    from dig_jax import assemble
    from dig_jax.rl import rewards, update
    from dig_jax.training import train

    names = ("sft_step", "grpo_step", "reference_logprobs")
    # The counts are this run's: an earlier test of the session may have traced a step with the same
    # static arguments and shapes (reference_logprobs' are only the graphdef and the chunk), and its
    # cached executable would hide this run's trace.
    jax.clear_caches()
    traces = dict(update.TRACE_COUNTS)
    reward_fn = recorded.wrap(rewards.reward_fn_from_config(c.reward, assemble.model_family(c)))
    with count_compiles() as compiles:
        train.train(c, workdir, reward_fn=reward_fn)
    return RunResult(workdir, c, read_metrics(workdir), recorded,
                     {k: update.TRACE_COUNTS[k] - traces.get(k, 0) for k in names},
                     {k: compiles[k] for k in names})


def _reference_run(train_files, tmp_path_factory, name, configure) -> RunResult:
    recorded = textual_reward_recorder()
    c = configure(tiny_config.get_config(train_files))
    return run_training(c, str(tmp_path_factory.mktemp(name)), recorded)


@pytest.fixture(scope="session")
def sharded_run(train_files, tmp_path_factory) -> RunResult:
    """2 SFT + 2 GRPO steps on the data=2 x fsdp=2 x tensor=2 mesh of 8 devices."""
    return _reference_run(train_files, tmp_path_factory, "sharded_run", lambda c: c)


@pytest.fixture(scope="session")
def single_run(train_files, tmp_path_factory) -> RunResult:
    """The same run on one device."""
    return _reference_run(train_files, tmp_path_factory, "single_run", single_device)
