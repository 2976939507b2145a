"""Stacked (scanned) decoder layers and ViT blocks: the HF checkpoint layout and rematerialisation.

The stacked layout must be invisible from outside: HF's own `save_pretrained` of a random oracle model
and our export of the same weights hold the same tensors (names, shapes, dtypes, values), and every
remat policy computes the same logits and gradients as no remat.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dig_jax import sharding as shd
from dig_jax.config_validation import ConfigError, validate
from dig_jax.models import hf_io
from dig_jax.models.layers import REMAT_POLICIES
from dig_jax.models.vision import nnx_to_hf
from dig_jax.models.vlm import QwenVL, prepare_inputs

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def tensors_of(path: str) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in hf_io.open_safetensors(path).items()}


# ----------------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,tie", [("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_stacked_layout_round_trips_to_hf_tensors(family, tie, tmp_path):
    cfg = oracle.tiny_cfg(family, tie=tie, small_vocab=True)
    hf = oracle.hf_model(cfg)
    hf.save_pretrained(tmp_path / "hf")
    model = hf_io.load_hf_checkpoint(str(tmp_path / "hf"))

    # Layer i of every stacked parameter is HF's `layers.{i}` / `blocks.{i}` tensor.
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    stacked = [e for e in hf_io.param_mapping(cfg) if e.stacked]
    assert {e.path[:2] for e in stacked} == {("visual", "blocks"), ("language_model", "layers")}
    for entry in stacked:
        var = flat[entry.path]
        assert var.get_metadata()[shd.LOGICAL_AXES_KEY][0] == "layers"
        value = np.asarray(var.get_value())
        depth = cfg.vision.depth if entry.path[0] == "visual" else cfg.text.num_hidden_layers
        assert value.shape[0] == len(entry.hf_names) == depth
        for i, name in enumerate(entry.hf_names):
            np.testing.assert_array_equal(nnx_to_hf(value[i], entry.transform, cfg.vision), sd[name], err_msg=name)

    # Export: exactly the tensors transformers wrote itself (names in the family's on-disk layout,
    # shapes, dtypes, values), and they load back into identical parameters.
    hf_io.save_hf_checkpoint(model, cfg, str(tmp_path / "ours"))
    theirs, ours = tensors_of(str(tmp_path / "hf")), tensors_of(str(tmp_path / "ours"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor, err_msg=name)
    oracle.assert_same_params(model, hf_io.load_hf_checkpoint(str(tmp_path / "ours")))


def test_layer_sharded_load_stacks_only_each_shards_layers(tmp_path):
    """With the layer axis sharded (rules "layers" -> data), every shard's callback index selects layers;
    each device then holds one layer, and the values equal an unsharded load."""
    cfg = oracle.tiny_cfg("qwen2_5_vl", tie=True, small_vocab=True)  # 2 decoder layers, 2 ViT blocks
    oracle.hf_model(cfg).save_pretrained(tmp_path)
    rules = tuple((name, "data" if name == "layers" else axes) for name, axes in shd.DEFAULT_RULES)
    model = hf_io.load_hf_checkpoint(str(tmp_path), mesh=shd.make_mesh((2, 2, 2)), rules=rules)
    kernel = model.language_model.layers.mlp.gate_proj.kernel.get_value()  # ("layers", "embed", "mlp")
    assert kernel.sharding.spec == P("data", "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(1, 64 // 2, 128 // 2)}
    qkv = model.visual.blocks.attn.qkv.kernel.get_value()  # ("layers", "embed", "heads")
    assert {s.data.shape for s in qkv.addressable_shards} == {(1, 32 // 2, 96 // 2)}
    oracle.assert_same_params(model, hf_io.load_hf_checkpoint(str(tmp_path)))


# ----------------------------------------------------------------------------------------------------
# Rematerialisation
# ----------------------------------------------------------------------------------------------------

def _loss_inputs(cfg):
    """Two rows, three 64-patch images (the per-image attention path), next-token targets."""
    batch = oracle.make_batch(cfg, [[(1, 8, 8), (1, 8, 8)], [(1, 8, 8)]])
    pos, _, vision = prepare_inputs(cfg, batch.input_ids, batch.attention_mask, batch.grids)
    ids, mask = jnp.asarray(batch.input_ids, jnp.int32), jnp.asarray(batch.attention_mask, jnp.int32)
    return ids, mask, jnp.asarray(pos), jnp.asarray(batch.pixel_values), vision


def remat_policies(jaxpr) -> list:
    """The `policy` of every checkpoint (remat) equation in `jaxpr`, nested bodies (scans) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat2"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)  # a ClosedJaxpr's Jaxpr
            if hasattr(inner, "eqns"):
                found += remat_policies(inner)
    return found


