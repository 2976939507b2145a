"""config.json <-> ModelConfig (`hf_config`), checked against the installed transformers 5.24.

  * the decision tables cover every field HF's config classes define, hold HF's defaults, and cover
    every config attribute HF's Qwen-VL modeling code reads (a transformers upgrade fails here, naming
    the new field);
  * every REFUSED field with a value the port does not implement raises, naming the field;
  * the presets' own config.json dicts, HF's default configs and released files load and round trip,
    also through HF's AutoConfig; a file that omits a field reads as HF reads it;
  * why refusing is right, on one field: HF's model with linear RoPE scaling computes other logits.
"""
import copy
import dataclasses
import importlib.util
import inspect
import json
import os
import re

import numpy as np
import pytest
import transformers
from transformers.modeling_rope_utils import RopeParameters

from dig_jax.models import config as C
from dig_jax.models import hf_config as H

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
HF_CLASSES = {  # family -> section -> HF config class
    "qwen2_5_vl": {"": transformers.Qwen2_5_VLConfig, "text_config": transformers.Qwen2_5_VLTextConfig,
                   "vision_config": transformers.Qwen2_5_VLVisionConfig},
    "qwen3_vl": {"": transformers.Qwen3VLConfig, "text_config": transformers.Qwen3VLTextConfig,
                 "vision_config": transformers.Qwen3VLVisionConfig},
}
SECTIONS = [(family, section) for family in FAMILIES for section in HF_CLASSES[family]]


def hf_dict(config: dict) -> dict:
    """config.json as HF 5.24 reads and writes it back (AutoConfig, then to_dict)."""
    return transformers.AutoConfig.for_model(**copy.deepcopy(config)).to_dict()


def hf_default(cls) -> dict:
    return cls().to_dict()


def as_json(value):
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------------
# The tables against transformers
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,section", SECTIONS)
def test_every_field_hf_defines_is_classified(family, section):
    cls = HF_CLASSES[family][section]
    fields = {f.name for f in dataclasses.fields(cls)} | set(hf_default(cls))
    missing = sorted(fields - set(H.TABLES[family][section]))
    assert not missing, f"{cls.__name__} fields without a decision in TABLES[{family!r}][{section!r}]: {missing}"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_rope_parameter_is_classified(family):
    keys = set(RopeParameters.__annotations__) | {"type"}  # `type`: the legacy spelling HF still reads
    for section in ("text_config.rope_parameters", "vision_config.rope_parameters"):
        missing = sorted(keys - set(H.TABLES[family][section]))
        assert not missing, f"RopeParameters keys without a decision in {section}: {missing}"


def test_vision_aliases_are_hfs_attribute_map():
    for family in FAMILIES:
        assert HF_CLASSES[family]["vision_config"].attribute_map == H.VISION_ALIASES


@pytest.mark.parametrize("family,section", SECTIONS)
def test_table_defaults_are_hfs(family, section):
    """USED defaults are HF's class defaults; HF's default of every REFUSED field is an implemented value."""
    default = hf_default(HF_CLASSES[family][section])
    for key, field in H.TABLES[family][section].items():
        if key not in default or key in ("model_type", "text_config", "vision_config", "rope_parameters"):
            continue
        if field.kind == H.USED:
            assert as_json(field.default) == default[key], (section, key)
        elif field.kind == H.REFUSED:
            assert field.accepts(default[key], default), (section, key, default[key])
    rope_table = H.TABLES[family].get(f"{section}.rope_parameters", {})
    for key, value in default.get("rope_parameters", {}).items():
        field = rope_table[key]
        assert field.accepts(value, {}) if field.kind == H.REFUSED else field.default == value, (section, key)


