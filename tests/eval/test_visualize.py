"""The drawings of evaluation: boxes land where their pixels are, on both images, in their colours."""
from __future__ import annotations

import numpy as np

from dig_jax.eval.visualize import GT_COLOR, PRED_COLOR, draw_prediction, image_grid


def test_boxes_are_drawn_on_both_images_at_scale():
    a, b = np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 50, np.uint8)
    panel = np.asarray(draw_prediction(a, b, gt=np.array([[2.0, 2, 8, 8]]), pred=np.array([[10.0, 10, 14, 14]])))
    assert panel.shape == (32, 2 * 32 + 4, 3)  # scale 2, a 4-pixel gap
    for offset in (0, 36):  # image A, then image B
        assert tuple(panel[4, offset + 4]) == GT_COLOR  # the ground truth's top-left corner, scaled
        assert tuple(panel[20, offset + 20]) == PRED_COLOR
        assert tuple(panel[10, offset + 10]) != GT_COLOR  # the inside is not filled
    assert tuple(panel[0, 0]) == (0, 0, 0) and tuple(panel[0, 36]) == (50, 50, 50)


def test_grid_lays_panels_out_row_by_row():
    from PIL import Image

    panels = [Image.new("RGB", (10, 5), (i * 40, 0, 0)) for i in range(3)]
    grid = np.asarray(image_grid(panels, columns=2))
    assert grid.shape == (2 * 5 + 6, 2 * 10 + 6, 3)
    assert tuple(grid[0, 0]) == (0, 0, 0) and tuple(grid[0, 16]) == (40, 0, 0) and tuple(grid[11, 0]) == (80, 0, 0)
    assert tuple(grid[11, 16]) == (255, 255, 255)  # no fourth panel
    assert image_grid([]).size == (1, 1)
