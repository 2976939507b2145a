"""The prompt side of generation and scoring: `PromptBatch`, `Completions`, and their host-side layout.

Layout of a batch (`PromptBatch`, built on the host by `build_prompt_batch`):
  * prompts are LEFT-padded to a bucketed length Lp, so the last prompt token of every row sits at slot
    Lp-1 and decoding writes slot Lp+k for every row at once; only the bucket, not each prompt length,
    reaches the compiler, so generation compiles once per (bucket, batch, patch bucket, SamplingConfig).
  * position ids are the HF `get_rope_index` ones (3 M-RoPE axes, pads at 0) and the per-row rope deltas
    `max_prompt_position + 1 - n_valid_prompt_tokens` are carried explicitly in the batch, never cached
    on a module: a delta left over from an earlier batch would shift every decode position of the next.

Images and GRPO groups: `pixel_values` holds each distinct image once; the vision tower runs once per
call and `feature_index` gathers its output for every row's image tokens, so the G copies of a prompt
share one image encoding (and, in the training step, one vision backward).

Axis legend: P prompts, G group size, B = P * G rows, Lp padded prompt length, T completion length,
N image patches (padded), D model width.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dig_jax import multihost, sharding
from dig_jax.models.config import ModelConfig
from dig_jax.models.vlm import PlacedImageFeatures

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A left-padded prompt batch with everything the model needs, ready for `generate` / scoring.

    input_ids       int32[B, Lp]    left-padded with the pad id
    attention_mask  int32[B, Lp]    1 on prompt tokens, 0 on the left padding
    position_ids    int32[3, B, Lp] M-RoPE (T, H, W) positions from get_rope_index; 0 on padding
    rope_deltas     int32[B, 1]     max position + 1 - number of valid tokens, per row
    pixel_values    float[N, patch_dim] | None  the DISTINCT images (before group repetition), zero-padded
    vision          VisionInputs | None         host-built static-shape vision metadata for those patches
    feature_index   int32[B, Lp] | None         at each image-pad token, the row of the vision tower's
                                                merged output that it takes (0 elsewhere)

    The vision tower runs once per distinct image; `feature_index` repeats its output for the G copies
    of a prompt (and, through the gather, sums their gradients back into one image encoding). It is
    aligned with `input_ids`, so selecting or sharding rows of the batch is a plain row operation
    (`pixel_values` / `vision` stay whole).
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    rope_deltas: Any
    pixel_values: Any = None
    vision: Any = None
    feature_index: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Completions:
    """Token sequences to score after the prompts of a PromptBatch.

    tokens  int32[B, T]   answer / sampled tokens (padding after the end)
    mask    int32[B, T]   1 on tokens that count (up to and including <|im_end|>)
    """

    tokens: jax.Array
    mask: jax.Array


# ----------------------------------------------------------------------------------------------------
# Host side: bucketing, left padding, group repetition
# ----------------------------------------------------------------------------------------------------

def bucket_length(n: int, multiple: int = 64) -> int:
    """The padded prompt length for `n` tokens: the next multiple of `multiple` (at least one)."""
    if multiple < 1:
        raise ValueError(f"bucket multiple must be >= 1, got {multiple}")
    return max(1, math.ceil(n / multiple)) * multiple


# The layout of a prompt batch (everything but the pixels) depends only on its token rows, grids and
# bucketing; a DiG dataset has one prompt template and one image size, so every training batch has the
# same layout. It is kept here (a few entries: a bucket or two, an evaluation batch) and served again.
_LAYOUT_CACHE: collections.OrderedDict = collections.OrderedDict()
LAYOUT_CACHE_SIZE = 8


def build_prompt_batch(cfg, input_ids: np.ndarray, attention_mask: np.ndarray,
                       image_grid_thw: np.ndarray | None = None, pixel_values: np.ndarray | None = None, *,
                       group_size: int = 1, length_multiple: int = 64, pad_patches_to: int | None = None,
                       patch_multiple: int = 64, length: int | None = None, feature_offset: int = 0,
                       vision_grids: np.ndarray | None = None) -> PromptBatch:
    """Left-pads prompts to a length bucket, repeats each prompt `group_size` times, builds positions.

    input_ids / attention_mask: int[B0, L] with padding on EITHER side (rows are re-packed to the left,
    which the decoder's slot arithmetic assumes; positions are computed after re-packing, so padding
    direction can never disagree between positions and forward: TRL#5785).
    image_grid_thw: int[n_images, 3] for all images of the batch in row order; pixel_values:
    float[sum(t*h*w), patch_dim] in the same order (the processor's output).

    Group repetition (GRPO): row i becomes rows i*G .. i*G+G-1 (adjacent). Its images are NOT repeated:
    the vision tower encodes each distinct image once and `feature_index` hands the features to all G
    rows (G-1 fewer vision passes per prompt, in generation and in the training step).

    The padded patch count is `pad_patches_to` or the next multiple of `patch_multiple`; together with
    the length bucket it decides recompilation. The layout (all but `pixel_values`) is cached (see
    `_LAYOUT_CACHE`): the same inputs give the same, read-only, arrays without recomputing them.

    One host's share of a batch spread over processes (`prompt_batch(..., process_local=True)`):
    `length` forces the padded length Lp (the global bucket), `feature_offset` is the number of merged
    image tokens of the images on earlier processes (added to `feature_index`), and `vision_grids`
    int[n_all, 3] are the grids of the whole batch, which `vision` then describes.
    """
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal [B, L]")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    all_grids = grids if vision_grids is None else np.asarray(vision_grids, np.int64).reshape(-1, 3)
    pixel_rows = None if pixel_values is None else len(pixel_values)
    key = (cfg, input_ids.dtype.str, input_ids.shape, input_ids.tobytes(), attention_mask.dtype.str,
           attention_mask.tobytes(), grids.tobytes(), all_grids.tobytes(), pixel_rows, group_size,
           length_multiple, pad_patches_to, patch_multiple, length, feature_offset)
    layout = _LAYOUT_CACHE.get(key)
    if layout is None:
        layout = _build_layout(cfg, input_ids, attention_mask, grids, all_grids, pixel_rows, group_size=group_size,
                               length_multiple=length_multiple, pad_patches_to=pad_patches_to,
                               patch_multiple=patch_multiple, length=length, feature_offset=feature_offset)
        _LAYOUT_CACHE[key] = layout
        while len(_LAYOUT_CACHE) > LAYOUT_CACHE_SIZE:
            _LAYOUT_CACHE.popitem(last=False)
    _LAYOUT_CACHE.move_to_end(key)
    if layout.vision is None:
        return layout
    n_pad, n_patches = layout.vision.segment_ids.shape[0], len(pixel_values)
    if vision_grids is not None:  # this host's rows of the whole batch's (unpadded) patches
        return dataclasses.replace(layout, pixel_values=np.asarray(pixel_values))
    pix = np.concatenate([pixel_values, np.zeros((n_pad - n_patches, pixel_values.shape[1]), pixel_values.dtype)])
    return dataclasses.replace(layout, pixel_values=pix)


def _build_layout(cfg, input_ids, attention_mask, grids, all_grids, pixel_rows, *, group_size, length_multiple,
                  pad_patches_to, patch_multiple, length, feature_offset) -> PromptBatch:
    """`build_prompt_batch` without the pixels, for the cache: read-only arrays, vision metadata."""
    from dig_jax.models.vision_inputs import build_vision_inputs
    from dig_jax.models.vlm import rope_positions

    n_valid = attention_mask.sum(axis=1)
    if (n_valid == 0).any():
        raise ValueError(f"prompt rows {np.flatnonzero(n_valid == 0).tolist()} have no valid token")
    lp = bucket_length(int(n_valid.max()), length_multiple) if length is None else length
    if lp < int(n_valid.max()):
        raise ValueError(f"length={lp} is shorter than the longest prompt ({int(n_valid.max())} tokens)")
    ids, mask = left_pack(input_ids, attention_mask, lp, cfg.pad_token_id)       # int32[B0, Lp]
    position_ids, rope_deltas, first_image = rope_positions(cfg, ids, mask, grids)  # [3, B0, Lp], [B0, 1]
    g = group_size
    batch = PromptBatch(np.repeat(ids, g, 0), np.repeat(mask, g, 0), np.repeat(position_ids, g, 1),
                        np.repeat(rope_deltas, g, 0))
    vision = feature_index = None
    if len(grids):
        merge2 = cfg.vision.spatial_merge_size ** 2
        if pixel_rows is None:
            raise ValueError("image_grid_thw given without pixel_values")
        n_patches, n_all = int(grids.prod(axis=1).sum()), int(all_grids.prod(axis=1).sum())
        if pixel_rows != n_patches:
            raise ValueError(f"pixel_values has {pixel_rows} rows but image_grid_thw needs {n_patches}")
        n_pad = pad_patches_to or bucket_length(n_all, patch_multiple)
        if n_pad < n_all or n_pad % merge2:
            raise ValueError(f"pad_patches_to={n_pad}: need a multiple of {merge2} >= the {n_all} patches of the batch")
        if n_all != n_patches and n_pad != n_all:
            raise ValueError(f"pad_patches_to={n_pad}: one host's share of a batch takes no patch padding "
                             f"(the {n_all} patches of all hosts)")
        vision = build_vision_inputs(all_grids, cfg.vision, cfg.family, pad_patches_to=n_pad)
        feature_index = np.repeat(_feature_index(ids, grids, first_image, cfg, feature_offset), g, 0)
        batch = dataclasses.replace(batch, vision=vision, feature_index=feature_index)
    for x in jax.tree.leaves(batch):
        if isinstance(x, np.ndarray):
            x.flags.writeable = False
    return batch


def left_pack(input_ids: np.ndarray, attention_mask: np.ndarray, lp: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows re-packed to the left of int32[B0, Lp]: each row's valid tokens (mask 1) end at slot Lp-1,
    in order; the rest is `pad_id` with mask 0. Rows that already are exactly that (the processor pads
    prompts to the bucket on the left) are taken as they are, without scattering them again."""
    keep = attention_mask == 1
    already = (input_ids.shape[1] == lp and ((attention_mask == 0) | keep).all()
               and (np.diff(attention_mask, axis=1) >= 0).all() and (input_ids[~keep] == pad_id).all())
    if already:
        return input_ids.astype(np.int32), attention_mask.astype(np.int32)
    rows, cols = np.nonzero(keep)
    slot = (lp - keep.sum(axis=1))[rows] + np.cumsum(keep, axis=1)[rows, cols] - 1
    ids = np.full((len(input_ids), lp), pad_id, np.int32)
    mask = np.zeros((len(input_ids), lp), np.int32)
    ids[rows, slot] = input_ids[rows, cols]
    mask[rows, slot] = 1
    return ids, mask


def _feature_index(ids: np.ndarray, grids: np.ndarray, first_image: np.ndarray, cfg, offset: int) -> np.ndarray:
    """int32[B0, Lp]: at every image-pad token, the row of the vision tower's merged output it takes
    (`offset` + the merged tokens of the earlier images); 0 elsewhere."""
    tokens_per_image = grids.prod(axis=1) // cfg.vision.spatial_merge_size ** 2
    image_offsets = offset + np.concatenate([[0], np.cumsum(tokens_per_image)])
    feature_index = np.zeros(ids.shape, np.int32)
    for row in range(len(ids)):
        images = range(first_image[row], first_image[row + 1])
        if len(images):
            feature_index[row, ids[row] == cfg.image_token_id] = np.concatenate(
                [np.arange(image_offsets[i], image_offsets[i + 1]) for i in images])
    return feature_index


def image_features(model, batch: PromptBatch, input_ids: jax.Array) -> PlacedImageFeatures | None:
    """The image features of `model.forward` over input_ids int32[B, L] (the prompt, maybe + completion),
    placed at their token slots: float[B, L, D] per level, sharded over the batch like the embeddings.

    The vision tower runs once over the distinct images; `feature_index` names the tower row each
    prompt image-pad token takes, so the G copies of a prompt share one encoding. Image-pad ids past the
    prompt (a policy can sample token 151655) are TEXT, as they were when generated one by one: they take
    the token's own embedding and no DeepStack feature (an extra table row, `text_row`).
    """
    if batch.pixel_values is None:
        return None
    embeds, deepstack = model.encode_images(batch.pixel_values, batch.vision)  # float[N//4, D], levels
    b, l = input_ids.shape
    lp = batch.input_ids.shape[1]
    text_row = embeds.shape[0]  # index of the extra row appended below
    is_img = input_ids == model.cfg.image_token_id  # [B, L]
    prompt_rows = jnp.reshape(batch.feature_index, (b, lp))
    rows = jnp.full((b, l), text_row, jnp.int32).at[:, :lp].set(prompt_rows)
    rows = jnp.where(is_img, rows, text_row)  # int32[B, L]: the table row of every slot
    rows = sharding.constrain(rows, ("batch", "length"))
    as_text = model.language_model.embed(jnp.full((1, 1), model.cfg.image_token_id, jnp.int32))[0]  # [1, D]

    def place(table):  # float[M + 1, D] -> float[B, L, D]
        return sharding.constrain(jnp.take(table, rows, axis=0), ("batch", "length", "embed"))

    main = place(jnp.concatenate([embeds, as_text.astype(embeds.dtype)]))
    levels = tuple(place(jnp.concatenate([f, jnp.zeros_like(f[:1])])) for f in deepstack)
    return PlacedImageFeatures(main, levels)


# ----------------------------------------------------------------------------------------------------
# Batches of examples -> placed PromptBatch / Completions
# ----------------------------------------------------------------------------------------------------

def prompt_batch(cfg: ModelConfig, batch: dict, *, group_size: int = 1, mesh: Mesh | None = None,
                 prompt_bucket: int = 64, process_local: bool = False) -> PromptBatch:
    """PromptBatch for the prompts of `batch` (pixel_values float[P, Np, pd], image_grid_thw int[P, 2, 3]).

    `process_local`: `batch` is this host's share of the global batch (equal shares, in process order,
    as each host reads them), not the global batch; see `_local_prompt_batch`. Same result.
    """
    if process_local and mesh is not None:
        return _local_prompt_batch(cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=prompt_bucket)
    if process_local and jax.process_count() > 1:
        raise ValueError("prompt_batch(process_local=True) on several processes needs the mesh")
    pixel_values = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])
    grids = batch["image_grid_thw"].reshape(-1, 3)
    pb = build_prompt_batch(cfg, batch["prompt_ids"], batch["prompt_mask"], grids, pixel_values,
                            group_size=group_size, length_multiple=prompt_bucket, pad_patches_to=pixel_values.shape[0])
    # Token-row arrays are sharded over the batch; the position ids carry the batch on axis 1; the
    # distinct images and their vision inputs are replicated (the tower sees every image).
    out = sharding.place_batch({"input_ids": pb.input_ids, "attention_mask": pb.attention_mask,
                                "rope_deltas": pb.rope_deltas, "feature_index": pb.feature_index}, mesh)
    replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    if mesh is None:
        position_ids = jax.numpy.asarray(pb.position_ids)
    else:  # int32[3, B, L]: the batch is axis 1 (replicated when it does not divide, e.g. a last eval batch)
        rows = pb.position_ids.shape[1]
        divides = rows % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
        spec = sharding.logical_to_spec((None, "batch", None), mesh=mesh) if divides else PartitionSpec()
        position_ids = jax.device_put(pb.position_ids, NamedSharding(mesh, spec))
    put = (lambda x: jax.numpy.asarray(x)) if mesh is None else (lambda x: jax.device_put(np.asarray(x), replicated))
    return PromptBatch(
        input_ids=out["input_ids"], attention_mask=out["attention_mask"], position_ids=position_ids,
        rope_deltas=out["rope_deltas"], pixel_values=put(pb.pixel_values),
        vision=jax.tree.map(put, pb.vision), feature_index=out["feature_index"])


