"""Analytic FLOPs of a run's programs and their roofline times, from the model config alone.

Why analytic: XLA's `cost_analysis()["flops"]` counts the body of a scanned or `while` loop once (a
36-layer scanned decoder reports one layer plus the head), and Pallas kernels only when they declare a
cost, so it is not the step's work.

What is counted (2 FLOPs per multiply-add; a backward pass costs twice its forward):
  * text decoder, per token: the q/k/v/o projections and the SwiGLU MLP of every layer; attention
    scores and values 4 * N * H * S per layer for a query seeing S slots. The trainer's attention
    computes every (query, key) pair of the padded sequence and masks afterwards, so S is the whole
    padded length (prompt bucket + completion), not the causal half.
  * LM head 2 * D * V per position whose log-prob is scored (the completion) or sampled.
  * vision tower, per patch: the patch embedding, qkv / proj and the MLP of every block; attention
    4 * W * P per block with P the patches of one image (the trainer attends per image); per merged
    token (patches / merge**2): the merger and every DeepStack merger. It runs once per distinct image
    (a GRPO group's G rows share their prompt's two images).
  * an update = forward + backward (3x the forward) over all rows x (prompt bucket + completion)
    positions, vision included; rematerialised recomputation is not counted (model FLOPs, not
    hardware FLOPs). Embedding lookups, norms, rotary, softmax and the optimiser are not counted.

Rooflines (per chip, the largest of the three is the bound): compute = FLOPs / (chips x peak bf16
FLOP/s); HBM = bytes each chip must stream / HBM bandwidth; ICI = bytes each chip receives for the
program's collectives (`analysis.wire_bytes`) / ICI bandwidth (the figures and their sources are in
`topologies`). Bytes streamed per chip, a lower bound:
  * a decode step on a mesh with an fsdp axis: every weight once in the compute dtype (FSDP gathers
    each layer's full weights onto every chip, cast for the matmuls) plus this chip's parameter shard,
    and this chip's KV cache; on the sampling layout (fsdp = 1, `generate.sampling_layout`): this
    chip's shard of the policy's copy (already in the compute dtype) and its KV cache;
  * an update: every weight three times in the compute dtype (forward, and the backward's two
    products) plus the optimiser reading parameters, gradients and both Adam moments and writing
    parameters and moments on this chip's shard (7 passes in the parameter dtype); activations are not
    counted.
"""
from __future__ import annotations

import dataclasses

from dig_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Counts:
    """Weights that multiply each kind of input (biases and norms excluded)."""

    text_layer: int  # per decoder layer, per token
    lm_head: int  # per scored / sampled position
    vision_patch: int  # whole tower, per patch (patch embedding + every block)
    vision_merged: int  # per merged token (merger + DeepStack mergers)


def counts(cfg: ModelConfig) -> Counts:
    t, v = cfg.text, cfg.vision
    d, h = t.hidden_size, t.head_dim
    attention = d * t.num_attention_heads * h * 2 + d * t.num_key_value_heads * h * 2  # q, o; k, v
    text_layer = attention + 3 * d * t.intermediate_size  # SwiGLU: gate, up, down
    w, f = v.hidden_size, v.intermediate_size
    mlp = (3 if cfg.family == "qwen2_5_vl" else 2) * w * f  # SwiGLU (2.5) or GELU MLP (3)
    block = 4 * w * w + mlp  # qkv (3 w^2) + proj (w^2)
    e = w * v.spatial_merge_size ** 2
    merger = e * e + e * v.out_hidden_size
    mergers = 1 + (len(v.deepstack_visual_indexes) if cfg.family == "qwen3_vl" else 0)
    return Counts(text_layer=text_layer, lm_head=d * t.vocab_size, vision_patch=v.patch_dim * w + v.depth * block,
                  vision_merged=mergers * merger)


