"""Pixel-level checks of a rendered pair, and the exact boxes of its differences.

Definitions (all on the rendered images, RGB uint8[H, W, 3] and labels int16[H, W] from
data_pipeline.render, where a label is the object id or -1):
  box        of a difference: the tight box around the changed object's pixels in A and in B (their
             union), as float [x_min, y_min, x_max, y_max] with x_max/y_max EXCLUSIVE (max pixel + 1),
             so a 1-pixel object has width 1. Labels come from the segmentation render, which has no
             anti-aliasing, so boxes are exact.
  changed    a pixel whose max channel |A - B| exceeds a threshold.
  shadow region (shadows on only): the image of the volume between a changed object (before or after)
             and its shadow on the table top, i.e. the convex hull of the projections of its bounding-box
             corners and of those corners pushed along the key light onto z = 0, padded by
             `shadow_padding` px. Any surface the object can darken lies in that volume. Light elevation
             (>= 45 deg) and the placement disc keep every shadow on the table, so z = 0 suffices.

Rejection reasons (counted by data_pipeline.pairs):
  object_hidden        an unchanged object shows fewer than min_visible_pixels in A or in B
  difference_occluded  a changed object shows fewer than min_visible_pixels in an image that holds it
  difference_invisible fewer than min_changed_pixels pixels inside the changed object's A|B masks change
                       by more than visible_threshold
  boxes_overlap        two difference boxes have IoU > max_box_iou
  unexplained_change   more than outside_tolerance pixels change (> pixel_threshold) outside the boxes
                       padded by box_padding (and, with shadows, outside the changed objects' shadow
                       regions)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipeline import render as render_lib
from data_pipeline import scene as scene_lib


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """The part of the generator config that validation needs."""

    min_visible_pixels: int = 150
    min_changed_pixels: int = 120
    visible_threshold: int = 24
    pixel_threshold: int = 0
    box_padding: int = 2
    outside_tolerance: int = 0
    shadow_padding: int = 3
    max_box_iou: float = 0.1
    shadows: bool = False

    @classmethod
    def from_config(cls, config) -> "ValidationSettings":
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Verdict:
    boxes: np.ndarray  # float32[M, 4] xyxy, max exclusive; rows of NaN where an object shows no pixel
    reason: str | None  # None when the pair is accepted
    detail: str = ""


def visible_pixels(labels: np.ndarray, num_ids: int) -> np.ndarray:
    """int64[num_ids]: pixel count of each object id in a label image."""
    return np.bincount((labels.ravel() + 1).view(np.uint16), minlength=num_ids + 1)[1 : num_ids + 1]


def hidden_objects(labels: np.ndarray, spec: dict, min_pixels: int) -> list[int]:
    """Ids of the spec's objects that show fewer than `min_pixels` pixels."""
    counts = visible_pixels(labels, max([o["id"] for o in spec["objects"]] + [0]) + 1)
    return [o["id"] for o in spec["objects"] if counts[o["id"]] < min_pixels]


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """float32[4] tight xyxy box (max exclusive) of a bool[H, W] mask, or None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two xyxy boxes (max exclusive)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def changed_pixels(rgb_a: np.ndarray, rgb_b: np.ndarray, threshold: int) -> np.ndarray:
    """bool[H, W]: max over channels of |A - B| > threshold."""
    # uint8 throughout (max - min cannot wrap) and channel-wise maxima: ~5x faster than int16 + max(-1).
    d = np.maximum(rgb_a, rgb_b)
    d -= np.minimum(rgb_a, rgb_b)
    return np.maximum(np.maximum(d[..., 0], d[..., 1]), d[..., 2]) > threshold


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """float64[K, 2] counter-clockwise hull (in x-right, y-up sense) of float[N, 2] points (monotone chain)."""
    pts = sorted(set(map(tuple, np.round(points, 6))))
    if len(pts) < 3:
        return np.array(pts, np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1], np.float64)


def fill_convex_polygon(mask: np.ndarray, hull: np.ndarray, padding: float) -> None:
    """Sets mask pixels whose centre lies inside the convex polygon `hull` grown by `padding` px."""
    h, w = mask.shape
    x0, y0 = np.floor(hull.min(axis=0) - padding).astype(int)
    x1, y1 = np.ceil(hull.max(axis=0) + padding).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1 + 1, w), min(y1 + 1, h)
    if x0 >= x1 or y0 >= y1:
        return
    xs = np.arange(x0, x1) + 0.5
    ys = np.arange(y0, y1)[:, None] + 0.5
    inside = np.ones((y1 - y0, x1 - x0), bool)
    for p, q in zip(hull, np.roll(hull, -1, axis=0)):
        edge = q - p
        length = float(np.hypot(*edge))
        if length == 0:
            continue
        # Signed distance to the edge's line, positive on the hull's inner side (hull is counter-clockwise).
        dist = (edge[0] * (ys - p[1]) - edge[1] * (xs - p[0])) / length
        inside &= dist >= -padding
    mask[y0:y1, x0:x1] |= inside


def shadow_region(objects: list[dict], spec: dict, resolution: int, padding: float) -> np.ndarray:
    """bool[H, W]: where the key light's shadows of `objects` (as placed in `spec`'s view) can fall."""
    mask = np.zeros((resolution, resolution), bool)
    d = render_lib.light_direction(spec["light"])
    for obj in objects:
        corners = scene_lib.bounding_corners(obj)
        on_table = corners + (-corners[:, 2:3] / d[2]) * d  # pushed along the light onto z = 0
        pix = render_lib.project(spec["camera"], resolution, np.concatenate([corners, on_table]))
        fill_convex_polygon(mask, _convex_hull(pix), padding)
    return mask


def check_pair(
    rgb_a: np.ndarray,
    labels_a: np.ndarray,
    rgb_b: np.ndarray,
    labels_b: np.ndarray,
    spec_a: dict,
    spec_b: dict,
    records: list[dict],
    s: ValidationSettings,
) -> Verdict:
    """Computes the difference boxes and the first rejection reason (None if the pair is accepted)."""
    num_ids = max([o["id"] for o in spec_a["objects"] + spec_b["objects"]] + [0]) + 1
    count_a, count_b = visible_pixels(labels_a, num_ids), visible_pixels(labels_b, num_ids)
    changed_ids = {r["object_id"] for r in records}
    boxes = np.full((len(records), 4), np.nan, np.float32)

    def verdict(reason, detail):
        return Verdict(boxes, reason, detail)

    for spec, counts, name in ((spec_a, count_a, "A"), (spec_b, count_b, "B")):
        for o in spec["objects"]:
            if counts[o["id"]] < s.min_visible_pixels:
                reason = "difference_occluded" if o["id"] in changed_ids else "object_hidden"
                return verdict(reason, f"object {o['id']} shows {counts[o['id']]} px in {name}")

    visible = changed_pixels(rgb_a, rgb_b, s.visible_threshold) if records else None
    for i, r in enumerate(records):
        mask = (labels_a == r["object_id"]) | (labels_b == r["object_id"])
        boxes[i] = mask_box(mask)
        n_changed = int(np.count_nonzero(visible[mask]))
        if n_changed < s.min_changed_pixels:
            return verdict("difference_invisible", f"{r['kind']} of object {r['object_id']} changes {n_changed} px")

    for i in range(len(records)):
        for j in range(i + 1, len(records)):
            iou = box_iou(boxes[i], boxes[j])
            if iou > s.max_box_iou:
                return verdict("boxes_overlap", f"differences {i} and {j} have box IoU {iou:.3f}")

    allowed = np.zeros(labels_a.shape, bool)
    p = s.box_padding
    for x0, y0, x1, y1 in boxes.astype(int):
        allowed[max(y0 - p, 0) : y1 + p, max(x0 - p, 0) : x1 + p] = True
    if s.shadows and records:
        before = [o for o in spec_a["objects"] if o["id"] in changed_ids]
        after = [o for o in spec_b["objects"] if o["id"] in changed_ids]
        allowed |= shadow_region(before, spec_a, labels_a.shape[0], s.shadow_padding)
        allowed |= shadow_region(after, spec_b, labels_a.shape[0], s.shadow_padding)
    n_outside = int(np.count_nonzero(changed_pixels(rgb_a, rgb_b, s.pixel_threshold) & ~allowed))
    if n_outside > s.outside_tolerance:
        return verdict("unexplained_change", f"{n_outside} changed px outside the padded boxes")
    return verdict(None, "")
