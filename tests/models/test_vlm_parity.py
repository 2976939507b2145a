"""The composed VLM against HF transformers, plus the static-shape and KV-cache contracts of `forward`.

Parity: a random tiny HF model of each family is saved with `save_pretrained`, loaded with our
`hf_io.load_hf_checkpoint` and both run a left-padded batch of two rows holding three images of
different sizes. Logits must agree at every real position.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dig_jax.models import hf_io
from dig_jax.models.vision_inputs import bucket_patches
from dig_jax.models.vlm import QwenVL, init_cache, next_position_ids, prepare_inputs

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

GRIDS = [[(1, 16, 12), (1, 8, 8)], [(1, 12, 20)]]  # several Qwen2.5 windows, non-square, two sizes per row


def assert_logits_close(got, want, mask, rtol=1e-5, atol=2e-5):
    valid = np.asarray(mask) > 0
    got, want = np.asarray(got)[valid], np.asarray(want)[valid]
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * max(1.0, scale))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_logits_match_hf_two_images_left_padded(family, tmp_path):
    cfg = oracle.tiny_cfg(family, tie=True)
    hf = oracle.hf_model(cfg)
    hf.save_pretrained(tmp_path)
    batch = oracle.make_batch(cfg, GRIDS)
    want = oracle.hf_logits(hf, batch, cfg.image_token_id)

    model = hf_io.load_hf_checkpoint(str(tmp_path))
    assert model.cfg == cfg  # config.json read back into the same ModelConfig
    got = model(batch.input_ids, batch.pixel_values, batch.grids, batch.attention_mask)
    assert_logits_close(got, want, batch.attention_mask)

    # Padding the patch count to a bucket leaves every real logit unchanged.
    n = batch.pixel_values.shape[0]
    padded = bucket_patches(n + 100)
    position_ids, _, vision = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids,
                                             pad_patches_to=padded)
    pixels = np.concatenate([batch.pixel_values, np.zeros((padded - n, cfg.vision.patch_dim), np.float32)])
    got_padded, _ = model.forward(jnp.asarray(batch.input_ids, jnp.int32), jnp.asarray(batch.attention_mask),
                                  jnp.asarray(position_ids), jnp.asarray(pixels), vision)
    assert_logits_close(got_padded, want, batch.attention_mask)


def test_prepare_inputs_rejects_token_feature_mismatch():
    cfg = oracle.tiny_cfg("qwen3_vl")
    batch = oracle.make_batch(cfg, GRIDS)
    with pytest.raises(ValueError, match="image-pad tokens"):
        prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids[:2])


# ----------------------------------------------------------------------------------------------------
# Static shapes: one trace per bucket; KV cache
# ----------------------------------------------------------------------------------------------------

def _split(family, seed=0):
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    model = QwenVL(cfg, rngs=nnx.Rngs(seed))
    return cfg, model


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_forward_and_decode_trace_once(family):
    cfg, model = _split(family)
    graphdef, state = nnx.split(model)
    traces = {"forward": 0, "decode": 0}

    @jax.jit
    def forward(state, ids, mask, pos, pixels, vision):
        traces["forward"] += 1
        return nnx.merge(graphdef, state).forward(ids, mask, pos, pixels, vision)[0]

    @jax.jit
    def decode(state, tokens, pos, cache, index):
        traces["decode"] += 1
        return nnx.merge(graphdef, state).decode(tokens, pos, cache, index)

    n_pad = bucket_patches(160)
    for grids in ([[(1, 8, 12)], [(1, 8, 8)]], [[(1, 4, 8)], [(1, 12, 8), (1, 4, 4)]]):  # 160 and 144 patches
        batch = oracle.make_batch(cfg, grids, length=80)
        pos, _, vision = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids, pad_patches_to=n_pad)
        pixels = np.zeros((n_pad, cfg.vision.patch_dim), np.float32)
        pixels[:len(batch.pixel_values)] = batch.pixel_values
        forward(state, batch.input_ids.astype(np.int32), batch.attention_mask.astype(np.int32), pos, pixels, vision)
    assert traces["forward"] == 1

    cache = init_cache(cfg, 2, 8)
    tokens = jnp.ones((2, 1), jnp.int32)
    for k in range(4):
        pos = next_position_ids(cache, jnp.array([[-3], [5]]))
        logits, cache = decode(state, tokens, pos, cache, jnp.int32(k))
    assert traces["decode"] == 1 and logits.shape == (2, 1, cfg.text.vocab_size)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_prefill_and_decode_match_full_forward_with_images(family):
    """Prefill (images, left padding) + teacher-forced decode steps at rope-delta positions equals one
    forward over prompt + completion with positions from get_rope_index over the concatenation."""
    cfg, model = _split(family, seed=3)
    prompt = oracle.make_batch(cfg, [[(1, 8, 12)], [(1, 4, 8), (1, 8, 4)]], seed=1)
    steps = 6
    completion = np.random.default_rng(2).integers(0, 1000, (2, steps))
    b, lp = prompt.input_ids.shape

    full_ids = np.concatenate([prompt.input_ids, completion], axis=1)
    full_mask = np.concatenate([prompt.attention_mask, np.ones_like(completion)], axis=1)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda *a, **kw: nnx.merge(graphdef, state).forward(*a, **kw))
    decode = jax.jit(lambda *a: nnx.merge(graphdef, state).decode(*a))
    full_pos, _, vision = prepare_inputs(cfg, full_ids, full_mask, prompt.grids)
    want, _ = forward(jnp.asarray(full_ids, jnp.int32), jnp.asarray(full_mask), jnp.asarray(full_pos),
                      jnp.asarray(prompt.pixel_values), vision)

    pos, deltas, vision = prepare_inputs(cfg, prompt.input_ids, prompt.attention_mask, prompt.grids)
    cache = init_cache(cfg, b, lp + steps + 2)
    logits, cache = forward(jnp.asarray(prompt.input_ids, jnp.int32), jnp.asarray(prompt.attention_mask),
                            jnp.asarray(pos), jnp.asarray(prompt.pixel_values), vision, cache=cache,
                            cache_index=jnp.int32(0))
    got = [logits]
    for k in range(steps):
        step_pos = next_position_ids(cache, deltas)
        np.testing.assert_array_equal(np.asarray(step_pos)[:, :, 0], full_pos[:, :, lp + k])
        logits, cache = decode(jnp.asarray(completion[:, k:k + 1], jnp.int32), step_pos, cache, jnp.int32(lp + k))
        got.append(logits)
    assert_logits_close(jnp.concatenate(got, axis=1), want, full_mask)
