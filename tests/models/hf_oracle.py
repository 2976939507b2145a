"""Shared test helpers: tiny HF reference models (the oracle) and hand-built multimodal batches.

Loaded by path from the test files (`load_oracle()` below is copied as a 3-line snippet), because
tests/models is not importable as a package next to the real `dig_jax.models` package.
The HF configs are written out by hand from our ModelConfig fields, not through `hf_config.to_hf_config`,
so that the converter is tested against an independent description of the model.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flax import nnx

from dig_jax.models import config as C


def tiny_cfg(family: str, tie: bool = True, small_vocab: bool = False) -> C.ModelConfig:
    """The tiny preset; `small_vocab` shrinks V to 1024 and moves the special ids below it (for the
    tests that do not involve HF, where a 151936-wide LM head only costs time)."""
    if not small_vocab:
        cfg = C.qwen2_5_vl_tiny() if family == "qwen2_5_vl" else C.qwen3_vl_tiny()
        return dataclasses.replace(cfg, tie_word_embeddings=tie)
    cfg = C.qwen2_5_vl_tiny(1024) if family == "qwen2_5_vl" else C.qwen3_vl_tiny(1024)
    return dataclasses.replace(cfg, tie_word_embeddings=tie, image_token_id=1000, video_token_id=1001,
                               vision_start_token_id=1002, vision_end_token_id=1003, eos_token_id=1004,
                               pad_token_id=1005)


def hf_config(cfg: C.ModelConfig):
    t, v = cfg.text, cfg.vision
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                 "mrope_section": list(t.mrope_section)},
                tie_word_embeddings=cfg.tie_word_embeddings)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_heads=v.num_heads, out_hidden_size=v.out_hidden_size, patch_size=v.patch_size)
    if cfg.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        vision.update(window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=cfg.tie_word_embeddings)
    from transformers import Qwen3VLConfig
    text.update(head_dim=t.head_dim)
    vision.update(num_position_embeddings=v.num_position_embeddings,
                  deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=cfg.tie_word_embeddings)


def hf_model(cfg: C.ModelConfig, seed: int = 0):
    """A random HF model; norms and biases are perturbed (HF inits them to 1 / 0) so they are tested too."""
    if cfg.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model
    torch.manual_seed(seed)
    model = Model(hf_config(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@dataclasses.dataclass
class Batch:
    input_ids: np.ndarray       # int64[B, L], left padded
    attention_mask: np.ndarray  # int64[B, L]
    grids: np.ndarray           # int64[n_images, 3]
    pixel_values: np.ndarray    # float32[N, patch_dim]


def image_tokens(cfg: C.ModelConfig, grid) -> list[int]:
    t, h, w = grid
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]


def make_batch(cfg: C.ModelConfig, rows_grids: list[list[tuple[int, int, int]]], seed: int = 0,
               text_len: int = 5, extra_pad: int = 2, length: int | None = None) -> Batch:
    """One row per entry of rows_grids: text, then each image (VS + pads + VE) followed by text; left
    padded to `length` (default: the longest row + extra_pad)."""
    rng = np.random.default_rng(seed)
    rows, grids = [], []
    for r, row_grids in enumerate(rows_grids):
        ids = list(rng.integers(0, 1000, text_len + r))
        for g in row_grids:
            ids += image_tokens(cfg, g) + list(rng.integers(0, 1000, text_len))
            grids.append(g)
        rows.append(ids)
    length = length or max(map(len, rows)) + extra_pad
    assert length >= max(map(len, rows)), (length, max(map(len, rows)))
    input_ids = np.full((len(rows), length), cfg.pad_token_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for r, ids in enumerate(rows):
        input_ids[r, length - len(ids):] = ids
        mask[r, length - len(ids):] = 1
    grids = np.asarray(grids, np.int64)
    n = int(np.prod(grids, axis=1).sum())
    pixels = rng.normal(size=(n, cfg.vision.patch_dim)).astype(np.float32)
    return Batch(input_ids, mask, grids, pixels)


def hf_logits(model, batch: Batch, image_token_id: int) -> np.ndarray:
    ids = torch.tensor(batch.input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.tensor(batch.attention_mask),
                    pixel_values=torch.tensor(batch.pixel_values), image_grid_thw=torch.tensor(batch.grids),
                    mm_token_type_ids=(ids == image_token_id).int())
    return out.logits.float().numpy()


# ----------------------------------------------------------------------------------------------------
# Comparing our models' parameters
# ----------------------------------------------------------------------------------------------------
def params_of(model) -> dict:
    """Every nnx.Param of `model` as numpy, by path."""
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))
