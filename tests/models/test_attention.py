"""The attention kernels of `dig_jax.models.attention` against the dense reference (and dense against a
float64 numpy oracle and the towers' own code).

Only real rows are compared: padding rows' outputs are don't-care (callers discard them), and the
gradient tests put a zero cotangent on them so that they contribute nothing to any gradient, as in the
models, where padding positions carry no loss. Splash runs in the Pallas interpreter on CPU; the cuDNN
wrapper runs through XLA (`backend="xla"`), which checks its mask, GQA layout and scale conventions.
The last test compiles splash for a compile-only TPU topology and needs libtpu.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.models import attention
from dig_jax.models.attention import (ATTENTION_IMPLEMENTATIONS, attend, cudnn_attention, dense_attention,
                                      resolve_implementation, splash_attention)
from dig_jax.models.vision import segment_attention
from dig_jax.sharding import make_mesh

TOL = dict(rtol=2e-5, atol=2e-5)


def _decoder_case(seed=0):
    """Causal GQA (N=4, K=2), left padding of different lengths per row, L = S = 300 (padded to 384 =
    three 128-blocks by splash)."""
    rng = np.random.default_rng(seed)
    b, l, n, k, h = 3, 300, 4, 2, 16
    segments = np.ones((b, l), np.int32)
    for row, pad in enumerate((0, 37, 150)):
        segments[row, :pad] = 0
    q = rng.normal(size=(b, l, n, h)).astype(np.float32)
    kv = rng.normal(size=(2, b, l, k, h)).astype(np.float32)
    return dict(q=q, k=kv[0], v=kv[1], segments=segments, causal=True)


def _vision_case(seed=1):
    """Non-causal MHA over block-diagonal segments (three images / windows of unequal size) then
    padding rows (segment 0), L = S = 260 (padded to 384 by splash)."""
    rng = np.random.default_rng(seed)
    l, n, h = 260, 2, 16
    segments = np.repeat(np.array([1, 2, 3, 0], np.int32), (100, 64, 80, 16))[None]
    q, k, v = (rng.normal(size=(1, l, n, h)).astype(np.float32) for _ in range(3))
    return dict(q=q, k=k, v=v, segments=segments, causal=False)


CASES = {"decoder": _decoder_case, "vision": _vision_case}


def _numpy_reference(q, k, v, segments, causal):
    """float64 attention written from the definition, one head at a time."""
    b, l, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros((b, l, n, h))
    for row in range(b):
        visible = segments[row][:, None] == segments[row][None, :]
        if causal:
            visible &= np.tril(np.ones((l, l), bool))
        for head in range(n):
            scores = q[row, :, head].astype(np.float64) @ k[row, :, head // group].T.astype(np.float64) / np.sqrt(h)
            scores = np.where(visible, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[row, :, head] = (probs / probs.sum(-1, keepdims=True)) @ v[row, :, head // group]
    return out


def _value_and_grads(fn, case):
    """The output and d/d(q, k, v) of sum(out * cotangent) with a zero cotangent on padding rows."""
    segments = jnp.asarray(case["segments"])
    real = (segments > 0)[:, :, None, None]
    cotangent = jnp.asarray(np.random.default_rng(7).normal(size=case["q"].shape), jnp.float32) * real

    def loss(q, k, v):
        out = fn(q, k, v, q_segment_ids=segments, kv_segment_ids=segments, causal=case["causal"])
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(case[x]) for x in ("q", "k", "v")))
    return out, grads


def _assert_parity(fn, case):
    out, grads = _value_and_grads(fn, case)
    ref_out, ref_grads = _value_and_grads(dense_attention, case)
    real = case["segments"] > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], **TOL)
    for name, got, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), err_msg=f"d/d{name}", **TOL)


# ----------------------------------------------------------------------------------------------------
# dense: the reference itself
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_dense_matches_float64_reference(case):
    c = CASES[case]()
    segments = jnp.asarray(c["segments"])
    out = dense_attention(*(jnp.asarray(c[x]) for x in "qkv"), q_segment_ids=segments, kv_segment_ids=segments,
                          causal=c["causal"])
    ref = _numpy_reference(c["q"], c["k"], c["v"], c["segments"], c["causal"])
    real = c["segments"] > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], **TOL)
    assert np.isfinite(np.asarray(out)).all()


def test_dense_bfloat16_equals_the_vision_towers_attention():
    """With logits in the compute dtype, dense is bit-identical to the ViT's `segment_attention`."""
    c = _vision_case()
    q, k, v = (jnp.asarray(c[x][0], jnp.bfloat16) for x in "qkv")             # [L, N, H]
    segments = jnp.asarray(c["segments"][0])
    expected = segment_attention(q, k, v, segments)
    got = dense_attention(q[None], k[None], v[None], q_segment_ids=segments[None], kv_segment_ids=segments[None],
                          causal=False, logits_in_float32=False)[0]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))


