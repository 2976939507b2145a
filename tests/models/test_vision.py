"""Vision towers (Qwen2.5-VL, Qwen3-VL) against Hugging Face transformers on tiny random models.

The HF modules are the oracle: same random weights (copied through `vision_param_mapping`), same random
pixel rows, outputs compared in float32. The host-side index arithmetic is checked against the spec's
worked example, HF's own helpers, and `torch.nn.functional.interpolate` for the position table.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import vision_utils
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

from dig_jax import sharding
from dig_jax.models import config as model_config
from dig_jax.models.vision import VisionTower, hf_to_nnx, nnx_to_hf, vision_param_mapping
from dig_jax.models.vision_inputs import bucket_patches, build_vision_inputs

QWEN25, QWEN3 = "qwen2_5_vl", "qwen3_vl"
# Two images of different sizes per family (the HF processor's grids of a 224x224 and a 300x450 image),
# plus a 2-frame clip.
GRIDS = {QWEN25: [[1, 16, 16], [1, 22, 32], [2, 8, 12]], QWEN3: [[1, 16, 16], [1, 18, 28], [2, 6, 10]]}


def tiny_vision(family: str) -> model_config.VisionConfig:
    return (model_config.qwen2_5_vl_tiny() if family == QWEN25 else model_config.qwen3_vl_tiny()).vision


def hf_tower_class_and_config(cfg: model_config.VisionConfig, family: str):
    """The HF vision module class and its config for one of our VisionConfigs (eager attention)."""
    common = dict(depth=cfg.depth, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_heads=cfg.num_heads, out_hidden_size=cfg.out_hidden_size, patch_size=cfg.patch_size,
                  temporal_patch_size=cfg.temporal_patch_size, spatial_merge_size=cfg.spatial_merge_size,
                  in_channels=cfg.in_channels)
    if family == QWEN25:
        hf_cfg = Qwen2_5_VLVisionConfig(**common, window_size=cfg.window_size,
                                        fullatt_block_indexes=list(cfg.fullatt_block_indexes), hidden_act="silu")
        cls = Qwen2_5_VisionTransformerPretrainedModel
    else:
        hf_cfg = Qwen3VLVisionConfig(**common, num_position_embeddings=cfg.num_position_embeddings,
                                     deepstack_visual_indexes=list(cfg.deepstack_visual_indexes))
        cls = Qwen3VLVisionModel
    hf_cfg._attn_implementation = "eager"
    return cls, hf_cfg


def hf_tower(cfg: model_config.VisionConfig, family: str, seed: int = 0) -> torch.nn.Module:
    """The HF tower with every parameter (norm scales and biases too) drawn at random."""
    cls, hf_cfg = hf_tower_class_and_config(cfg, family)
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_scale = p.ndim == 1 and name.endswith("weight")
            p.copy_((1.0 if is_scale else 0.0) + (0.3 if name.startswith("pos_embed") else 0.1) * torch.randn_like(p))
    return model


def load_hf_weights(tower: VisionTower, hf_model: torch.nn.Module, cfg, family: str) -> None:
    hf_state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    state = nnx.state(tower, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for entry in vision_param_mapping(cfg, family):  # a stacked parameter holds one HF tensor per block
        values = [hf_to_nnx(hf_state[hf_key], entry.transform) for hf_key in entry.hf_names]
        value = np.stack(values) if entry.stacked else values[0]
        assert flat[entry.path].get_value().shape == value.shape, (entry.hf_names, entry.path)
        flat[entry.path].set_value(jnp.asarray(value))
    nnx.update(tower, nnx.from_flat_state(flat))


@pytest.fixture(scope="module", params=[QWEN25, QWEN3])
def towers(request):
    family = request.param
    cfg = tiny_vision(family)
    hf_model = hf_tower(cfg, family)
    tower = VisionTower(cfg, family, rngs=nnx.Rngs(0))
    load_hf_weights(tower, hf_model, cfg, family)
    return family, cfg, hf_model, tower


def random_pixels(grids, cfg, seed=0, pad_to=None) -> np.ndarray:
    n = int(np.prod(np.asarray(grids), axis=1).sum())
    x = np.random.default_rng(seed).standard_normal((n, cfg.patch_dim)).astype(np.float32)
    return x if pad_to is None else np.concatenate([x, np.zeros((pad_to - n, cfg.patch_dim), np.float32)])


def hf_forward(hf_model, pixels, grids):
    with torch.no_grad():
        out = hf_model(torch.from_numpy(pixels), grid_thw=torch.tensor(grids))
    deep = getattr(out, "deepstack_features", None) or []
    return out.pooler_output.numpy(), [d.numpy() for d in deep]


def layer_shape(entry, shape) -> tuple:
    """The shape of one HF tensor's share of a parameter: one layer of a stacked one (float[depth, ...])."""
    return tuple(shape[1:]) if entry.stacked else tuple(shape)


