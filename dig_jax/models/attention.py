"""Softmax attention for both towers, with the kernel chosen by the config field `model.attention`.

One entry point, `attend`, computes grouped-query attention restricted by segment ids (and optionally
causal) for the decoder and the vision tower. The implementations agree on every real row:

  dense   the reference: the whole float32 score matrix [B, K, G, L, S] in XLA, exactly the math the
          towers used before this module existed (see `dense_attention`). Runs everywhere; its memory
          grows with L * S per head, which is what does not fit for Qwen3-VL 4B/8B training on TPU.
  splash  Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): blockwise
          online softmax, no score matrix in HBM, forward and backward kernels. TPU only, or the Pallas
          interpreter on CPU for tests (`interpret=True`). See `splash_attention`.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN flash attention. GPU only,
          bfloat16/float16 only. See `cudnn_attention`.
  auto    splash on TPU, cudnn on GPU, dense on CPU (`resolve_implementation`).

Conventions shared by all implementations:
  * q float[B, L, N, H], k and v float[B, S, K, H], one dtype (the compute dtype). N is a multiple of
    K; query head n uses key/value head n // G (G = N // K), the layout of a [B, L, K, G, H] reshape.
  * Scores are scaled by H^-0.5; softmax runs in float32; the output has q's dtype and shape.
  * Query i sees key j iff q_segment_ids[b, i] == kv_segment_ids[b, j] and, when causal, j <= i.
    Positions are slots 0..S-1 and query i sits in slot i (queries aligned to slots 0..L-1, as the
    decoder's prefill at cache_index 0; training and scoring calls have L == S). Segment ids are
    non-negative; padding is segment 0, so a padding row only sees padding, a real row never does.
  * Rows whose keys are all masked stay finite (dense: uniform over all keys; splash: uniform over the
    keys of the blocks it visits). Padding rows' outputs are don't-care: callers discard them, and a
    zero cotangent on them makes their contribution to every gradient zero.

Axis legend: B batch, L query length, S key length, N query heads, K key/value heads, G = N // K,
H head dim; Lp, Sp lengths padded to the splash block size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec as P

from dig_jax.sharding import DEFAULT_RULES, Rules, logical_to_spec

ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "dense", "splash", "cudnn")

_AUTO_BY_PLATFORM = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}

# Splash tiles: the kernel needs block sizes that are multiples of the 128 TPU lanes and divide the
# (padded) lengths. Lengths are padded to a multiple of 128 and the largest of these blocks dividing the
# padded length is used: 2048 -> 512, 784 -> 896 padded with 128 blocks (the least padding, not the
# largest block). 512 x 512 float32 score tiles fit every TPU generation's VMEM with room to spare.
_LANES = 128
_SPLASH_BLOCKS = (512, 256, 128)

# Global matmul precisions under which Mosaic compiles the splash kernels: "high" and "highest" ask for
# multi-pass bfloat16 / float32 contractions that its TPU matmul refuses ("Bad lhs type", "Unsupported dot
# precision") in the backward kernels, which are traced outside any context set around the call.
_MOSAIC_PRECISIONS = (None, "default", "bfloat16")

# Segment id of the slots the splash wrapper appends to reach a block multiple: real ids are >= 0, so
# appended keys are never seen by a real or padding row, and appended rows are sliced off the output.
_BLOCK_PAD_SEGMENT = -1


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           causal: bool, implementation: str, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
           logits_in_float32: bool = True, interpret: bool | None = None) -> jax.Array:
    """Segment-restricted (optionally causal) GQA attention; float[B, L, N, H] (see the module docstring).

    q float[B, L, N, H]; k, v float[B, S, K, H]; q_segment_ids int[B, L]; kv_segment_ids int[B, S].
    implementation: one of ATTENTION_IMPLEMENTATIONS (the config field `model.attention`).
    mesh, rules: the device mesh and logical-axis rules the activations are sharded with; splash runs
        per shard inside `jax.shard_map` (batch over the batch axes, heads over the head axis); dense and
        cudnn leave partitioning to XLA. With a mesh, "auto" looks at the mesh's devices (compile-only TPU
        devices count as TPU).
    logits_in_float32: dense only. True: q.k accumulated in float32 (the decoder). False: q.k in the
        compute dtype, then cast to float32 (the vision tower, as HF's eager ViT). Identical in float32.
    interpret: splash only; run the Pallas kernel in the interpreter. None: exactly when the platform is
        the CPU (so a model with `model.attention="splash"` runs the real kernel logic in CPU tests,
        slowly; on a GPU splash is refused).
    """
    _check_inputs(q, k, v, q_segment_ids, kv_segment_ids)
    platform = _platform(mesh)
    name = resolve_implementation(implementation, platform)
    if interpret is None:
        interpret = platform == "cpu"
    if name == "dense":
        return dense_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                               causal=causal, logits_in_float32=logits_in_float32)
    if name == "splash":
        return splash_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                causal=causal, mesh=mesh, rules=rules, interpret=interpret)
    return cudnn_attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)


def kernel_for(implementation: str, mesh: Mesh | None) -> str:
    """The concrete kernel `attend` runs for `implementation` on `mesh` (None: JAX's default backend).
    The towers ask first so that "dense" keeps their own exact code path (left-pad rows included)."""
    return resolve_implementation(implementation, _platform(mesh))


def resolve_implementation(implementation: str, platform: str) -> str:
    """The concrete kernel for `model.attention` on `platform` ("cpu", "gpu", "tpu"): resolves "auto" and
    refuses kernels the platform cannot run, naming the config field.

    splash on a non-TPU platform is allowed here because the Pallas interpreter runs it anywhere;
    `splash_attention` refuses it unless `interpret=True`.
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    if implementation == "auto":
        return _AUTO_BY_PLATFORM.get(platform, "dense")
    if implementation == "cudnn" and _AUTO_BY_PLATFORM.get(platform) != "cudnn":
        raise ValueError(f"model.attention='cudnn' needs a GPU, but the platform is {platform!r}; "
                         f"use 'auto', 'dense' or (on TPU) 'splash'")
    return implementation


def _platform(mesh: Mesh | None) -> str:
    """The platform the attention will be compiled for: the mesh's devices if given (so compile-only TPU
    devices count as TPU on a CPU host), else JAX's default backend."""
    if mesh is None:
        return jax.default_backend()
    return mesh.devices.flat[0].platform


def _check_inputs(q, k, v, q_segment_ids, kv_segment_ids) -> None:
    """Raises ValueError naming the argument whose shape or dtype does not fit the others."""
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q must be [B, L, N, H] and k, v equal [B, S, K, H]; got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    (b, l, n, h), (bk, s, kh, hk) = q.shape, k.shape
    if bk != b or hk != h:
        raise ValueError(f"attention: k/v {k.shape} must share q's {q.shape} batch and head dim")
    if n % kh:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kh} key/value heads")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v must share one compute dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_segment_ids.shape != (b, l) or kv_segment_ids.shape != (b, s):
        raise ValueError(f"attention: q_segment_ids {q_segment_ids.shape} must be {(b, l)} and kv_segment_ids "
                         f"{kv_segment_ids.shape} must be {(b, s)}")


def visibility(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, causal: bool) -> jax.Array:
    """bool[B, L, S]: query i sees key j (same segment, and j <= i when causal)."""
    visible = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]        # bool[B, L, S]
    if causal:
        l, s = q_segment_ids.shape[1], kv_segment_ids.shape[1]
        visible = visible & (jnp.arange(s)[None, :] <= jnp.arange(l)[:, None])[None]
    return visible


