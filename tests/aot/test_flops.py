"""The analytic FLOPs: the matmul weights they count are the model's parameters less its norms, biases
and lookup tables (on the real model's abstract parameters), and hand-computed figures on the tiny preset."""
import jax
import pytest
from flax import nnx

from dig_jax.aot import flops
from dig_jax.models import config as C
from dig_jax.models.vlm import QwenVL


def _not_multiplied(cfg) -> int:
    """Parameters that multiply no input: norms, biases, the untied input embedding, Qwen3's patch bias
    and learned position table (from the HF architectures, counted by hand)."""
    t, v = cfg.text, cfg.vision
    d, w, e = t.hidden_size, v.hidden_size, v.hidden_size * v.spatial_merge_size ** 2
    text = t.num_hidden_layers * (2 * d + (2 * t.head_dim if t.qk_norm else 0)) + d
    if t.attention_bias:
        text += t.num_hidden_layers * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    embed = 0 if cfg.tie_word_embeddings else t.vocab_size * d
    if cfg.family == "qwen3_vl":  # LayerNorms (scale + bias), qkv / proj / fc1 / fc2 biases
        block = 2 * 2 * w + 3 * w + w + v.intermediate_size + w
        mergers = (2 * w + e + d) + len(v.deepstack_visual_indexes) * (2 * e + e + d)
        vision = v.depth * block + mergers + w + v.num_position_embeddings * w
    else:  # RMSNorms, qkv / proj / gate / up / down biases; the merger's ln_q and two biases
        block = 2 * w + 3 * w + w + 2 * v.intermediate_size + w
        vision = v.depth * block + w + e + d
    return text + embed + vision


@pytest.mark.parametrize("preset", ["qwen3_vl_tiny", "qwen2_5_vl_tiny", "qwen3_vl_4b", "qwen3_vl_8b"])
def test_counted_weights_are_the_models_matmul_parameters(preset):
    cfg = C.preset(preset)
    model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    k = flops.counts(cfg)
    counted = cfg.text.num_hidden_layers * k.text_layer + k.lm_head + k.vision_patch + k.vision_merged
    assert total - counted == _not_multiplied(cfg)


def test_hand_computed_figures_on_the_tiny_preset():
    cfg = C.qwen3_vl_tiny()  # D 64, F 128, 4 heads / 2 KV heads of 16, 3 layers, V 151936
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o; k, v; SwiGLU
    assert flops.counts(cfg).text_layer == layer == 36864
    # one token at a cache of 100 slots: 3 layers x (2 x weights + 4 x 4 heads x 16 x 100) + the LM head
    assert flops.token_flops(cfg, 100) == 3 * (2 * layer + 4 * 4 * 16 * 100) + 2 * 64 * 151936
    # vision: per patch 2 x (patch embedding 1536 x 32 + 3 blocks x (4 x 32^2 + 2 x 32 x 48)); attention
    # 3 blocks x 4 x 32 x 16 x 16 per image of 16 patches; 3 mergers (main + 2 DeepStack) per merged token
    per_patch = 2 * (1536 * 32 + 3 * (4 * 32 * 32 + 2 * 32 * 48))
    mergers = 3 * (128 * 128 + 128 * 64)
    assert flops.vision_forward(cfg, 1, 16) == 16 * per_patch + 3 * 4 * 32 * 16 * 16 + 2 * mergers * 4
    assert flops.vision_forward(cfg, 6, 16) == 6 * flops.vision_forward(cfg, 1, 16)  # per-image attention


def test_update_is_three_forwards_and_generation_adds_the_decode_steps():
    cfg = C.qwen3_vl_tiny()
    shapes = dict(rows=8, prompt_len=64, completion_len=12, images=8, patches_per_image=16)
    assert flops.update_flops(cfg, **shapes) == pytest.approx(3 * flops.scoring_flops(cfg, **shapes))
    one = flops.generation_flops(cfg, rows=8, prompt_len=64, new_tokens=1, images=8, patches_per_image=16)
    ten = flops.generation_flops(cfg, rows=8, prompt_len=64, new_tokens=10, images=8, patches_per_image=16)
    # the cache grows with new_tokens, so the prefill attends over more slots too
    prefill_growth = 8 * cfg.text.num_hidden_layers * 4.0 * 4 * 16 * 64 * 9
    assert ten - one == pytest.approx(8 * 9 * flops.token_flops(cfg, 74) + prefill_growth)


def test_roofline_takes_the_slowest_resource():
    r = flops.roofline(4e12, 1e9, 3e9, chips=4, peak_flops=1e12, hbm_bandwidth=1e9, ici_bandwidth=1e9)
    assert (r["compute_s"], r["hbm_s"], r["ici_s"]) == (1.0, 1.0, 3.0)
    assert r["bound"] == "ici" and r["bound_s"] == 3.0
