"""Fixtures of the evaluation tests: a few rendered held-out pairs and the tiny run config evaluating them."""
from __future__ import annotations

import glob
import os

import pytest

from configs import datagen
from data_pipeline.generate import generate_dataset
from tests.integration import tiny_config

NUM_PAIRS = 6  # two evaluation batches of 4: the second is short, so the lockstep pass pads it


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory) -> str:
    """Glob of one ArrayRecord shard of 6 pairs with 0 to 2 differences, rendered at the tiny resolution."""
    out = str(tmp_path_factory.mktemp("dig_eval_data"))
    config = datagen.get_config(str(tiny_config.RESOLUTION))
    config.num_differences_min, config.num_differences_max = 0, 2
    generate_dataset(out, NUM_PAIRS, seed=5, workers=1, config=config, num_shards=1, progress=False)
    pattern = os.path.join(out, "*.array_record")
    assert glob.glob(pattern), f"the generator wrote no shards into {out}"
    return pattern


@pytest.fixture
def eval_config(eval_files):
    """The trainer tests' tiny model on one device, evaluating every held-out pair in batches of 4."""
    c = tiny_config.get_config(eval_files)
    c.mesh.num_devices = 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    c.eval.batch_size, c.eval.num_pairs, c.eval.max_new_tokens, c.eval.num_visualise = 4, 100, 12, 3
    return c
