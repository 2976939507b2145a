"""Host-side (numpy) index arithmetic for the vision tower, so that jitted shapes stay static.

Everything here depends only on the image grids `(t, h, w)` (in patches) and the vision config, never on
pixel values. Computing it with numpy on the host keeps data-dependent shapes (number of windows, window
lengths, per-image offsets) out of the traced graph: the tower only ever sees fixed-size integer arrays
of the padded patch count `N`, so a bucketed `N` compiles once for any mix of image sizes.

Orders (those of HF's image processor and vision towers):
  * *pixel order*: the rows of `pixel_values` as the HF processor emits them, images concatenated, each
    image in 2x2 merge-block order (block_row, block_col, in_row, in_col), frames repeated t times.
  * *block order*: the order the ViT blocks see the patches. Qwen2.5-VL permutes pixel order in merged
    (4-patch) units so that every attention window is contiguous (`window_index`); Qwen3-VL has no
    windows and block order equals pixel order.
Padding rows (pixel_values rows of zeros, up to `pad_patches_to`) always come last, in both orders.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dig_jax.models.config import FAMILIES, VisionConfig


class VisionInputs(NamedTuple):
    """Static-shape index arrays for one packed batch of images (N = padded patch count, a multiple of 4).

    Every array field may be passed through `jax.jit` as an argument. `num_valid_tokens` is a plain Python
    int for the caller (how many leading rows of the tower's output are real); the tower never reads it,
    so passing it through jit as a traced scalar is harmless and does not cause retracing. Callers that
    want it static can drop it with `inputs._replace(num_valid_tokens=0)` and keep their own copy.
    """

    segment_ids: np.ndarray         # int32[N]     frame id (1, 2, ...) per patch in block order; 0 = padding
    window_segment_ids: np.ndarray  # int32[N]     Qwen2.5: window id per patch (0 = padding); Qwen3: = segment_ids
    window_index: np.ndarray        # int32[N//4]  block order -> pixel order, in merged units; identity for Qwen3
    reverse_index: np.ndarray       # int32[N//4]  argsort(window_index): merger output -> HF final order
    rotary_pos: np.ndarray          # int32[N, 2]  (row, col) of each patch in its frame, in block order
    pos_embed_index: np.ndarray     # int32[N, 4]  Qwen3 bilinear taps into the flattened learned table; 0 for 2.5
    pos_embed_weight: np.ndarray    # float32[N, 4] their weights (0 for padding rows and for Qwen2.5)
    num_valid_tokens: int           # merged tokens that are real: sum(t * h * w) / merge**2


def bucket_patches(num_patches: int, multiple: int = 64, *, power_of_two: bool = False) -> int:
    """A static padded patch count >= `num_patches`: the next multiple of `multiple`, or the next power
    of two (>= `multiple`) when `power_of_two`. Few distinct buckets means few compilations."""
    if num_patches < 0:
        raise ValueError(f"bucket_patches: num_patches must be >= 0, got {num_patches}")
    if multiple <= 0 or multiple % 4:
        raise ValueError(f"bucket_patches: multiple must be a positive multiple of 4 (merged units), got {multiple}")
    if power_of_two:
        size = multiple
        while size < num_patches:
            size *= 2
        return size
    return max(multiple, -(-num_patches // multiple) * multiple)


def _check_grids(image_grid_thw: np.ndarray, cfg: VisionConfig) -> np.ndarray:
    grids = np.asarray(image_grid_thw)
    if grids.ndim != 2 or grids.shape[1] != 3 or grids.shape[0] == 0:
        raise ValueError(f"image_grid_thw must have shape [n_images >= 1, 3] (t, h, w), got {grids.shape}")
    if not np.issubdtype(grids.dtype, np.integer):
        raise ValueError(f"image_grid_thw must be integer, got dtype {grids.dtype}")
    m = cfg.spatial_merge_size
    for i, (t, h, w) in enumerate(grids.tolist()):
        if t < 1 or h < m or w < m or h % m or w % m:
            raise ValueError(f"image_grid_thw[{i}] = {(t, h, w)}: need t >= 1 and h, w positive multiples of "
                             f"spatial_merge_size {m}")
    return grids.astype(np.int64)


def _merge_block_positions(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of one frame, in merge-block order. Two int64[h*w]."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    order = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    return order(rows), order(cols)


def _window_layout(t: int, lh: int, lw: int, vw: int) -> tuple[np.ndarray, np.ndarray]:
    """HF `get_vision_window_index` for one image, in merged units.

    Returns (index, window) int64[t*lh*lw]: the merged-token permutation (windows in raster order, tokens
    raster inside each window) and the window ordinal of each permuted token. Like HF, the grid is padded by
    `vw - l % vw` on each side, which adds a whole empty window row/column when `l` divides by `vw`; empty
    windows own no tokens, so they only shift the ordinals (renumbered by the caller).
    """
    pad_h, pad_w = vw - lh % vw, vw - lw % vw
    nwh, nww = (lh + pad_h) // vw, (lw + pad_w) // vw
    index = np.full((t, lh + pad_h, lw + pad_w), -1, np.int64)
    index[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    index = index.reshape(t, nwh, vw, nww, vw).transpose(0, 1, 3, 2, 4).reshape(-1)
    window = np.repeat(np.arange(t * nwh * nww), vw * vw)
    keep = index >= 0
    return index[keep], window[keep]


def _bilinear_taps(rows: np.ndarray, cols: np.ndarray, h: int, w: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps of a (side x side) table for target (h x w) positions.

    Source coordinate `i * (side-1) / (size-1)` (i.e. `linspace(0, side-1, size)`), computed in float32 in
    the same operation order as HF so the weights agree to the bit. Returns int32[n, 4], float32[n, 4]
    with taps ordered (top-left, top-right, bottom-left, bottom-right).
    """
    def axis(index: np.ndarray, size: int):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        taps = floor.astype(np.int64)[:, None] + np.arange(2)
        weights = np.clip(np.float32(1) - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)),
                          0, None).astype(np.float32)
        return np.clip(taps, 0, side - 1), weights

    h_taps, h_w = axis(rows, h)
    w_taps, w_w = axis(cols, w)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight.astype(np.float32)


