"""The shapes of a run's batches, from the trainer's own host-side builders on a synthetic pair.

A DiG dataset has one image size, so every batch of a stage has the same shapes: they are those of the
run's example builder (`assemble.example_builder`: the processor, the chat template, the tokenizer, the
answer padding) applied to a blank pair of the run's image size, stacked as the loader stacks examples,
and laid out by `generate.batch.prompt_batch` / `answers` (left padding to the prompt bucket, M-RoPE
positions, group repetition, the padded patch count, the vision metadata). Only the pixel values are
blank; no shape depends on them.
"""
from __future__ import annotations

import jax
import numpy as np

from dig_jax.generate.batch import Completions, PromptBatch, answers, prompt_batch
from dig_jax.processing.examples import ExampleBuilder


def synthetic_record(image_hw: tuple[int, int], max_boxes: int) -> dict[str, np.ndarray]:
    """A loader example (see data_pipeline.loader) of two blank images and no difference."""
    h, w = image_hw
    return {"image_a": np.zeros((h, w, 3), np.uint8), "image_b": np.zeros((h, w, 3), np.uint8),
            "boxes": np.zeros((max_boxes, 4), np.float32), "box_mask": np.zeros((max_boxes,), bool),
            "kind_ids": np.full((max_boxes,), -1, np.int32), "num_differences": np.int32(0),
            "seed": np.int64(-1), "record_id": np.int64(-1)}


def host_batch(builder: ExampleBuilder, rows: int) -> dict[str, np.ndarray]:
    """`rows` copies of the builder's example of a blank pair, stacked on a leading batch axis."""
    example = builder(synthetic_record(builder.image_hw, builder.spec.max_boxes))
    return {key: np.repeat(np.asarray(value)[None], rows, axis=0) for key, value in example.items()}


def prompt_shapes(model_cfg, batch: dict, *, group_size: int, prompt_bucket: int) -> PromptBatch:
    """ShapeDtypeStructs of `prompt_batch(model_cfg, batch, ...)` (nothing is placed on a device)."""
    return jax.eval_shape(lambda: prompt_batch(model_cfg, batch, group_size=group_size, prompt_bucket=prompt_bucket))


def answer_shapes(batch: dict) -> Completions:
    """ShapeDtypeStructs of the supervised targets `answers(batch)`."""
    return jax.eval_shape(lambda: answers(batch))