def test_fully_masked_rows_stay_finite():
    """A query whose segment appears among no key still gets a finite (uniform) row."""
    c = _decoder_case()
    q, k, v = (jnp.asarray(c[x]) for x in "qkv")
    q_segments = jnp.full(c["segments"].shape, 5, jnp.int32)
    out = dense_attention(q, k, v, q_segment_ids=q_segments, kv_segment_ids=jnp.asarray(c["segments"]), causal=True)
    assert np.isfinite(np.asarray(out)).all()


# ----------------------------------------------------------------------------------------------------
# splash (Pallas interpreter) and the cuDNN wrapper (through XLA)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_splash_matches_dense_forward_and_gradients(case):
    _assert_parity(lambda *a, **kw: splash_attention(*a, interpret=True, **kw), CASES[case]())


def test_splash_multi_query_matches_dense():
    """K = 1 goes through the kernel's multi-query variant."""
    c = _decoder_case()
    c["k"], c["v"] = c["k"][:, :, :1], c["v"][:, :, :1]
    _assert_parity(lambda *a, **kw: splash_attention(*a, interpret=True, **kw), c)


def test_splash_under_a_mesh_matches_dense():
    """Per-shard splash inside shard_map: batch 4 over data x fsdp (2 x 2), heads over tensor (2)."""
    c = _decoder_case()
    c = {**c, **{x: np.concatenate([c[x], c[x][:1]]) for x in ("q", "k", "v", "segments")}}
    mesh = make_mesh((2, 2, 2))
    _assert_parity(lambda *a, **kw: attend(*a, implementation="splash", mesh=mesh, interpret=True, **kw), c)


@pytest.mark.parametrize("case", CASES)
def test_cudnn_wrapper_through_xla_matches_dense(case):
    _assert_parity(lambda *a, **kw: cudnn_attention(*a, backend="xla", **kw), CASES[case]())