def _value_and_grad(model, ids, mask, pos, pixels, vision):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state).forward(ids, mask, pos, pixels, vision)[0]  # float32[B, L, V]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return -jnp.sum(picked * weight) / jnp.sum(weight), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state), remat_policies(jax.make_jaxpr(loss)(state).jaxpr)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_remat_policies_give_the_same_logits_and_gradients(family):
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    inputs = _loss_inputs(cfg)
    results = {}
    for remat in REMAT_POLICIES:
        model = QwenVL(cfg, rngs=nnx.Rngs(0), vision_attention_block=64, remat=remat)
        results[remat] = _value_and_grad(model, *inputs)
    ((loss, logits), grads), policies = results["none"]
    grads = dict(nnx.to_flat_state(grads))
    assert all(np.abs(np.asarray(g.get_value())).max() > 0 for g in grads.values())  # every parameter is reached
    assert policies == []
    # the policy really wraps the scanned bodies: one checkpoint per tower (ViT blocks, decoder layers)
    assert results["full"][1] == [None, None]
    assert results["dots"][1] == [jax.checkpoint_policies.dots_with_no_batch_dims_saveable] * 2
    for remat in ("full", "dots"):
        ((loss_r, logits_r), grads_r), _ = results[remat]
        np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
        np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-5)
        for path, g in nnx.to_flat_state(grads_r):
            want = np.asarray(grads[path].get_value())
            np.testing.assert_allclose(np.asarray(g.get_value()), want, rtol=1e-4, atol=1e-6 * np.abs(want).max(),
                                       err_msg=f"{remat}: {path}")


def test_bad_remat_is_refused_by_model_and_config():
    cfg = oracle.tiny_cfg("qwen3_vl", small_vocab=True)
    with pytest.raises(ValueError, match=r"remat='most' is not one of \('none', 'full', 'dots'\)"):
        QwenVL(cfg, rngs=nnx.Rngs(0), remat="most")
    from configs import demo_cpu
    c = demo_cpu.get_config()
    c.data.train_files = "/data/*.array_record"
    c.model.remat = "most"
    with pytest.raises(ConfigError, match=r"^config\.model\.remat: 'most' is not one of"):
        validate(c, num_devices=1)


# ----------------------------------------------------------------------------------------------------
# Attention kernels inside the model
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("attention_block", [64, None], ids=["per-image", "one-sequence"])
def test_the_splash_kernel_gives_the_dense_models_logits_and_gradients(family, attention_block):
    """`model.attention="splash"` (the Pallas kernel, interpreted on the CPU) in both towers: the same loss,
    logits at every real position, and gradients as the dense path. Left-padding rows are don't-care."""
    cfg = oracle.tiny_cfg(family, tie=False, small_vocab=True)
    ids, mask, pos, pixels, vision = _loss_inputs(cfg)
    results = {}
    for attention in ("dense", "splash"):
        model = QwenVL(cfg, rngs=nnx.Rngs(0), vision_attention_block=attention_block, attention=attention)
        results[attention] = _value_and_grad(model, ids, mask, pos, pixels, vision)[0]
    (loss, logits), grads = results["dense"]
    (loss_s, logits_s), grads_s = results["splash"]
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits_s)[real], np.asarray(logits)[real], rtol=1e-4, atol=1e-4)
    want = dict(nnx.to_flat_state(grads))
    for path, g in nnx.to_flat_state(grads_s):
        w = np.asarray(want[path].get_value())
        np.testing.assert_allclose(np.asarray(g.get_value()), w, rtol=1e-3, atol=1e-5 * np.abs(w).max(),
                                   err_msg=str(path))
