"""Contact sheet: boxes land on the pixels they name, in their kind's colour, on both images; CLI writes it."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from data_pipeline import preview, schema

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAY = (90, 90, 90)


def record(seed=3, boxes=((20, 30, 41, 52),), kinds=("color",)):
    image = np.full((64, 80, 3), GRAY, np.uint8)
    return {"image_a": image, "image_b": image.copy(), "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
            "kinds": list(kinds), "seed": seed, "num_differences": len(kinds)}


@pytest.mark.parametrize("scale", [1, 3])
def test_box_outline_sits_on_the_named_pixels_in_both_panels(scale):
    r = record(boxes=((20, 30, 41, 52), (60, 10, 70, 12)), kinds=("color", "move"))
    tile = np.asarray(preview.draw_pair(r, scale=scale))
    panel_w = 80 * scale
    for panel in (0, 1):
        x_off, y_off = panel * (panel_w + preview._GAP), preview._CAPTION
        for (x0, y0, x1, y1), kind in zip(r["boxes"].astype(int), r["kinds"]):
            color = preview.kind_color(kind)
            left, top = x_off + x0 * scale, y_off + y0 * scale
            right, bottom = x_off + x1 * scale - 1, y_off + y1 * scale - 1  # exclusive max -> last pixel
            for x, y in ((left, top + 1), (right, bottom - 1), (left + 1, bottom), (right - 1, top)):
                assert tuple(tile[y, x]) == color, (panel, kind, x, y)
            # Just outside the box (right and below) is still the image.
            assert tuple(tile[bottom + 1, right + 1]) == GRAY
        # The interior of the large box, away from its label, is untouched image.
        interior = tile[y_off + 40 * scale:y_off + 50 * scale, x_off + 25 * scale:x_off + 39 * scale]
        assert (interior == GRAY).all()
    assert preview.kind_color("color") != preview.kind_color("move")


def test_contact_sheet_grid_size():
    tiles = [record(seed=s) for s in range(5)]
    sheet = preview.contact_sheet(tiles, columns=2, scale=1)
    one = preview.draw_pair(tiles[0], scale=1)
    assert sheet.size == (2 * (one.width + 2 * preview._GAP), 3 * (one.height + 2 * preview._GAP))
    # Auto scale enlarges small images to at least 256 px per panel.
    assert preview.contact_sheet(tiles[:1]).width >= 2 * 256
    with pytest.raises(ValueError, match="at least one record"):
        preview.contact_sheet([])


def test_cli_writes_a_sheet_from_shards(tmp_path):
    path = str(tmp_path / "pairs-00000-of-00001.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for s in range(3):
        r = record(seed=s)
        pair = types.SimpleNamespace(seed=s, image_a=r["image_a"], image_b=r["image_b"], boxes=r["boxes"],
                                     kinds=r["kinds"], differences=[], spec_a={}, spec_b={}, attempts=1,
                                     rejections={})
        writer.write(schema.encode(pair))
    writer.close()
    out = str(tmp_path / "sheet.png")
    result = subprocess.run([sys.executable, "-m", "data_pipeline.preview", f"--data={tmp_path}/*.array_record",
                             f"--output={out}", "--num_pairs=5", "--columns=3", "--scale=1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sheet = Image.open(out)
    one = preview.draw_pair(record(), scale=1)
    assert sheet.size == (3 * (one.width + 2 * preview._GAP), one.height + 2 * preview._GAP)  # 3 pairs exist
    bad = subprocess.run([sys.executable, "-m", "data_pipeline.preview", f"--data={tmp_path}/none*",
                          f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "no shard matches" in bad.stderr