def text_forward(cfg: ModelConfig, queries: int, slots: int) -> float:
    """Decoder forward FLOPs for `queries` positions each attending over `slots` positions (one row)."""
    t = cfg.text
    c = counts(cfg)
    attention = 4.0 * t.num_attention_heads * t.head_dim * slots * queries
    return t.num_hidden_layers * (2.0 * c.text_layer * queries + attention)


def vision_forward(cfg: ModelConfig, images: int, patches_per_image: int) -> float:
    """Vision tower forward FLOPs for `images` images of `patches_per_image` patches each."""
    v = cfg.vision
    c = counts(cfg)
    patches = images * patches_per_image
    attention = v.depth * 4.0 * v.hidden_size * patches_per_image * patches
    return 2.0 * c.vision_patch * patches + attention + 2.0 * c.vision_merged * (patches // v.spatial_merge_size ** 2)


def update_flops(cfg: ModelConfig, *, rows: int, prompt_len: int, completion_len: int, images: int,
                 patches_per_image: int) -> float:
    """Forward + backward FLOPs of one scored step (SFT step, GRPO minibatch update) over `rows` rows."""
    length = prompt_len + completion_len
    forward = (rows * text_forward(cfg, length, length) + rows * completion_len * 2.0 * counts(cfg).lm_head
               + vision_forward(cfg, images, patches_per_image))
    return 3.0 * forward


def scoring_flops(cfg: ModelConfig, *, rows: int, prompt_len: int, completion_len: int, images: int,
                  patches_per_image: int) -> float:
    """Forward-only FLOPs of teacher-forced scoring (the reference log-probs)."""
    return update_flops(cfg, rows=rows, prompt_len=prompt_len, completion_len=completion_len, images=images,
                        patches_per_image=patches_per_image) / 3.0


def token_flops(cfg: ModelConfig, cache_len: int) -> float:
    """FLOPs of one generated token of one row at a cache of `cache_len` slots (all slots are attended)."""
    return text_forward(cfg, 1, cache_len) + 2.0 * counts(cfg).lm_head


def generation_flops(cfg: ModelConfig, *, rows: int, prompt_len: int, new_tokens: int, images: int,
                     patches_per_image: int) -> float:
    """A whole generation at its longest: the prefill (vision + prompt over the cache) and new_tokens - 1
    decode steps (the prefill's last position yields the first token)."""
    slots = prompt_len + new_tokens
    prefill = (rows * (text_forward(cfg, prompt_len, slots) + 2.0 * counts(cfg).lm_head)
               + vision_forward(cfg, images, patches_per_image))
    return prefill + rows * (new_tokens - 1) * token_flops(cfg, slots)


def roofline(flops: float, hbm_bytes_per_chip: float, ici_bytes_per_chip: float, *, chips: int,
             peak_flops: float, hbm_bandwidth: float, ici_bandwidth: float) -> dict[str, float]:
    """Seconds bound by compute, by HBM and by ICI per chip, and the largest (the roofline estimate)."""
    out = {"compute_s": flops / (chips * peak_flops), "hbm_s": hbm_bytes_per_chip / hbm_bandwidth,
           "ici_s": ici_bytes_per_chip / ici_bandwidth}
    out["bound_s"] = max(out.values())
    out["bound"] = max(("compute", "hbm", "ici"), key=lambda k: out[f"{k}_s"])
    return out


def decode_step_bytes(compute_bytes_total: int, param_bytes_per_chip: int, kv_cache_bytes_per_chip: int) -> float:
    """HBM bytes one chip streams per decode step (see the module docstring): `compute_bytes_total` is
    every weight in the compute dtype that FSDP gathers (0 without an fsdp axis), `param_bytes_per_chip`
    this chip's shard of the parameters the step reads."""
    return float(compute_bytes_total + param_bytes_per_chip + kv_cache_bytes_per_chip)


def update_bytes(compute_bytes_total: int, param_bytes_per_chip: int) -> float:
    """HBM bytes one chip streams per update, a lower bound (see the module docstring)."""
    return 3.0 * compute_bytes_total + 7.0 * param_bytes_per_chip
