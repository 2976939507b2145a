"""Prepares the REC evaluation splits from the REFER annotations and COCO train2014 images.

    python -m dig_jax.eval.prepare_refcoco --manual_dir=/data/refer --data_dir=/data/tfds

`--manual_dir` holds refcoco/, refcoco+/, refcocog/ (each with its `refs(...).p` and `instances.json`) and
coco_train2014/ (the layout is in `dig_jax.eval.refer`); `--data_dir` receives the tensorflow-datasets
dataset `ref_coco_flat` (ArrayRecord, eight splits) that `eval.rec.data_dir` then points to. No
TensorFlow is needed, nothing is downloaded.
"""
from __future__ import annotations

from absl import app, flags

from dig_jax.eval import refcoco_builder, refer

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "the REFER data directory plus coco_train2014/", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "where the tensorflow-datasets dataset is written", required=True)
_CONFIGS = flags.DEFINE_list("configs", list(refer.DATASETS), "which of the three datasets to prepare")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    for path in refcoco_builder.prepare(_MANUAL_DIR.value, _DATA_DIR.value, tuple(_CONFIGS.value)):
        print(f"prepared {path}")


if __name__ == "__main__":
    app.run(main)
