"""REC data: REFER files (rendered by our pipeline) -> the flat tensorflow-datasets splits -> read back;
a catalogue-style example converted; bad input named."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from dig_jax.eval import refcoco_builder, refer

SPLITS = ("refcoco_unc/val", "refcoco_unc/testA", "refcoco_unc/testB", "refcocoplus_unc/val",
          "refcocoplus_unc/testA", "refcocoplus_unc/testB", "refcocog_umd/val", "refcocog_umd/test")


def _flat(source) -> list[dict]:
    return [source[i] for i in range(len(source))]


def test_all_eight_splits_hold_every_sentence_with_its_pixel_box(rec_set):
    manual, data_dir, expected = rec_set
    assert sorted(expected) == sorted(SPLITS)
    for split in SPLITS:
        got = _flat(refcoco_builder.rec_source(data_dir, split))
        want = sorted((e["expression"], tuple(e["box"].tolist()), e["image_id"]) for e in expected[split])
        have = sorted((g["expression"].decode(), tuple(g["box"].tolist()), int(g["image_id"])) for g in got)
        assert have == want, split
        for g in got:  # the stored bytes are the image file itself; its size is the recorded one
            image = np.asarray(PIL.Image.open(io.BytesIO(g["image"])))
            assert image.shape == (int(g["height"]), int(g["width"]), 3)
            with open(os.path.join(manual, "coco_train2014", g["file_name"].decode()), "rb") as f:
                assert f.read() == g["image"]


def test_train_refs_are_left_out(rec_set):
    manual, data_dir, expected = rec_set
    refs = refer.load_refs(os.path.join(manual, "refcoco", "refs(unc).p"))
    train = {r["ref_id"] for r in refs if r["split"] == "train"}
    assert train
    seen = {int(g["ref_id"]) for s in SPLITS[:3] for g in _flat(refcoco_builder.rec_source(data_dir, s))}
    assert not seen & train and seen


def test_the_command_line_prepares_the_same_dataset(rec_set, tmp_path):
    manual, data_dir, _ = rec_set
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "dig_jax.eval.prepare_refcoco", f"--manual_dir={manual}",
                    f"--data_dir={out}", "--configs=refcocog_umd"], check=True, capture_output=True)
    for split in ("refcocog_umd/val", "refcocog_umd/test"):
        a = sorted((g["expression"], int(g["sent_id"])) for g in _flat(refcoco_builder.rec_source(str(out), split)))
        b = sorted((g["expression"], int(g["sent_id"])) for g in _flat(refcoco_builder.rec_source(data_dir, split)))
        assert a == b and a


def test_wrong_names_and_missing_files_are_named(rec_set, tmp_path):
    _, data_dir, _ = rec_set
    with pytest.raises(ValueError, match=r"refcoco_unc/validation.*\['refcoco_unc/val', 'refcoco_unc/testA'"):
        refcoco_builder.rec_source(data_dir, "refcoco_unc/validation")
    with pytest.raises(ValueError, match="unknown REC dataset 'refclef'"):
        refcoco_builder.rec_source(data_dir, "refclef/val")
    with pytest.raises(FileNotFoundError, match="prepare_refcoco"):
        refcoco_builder.rec_source(str(tmp_path), "refcoco_unc/val")
    with pytest.raises(FileNotFoundError, match="no COCO train2014 image directory"):
        list(refer.flat_examples(str(tmp_path), "refcoco_unc", "val"))
    os.makedirs(tmp_path / "coco_train2014")
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p do not exist"):
        list(refer.flat_examples(str(tmp_path), "refcoco_unc", "val"))


def test_a_catalogue_example_is_flattened_to_pixel_xyxy():
    """The catalogue's layout: one image, objects with normalised [ymin, xmin, ymax, xmax] boxes and
    several refexps each."""
    image = np.zeros((40, 100, 3), np.uint8)
    example = {"image": image, "image/id": 7, "objects": {
        "id": np.array([11, 12]), "label": np.array([3, 4]),
        "bbox": np.array([[0.25, 0.1, 0.75, 0.5], [0.0, 0.6, 1.0, 1.0]], np.float32),
        "refexp": {"refexp_id": [[1, 2], [3]], "raw": [[b"left thing", b"the left one"], [b"right thing"]]}}}
    flat = refer.flat_from_catalogue(example)
    assert [f["expression"] for f in flat] == ["left thing", "the left one", "right thing"]
    assert [f["sent_id"] for f in flat] == [1, 2, 3] and [f["ann_id"] for f in flat] == [11, 11, 12]
    np.testing.assert_allclose(flat[0]["box"], [10, 10, 50, 30], rtol=1e-6)   # x = 0.1 * 100, y = 0.25 * 40
    np.testing.assert_allclose(flat[2]["box"], [60, 0, 100, 40], rtol=1e-6)
    assert flat[0]["height"] == 40 and flat[0]["width"] == 100 and flat[0]["image"] is image


def test_a_catalogue_source_is_indexed_per_sentence():
    per_image = [{"image": np.zeros((10, 10, 3), np.uint8), "image/id": i, "objects": {
        "id": np.array([i]), "label": np.array([0]), "bbox": np.array([[0, 0, 0.5, 0.5]], np.float32),
        "refexp": {"refexp_id": [[10 * i + j for j in range(i + 1)]], "raw": [[b"x"] * (i + 1)]}}} for i in range(3)]
    flat = refcoco_builder.CatalogueFlat(per_image)
    assert len(flat) == 1 + 2 + 3
    assert [flat[k]["sent_id"] for k in range(len(flat))] == [0, 10, 11, 20, 21, 22]
