"""Seed -> one validated image pair with exact difference boxes (scene, differences, render, validate).

Candidates are drawn deterministically from the seed and retried on rejection:
  scene candidate s      rng = np.random.default_rng([seed, s, 0]); A is rendered once per scene
  difference candidate d rng = np.random.default_rng([seed, s, 1 + d]), d < config.difference_tries
A scene whose own objects are not all visible is rejected before any difference is drawn. The first
accepted candidate wins, so `make_pair(seed)` returns byte-identical images in any process.

Rejection reasons counted in Pair.rejections: scene_unplaceable (no layout found), object_hidden (an object
of scene A below min_visible_pixels), difference_unrealisable (e.g. no room to move/add, no rotatable
object), and validate.check_pair's difference_occluded, difference_invisible, boxes_overlap,
unexplained_change (see data_pipeline/validate.py). Each scene or difference candidate counts once.

Throughput (single process): each accepted pair costs two RGB frames and two segmentation frames; a
rejected difference re-renders only B. One 448 px RGB frame takes about 13 ms without shadows (29 ms with
shadows and 4x anti-aliasing) and a segmentation frame 8-10 ms on llvmpipe, i.e. roughly 10-16 pairs/s
per process at 448 px (benchmarks/render_throughput.py measures it). Run one generator per core with
LP_NUM_THREADS=1 (see data_pipeline/render.py).
"""

from __future__ import annotations

import collections
import dataclasses

import ml_collections
import numpy as np

from data_pipeline import differences as diff_lib
from data_pipeline import render as render_lib
from data_pipeline import scene as scene_lib
from data_pipeline import settings as settings_lib
from data_pipeline import validate as validate_lib


@dataclasses.dataclass
class Pair:
    seed: int
    image_a: np.ndarray  # uint8[H, W, 3]
    image_b: np.ndarray  # uint8[H, W, 3]
    boxes: np.ndarray  # float32[M, 4] pixel xyxy, max exclusive, union of the object's A and B masks
    kinds: list[str]  # M kinds
    differences: list[dict]  # M records: kind, object_id, box, before (attrs or None), after (attrs or None)
    spec_a: dict  # JSON-serialisable scene spec (see data_pipeline.scene)
    spec_b: dict
    attempts: int  # candidates drawn, the accepted one included (>= 1)
    rejections: dict[str, int]  # reason -> count among the rejected candidates


class GenerationError(RuntimeError):
    """No candidate was accepted within config.max_attempts."""


class PairGenerator:
    """Owns one MuJoCo model + offscreen Renderer; create ONE per process, inside that process."""

    def __init__(self, config: ml_collections.ConfigDict):
        settings_lib.validate(config)
        self.config = config
        self.scene_settings = scene_lib.SceneSettings.from_config(config)
        self.difference_settings = diff_lib.DifferenceSettings.from_config(config)
        self.validation_settings = validate_lib.ValidationSettings.from_config(config)
        self.renderer = render_lib.SceneRenderer(
            config.resolution,
            self.difference_settings.num_slots,
            shadows=config.shadows,
            antialias_samples=config.antialias_samples,
            shadow_map_size=config.shadow_map_size,
        )

    def make_pair(self, seed: int) -> Pair:
        """The pair of `seed`; raises GenerationError naming the seed if max_attempts candidates fail."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        seed = int(seed)
        cfg = self.config
        rejections: collections.Counter = collections.Counter()
        attempts = 0
        scene_index = 0
        while attempts < cfg.max_attempts:
            scene_rng = np.random.default_rng([seed, scene_index, 0])
            attempts += 1
            try:
                spec_a = scene_lib.sample_scene(scene_rng, self.scene_settings)
            except scene_lib.PlacementError:
                rejections["scene_unplaceable"] += 1
                scene_index += 1
                continue
            rgb_a, labels_a = self.renderer.render(spec_a)
            if validate_lib.hidden_objects(labels_a, spec_a, cfg.min_visible_pixels):
                rejections["object_hidden"] += 1
                scene_index += 1
                continue
            for d in range(cfg.difference_tries):
                if d > 0:
                    if attempts >= cfg.max_attempts:
                        break
                    attempts += 1
                diff_rng = np.random.default_rng([seed, scene_index, 1 + d])
                try:
                    spec_b, records = diff_lib.sample_differences(spec_a, diff_rng, self.difference_settings)
                except diff_lib.DifferenceError:
                    rejections[diff_lib.DifferenceError.reason] += 1
                    continue
                rgb_b, labels_b = self.renderer.render(spec_b)
                verdict = validate_lib.check_pair(
                    rgb_a, labels_a, rgb_b, labels_b, spec_a, spec_b, records, self.validation_settings
                )
                if verdict.reason is not None:
                    rejections[verdict.reason] += 1
                    continue
                for record, box in zip(records, verdict.boxes):
                    record["box"] = [float(v) for v in box]
                return Pair(
                    seed=seed,
                    image_a=rgb_a,
                    image_b=rgb_b,
                    boxes=verdict.boxes.reshape(-1, 4),
                    kinds=[r["kind"] for r in records],
                    differences=records,
                    spec_a=spec_a,
                    spec_b=spec_b,
                    attempts=attempts,
                    rejections=dict(rejections),
                )
            scene_index += 1
        raise GenerationError(
            f"seed {seed}: no pair accepted in {cfg.max_attempts} candidates "
            f"(rejections: {dict(rejections)}); relax the datagen config"
        )

    def close(self) -> None:
        self.renderer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
