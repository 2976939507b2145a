"""A forward sharded over 8 fake CPU devices (fsdp=4 x tensor=2) equals the single-device forward."""
import importlib.util
import os

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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_sharded_forward_equals_single_device(family):
    assert len(jax.devices()) == 8, "conftest should fake 8 CPU devices"
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    mesh = shd.make_mesh((1, 4, 2))
    model = shd.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    kernel = model.language_model.layers[0].self_attn.q_proj.kernel.get_value()  # ("embed", "heads")
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert model.language_model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")

    batch = oracle.make_batch(cfg, [[(1, 8, 12)], [(1, 4, 8), (1, 8, 4)], [(1, 8, 8)], [(1, 4, 4)]])
    pos, _, vision = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids)
    args = (batch.input_ids.astype(np.int32), batch.attention_mask.astype(np.int32), pos, batch.pixel_values, vision)

    def forward(state, ids, mask, pos, pixels, vision):
        return nnx.merge(graphdef, state).forward(ids, mask, pos, pixels, vision)[0]

    # Single device: the same parameter values gathered onto one device, no mesh, no constraints.
    host_state = jax.device_put(jax.device_get(state), jax.devices()[0])
    want = np.asarray(jax.jit(forward)(host_state, *args))

    batch_sharding = shd.data_sharding(mesh, 2)
    in_shardings = (shd.state_shardings(state, mesh), batch_sharding, batch_sharding,
                    NamedSharding(mesh, P(None, ("data", "fsdp"))), NamedSharding(mesh, P()),
                    jax.tree.map(lambda _: NamedSharding(mesh, P()), vision))
    with shd.activate(mesh):
        sharded = jax.jit(forward, in_shardings=in_shardings,
                          out_shardings=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
        got = sharded(state, *args)
    # really distributed: each device holds one sequence and half the vocabulary
    assert {s.data.shape for s in got.addressable_shards} == {(1, got.shape[1], cfg.text.vocab_size // 2)}
    valid = batch.attention_mask > 0
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)