def rel_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------------------
# Host-side index arithmetic
# ----------------------------------------------------------------------------------------------------

def test_window_index_matches_spec_worked_example():
    cfg = tiny_vision(QWEN25)  # patch 14, window 112 -> 4x4 merged tokens per window
    inp = build_vision_inputs(np.array([[1, 16, 16]]), cfg, QWEN25)
    first = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
    np.testing.assert_array_equal(inp.window_index[:16], first)
    np.testing.assert_array_equal(inp.window_index[16:20], [4, 5, 6, 7])
    np.testing.assert_array_equal(np.bincount(inp.window_segment_ids)[1:], [64] * 4)
    np.testing.assert_array_equal(inp.segment_ids, np.ones(256))

    inp = build_vision_inputs(np.array([[1, 22, 32]]), cfg, QWEN25)  # 308x448: llm grid 11x16
    np.testing.assert_array_equal(np.bincount(inp.window_segment_ids)[1:], [64] * 8 + [48] * 4)


@pytest.mark.parametrize("grids", [[[1, 16, 16], [1, 22, 32]], [[2, 8, 12], [1, 4, 30], [3, 18, 2]], [[1, 32, 8]]])
def test_window_index_and_positions_match_hf(grids):
    cfg = tiny_vision(QWEN25)
    grid_t = torch.tensor(grids)
    inp = build_vision_inputs(np.array(grids), cfg, QWEN25)
    hf_index, hf_cu = vision_utils.get_vision_window_index(grid_t, cfg.spatial_merge_size, cfg.window_size,
                                                           cfg.patch_size)
    np.testing.assert_array_equal(inp.window_index, hf_index.numpy())
    np.testing.assert_array_equal(inp.reverse_index, torch.argsort(hf_index).numpy())
    # Window boundaries (in patches) are where the window segment id changes.
    ours_cu = np.flatnonzero(np.diff(inp.window_segment_ids, prepend=-1, append=-1))
    np.testing.assert_array_equal(ours_cu, hf_cu.numpy())
    frame_cu = np.flatnonzero(np.diff(inp.segment_ids, prepend=-1, append=-1))
    np.testing.assert_array_equal(frame_cu, vision_utils.get_vision_cu_seqlens(grid_t).numpy())
    pos = vision_utils.get_vision_position_ids(grid_t, cfg.spatial_merge_size).numpy()
    pos = pos.reshape(-1, 4, 2)[hf_index.numpy()].reshape(-1, 2)  # HF permutes cos/sin the same way
    np.testing.assert_array_equal(inp.rotary_pos, pos)


def test_pos_embed_taps_match_hf_and_torch_interpolate():
    """Qwen3 bilinear taps: bit-equal to HF's helper, and reproduce F.interpolate(align_corners=True)."""
    cfg = dataclasses.replace(tiny_vision(QWEN3), num_position_embeddings=48 * 48)
    grids = [[1, 18, 28], [1, 16, 16], [2, 4, 6]]
    inp = build_vision_inputs(np.array(grids), cfg, QWEN3)
    idx, w = vision_utils.get_vision_interpolation_indices_and_weights(
        torch.tensor(grids), 48, mode="bilinear", align_corners=True, spatial_merge_size=2)
    np.testing.assert_array_equal(inp.pos_embed_index, idx.numpy())
    np.testing.assert_array_equal(inp.pos_embed_weight, w.numpy())

    table = np.random.default_rng(0).standard_normal((48 * 48, 8)).astype(np.float32)
    ours = np.einsum("ntd,nt->nd", table[inp.pos_embed_index], inp.pos_embed_weight)
    start = 0
    for t, h, w in grids:
        ref = torch.nn.functional.interpolate(torch.from_numpy(table.T.reshape(1, 8, 48, 48)), size=(h, w),
                                              mode="bilinear", align_corners=True)[0].numpy()  # [8, h, w]
        rows, cols = inp.rotary_pos[start:start + t * h * w].T  # Qwen3: block order == pixel order
        # F.interpolate rounds the float32 source coordinate differently (scale * i vs i * 47 / (h - 1)),
        # which moves a weight by ~1 ulp of the coordinate: agreement to 1e-4 on unit-scale values.
        np.testing.assert_allclose(ours[start:start + t * h * w], ref[:, rows, cols].T, atol=1e-4)
        start += t * h * w


