"""Pure difference sampling: scene spec A + numpy Generator -> scene spec B + one record per difference.

Kinds (each targets its own object; at most one difference per object):
  add       a new object (new id) placed clear of the others;  before = None
  remove    an object disappears;                              after = None
  color     another of the 8 colors
  material  rubber <-> metal
  size      small <-> large (kept only if the grown object stays clear of its neighbours)
  shape     another shape (same clearance rule)
  move      displaced by a distance in `move_distance` metres in a random direction, to a clear spot;
            the bound keeps the union of the before/after masks, hence the box, compact
  rotate    yaw changed by an amount that is visible for the shape: only shapes with a yaw period
            (cube 90 deg, lying capsule and ellipsoid 180 deg) are eligible, and the change is at least
            `min_rotation` degrees away from any symmetric pose

A record is {"kind", "object_id", "before", "after"} where before/after hold the object's attributes
(scene.ATTRIBUTES) or None; data_pipeline.pairs adds the pixel "box" once both images are rendered.
Visibility of the change is not judged here but measured on pixels by data_pipeline.validate.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from data_pipeline import scene as scene_lib

# Every kind of difference the generator can draw. A kind's position here is its id in the loader's
# `kind_ids` and in evaluation, so append new kinds at the end.
KINDS = ("add", "remove", "color", "material", "size", "shape", "move", "rotate")


@dataclasses.dataclass(frozen=True)
class DifferenceSettings:
    """The part of the generator config that difference sampling needs."""

    num_differences_min: int = 1
    num_differences_max: int = 3
    kinds: tuple = KINDS
    kind_weights: tuple | None = None
    move_distance: tuple = (0.07, 0.16)
    placement_radius: float = 0.42
    min_gap: float = 0.02
    placement_tries: int = 60
    num_slots: int = 13  # object ids must stay below this (the renderer's slot count)
    min_rotation: float = 25.0
    draw_tries: int = 20  # redraws of one difference (kind + target) before giving up on the candidate

    @classmethod
    def from_config(cls, config) -> "DifferenceSettings":
        return cls(
            num_differences_min=config.num_differences_min,
            num_differences_max=config.num_differences_max,
            kinds=tuple(config.kinds),
            kind_weights=None if config.kind_weights is None else tuple(config.kind_weights),
            move_distance=tuple(config.move_distance),
            placement_radius=config.placement_radius,
            min_gap=config.min_gap,
            placement_tries=config.placement_tries,
            num_slots=config.max_objects + config.num_differences_max,
        )


class DifferenceError(RuntimeError):
    """The drawn differences could not be realised in this scene (e.g. no room to move or add)."""

    reason = "difference_unrealisable"


def attributes(obj: dict | None) -> dict | None:
    """The object's attribute dict (no id), or None."""
    return None if obj is None else {k: obj[k] for k in scene_lib.ATTRIBUTES}


def _others(spec: dict, obj_id: int) -> list[dict]:
    return [o for o in spec["objects"] if o["id"] != obj_id]


def _fits(obj: dict, spec: dict, s: DifferenceSettings) -> bool:
    r = scene_lib.footprint_radius(obj["shape"], obj["size"])
    return scene_lib.is_clear(obj["x"], obj["y"], r, _others(spec, obj["id"]), s.min_gap, s.placement_radius)


def _mutate(kind: str, obj: dict, spec_b: dict, rng: np.random.Generator, s: DifferenceSettings) -> dict | None:
    """The changed object for `kind`, or None if this object cannot take this change here."""
    new = dict(obj)
    if kind == "color":
        new["color"] = str(rng.choice([c for c in scene_lib.COLORS if c != obj["color"]]))
    elif kind == "material":
        new["material"] = next(m for m in scene_lib.MATERIALS if m != obj["material"])
    elif kind == "size":
        new["size"] = next(z for z in scene_lib.SIZES if z != obj["size"])
        return new if _fits(new, spec_b, s) else None
    elif kind == "shape":
        new["shape"] = str(rng.choice([z for z in scene_lib.SHAPES if z != obj["shape"]]))
        return new if _fits(new, spec_b, s) else None
    elif kind == "move":
        for _ in range(s.placement_tries):
            angle = rng.uniform(0.0, 2 * math.pi)
            dist = rng.uniform(*s.move_distance)
            new["x"], new["y"] = float(obj["x"] + dist * math.cos(angle)), float(obj["y"] + dist * math.sin(angle))
            if _fits(new, spec_b, s):
                return new
        return None
    elif kind == "rotate":
        period = scene_lib.ROTATION_PERIOD[obj["shape"]]
        if period is None or period < 2 * s.min_rotation:
            return None
        delta = rng.uniform(s.min_rotation, period - s.min_rotation) * rng.choice([-1.0, 1.0])
        new["yaw"] = float((obj["yaw"] + delta) % 360.0)
    else:
        raise ValueError(f"unknown difference kind {kind!r}")
    return new


def _draw_one(kind: str, spec_b: dict, targeted: set, rng: np.random.Generator, s: DifferenceSettings) -> dict | None:
    """Applies one difference of `kind` to spec_b in place and returns its record, or None if impossible."""
    objects = spec_b["objects"]
    if kind == "add":
        new_id = max([o["id"] for o in objects] + list(targeted) + [-1]) + 1
        if new_id >= s.num_slots:
            return None
        settings = scene_lib.SceneSettings(
            placement_radius=s.placement_radius, min_gap=s.min_gap, placement_tries=s.placement_tries
        )
        placed = scene_lib.place(rng, scene_lib.random_attributes(rng), objects, settings)
        if placed is None:
            return None
        obj = {"id": new_id, **placed}
        objects.append(obj)
        targeted.add(new_id)
        return {"kind": kind, "object_id": new_id, "before": None, "after": attributes(obj)}
    candidates = [o for o in objects if o["id"] not in targeted]
    if kind == "rotate":
        candidates = [o for o in candidates if scene_lib.ROTATION_PERIOD[o["shape"]] is not None]
    if not candidates:
        return None
    obj = candidates[rng.integers(len(candidates))]
    if kind == "remove":
        objects.remove(obj)
        targeted.add(obj["id"])
        return {"kind": kind, "object_id": obj["id"], "before": attributes(obj), "after": None}
    new = _mutate(kind, obj, spec_b, rng, s)
    if new is None:
        return None
    objects[objects.index(obj)] = new
    targeted.add(obj["id"])
    return {"kind": kind, "object_id": obj["id"], "before": attributes(obj), "after": attributes(new)}


def sample_differences(spec_a: dict, rng: np.random.Generator, s: DifferenceSettings) -> tuple[dict, list[dict]]:
    """Returns (spec_b, records); spec_a is not modified. Raises DifferenceError when unrealisable."""
    spec_b = copy.deepcopy(spec_a)
    n = int(rng.integers(s.num_differences_min, s.num_differences_max + 1))
    kinds = list(s.kinds)
    p = None
    if s.kind_weights is not None:
        p = np.asarray(s.kind_weights, np.float64)
        p = p / p.sum()
    records: list[dict] = []
    targeted: set[int] = set()
    for _ in range(n):
        for _ in range(s.draw_tries):
            kind = str(kinds[rng.choice(len(kinds), p=p)])
            record = _draw_one(kind, spec_b, targeted, rng, s)
            if record is not None:
                records.append(record)
                break
        else:
            raise DifferenceError(
                f"could not realise difference {len(records) + 1} of {n} in {s.draw_tries} draws (kinds {kinds})"
            )
    spec_b["objects"].sort(key=lambda o: o["id"])
    return spec_b, records
