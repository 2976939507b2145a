"""Referring expressions from the files a user has: the REFER annotations, or a catalogue `ref_coco` example.

REFER layout (the REFER repository's data directory, which `prepare_refcoco` reads from `--manual_dir`):
  refcoco/refs(unc).p, refcoco/instances.json         RefCOCO, UNC splits val / testA / testB
  refcoco+/refs(unc).p, refcoco+/instances.json       RefCOCO+, UNC splits val / testA / testB
  refcocog/refs(umd).p, refcocog/instances.json       RefCOCOg, UMD splits val / test
  coco_train2014/ (or train2014/)                     the COCO train2014 images all three refer to
A ref is one referred object (`ann_id`, an annotation of `instances.json` whose `bbox` is COCO
[x, y, width, height] in pixels) with one or more sentences. The flat form, one example per sentence (as
big_vision's `*_flat` splits), is what evaluation scores: accuracy is per referring sentence.

Flat example: image (the image file's bytes, not re-encoded), image_id, height, width, file_name,
expression (the sentence's `raw` text when present, else its tokenised `sent`), box float32[4] pixel
xyxy (x1, y1, x2, y2), ref_id, ann_id, sent_id, category_id.

The catalogue `ref_coco` builder of tensorflow-datasets stores one example per image instead, with
boxes normalised [ymin, xmin, ymax, xmax]; `flat_from_catalogue` converts one such example.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import numpy as np

from dig_jax.eval.refer_pickle import load_refs

# config name -> (REFER directory, split scheme, its evaluation splits): the eight standard splits.
DATASETS = {
    "refcoco_unc": ("refcoco", "unc", ("val", "testA", "testB")),
    "refcocoplus_unc": ("refcoco+", "unc", ("val", "testA", "testB")),
    "refcocog_umd": ("refcocog", "umd", ("val", "test")),
}
IMAGE_DIRS = ("coco_train2014", "train2014")


def image_dir(manual_dir: str) -> str:
    """The COCO train2014 image directory under `manual_dir`."""
    for name in IMAGE_DIRS:
        path = os.path.join(manual_dir, name)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(f"{manual_dir}: no COCO train2014 image directory ({' or '.join(IMAGE_DIRS)})")


def check_dataset(config: str) -> tuple[str, str, tuple[str, ...]]:
    if config not in DATASETS:
        raise ValueError(f"unknown REC dataset {config!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[config]


def load_instances(path: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """(images by id, annotations by id) of a COCO `instances.json`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"COCO annotations {path} do not exist")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{path}: a COCO instances file needs {key!r} (has {sorted(data)})")
    return {im["id"]: im for im in data["images"]}, {a["id"]: a for a in data["annotations"]}


def flat_examples(manual_dir: str, config: str, split: str) -> Iterator[tuple[str, dict]]:
    """(key, flat example) for every sentence of `split` of dataset `config` (module docstring)."""
    folder, scheme, splits = check_dataset(config)
    if split not in splits:
        raise ValueError(f"{config} has evaluation splits {list(splits)}, not {split!r}")
    root = os.path.join(manual_dir, folder)
    pictures = image_dir(manual_dir)
    refs = load_refs(os.path.join(root, f"refs({scheme}).p"))
    images, annotations = load_instances(os.path.join(root, "instances.json"))
    for ref in refs:
        if ref["split"] != split:
            continue
        ann = annotations.get(ref["ann_id"])
        image = images.get(ref["image_id"])
        if ann is None or image is None:
            raise ValueError(f"{root}: ref {ref['ref_id']} names annotation {ref['ann_id']} / image "
                             f"{ref['image_id']}, which instances.json lacks")
        x, y, w, h = (float(v) for v in ann["bbox"])
        path = os.path.join(pictures, image["file_name"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"image {path} of ref {ref['ref_id']} does not exist")
        with open(path, "rb") as f:
            encoded = f.read()
        for sentence in ref["sentences"]:
            yield f"{ref['ref_id']}_{sentence['sent_id']}", {
                "image": encoded, "image_id": int(image["id"]), "height": int(image["height"]),
                "width": int(image["width"]), "file_name": image["file_name"],
                "expression": sentence.get("raw") or sentence["sent"],
                "box": np.array([x, y, x + w, y + h], np.float32), "ref_id": int(ref["ref_id"]),
                "ann_id": int(ref["ann_id"]), "sent_id": int(sentence["sent_id"]),
                "category_id": int(ref.get("category_id", ann.get("category_id", -1)))}


def flat_from_catalogue(example: dict) -> list[dict]:
    """The flat examples of one catalogue `ref_coco` example (one image, its objects and their refexps).

    `example`: `image` uint8[H, W, 3], `image/id`, and `objects` as tensorflow-datasets returns a Sequence
    of dicts: columns `id` int[N], `bbox` float[N, 4] normalised [ymin, xmin, ymax, xmax], `label` int[N],
    `refexp` with `refexp_id` and `raw`, one list per object. Boxes become pixel xyxy.
    """
    image = np.asarray(example["image"])
    h, w = image.shape[:2]
    objects = example["objects"]
    bbox = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
    labels = objects.get("label", [-1] * len(bbox))
    out = []
    for i, (ymin, xmin, ymax, xmax) in enumerate(bbox):
        box = np.array([xmin * w, ymin * h, xmax * w, ymax * h], np.float32)
        for refexp_id, raw in zip(objects["refexp"]["refexp_id"][i], objects["refexp"]["raw"][i]):
            out.append({"image": image, "image_id": int(example["image/id"]), "height": h, "width": w,
                        "file_name": "", "expression": raw.decode() if isinstance(raw, bytes) else str(raw),
                        "box": box, "ref_id": -1, "ann_id": int(objects["id"][i]), "sent_id": int(refexp_id),
                        "category_id": int(labels[i])})
    return out
