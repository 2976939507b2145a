"""The per-image attention fast path equals the masked dense attention it replaces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import config as C
from dig_jax.models.vision import VisionTower, check_block_aligned, segment_attention
from dig_jax.models.vision_inputs import build_vision_inputs


@pytest.mark.parametrize("family,preset", [("qwen2_5_vl", C.qwen2_5_vl_tiny), ("qwen3_vl", C.qwen3_vl_tiny)])
def test_block_attention_equals_dense_for_equal_images(family, preset):
    cfg = preset().vision
    grid = np.array([[1, 8, 8]] * 3)  # three images of 64 patches (Qwen2.5: several windows each)
    inputs = build_vision_inputs(grid, cfg, family)
    check_block_aligned(inputs.segment_ids, 64)
    pixels = jax.random.normal(jax.random.key(0), (192, cfg.patch_dim))
    dense = VisionTower(cfg, family, rngs=nnx.Rngs(0))
    blocked = VisionTower(cfg, family, rngs=nnx.Rngs(0), attention_block=64)
    out_d, deep_d = dense(pixels, inputs)
    out_b, deep_b = blocked(pixels, inputs)
    np.testing.assert_allclose(out_b, out_d, rtol=1e-5, atol=1e-6)
    for a, b in zip(deep_b, deep_d):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_block_attention_ignores_other_blocks():
    q, k, v = (jax.random.normal(jax.random.key(i), (8, 2, 4)) for i in range(3))
    seg = jnp.array([1, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_allclose(segment_attention(q, k, v, seg, attention_block=4),
                               segment_attention(q, k, v, seg), rtol=1e-5, atol=1e-6)


def test_misaligned_segments_are_rejected():
    with pytest.raises(ValueError, match="segment 2 spans attention blocks"):
        check_block_aligned(np.array([1, 1, 1, 2, 2, 2, 2, 2]), 4)
    with pytest.raises(ValueError, match="whole number"):
        check_block_aligned(np.array([1, 1, 1]), 2)