def test_padding_rows_and_bucketing():
    cfg = tiny_vision(QWEN25)
    inp = build_vision_inputs(np.array([[1, 16, 16], [1, 4, 8]]), cfg, QWEN25, pad_patches_to=bucket_patches(288))
    assert inp.segment_ids.shape == (320,) and inp.num_valid_tokens == 72
    assert (inp.segment_ids[288:] == 0).all() and (inp.window_segment_ids[288:] == 0).all()
    assert (inp.segment_ids[:288] > 0).all() and (inp.window_segment_ids[:288] > 0).all()
    np.testing.assert_array_equal(inp.window_index[72:], np.arange(72, 80))  # padding stays last
    np.testing.assert_array_equal(inp.window_index[inp.reverse_index], np.arange(80))
    assert bucket_patches(288) == 320 and bucket_patches(320) == 320 and bucket_patches(0) == 64
    assert bucket_patches(300, power_of_two=True) == 512


@pytest.mark.parametrize("grids, pad, match", [
    ([[1, 15, 16]], None, r"image_grid_thw\[0\]"),
    ([[1, 16, 16]], 200, "pad_patches_to=200"),
    ([[1, 16, 16]], 258, "pad_patches_to=258"),
])
def test_bad_inputs_name_the_culprit(grids, pad, match):
    with pytest.raises(ValueError, match=match):
        build_vision_inputs(np.array(grids), tiny_vision(QWEN25), QWEN25, pad_patches_to=pad)


