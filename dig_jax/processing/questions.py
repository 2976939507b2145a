"""Single-turn questions about images (referring expressions, benchmark questions) as model inputs.

The DiG example builder (`examples.py`) serves one prompt for a dataset of one image size. Benchmarks
bring their own images, of any size, and a different text per example. To keep the shapes static (one
compile per evaluation, and the model's per-image vision attention block usable), every image is
letterboxed onto a fixed canvas first: scaled by `s = min(H / h, W / w)` and pasted at the top-left
corner of an H x W canvas of mid-gray (128). A COCO image (longest side 640) on a 640 x 640 canvas keeps
its pixels unscaled (s = 1). Because the paste is at the origin, a point on the canvas maps back to the
original image by dividing by `s` alone (`canvas_to_original`). The canvas then goes through the
family's processor (`smart_resize`) like any image.

Per example (N patches of the example's images, Lp = `prompt_len`):
  pixel_values   float32[N, C*T*p*p]   the images in order, HF patch order
  image_grid_thw int32[n_images, 3]
  prompt_ids     int32[Lp] left-padded   prompt_mask int32[Lp]
  original_hw    int32[n_images, 2]      each image's own (height, width)
  scale          float32[n_images]       its letterbox factor s
  canvas_hw      int32[2]   resized_hw int32[2]   (the canvas, and the canvas after smart_resize)
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import PIL.Image

from dig_jax.processing.image import ImageProcessorConfig, preprocess_images, to_rgb_uint8
from dig_jax.processing.template import chat_prompt, check_chat_template, expand_image_tokens
from dig_jax.processing.tokenizer import load_tokenizer, special_token_ids

PAD_GRAY = 128


def decode_image(image) -> np.ndarray:
    """uint8[H, W, 3] from encoded bytes (JPEG / PNG), a PIL image or an array."""
    if isinstance(image, (bytes, bytearray)):
        with PIL.Image.open(io.BytesIO(image)) as im:
            return to_rgb_uint8(im)
    return to_rgb_uint8(image)


def letterbox(image: np.ndarray, canvas_hw: tuple[int, int]) -> tuple[np.ndarray, float]:
    """(uint8[H, W, 3] canvas, s): `image` uint8[h, w, 3] scaled by s, pasted at the canvas origin."""
    h, w = image.shape[:2]
    ch, cw = canvas_hw
    s = min(ch / h, cw / w)
    nh, nw = min(ch, max(1, round(h * s))), min(cw, max(1, round(w * s)))
    canvas = np.full((ch, cw, 3), PAD_GRAY, np.uint8)
    resized = image if (nh, nw) == (h, w) else np.asarray(
        PIL.Image.fromarray(image).resize((nw, nh), PIL.Image.BICUBIC))
    canvas[:nh, :nw] = resized
    return canvas, s


def canvas_to_original(boxes_canvas: np.ndarray, scale: float, original_hw: tuple[int, int]) -> np.ndarray:
    """float[N, 4] xyxy pixel boxes on the canvas -> on the original image (divided by s, clipped to it)."""
    h, w = original_hw
    boxes = np.asarray(boxes_canvas, np.float64).reshape(-1, 4) / scale
    return np.clip(boxes, 0.0, np.array([w, h, w, h], np.float64))


@dataclasses.dataclass(frozen=True)
class QuestionSpec:
    """family, image_cfg, chat_template: as the DiG examples; canvas_hw: the letterbox canvas (H, W);
    num_images: images per question; max_text_tokens: the longest question text (tokens) a prompt holds;
    prompt_bucket: prompts are padded to a multiple of it."""
    family: str
    image_cfg: ImageProcessorConfig
    canvas_hw: tuple[int, int]
    num_images: int = 1
    max_text_tokens: int = 256
    prompt_bucket: int = 64
    chat_template: str = "instruct"


class QuestionBuilder:
    """Images + the question text of one example -> the fixed-shape inputs of the module docstring.
    Picklable (Grain threads share it); the tokenizer is reloaded lazily per process."""

    def __init__(self, spec: QuestionSpec, tokenizer_path: str, require_real_ids: bool = True):
        check_chat_template(spec.family, spec.chat_template)
        self.spec, self.tokenizer_path, self.require_real_ids = spec, tokenizer_path, require_real_ids
        self._tokenizer = None
        blank = np.zeros(tuple(spec.canvas_hw) + (3,), np.uint8)
        _, grid = preprocess_images([blank] * spec.num_images, spec.image_cfg)
        self.image_grid_thw = grid.astype(np.int32)  # int32[n_images, 3]
        p = spec.image_cfg.patch_size
        self.resized_hw = (int(grid[0, 1]) * p, int(grid[0, 2]) * p)
        special = special_token_ids(self.tokenizer)
        self.pad_id, self.image_token_id = special["pad_token_id"], special["image_token_id"]
        self.frame_len = len(self.prompt_ids(""))  # template and image tokens around the text
        self.prompt_len = int(math.ceil((self.frame_len + spec.max_text_tokens) / spec.prompt_bucket) * spec.prompt_bucket)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_path, require_real_ids=self.require_real_ids)
        return self._tokenizer

    @property
    def patches_per_image(self) -> int:
        return int(np.prod(self.image_grid_thw[0]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def prompt_text(self, text: str) -> str:
        """The chat prompt of one user turn: the images, then `text` (what HF's template renders)."""
        return chat_prompt(self.spec.family, text, num_images=self.spec.num_images,
                           chat_template=self.spec.chat_template)

    def prompt_ids(self, text: str) -> np.ndarray:
        """int32[L]: the prompt's ids with every image placeholder expanded to its tokens."""
        ids = self.tokenizer.encode(self.prompt_text(text), add_special_tokens=False).ids
        return expand_image_tokens(np.asarray(ids, np.int32), self.image_grid_thw, self.spec.image_cfg.merge_size,
                                   image_token_id=self.image_token_id)

    def __call__(self, images: list, text: str) -> dict[str, np.ndarray]:
        if len(images) != self.spec.num_images:
            raise ValueError(f"{len(images)} images given, the questions were set up for {self.spec.num_images}")
        decoded = [decode_image(im) for im in images]
        boxed = [letterbox(im, self.spec.canvas_hw) for im in decoded]
        pixel_values, grid = preprocess_images([canvas for canvas, _ in boxed], self.spec.image_cfg)
        ids = self.prompt_ids(text)
        if len(ids) > self.prompt_len:
            raise ValueError(f"a question of about {len(ids) - self.frame_len} tokens exceeds max_text_tokens="
                             f"{self.spec.max_text_tokens}: {text[:80]!r}")
        prompt = np.full((self.prompt_len,), self.pad_id, np.int32)
        mask = np.zeros((self.prompt_len,), np.int32)
        prompt[self.prompt_len - len(ids):], mask[self.prompt_len - len(ids):] = ids, 1
        return {"pixel_values": pixel_values.astype(np.float32), "image_grid_thw": grid.astype(np.int32),
                "prompt_ids": prompt, "prompt_mask": mask,
                "original_hw": np.asarray([im.shape[:2] for im in decoded], np.int32),
                "scale": np.asarray([s for _, s in boxed], np.float32),
                "canvas_hw": np.asarray(self.spec.canvas_hw, np.int32),
                "resized_hw": np.asarray(self.resized_hw, np.int32)}