def _patch_layout(grids: np.ndarray, cfg: VisionConfig, family: str):
    """Per patch in pixel order: its merge-block row and column and its frame id (1, 2, ... over all
    frames of all images); for Qwen2.5-VL also each image's window permutation (merged units, offset to
    the batch) and window ids. Returns (rows, cols, frame, index parts, window parts, merged tokens)."""
    m = cfg.spatial_merge_size
    frame_ids, rows, cols, windows, index = [], [], [], [], []
    frame_offset = window_offset = token_offset = 0
    vw = cfg.window_size // m // cfg.patch_size
    for t, h, w in grids.tolist():
        r, c = _merge_block_positions(h, w, m)
        rows.append(np.tile(r, t))
        cols.append(np.tile(c, t))
        frame_ids.append(np.repeat(np.arange(frame_offset + 1, frame_offset + t + 1), h * w))
        frame_offset += t
        if family == "qwen2_5_vl":
            idx, win = _window_layout(t, h // m, w // m, vw)
            index.append(idx + token_offset)
            windows.append(win + window_offset)
            window_offset = int(win.max()) + window_offset + 1
        token_offset += t * (h // m) * (w // m)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(frame_ids), index, windows, token_offset


def _position_table_taps(grids: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int):
    """Qwen3-VL: the bilinear taps into the side x side learned position table of every patch, image by
    image (pixel order): int32[P, 4] indices, float32[P, 4] weights."""
    taps, weights = [], []
    start = 0
    for t, h, w in grids.tolist():
        sl = slice(start, start + t * h * w)
        tp, wt = _bilinear_taps(rows[sl], cols[sl], h, w, side)
        taps.append(tp)
        weights.append(wt)
        start += t * h * w
    return np.concatenate(taps), np.concatenate(weights)


def build_vision_inputs(image_grid_thw: np.ndarray, cfg: VisionConfig, family: str,
                        pad_patches_to: int | None = None) -> VisionInputs:
    """All index arrays the tower needs for the images `image_grid_thw` (int[n_images, 3], in patches).

    `pad_patches_to` (default: no padding) is the static patch count N of the batch; it must be a multiple
    of spatial_merge_size**2 and at least sum(t*h*w). Padding rows get segment id 0 (they attend only to
    each other), rotary position (0, 0), zero position-embedding weight, and stay last in every order.
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} is not one of {FAMILIES}")
    grids = _check_grids(image_grid_thw, cfg)
    m = cfg.spatial_merge_size
    unit = m * m
    n_valid = int(np.sum(grids[:, 0] * grids[:, 1] * grids[:, 2]))
    n = n_valid if pad_patches_to is None else int(pad_patches_to)
    if n < n_valid or n % unit:
        raise ValueError(f"pad_patches_to={pad_patches_to}: must be >= the {n_valid} patches of image_grid_thw "
                         f"{grids.tolist()} and a multiple of spatial_merge_size**2 = {unit}")

    rows, cols, pixel_frame, index, windows, token_offset = _patch_layout(grids, cfg, family)
    n_pad_tokens = n // unit - token_offset

    if family == "qwen2_5_vl":
        window_index = np.concatenate(index + [np.arange(token_offset, n // unit)])
        # Windows are contiguous in block order, so renumber them 1, 2, ... by runs.
        win = np.concatenate(windows)
        win = 1 + np.concatenate([[0], np.cumsum(win[1:] != win[:-1])])
        window_seg = np.concatenate([np.repeat(win, unit), np.zeros(n_pad_tokens * unit, np.int64)])
    else:
        window_index = np.arange(n // unit)

    # Pixel-order per-patch arrays (padding appended), then permuted to block order in merged units.
    def to_block_order(x: np.ndarray) -> np.ndarray:
        pad = np.zeros((n - n_valid,) + x.shape[1:], x.dtype)
        x = np.concatenate([x, pad]).reshape((n // unit, unit) + x.shape[1:])
        return x[window_index].reshape((n,) + x.shape[2:])

    segment_ids = to_block_order(pixel_frame)
    rotary_pos = to_block_order(np.stack([rows, cols], axis=-1))
    if family == "qwen3_vl":
        window_seg = segment_ids
        taps, weights = _position_table_taps(grids, rows, cols, int(round(cfg.num_position_embeddings ** 0.5)))
        pos_index, pos_weight = to_block_order(taps), to_block_order(weights)
    else:
        pos_index = np.zeros((n, 4), np.int32)
        pos_weight = np.zeros((n, 4), np.float32)

    return VisionInputs(
        segment_ids=segment_ids.astype(np.int32),
        window_segment_ids=window_seg.astype(np.int32),
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index).astype(np.int32),
        rotary_pos=rotary_pos.astype(np.int32),
        pos_embed_index=pos_index.astype(np.int32),
        pos_embed_weight=pos_weight.astype(np.float32),
        num_valid_tokens=n_valid // unit,
    )