# ----------------------------------------------------------------------------------------------------
# dense
# ----------------------------------------------------------------------------------------------------

def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, causal: bool, logits_in_float32: bool = True) -> jax.Array:
    """The whole score matrix in XLA: the towers' original math, kept as the reference.

    Masked scores are finfo(float32).min, not -inf, so a fully masked row becomes uniform, not NaN.
    Probabilities are cast back to the compute dtype before the value product (as HF does).
    """
    b, l, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, l, kh, n // kh, h)                                      # [B, L, K, G, H]
    if logits_in_float32:
        scores = jnp.einsum("blkgh,bskh->bkgls", qg, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    else:
        scores = (jnp.einsum("blkgh,bskh->bkgls", qg, k) * jnp.asarray(h ** -0.5, q.dtype)).astype(jnp.float32)
    visible = visibility(q_segment_ids, kv_segment_ids, causal)               # bool[B, L, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)  # float32[B, K, G, L, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskh->blkgh", probs, v)                           # [B, L, K, G, H]
    return out.reshape(b, l, n, h)


# ----------------------------------------------------------------------------------------------------
# splash (TPU)
# ----------------------------------------------------------------------------------------------------

def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, causal: bool, mesh: Mesh | None = None,
                     rules: Rules = DEFAULT_RULES, interpret: bool = False) -> jax.Array:
    """Pallas splash attention, per shard of `mesh` when one is given.

    The kernel sees one sequence at a time (vmapped over the batch) with heads leading, so each shard
    transposes to [N, L, H], pads L and S to the block size (`_splash_block`; appended slots get their
    own segment, `_BLOCK_PAD_SEGMENT`), runs the kernel and slices the real rows back out. The scale is
    folded into q. Head dims below 128 (the ViTs' 64, 72, 80) need no padding: the kernel tiles the
    head dim as one full-width block, which Mosaic compiles for TPU (checked by the compile-only test).

    Under a mesh the batch is split over the mesh axes the rules give "batch" (data, fsdp) and the
    heads over those of "heads" (tensor), each only where it divides; heads stay whole unless both N
    and K divide, since a shard must hold every query head of its key/value heads.

    On TPU the global matmul precision must stay at its default (`_MOSAIC_PRECISIONS`); the interpreter
    honours any precision, which the float32 CPU tests rely on.
    """
    platform = _platform(mesh)
    if platform != "tpu" and not interpret:
        raise ValueError(f"model.attention='splash' runs a Pallas TPU kernel, but the platform is {platform!r} "
                         f"(interpret=True runs it in the Pallas interpreter, for tests)")
    precision = jax.config.jax_default_matmul_precision
    if not interpret and precision not in _MOSAIC_PRECISIONS:
        raise ValueError(f"model.attention='splash': jax_default_matmul_precision={precision!r} makes Mosaic refuse "
                         f"the backward kernels' matmuls; leave it at the default on TPU")
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    if mesh is None:
        return local(q, k, v, q_segment_ids, kv_segment_ids)
    b, _, n, _ = q.shape
    batch = _dividing_axes(_mesh_axes("batch", rules, mesh), mesh, b)
    heads = _dividing_axes(_mesh_axes("heads", rules, mesh), mesh, n, k.shape[2])
    qkv_spec, seg_spec = P(batch or None, None, heads or None, None), P(batch or None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,) * 2, out_specs=qkv_spec,
                         check_vma=False)(q, k, v, q_segment_ids, kv_segment_ids)