def _local_prompt_batch(cfg: ModelConfig, batch: dict, *, group_size: int, mesh: Mesh,
                        prompt_bucket: int) -> PromptBatch:
    """`prompt_batch` from this host's share only: the global batch's layout and placement, with each
    host placing its own rows and pixels (`jax.make_array_from_process_local_data`).

    What the hosts must agree on travels as a few integers: every host's image grids (the vision
    metadata describes all images, and the feature rows of this host's images start after the merged
    tokens of the earlier hosts' images) and the longest prompt (the global length bucket). The pixels
    reach the other devices on the device interconnect (the tower sees every image, replicated as in
    `prompt_batch`), never through a host. On one process the arrays and shardings are those of
    `prompt_batch(cfg, batch, mesh=mesh)`.
    """
    pixel_values = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1])  # float[n_local, pd]
    grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)                           # int[images, 3]
    counts = multihost.process_values([len(grids), int(np.asarray(batch["prompt_mask"]).sum(axis=1).max())])
    all_grids = grids if jax.process_count() == 1 else np.asarray(
        multihost_utils.process_allgather(grids, tiled=True)).reshape(-1, 3)
    merged = all_grids.astype(np.int64).prod(axis=1) // cfg.vision.spatial_merge_size ** 2
    offset = int(merged[:int(counts[:jax.process_index(), 0].sum())].sum())
    pb = build_prompt_batch(cfg, batch["prompt_ids"], batch["prompt_mask"], grids, pixel_values,
                            group_size=group_size, length_multiple=prompt_bucket,
                            pad_patches_to=int(all_grids.astype(np.int64).prod(axis=1).sum()),
                            length=bucket_length(int(counts[:, 1].max()), prompt_bucket), feature_offset=offset,
                            vision_grids=all_grids)
    out = sharding.place_local_batch({"input_ids": pb.input_ids, "attention_mask": pb.attention_mask,
                                      "rope_deltas": pb.rope_deltas, "feature_index": pb.feature_index}, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.device_put(np.asarray(x), replicated)  # the same value on every host
    return PromptBatch(
        input_ids=out["input_ids"], attention_mask=out["attention_mask"],
        position_ids=sharding.place_local_batch(pb.position_ids, mesh, axis=1), rope_deltas=out["rope_deltas"],
        pixel_values=None if pb.pixel_values is None else _replicated_from_shares(pb.pixel_values, mesh),
        vision=jax.tree.map(put, pb.vision), feature_index=out["feature_index"])


def _replicated_from_shares(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """float[N, pd] replicated on `mesh`, from each process's rows float[N / processes, pd]: placed
    batch-sharded from the local rows, then gathered by the devices (one jitted copy)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(local, replicated)
    return _replicate(replicated)(sharding.place_local_batch(local, mesh))


@functools.lru_cache(maxsize=8)
def _replicate(replicated: NamedSharding):
    """A jitted copy onto `replicated` (one per sharding, so it compiles once per shape)."""
    return jax.jit(lambda x: x, out_shardings=replicated)


def answers(batch: dict, mesh: Mesh | None = None, process_local: bool = False) -> Completions:
    """The supervised targets of `batch` (this host's share when `process_local`) as completions to score."""
    tree = {"tokens": batch["answer_ids"].astype(np.int32), "mask": batch["answer_mask"].astype(np.int32)}
    placed = (sharding.place_local_batch(tree, mesh) if process_local and mesh is not None
              else sharding.place_batch(tree, mesh))
    return Completions(placed["tokens"], placed["mask"])


def select_rows(prompts: PromptBatch, rows: np.ndarray) -> PromptBatch:
    """The PromptBatch restricted to `rows`: every row-aligned array is taken; the distinct images and
    their vision inputs are kept whole, since `feature_index` [B, Lp] points into their features."""
    rows = jax.device_put(np.asarray(rows))  # explicit: no implicit transfer under a transfer guard
    take = lambda x, axis=0: jax.numpy.take(x, rows, axis=axis)
    return PromptBatch(
        input_ids=take(prompts.input_ids), attention_mask=take(prompts.attention_mask),
        position_ids=take(prompts.position_ids, 1), rope_deltas=take(prompts.rope_deltas),
        pixel_values=prompts.pixel_values, vision=prompts.vision,
        feature_index=None if prompts.feature_index is None else take(prompts.feature_index))
