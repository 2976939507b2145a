"""The tests' tiny referring-expression set: four rendered scenes at 64 px (`data_pipeline.refer_scenes`)."""
from __future__ import annotations

from data_pipeline import refer_scenes, scene

RESOLUTION = 64
SETTINGS = scene.SceneSettings(min_objects=2, max_objects=3, placement_radius=0.2, camera_fovy=14.0)


def write_rec_set(manual_dir: str, num_scenes: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """The REFER files of the tiny set in `manual_dir`; the expected flat examples per "<config>/<split>"."""
    return refer_scenes.write_refer_set(manual_dir, num_scenes=num_scenes, seed=seed, resolution=RESOLUTION,
                                        settings=SETTINGS)
