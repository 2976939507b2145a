"""3D (M-RoPE) position ids on the host, exactly as HF 5.24's `get_rope_index` for images.

Computed with numpy outside `jit` because it depends on the image grid sizes (Python ints); the
results are passed into the model as arrays, so the compiled forward never sees a grid shape.

Rules (HF 5.24 `get_rope_index` for images, identical there to the older Qwen algorithm): padding
(attention_mask 0) is dropped, then the valid tokens are grouped into runs of text / image-pad tokens. A text run of n tokens gets cur..cur+n-1 on all
three axes; an image run with grid (t, h, w) gets T = cur, H = cur + row, W = cur + col over the merged
(h/m, w/m) raster, and then cur advances by max(h, w) // m. Padded positions stay 0.
rope_delta = max(position) + 1 - n_valid, so the next generated token sits at n_valid + rope_delta.
"""
from __future__ import annotations

import numpy as np


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grid_thw: np.ndarray | None,
                   *, image_token_id: int, spatial_merge_size: int = 2,
                   video_token_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns (position_ids int64[3, B, L], rope_deltas int64[B, 1]).

    input_ids int[B, L]; attention_mask int[B, L] or None (all valid); image_grid_thw int[n_images, 3]
    (t, h, w) in patches, in the order the images appear across the batch (row-major). Videos are not
    supported: a video-pad token is an error.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"get_rope_index: input_ids must be [B, L], got shape {input_ids.shape}")
    b, l = input_ids.shape
    mask = np.ones((b, l), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != (b, l):
        raise ValueError(f"get_rope_index: attention_mask shape {mask.shape} != input_ids shape {(b, l)}")
    if video_token_id is not None and np.any(input_ids[mask] == video_token_id):
        raise ValueError("get_rope_index: video tokens are not supported (only images)")
    grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)

    position_ids = np.zeros((3, b, l), np.int64)
    deltas = np.zeros((b, 1), np.int64)
    next_image = 0
    for row in range(b):
        is_image = input_ids[row][mask[row]] == image_token_id
        n = is_image.shape[0]
        if n == 0:
            continue  # an all-padding row: positions 0, delta 0 (HF would fail on max() of nothing)
        pieces, cur, start = [], 0, 0
        while start < n:
            end = start + 1
            while end < n and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                pieces.append(np.broadcast_to(np.arange(cur, cur + end - start), (3, end - start)))
                cur += end - start
            else:
                if next_image >= len(grids):
                    raise ValueError(f"get_rope_index: row {row} has more image-pad runs than the "
                                     f"{len(grids)} grids in image_grid_thw")
                t, h, w = (int(x) for x in grids[next_image])
                next_image += 1
                lh, lw = h // spatial_merge_size, w // spatial_merge_size
                if t * lh * lw != end - start:
                    raise ValueError(f"get_rope_index: row {row}, image {next_image - 1} with grid {(t, h, w)} "
                                     f"needs {t * lh * lw} image-pad tokens but its run has {end - start}")
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
                pieces.append(np.stack([tt.ravel() + cur, hh.ravel() + cur, ww.ravel() + cur]))
                cur += max(h, w) // spatial_merge_size
            start = end
        positions = np.concatenate(pieces, axis=1)
        position_ids[:, row, mask[row]] = positions
        deltas[row, 0] = positions.max() + 1 - n
    if next_image != len(grids):
        raise ValueError(f"get_rope_index: image_grid_thw has {len(grids)} images but the sequences "
                         f"contain {next_image} image-pad runs")
    return position_ids, deltas
