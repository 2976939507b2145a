"""A tiny referring-expression set rendered by our MuJoCo pipeline, written as the REFER files a user has.

Scenes come from `data_pipeline.scene`; every object whose (size, color, material, shape) is unique in its
scene becomes a ref with the expression "the {size} {color} {material} {shape}" (plus "the {color}
{shape}" when that alone is unique), and its box is the exact box of its segmentation mask. The files:
refcoco/ and refcoco+/ with refs(unc).p, refcocog/ with refs(umd).p, each beside an instances.json (COCO
[x, y, w, h] boxes), and coco_train2014/ with the JPEG images: the layout `dig_jax.eval.refer` reads.
Refs are spread round-robin over each dataset's evaluation splits, and the first one of each dataset
goes to "train" (which preparation must leave out).
"""
from __future__ import annotations

import itertools
import json
import os
import pickle

import numpy as np
import PIL.Image

from data_pipeline import render, scene, validate

RESOLUTION = 64
FOLDERS = {"refcoco": ("unc", ("val", "testA", "testB")), "refcoco+": ("unc", ("val", "testA", "testB")),
           "refcocog": ("umd", ("val", "test"))}
CONFIG_OF = {"refcoco": "refcoco_unc", "refcoco+": "refcocoplus_unc", "refcocog": "refcocog_umd"}


def _objects(seed: int, renderer) -> tuple[np.ndarray, list[dict]]:
    """(image uint8[H, W, 3], [{expressions, box float[4] xyxy}]) of one scene's uniquely described objects."""
    rng = np.random.default_rng(seed)
    settings = scene.SceneSettings(min_objects=2, max_objects=3, placement_radius=0.2, camera_fovy=14.0)
    spec = scene.sample_scene(rng, settings)
    rgb, labels = renderer.render(spec)
    attrs = [(o["size"], o["color"], o["material"], o["shape"]) for o in spec["objects"]]
    out = []
    for obj, attr in zip(spec["objects"], attrs):
        box = validate.mask_box(labels == obj["id"])
        if attrs.count(attr) > 1 or box is None or np.sum(labels == obj["id"]) < 20:
            continue
        sentences = ["the {} {} {} {}".format(*attr)]
        if sum(a[1:4:2] == attr[1:4:2] for a in attrs) == 1:
            sentences.append(f"the {attr[1]} {attr[3]}")
        out.append({"sentences": sentences, "box": box, "category_id": scene.SHAPES.index(attr[3])})
    return rgb, out


def write_rec_set(manual_dir: str, num_scenes: int = 4, seed: int = 0) -> dict[str, list[dict]]:
    """Writes the REFER files into `manual_dir`; returns the expected flat examples per "<config>/<split>"
    (expression, box float32[4] pixel xyxy, image_id)."""
    images_dir = os.path.join(manual_dir, "coco_train2014")
    os.makedirs(images_dir, exist_ok=True)
    renderer = render.SceneRenderer(RESOLUTION, num_slots=4, antialias_samples=1)
    images, objects = [], []
    try:
        for i in range(num_scenes):
            rgb, objs = _objects(seed + i, renderer)
            name = f"COCO_train2014_{i:012d}.jpg"
            PIL.Image.fromarray(rgb).save(os.path.join(images_dir, name), quality=95)
            images.append({"id": 1000 + i, "file_name": name, "height": RESOLUTION, "width": RESOLUTION})
            objects += [{"image_id": 1000 + i, **o} for o in objs]
    finally:
        renderer.close()
    expected = {}
    annotations = [{"id": 5000 + k, "image_id": o["image_id"], "category_id": o["category_id"], "iscrowd": 0,
                    "bbox": [float(o["box"][0]), float(o["box"][1]), float(o["box"][2] - o["box"][0]),
                             float(o["box"][3] - o["box"][1])]} for k, o in enumerate(objects)]
    for folder, (scheme, splits) in FOLDERS.items():
        os.makedirs(os.path.join(manual_dir, folder), exist_ok=True)
        with open(os.path.join(manual_dir, folder, "instances.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": []}, f)
        refs, sent_ids = [], itertools.count()
        cycle = itertools.cycle(splits)
        for k, o in enumerate(objects):
            split = "train" if k == 0 else next(cycle)
            sentences = [{"sent_id": next(sent_ids), "sent": s, "raw": s, "tokens": s.split()} for s in o["sentences"]]
            refs.append({"ref_id": k, "ann_id": 5000 + k, "image_id": o["image_id"], "split": split,
                         "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences,
                         "category_id": o["category_id"], "file_name": f"ref_{k}.jpg"})
            if split != "train":
                expected.setdefault(f"{CONFIG_OF[folder]}/{split}", []).extend(
                    {"expression": s["raw"], "box": o["box"], "image_id": o["image_id"]} for s in sentences)
        with open(os.path.join(manual_dir, folder, f"refs({scheme}).p"), "wb") as f:
            pickle.dump(refs, f, protocol=2)  # as the REFER files (Python 2 cPickle, protocol 2)
    return expected
