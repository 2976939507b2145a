"""Model configurations and size presets for the Qwen2.5-VL and Qwen3-VL families.

Plain frozen dataclasses (hashable, so they can be static arguments of `jax.jit`). Field names follow the
Hugging Face config keys where one exists, so that `hf_config` can translate both ways without a lookup
table per field. The full-size presets mirror the released checkpoints' `config.json`; they are only ever
built with `jax.eval_shape` on a CPU.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[str, ...] = ("qwen2_5_vl", "qwen3_vl")

# Special token ids shared by both families (the released Qwen2 tokenizer's tokenizer_config.json).
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT + patch merger).

    Qwen2.5-VL: RMSNorm blocks with SwiGLU MLP, windowed attention except `fullatt_block_indexes`.
    Qwen3-VL: LayerNorm blocks with GELU(tanh) MLP, learned position embeddings interpolated to each
    image's grid, per-frame attention everywhere, DeepStack mergers after `deepstack_visual_indexes`.
    """

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL only.
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3-VL only.
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values`: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language decoder (Qwen2 for Qwen2.5-VL, Qwen3 for Qwen3-VL)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    mrope_section: tuple[int, int, int]
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False  # q/k/v biases (Qwen2.5: True); o_proj never has one.
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3).
    mrope_interleaved: bool = False  # Qwen3-VL: THWTHW...; Qwen2.5-VL: chunked T..H..W.


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vision: VisionConfig
    text: TextConfig
    tie_word_embeddings: bool
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_ID
    vision_end_token_id: int = VISION_END_ID
    eos_token_id: int = IM_END_ID
    pad_token_id: int = ENDOFTEXT_ID

    def __post_init__(self):
        validate(self)


def validate(cfg: ModelConfig) -> None:
    """Raises ValueError naming the field when a configuration cannot describe a working model."""

    def fail(field: str, why: str):
        raise ValueError(f"ModelConfig.{field}: {why}")

    if cfg.family not in FAMILIES:
        fail("family", f"{cfg.family!r} is not one of {FAMILIES}")
    t, v = cfg.text, cfg.vision
    if t.num_attention_heads % t.num_key_value_heads:
        fail("text.num_key_value_heads", f"{t.num_key_value_heads} does not divide num_attention_heads {t.num_attention_heads}")
    if sum(t.mrope_section) * 2 != t.head_dim:
        fail("text.mrope_section", f"{t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads:
        fail("vision.num_heads", f"{v.num_heads} does not divide vision hidden_size {v.hidden_size}")
    if v.out_hidden_size != t.hidden_size:
        fail("vision.out_hidden_size", f"{v.out_hidden_size} must equal text.hidden_size {t.hidden_size}")
    if cfg.family == "qwen3_vl":
        if v.num_position_embeddings <= 0 or int(v.num_position_embeddings**0.5) ** 2 != v.num_position_embeddings:
            fail("vision.num_position_embeddings", "Qwen3-VL needs a square number of learned position embeddings")
        if any(i >= v.depth for i in v.deepstack_visual_indexes):
            fail("vision.deepstack_visual_indexes", f"{v.deepstack_visual_indexes} out of range for depth {v.depth}")
        if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
            fail("vision.deepstack_visual_indexes", "more DeepStack levels than decoder layers")
    else:
        if any(i >= v.depth for i in v.fullatt_block_indexes):
            fail("vision.fullatt_block_indexes", f"{v.fullatt_block_indexes} out of range for depth {v.depth}")
        unit = v.patch_size * v.spatial_merge_size
        if v.window_size % unit:
            fail("vision.window_size", f"{v.window_size} must be a multiple of patch*merge = {unit}")


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

def _qwen2_5_vision(out: int) -> VisionConfig:
    return VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=out,
                        patch_size=14, window_size=112, fullatt_block_indexes=(7, 15, 23, 31))


def _qwen3_vision(out: int, *, depth=24, hidden=1024, inter=4096, deepstack=(5, 11, 17)) -> VisionConfig:
    return VisionConfig(depth=depth, hidden_size=hidden, intermediate_size=inter, num_heads=16, out_hidden_size=out,
                        patch_size=16, num_position_embeddings=2304, deepstack_visual_indexes=deepstack)


def _qwen2_text(vocab, hidden, inter, layers, heads, kv, mrope=(16, 24, 24)) -> TextConfig:
    return TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, rope_theta=1e6,
                      mrope_section=mrope, attention_bias=True)


def _qwen3_text(hidden, inter, layers, heads, kv) -> TextConfig:
    return TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, rope_theta=5e6,
                      mrope_section=(24, 20, 20), qk_norm=True, mrope_interleaved=True)


def qwen2_5_vl_3b() -> ModelConfig:
    return ModelConfig("qwen2_5_vl", _qwen2_5_vision(2048), _qwen2_text(151936, 2048, 11008, 36, 16, 2), True)


def qwen2_5_vl_7b() -> ModelConfig:
    return ModelConfig("qwen2_5_vl", _qwen2_5_vision(3584), _qwen2_text(152064, 3584, 18944, 28, 28, 4), False)


def qwen2_5_vl_0_5b_shape() -> ModelConfig:
    """A 0.5B-shaped Qwen2.5-VL (Qwen2.5-0.5B decoder, 4-block ViT): the CPU benchmark's model.

    head_dim is 64 here, so the M-RoPE sections are scaled to (8, 12, 12) (our choice: no released
    checkpoint has this shape).
    """
    vision = dataclasses.replace(_qwen2_5_vision(896), depth=4, fullatt_block_indexes=(3,))
    return ModelConfig("qwen2_5_vl", vision, _qwen2_text(151936, 896, 4864, 24, 14, 2, mrope=(8, 12, 12)), True)


def qwen3_vl_2b() -> ModelConfig:
    return ModelConfig("qwen3_vl", _qwen3_vision(2048), _qwen3_text(2048, 6144, 28, 16, 8), True)


def qwen3_vl_4b() -> ModelConfig:
    return ModelConfig("qwen3_vl", _qwen3_vision(2560), _qwen3_text(2560, 9728, 36, 32, 8), True)


def qwen3_vl_8b() -> ModelConfig:
    vision = _qwen3_vision(4096, depth=27, hidden=1152, inter=4304, deepstack=(8, 16, 24))
    return ModelConfig("qwen3_vl", vision, _qwen3_text(4096, 12288, 36, 32, 8), False)


def qwen3_vl_4b_thinking() -> ModelConfig:
    """Qwen3-VL-4B-Thinking, the DiG paper's smaller model: the architecture of Qwen3-VL-4B-Instruct.

    The Thinking checkpoints differ from the Instruct ones in their weights and chat template (the
    template is `data.chat_template`, not part of the model), not in their architecture. What that rests
    on: the Qwen3-VL model cards describe one dense architecture per size, released as Instruct and
    Thinking editions; a public catalogue of the Qwen/ repositories (sizes read from the HF API) lists the
    same weight size (8.27 GiB bf16) and the same text KV shape (36 layers, 8 KV heads, head_dim 128) for
    both 4B editions. The released Qwen/Qwen3-VL-4B-Thinking config.json itself was not found in the
    sources searched, so no field was compared one by one. A run with `model.init_checkpoint` builds its
    model from that checkpoint's own config.json (`hf_config.config_from_hf`), not from this preset.
    """
    return qwen3_vl_4b()


def qwen3_vl_8b_thinking() -> ModelConfig:
    """Qwen3-VL-8B-Thinking, the DiG paper's larger model: the architecture of Qwen3-VL-8B-Instruct.

    Field by field, the text config of a public derivative of Qwen/Qwen3-VL-8B-Thinking (an HF config.json
    whose `base_model` is that checkpoint) equals this preset's: hidden 4096, intermediate 12288, 36 layers,
    32 heads, 8 KV heads, head_dim 128, rope_theta 5e6, mrope_section [24, 20, 20] interleaved, vocab
    151936, tie_word_embeddings false; its vision part was not visible, and the released config.json
    itself was not found. The catalogue of `qwen3_vl_4b_thinking` lists equal weight sizes (16.33 GiB
    bf16) for both 8B editions. As for 4B, a run with a checkpoint builds its model from the checkpoint's
    own config.json.
    """
    return qwen3_vl_8b()


def qwen2_5_vl_tiny(vocab_size: int = 151936) -> ModelConfig:
    """The tiny Qwen2.5-VL of the tests and the CPU demo (text 64 wide, 2 layers; vision 32 wide, 2 blocks,
    full attention in block 1; tied): small enough to compare with a random HF model of the same config."""
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          patch_size=14, window_size=112, fullatt_block_indexes=(1,))
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                      mrope_section=(2, 3, 3), attention_bias=True)
    return ModelConfig("qwen2_5_vl", vision, text, True)


def qwen3_vl_tiny(vocab_size: int = 151936) -> ModelConfig:
    """The tiny Qwen3-VL of the tests and the CPU demo (text 64 wide, 3 layers; vision 32 wide, 3 blocks, a
    4x4 position table, DeepStack after blocks 0 and 1; tied): small enough to compare with a random HF model."""
    vision = VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=(0, 1))
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=5e6,
                      mrope_section=(4, 2, 2), qk_norm=True, mrope_interleaved=True)
    return ModelConfig("qwen3_vl", vision, text, True)


PRESETS = {
    "qwen2_5_vl_tiny": qwen2_5_vl_tiny,
    "qwen2_5_vl_0_5b_shape": qwen2_5_vl_0_5b_shape,
    "qwen2_5_vl_3b": qwen2_5_vl_3b,
    "qwen2_5_vl_7b": qwen2_5_vl_7b,
    "qwen3_vl_tiny": qwen3_vl_tiny,
    "qwen3_vl_2b": qwen3_vl_2b,
    "qwen3_vl_4b": qwen3_vl_4b,
    "qwen3_vl_8b": qwen3_vl_8b,
    "qwen3_vl_4b_thinking": qwen3_vl_4b_thinking,
    "qwen3_vl_8b_thinking": qwen3_vl_8b_thinking,
}


def preset(name: str) -> ModelConfig:
    """Returns the named preset; the error lists the valid names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
