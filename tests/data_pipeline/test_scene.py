"""Scene sampling, config validation and the camera model, checked against independent geometry/pixels."""

import itertools
import math

import numpy as np
import pytest

from data_pipeline import settings as datagen
from data_pipeline import render, scene


def _outline(obj, n=96):
    """float[K, 2] points on the exact table-plane outline of an object (from its MuJoCo geom sizes)."""
    a, b, c = scene.geom_half_sizes(obj["shape"], obj["size"])
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if obj["shape"] == "cube":
        u = np.linspace(-a, a, n // 4)
        pts = np.concatenate(
            [np.stack([u, np.full_like(u, s * a)], 1) for s in (-1, 1)]
            + [np.stack([np.full_like(u, s * a), u], 1) for s in (-1, 1)]
        )
    elif obj["shape"] in ("sphere", "cylinder"):
        pts = np.stack([a * np.cos(t), a * np.sin(t)], 1)
    elif obj["shape"] == "capsule":  # lying: a segment of half-length b along x, swept by radius a
        ring = np.stack([a * np.cos(t), a * np.sin(t)], 1)
        pts = np.concatenate([ring + [x, 0.0] for x in np.linspace(-b, b, 5)])
    else:  # ellipsoid: radii a (x) and b (y)
        pts = np.stack([a * np.cos(t), b * np.sin(t)], 1)
    yaw = math.radians(obj["yaw"])
    rot = np.array([[math.cos(yaw), -math.sin(yaw)], [math.sin(yaw), math.cos(yaw)]])
    return pts @ rot.T + [obj["x"], obj["y"]]


def test_scenes_respect_counts_and_never_intersect():
    settings = scene.SceneSettings()
    for seed in range(60):
        spec = scene.sample_scene(np.random.default_rng(seed), settings)
        objs = spec["objects"]
        assert settings.min_objects <= len(objs) <= settings.max_objects
        assert [o["id"] for o in objs] == list(range(len(objs)))
        for o in objs:
            assert math.hypot(o["x"], o["y"]) + scene.footprint_radius(o["shape"], o["size"]) <= 0.42 + 1e-9
            corners = scene.bounding_corners(o)
            assert corners[:, 2].min() == pytest.approx(0.0, abs=1e-12)  # rests on the table top
        for a, b in itertools.combinations(objs, 2):
            pa, pb = _outline(a), _outline(b)
            gap = np.sqrt(((pa[:, None] - pb[None]) ** 2).sum(-1)).min()
            # Convex outlines that keep a positive distance and do not contain each other's centre are disjoint.
            assert gap >= 0.95 * settings.min_gap, (seed, a["id"], b["id"], gap)
            assert math.hypot(a["x"] - b["x"], a["y"] - b["y"]) > 0.04


def test_attribute_vocabulary_is_reachable():
    seen = {k: set() for k in ("shape", "color", "material", "size")}
    for seed in range(60):
        for o in scene.sample_scene(np.random.default_rng(seed), scene.SceneSettings())["objects"]:
            for k in seen:
                seen[k].add(o[k])
    assert len(seen["shape"]) >= 5 and len(seen["color"]) >= 8
    assert len(seen["material"]) >= 2 and len(seen["size"]) >= 2


def test_scene_is_a_pure_function_of_the_generator_state():
    a = scene.sample_scene(np.random.default_rng([7, 0, 0]), scene.SceneSettings())
    b = scene.sample_scene(np.random.default_rng([7, 0, 0]), scene.SceneSettings())
    c = scene.sample_scene(np.random.default_rng([7, 1, 0]), scene.SceneSettings())
    assert a == b and a != c


def test_impossible_layout_raises_placement_error():
    settings = scene.SceneSettings(min_objects=16, max_objects=16, placement_radius=0.15, placement_tries=5)
    with pytest.raises(scene.PlacementError, match="could not place 16 objects"):
        scene.sample_scene(np.random.default_rng(0), settings, max_layouts=3)


@pytest.mark.parametrize(
    "field,value",
    [
        ("resolution", 10),
        ("min_objects", 0),
        ("max_objects", 2),
        ("num_differences_min", -1),
        ("num_differences_max", 5),
        ("kinds", ("add", "teleport")),
        ("kind_weights", (1.0, 2.0)),
        ("kinds", ()),
        ("max_box_iou", 1.5),
        ("min_changed_pixels", 0),
        ("outside_tolerance", -1),
        ("move_distance", (0.2, 0.1)),
        ("max_attempts", 0),
        ("placement_radius", 2.0),
        ("camera_fovy", 5.0),
    ],
)
def test_bad_config_names_the_field(field, value):
    cfg = datagen.get_config("160")
    with cfg.unlocked():
        cfg[field] = value
    with pytest.raises(ValueError, match=f"'{field}'"):
        datagen.validate(cfg)


def test_presets_scale_pixel_thresholds_with_area():
    big, small = datagen.get_config(), datagen.get_config("224")
    datagen.validate(big)
    datagen.validate(small)
    assert big.resolution == 448 and small.resolution == 224
    assert small.min_visible_pixels == pytest.approx(big.min_visible_pixels / 4, abs=1)
    assert small.min_changed_pixels == pytest.approx(big.min_changed_pixels / 4, abs=1)
    assert set(big.kinds) == {"add", "remove", "color", "material", "size", "shape", "move", "rotate"}


def test_projection_matches_segmentation_centroids():
    """The camera model used for shadow regions agrees with MuJoCo's own rendering (pixels)."""
    r = render.SceneRenderer(160, 13)
    try:
        for seed in range(3):
            spec = scene.sample_scene(np.random.default_rng(seed), scene.SceneSettings())
            labels = r.render(spec)[1]
            for o in spec["objects"]:
                ys, xs = np.nonzero(labels == o["id"])
                # Bounding-box corners project around the object; the visible pixels must lie in their hull's box.
                pix = render.project(spec["camera"], 160, scene.bounding_corners(o))
                assert xs.min() >= np.floor(pix[:, 0].min()) - 1 and xs.max() + 1 <= np.ceil(pix[:, 0].max()) + 1
                assert ys.min() >= np.floor(pix[:, 1].min()) - 1 and ys.max() + 1 <= np.ceil(pix[:, 1].max()) + 1
                centre = render.project(
                    spec["camera"], 160, [[o["x"], o["y"], scene.rest_height(o["shape"], o["size"])]]
                )
                assert np.hypot(xs.mean() + 0.5 - centre[0, 0], ys.mean() + 0.5 - centre[0, 1]) < 3.0
    finally:
        r.close()


def test_hidden_slots_render_nothing():
    r = render.SceneRenderer(160, 13)
    try:
        spec = scene.sample_scene(np.random.default_rng(3), scene.SceneSettings())
        labels = r.render(spec)[1]
        present = set(np.unique(labels).tolist()) - {-1}
        assert present == {o["id"] for o in spec["objects"]}
        fewer = dict(spec, objects=spec["objects"][:2])
        assert set(np.unique(r.render(fewer)[1]).tolist()) - {-1} == {0, 1}
    finally:
        r.close()


def test_labels_match_mujoco_renderer_segmentation():
    """The fast id decoding agrees with mujoco.Renderer's own segmentation mode (an independent path)."""
    import mujoco

    r = render.SceneRenderer(160, 13)
    ref = mujoco.Renderer(r.model, 160, 160)
    try:
        option = mujoco.MjvOption()
        option.geomgroup[:] = 0
        option.geomgroup[0] = 1
        ref.enable_segmentation_rendering()
        for seed in range(3):
            spec = scene.sample_scene(np.random.default_rng(seed), scene.SceneSettings())
            labels = r.render(spec)[1]
            ref.update_scene(r.data, camera="cam", scene_option=option)
            seg = ref.render()
            slot = seg[..., 0] - mujoco.mj_name2id(r.model, mujoco.mjtObj.mjOBJ_GEOM, "obj0")
            expected = np.where((seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM)) & (slot >= 0) & (slot < 13), slot, -1)
            np.testing.assert_array_equal(labels, expected)
            assert len(np.unique(labels)) == len(spec["objects"]) + 1
    finally:
        ref.close()
        r.close()


