"""From a decoded DiG record to fixed-shape, model-ready numpy arrays (runs inside the Grain pipeline).

Every image of a dataset has the same rendered size, so the number of patches and of image tokens is the
same for every example; prompts are left-padded to a fixed bucketed length and answers right-padded to a
fixed length. Batches therefore have static shapes and the train step compiles once.

Per example (P = patches of both images, Lp prompt length, La answer length, M = max_boxes):
  pixel_values    float32[P, C*T*p*p]   both images, HF patch order
  image_grid_thw  int32[2, 3]
  prompt_ids      int32[Lp]  left-padded    prompt_mask  int32[Lp]
  answer_ids      int32[La]  right-padded   answer_mask  int32[La]   (supervised target, ends with <|im_end|>;
                  with the Thinking template it starts by closing the prompt's empty reasoning block)
  gt_boxes        float32[M, 4] pixel xyxy on the rendered image, zero rows past `num_differences`
  gt_mask         bool[M]         kind_ids  int32[M] (index into data_pipeline.differences.KINDS, -1 = none)
  num_differences int32[]     original_hw int32[2]    resized_hw int32[2]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from data_pipeline.differences import KINDS
from dig_jax.processing.answers import format_answer
from dig_jax.processing import (ImageProcessorConfig, answer_prefix, chat_prompt, check_chat_template,
                                expand_image_tokens, load_tokenizer, preprocess_images, special_token_ids)

IM_END = "<|im_end|>"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    family: str
    image_cfg: ImageProcessorConfig
    prompt_text: str
    add_vision_id: bool
    label_mode: str  # "kind": the difference kind; anything else: that fixed string
    max_boxes: int
    prompt_bucket: int
    answer_len: int
    keep_images: bool = False  # pass image_a / image_b through (evaluation draws predictions on them)
    chat_template: str = "instruct"  # "instruct" | "thinking" (Qwen3-VL Thinking; processing.template)


class ExampleBuilder:
    """Turns decoded records into model inputs; picklable, so Grain worker threads can share it."""

    def __init__(self, spec: InputSpec, tokenizer_path: str, image_hw: tuple[int, int],
                 require_real_ids: bool = True):
        check_chat_template(spec.family, spec.chat_template)
        self.spec = spec
        self.tokenizer_path = tokenizer_path
        self.require_real_ids = require_real_ids
        self._tokenizer = None
        self.image_hw = tuple(int(v) for v in image_hw)
        blank = np.zeros(self.image_hw + (3,), np.uint8)
        _, grid = preprocess_images([blank, blank], spec.image_cfg)
        self.image_grid_thw = grid.astype(np.int32)  # int32[2, 3]
        self.resized_hw = (int(grid[0, 1]) * spec.image_cfg.patch_size, int(grid[0, 2]) * spec.image_cfg.patch_size)
        text = chat_prompt(spec.family, spec.prompt_text, num_images=2, add_vision_id=spec.add_vision_id,
                           chat_template=spec.chat_template)
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        special = special_token_ids(self.tokenizer)
        self.pad_id = special["pad_token_id"]
        self._prompt_ids = expand_image_tokens(np.asarray(ids, np.int32), grid, spec.image_cfg.merge_size,
                                               image_token_id=special["image_token_id"])
        self.prompt_len = int(math.ceil(len(self._prompt_ids) / spec.prompt_bucket) * spec.prompt_bucket)

    @property
    def patches_per_image(self) -> int:
        return int(np.prod(self.image_grid_thw[0]))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path, require_real_ids=self.require_real_ids)
        return self._tokenizer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # the Rust tokenizer is rebuilt lazily in each process
        return state

    # ---------------------------------------------------------------------------------------------
    def answer_text(self, boxes_px: np.ndarray, kinds: list[str]) -> str:
        labels = list(kinds) if self.spec.label_mode == "kind" else [self.spec.label_mode] * len(kinds)
        return format_answer(boxes_px, labels, self.spec.family, self.image_hw, self.resized_hw)

    def target_text(self, boxes_px: np.ndarray, kinds: list[str]) -> str:
        """The supervised continuation of the prompt: the answer as the template renders an assistant turn
        without reasoning, then <|im_end|>. For the Thinking template that is `\\n</think>\\n\\n` + answer:
        its rendering of such a turn is `<think>\\n\\n</think>\\n\\n` + answer, whose `<think>\\n` the
        prompt already holds (the tokens then match what the sampler continues from at generation time)."""
        return answer_prefix(self.spec.chat_template) + self.answer_text(boxes_px, kinds) + IM_END

    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`record` is a loader example (padded `boxes` + `box_mask` + `kind_ids`) or a decoded record
        (`boxes` float[M, 4] + `kinds`)."""
        for key in ("image_a", "image_b", "boxes", "num_differences"):
            if key not in record:
                raise KeyError(f"DiG record is missing field {key!r} (has {sorted(record)})")
        hw = tuple(record["image_a"].shape[:2])
        if hw != self.image_hw:
            raise ValueError(f"record seed={record.get('seed')} has images of size {hw}, but this dataset's "
                             f"inputs were set up for {self.image_hw}; mixed resolutions need separate datasets")
        spec = self.spec
        pixel_values, grid = preprocess_images([record["image_a"], record["image_b"]], spec.image_cfg)

        prompt = np.full((self.prompt_len,), self.pad_id, np.int32)
        prompt_mask = np.zeros((self.prompt_len,), np.int32)
        n = len(self._prompt_ids)
        prompt[self.prompt_len - n:] = self._prompt_ids
        prompt_mask[self.prompt_len - n:] = 1

        boxes = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
        if "box_mask" in record:
            keep = np.asarray(record["box_mask"], bool)
            boxes = boxes[keep]
            kinds = [KINDS[int(k)] for k in np.asarray(record["kind_ids"])[keep]]
        else:
            kinds = list(record["kinds"])
        answer = self.target_text(boxes, kinds)
        answer_ids = np.asarray(self.tokenizer.encode(answer, add_special_tokens=False).ids, np.int32)
        if len(answer_ids) > spec.answer_len:
            raise ValueError(f"record seed={record.get('seed')}: answer needs {len(answer_ids)} tokens but "
                             f"data.answer_len is {spec.answer_len}; raise it (or lower data.max_boxes)")
        answer_pad = np.full((spec.answer_len,), self.pad_id, np.int32)
        answer_mask = np.zeros((spec.answer_len,), np.int32)
        answer_pad[: len(answer_ids)] = answer_ids
        answer_mask[: len(answer_ids)] = 1

        m = len(boxes)
        if m > spec.max_boxes:
            raise ValueError(f"record seed={record.get('seed')} has {m} differences > data.max_boxes={spec.max_boxes}")
        gt_boxes = np.zeros((spec.max_boxes, 4), np.float32)
        gt_boxes[:m] = boxes
        gt_mask = np.arange(spec.max_boxes) < m
        return {
            "pixel_values": pixel_values.astype(np.float32),
            "image_grid_thw": grid.astype(np.int32),
            "prompt_ids": prompt,
            "prompt_mask": prompt_mask,
            "answer_ids": answer_pad,
            "answer_mask": answer_mask,
            "gt_boxes": gt_boxes,
            "gt_mask": gt_mask,
            "num_differences": np.int32(record["num_differences"]),
            "original_hw": np.asarray(self.image_hw, np.int32),
            "resized_hw": np.asarray(self.resized_hw, np.int32),
            "kind_ids": np.asarray([KINDS.index(k) for k in kinds] + [-1] * (spec.max_boxes - m), np.int32),
            "seed": np.int64(record.get("seed", -1)),
            **({"image_a": record["image_a"], "image_b": record["image_b"]} if spec.keep_images else {}),
        }


def max_answer_tokens(builder: ExampleBuilder, max_boxes: int) -> int:
    """Tokens of the longest answer `max_boxes` boxes can need (widest coordinates, longest label), with
    the close of the reasoning block that precedes it under the Thinking template (no reasoning)."""
    h, w = builder.image_hw
    box = np.array([[w - 1, h - 1, w, h]], np.float32)
    labels = ["material"] if builder.spec.label_mode == "kind" else [builder.spec.label_mode]
    text = builder.target_text(np.repeat(box, max_boxes, 0), labels * max_boxes)
    return len(builder.tokenizer.encode(text, add_special_tokens=False).ids)
