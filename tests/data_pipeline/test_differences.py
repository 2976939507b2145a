"""Difference sampling: spec-level invariants of every kind, and that each kind alone changes the pixels."""

import copy
import math

import numpy as np
import pytest

from data_pipeline import settings as datagen
from data_pipeline import differences, pairs, scene

KINDS = datagen.KINDS


def _settings(**kw):
    return differences.DifferenceSettings(**kw)


def _changed_attributes(a: dict, b: dict) -> set:
    return {k for k in scene.ATTRIBUTES if a[k] != b[k]}


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_only_its_object_as_recorded(kind):
    s = _settings(num_differences_min=1, num_differences_max=1, kinds=(kind,))
    expected = {
        "color": {"color"},
        "material": {"material"},
        "size": {"size"},
        "shape": {"shape"},
        "move": {"x", "y"},
        "rotate": {"yaw"},
    }
    done = 0
    for seed in range(40):
        spec_a = scene.sample_scene(np.random.default_rng(seed), scene.SceneSettings())
        frozen = copy.deepcopy(spec_a)
        try:
            spec_b, records = differences.sample_differences(spec_a, np.random.default_rng([seed, 1]), s)
        except differences.DifferenceError:
            continue
        done += 1
        assert spec_a == frozen  # pure: the input spec is untouched
        (r,) = records
        assert r["kind"] == kind
        ids_a = {o["id"]: o for o in spec_a["objects"]}
        ids_b = {o["id"]: o for o in spec_b["objects"]}
        # Every object other than the target is identical in A and B.
        for i in set(ids_a) | set(ids_b):
            if i != r["object_id"]:
                assert ids_a[i] == ids_b[i]
        before, after = ids_a.get(r["object_id"]), ids_b.get(r["object_id"])
        if kind == "add":
            assert before is None and r["before"] is None and r["object_id"] >= len(spec_a["objects"])
            assert r["object_id"] < s.num_slots
        elif kind == "remove":
            assert after is None and r["after"] is None
        else:
            assert _changed_attributes(before, after) == expected[kind]
        for state, rec in ((before, r["before"]), (after, r["after"])):
            assert rec == (None if state is None else {k: state[k] for k in scene.ATTRIBUTES})
        if kind == "move":
            dist = math.hypot(after["x"] - before["x"], after["y"] - before["y"])
            assert s.move_distance[0] - 1e-9 <= dist <= s.move_distance[1] + 1e-9
        if kind == "rotate":
            period = scene.ROTATION_PERIOD[before["shape"]]
            assert period is not None
            delta = (after["yaw"] - before["yaw"]) % period
            assert min(delta, period - delta) >= s.min_rotation - 1e-6
        # B is still a valid layout: footprints keep the gap and stay in the placement disc.
        for o in spec_b["objects"]:
            others = [p for p in spec_b["objects"] if p["id"] != o["id"]]
            assert scene.is_clear(
                o["x"],
                o["y"],
                scene.footprint_radius(o["shape"], o["size"]),
                others,
                s.min_gap - 1e-9,
                s.placement_radius,
            )
    assert done >= 30, f"{kind}: only {done} of 40 scenes could take the change"


def test_counts_weights_and_distinct_targets():
    weights = (0, 0, 1, 0, 0, 0, 1, 0)  # color and move only
    s = _settings(num_differences_min=0, num_differences_max=3, kind_weights=weights)
    counts = set()
    for seed in range(60):
        spec_a = scene.sample_scene(np.random.default_rng(seed), scene.SceneSettings())
        spec_b, records = differences.sample_differences(spec_a, np.random.default_rng(seed), s)
        counts.add(len(records))
        assert {r["kind"] for r in records} <= {"color", "move"}
        assert len({r["object_id"] for r in records}) == len(records)
        if not records:
            assert spec_b == spec_a
    assert counts == {0, 1, 2, 3}


def test_impossible_rotation_raises():
    spec = scene.sample_scene(np.random.default_rng(0), scene.SceneSettings())
    for o in spec["objects"]:
        o["shape"] = "sphere"
    with pytest.raises(differences.DifferenceError, match="could not realise"):
        differences.sample_differences(spec, np.random.default_rng(0), _settings(kinds=("rotate",)))


def test_each_kind_alone_changes_the_rendered_image():
    """Forcing one kind at a time, the pair's pixels change inside the box, by the configured amount."""
    for kind in KINDS:
        cfg = datagen.get_config("160")
        cfg.kinds = (kind,)
        cfg.num_differences_min = cfg.num_differences_max = 1
        gen = pairs.PairGenerator(cfg)
        try:
            for seed in range(2):
                p = gen.make_pair(seed)
                assert p.kinds == [kind]
                x0, y0, x1, y1 = p.boxes[0].astype(int)
                diff = np.abs(p.image_a.astype(int) - p.image_b.astype(int)).max(-1)
                inside = diff[y0:y1, x0:x1]
                assert np.count_nonzero(inside > cfg.visible_threshold) >= cfg.min_changed_pixels, (kind, seed)
                outside = diff.copy()
                outside[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = 0
                assert np.count_nonzero(outside) == 0, (kind, seed)
        finally:
            gen.close()