def test_mrope_section_defaults_are_hfs():
    """HF's decoders fall back to a built-in mrope_section when the file has none (modeling code, not config)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    for family, module in (("qwen2_5_vl", Qwen2_5_VLRotaryEmbedding), ("qwen3_vl", Qwen3VLTextRotaryEmbedding)):
        rotary = module(HF_CLASSES[family]["text_config"]())
        assert list(H.TABLES[family]["text_config.rope_parameters"]["mrope_section"].default) == rotary.mrope_section


# Attributes the modeling code reads that are no config.json key: the sub-configs themselves.
NOT_KEYS = {"text_config", "vision_config"}


@pytest.mark.parametrize("family,module", [("qwen2_5_vl", "qwen2_5_vl.modeling_qwen2_5_vl"),
                                           ("qwen3_vl", "qwen3_vl.modeling_qwen3_vl")])
def test_every_attribute_the_modeling_code_reads_is_classified(family, module):
    source = inspect.getsource(importlib.import_module(f"transformers.models.{module}"))
    # (private runtime state such as `config._attn_implementation` is set by from_pretrained, not read from a file)
    read = set(re.findall(r"config\.([A-Za-z]\w*)", source))
    read |= set(re.findall(r"(?:getattr|hasattr)\(\s*(?:self\.)?config,\s*\"(\w+)\"", source))
    known = set().union(*H.TABLES[family].values()) | set(H.VISION_ALIASES) | NOT_KEYS
    assert read, "the pattern no longer finds the modeling code's config reads"
    assert not sorted(read - known), f"{module} reads config fields hf_config does not classify: {sorted(read - known)}"


# ----------------------------------------------------------------------------------------------------
# Refused values
# ----------------------------------------------------------------------------------------------------

# A value the port does not implement, for every REFUSED key of every table (keyed by field name).
BAD = {
    "is_encoder_decoder": True,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"},
    "hidden_act": "gelu",
    "attention_dropout": 0.1,
    "use_sliding_window": True,
    "layer_types": ["sliding_attention", "full_attention"],
    "head_dim": 32,  # the tiny Qwen2.5-VL has hidden 64 / 4 heads = 16
    "attention_bias": True,
    "rope_type": "linear",
    "type": "yarn",
    H.ANY_OTHER: {"rope_type": "default", "rope_theta": 1e6},
}


def refused_cases() -> list:
    return [pytest.param(family, section, key, id=f"{family}-{section or 'top'}-{key}")
            for family in FAMILIES for section, table in H.TABLES[family].items()
            for key, field in table.items() if field.kind == H.REFUSED]


@pytest.mark.parametrize("family,section,key", refused_cases())
def test_refused_field_with_another_value_raises_naming_it(family, section, key):
    config = H.to_hf_config(oracle.tiny_cfg(family))
    target = config
    for part in filter(None, section.split(".")):
        target = target[part]
    value, name = BAD[key], "full_attention" if key == H.ANY_OTHER else key
    target[name] = copy.deepcopy(value)
    label = f"{section}.{name}" if section else name
    with pytest.raises(ValueError, match=re.escape(f"config.json: {label} = {value!r}: ")):
        H.config_from_hf(config)


def test_legacy_spellings_are_refused_under_their_own_names():
    flat = released_qwen2_5_vl_7b()
    flat["use_sliding_window"] = True
    with pytest.raises(ValueError, match=r"^config\.json: use_sliding_window = True: "):
        H.config_from_hf(flat)
    flat = released_qwen2_5_vl_7b()
    flat["rope_scaling"] = {"type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match=r"^config\.json: rope_scaling\.type = 'linear': "):
        H.config_from_hf(flat)
    nested = released_qwen3_vl_4b()
    nested["text_config"]["rope_scaling"]["rope_type"] = "yarn"
    with pytest.raises(ValueError, match=r"^config\.json: text_config\.rope_scaling\.rope_type = 'yarn': "):
        H.config_from_hf(nested)
    # "mrope" is Qwen2.5-VL's legacy name of the default type; HF's Qwen3-VL has no such type.
    nested["text_config"]["rope_scaling"]["rope_type"] = "mrope"
    with pytest.raises(ValueError, match=r"text_config\.rope_scaling\.rope_type = 'mrope'"):
        H.config_from_hf(nested)


def test_config_only_hf_can_express_is_exported():
    cfg = oracle.tiny_cfg("qwen3_vl")
    bias = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, attention_bias=True))
    with pytest.raises(ValueError, match=r"ModelConfig\.text\.attention_bias = True"):
        H.to_hf_config(bias)
    eps = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, norm_eps=1e-5))
    with pytest.raises(ValueError, match=r"ModelConfig\.vision\.norm_eps = 1e-05"):
        H.to_hf_config(eps)


# ----------------------------------------------------------------------------------------------------
# Configs that load
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_preset_config_json_round_trips_also_through_hf(name):
    cfg = C.preset(name)
    config = as_json(H.to_hf_config(cfg))
    assert H.config_from_hf(config) == cfg
    assert H.config_from_hf(hf_dict(config)) == cfg


def used_values(section: dict, table: dict) -> dict:
    """The section's non-null USED values (sub-configs and RoPE dicts left out)."""
    return {k: v for k, v in section.items() if k in table and table[k].kind == H.USED and v is not None
            and k not in ("rope_parameters", "text_config", "vision_config")}


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_default_config_loads_and_round_trips(family):
    default = hf_default(HF_CLASSES[family][""])
    # HF's class defaults disagree with each other (vision out 3584, text hidden 8192 / 4096): a model HF
    # cannot run either, so the merger's width is set to the decoder's.
    default["vision_config"]["out_hidden_size"] = default["text_config"]["hidden_size"]
    cfg = H.config_from_hf(default)
    assert H.config_from_hf(H.to_hf_config(cfg)) == cfg
    back = hf_dict(H.to_hf_config(cfg))  # what HF makes of our export: the same model as its default
    tables = H.TABLES[family]
    for section in ("", "text_config", "vision_config"):
        want = default[section] if section else default
        got = back[section] if section else back
        want_used = used_values(want, tables[section])
        assert {k: got.get(k) for k in want_used} == want_used, section
        if section:
            assert got["rope_parameters"]["rope_theta"] == want["rope_parameters"]["rope_theta"], section


def released_qwen2_5_vl_7b() -> dict:
    """Qwen2.5-VL-7B-Instruct's config.json (flat layout, written by transformers 4.41)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
        "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
        "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
        "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                          "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                          "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vocab_size": 152064,
    }


def released_qwen3_vl_4b() -> dict:
    """Qwen3-VL-4B-Instruct's config.json layout (nested, written by transformers 4.57: rope_scaling and
    rope_theta inside text_config, the vision sub-config's old model_type)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
            "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
            "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936},
        "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
            "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


