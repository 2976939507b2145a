"""Contact sheet of DiG pairs: image A | image B per pair, every difference boxed and labelled by kind.

    python -m data_pipeline.preview --data='/tmp/dig/*.array_record' --output=/tmp/dig/sheet.png \
        --num_pairs=8 --columns=2

The quickest check that a dataset is what it claims: a box that does not sit on a visible change, or a
change without a box, shows at a glance. Boxes are drawn on both images (the box covers the object's
extent before and after the change), in one colour per kind, with the kind written above the box.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.differences import KINDS

# One colour per kind, fixed so that sheets of different datasets compare. Unknown kinds are white.
_PALETTE = [(255, 64, 64), (64, 160, 255), (255, 200, 0), (0, 220, 120), (220, 80, 255), (255, 128, 0),
            (0, 230, 230), (255, 105, 180)]
KIND_COLORS = {kind: _PALETTE[i % len(_PALETTE)] for i, kind in enumerate(KINDS)}
_GAP, _CAPTION = 4, 14  # pixels between panels / above each pair for its caption


def kind_color(kind: str) -> tuple[int, int, int]:
    return KIND_COLORS.get(kind, (255, 255, 255))


def _label(draw: ImageDraw.ImageDraw, font, kind: str, x: float, box_top: float) -> None:
    """The kind in its colour on a black tag that ends just above the box (or at the panel's top)."""
    left, top, right, bottom = draw.textbbox((0, 0), kind, font=font)
    y = max(_CAPTION - top + 1, box_top - 1 - bottom)
    draw.rectangle([x + left - 1, y + top - 1, x + right, y + bottom], fill=(0, 0, 0))
    draw.text((x, y), kind, fill=kind_color(kind), font=font)


def draw_pair(record: dict, *, scale: int = 1) -> Image.Image:
    """A | B side by side (each upscaled by the integer `scale`, nearest), boxes and kinds drawn.

    `record` is `schema.decode`'s dict (image_a, image_b, boxes, kinds, seed, num_differences). Boxes are
    pixel xyxy with exclusive max, so the outline covers pixels x0..x1-1 and y0..y1-1 of the image.
    """
    h, w, _ = record["image_a"].shape
    panel_w, panel_h = w * scale, h * scale
    canvas = Image.new("RGB", (2 * panel_w + _GAP, panel_h + _CAPTION), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    caption = f"seed {record.get('seed', '?')}  {record['num_differences']} diff"
    draw.text((2, 1), caption, fill=(255, 255, 255), font=font)
    width = 1 if panel_w < 256 else 2
    for p, image in enumerate((record["image_a"], record["image_b"])):
        x_off = p * (panel_w + _GAP)
        panel = Image.fromarray(np.asarray(image, np.uint8))
        if scale != 1:
            panel = panel.resize((panel_w, panel_h), Image.NEAREST)
        canvas.paste(panel, (x_off, _CAPTION))
        for box, kind in zip(np.asarray(record["boxes"]).reshape(-1, 4), record["kinds"]):
            x0, y0, x1, y1 = (float(v) * scale for v in box)
            rect = [x_off + x0, _CAPTION + y0, x_off + max(x0, x1 - 1), _CAPTION + max(y0, y1 - 1)]
            draw.rectangle(rect, outline=kind_color(kind), width=width)
            _label(draw, font, kind, rect[0], rect[1])
    return canvas


def contact_sheet(records: Sequence[dict], *, columns: int = 2, scale: int | None = None) -> Image.Image:
    """Pairs on a grid, `columns` pairs per row; `scale` None = enlarge images smaller than 256 px."""
    if not records:
        raise ValueError("contact_sheet needs at least one record")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if scale is None:
        scale = max(1, -(-256 // records[0]["image_a"].shape[1]))  # panels at least 256 px wide
    tiles = [draw_pair(r, scale=scale) for r in records]
    tile_w = max(t.width for t in tiles) + _GAP * 2
    tile_h = max(t.height for t in tiles) + _GAP * 2
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (min(columns, len(tiles)) * tile_w, rows * tile_h), (40, 40, 40))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * tile_w + _GAP, (i // columns) * tile_h + _GAP))
    return sheet


def preview_shards(shards: str | Sequence[str], output_path: str, *, num_pairs: int = 8, start: int = 0,
                   columns: int = 2, scale: int | None = None) -> str:
    """Writes the contact sheet of records [start, start + num_pairs) of the sorted shards to a PNG."""
    import grain

    from data_pipeline import loader, schema

    source = grain.sources.ArrayRecordDataSource(loader.list_shards(shards))
    if not 0 <= start < len(source):
        raise ValueError(f"start must be in [0, {len(source)}) for these shards, got {start}")
    records = []
    for i in range(start, min(start + num_pairs, len(source))):
        try:
            records.append(schema.decode(source[i]))
        except schema.SchemaError as e:
            raise schema.SchemaError(f"record {i} of {shards!r}: {e}") from None
    contact_sheet(records, columns=columns, scale=scale).save(output_path)
    return output_path


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    f = flags.FLAGS
    print(preview_shards(f.data, f.output, num_pairs=f.num_pairs, start=f.start, columns=f.columns,
                         scale=f.scale or None))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("data", None, "Glob of .array_record shards.", required=True)
    flags.DEFINE_string("output", None, "PNG file to write.", required=True)
    flags.DEFINE_integer("num_pairs", 8, "Pairs on the sheet.", lower_bound=1)
    flags.DEFINE_integer("start", 0, "Index of the first pair (in sorted-shard order).", lower_bound=0)
    flags.DEFINE_integer("columns", 2, "Pairs per row.", lower_bound=1)
    flags.DEFINE_integer("scale", 0, "Integer upscaling of the images; 0 = automatic.", lower_bound=0)
    app.run(main)