def test_labels_are_exact_whatever_the_antialiasing():
    """Segmentation ids are not blended at edges: 4x MSAA and no MSAA (0 samples) give the same labels."""
    spec = scene.sample_scene(np.random.default_rng(5), scene.SceneSettings())
    out = []
    for samples in (4, 0):
        r = render.SceneRenderer(160, 13, antialias_samples=samples)
        try:
            rgb, labels = r.render(spec)
            out.append((rgb, labels))
        finally:
            r.close()
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert np.any(out[0][0] != out[1][0])  # while the RGB images do differ at the edges


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="not a resolution preset"):
        datagen.get_config("huge")


def test_field_of_view_sets_the_scene_scale():
    """camera_fovy reaches the spec unjittered; a narrower view renders the same object larger."""
    settings = scene.SceneSettings(min_objects=1, max_objects=1, placement_radius=0.12, camera_fovy=18.0)
    spec = scene.sample_scene(np.random.default_rng(3), settings)
    assert spec["camera"]["fovy"] == 18.0
    wide = {**spec, "camera": {**spec["camera"], "fovy": 42.0}}
    boxes = {}
    for name, s in (("narrow", spec), ("wide", wide)):
        corners = scene.bounding_corners(s["objects"][0])
        uv = render.project(s["camera"], 128, corners)
        boxes[name] = np.ptp(uv, axis=0)
    ratio = math.tan(math.radians(21.0)) / math.tan(math.radians(9.0))
    np.testing.assert_allclose(boxes["narrow"] / boxes["wide"], ratio, rtol=0.05)
