"""Fixtures of the evaluation tests: a few rendered held-out pairs and the tiny run config evaluating them
(the rendered REC set, `rec_set`, is test-wide: tests/conftest.py)."""
from __future__ import annotations

import pytest

from dig_jax import assemble
from dig_jax.eval import registry
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


def eval_context(c, workdir: str, patches_per_image=None) -> registry.EvalContext:
    """What `--mode=eval` hands the evaluators for config `c` and `workdir`: the run's tokenizer, model
    config and mesh."""
    tok_path = assemble.tokenizer_path(c, workdir, assemble.model_family(c))
    tokenizer = assemble.load_run_tokenizer(c, tok_path)
    return registry.EvalContext(c, assemble.model_config_from(c, tokenizer), tokenizer, tok_path,
                                assemble.make_mesh(c), patches_per_image)
