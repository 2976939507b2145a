"""The vision towers of Qwen2.5-VL and Qwen3-VL (ViT + patch merger) in Flax NNX.

Numerics follow Hugging Face transformers 5.24 (`Qwen2_5_VisionTransformerPretrainedModel`,
`Qwen3VLVisionModel`) and are tested against it. Where parity usually breaks: the patch mergers use
exact-erf GELU, the Qwen3-VL ViT MLP tanh GELU (`gelu_pytorch_tanh`), the Qwen2.5-VL ViT MLP SwiGLU with
biases; Qwen2.5-VL blocks use RMSNorm, Qwen3-VL blocks LayerNorm with bias (eps 1e-6 in both); the
Qwen2.5-VL window permutation applies to the hidden states and the rotary tables, in 4-patch units, and is
undone after the merger; its full-attention blocks are block-diagonal per frame, not global.
All grid-dependent index arithmetic (window permutation, segment ids, rotary positions, position-embedding
taps) arrives precomputed in `VisionInputs` (host-side numpy, `vision_inputs.py`), so the forward pass has
static shapes: one compilation per padded patch count N, whatever the mix of image sizes.

Attention is dense and masked by segment ids (one segment per attention window or per frame), which is
exactly HF's per-segment loop: a query never sees a key of another segment. Padding rows (segment 0)
attend only to each other, so they stay finite and never touch a real row.

The ViT blocks are one stacked module (`blocks`, parameters float[depth, ...]) run by one `lax.scan`
(`dig_jax.models.layers.scan_layers`). What differs per block is a scanned input: Qwen2.5-VL's
full-attention flag (frame segments instead of window segments) and Qwen3-VL's DeepStack tap slot (the
hidden state after a tapped block is written into a small float[J, N, D] carry, so no other block's
output is kept).

Sharding: with `attention_block` (every image the same number of patches), the patch axis is sharded by
whole images over the batch mesh axes ("batch" on the image axis of the [N/blk, blk, ...] view), so each
device runs the ViT and holds the float32[images, A, blk, blk] attention logits of its own images only.

Axis legend: N patches (padded), M = N/4 merged tokens, D vision width, F ViT feed-forward width,
E = 4D merged width, O out_hidden_size (= the LLM width), A attention heads, H head dim, R patch row
length C*T*patch*patch (1176 for Qwen2.5-VL, 1536 for Qwen3-VL), J DeepStack taps, blk patches per
attention block (one image).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dig_jax.models.attention import attend, kernel_for
from dig_jax.models.config import FAMILIES, VisionConfig
from dig_jax.models.layers import (Dense, HFParam, LayerNorm, RMSNorm, SwiGLU, apply_rotary, check_remat, hf_param,
                                   hf_stacked_param, param, scan_layers, stack_layers)
from dig_jax.models.vision_inputs import VisionInputs
from dig_jax.sharding import active as active_sharding, constrain

QWEN25, QWEN3 = "qwen2_5_vl", "qwen3_vl"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"vision family {family!r} is not one of {FAMILIES}")


def _norm(cfg: VisionConfig, family: str, dim: int, rngs: nnx.Rngs, param_dtype) -> nnx.Module:
    """Qwen2.5-VL: RMSNorm without bias; Qwen3-VL: LayerNorm with bias. Both eps 1e-6 (cfg.norm_eps)."""
    cls = RMSNorm if family == QWEN25 else LayerNorm
    return cls(dim, eps=cfg.norm_eps, rngs=rngs, param_dtype=param_dtype)


class PatchEmbed(nnx.Module):
    """The Conv3d patch embedding as a Dense over flattened patch rows (stride = kernel, so identical).

    kernel float[R, D] = torch_weight.reshape(D, R).T; the row layout is (C, T, patch_h, patch_w).
    Qwen3-VL has a bias, Qwen2.5-VL none.
    """

    def __init__(self, cfg: VisionConfig, family: str, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = Dense(cfg.patch_dim, cfg.hidden_size, use_bias=family == QWEN3, logical_axes=(None, "embed"),
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.proj(pixel_values)  # float[N, D]


class LearnedPositions(nnx.Module):
    """Qwen3-VL's learned absolute position table float[side*side, D], resampled per image by 4 taps.

    The taps and weights (bilinear, align_corners=True) come from `VisionInputs`; the sum is done in
    float32 like HF (`(embedding(idx) * w[..., None]).sum(1)`), and the caller casts to the compute dtype.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, param_dtype):
        self.weight = param(rngs, nnx.initializers.normal(0.02), (cfg.num_position_embeddings, cfg.hidden_size),
                            param_dtype, (None, "embed"))

    def __call__(self, index: jax.Array, weight: jax.Array) -> jax.Array:
        table = self.weight.get_value().astype(jnp.float32)
        taps = jnp.take(table, index, axis=0)  # float32[N, 4, D]
        return jnp.einsum("ntd,nt->nd", taps, weight.astype(jnp.float32))  # float32[N, D]