def _splash_local(q, k, v, q_segment_ids, kv_segment_ids, *, causal: bool, interpret: bool) -> jax.Array:
    """Splash attention on unsharded (or per-shard) arrays; same contract as `dense_attention`."""
    (b, l, n, h), (s, kh) = q.shape, k.shape[1:3]
    lp, sp = _padded_length(l), _padded_length(s)
    q = _pad_axis(q * jnp.asarray(h ** -0.5, q.dtype), 1, lp, 0).transpose(0, 2, 1, 3)  # [B, N, Lp, H]
    k, v = (_pad_axis(x, 1, sp, 0).transpose(0, 2, 1, 3) for x in (k, v))            # [B, K, Sp, H]
    segments = splash.SegmentIds(q=_pad_axis(q_segment_ids.astype(jnp.int32), 1, lp, _BLOCK_PAD_SEGMENT),
                                 kv=_pad_axis(kv_segment_ids.astype(jnp.int32), 1, sp, _BLOCK_PAD_SEGMENT))
    kernel = _splash_kernel(n, kh, lp, sp, causal, interpret)
    if kh == 1:  # multi-query: the kernel takes the single key/value head unbatched over heads
        k, v = k[:, 0], v[:, 0]                                                        # [B, Sp, H]
    out = jax.vmap(kernel)(q, k, v, segments)                                          # [B, N, Lp, H]
    return out.transpose(0, 2, 1, 3)[:, :l]                                            # [B, L, N, H]


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, kv_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    """The splash kernel for one (padded) shape; cached because building its block masks is host work
    repeated for every layer otherwise. The static mask is causal (top-left aligned) or full; segment
    ids are applied on top of it inside the kernel. Built under `ensure_compile_time_eval`: the first
    call may come from inside a trace (a scanned layer), and the cached kernel's mask arrays must be
    concrete, not that trace's tracers."""
    with jax.ensure_compile_time_eval():
        return _build_splash_kernel(heads, kv_heads, q_len, kv_len, causal, interpret)