def unclassified_keys(config: dict, family: str) -> list[str]:
    tables, text = H.TABLES[family], config.get("text_config")
    out = [k for k in config if k not in tables[""] and (text is not None or k not in tables["text_config"])]
    for section in ("text_config", "vision_config"):
        out += [f"{section}.{k}" for k in config.get(section, {}) if k not in tables[section]]
    return out


@pytest.mark.parametrize("released,preset", [(released_qwen2_5_vl_7b, C.qwen2_5_vl_7b),
                                             (released_qwen3_vl_4b, C.qwen3_vl_4b)])
def test_released_config_json_loads_as_its_preset(released, preset):
    config = released()
    assert not unclassified_keys(config, config["model_type"])  # every key has a recorded decision
    assert H.config_from_hf(config) == preset()
    assert H.config_from_hf(hf_dict(config)) == preset()


def test_config_round_trip_and_real_style_configs():
    """Presets round trip; the released Qwen2.5-VL-3B flat layout reads as its preset; other families fail."""
    for name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_tiny"):
        cfg = C.preset(name)
        assert H.config_from_hf(H.to_hf_config(cfg)) == cfg, name
    # The flat layout of the released Qwen2.5-VL-3B config.json (text fields at the top, rope_scaling).
    flat = {"model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": True,
            "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                              "out_hidden_size": 2048, "patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}}
    assert H.config_from_hf(flat) == C.qwen2_5_vl_3b()
    with pytest.raises(ValueError, match="model_type"):
        H.config_from_hf({"model_type": "llama"})


def omitted_cases() -> list:
    return [pytest.param(family, section, key, id=f"{family}-{section}-{key}")
            for family in FAMILIES for section in ("text_config", "vision_config")
            for key, field in H.TABLES[family][section].items()
            if field.kind == H.USED and key in H.to_hf_config(oracle.tiny_cfg(family))[section]]


@pytest.mark.parametrize("family,section,key", omitted_cases())
def test_an_omitted_field_reads_as_hf_reads_it(family, section, key):
    """HF fills an omitted field with its class default (e.g. Qwen2.5-VL rms_norm_eps 1e-5, Qwen3-VL head_dim
    128): so does config_from_hf. Where that default makes no valid model, both readings fail alike."""
    config = H.to_hf_config(oracle.tiny_cfg(family))
    del config[section][key]
    as_hf_reads_it = hf_dict(config)
    try:
        want = H.config_from_hf(as_hf_reads_it)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e).split(":")[0])):
            H.config_from_hf(config)
        return
    assert H.config_from_hf(config) == want


@pytest.mark.parametrize("family", FAMILIES)
def test_tie_in_text_config_ties_as_in_hf(family):
    """Qwen2.5-VL forwards a pre-5.x text_config.tie_word_embeddings=True to the top level, Qwen3-VL does not."""
    config = H.to_hf_config(oracle.tiny_cfg(family, tie=False))
    config["text_config"]["tie_word_embeddings"] = True
    assert hf_dict(config)["tie_word_embeddings"] is (family == "qwen2_5_vl")
    assert H.config_from_hf(config).tie_word_embeddings is (family == "qwen2_5_vl")


# ----------------------------------------------------------------------------------------------------
# Why refuse: HF computes something else
# ----------------------------------------------------------------------------------------------------

def test_linear_rope_scaling_changes_hfs_logits_so_it_is_refused():
    """The same weights under `rope_type="linear"` (factor 4) give other logits in HF; the port, given
    that file, would have run the unscaled model, so config_from_hf refuses it."""
    cfg = oracle.tiny_cfg("qwen3_vl")
    plain = oracle.hf_model(cfg)
    scaled_config = copy.deepcopy(plain.config)
    scaled_config.text_config.rope_parameters = {**scaled_config.text_config.rope_parameters,
                                                 "rope_type": "linear", "factor": 4.0}
    scaled = transformers.Qwen3VLForConditionalGeneration(scaled_config).eval()
    scaled.load_state_dict(plain.state_dict())
    batch = oracle.make_batch(cfg, [[(1, 8, 12)], [(1, 4, 8), (1, 8, 4)]])
    valid = batch.attention_mask > 0
    want = oracle.hf_logits(plain, batch, cfg.image_token_id)[valid]
    got = oracle.hf_logits(scaled, batch, cfg.image_token_id)[valid]
    relative = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert relative > 0.05, relative  # float32 reruns agree to ~1e-7

    assert H.config_from_hf(plain.config.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"text_config\.rope_parameters\.rope_type = 'linear'"):
        H.config_from_hf(scaled_config.to_dict())


def test_hf_save_pretrained_config_loads(tmp_path):
    """A config.json written by transformers itself (save_pretrained) reads back as the model's config."""
    cfg = oracle.tiny_cfg("qwen2_5_vl")
    oracle.hf_config(cfg).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert H.config_from_hf(json.load(f)) == cfg