def sincos_position_table(num_positions: int, dim: int) -> np.ndarray:
    """A 2-D sinusoidal start for `LearnedPositions` (float32[side*side, dim], row-major like the table).

    Why: HF initialises the table N(0, 0.02). A pretrained tower has learned absolute positions, but a
    randomly initialised tiny one then carries almost none in its patch features (the patch embedding
    is ~40x larger), so a model trained from scratch to output box coordinates first has to grow them
    from a tiny signal. Measured on the CPU demo's model (one square on a black image, 1000 supervised
    steps): held-out F1@0.5 0.27 from the N(0, 0.02) table, 0.75 from a 2-D sinusoid (an earlier variant
    of this table: frequencies up to pi/2, each used twice). Only an initialisation: the table stays a
    trained parameter and the checkpoint layout is unchanged.

    Quarters of `dim`: sin(row * w_k), cos(row * w_k), sin(col * w_k), cos(col * w_k) with
    w_k = pi * (k + 1) / (2 * side), k < dim / 4 (the highest frequency reaches pi, the Nyquist limit of
    integer positions, when dim / 4 = 2 * side).
    """
    side = int(round(num_positions ** 0.5))
    if side * side != num_positions or dim % 4:
        raise ValueError(f"sincos_position_table needs a square number of positions and dim % 4 == 0, got "
                         f"{num_positions} x {dim}")
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    freqs = np.pi * (np.arange(dim // 4) + 1) / (2 * side)  # [dim/4]
    r = rows.reshape(-1, 1) * freqs  # [side*side, dim/4]
    c = cols.reshape(-1, 1) * freqs
    return np.concatenate([np.sin(r), np.cos(r), np.sin(c), np.cos(c)], axis=1).astype(np.float32)


def rotary_cos_sin(rotary_pos: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D axial rotary tables float32[N, H] for integer (row, col) positions int[N, 2].

    H/4 frequencies `1/theta^(2i/(H/2))`; angles = concat(row * f, col * f) (H/2 entries), duplicated to H
    for the rotate-half convention over the full head dim.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / np.float32(half)))
    angles = rotary_pos.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)  # float32[N, 2, H/4]
    angles = angles.reshape(angles.shape[0], half)  # (row freqs, col freqs)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
    """Non-causal multi-head self-attention restricted to segments, with 2D rotary on q and k.

    qkv kernel float[D, 3D] whose output columns are [q; k; v], each head-major (A, H) as in HF.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, query_chunk: int | None = None,
                 attention_block: int | None = None, attention: str = "dense"):
        d = cfg.hidden_size
        self.num_heads, self.head_dim, self.dtype, self.query_chunk = cfg.num_heads, cfg.head_dim, dtype, query_chunk
        self.attention_block, self.attention = attention_block, attention
        self.qkv = Dense(d, 3 * d, use_bias=True, logical_axes=("embed", "heads"), rngs=rngs, dtype=dtype,
                         param_dtype=param_dtype)
        self.proj = Dense(d, d, use_bias=True, logical_axes=("heads", "embed"), rngs=rngs, dtype=dtype,
                          param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)  # float[N, 3, A, H]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # Rotary in float32, then back to the compute dtype (HF apply_rotary_pos_emb_vision).
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(self.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(self.dtype)
        mesh, rules = active_sharding()
        if kernel_for(self.attention, mesh) == "dense":
            out = segment_attention(q, k, v, segment_ids, query_chunk=self.query_chunk,
                                    attention_block=self.attention_block)  # float[N, A, H]
        else:
            out = kernel_segment_attention(q, k, v, segment_ids, self.attention_block, self.attention, mesh, rules)
        return self.proj(out.reshape(n, self.num_heads * self.head_dim))


def kernel_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                             attention_block: int | None, implementation: str, mesh, rules) -> jax.Array:
    """`segment_attention` through a kernel of `dig_jax.models.attention` (splash on TPU, cuDNN on GPU).

    With `attention_block` the images are the kernel's batch (float[N/blk, blk, A, H], sharded by image
    like the rest of the tower), so no block pairs two images; otherwise all N patches are one sequence
    whose segments keep the images and windows apart.
    """
    n, a, h = q.shape
    blk = attention_block if attention_block is not None and attention_block < n else n
    if n % blk:
        raise ValueError(f"VisionTower attention_block={attention_block} must divide the padded patch count {n}")
    qb, kb, vb = (constrain(x.reshape(n // blk, blk, a, h), ("batch", "patches", "heads", None)) for x in (q, k, v))
    seg = segment_ids.reshape(n // blk, blk)  # int[N/blk, blk]
    out = attend(qb, kb, vb, q_segment_ids=seg, kv_segment_ids=seg, causal=False, implementation=implementation,
                 mesh=mesh, rules=rules, logits_in_float32=False)  # float[N/blk, blk, A, H]
    return out.reshape(n, a, h)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
                      query_chunk: int | None = None, attention_block: int | None = None) -> jax.Array:
    """Softmax attention of q, k, v float[N, A, H] where query i sees key j iff their segment ids match.

    Matches HF's eager path: logits in the compute dtype scaled by H^-0.5, softmax in float32, cast back.
    Padding rows (segment 0) only see each other, so every row has at least one key and stays finite.
    `query_chunk` bounds the float32[A, chunk, N] logits by looping over query blocks (`lax.map`);
    each row's result is the same as the dense computation. It must divide N.

    `attention_block` is the fast path for batches of equally sized images: attention is computed inside
    consecutive blocks of that many patches (float32[N/blk, A, blk, blk] logits instead of [A, N, N]).
    It is exact when no segment crosses a block boundary, which holds when every image has exactly
    `attention_block` patches (windows never cross images); `check_block_aligned` verifies it on the host.
    """
    n, _, h = q.shape
    scale = jnp.asarray(h ** -0.5, q.dtype)
    if attention_block is not None and attention_block < n:
        if n % attention_block:
            raise ValueError(f"VisionTower attention_block={attention_block} must divide the padded patch count {n}")
        nb = n // attention_block
        qb, kb, vb = (constrain(x.reshape(nb, attention_block, *x.shape[1:]), ("batch", "patches", "heads", None))
                      for x in (q, k, v))  # float[nb, blk, A, H], whole images per device
        seg = segment_ids.reshape(nb, attention_block)
        logits = jnp.einsum("bqah,bkah->baqk", qb, kb) * scale  # float[nb, A, blk, blk]
        logits = constrain(logits, ("batch", "heads", None, None))
        same = (seg[:, :, None] == seg[:, None, :])[:, None]  # bool[nb, 1, blk, blk]
        logits = jnp.where(same, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("baqk,bkah->bqah", probs, vb).reshape(q.shape)

    def attend(q_blk: jax.Array, seg_blk: jax.Array) -> jax.Array:
        logits = jnp.einsum("qah,kah->aqk", q_blk, k) * scale  # float[A, Q, N]
        same = seg_blk[:, None] == segment_ids[None, :]  # bool[Q, N]
        logits = jnp.where(same[None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("aqk,kah->qah", probs, v)  # float[Q, A, H]

    if query_chunk is None or query_chunk >= n:
        return attend(q, segment_ids)
    if n % query_chunk:
        raise ValueError(f"VisionTower query_chunk={query_chunk} must divide the padded patch count {n} "
                         f"(bucket patches to a multiple of it)")
    blocks = (q.reshape(n // query_chunk, query_chunk, *q.shape[1:]), segment_ids.reshape(n // query_chunk, -1))
    return jax.lax.map(lambda b: attend(*b), blocks).reshape(q.shape)


class GeluMLP(nnx.Module):
    """Qwen3-VL ViT MLP: fc2(gelu_tanh(fc1(x))), with bias (HF `gelu_pytorch_tanh`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_fc1 = Dense(d, f, logical_axes=("embed", "mlp"), **kw)
        self.linear_fc2 = Dense(f, d, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=True))


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, family: str, *, rngs: nnx.Rngs, dtype, param_dtype,
                 query_chunk: int | None = None, attention_block: int | None = None, attention: str = "dense"):
        self.norm1 = _norm(cfg, family, cfg.hidden_size, rngs, param_dtype)
        self.norm2 = _norm(cfg, family, cfg.hidden_size, rngs, param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype, query_chunk=query_chunk,
                                    attention_block=attention_block, attention=attention)
        if family == QWEN25:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=True, rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)
        else:
            self.mlp = GeluMLP(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segment_ids)
        return x + self.mlp(self.norm2(x))


