"""Pure scene sampling: a numpy Generator -> a JSON-serialisable tabletop scene spec.

A spec is a plain dict (so it can be stored beside the images and re-rendered later):

  {"camera": {"lookat": [x, y, z], "azimuth": deg, "elevation": deg, "distance": m, "fovy": deg},
   "light": {"azimuth": deg, "elevation": deg},       # key light; it casts the shadows when enabled
   "table": {"rgb": [r, g, b]},                       # tint multiplied onto the table texture
   "objects": [{"id": int, "shape": str, "color": str, "material": str, "size": str,
                "x": m, "y": m, "yaw": deg}, ...]}

Objects rest on the table top (z = 0). Placement is CLEVR-style: each object gets a bounding circle in
the table plane (`footprint_radius`) inside a disc of `placement_radius` (a disc, so that any camera
azimuth frames it), circles keep `min_gap` between them, each object is retried
`placement_tries` times and after that the whole layout is re-drawn. Nothing here touches MuJoCo, so a
spec is a pure function of the generator's state; data_pipeline.render turns it into pixels.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

SHAPES = ("cube", "sphere", "cylinder", "capsule", "ellipsoid")
# The 8 CLEVR colors (sRGB 0..255).
COLORS = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
MATERIALS = ("rubber", "metal")  # matte vs shiny; render.py holds their optical parameters
SIZES = {"small": 0.040, "large": 0.060}  # characteristic half-size in metres
# Yaw period in degrees of each shape seen from above (None: yaw changes nothing visible).
ROTATION_PERIOD = {"cube": 90.0, "sphere": None, "cylinder": None, "capsule": 180.0, "ellipsoid": 180.0}
ATTRIBUTES = ("shape", "color", "material", "size", "x", "y", "yaw")


@dataclasses.dataclass(frozen=True)
class SceneSettings:
    """The part of the generator config that scene sampling needs."""

    min_objects: int = 4
    max_objects: int = 10
    placement_radius: float = 0.42
    min_gap: float = 0.02
    placement_tries: int = 60
    camera_jitter: bool = True
    camera_fovy: float = 42.0  # vertical field of view in degrees: smaller zooms in (bigger objects)

    @classmethod
    def from_config(cls, config) -> "SceneSettings":
        return cls(**{f.name: config[f.name] for f in dataclasses.fields(cls)})


class PlacementError(RuntimeError):
    """No collision-free layout was found within the retry budget."""


def geom_half_sizes(shape: str, size: str) -> tuple[float, float, float]:
    """MuJoCo geom `size` triple of an object (unused entries 0): box half-extents, sphere radius,
    cylinder/capsule (radius, half-length), ellipsoid radii. Capsules lie on their side (see render.py)."""
    s = SIZES[size]
    return {
        "cube": (s, s, s),
        "sphere": (s, 0.0, 0.0),
        "cylinder": (s, s, 0.0),
        "capsule": (0.5 * s, 0.9 * s, 0.0),
        "ellipsoid": (1.35 * s, 0.75 * s, 0.75 * s),
    }[shape]


def local_half_extents(shape: str, size: str) -> np.ndarray:
    """float64[3]: half-extents of the object's bounding box in its own yawed frame (x along its length)."""
    a, b, c = geom_half_sizes(shape, size)
    return np.array(
        {
            "cube": (a, b, c),
            "sphere": (a, a, a),
            "cylinder": (a, a, b),
            "capsule": (a + b, a, a),  # lying along local x
            "ellipsoid": (a, b, c),
        }[shape]
    )


def rest_height(shape: str, size: str) -> float:
    """Height of the object's centre above the table top when it rests on it."""
    return float(local_half_extents(shape, size)[2])


def footprint_radius(shape: str, size: str) -> float:
    """Radius of a circle in the table plane that contains the object at any yaw."""
    hx, hy, _ = local_half_extents(shape, size)
    if shape in ("sphere", "cylinder"):
        return float(hx)
    if shape == "cube":
        return float(math.hypot(hx, hy))
    return float(hx)  # capsule and ellipsoid: the long semi-axis bounds every point


