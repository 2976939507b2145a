"""Config errors name the field: `config_validation.validate` (before anything is built) and
`training.setup.setup` (for what needs the devices or the preset), and the CLI exits non-zero with the field.

The config under test is the trainer tests' tiny config (tests/integration/tiny_config.py); each case breaks
one field and checks that the error message starts with that field's dotted path.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dig_jax.training import setup as training_setup
from dig_jax.config_validation import ConfigError, validate
from tests.integration import tiny_config
from tests.integration.conftest import REPO

NUM_DEVICES = 8


def good():
    return tiny_config.get_config("/nonexistent/*.array_record")


def test_the_tiny_config_is_valid():
    validate(good(), NUM_DEVICES)  # the baseline of every case below: only the broken field fails


def _set(c, field, value):
    *parents, leaf = field.split(".")
    for p in parents:
        c = c[p]
    c[leaf] = value


BROKEN = [
    # (field to set, value, field named in the error)
    ("mesh.fsdp", 3, "config.mesh"),  # 2 x 3 x 2 = 12 devices, 8 available
    ("mesh.tensor", 0, "config.mesh.tensor"),
    ("sft.batch_size", 6, "config.sft.batch_size"),  # 6 rows over data x fsdp = 4 shards
    ("grpo.prompts_per_batch", 2, "config.grpo.prompts_per_batch"),
    ("eval.batch_size", 0, "config.eval.batch_size"),
    ("model.preset", "qwen9_vl_tiny", "config.model.preset"),
    ("model.dtype", "float16", "config.model.dtype"),
    ("model.param_dtype", "fp32", "config.model.param_dtype"),
    ("model.vision_position_init", "uniform", "config.model.vision_position_init"),
    ("model.attention", "flash", "config.model.attention"),
    ("grpo.reference_dtype", "float16", "config.grpo.reference_dtype"),
    ("model.preset", "qwen3_vl_8b", "config.model.init_checkpoint"),  # full size needs weights
    ("grpo.group_size", 1, "config.grpo.group_size"),
    ("grpo.num_minibatches", 3, "config.grpo.num_minibatches"),
    ("grpo.top_p", 1.5, "config.grpo.top_p"),
    ("grpo.seed", -1, "config.grpo.seed"),
    ("reward.alpha", -0.1, "config.reward.alpha"),
    ("data.on_corrupt", "ignore", "config.data.on_corrupt"),
    ("data.train_files", "", "config.data.train_files"),
    ("checkpoint.every", 0, "config.checkpoint.every"),
    ("curriculum.phases", [], "config.curriculum.phases"),
    ("curriculum.phases", [{"name": "a", "selection": [[[1], 1.0]], "max_steps": 0}],
     "config.curriculum.phases[0].max_steps"),
    ("curriculum.phases", [{"name": "a", "selection": [[[1], 1.0]], "max_steps": 2, "reward_thresold": 0.5}],
     "config.curriculum.phases[0]: unknown field(s) ['reward_thresold']"),
    ("curriculum.phases", [{"name": "a", "selection": [[[1], 1.0]], "max_steps": None},
                           {"name": "b", "selection": [[[2], 1.0]], "max_steps": None}],
     "config.curriculum.phases[0] ('a') would never end"),
]


@pytest.mark.parametrize("field,value,named", BROKEN, ids=lambda v: str(v)[:40])
def test_validate_names_the_field(field, value, named):
    c = good()
    _set(c, field, value)
    with pytest.raises(ConfigError) as e:
        validate(c, NUM_DEVICES)
    assert str(e.value).startswith(named), str(e.value)


def test_group_size_one_is_fine_without_grpo():
    c = good()
    c.grpo.group_size, c.grpo.steps = 1, 0
    c.grpo.prompts_per_batch = 4
    validate(c, NUM_DEVICES)


@pytest.mark.parametrize("field,value,named", [
    ("mesh.num_devices", 9, "config.mesh.num_devices=9"),  # more than the 8 devices there are
    ("model.overrides", {"text": {"hidden_sise": 64}, "vision": {}}, "config.model.overrides.text.hidden_sise"),
    ("model.overrides", {"txt": {"hidden_size": 64}}, "config.model.overrides.txt"),
], ids=["num_devices", "override_field", "override_section"])
def test_setup_names_the_field(field, value, named, tmp_path):
    """Errors that need the devices or the preset come from `training.setup.setup`, before the model is built."""
    c = good()
    _set(c, field, value)
    with pytest.raises(ValueError) as e:
        training_setup.setup(c, str(tmp_path))
    assert str(e.value).startswith(named), str(e.value)


def test_cli_exits_nonzero_naming_the_field(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "dig_jax.main", f"--config={REPO}/tests/integration/tiny_config.py:/x/*.array_record",
         f"--workdir={tmp_path}", "--config.grpo.group_size=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "config.grpo.group_size" in proc.stderr, proc.stderr[-3000:]
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints")), "nothing may be written before validation"


@pytest.mark.parametrize("merge", [2, 1])
def test_prompts_follow_the_model_patch_geometry(merge, tmp_path):
    """Image tokens per prompt come from the model's vision config, not the family's release preset.

    A model built with `spatial_merge_size=1` emits one token per 16 px patch; its prompts must hold as
    many image-pad tokens, or the model's placement check rejects every batch.
    """
    import numpy as np

    from dig_jax import assemble
    from dig_jax.models.vlm import count_image_tokens

    c = good()
    c.model.overrides.vision.spatial_merge_size = merge
    family = assemble.model_family(c)
    tok_path = assemble.tokenizer_path(c, str(tmp_path), family)
    cfg = assemble.model_config_from(c, assemble.load_run_tokenizer(c, tok_path))
    builder = assemble.example_builder(c, cfg, tok_path, (tiny_config.RESOLUTION,) * 2)
    image = np.zeros((tiny_config.RESOLUTION, tiny_config.RESOLUTION, 3), np.uint8)
    example = builder({"image_a": image, "image_b": image, "boxes": np.zeros((1, 4), np.float32),
                       "kinds": ["add"], "num_differences": 1})
    side = tiny_config.RESOLUTION // 16  # patches per side
    expected = count_image_tokens(np.array([[1, side, side]] * 2), merge)
    assert expected == 2 * side * side // merge**2
    assert int((example["prompt_ids"] == cfg.image_token_id).sum()) == expected


@pytest.mark.parametrize("stage", ["grpo", "eval"])
def test_a_generation_cap_too_short_for_max_boxes_names_the_field(stage, train_files, tmp_path):
    """2 boxes take ~75 tokens with the tiny tokenizer: a cap of 48 would truncate every two-box answer
    (GRPO then learns that one box pays, evaluation never counts two). Caught before any model is built."""
    from dig_jax import checkpointing
    from dig_jax.eval.run import run_eval

    c = tiny_config.get_config(train_files)
    c.data.allow_truncated_answers = False
    c.grpo.max_new_tokens = c.eval.max_new_tokens = 200  # room for both; then shorten the one under test
    c[stage].max_new_tokens = 48
    run = training_setup.setup if stage == "grpo" else run_eval
    with pytest.raises(ConfigError, match=rf"^config\.{stage}\.max_new_tokens: 48 new tokens cannot hold an "
                                          rf"answer of data\.max_boxes=2 boxes, which takes up to \d+ tokens"):
        run(c, str(tmp_path / "workdir"))
    assert not os.path.exists(tmp_path / "workdir" / "checkpoints")

    def passes_the_check():  # eval goes on to look for a checkpoint, which this workdir lacks
        if stage == "grpo":
            return training_setup.setup(c, str(tmp_path / "workdir"))
        with pytest.raises(checkpointing.MissingCheckpointError):
            run_eval(c, str(tmp_path / "workdir"))

    c[stage].max_new_tokens = 200
    passes_the_check()  # long enough
    c.data.allow_truncated_answers, c[stage].max_new_tokens = True, 12
    passes_the_check()  # a smoke test's explicit opt-out