class Qwen25PatchMerger(nnx.Module):
    """ln_q = RMSNorm(D) per patch -> view float[M, E] (2x2 blocks) -> mlp_0 -> GELU(erf) -> mlp_2."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        e = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.merged_dim = e
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, rngs=rngs, param_dtype=param_dtype)
        self.mlp_0 = Dense(e, e, logical_axes=("embed", "mlp"), **kw)
        self.mlp_2 = Dense(e, cfg.out_hidden_size, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.merged_dim)  # float[M, E]
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))  # float[M, O]


class Qwen3PatchMerger(nnx.Module):
    """LayerNorm then fc1 -> GELU(erf) -> fc2. The main merger normalises each patch (D) before the 2x2
    shuffle; the DeepStack mergers (`postshuffle_norm`) normalise the shuffled float[M, E] rows."""

    def __init__(self, cfg: VisionConfig, *, postshuffle_norm: bool, rngs: nnx.Rngs, dtype, param_dtype):
        e = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.merged_dim, self.postshuffle_norm = e, postshuffle_norm
        kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(e if postshuffle_norm else cfg.hidden_size, eps=cfg.norm_eps, rngs=rngs,
                              param_dtype=param_dtype)
        self.linear_fc1 = Dense(e, e, logical_axes=("embed", "mlp"), **kw)
        self.linear_fc2 = Dense(e, cfg.out_hidden_size, logical_axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.merged_dim))
        else:
            x = self.norm(x).reshape(-1, self.merged_dim)  # float[M, E]
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=False))  # float[M, O]


class VisionTower(nnx.Module):
    """Patch embed (+ learned positions, Qwen3) -> [window permutation, 2.5] -> ViT blocks with segment
    attention (+ DeepStack mergers, Qwen3) -> patch merger -> [un-permutation, 2.5].

    `dtype` is the compute dtype; rotary, softmax and norm statistics stay in float32 as in HF.
    `query_chunk` (None = dense) bounds attention memory to float32[A, query_chunk, N] per block; it must
    divide the padded patch count (see `segment_attention`). `attention_block`: per-image attention and
    image-sharded activations (module docstring). `remat` ("none" | "full" | "dots") rematerialises each
    scanned block (see `dig_jax.models.layers`). `attention` picks the kernel
    (`dig_jax.models.attention.ATTENTION_IMPLEMENTATIONS`; "dense" is `segment_attention`).
    """

    def __init__(self, cfg: VisionConfig, family: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, query_chunk: int | None = None, attention_block: int | None = None,
                 remat: str = "none", attention: str = "dense"):
        _check_family(family)
        check_remat(remat)
        self.cfg, self.family, self.dtype = cfg, family, dtype
        self.attention_block, self.remat = attention_block, remat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = PatchEmbed(cfg, family, **kw)
        if family == QWEN3:
            self.pos_embed = LearnedPositions(cfg, rngs=rngs, param_dtype=param_dtype)
        self.blocks = stack_layers(lambda r: VisionBlock(cfg, family, query_chunk=query_chunk,
                                                         attention_block=attention_block, attention=attention,
                                                         rngs=r, dtype=dtype, param_dtype=param_dtype),
                                   cfg.depth, rngs)
        if family == QWEN25:
            self.merger = Qwen25PatchMerger(cfg, **kw)
        else:
            self.merger = Qwen3PatchMerger(cfg, postshuffle_norm=False, **kw)
            self.deepstack_merger_list = nnx.List([Qwen3PatchMerger(cfg, postshuffle_norm=True, **kw)
                                                   for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values: jax.Array, inputs: VisionInputs) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """pixel_values float[N, R] in HF pixel (merge-block) order, padding rows last (zeros).

        Returns image_embeds float[M, O] in HF's final order (per image, raster over (t, h/2, w/2); padding
        rows last) and the DeepStack features (Qwen3: one float[M, O] per entry of
        deepstack_visual_indexes, ordered by block index as HF; Qwen2.5: ()).
        """
        cfg, unit = self.cfg, self.cfg.spatial_merge_size ** 2
        n = pixel_values.shape[0]
        if n % unit or n != inputs.segment_ids.shape[0]:
            raise ValueError(f"pixel_values has {n} rows but VisionInputs was built for {inputs.segment_ids.shape[0]} "
                             f"patches (must match and be a multiple of {unit})")
        x = self.patch_embed(pixel_values)  # float[N, D]
        if self.family == QWEN3:
            x = x + self.pos_embed(inputs.pos_embed_index, inputs.pos_embed_weight).astype(x.dtype)
        else:  # gather whole 2x2 blocks so every attention window is contiguous
            x = jnp.take(x.reshape(n // unit, unit, -1), inputs.window_index, axis=0).reshape(n, -1)
        x = self._constrain_patches(x)
        cos, sin = rotary_cos_sin(inputs.rotary_pos, cfg.head_dim, cfg.rope_theta)  # float32[N, H]

        x, taps = self._run_blocks(x, cos, sin, inputs)
        deepstack = tuple(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(block)](taps[j])
                          for j, block in enumerate(self._tapped_blocks()))  # in block order, as HF

        merged = self.merger(x)  # float[M, O]
        if self.family == QWEN25:
            merged = jnp.take(merged, inputs.reverse_index, axis=0)
        return merged, deepstack

    def _tapped_blocks(self) -> list[int]:
        """The blocks whose output feeds a DeepStack merger, in block order (Qwen3-VL; none for 2.5)."""
        return sorted(set(self.cfg.deepstack_visual_indexes)) if self.family == QWEN3 else []

    def _run_blocks(self, x: jax.Array, cos: jax.Array, sin: jax.Array, inputs: VisionInputs
                    ) -> tuple[jax.Array, jax.Array | None]:
        """The scanned ViT blocks: (x float[N, D] after the last block, taps float[J, N, D] or None).

        Scanned per block: `full` (Qwen2.5-VL: frame segments in `fullatt_block_indexes`, window
        segments elsewhere; Qwen3-VL: always frames) and `slot`, the block's DeepStack tap (its rank
        among the tapped blocks) or -1. A tapped block's output overwrites slot `slot` of the taps carry.
        """
        cfg, depth, tapped = self.cfg, self.cfg.depth, self._tapped_blocks()
        full = np.array([self.family == QWEN3 or i in cfg.fullatt_block_indexes for i in range(depth)])  # bool[depth]
        slot = np.array([tapped.index(i) if i in tapped else -1 for i in range(depth)], np.int32)  # int32[depth]
        taps = self._constrain_patches(jnp.zeros((len(tapped),) + x.shape, x.dtype)) if tapped else None

        def body(block: VisionBlock, carry, per_block):
            x, taps = carry
            is_full, tap = per_block
            segments = inputs.segment_ids if full.all() else jnp.where(is_full, inputs.segment_ids,
                                                                       inputs.window_segment_ids)
            x = self._constrain_patches(block(x, cos, sin, segments))
            if taps is not None:
                j = jnp.maximum(tap, 0)
                keep = jax.lax.dynamic_index_in_dim(taps, j, keepdims=False)  # float[N, D]
                taps = jax.lax.dynamic_update_slice(taps, jnp.where(tap >= 0, x, keep)[None], (j, 0, 0))
            return (x, taps), None

        (x, taps), _ = scan_layers(self.blocks, body, (x, taps), (jnp.asarray(full), jnp.asarray(slot)),
                                   remat=self.remat)
        return x, taps

    def _constrain_patches(self, x: jax.Array) -> jax.Array:
        """Patch activations float[..., N, D]: sharded by whole images ([..., N/blk, blk, D] view, image
        axis as "batch") with `attention_block`; otherwise the patch axis is "patches" (not sharded)."""
        lead, (n, d) = x.shape[:-2], x.shape[-2:]
        none = (None,) * len(lead)
        blk = self.attention_block
        if blk is None or blk >= n or n % blk:
            return constrain(x, none + ("patches", "embed"))
        by_image = constrain(x.reshape(*lead, n // blk, blk, d), none + ("batch", "patches", "embed"))
        return by_image.reshape(x.shape)


# ----------------------------------------------------------------------------------------------------
# Hugging Face parameter names
# ----------------------------------------------------------------------------------------------------

def vision_param_mapping(cfg: VisionConfig, family: str) -> list[HFParam]:
    """Every tower parameter: HF key(s) without the `visual.` / `model.visual.` prefix, NNX path in
    `VisionTower`, transform. The stacked block parameters (`blocks/...`, float[depth, ...]) list
    `blocks.{i}.<name>` for every block i.

    transform: "linear" (torch Linear weight (out, in) -> kernel (in, out)), "copy" (biases, norms,
    the position table), "patch_embed" (Conv3d weight (D, C, T, P, P) -> kernel (C*T*P*P, D)).
    The list covers every parameter of the tower exactly once (tested).
    """
    _check_family(family)
    out: list[HFParam] = []

    def add(hf: str, path: tuple, transform: str):
        if path[0] == "blocks":  # stacked: one HF tensor per block
            out.append(hf_stacked_param([f"blocks.{i}.{hf}" for i in range(cfg.depth)], path, transform))
        else:
            out.append(hf_param(hf, path, transform))

    def linear(hf: str, path: tuple, bias: bool = True):
        add(f"{hf}.weight", path + ("kernel",), "linear")
        if bias:
            add(f"{hf}.bias", path + ("bias",), "copy")

    def norm(hf: str, path: tuple):
        add(f"{hf}.weight", path + ("weight",), "copy")
        if family == QWEN3:
            add(f"{hf}.bias", path + ("bias",), "copy")

    add("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "patch_embed")
    if family == QWEN3:
        add("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), "copy")
        add("pos_embed.weight", ("pos_embed", "weight"), "copy")
    norm("norm1", ("blocks", "norm1"))
    norm("norm2", ("blocks", "norm2"))
    linear("attn.qkv", ("blocks", "attn", "qkv"))
    linear("attn.proj", ("blocks", "attn", "proj"))
    for name in ("gate_proj", "up_proj", "down_proj") if family == QWEN25 else ("linear_fc1", "linear_fc2"):
        linear(f"mlp.{name}", ("blocks", "mlp", name))
    if family == QWEN25:
        add("merger.ln_q.weight", ("merger", "ln_q", "weight"), "copy")
        linear("merger.mlp.0", ("merger", "mlp_0"))
        linear("merger.mlp.2", ("merger", "mlp_2"))
    else:
        for hf, p in [("merger", ("merger",))] + [(f"deepstack_merger_list.{j}", ("deepstack_merger_list", j))
                                                  for j in range(len(cfg.deepstack_visual_indexes))]:
            norm(f"{hf}.norm", p + ("norm",))
            linear(f"{hf}.linear_fc1", p + ("linear_fc1",))
            linear(f"{hf}.linear_fc2", p + ("linear_fc2",))
    return out


def hf_to_nnx(tensor: np.ndarray, transform: str) -> np.ndarray:
    """Converts one HF tensor to our layout according to a `vision_param_mapping` transform."""
    if transform == "copy":
        return tensor
    if transform == "linear":
        return tensor.T
    if transform == "patch_embed":
        return tensor.reshape(tensor.shape[0], -1).T
    raise ValueError(f"unknown vision parameter transform {transform!r}")


def nnx_to_hf(array: np.ndarray, transform: str, cfg: VisionConfig) -> np.ndarray:
    """The inverse of `hf_to_nnx` (for export): kernels back to torch layouts."""
    if transform == "copy":
        return array
    if transform == "linear":
        return array.T
    if transform == "patch_embed":
        return array.T.reshape(cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size,
                               cfg.patch_size)
    raise ValueError(f"unknown vision parameter transform {transform!r}")


def check_block_aligned(segment_ids: np.ndarray, block: int) -> None:
    """Raises unless every segment of `segment_ids` int[N] lies inside one block of `block` patches
    (the condition under which `segment_attention(..., attention_block=block)` is exact)."""
    seg = np.asarray(segment_ids).reshape(-1)
    if len(seg) % block:
        raise ValueError(f"{len(seg)} patches are not a whole number of attention blocks of {block}")
    blocks = seg.reshape(-1, block)
    for s in np.unique(seg[seg != 0]):
        rows = np.flatnonzero((blocks == s).any(axis=1))
        if len(rows) != 1:
            raise ValueError(f"vision segment {int(s)} spans attention blocks {rows.tolist()} of {block} patches: "
                             "attention_block needs images of exactly that many patches")
