"""RefCOCO / RefCOCO+ / RefCOCOg as a tensorflow-datasets dataset without TensorFlow, and reading it back.

Why our own builder: the catalogue's `ref_coco` builder stores one example per image with nested
`objects/refexp` sequences, which tensorflow-datasets can only prepare with TensorFlow installed (ragged
tensors), and its test base class is TensorFlow's. A flat `GeneratorBasedBuilder` (one example per
referring sentence, the `refer.flat_examples` fields, all single-level features) prepares and reads with
tensorflow-datasets alone when its files are ArrayRecord (`file_format="array_record"`) and nothing is
fetched from GCS (`DownloadConfig(try_download_gcs=False)`). Its `DatasetInfo` is built directly, since
`dataset_info_from_configs` looks for README/CITATIONS files beside the module.

On disk: DATA_DIR/ref_coco_flat/<config>/1.0.0/ with configs refcoco_unc (val, testA, testB),
refcocoplus_unc (val, testA, testB), refcocog_umd (val, test). `rec_source(data_dir, "refcoco_unc/val")`
is a random-access source of flat examples (Grain reads it); it also reads a catalogue `ref_coco`
dataset prepared as ArrayRecord (DATA_DIR/ref_coco/<config>/<version>/, split "validation" for "val"),
flattened by `refer.flat_from_catalogue`.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from dig_jax.eval import refer

NAME = "ref_coco_flat"
CATALOGUE = "ref_coco"
VERSION = "1.0.0"


class RefCocoFlat(tfds.core.GeneratorBasedBuilder):
    """One example per referring sentence of the eight standard evaluation splits (module docstring)."""
    name = NAME
    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"{folder} ({scheme} splits)")
                       for name, (folder, scheme, _) in refer.DATASETS.items()]
    MANUAL_DOWNLOAD_INSTRUCTIONS = refer.__doc__

    def _info(self) -> tfds.core.DatasetInfo:
        f = tfds.features
        return tfds.core.DatasetInfo(builder=self, description=__doc__, features=f.FeaturesDict({
            "image": f.Tensor(shape=(), dtype=np.object_),  # the image file's bytes, decoded by the reader
            "image_id": np.int64, "height": np.int64, "width": np.int64, "file_name": f.Text(),
            "expression": f.Text(),
            "box": f.Tensor(shape=(4,), dtype=np.float32),  # pixel x1, y1, x2, y2
            "ref_id": np.int64, "ann_id": np.int64, "sent_id": np.int64, "category_id": np.int64}))

    def _split_generators(self, dl_manager):
        manual_dir = os.fspath(dl_manager.manual_dir)
        _, _, splits = refer.DATASETS[self.builder_config.name]
        return {split: self._generate_examples(manual_dir, split) for split in splits}

    def _generate_examples(self, manual_dir: str, split: str):
        yield from refer.flat_examples(manual_dir, self.builder_config.name, split)


def prepare(manual_dir: str, data_dir: str, configs=tuple(refer.DATASETS)) -> list[str]:
    """Prepares every config of `configs` from the REFER files of `manual_dir`; returns their directories."""
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"--manual_dir {manual_dir} is not a directory")
    out = []
    for config in configs:
        refer.check_dataset(config)
        builder = RefCocoFlat(config=config, data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, try_download_gcs=False))
        out.append(os.fspath(builder.data_path))
    return out


def is_prepared(data_dir: str, configs=tuple(refer.DATASETS)) -> bool:
    """Whether every config of `configs` is prepared under `data_dir` (tensorflow-datasets writes a
    config's directory whole, by renaming it into place once its files are written)."""
    return all(os.path.exists(os.path.join(data_dir, NAME, config, VERSION, "dataset_info.json"))
               for config in configs)


def split_name(spec: str) -> tuple[str, str]:
    """("refcoco_unc", "val") from "refcoco_unc/val", checked against the standard splits."""
    config, _, split = spec.partition("/")
    _, _, splits = refer.check_dataset(config)
    if split not in splits:
        raise ValueError(f"REC split {spec!r}: {config} has {[f'{config}/{s}' for s in splits]}")
    return config, split


def rec_source(data_dir: str, spec: str):
    """A random-access sequence of flat examples of split `spec` ("refcoco_unc/val") under `data_dir`."""
    config, split = split_name(spec)
    flat = os.path.join(data_dir, NAME, config, VERSION)
    if os.path.isdir(flat):
        return tfds.builder_from_directory(flat).as_data_source(split=split)
    catalogue = _catalogue_dir(data_dir, config)
    if catalogue is None:
        raise FileNotFoundError(f"{data_dir}: no {NAME}/{config}/{VERSION} (run python -m "
                                f"dig_jax.eval.prepare_refcoco) and no catalogue {CATALOGUE}/{config}")
    builder = tfds.builder_from_directory(catalogue)
    if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
        raise ValueError(f"{catalogue}: a catalogue dataset stored as {builder.info.file_format.value} needs "
                         "TensorFlow to read; prepare it with file_format=array_record, or prepare the flat "
                         "dataset with python -m dig_jax.eval.prepare_refcoco")
    return CatalogueFlat(builder.as_data_source(split="validation" if split == "val" else split))


def _catalogue_dir(data_dir: str, config: str) -> str | None:
    root = os.path.join(data_dir, CATALOGUE, config)
    versions = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return os.path.join(root, versions[-1]) if versions else None


class CatalogueFlat:
    """A catalogue source (one example per image) seen as flat examples: the (image, object, sentence)
    index is built once by reading every image's objects."""

    def __init__(self, per_image):
        self.per_image = per_image
        self.index = []  # (image index, flat index within that image)
        for i in range(len(per_image)):
            n = sum(len(r) for r in per_image[i]["objects"]["refexp"]["raw"])
            self.index += [(i, j) for j in range(n)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> dict:
        i, j = self.index[k]
        return refer.flat_from_catalogue(self.per_image[i])[j]
