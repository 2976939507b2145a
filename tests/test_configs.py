"""Every shipped config validates, and its model config builds (full sizes only abstractly)."""
import pytest

from configs import base, demo_cpu, dig_qwen3vl
from dig_jax import builders
from dig_jax.config_validation import ConfigError, validate
from dig_jax.curriculum import Curriculum


@pytest.mark.parametrize("variant", ["4b", "8b", "qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_paper_configs_validate_on_a_pod(variant):
    c = dig_qwen3vl.get_config(variant)
    c.model.init_checkpoint = "/ckpt"
    c.data.train_files = "/data/*.array_record"
    validate(c, num_devices=16, num_processes=4)
    Curriculum(list(c.curriculum.phases))
    assert builders.model_family(_with_preset(c)) in ("qwen3_vl", "qwen2_5_vl")


def _with_preset(c):
    c = c.copy_and_resolve_references()
    c.model.init_checkpoint = ""
    return c


def test_paper_config_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        dig_qwen3vl.get_config("70b")


def test_demo_config_validates_on_one_device():
    c = demo_cpu.get_config()
    c.data.train_files = "/data/*.array_record"
    validate(c, num_devices=1)
    Curriculum(list(c.curriculum.phases))


def test_full_size_preset_without_checkpoint_is_refused():
    c = base.get_config()
    c.model.preset = "qwen3_vl_8b"
    with pytest.raises(ConfigError, match="config.model.init_checkpoint"):
        validate(c, num_devices=1)


@pytest.mark.parametrize("variant", ["4b", "qwen2_5_vl_7b"])
def test_paper_config_generation_caps_hold_max_boxes_answers(variant, tmp_path):
    """The start-up check on the paper config, with the project's tiny tokenizer standing in for the real one
    (same pre-tokenizer: digits one by one, so coordinates cost as much) on 1024 px renders (4-digit pixel
    coordinates for Qwen2.5-VL)."""
    c = _with_preset(dig_qwen3vl.get_config(variant))
    family = builders.model_family(c)
    tok_path = builders.tokenizer_path(c, str(tmp_path), family)
    cfg = builders.model_config_from(c, builders.load_run_tokenizer(c, tok_path))
    builder = builders.example_builder(c, cfg, tok_path, (1024, 1024))
    for field in ("grpo.max_new_tokens", "eval.max_new_tokens"):
        section, name = field.split(".")
        builders.check_room_for_answers(c, builder, field, c[section][name])
