"""Hugging Face safetensors checkpoints <-> the NNX `QwenVL` state, for both families.

Loading never materialises a large model whole on one device: the model is traced abstractly
(`nnx.eval_shape`), each parameter's target `NamedSharding` comes from its logical axes
(`sharding.state_shardings` rules), and `jax.make_array_from_callback` asks for one shard at a time,
which is sliced out of a memory-mapped safetensors file (our own small reader: numpy has no bfloat16
support in `safetensors.numpy`, and mmap slicing reads only the bytes each device needs).

Names. In memory HF calls the towers `model.visual.*` and `model.language_model.*`; on disk Qwen2.5-VL
checkpoints (and 5.24's `save_pretrained`) use the legacy `visual.*` / `model.*` prefixes, Qwen3-VL the
in-memory ones. Both are accepted for both families; export writes each family's own on-disk layout.
A tied model (Qwen2.5-VL 3B, Qwen3-VL 2B/4B) has no `lm_head.weight` on disk, `save_pretrained` omits it;
if one is there anyway it is ignored, as transformers ties it to the embedding regardless.

Errors: missing tensors, unexpected tensors and shape mismatches are collected and reported together,
by HF name, before anything is loaded.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from dig_jax import sharding as shd
from dig_jax.models import config as C
from dig_jax.models.text import text_param_mapping
from dig_jax.models.vision import hf_to_nnx, nnx_to_hf, vision_param_mapping
from dig_jax.models.vlm import QwenVL

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


# ----------------------------------------------------------------------------------------------------
# safetensors files
# ----------------------------------------------------------------------------------------------------

def _read_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return header, 8 + size


def open_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (or one .safetensors file) as lazy memory-mapped arrays."""
    if os.path.isdir(path):
        index = os.path.join(path, SAFETENSORS_INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.exists(os.path.join(path, SAFETENSORS_SINGLE)):
            files = [SAFETENSORS_SINGLE]
        else:
            raise FileNotFoundError(f"{path}: neither {SAFETENSORS_INDEX} nor {SAFETENSORS_SINGLE} found")
        files = [os.path.join(path, f) for f in files]
    else:
        files = [path]
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        header, start = _read_header(file)
        mm = np.memmap(file, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _DTYPES:
                raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            tensors[name] = mm[start + begin:start + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return tensors


def write_safetensors(file: str, tensors: dict[str, np.ndarray]) -> None:
    """Writes a safetensors file (header JSON padded to 8 bytes, then the raw little-endian data)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).tobytes())
    os.replace(tmp, file)


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------

def canonical_name(disk_name: str) -> str:
    """On-disk name -> HF in-memory name (legacy Qwen2.5 `visual.*` / `model.*` rewritten)."""
    if disk_name.startswith("visual."):
        return "model." + disk_name
    return re.sub(r"^model\.(?!language_model\.|visual\.)", "model.language_model.", disk_name)


def disk_name(name: str, family: str) -> str:
    """HF in-memory name -> the family's on-disk name (Qwen2.5: legacy prefixes; Qwen3: unchanged)."""
    if family != "qwen2_5_vl":
        return name
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    return name


def param_mapping(cfg: C.ModelConfig) -> list[tuple[str, tuple, str]]:
    """(HF in-memory name, path in QwenVL, transform) for every parameter of the model."""
    out = [("model.visual." + n, ("visual",) + p, t) for n, p, t in vision_param_mapping(cfg.vision, cfg.family)]
    out += [("model.language_model." + n, ("language_model",) + p, t) for n, p, t in text_param_mapping(cfg.text)]
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", ("language_model", "lm_head", "kernel"), "linear"))
    return out


# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------

def config_from_hf(config: dict) -> C.ModelConfig:
    """A ModelConfig from an HF `config.json` dict (5.x nested or the older flat Qwen2.5-VL layout)."""
    family = config.get("model_type")
    if family not in C.FAMILIES:
        raise ValueError(f"config.json: model_type {family!r} is not one of {C.FAMILIES}")
    flat = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    text = {**flat, **config.get("text_config", {})}
    vis = config.get("vision_config", {})
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta"))
    default_section = (16, 24, 24) if family == "qwen2_5_vl" else (24, 20, 20)
    section = tuple(int(s) for s in rope.get("mrope_section", default_section))

    def need(d: dict, key: str, where: str):
        if key not in d:
            raise ValueError(f"config.json: {where}.{key} is missing")
        return d[key]

    hidden, heads = need(text, "hidden_size", "text_config"), need(text, "num_attention_heads", "text_config")
    if theta is None:
        raise ValueError("config.json: text_config.rope_parameters.rope_theta is missing")
    text_cfg = C.TextConfig(
        vocab_size=need(text, "vocab_size", "text_config"), hidden_size=hidden,
        intermediate_size=need(text, "intermediate_size", "text_config"),
        num_hidden_layers=need(text, "num_hidden_layers", "text_config"), num_attention_heads=heads,
        num_key_value_heads=text.get("num_key_value_heads", heads),
        head_dim=(text.get("head_dim") or hidden // heads) if family == "qwen3_vl" else hidden // heads,
        rope_theta=float(theta), mrope_section=section, rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        attention_bias=True if family == "qwen2_5_vl" else bool(text.get("attention_bias", False)),
        qk_norm=family == "qwen3_vl", mrope_interleaved=family == "qwen3_vl")
    vkw = dict(depth=need(vis, "depth", "vision_config"), hidden_size=need(vis, "hidden_size", "vision_config"),
               intermediate_size=need(vis, "intermediate_size", "vision_config"),
               num_heads=need(vis, "num_heads", "vision_config"), out_hidden_size=vis.get("out_hidden_size", hidden),
               patch_size=need(vis, "patch_size", "vision_config"),
               temporal_patch_size=vis.get("temporal_patch_size", 2),
               spatial_merge_size=vis.get("spatial_merge_size", 2), in_channels=vis.get("in_channels", 3),
               rope_theta=float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if family == "qwen2_5_vl":
        vkw.update(window_size=vis.get("window_size", 112),
                   fullatt_block_indexes=tuple(vis.get("fullatt_block_indexes", ())))
    else:
        vkw.update(num_position_embeddings=vis.get("num_position_embeddings", 2304),
                   deepstack_visual_indexes=tuple(vis.get("deepstack_visual_indexes", ())))
    tie = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    ids = {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if k in config}
    for key in ("eos_token_id", "pad_token_id"):  # top level (older files) or text_config (5.x)
        value = config.get(key, config.get("text_config", {}).get(key))
        value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, int):
            ids[key] = value
    return C.ModelConfig(family=family, vision=C.VisionConfig(**vkw), text=text_cfg, tie_word_embeddings=bool(tie), **ids)


def to_hf_config(cfg: C.ModelConfig, dtype: str = "float32") -> dict:
    """The HF 5.x `config.json` dict for `cfg` (transformers' AutoConfig reads it back)."""
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
                  in_channels=v.in_channels)
    if cfg.family == "qwen2_5_vl":
        text.update(model_type="qwen2_5_vl_text")
        vision.update(model_type="qwen2_5_vl_vision", hidden_act="silu", window_size=v.window_size,
                      fullatt_block_indexes=list(v.fullatt_block_indexes))
        arch = "Qwen2_5_VLForConditionalGeneration"
    else:
        text.update(model_type="qwen3_vl_text", head_dim=t.head_dim, attention_bias=t.attention_bias)
        vision.update(model_type="qwen3_vl_vision", hidden_act="gelu_pytorch_tanh",
                      num_position_embeddings=v.num_position_embeddings,
                      deepstack_visual_indexes=list(v.deepstack_visual_indexes))
        arch = "Qwen3VLForConditionalGeneration"
    return dict(model_type=cfg.family, architectures=[arch], text_config=text, vision_config=vision,
                tie_word_embeddings=cfg.tie_word_embeddings, image_token_id=cfg.image_token_id,
                video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
                vision_end_token_id=cfg.vision_end_token_id, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------

def _format_names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_into(model: nnx.Module, cfg: C.ModelConfig, path: str, *, mesh: Mesh | None = None,
              rules: shd.Rules = shd.DEFAULT_RULES) -> nnx.Module:
    """Fills `model` (abstract from `nnx.eval_shape`, or concrete) with the checkpoint at `path`.

    Every parameter is created in its target sharding (from the logical axes and `rules` on `mesh`;
    without a mesh, on the first device) and cast to the model's parameter dtype.
    """
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    on_disk = open_safetensors(path)
    tensors = {canonical_name(k): v for k, v in on_disk.items()}
    mapping = param_mapping(cfg)
    known = {name for name, _, _ in mapping}
    missing = [name for name in known if name not in tensors]
    unexpected = [k for k in tensors if k not in known and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    unmapped = [".".join(map(str, p)) for p in flat if p not in {path_ for _, path_, _ in mapping}]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_format_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_format_names(unexpected)}")
    if unmapped:
        problems.append(f"model parameters without a checkpoint name (mapping bug): {_format_names(unmapped)}")
    sources = {}
    for name, p, transform in mapping:
        if name in missing or p not in flat:
            continue
        src = hf_to_nnx(tensors[name], transform)  # a lazy view of the memory map
        want = tuple(flat[p].get_value().shape)
        if tuple(src.shape) != want:
            problems.append(f"shape mismatch for {name}: checkpoint {tuple(tensors[name].shape)} "
                            f"-> {tuple(src.shape)}, model expects {want}")
        sources[p] = src
    if problems:
        raise ValueError(f"cannot load {path} into {cfg.family}:\n  " + "\n  ".join(problems))

    device = SingleDeviceSharding(jax.devices()[0])
    for p, var in flat.items():
        src = sources[p]
        target = var.get_value()
        dtype = target.dtype
        sharding = shd.variable_sharding(var, mesh, rules) if mesh is not None else device

        def read(index, src=src, dtype=dtype):
            return np.asarray(src[index]).astype(dtype)

        var.set_value(jax.make_array_from_callback(tuple(target.shape), sharding, read))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_hf_checkpoint(path: str, cfg: C.ModelConfig | None = None, *, mesh: Mesh | None = None,
                       rules: shd.Rules = shd.DEFAULT_RULES, dtype=jnp.float32, param_dtype=jnp.float32) -> QwenVL:
    """Loads an HF checkpoint directory into a new QwenVL (config from `config.json` when cfg is None)."""
    if cfg is None:
        with open(os.path.join(path, "config.json")) as f:
            cfg = config_from_hf(json.load(f))
    abstract = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
    return load_into(abstract, cfg, path, mesh=mesh, rules=rules)


# ----------------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------------

def save_hf_checkpoint(model: QwenVL, cfg: C.ModelConfig, path: str, *, max_shard_bytes: int | None = None) -> None:
    """Writes `model` as an HF checkpoint directory: config.json + safetensors in the family's on-disk
    layout (tied models without lm_head.weight), split into shards with an index when
    `max_shard_bytes` is given. Parameters are fetched to the host one at a time."""
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    dtype_name = "float32"
    for name, p, transform in param_mapping(cfg):
        if p not in flat:
            raise ValueError(f"save_hf_checkpoint: the model has no parameter {'.'.join(map(str, p))} for {name}")
        value = np.asarray(jax.device_get(flat[p].get_value()))
        dtype_name = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(value.dtype, "float32")
        tensor = np.ascontiguousarray(nnx_to_hf(value, transform, cfg.vision))
        if max_shard_bytes is not None and shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][disk_name(name, cfg.family)] = tensor
        size += tensor.nbytes
    if len(shards) == 1:
        write_safetensors(os.path.join(path, SAFETENSORS_SINGLE), shards[0])
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, file), shard)
            weight_map.update({k: file for k in shard})
            total += sum(t.nbytes for t in shard.values())
        with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(cfg, dtype_name), f, indent=2)
