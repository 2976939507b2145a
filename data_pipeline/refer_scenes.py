"""A referring-expression set rendered from our scenes, written as the REFER files a RefCOCO user has.

Why: the REC evaluator (`dig_jax.eval.rec`) reads RefCOCO through the files of the REFER repository, and
neither the tests nor the CPU demo may download them. Rendered scenes give the same files with exact
boxes: every object whose (size, color, material, shape) is unique in its scene becomes a ref with the
expression "the {size} {color} {material} {shape}" (plus "the {color} {shape}" when that alone is
unique), and its box is the tight box of its segmentation mask (pixels, like the pairs' labels).

Written under `manual_dir` (the layout `dig_jax.eval.refer` reads):
  refcoco/refs(unc).p, refcoco+/refs(unc).p, refcocog/refs(umd).p   the refs, as Python 2's cPickle wrote
                                                                      them (protocol 2, plain data)
  refcoco*/instances.json                                            COCO images and annotations
                                                                      ([x, y, width, height] boxes)
  coco_train2014/COCO_train2014_<12 digits>.jpg                       the images (JPEG quality 95)
The three datasets share the images and refs; refs are dealt round-robin over each dataset's evaluation
splits (RefCOCO and RefCOCO+ val / testA / testB, RefCOCOg val / test), and the first one of each dataset
goes to "train", which the evaluation splits must leave out.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle

import numpy as np
import PIL.Image

from data_pipeline import render, scene, validate

FOLDERS = {"refcoco": ("unc", ("val", "testA", "testB")), "refcoco+": ("unc", ("val", "testA", "testB")),
           "refcocog": ("umd", ("val", "test"))}
CONFIG_OF = {"refcoco": "refcoco_unc", "refcoco+": "refcocoplus_unc", "refcocog": "refcocog_umd"}
IMAGE_DIR = "coco_train2014"
FIRST_IMAGE_ID, FIRST_ANN_ID = 1000, 5000
MAX_TRIES_PER_SCENE = 20  # scene i draws from seeds seed + 20 i, ... (unplaceable layouts are skipped)


@dataclasses.dataclass(frozen=True)
class ReferredObject:
    image_id: int
    sentences: tuple[str, ...]
    box: np.ndarray  # float32[4] pixel xyxy (max exclusive), from the object's mask
    category_id: int  # index into scene.SHAPES


def referred_objects(spec: dict, labels: np.ndarray, image_id: int, min_pixels: int) -> list[ReferredObject]:
    """The objects of one rendered scene that an expression names uniquely, with at least `min_pixels`
    visible pixels. `labels`: int[H, W] object ids of the scene's segmentation."""
    attrs = [(o["size"], o["color"], o["material"], o["shape"]) for o in spec["objects"]]
    out = []
    for obj, attr in zip(spec["objects"], attrs):
        mask = labels == obj["id"]
        box = validate.mask_box(mask)
        if attrs.count(attr) > 1 or box is None or int(mask.sum()) < min_pixels:
            continue
        sentences = ["the {} {} {} {}".format(*attr)]
        size, color, material, shape = attr
        if sum((a[1], a[3]) == (color, shape) for a in attrs) == 1:
            sentences.append(f"the {color} {shape}")
        out.append(ReferredObject(image_id, tuple(sentences), box, scene.SHAPES.index(shape)))
    return out


def _placeable_scene(first_seed: int, settings: scene.SceneSettings) -> dict:
    """The first scene of seeds first_seed, first_seed + 1, ... whose objects can be placed (a tight
    placement radius leaves some layouts without room), within MAX_TRIES_PER_SCENE seeds."""
    for seed in range(first_seed, first_seed + MAX_TRIES_PER_SCENE):
        try:
            return scene.sample_scene(np.random.default_rng(seed), settings)
        except scene.PlacementError:
            continue
    raise scene.PlacementError(f"no placeable scene in seeds {first_seed}..{first_seed + MAX_TRIES_PER_SCENE - 1} "
                               f"(placement_radius={settings.placement_radius}, {settings.max_objects} objects)")


def write_refer_set(manual_dir: str, *, num_scenes: int, seed: int, resolution: int,
                    settings: scene.SceneSettings, min_pixels: int = 20) -> dict[str, list[dict]]:
    """Renders `num_scenes` scenes (`_placeable_scene`) and writes the REFER files into `manual_dir`.

    Returns the flat examples the evaluation splits must hold, per "<config>/<split>" (expression,
    box float32[4] pixel xyxy, image_id), for checking a preparation against.
    """
    images_dir = os.path.join(manual_dir, IMAGE_DIR)
    os.makedirs(images_dir, exist_ok=True)
    # A scene's object ids are 0 .. n - 1: one renderer slot per object.
    renderer = render.SceneRenderer(resolution, num_slots=settings.max_objects, antialias_samples=1)
    images, objects = [], []
    try:
        for i in range(num_scenes):
            spec = _placeable_scene(seed + i * MAX_TRIES_PER_SCENE, settings)
            rgb, labels = renderer.render(spec)
            name = f"COCO_train2014_{i:012d}.jpg"
            PIL.Image.fromarray(rgb).save(os.path.join(images_dir, name), quality=95)
            images.append({"id": FIRST_IMAGE_ID + i, "file_name": name, "height": resolution, "width": resolution})
            objects += referred_objects(spec, labels, FIRST_IMAGE_ID + i, min_pixels)
    finally:
        renderer.close()
    annotations = [{"id": FIRST_ANN_ID + k, "image_id": o.image_id, "category_id": o.category_id, "iscrowd": 0,
                    "bbox": [float(o.box[0]), float(o.box[1]), float(o.box[2] - o.box[0]), float(o.box[3] - o.box[1])]}
                   for k, o in enumerate(objects)]
    expected: dict[str, list[dict]] = {}
    for folder, (scheme, splits) in FOLDERS.items():
        os.makedirs(os.path.join(manual_dir, folder), exist_ok=True)
        with open(os.path.join(manual_dir, folder, "instances.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": []}, f)
        refs, sent_ids, cycle = [], itertools.count(), itertools.cycle(splits)
        for k, o in enumerate(objects):
            split = "train" if k == 0 else next(cycle)
            sentences = [{"sent_id": next(sent_ids), "sent": s, "raw": s, "tokens": s.split()} for s in o.sentences]
            refs.append({"ref_id": k, "ann_id": FIRST_ANN_ID + k, "image_id": o.image_id, "split": split,
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "category_id": o.category_id, "file_name": f"ref_{k}.jpg"})
            if split != "train":
                expected.setdefault(f"{CONFIG_OF[folder]}/{split}", []).extend(
                    {"expression": s["raw"], "box": o.box, "image_id": o.image_id} for s in sentences)
        with open(os.path.join(manual_dir, folder, f"refs({scheme}).p"), "wb") as f:
            pickle.dump(refs, f, protocol=2)
    return expected