# ----------------------------------------------------------------------------------------------------
# Choosing an implementation
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("platform, expected", [("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "dense")])
def test_auto_picks_the_platforms_kernel(platform, expected):
    assert resolve_implementation("auto", platform) == expected


def test_auto_on_this_cpu_host_is_dense():
    c = _vision_case()
    segments = jnp.asarray(c["segments"])
    args = [jnp.asarray(c[x]) for x in "qkv"]
    kw = dict(q_segment_ids=segments, kv_segment_ids=segments, causal=False)
    np.testing.assert_array_equal(np.asarray(attend(*args, implementation="auto", **kw)),
                                  np.asarray(dense_attention(*args, **kw)))


def test_unknown_implementation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="model.attention='flash'.*'auto', 'dense', 'splash', 'cudnn'"):
        resolve_implementation("flash", "cpu")
    assert ATTENTION_IMPLEMENTATIONS == ("auto", "dense", "splash", "cudnn")


def test_cudnn_without_a_gpu_is_refused():
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU"):
        resolve_implementation("cudnn", "cpu")


def test_cudnn_refuses_float32():
    c = _vision_case()
    segments = jnp.asarray(c["segments"])
    with pytest.raises(ValueError, match="model.attention='cudnn' needs bfloat16 or float16"):
        cudnn_attention(*(jnp.asarray(c[x]) for x in "qkv"), q_segment_ids=segments, kv_segment_ids=segments,
                        causal=False)


def test_splash_off_tpu_needs_the_interpreter():
    """On the CPU `attend` interprets the kernel by default; asked not to, it refuses, naming the field."""
    c = _vision_case()
    segments = jnp.asarray(c["segments"])
    with pytest.raises(ValueError, match="model.attention='splash' runs a Pallas TPU kernel"):
        attend(*(jnp.asarray(c[x]) for x in "qkv"), q_segment_ids=segments, kv_segment_ids=segments, causal=False,
               implementation="splash", interpret=False)


@pytest.mark.parametrize("shapes, match", [
    (((1, 8, 3, 4), (1, 8, 2, 4), (1, 8), (1, 8)), "3 query heads are not a multiple of 2"),
    (((1, 8, 4, 4), (1, 8, 2, 4), (1, 7), (1, 8)), "q_segment_ids"),
    (((1, 8, 4, 4), (2, 8, 2, 4), (1, 8), (2, 8)), "batch and head dim"),
])
def test_bad_shapes_name_the_culprit(shapes, match):
    q, k, q_seg, kv_seg = (jnp.zeros(s, jnp.int32 if len(s) == 2 else jnp.float32) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attend(q, k, k, q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=True, implementation="dense")


@pytest.mark.parametrize("length, padded, block", [(300, 384, 128), (784, 896, 128), (1024, 1024, 512),
                                                   (2048, 2048, 512), (640, 640, 128), (768, 768, 256)])
def test_splash_block_sizes(length, padded, block):
    assert attention._padded_length(length) == padded
    assert attention._splash_block(padded) == block


# ----------------------------------------------------------------------------------------------------
# Compile-only TPU (needs libtpu)
# ----------------------------------------------------------------------------------------------------

def _tpu_mesh():
    """A v5e:2x2 compile-only topology (4 chips) as a mesh with the batch over `data`."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed: the compile-only TPU topology needs it (jax[tpu])")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # another process may hold libtpu
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets libtpu's host probing
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental.topologies import get_topology_desc

    topology = get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                 chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))
    return make_mesh((4, 1, 1), devices=topology.devices)


def _compile_train_step(implementation, mesh, b, l, n, k, h, causal, precision="default"):
    """Compiles forward + backward (d/d q, k, v) of attention for the TPU mesh; returns temp bytes/chip."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    batch = NamedSharding(mesh, P("data"))

    def loss(q, k_, v, segments):
        out = attend(q, k_, v, q_segment_ids=segments, kv_segment_ids=segments, causal=causal,
                     implementation=implementation, mesh=mesh)
        return jnp.sum(out.astype(jnp.float32))

    args = (jax.ShapeDtypeStruct((b, l, n, h), jnp.bfloat16, sharding=batch),
            *(jax.ShapeDtypeStruct((b, l, k, h), jnp.bfloat16, sharding=batch) for _ in range(2)),
            jax.ShapeDtypeStruct((b, l), jnp.int32, sharding=batch))
    # The suite's "highest" precision would make Mosaic refuse the kernels; the trainer uses the default.
    with jax.default_matmul_precision(precision):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_splash_compiles_for_tpu_and_needs_far_less_memory_than_dense():
    """Decoder shape of Qwen3-VL 4B/8B (N=32, K=8, H=128) at L=2048, one row per chip: the dense score
    matrix alone is float32[1, 32, 2048, 2048] = 512 MiB per chip, splash keeps no score matrix."""
    mesh = _tpu_mesh()
    assert resolve_implementation("auto", attention._platform(mesh)) == "splash"
    shape = dict(b=4, l=2048, n=32, k=8, h=128, causal=True)
    splash_temp = _compile_train_step("splash", mesh, **shape)
    dense_temp = _compile_train_step("dense", mesh, **shape)
    print(f"per-chip temp bytes, fwd+bwd, {shape}: splash {splash_temp:,}  dense {dense_temp:,}")
    assert splash_temp < dense_temp
    score_matrix_bytes = 1 * 32 * 2048 * 2048 * 4  # float32 scores of the chip's one row
    assert dense_temp >= score_matrix_bytes > 8 * splash_temp


@pytest.mark.parametrize("head_dim", [64, 72, 80])
def test_splash_compiles_for_tpu_with_vision_head_dims(head_dim):
    """The ViTs' head dims (Qwen3-VL 4B: 64, 8B: 72, Qwen2.5-VL: 80) compile without padding to 128."""
    mesh = _tpu_mesh()
    temp = _compile_train_step("splash", mesh, b=4, l=784, n=16, k=16, h=head_dim, causal=False)
    print(f"vision splash head_dim={head_dim}: temp bytes {temp:,}")


def test_splash_for_tpu_refuses_a_precision_mosaic_cannot_compile():
    """At "highest" matmul precision the TPU backward kernels cannot compile: a clear error, not Mosaic's."""
    mesh = _tpu_mesh()
    with pytest.raises(ValueError, match="jax_default_matmul_precision='highest'"):
        _compile_train_step("splash", mesh, b=4, l=256, n=4, k=2, h=128, causal=True, precision="highest")
