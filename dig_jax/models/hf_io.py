"""Hugging Face safetensors checkpoints <-> the NNX `QwenVL` state, for both families.

Loading never materialises a large model whole on one device: the model is traced abstractly
(`nnx.eval_shape`), each parameter's target `NamedSharding` comes from its logical axes
(`sharding.state_shardings` rules), and `jax.make_array_from_callback` asks for one shard at a time,
which is sliced out of a memory-mapped safetensors file (our own small reader: numpy has no bfloat16
support in `safetensors.numpy`, and mmap slicing reads only the bytes each device needs).

Stacked layers. The decoder layers and ViT blocks are stacked parameters float[Y, ...] (layer axis
first); HF stores one tensor per layer (`...layers.{i}.<name>`). The mapping (`HFParam`) lists each
stacked parameter's per-layer names in layer order: a shard's index then starts with the layers it
covers, and only those layers' slices are read from the memory map and stacked. Export writes one HF
tensor per layer, as transformers does.

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
from dig_jax.models.hf_config import config_from_hf, to_hf_config
from dig_jax.models.layers import HFParam
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


def param_mapping(cfg: C.ModelConfig) -> list[HFParam]:
    """HF in-memory name(s) (one per layer for stacked parameters), path in QwenVL and transform for
    every parameter of the model."""
    def prefixed(entries: list[HFParam], name_prefix: str, path_prefix: str) -> list[HFParam]:
        return [e._replace(hf_names=tuple(name_prefix + n for n in e.hf_names), path=(path_prefix,) + e.path)
                for e in entries]

    out = prefixed(vision_param_mapping(cfg.vision, cfg.family), "model.visual.", "visual")
    out += prefixed(text_param_mapping(cfg.text), "model.language_model.", "language_model")
    if not cfg.tie_word_embeddings:
        out.append(HFParam(("lm_head.weight",), ("language_model", "lm_head", "kernel"), "linear", False))
    return out


# ----------------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------------

def _format_names(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _layer_shape(entry: HFParam, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape one HF tensor of `entry` must convert to: the parameter's, less the layer axis if stacked."""
    return shape[1:] if entry.stacked else shape


def _layer_sources(entry: HFParam, tensors: dict[str, np.ndarray], want: tuple[int, ...],
                   problems: list[str]) -> list[np.ndarray]:
    """Lazy views (of the memory map) of `entry`'s HF tensors in our layout, one per layer; every shape
    problem is appended to `problems` by HF name."""
    if entry.stacked and want[0] != len(entry.hf_names):
        problems.append(f"mapping bug: {'.'.join(map(str, entry.path))} stacks {want[0]} layers but "
                        f"{len(entry.hf_names)} HF names are mapped to it")
    sources = []
    for name in entry.hf_names:
        src = hf_to_nnx(tensors[name], entry.transform)
        if tuple(src.shape) != _layer_shape(entry, want):
            problems.append(f"shape mismatch for {name}: checkpoint {tuple(tensors[name].shape)} "
                            f"-> {tuple(src.shape)}, model expects {_layer_shape(entry, want)}")
        sources.append(src)
    return sources


def _reader(sources: list[np.ndarray], stacked: bool, dtype):
    """The `make_array_from_callback` callback: the shard at `index` (a tuple of slices). For a stacked
    parameter index[0] selects layers: only those layers' slices are read and stacked."""
    def read(index):
        if not stacked:
            return np.asarray(sources[0][index]).astype(dtype)
        layers, rest = index[0], tuple(index[1:])
        return np.stack([np.asarray(sources[i][rest]).astype(dtype) for i in range(len(sources))[layers]])

    return read


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
    known = {name for entry in mapping for name in entry.hf_names}
    missing = {name for name in known if name not in tensors}
    unexpected = [k for k in tensors if k not in known and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    unmapped = [".".join(map(str, p)) for p in flat if p not in {entry.path for entry in mapping}]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_format_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_format_names(unexpected)}")
    if unmapped:
        problems.append(f"model parameters without a checkpoint name (mapping bug): {_format_names(unmapped)}")
    sources = {}
    for entry in mapping:
        if missing.intersection(entry.hf_names) or entry.path not in flat:
            continue
        want = tuple(flat[entry.path].get_value().shape)
        sources[entry.path] = (_layer_sources(entry, tensors, want, problems), entry.stacked)
    if problems:
        raise ValueError(f"cannot load {path} into {cfg.family}:\n  " + "\n  ".join(problems))

    device = SingleDeviceSharding(jax.devices()[0])
    for p, var in flat.items():
        target = var.get_value()
        sharding = shd.variable_sharding(var, mesh, rules) if mesh is not None else device
        read = _reader(*sources[p], target.dtype)
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
    layout (tied models without lm_head.weight; one tensor per layer of a stacked parameter), split
    into shards with an index when `max_shard_bytes` is given. Parameters are fetched to the host one
    at a time (a stacked one with all its layers)."""
    os.makedirs(path, exist_ok=True)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    dtype_name = "float32"
    for entry in param_mapping(cfg):
        where = ".".join(map(str, entry.path))
        if entry.path not in flat:
            raise ValueError(f"save_hf_checkpoint: the model has no parameter {where} for {entry.hf_names[0]}")
        value = np.asarray(jax.device_get(flat[entry.path].get_value()))
        if entry.stacked and value.shape[0] != len(entry.hf_names):
            raise ValueError(f"save_hf_checkpoint: {where} stacks {value.shape[0]} layers but the mapping names "
                             f"{len(entry.hf_names)}")
        dtype_name = {np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}.get(value.dtype, "float32")
        for name, layer in zip(entry.hf_names, value if entry.stacked else [value]):
            tensor = np.ascontiguousarray(nnx_to_hf(layer, entry.transform, cfg.vision))
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
