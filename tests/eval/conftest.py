"""Fixtures of the evaluation tests: a few rendered held-out pairs and the tiny run config evaluating them
(the rendered REC set, `rec_set`, is test-wide: tests/conftest.py)."""
from __future__ import annotations

import pytest

from tests.integration import tiny_config
from tests.tiny_data import render_tiny_dataset

NUM_PAIRS = 6  # two evaluation batches of 4: the second is short, so the lockstep pass pads it


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory) -> str:
    """Glob of one ArrayRecord shard of 6 pairs with 0 to 2 differences, rendered at the tiny resolution."""
    return render_tiny_dataset(str(tmp_path_factory.mktemp("dig_eval_data")), NUM_PAIRS, seed=5,
                               differences=(0, 2), num_shards=1)


@pytest.fixture
def eval_config(eval_files):
    """The trainer tests' tiny model on one device, evaluating every held-out pair in batches of 4."""
    c = tiny_config.get_config(eval_files)
    c.mesh.num_devices = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.eval.batch_size, c.eval.num_pairs, c.eval.max_new_tokens, c.eval.num_visualise = 4, 100, 12, 3
    return c