def bounding_corners(obj: dict) -> np.ndarray:
    """float64[8, 3]: world corners of the object's yawed bounding box (it rests on z = 0)."""
    h = local_half_extents(obj["shape"], obj["size"])
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float64)
    local = signs * h
    yaw = math.radians(obj["yaw"])
    rot = np.array([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
    centre = np.array([obj["x"], obj["y"], h[2]])
    return local @ rot.T + centre


def is_clear(x: float, y: float, radius: float, others: list[dict], min_gap: float, placement_radius: float) -> bool:
    """Whether a footprint circle at (x, y) stays inside the placement disc and `min_gap` from `others`."""
    if math.hypot(x, y) + radius > placement_radius + 1e-9:
        return False
    for o in others:
        r = footprint_radius(o["shape"], o["size"])
        if math.hypot(x - o["x"], y - o["y"]) < radius + r + min_gap:
            return False
    return True


def random_attributes(rng: np.random.Generator) -> dict:
    """Shape, color, material, size and yaw drawn uniformly."""
    return {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "color": list(COLORS)[rng.integers(len(COLORS))],
        "material": MATERIALS[rng.integers(len(MATERIALS))],
        "size": list(SIZES)[rng.integers(len(SIZES))],
        "yaw": float(rng.uniform(0.0, 360.0)),
    }


def place(rng: np.random.Generator, attrs: dict, others: list[dict], settings: SceneSettings) -> dict | None:
    """Draws uniform positions for an object until one is clear of `others`; None after the retry budget."""
    radius = footprint_radius(attrs["shape"], attrs["size"])
    lim = settings.placement_radius - radius
    for _ in range(settings.placement_tries):
        x, y = (float(v) for v in rng.uniform(-lim, lim, size=2))
        if is_clear(x, y, radius, others, settings.min_gap, settings.placement_radius):
            return {**attrs, "x": x, "y": y}
    return None


def sample_view(rng: np.random.Generator, jitter: bool, fovy: float = 42.0) -> dict:
    """Camera, key light and table tint; jittered per scene (shared by both images of a pair).

    `fovy` is not jittered: it sets the scale of the whole dataset (42 degrees frames the table; the CPU
    demo zooms in so that objects span a few vision patches)."""
    j = (lambda lo, hi: float(rng.uniform(lo, hi))) if jitter else (lambda lo, hi: 0.5 * (lo + hi))
    return {
        "camera": {
            "lookat": [j(-0.02, 0.02), j(-0.02, 0.02), 0.0],
            "azimuth": j(-110.0, -70.0),
            "elevation": j(-62.0, -48.0),
            "distance": j(1.32, 1.45),
            "fovy": float(fovy),
        },
        "light": {"azimuth": j(-160.0, -20.0), "elevation": j(-65.0, -45.0)},
        "table": {"rgb": [j(0.85, 1.0), j(0.8, 0.95), j(0.75, 0.9)]},
    }


def sample_scene(rng: np.random.Generator, settings: SceneSettings, max_layouts: int = 50) -> dict:
    """Draws a scene spec; raises PlacementError if `max_layouts` layouts in a row fail to place."""
    view = sample_view(rng, settings.camera_jitter, settings.camera_fovy)
    n = int(rng.integers(settings.min_objects, settings.max_objects + 1))
    for _ in range(max_layouts):
        objects: list[dict] = []
        for i in range(n):
            obj = place(rng, random_attributes(rng), objects, settings)
            if obj is None:
                break
            objects.append({"id": i, **obj})
        else:
            return {**view, "objects": objects}
    raise PlacementError(
        f"could not place {n} objects in {max_layouts} layouts "
        f"(placement_radius={settings.placement_radius}, min_gap={settings.min_gap})"
    )
