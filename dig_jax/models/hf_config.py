"""Hugging Face `config.json` <-> `ModelConfig`, for both families, with every HF field accounted for.

The rule: from a given `config.json` the port must compute what transformers 5.24 computes, or refuse.
So `config_from_hf` reads the file the way HF's config classes do, and every field of those classes
(`Qwen2_5_VLConfig` / `Qwen3VLConfig` and their text and vision sub-configs, `PreTrainedConfig`'s own
fields, the `RopeParameters` keys) is classified, as data, in the tables below:

  USED        read into `ModelConfig`; when the file omits it, HF's class default applies, as in HF;
  IRRELEVANT  cannot change what the port computes (the reason is on the line);
  REFUSED     the port implements one value (or a few); any other value raises
              `ValueError("config.json: text_config.<field> = <value>: <why>")`. Without this, e.g. a
              linear or YaRN `rope_scaling`, another `hidden_act`, sliding-window attention or Qwen3-VL's
              `attention_bias=True` would be dropped silently and the port would run a different model.

How HF 5.24 reads a file, and so how this module does:
  * a field the file omits takes the class default (e.g. Qwen2.5-VL's text `rms_norm_eps` is 1e-5, not the
    released 1e-6; `num_key_value_heads` is 8, and only an explicit null means "as many as the heads");
  * the older flat Qwen2.5-VL layout (text fields at the top level, no `text_config`) is read from the top
    level; `Qwen3VLConfig` has no flat layout: without `text_config` HF uses the default text config;
  * `rope_scaling` (the pre-5.x name) wins over `rope_parameters` when both are there, a section-level
    `rope_theta` fills a missing `rope_parameters.rope_theta`, the legacy `type` key stands for
    `rope_type`, and Qwen2.5-VL rewrites the type "mrope" to "default" (Qwen3-VL does not: HF fails on it);
  * a vision `rope_type` "default" means "axial" (the only RoPE HF's vision towers accept); vision
    `num_attention_heads` / `num_hidden_layers` are aliases of `num_heads` / `depth` (`attribute_map`);
  * a pre-5.x `text_config.tie_word_embeddings=True` ties a Qwen2.5-VL model even when the top level says
    False (Qwen3VLConfig has no such rule: only its top-level value counts);
  * keys no class defines are stored by HF as plain attributes; its Qwen-VL modeling code reads none of
    them but the two listed (Qwen2.5-VL `head_dim`, Qwen3-VL `layer_types`), so the rest are dropped here
    too. Also listed: `quantization_config` (refused) and the keys released files are known to carry
    (`vision_token_id`, `in_chans`, ...), so that every key of a released file has a recorded decision.

tests/models/test_hf_config.py checks the tables against the installed transformers: every field its
classes define is classified, every USED/REFUSED default is HF's, and every attribute its Qwen-VL
modeling code reads is classified, so an upgrade that adds a field fails naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dig_jax.models import config as C

USED, IRRELEVANT, REFUSED = "used", "irrelevant", "refused"


@dataclasses.dataclass(frozen=True)
class Field:
    """How one key of one section of `config.json` is treated (see the module docstring)."""

    kind: str
    default: Any = None  # HF 5.24's value when the file omits the key (USED / REFUSED)
    why: str = ""  # IRRELEVANT / REFUSED: why that is right
    accepts: Callable[[Any, dict], bool] | None = None  # REFUSED: (value, section) -> is it implemented?


def _used(default: Any = None) -> Field:
    return Field(USED, default)


def _irrelevant(why: str) -> Field:
    return Field(IRRELEVANT, why=why)


def _only(values: tuple, why: str, default: Any) -> Field:
    """REFUSED unless the value is one of `values` (compared with ==)."""
    return Field(REFUSED, default, why, lambda value, _section: value in values)


def _refused_if(accepts: Callable[[Any, dict], bool], why: str, default: Any = None) -> Field:
    return Field(REFUSED, default, why, accepts)


# A RoPE table's catch-all: a key no `RopeParameters` defines (e.g. a per-layer-type nested dict).
ANY_OTHER = "*"

_NOT_COMPUTED = "what HF's forward returns or logs, not what it computes"
_BASE = {  # PreTrainedConfig's own fields and the keys its to_dict() adds; in every section
    "transformers_version": _irrelevant("the transformers version that wrote the file"),
    "architectures": _irrelevant("names HF's Python class; the top-level model_type picks the family"),
    "model_type": _irrelevant("names HF's sub-config class; the top-level model_type picks the family"),
    "_name_or_path": _irrelevant("where HF loaded the file from"),
    "output_hidden_states": _irrelevant(_NOT_COMPUTED),
    "output_attentions": _irrelevant(_NOT_COMPUTED),
    "return_dict": _irrelevant(_NOT_COMPUTED),
    "dtype": _irrelevant("the stored weights' dtype; loading casts each tensor to the parameter dtype asked for"),
    "torch_dtype": _irrelevant("the pre-5.x name of dtype"),
    "chunk_size_feed_forward": _irrelevant("HF's Qwen-VL modeling code never reads it"),
    "is_encoder_decoder": _only((False,), "Qwen-VL, and the port, are decoder-only", False),
    "id2label": _irrelevant("labels of sequence-classification heads; the port is a causal LM"),
    "label2id": _irrelevant("labels of sequence-classification heads; the port is a causal LM"),
    "problem_type": _irrelevant("the loss of sequence-classification heads; the port is a causal LM"),
}

_TOP = {
    **_BASE,
    "model_type": _used(),  # the family
    "text_config": _used(),
    "vision_config": _used(),
    "image_token_id": _used(C.IMAGE_TOKEN_ID),
    "video_token_id": _used(C.VIDEO_TOKEN_ID),
    "vision_start_token_id": _used(C.VISION_START_ID),
    "vision_end_token_id": _used(C.VISION_END_ID),
    "tie_word_embeddings": _used(False),
    # Not fields of the 5.24 classes; released or older files carry them.
    "eos_token_id": _used(),  # older files keep it here; text_config's wins
    "pad_token_id": _used(),
    "bos_token_id": _irrelevant("HF's generate() only; the port's prompts come from the chat template"),
    "vision_token_id": _irrelevant("HF never reads it: image positions are marked by image_token_id"),
    "quantization_config": _only((None,), "quantized weights: the port loads plain floating-point tensors", None),
}

_SCALED_ROPE = "read only by the scaled RoPE types, which rope_type refuses"
_DROPOUT = "the port has no dropout (the released value is 0.0)"
_INIT = "the spread of HF's random initialisation; a loaded checkpoint replaces it"
_TEXT_COMMON = {  # the per-family tables below add the shape fields with their HF defaults
    **_BASE,
    "rope_parameters": _used(),  # read through the RoPE table
    "pad_token_id": _used(None),
    "hidden_act": _only(("silu",), "the port's decoder MLP is SwiGLU with silu", "silu"),
    "attention_dropout": _only((0, None), _DROPOUT, 0.0),
    "initializer_range": _irrelevant(_INIT),
    "use_cache": _irrelevant("HF's generate() switch for its KV cache; the port's sampler always caches"),
    "max_position_embeddings": _irrelevant(_SCALED_ROPE),
    # Pre-5.x keys HF still converts.
    "rope_scaling": _used(),  # the old name of rope_parameters; wins over it when both are there
    "rope_theta": _used(),  # fills a missing rope_parameters.rope_theta
    "bos_token_id": _irrelevant("HF's generate() only; the port's prompts come from the chat template"),
}


def _all_full_attention(value, _section) -> bool:
    return value is None or all(t == "full_attention" for t in value)


def _head_dim_is_hidden_over_heads(value, section) -> bool:
    return value is None or value == section["hidden_size"] // section["num_attention_heads"]


_TEXT = {
    "qwen2_5_vl": {
        **_TEXT_COMMON,
        "vocab_size": _used(152064), "hidden_size": _used(8192), "intermediate_size": _used(29568),
        "num_hidden_layers": _used(80), "num_attention_heads": _used(64),
        "num_key_value_heads": _used(8),  # null: as many as the attention heads
        "rms_norm_eps": _used(1e-5), "eos_token_id": _used(C.IM_END_ID),
        "tie_word_embeddings": _used(False),  # not a field: the pre-5.x place; True ties the model
        "use_sliding_window": _only((False, None), "the port's decoder attends over the whole sequence", False),
        "layer_types": _refused_if(_all_full_attention, "the port has only full causal attention layers"),
        "sliding_window": _irrelevant("HF discards it unless use_sliding_window, which is refused"),
        "max_window_layers": _irrelevant("places sliding layers only when use_sliding_window, which is refused"),
        # Not a field: HF's Qwen2.5-VL attention uses hidden_size // num_attention_heads, its RoPE this.
        "head_dim": _refused_if(_head_dim_is_hidden_over_heads,
                                "Qwen2.5-VL's head dim is hidden_size // num_attention_heads"),
    },
    "qwen3_vl": {
        **_TEXT_COMMON,
        "vocab_size": _used(151936), "hidden_size": _used(4096), "intermediate_size": _used(22016),
        "num_hidden_layers": _used(32), "num_attention_heads": _used(32),
        "num_key_value_heads": _used(32),  # null: as many as the attention heads
        "rms_norm_eps": _used(1e-6), "head_dim": _used(128),
        "attention_bias": _only((False,), "HF then adds q/k/v and o_proj biases; the port's Qwen3 decoder has "
                                          "none", False),
        # Not fields; released files carry them.
        "eos_token_id": _used(),
        "layer_types": _irrelevant("Qwen3-VL's attention stores it but never uses it"),
        "tie_word_embeddings": _irrelevant("Qwen3VLConfig does not forward it: only the top-level value ties"),
    },
}

_ROPE_COMMON = {  # the RopeParameters keys
    "rope_theta": _used(),
    "mrope_section": _used(),
    "mrope_interleaved": _irrelevant("HF fixes the layout per family (Qwen2.5-VL chunked, Qwen3-VL "
                                     "interleaved)"),
    "partial_rotary_factor": _irrelevant("Qwen-VL's default RoPE rotates the whole head dim regardless"),
    **{key: _irrelevant(_SCALED_ROPE) for key in (
        "factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
        "short_factor", "long_factor", "low_freq_factor", "high_freq_factor", "mscale", "mscale_all_dim",
        "truncate")},
    ANY_OTHER: _refused_if(lambda _value, _section: False, "not a RoPE parameter of transformers 5.24"),
}
_UNSCALED = "the port implements the unscaled M-RoPE only"
_TEXT_ROPE = {
    "qwen2_5_vl": {**_ROPE_COMMON, "rope_theta": _used(1e6), "mrope_section": _used((16, 24, 24)),
                   "rope_type": _only(("default", "mrope"), _UNSCALED, "default"),
                   "type": _only(("default", "mrope"), _UNSCALED, None)},
    "qwen3_vl": {**_ROPE_COMMON, "rope_theta": _used(5e5), "mrope_section": _used((24, 20, 20)),
                 "rope_type": _only(("default",), _UNSCALED, "default"),
                 "type": _only(("default",), _UNSCALED, None)},
}
_AXIAL = "HF's vision towers accept only the axial 2D RoPE ('default' is read as it)"
_VISION_ROPE = {**_ROPE_COMMON, "rope_theta": _used(10000.0),
                "mrope_section": _irrelevant("HF's vision RoPE never reads it"),
                "rope_type": _only(("axial", "default"), _AXIAL, "axial"),
                "type": _only(("axial", "default"), _AXIAL, None)}

_VISION_COMMON = {  # the per-family tables below add the shape fields with their HF defaults
    **_BASE,
    "in_channels": _used(3), "spatial_merge_size": _used(2), "temporal_patch_size": _used(2),
    "out_hidden_size": _used(3584),
    "rope_parameters": _used(),  # read through the RoPE table
    "rope_scaling": _used(), "rope_theta": _used(),  # pre-5.x keys HF still converts, as in the text
    "initializer_range": _irrelevant(_INIT),
}
VISION_ALIASES = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}  # HF's attribute_map
_VISION = {
    "qwen2_5_vl": {
        **_VISION_COMMON,
        "depth": _used(32), "hidden_size": _used(3584), "intermediate_size": _used(3420), "num_heads": _used(16),
        "patch_size": _used(14), "window_size": _used(112), "fullatt_block_indexes": _used((7, 15, 23, 31)),
        "hidden_act": _only(("silu",), "the port's Qwen2.5-VL vision MLP is SwiGLU with silu", "silu"),
        "tokens_per_second": _irrelevant("scales video time positions; the port takes images only (video "
                                         "tokens are an error)"),
        # Not fields; the released files carry them next to in_channels / patch_size, which HF reads.
        "in_chans": _irrelevant("the pre-5.x name of in_channels; HF 5.24 reads in_channels"),
        "spatial_patch_size": _irrelevant("a pre-5.x duplicate of patch_size; HF 5.24 reads patch_size"),
    },
    "qwen3_vl": {
        **_VISION_COMMON,
        "depth": _used(27), "hidden_size": _used(1152), "intermediate_size": _used(4304), "num_heads": _used(16),
        "patch_size": _used(16), "num_position_embeddings": _used(2304),
        "deepstack_visual_indexes": _used((8, 16, 24)),
        "hidden_act": _only(("gelu_pytorch_tanh",), "the port's Qwen3-VL vision MLP uses tanh-approximated GELU",
                            "gelu_pytorch_tanh"),
    },
}

# Every table, by family and by where its section sits in config.json (what the tests enumerate).
TABLES: dict[str, dict[str, dict[str, Field]]] = {
    family: {"": _TOP, "text_config": _TEXT[family], "text_config.rope_parameters": _TEXT_ROPE[family],
             "vision_config": _VISION[family], "vision_config.rope_parameters": _VISION_ROPE}
    for family in C.FAMILIES
}


# ----------------------------------------------------------------------------------------------------
# config.json -> ModelConfig
# ----------------------------------------------------------------------------------------------------

def _resolve(table: dict[str, Field], given: dict, label: str) -> dict:
    """`given` completed with HF's defaults for the USED/REFUSED keys it omits, after checking that every
    REFUSED key holds an implemented value (the error names `label + key`). Keys outside the table are
    dropped, unless the table has an `ANY_OTHER` rule."""
    resolved = {k: f.default for k, f in table.items() if f.kind != IRRELEVANT and k != ANY_OTHER}
    resolved.update({k: v for k, v in given.items() if k in table and table[k].kind != IRRELEVANT})
    for key, value in given.items():
        field = table.get(key, table.get(ANY_OTHER))
        if field is not None and field.kind == REFUSED and not field.accepts(value, resolved):
            raise ValueError(f"config.json: {label}{key} = {value!r}: {field.why}")
    return resolved


def _text_section(config: dict, family: str) -> tuple[dict, str]:
    """The text fields as HF 5.24 finds them, and the prefix that names them in errors."""
    if config.get("text_config") is not None:
        return config["text_config"], "text_config."
    if family == "qwen2_5_vl":  # the flat layout: text fields at the top level
        return {k: v for k, v in config.items() if k in _TEXT[family]}, ""
    return {}, "text_config."  # Qwen3VLConfig: HF's default text config


def _rope_section(section: dict, label: str) -> tuple[dict, str]:
    """The RoPE dict HF builds from a section: `rope_scaling` or else `rope_parameters`, with a
    section-level `rope_theta` filling a missing theta."""
    key = "rope_scaling" if section.get("rope_scaling") else "rope_parameters"
    rope = dict(section.get(key) or {})
    if section.get("rope_theta") is not None:
        rope.setdefault("rope_theta", section["rope_theta"])
    return rope, f"{label}{key}."


def _int(section: dict, key: str, label: str) -> int:
    value = section[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"config.json: {label}{key} = {value!r}: the port needs an integer")
    return value


def _ints(section: dict, key: str, label: str) -> tuple[int, ...]:
    return tuple(_int({key: v}, key, label) for v in section[key])


def _text_config(family: str, t: dict, rope: dict, label: str, rope_label: str) -> C.TextConfig:
    hidden, heads = _int(t, "hidden_size", label), _int(t, "num_attention_heads", label)
    kv = heads if t["num_key_value_heads"] is None else _int(t, "num_key_value_heads", label)
    head_dim = (t["head_dim"] or hidden // heads) if family == "qwen3_vl" else hidden // heads
    return C.TextConfig(
        vocab_size=_int(t, "vocab_size", label), hidden_size=hidden,
        intermediate_size=_int(t, "intermediate_size", label),
        num_hidden_layers=_int(t, "num_hidden_layers", label), num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, rope_theta=float(rope["rope_theta"]),
        mrope_section=_ints(rope, "mrope_section", rope_label),
        rms_norm_eps=float(t["rms_norm_eps"]), attention_bias=family == "qwen2_5_vl",
        qk_norm=family == "qwen3_vl", mrope_interleaved=family == "qwen3_vl")


def _vision_config(family: str, v: dict, rope: dict) -> C.VisionConfig:
    label = "vision_config."
    kw = {key: _int(v, key, label) for key in ("depth", "hidden_size", "intermediate_size", "num_heads",
                                               "out_hidden_size", "patch_size", "temporal_patch_size",
                                               "spatial_merge_size", "in_channels")}
    if family == "qwen2_5_vl":
        kw.update(window_size=_int(v, "window_size", label),
                  fullatt_block_indexes=_ints(v, "fullatt_block_indexes", label))
    else:
        kw.update(num_position_embeddings=_int(v, "num_position_embeddings", label),
                  deepstack_visual_indexes=_ints(v, "deepstack_visual_indexes", label))
    return C.VisionConfig(**kw, rope_theta=float(rope["rope_theta"]))


def _token_id(*candidates) -> int | None:
    """The first candidate that is set; a list (several EOS ids) contributes its first id."""
    for value in candidates:
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int):
            return value
    return None


def config_from_hf(config: dict) -> C.ModelConfig:
    """A ModelConfig from an HF `config.json` dict (5.x nested or the older flat Qwen2.5-VL layout),
    read as transformers 5.24 reads it; a field whose value the port does not implement raises
    ValueError naming it."""
    family = config.get("model_type")
    if family not in C.FAMILIES:
        raise ValueError(f"config.json: model_type {family!r} is not one of {C.FAMILIES}")
    tables = TABLES[family]
    top = _resolve(tables[""], config, "")
    raw_text, text_label = _text_section(config, family)
    text = _resolve(tables["text_config"], raw_text, text_label)
    raw_rope, rope_label = _rope_section(raw_text, text_label)
    rope = _resolve(tables["text_config.rope_parameters"], raw_rope, rope_label)
    raw_vision = dict(config.get("vision_config") or {})
    raw_vision.update({VISION_ALIASES[k]: raw_vision.pop(k) for k in list(raw_vision) if k in VISION_ALIASES})
    vision = _resolve(tables["vision_config"], raw_vision, "vision_config.")
    raw_vrope, vrope_label = _rope_section(raw_vision, "vision_config.")
    vrope = _resolve(tables["vision_config.rope_parameters"], raw_vrope, vrope_label)

    ids = {k: top[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    for key in ("eos_token_id", "pad_token_id"):  # text_config (5.x) before the top level (older files)
        value = _token_id(text.get(key), top[key])
        if value is not None:
            ids[key] = value
    tie = bool(top["tie_word_embeddings"] or text.get("tie_word_embeddings"))  # Qwen2.5-VL: either ties
    return C.ModelConfig(family=family, vision=_vision_config(family, vision, vrope),
                         text=_text_config(family, text, rope, text_label, rope_label), tie_word_embeddings=tie,
                         **ids)


# ----------------------------------------------------------------------------------------------------
# ModelConfig -> config.json
# ----------------------------------------------------------------------------------------------------

def _check_expressible(cfg: C.ModelConfig) -> None:
    """Raises ValueError naming the field when HF's class for the family would build a different model
    from the exported file: these ModelConfig fields are fixed per family in HF, not read from a config."""
    qwen3 = cfg.family == "qwen3_vl"
    fixed = {"text.attention_bias": (cfg.text.attention_bias, not qwen3),
             "text.qk_norm": (cfg.text.qk_norm, qwen3),
             "text.mrope_interleaved": (cfg.text.mrope_interleaved, qwen3),
             "vision.norm_eps": (cfg.vision.norm_eps, 1e-6)}
    if not qwen3:
        fixed["text.head_dim"] = (cfg.text.head_dim, cfg.text.hidden_size // cfg.text.num_attention_heads)
    for name, (value, hf_value) in fixed.items():
        if value != hf_value:
            raise ValueError(f"to_hf_config: ModelConfig.{name} = {value!r}: HF's {cfg.family} always uses "
                             f"{hf_value!r}")


def to_hf_config(cfg: C.ModelConfig, dtype: str = "float32") -> dict:
    """The HF 5.x `config.json` dict for `cfg` (transformers' AutoConfig reads it back)."""
    _check_expressible(cfg)
    t, v = cfg.text, cfg.vision
    rope = {"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)}
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
                rope_parameters=rope, tie_word_embeddings=cfg.tie_word_embeddings, dtype=dtype,
                eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size,
                  temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
                  in_channels=v.in_channels, rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
    if cfg.family == "qwen2_5_vl":
        text.update(model_type="qwen2_5_vl_text")
        vision.update(model_type="qwen2_5_vl_vision", hidden_act="silu", window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes))
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        text.update(model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=False)
        vision.update(model_type="qwen3_vl_vision", hidden_act="gelu_pytorch_tanh",
                      num_position_embeddings=v.num_position_embeddings,
                      deepstack_visual_indexes=list(v.deepstack_visual_indexes))
        arch = "Qwen3VLForConditionalGeneration"
    return dict(model_type=cfg.family, architectures=[arch], text_config=text, vision_config=vision,
                tie_word_embeddings=cfg.tie_word_embeddings, image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
                vision_end_token_id=cfg.vision_end_token_id, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id, dtype=dtype)
