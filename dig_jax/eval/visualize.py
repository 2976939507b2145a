"""Drawings of evaluation predictions: why a metric is what it is is often obvious on the images.

Host-side PIL on uint8 images; boxes are float[N, 4] pixel corners (x1, y1, x2, y2) on the rendered image.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GT_COLOR = (0, 255, 0)
PRED_COLOR = (255, 0, 0)
GAP = 4  # pixels between image A and image B of a panel
GRID_GAP = 6  # pixels between the panels of a grid


def draw_prediction(image_a: np.ndarray, image_b: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                    scale: int = 2) -> Image.Image:
    """Image A | image B (uint8[H, W, 3] each, upscaled by `scale`), ground truth float[G, 4] in green and
    predictions float[P, 4] in red on both."""
    h, w = image_a.shape[:2]
    canvas = Image.new("RGB", (2 * w * scale + GAP, h * scale), (255, 255, 255))
    for i, img in enumerate((image_a, image_b)):
        panel = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(panel)
        for boxes, color in ((gt, GT_COLOR), (pred, PRED_COLOR)):
            for x0, y0, x1, y1 in boxes:
                draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=color, width=2)
        canvas.paste(panel, (i * (w * scale + GAP), 0))
    return canvas


def image_grid(panels: list[Image.Image], columns: int = 2) -> Image.Image:
    """The panels (all of the first one's size) row by row, `columns` per row; a 1x1 image when empty."""
    if not panels:
        return Image.new("RGB", (1, 1))
    w, h = panels[0].size
    rows = -(-len(panels) // columns)
    grid = Image.new("RGB", (columns * w + (columns - 1) * GRID_GAP, rows * h + (rows - 1) * GRID_GAP),
                     (255, 255, 255))
    for i, p in enumerate(panels):
        grid.paste(p, ((i % columns) * (w + GRID_GAP), (i // columns) * (h + GRID_GAP)))
    return grid


def draw_grounding(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, caption: str,
                   max_side: int = 256) -> Image.Image:
    """One image uint8[H, W, 3] (shrunk to fit `max_side`) with the true box float[4] in green, the
    predicted box float[4] (or none: float[0]) in red, and `caption` (the expression, the IoU) written
    below; every panel has the same size, max_side x (max_side + 28), so that `image_grid` can tile them."""
    h, w = image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * s)), max(1, round(h * s)))
    panel = Image.fromarray(image).resize(size, Image.BILINEAR)
    canvas = Image.new("RGB", (max_side, max_side + 28), (255, 255, 255))
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for box, color in ((gt, GT_COLOR), (pred, PRED_COLOR)):
        if len(box):
            x0, y0, x1, y1 = (float(v) * s for v in box)
            draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=2)
    draw.text((2, max_side + 2), caption[:max_side // 6], fill=(0, 0, 0))  # ~6 px per character
    return canvas
