"""Tiny rendered datasets for the tests: a few pairs at the tiny config's resolution, rendered in seconds."""
from __future__ import annotations

import glob
import os

from configs import datagen
from data_pipeline.generate import generate_dataset
from tests.integration import tiny_config


def render_tiny_dataset(out: str, num_pairs: int, *, seed: int, differences: tuple[int, int],
                        num_shards: int) -> str:
    """Renders `num_pairs` pairs with `differences` = (min, max) differences into `num_shards` shards of
    `out`; returns the shards' glob."""
    config = datagen.get_config(str(tiny_config.RESOLUTION))
    config.num_differences_min, config.num_differences_max = differences
    generate_dataset(out, num_pairs, seed=seed, workers=1, config=config, num_shards=num_shards, progress=False)
    pattern = os.path.join(out, "*.array_record")
    assert len(glob.glob(pattern)) == num_shards, f"the generator wrote no shards into {out}"
    return pattern
