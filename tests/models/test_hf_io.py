"""HF checkpoint import/export: round trips through transformers, on-disk layouts, shards, errors."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from dig_jax.models import hf_io
from dig_jax.models.vlm import QwenVL

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

GRIDS = [[(1, 8, 12)], [(1, 4, 8), (1, 8, 4)]]


@pytest.fixture(scope="module")
def hf_qwen3_dir(tmp_path_factory):
    """A tiny tied Qwen3-VL saved by HF (single file, in-memory key layout)."""
    cfg = oracle.tiny_cfg("qwen3_vl", tie=True, small_vocab=True)
    path = tmp_path_factory.mktemp("qwen3_hf")
    oracle.hf_model(cfg).save_pretrained(path)
    return cfg, str(path)


@pytest.mark.parametrize("family,tie", [("qwen2_5_vl", False), ("qwen3_vl", True)])
def test_export_reloads_in_hf_with_identical_logits(family, tie, tmp_path):
    from transformers import AutoModelForImageTextToText
    cfg = oracle.tiny_cfg(family, tie=tie, small_vocab=True)
    model = QwenVL(cfg, rngs=nnx.Rngs(7))
    hf_io.save_hf_checkpoint(model, cfg, str(tmp_path))

    disk = hf_io.open_safetensors(str(tmp_path))
    assert ("lm_head.weight" in disk) == (not tie)
    prefix = "visual." if family == "qwen2_5_vl" else "model.visual."  # each family's own on-disk layout
    assert any(k.startswith(prefix) for k in disk)

    hf = AutoModelForImageTextToText.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                 "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]
    batch = oracle.make_batch(cfg, GRIDS)
    want = oracle.hf_logits(hf, batch, cfg.image_token_id)
    got = np.asarray(model(batch.input_ids, batch.pixel_values, batch.grids, batch.attention_mask))
    valid = batch.attention_mask > 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=2e-5 * np.abs(want).max())

    # ... and our own loader reads the export back bit for bit, config included.
    again = hf_io.load_hf_checkpoint(str(tmp_path))
    assert again.cfg == cfg
    oracle.assert_same_params(model, again)


@pytest.mark.parametrize("tie", [True, False])
def test_qwen2_5_hf_save_is_legacy_layout_and_loads(tie, tmp_path):
    cfg = oracle.tiny_cfg("qwen2_5_vl", tie=tie, small_vocab=True)
    hf = oracle.hf_model(cfg)
    hf.save_pretrained(tmp_path)
    disk = hf_io.open_safetensors(str(tmp_path))
    assert "model.embed_tokens.weight" in disk and ("lm_head.weight" in disk) == (not tie)
    assert any(k.startswith("visual.blocks.") for k in disk)
    model = hf_io.load_hf_checkpoint(str(tmp_path))
    assert model.cfg.tie_word_embeddings == tie
    # spot-check against HF's own tensors (torch Linear [out, in] == our kernel transposed)
    sd = hf.state_dict()
    # (stacked layers: layer i of a parameter float[Y, ...] is its index i)
    np.testing.assert_array_equal(np.asarray(model.language_model.layers.self_attn.k_proj.kernel.get_value()[1]),
                                  sd["model.language_model.layers.1.self_attn.k_proj.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(model.visual.blocks.attn.qkv.bias.get_value()[0]),
                                  sd["model.visual.blocks.0.attn.qkv.bias"].numpy())
    np.testing.assert_array_equal(np.asarray(model.lm_head_matrix()), sd["lm_head.weight"].numpy().T)


def test_either_key_layout_and_sharded_index_load_identically(hf_qwen3_dir, tmp_path):
    cfg, path = hf_qwen3_dir
    reference = hf_io.load_hf_checkpoint(path)

    # Qwen3 weights renamed to the legacy Qwen2.5 on-disk prefixes still load (both prefixes accepted).
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    tensors = {hf_io.disk_name(k, "qwen2_5_vl"): np.asarray(v) for k, v in hf_io.open_safetensors(path).items()}
    assert "model.layers.0.self_attn.q_proj.weight" in tensors
    hf_io.write_safetensors(str(legacy / "model.safetensors"), tensors)
    oracle.assert_same_params(reference, hf_io.load_hf_checkpoint(str(legacy), cfg))

    # A sharded checkpoint with an index, written by transformers itself.
    hf = oracle.hf_model(cfg)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="300KB")
    assert (sharded / hf_io.SAFETENSORS_INDEX).exists()
    assert len({v for v in json.load(open(sharded / hf_io.SAFETENSORS_INDEX))["weight_map"].values()}) > 1
    oracle.assert_same_params(reference, hf_io.load_hf_checkpoint(str(sharded)))


def _rewrite(src: str, dst, edit) -> str:
    os.makedirs(dst, exist_ok=True)
    tensors = {k: np.asarray(v) for k, v in hf_io.open_safetensors(src).items()}
    edit(tensors)
    hf_io.write_safetensors(os.path.join(dst, "model.safetensors"), tensors)
    return str(dst)


def test_bad_checkpoints_fail_naming_the_tensor(hf_qwen3_dir, tmp_path):
    cfg, path = hf_qwen3_dir
    name = "model.language_model.layers.1.mlp.up_proj.weight"
    bad = _rewrite(path, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensors: .*layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_hf_checkpoint(bad, cfg)

    bad = _rewrite(path, tmp_path / "shape", lambda t: t.update({name: t[name][:-1]}))
    with pytest.raises(ValueError, match=r"shape mismatch for .*layers\.1\.mlp\.up_proj\.weight"):
        hf_io.load_hf_checkpoint(bad, cfg)

    bad = _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.visual.blocks.9.attn.qkv.weight": t[name]}))
    with pytest.raises(ValueError, match=r"unexpected tensors: model\.visual\.blocks\.9\.attn\.qkv\.weight"):
        hf_io.load_hf_checkpoint(bad, cfg)


def test_load_places_parameters_in_their_shardings(hf_qwen3_dir):
    from dig_jax import sharding as shd
    cfg, path = hf_qwen3_dir
    mesh = shd.make_mesh((1, 4, 2))
    model = hf_io.load_hf_checkpoint(path, mesh=mesh)
    kernel = model.language_model.layers.mlp.gate_proj.kernel.get_value()[0]  # layer 0: ("embed", "mlp")
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(64 // 4, 128 // 2)}
    oracle.assert_same_params(model, hf_io.load_hf_checkpoint(path))