def _build_splash_kernel(heads: int, kv_heads: int, q_len: int, kv_len: int, causal: bool, interpret: bool):
    shape = (q_len, kv_len)
    head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    mask = splash.MultiHeadMask([head_mask] * heads)
    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                               block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                               block_q_dq=bq, block_kv_dq=bkv)
    make = splash.make_splash_mqa if kv_heads == 1 else splash.make_splash_mha
    return make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _padded_length(length: int) -> int:
    """`length` rounded up to the 128-lane multiple the splash blocks tile."""
    return -(-length // _LANES) * _LANES


def _splash_block(padded: int) -> int:
    """The largest of `_SPLASH_BLOCKS` that divides a padded length (always at least 128)."""
    return next(block for block in _SPLASH_BLOCKS if padded % block == 0)


def _pad_axis(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    """x padded at the end of `axis` to `size` with `value`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _mesh_axes(logical: str, rules: Rules, mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the rules map a logical axis onto."""
    entry = logical_to_spec((logical,), rules, mesh)[0]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing_axes(axes: tuple[str, ...], mesh: Mesh, *dims: int) -> tuple[str, ...]:
    """The leading `axes` whose combined size divides every one of `dims` (a shard_map needs whole shards)."""
    kept, size = [], 1
    for axis in axes:
        if any(dim % (size * mesh.shape[axis]) for dim in dims):
            break
        kept.append(axis)
        size *= mesh.shape[axis]
    return tuple(kept)


# ----------------------------------------------------------------------------------------------------
# cudnn (GPU)
# ----------------------------------------------------------------------------------------------------

def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array,
                    kv_segment_ids: jax.Array, causal: bool, backend: str = "cudnn") -> jax.Array:
    """`jax.nn.dot_product_attention` with this module's conventions.

    It takes the [B, L, N, H] / [B, S, K, H] layout and the same GQA head grouping as is; segments go in
    as a boolean mask [B, 1, L, S] (cuDNN turns it into an additive bias), causality as `is_causal`
    (top-left aligned in both XLA and cuDNN, i.e. query i sits in slot i), the scale explicitly.
    `backend="xla"` runs the same call through XLA, which is how CPU tests check these conventions.
    cuDNN accepts only bfloat16/float16 inputs.
    """
    if backend == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention='cudnn' needs bfloat16 or float16 activations, got {q.dtype}")
    same_segment = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]  # bool[B, 1, L, S]
    return jax.nn.dot_product_attention(q, k, v, mask=same_segment, scale=q.shape[-1] ** -0.5,
                                        is_causal=causal, implementation=backend)
