"""Every shipped config validates, and its model config builds (full sizes only abstractly); the fields
the validator checks name themselves in its errors."""
import os

import re

import pytest

from configs import base, demo_cpu, dig_qwen3vl
from dig_jax import assemble
from dig_jax.config_validation import ConfigError, validate
from dig_jax.models import config as model_config
from dig_jax.processing.examples import max_answer_tokens
from dig_jax.rl.curriculum import Curriculum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("variant", ["4b", "8b", "4b_thinking", "8b_thinking", "qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_paper_configs_validate_on_a_pod(variant):
    c = dig_qwen3vl.get_config(variant)
    c.model.init_checkpoint = "/ckpt"
    c.data.train_files = "/data/*.array_record"
    validate(c, num_devices=16, num_processes=4)
    Curriculum(list(c.curriculum.phases))
    assert assemble.model_family(_with_preset(c)) in ("qwen3_vl", "qwen2_5_vl")


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


def test_demo_data_settings_carry_the_demo_kinds_and_weights():
    from data_pipeline import settings

    c = demo_cpu.get_config()
    g = settings.demo_settings(c.demo)
    settings.validate(g)
    assert g.kinds == tuple(c.demo.kinds) and g.kind_weights == (
        None if c.demo.kind_weights is None else tuple(c.demo.kind_weights))
    c.demo.kinds, c.demo.kind_weights = ("remove", "color"), (1, 3)
    g = settings.demo_settings(c.demo)
    assert (g.kinds, g.kind_weights) == (("remove", "color"), (1, 3))
    c.demo.kind_weights = (1, 2, 3)
    with pytest.raises(ValueError, match="kind_weights"):
        settings.validate(settings.demo_settings(c.demo))


def test_full_size_preset_without_checkpoint_is_refused():
    c = base.get_config()
    c.model.preset = "qwen3_vl_8b"
    with pytest.raises(ConfigError, match="config.model.init_checkpoint"):
        validate(c, num_devices=1)


@pytest.mark.parametrize("variant", ["4b", "4b_thinking", "8b_thinking", "qwen2_5_vl_7b"])
def test_paper_config_generation_caps_hold_max_boxes_answers(variant, tmp_path):
    """The start-up check on the paper config, with the project's tiny tokenizer standing in for the real one
    (same pre-tokenizer: digits one by one, so coordinates cost as much) on 1024 px renders (4-digit pixel
    coordinates for Qwen2.5-VL)."""
    c = _with_preset(dig_qwen3vl.get_config(variant))
    family = assemble.model_family(c)
    tok_path = assemble.tokenizer_path(c, str(tmp_path), family)
    cfg = assemble.model_config_from(c, assemble.load_run_tokenizer(c, tok_path))
    builder = assemble.example_builder(c, cfg, tok_path, (1024, 1024))
    for field in ("grpo.max_new_tokens", "eval.max_new_tokens"):
        section, name = field.split(".")
        assemble.check_room_for_answers(c, builder, field, c[section][name])


@pytest.mark.parametrize("size", ["4b", "8b"])
def test_thinking_variants_differ_only_in_template_and_caps(size):
    """The Thinking variants keep every setting of their Instruct twin but the preset, the template, the
    reasoning budget and the two generation caps (reasoning + the longest answer)."""
    thinking, instruct = (_flat(dig_qwen3vl.get_config(v).to_dict()) for v in (f"{size}_thinking", size))
    changed = {k for k in thinking.keys() | instruct.keys() if thinking.get(k) != instruct.get(k)}
    assert changed == {"model.preset", "data.chat_template", "data.reasoning_budget", "grpo.max_new_tokens",
                       "eval.max_new_tokens"}
    assert thinking["model.preset"] == f"qwen3_vl_{size}_thinking" and thinking["data.chat_template"] == "thinking"
    assert model_config.preset(f"qwen3_vl_{size}_thinking") == model_config.preset(f"qwen3_vl_{size}")


def _flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("field", ["grpo.max_new_tokens", "eval.max_new_tokens"])
def test_thinking_cap_without_room_for_reasoning_is_refused(field, tmp_path):
    """512 tokens hold the Instruct answer of 8 boxes but not 1536 tokens of reasoning before it."""
    c = _with_preset(dig_qwen3vl.get_config("4b_thinking"))
    family = assemble.model_family(c)
    tok_path = assemble.tokenizer_path(c, str(tmp_path), family)
    cfg = assemble.model_config_from(c, assemble.load_run_tokenizer(c, tok_path))
    builder = assemble.example_builder(c, cfg, tok_path, (1024, 1024))
    section, name = field.split(".")
    with pytest.raises(ConfigError, match=rf"^config\.{field}: 512 new tokens cannot hold an answer of "
                                          rf"data\.max_boxes=8 boxes after data\.reasoning_budget=1536 tokens "
                                          rf"of reasoning, which takes up to \d+ tokens"):
        assemble.check_room_for_answers(c, builder, field, 512)
    need = max_answer_tokens(builder, 8) + 1536
    assemble.check_room_for_answers(c, builder, field, need)  # exactly enough
    with pytest.raises(ConfigError, match=rf"^config\.{field}: {need - 1} new tokens"):
        assemble.check_room_for_answers(c, builder, field, need - 1)
    assert c[section][name] >= need


@pytest.mark.parametrize("changes, field", [
    ({"data.chat_template": "reasoning"}, "data.chat_template"),
    ({"model.preset": "qwen2_5_vl_tiny", "model.vision_position_init": "normal", "data.chat_template": "thinking"},
     "data.chat_template"),
    ({"data.reasoning_budget": 64}, "data.reasoning_budget"),  # the Instruct template has no reasoning
    ({"data.chat_template": "thinking", "data.reasoning_budget": -1}, "data.reasoning_budget"),
])
def test_chat_template_fields_are_checked_and_named(changes, field):
    c = _demo_with_data()
    for path, value in changes.items():
        section, name = path.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=1)
    assert str(e.value).startswith(f"config.{field}:"), str(e.value)


def _demo_with_data():
    c = demo_cpu.get_config()
    c.data.train_files = "/data/*.array_record"
    return c


@pytest.mark.parametrize("field, value", [
    ("reward.fn", "f1_only"),  # not a registered reward
    ("reward.fn", 3),
    ("reward.count_weight", -0.5),
    ("reward.count_weight", "0.1"),
    ("reward.extra_box_penalty", -0.125),
    ("grpo.scale_by_std", 1),  # a bool, not a truthy number
    ("grpo.scale_by_std", "yes"),
    ("grpo.scoring_chunk", 0),
    ("grpo.response_bucket", -1),
    ("grpo.response_bucket", 64.0),
    ("grpo.sampling_mesh", "tp=2"),
    ("grpo.sampling_mesh", "tensor=0"),
    ("eval.every", -1),
    ("eval.every", 2.5),
    ("eval.every", True),
    ("eval.evaluators", ()),
    ("eval.evaluators", "dig"),  # a bare string, not a tuple of names
    ("eval.evaluators", ("dig", 3)),
    ("log.transfer_guard", "forbid"),  # not a jax.transfer_guard level
])
def test_new_fields_are_checked_and_named(field, value):
    c = _demo_with_data()
    section, name = field.split(".")
    with c.unlocked():  # delete first: ConfigDict would refuse a value of another type as a TypeError
        del c[section][name]
        c[section][name] = value
    with pytest.raises(ConfigError) as e:
        validate(c, num_devices=1)
    assert str(e.value).startswith(f"config.{field}:"), str(e.value)


def test_new_fields_accept_their_documented_values():
    c = _demo_with_data()
    c.grpo.scale_by_std = False
    c.eval.every = 50
    c.eval.evaluators = ("dig", "dig_visualise")
    c.log.transfer_guard = "disallow"
    validate(c, num_devices=1)


@pytest.mark.parametrize("value, devices, processes, why", [
    ("tensor=3", 8, 1, "tensor=3 does not divide the 8 devices"),
    ("tensor=1", 16, 1, "leaves a data axis of 16, which does not divide the rollout's 24 rows"),
    ("tensor=8", 8, 2, "a tensor group must lie within one host (4 devices each)"),
])
def test_a_sampling_mesh_that_cannot_work_is_named(value, devices, processes, why):
    c = _demo_with_data()
    c.grpo.prompts_per_batch, c.grpo.group_size = 8, 3  # 24 rows
    c.eval.batch_size = c.sft.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 4  # 2 or 4 batch shards: the batches divide
    c.grpo.sampling_mesh = value
    with pytest.raises(ConfigError, match=rf"^config\.grpo\.sampling_mesh: .*{re.escape(why)}"):
        validate(c, num_devices=devices, num_processes=processes)
    c.grpo.sampling_mesh = "tensor=2"
    validate(c, num_devices=8, num_processes=1)


def test_missing_new_field_is_named():
    c = _demo_with_data()
    with c.unlocked():
        del c.eval["evaluators"]
    with pytest.raises(ConfigError, match=r"^config.eval.evaluators: is missing"):
        validate(c, num_devices=1)


def test_zero_reward_threshold_is_refused_for_the_dig_reward():
    """A DiG reward is >= 0, so an inclusive threshold of 0 ends its phase after the first window."""
    c = _demo_with_data()
    phases = [dict(p) for p in c.curriculum.phases]
    phases[0]["reward_threshold"] = 0.0
    c.curriculum.phases = phases
    with pytest.raises(ConfigError, match=r"^config.curriculum.phases\[0\].reward_threshold: 0.0 .* use None"):
        validate(c, num_devices=1)


def test_base_curriculum_runs_each_phase_to_max_steps():
    phases = Curriculum(list(base.get_config().curriculum.phases)).phases
    assert [p.reward_threshold for p in phases] == [None, None]
    assert all(p.max_steps for p in phases)


def test_base_scoring_chunk_counts_completion_positions():
    """64 positions per chunk bounds the scorer's float32[rows, chunk, V] logits (the jitted steps' default)."""
    assert base.get_config().grpo.scoring_chunk == 64


def test_datagen_config_file_is_the_data_pipeline_settings():
    """configs/datagen.py stays a config file for `--config=configs/datagen.py:224`, loaded by path."""
    from absl import flags
    from ml_collections import config_flags

    from data_pipeline import settings

    path = os.path.join(REPO, "configs", "datagen.py")
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", path, flag_values=values)
    values(["prog", f"--config={path}:224"])
    assert values.config.to_dict() == settings.get_config("224").to_dict()
    settings.validate(values.config)
