"""A forward sharded over 8 fake CPU devices equals the single-device forward: parameters and the batch
over (fsdp=4 x tensor=2); and, with images of one size, the ViT's activations sharded by image over
(data=2 x fsdp=4), each device holding the attention logits of its own image only."""
import importlib.util
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dig_jax import sharding as shd
from dig_jax.models.vlm import QwenVL, prepare_inputs

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def _forward_args(cfg, batch):
    pos, _, vision = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids)
    return (batch.input_ids.astype(np.int32), batch.attention_mask.astype(np.int32), pos, batch.pixel_values, vision)


def _single_and_sharded(model, mesh, args):
    """(logits on one device without constraints, the compiled sharded forward, its logits)."""
    graphdef, state = nnx.split(model)

    def forward(state, ids, mask, pos, pixels, vision):
        return nnx.merge(graphdef, state).forward(ids, mask, pos, pixels, vision)[0]

    # Single device: the same parameter values gathered onto one device, no mesh, no constraints.
    host_state = jax.device_put(jax.device_get(state), jax.devices()[0])
    want = np.asarray(jax.jit(forward)(host_state, *args))

    batch_sharding = shd.data_sharding(mesh, 2)
    in_shardings = (shd.state_shardings(state, mesh), batch_sharding, batch_sharding,
                    NamedSharding(mesh, P(None, ("data", "fsdp"))), NamedSharding(mesh, P()),
                    jax.tree.map(lambda _: NamedSharding(mesh, P()), args[-1]))
    with shd.activate(mesh):
        sharded = jax.jit(forward, in_shardings=in_shardings,
                          out_shardings=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
        compiled = sharded.lower(state, *args).compile()
    return want, compiled, compiled(state, *args)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sharded_forward_equals_single_device(family):
    assert len(jax.devices()) == 8, "conftest should fake 8 CPU devices"
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    mesh = shd.make_mesh((1, 4, 2))
    model = shd.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh)
    kernel = model.language_model.layers.self_attn.q_proj.kernel.get_value()[0]  # layer 0: ("embed", "heads")
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert model.language_model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")

    batch = oracle.make_batch(cfg, [[(1, 8, 12)], [(1, 4, 8), (1, 8, 4)], [(1, 8, 8)], [(1, 4, 4)]])
    want, _, got = _single_and_sharded(model, mesh, _forward_args(cfg, batch))
    # really distributed: each device holds one sequence and half the vocabulary
    assert {s.data.shape for s in got.addressable_shards} == {(1, got.shape[1], cfg.text.vocab_size // 2)}
    valid = batch.attention_mask > 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_vision_activations_are_sharded_by_image(family):
    """8 rows of one 64-patch image each on data=2 x fsdp=4: the per-image attention path keeps whole
    images per device, so the compiled program's ViT attention logits are float32[1, A, 64, 64] per
    device (1/8 of the images), never the global float32[8, A, 64, 64]; the logits equal one device's."""
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    mesh = shd.make_mesh((2, 4, 1))
    model = shd.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0), vision_attention_block=64), mesh)
    batch = oracle.make_batch(cfg, [[(1, 8, 8)]] * 8)
    want, compiled, got = _single_and_sharded(model, mesh, _forward_args(cfg, batch))
    valid = batch.attention_mask > 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)

    heads = cfg.vision.num_heads
    logits = set(re.findall(rf"f32\[(\d+),{heads},64,64\]", compiled.as_text()))  # per-device shapes
    assert logits == {"1"}, logits