# ----------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [QWEN25, QWEN3])
def test_param_mapping_covers_hf_and_nnx_exactly(family):
    cfg = tiny_vision(family)
    mapping = vision_param_mapping(cfg, family)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_tower(cfg, family).state_dict().items()}
    tower = nnx.eval_shape(lambda: VisionTower(cfg, family, rngs=nnx.Rngs(0)))
    nnx_shapes = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
    assert sorted(k for entry in mapping for k in entry.hf_names) == sorted(hf_shapes)
    assert sorted(entry.path for entry in mapping) == sorted(nnx_shapes)
    for entry in mapping:
        for hf_key in entry.hf_names:
            path, transform = entry.path, entry.transform
            fake = np.arange(np.prod(hf_shapes[hf_key]), dtype=np.float32).reshape(hf_shapes[hf_key])
            ours = hf_to_nnx(fake, transform)
            assert ours.shape == layer_shape(entry, nnx_shapes[path]), hf_key
            np.testing.assert_array_equal(nnx_to_hf(ours, transform, cfg), fake)


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen3_vl_8b"])  # the 2B/4B/7B towers differ only in O
def test_full_size_shapes_match_hf(preset):
    """Real-size towers: every parameter shape agrees with HF's (built on the meta device, no memory),
    and the forward traces (jax.eval_shape) for two 448x448 images."""
    mc = model_config.preset(preset)
    cfg, family = mc.vision, mc.family
    cls, hf_cfg = hf_tower_class_and_config(cfg, family)
    with torch.device("meta"):
        hf_shapes = {k: tuple(v.shape) for k, v in cls(hf_cfg).state_dict().items()}
    tower = nnx.eval_shape(lambda: VisionTower(cfg, family, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx_shapes = dict((p, v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param)))
    mapping = vision_param_mapping(cfg, family)
    assert sorted(k for entry in mapping for k in entry.hf_names) == sorted(hf_shapes)
    for entry in mapping:
        for hf_key in entry.hf_names:
            path, transform = entry.path, entry.transform
            assert hf_to_nnx(np.empty(hf_shapes[hf_key], np.float32), transform).shape == layer_shape(
                entry, nnx_shapes[path]), hf_key

    side = 448 // cfg.patch_size
    grids = np.array([[1, side, side]] * 2)
    inp = build_vision_inputs(grids, cfg, family)
    pixels = jax.ShapeDtypeStruct((2 * side * side, cfg.patch_dim), jnp.bfloat16)
    graphdef, state = nnx.split(tower)
    out, deep = jax.eval_shape(lambda s, x, i: nnx.merge(graphdef, s)(x, i), state, pixels, inp)
    assert out.shape == (inp.num_valid_tokens, cfg.out_hidden_size) and out.dtype == jnp.bfloat16
    assert [d.shape for d in deep] == [out.shape] * len(cfg.deepstack_visual_indexes)


# ----------------------------------------------------------------------------------------------------
# Forward parity
# ----------------------------------------------------------------------------------------------------

def test_tower_matches_hf(towers):
    family, cfg, hf_model, tower = towers
    grids = GRIDS[family]
    pixels = random_pixels(grids, cfg)
    ref, ref_deep = hf_forward(hf_model, pixels, grids)
    inp = build_vision_inputs(np.array(grids), cfg, family)
    out, deep = jax.jit(lambda t, x, i: t(x, i))(tower, pixels, inp)
    assert out.shape == ref.shape and len(deep) == len(ref_deep) == len(cfg.deepstack_visual_indexes)
    assert rel_err(out, ref) < 1e-5
    for d, r in zip(deep, ref_deep):
        assert rel_err(d, r) < 1e-5


def test_padding_leaves_valid_outputs_unchanged(towers):
    family, cfg, hf_model, tower = towers
    grids = GRIDS[family][:2]
    n = int(np.prod(np.asarray(grids), axis=1).sum())
    pad_to = bucket_patches(n + 100)
    ref, ref_deep = hf_forward(hf_model, random_pixels(grids, cfg), grids)
    inp = build_vision_inputs(np.array(grids), cfg, family, pad_patches_to=pad_to)
    out, deep = jax.jit(lambda t, x, i: t(x, i))(tower, random_pixels(grids, cfg, pad_to=pad_to), inp)
    m = inp.num_valid_tokens
    assert out.shape == (pad_to // 4, cfg.out_hidden_size) and m == ref.shape[0]
    assert np.isfinite(np.asarray(out)).all()
    assert rel_err(out[:m], ref) < 1e-5
    for d, r in zip(deep, ref_deep):
        assert np.isfinite(np.asarray(d)).all() and rel_err(d[:m], r) < 1e-5


def test_forward_traces_once_per_padded_size(towers):
    family, cfg, hf_model, tower = towers
    traces = []

    @nnx.jit
    def forward(t, x, i):
        traces.append(1)  # Python side effect: runs only while tracing
        return t(x, i)

    pad_to = 1024
    for grids in ([[1, 16, 16], [1, 22, 32]], [[1, 20, 20], [1, 24, 24]], [[1, 30, 30]]):
        inp = build_vision_inputs(np.array(grids), cfg, family, pad_patches_to=pad_to)
        out, _ = forward(tower, random_pixels(grids, cfg, seed=1, pad_to=pad_to), inp)
        ref, _ = hf_forward(hf_model, random_pixels(grids, cfg, seed=1), grids)
        assert rel_err(out[:inp.num_valid_tokens], ref) < 1e-5
    assert len(traces) == 1


def test_bfloat16_compute_stays_close(towers):
    family, cfg, hf_model, _ = towers
    tower = VisionTower(cfg, family, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    load_hf_weights(tower, hf_model, cfg, family)
    grids = GRIDS[family][:2]
    pixels = random_pixels(grids, cfg)
    ref, ref_deep = hf_forward(hf_model, pixels, grids)
    out, deep = jax.jit(lambda t, x, i: t(x, i))(tower, pixels, build_vision_inputs(np.array(grids), cfg, family))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < 5e-2
    for d, r in zip(deep, ref_deep):
        assert rel_err(d, r) < 5e-2


def test_query_chunked_attention_equals_dense(towers):
    family, cfg, _, tower = towers
    grids = GRIDS[family]
    pad_to = bucket_patches(int(np.prod(np.asarray(grids), axis=1).sum()), 256)
    pixels = random_pixels(grids, cfg, pad_to=pad_to)
    inp = build_vision_inputs(np.array(grids), cfg, family, pad_patches_to=pad_to)
    chunked = VisionTower(cfg, family, rngs=nnx.Rngs(0), query_chunk=256)
    nnx.update(chunked, nnx.state(tower))
    run = jax.jit(lambda t, x, i: t(x, i))
    (dense, dense_deep), (out, deep) = run(tower, pixels, inp), run(chunked, pixels, inp)
    np.testing.assert_allclose(out, dense, rtol=1e-6, atol=1e-6)
    for d, r in zip(deep, dense_deep):
        np.testing.assert_allclose(d, r, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="query_chunk=256 must divide"):
        small = build_vision_inputs(np.array(grids[:1]), cfg, family, pad_patches_to=320)
        run(chunked, random_pixels(grids[:1], cfg, pad_to=320), small)


def test_sharded_forward_equals_single_device(towers):
    """Parameters sharded by their logical axes over a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices,
    activations constrained inside `activate`: same output as the unsharded run."""
    family, cfg, _, tower = towers
    grids = GRIDS[family][:2]
    pad_to = bucket_patches(int(np.prod(np.asarray(grids), axis=1).sum()))
    pixels = random_pixels(grids, cfg, pad_to=pad_to)
    inp = build_vision_inputs(np.array(grids), cfg, family, pad_patches_to=pad_to)
    forward = jax.jit(lambda g, s, x, i: nnx.merge(g, s)(x, i))
    graphdef, state = nnx.split(tower)
    ref, ref_deep = forward(graphdef, state, pixels, inp)

    mesh = sharding.make_mesh((2, 2, 2))
    sharded_state = jax.device_put(state, sharding.state_shardings(state, mesh))
    assert any(len(v.get_value().sharding.device_set) == 8 and not v.get_value().sharding.is_fully_replicated
               for _, v in nnx.to_flat_state(sharded_state))
    with sharding.activate(mesh):
        out, deep = forward(graphdef, sharded_state, pixels, inp)
    assert rel_err(out, ref) < 1e-5  # sharded matmuls sum in another order: float32 rounding only
    for d, r in zip(deep, ref_deep):
        assert rel_err(d, r) < 1e-5


def test_sincos_position_table_encodes_row_and_column():
    """Quarters: sin/cos of the row, then of the column; patches of one row share the row quarters."""
    from dig_jax.models.vision import sincos_position_table

    table = sincos_position_table(64, 32).reshape(8, 8, 32)  # side 8, 8 frequencies per quarter
    rows, cols = table[..., :16], table[..., 16:]
    np.testing.assert_allclose(rows, np.broadcast_to(rows[:, :1], rows.shape), atol=1e-7)  # same along a row
    np.testing.assert_allclose(cols, np.broadcast_to(cols[:1], cols.shape), atol=1e-7)  # same down a column
    np.testing.assert_allclose(table[3, 5, 0], np.sin(3 * np.pi / 16), rtol=1e-6)  # row 3, lowest frequency
    np.testing.assert_allclose(table[3, 5, 24], np.cos(5 * np.pi / 16), rtol=1e-6)  # column 5
    assert len({tuple(np.round(v, 5)) for v in table.reshape(64, 32)}) == 64  # every position distinct
    with pytest.raises(ValueError, match="square number"):
        sincos_position_table(48, 32)


def test_sincos_init_reaches_the_constructed_model():
    """The model constructor of the trainer starts the table from the sinusoid when the config asks."""
    from configs import demo_cpu
    from dig_jax import assemble
    from dig_jax.models.vision import sincos_position_table

    c = demo_cpu.get_config()
    preset = model_config.preset("qwen3_vl_tiny")
    cfg = dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, num_position_embeddings=64))
    table = np.asarray(assemble.model_constructor(c, cfg)().visual.pos_embed.weight.get_value())
    np.testing.assert_array_equal(table, sincos_position_table(64, cfg.vision.hidden_size))
    c.model.vision_position_init = "normal"  # HF's N(0, 0.02)
    plain = np.asarray(assemble.model_constructor(c, cfg)().visual.pos_embed.weight.get_value())
    assert abs(plain.std() - 0.02) < 0.005
