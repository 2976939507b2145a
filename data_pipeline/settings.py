"""Settings of the paired-scene generator (data_pipeline.pairs.PairGenerator): defaults and validation.

Presets by `arg`: None / "448" (the default), "224", "160" (tests, demos); any other integer works too.
Pixel-count thresholds scale with the image area so that a preset means the same physical thing at every
resolution; override any field with `--config.<field>=value` and call `validate(config)` before use
(PairGenerator does), which raises a ValueError naming the offending field.

This file is also an ml_collections config file (it has `get_config(arg)`), the default of
`python -m data_pipeline.generate`; `configs/datagen.py` re-exports it for the training configs.

Launch: python -m data_pipeline.generate --output_dir=/tmp/dig --num_pairs=1000 --workers=2 \
            --config=data_pipeline/settings.py:224 --config.shadows=True
"""

from __future__ import annotations

import ml_collections

from data_pipeline.differences import KINDS

_REFERENCE_RESOLUTION = 448


def _scaled(pixels_at_448: float, resolution: int) -> int:
    """Scales a pixel count defined at 448x448 to `resolution`, keeping at least 1."""
    return max(1, int(round(pixels_at_448 * (resolution / _REFERENCE_RESOLUTION) ** 2)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the generator config; `arg` is a resolution preset ("448", "224", "160")."""
    if arg and not arg.isdigit():
        raise ValueError(f"datagen config arg {arg!r} is not a resolution preset such as '448' or '224'")
    resolution = int(arg) if arg else _REFERENCE_RESOLUTION
    c = ml_collections.ConfigDict()
    c.resolution = resolution  # square images, pixels per side
    # Scene content.
    c.min_objects = 4
    c.max_objects = 10
    c.num_differences_min = 1  # 0 allowed: identical pairs for hallucination training
    c.num_differences_max = 3
    c.kinds = KINDS  # difference kinds that may be drawn
    c.kind_weights = ml_collections.config_dict.placeholder(tuple)  # same length as kinds, or None = uniform
    c.shadows = False  # shadow casting by the key light; validation then masks the changed objects' shadows
    c.camera_jitter = True  # per-scene jitter of camera azimuth/elevation/distance/look-at and light direction
    c.camera_fovy = 42.0  # degrees; lower zooms in (pair with a smaller placement_radius to keep objects in view)
    # Geometry (metres): objects are placed inside a disc of this radius centred on the table.
    c.placement_radius = 0.42
    c.min_gap = 0.02  # minimum distance between the bounding circles of two objects
    c.move_distance = (0.07, 0.16)  # a "move" displaces the object by this much (keeps its box compact)
    c.placement_tries = 60  # per object, before the whole scene is re-placed (CLEVR-style)
    # Validation (see data_pipeline/validate.py).
    c.min_visible_pixels = _scaled(150, resolution)  # every object, in both images
    c.min_changed_pixels = _scaled(120, resolution)  # per difference, inside its masks, at visible_threshold
    c.visible_threshold = 24  # max |A-B| over channels (0..255) for a pixel to count as visibly changed
    c.pixel_threshold = 0  # max |A-B| above which a pixel counts as changed for the outside-box check
    c.box_padding = 2  # pixels added around each box for the outside check (1 px anti-aliasing fringe)
    c.outside_tolerance = 0  # changed pixels allowed outside the padded boxes (and shadow regions)
    c.shadow_padding = 3  # pixels added around a changed object's projected shadow region
    c.max_box_iou = 0.1  # largest IoU allowed between two difference boxes of one pair
    c.max_attempts = 200  # candidates per seed before make_pair gives up with an error
    c.difference_tries = 4  # difference draws per scene before the scene itself is re-drawn
    # Rendering.
    c.antialias_samples = 4  # MSAA samples of the offscreen buffer (0 = off; Mesa llvmpipe treats any >0 as 4)
    c.shadow_map_size = 1024  # texels per side of the key light's shadow map (2048 costs ~40% more per frame)
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first invalid field of a generator config."""

    def fail(field: str, why: str):
        raise ValueError(f"datagen config field '{field}' = {c.get(field)!r}: {why}")

    if not isinstance(c.resolution, int) or not 32 <= c.resolution <= 2048:
        fail("resolution", "must be an int in [32, 2048]")
    if not isinstance(c.min_objects, int) or c.min_objects < 1:
        fail("min_objects", "must be an int >= 1")
    if not isinstance(c.max_objects, int) or c.max_objects < c.min_objects:
        fail("max_objects", f"must be an int >= min_objects ({c.min_objects})")
    if c.max_objects > 16:
        fail("max_objects", "must be <= 16 (the table has room for about 16 objects)")
    if not isinstance(c.num_differences_min, int) or c.num_differences_min < 0:
        fail("num_differences_min", "must be an int >= 0")
    if not isinstance(c.num_differences_max, int) or c.num_differences_max < c.num_differences_min:
        fail("num_differences_max", f"must be an int >= num_differences_min ({c.num_differences_min})")
    if c.num_differences_max > c.min_objects:
        fail("num_differences_max", f"must be <= min_objects ({c.min_objects}): each difference needs its own object")
    kinds = tuple(c.kinds)
    if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
        fail("kinds", f"must be a non-empty tuple of distinct kinds from {KINDS}")
    if c.kind_weights is not None:
        w = tuple(c.kind_weights)
        if len(w) != len(kinds) or any(not isinstance(x, (int, float)) or x < 0 for x in w) or sum(w) <= 0:
            fail(
                "kind_weights", f"must be None or {len(kinds)} non-negative numbers (one per kind) with a positive sum"
            )
    if not isinstance(c.shadows, bool):
        fail("shadows", "must be a bool")
    if not isinstance(c.camera_fovy, (int, float)) or not 10.0 <= c.camera_fovy <= 60.0:
        fail("camera_fovy", "must be a number of degrees in [10, 60]")
    if not 0.1 <= c.placement_radius <= 0.5:
        fail("placement_radius", "must be in [0.1, 0.5] metres (the camera frames about 0.45 m around the centre)")
    if c.min_gap < 0:
        fail("min_gap", "must be >= 0")
    lo_hi = tuple(c.move_distance)
    if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
        fail("move_distance", "must be (min, max) metres with 0 < min <= max")
    for field in ("placement_tries", "max_attempts", "difference_tries"):
        if not isinstance(c[field], int) or c[field] < 1:
            fail(field, "must be an int >= 1")
    if not isinstance(c.antialias_samples, int) or not 0 <= c.antialias_samples <= 16:
        fail("antialias_samples", "must be an int in [0, 16] (0 = no anti-aliasing)")
    for field in ("min_visible_pixels", "min_changed_pixels"):
        if not isinstance(c[field], int) or c[field] < 1:
            fail(field, "must be an int >= 1 pixels")
    for field in ("visible_threshold", "pixel_threshold"):
        if not isinstance(c[field], int) or not 0 <= c[field] < 255:
            fail(field, "must be an int in [0, 255)")
    for field in ("box_padding", "outside_tolerance", "shadow_padding"):
        if not isinstance(c[field], int) or c[field] < 0:
            fail(field, "must be an int >= 0")
    if not 0.0 <= c.max_box_iou <= 1.0:
        fail("max_box_iou", "must be in [0, 1]")
    if not isinstance(c.shadow_map_size, int) or c.shadow_map_size < 256:
        fail("shadow_map_size", "must be an int >= 256")


def demo_settings(demo) -> ml_collections.ConfigDict:
    """The generator settings of the CPU demo's data: one or two differences of `demo.kinds`.

    `demo` is the `demo` section of a training config (configs/demo_cpu.py): resolution, min/max_objects,
    camera_fovy, placement_radius, kinds and (optional) kind_weights. dig_jax.demo and
    benchmarks/demo_learnability.py both render with it, so they see the same scenes.
    """
    g = get_config(str(demo.resolution))
    g.num_differences_min, g.num_differences_max = 1, 2
    g.min_objects, g.max_objects = demo.min_objects, demo.max_objects
    g.camera_fovy, g.placement_radius = demo.camera_fovy, demo.placement_radius
    g.kinds = tuple(demo.kinds)
    g.kind_weights = None if demo.get("kind_weights") is None else tuple(demo.kind_weights)
    return g
