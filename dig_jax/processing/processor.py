"""`Processor`: prompts + images -> padded token ids, attention mask, pixel values and grids.

Equivalent to HF's `Qwen2_5_VLProcessor` / `Qwen3VLProcessor` followed by the tokenizer's padding, but
returning numpy arrays with static-shape options (`pad_to`, `pad_multiple`) so a jitted step compiles
once per bucket. Left padding is the default because generation appends on the right.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image

from dig_jax.processing import image as image_lib
from dig_jax.processing import template as template_lib
from dig_jax.processing import tokenizer as tokenizer_lib


def _is_image(x) -> bool:
    return isinstance(x, (np.ndarray, PIL.Image.Image))


class Processor:
    """Tokenizer, chat template and image processor of one model family.

    Attributes:
      family: 'qwen2_5_vl' or 'qwen3_vl'.
      chat_template: 'instruct' or (Qwen3-VL) 'thinking': the template style prompts are rendered with.
      image_cfg: the `ImageProcessorConfig` (family preset unless given).
      tokenizer: the `tokenizers.Tokenizer` read from `tokenizer_path`.
      eos_token_id (<|im_end|>), pad_token_id (<|endoftext|>), image_token_id (<|image_pad|>),
      vision_start_token_id, vision_end_token_id, im_start_token_id: real Qwen ids, checked on load.
    """

    def __init__(self, family: str, tokenizer_path: str, image_cfg: image_lib.ImageProcessorConfig | None = None,
                 chat_template: str = "instruct"):
        template_lib.check_chat_template(family, chat_template)
        self.family = family
        self.chat_template = chat_template
        self.image_cfg = image_cfg if image_cfg is not None else image_lib.ImageProcessorConfig.for_family(family)
        self.tokenizer = tokenizer_lib.load_tokenizer(tokenizer_path)
        special = tokenizer_lib.SPECIAL_TOKENS
        self.eos_token_id = special["<|im_end|>"]
        self.pad_token_id = special["<|endoftext|>"]
        self.image_token_id = special[template_lib.IMAGE_PAD]
        self.vision_start_token_id = special[template_lib.VISION_START]
        self.vision_end_token_id = special[template_lib.VISION_END]
        self.im_start_token_id = special[template_lib.IM_START]

    # ---------------------------------------------------------------- text
    def prompt(self, text: str, num_images: int = 2, add_vision_id: bool = False, system: str | None = None) -> str:
        """`chat_prompt` for this family (user turn with images then text, assistant header appended)."""
        return template_lib.chat_prompt(self.family, text, num_images, add_vision_id=add_vision_id, system=system,
                                        chat_template=self.chat_template)

    def encode(self, text: str) -> np.ndarray:
        """int32[L]: token ids of `text` as written (image placeholders not expanded, no padding)."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens (including <|im_end|> and padding) are dropped by default."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                     skip_special_tokens=skip_special_tokens)

    def batch_decode(self, ids: np.ndarray, stop_at_eos: bool = True, skip_special_tokens: bool = True) -> list[str]:
        """Texts of int[B, L] completions; with `stop_at_eos`, each row ends at its first <|im_end|>."""
        rows = []
        for row in np.asarray(ids).reshape(len(ids), -1):
            if stop_at_eos and (row == self.eos_token_id).any():
                row = row[:int(np.argmax(row == self.eos_token_id))]
            rows.append([int(i) for i in row])
        return self.tokenizer.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many <|image_pad|> tokens an image of height x width pixels becomes."""
        c = self.image_cfg
        h, w = image_lib.smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)
        return (h // c.patch_size) * (w // c.patch_size) // (c.merge_size ** 2)

    # ---------------------------------------------------------------- batch
    def __call__(self, prompts, images=None, *, padding_side: str = "left", pad_to: int | None = None,
                 pad_multiple: int | None = None) -> dict[str, np.ndarray]:
        """Tokenize a batch of prompts with their images.

        Args:
          prompts: a string, a list of strings (chat-template text with one `<|image_pad|>` per image), or
            lists of HF message dicts (rendered with this family's template, with the generation prompt).
          images: None; a flat list consumed in placeholder order across the batch (as HF's processor); or
            one list per prompt. Images are uint8[H, W, 3] arrays or PIL images.
          padding_side: 'left' (default, for generation) or 'right'.
          pad_to: pad every row to exactly this length (error if a prompt is longer).
          pad_multiple: otherwise pad to the longest row rounded up to a multiple of this (bucketing).

        Returns a dict of numpy arrays:
          input_ids int32[B, L], attention_mask int32[B, L] (1 on real tokens),
          pixel_values float32[N, C*T*P*P], image_grid_thw int64[n_images, 3].
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], Mapping)):
            prompts = [prompts]
        texts = [p if isinstance(p, str) else template_lib.render_messages(self.family, p,
                                                                           chat_template=self.chat_template)
                 for p in prompts]
        flat_images, per_prompt = self._flatten_images(images, len(texts))

        pixel_values, grid = image_lib.preprocess_images(flat_images, self.image_cfg)
        token_counts = image_lib.num_image_tokens(grid, self.image_cfg.merge_size)
        rows, next_image = [], 0
        for b, text in enumerate(texts):
            ids = self.encode(text)
            n = int(np.sum(ids == self.image_token_id))
            if per_prompt is not None and per_prompt[b] != n:
                raise ValueError(f"prompt {b} holds {n} {template_lib.IMAGE_PAD} placeholders but its image list "
                                 f"has {per_prompt[b]} images")
            if next_image + n > len(flat_images):
                raise ValueError(f"prompt {b} needs images {next_image}..{next_image + n - 1} but only "
                                 f"{len(flat_images)} images were given")
            repeats = np.ones(len(ids), dtype=np.int64)
            repeats[ids == self.image_token_id] = token_counts[next_image:next_image + n]
            rows.append(np.repeat(ids, repeats))
            next_image += n
        if next_image != len(flat_images):
            raise ValueError(f"{len(flat_images)} images were given but the prompts hold {next_image} "
                             f"{template_lib.IMAGE_PAD} placeholders")
        input_ids, attention_mask = self._pad(rows, padding_side, pad_to, pad_multiple)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_grid_thw": grid}

    @staticmethod
    def _flatten_images(images, batch_size: int) -> tuple[list, list[int] | None]:
        """(flat image list, images per prompt or None when the caller gave one flat list)."""
        if images is None:
            return [], None
        if _is_image(images):
            return [images], None
        images = list(images)
        if images and not _is_image(images[0]):  # one list per prompt
            if len(images) != batch_size:
                raise ValueError(f"got {len(images)} per-prompt image lists for {batch_size} prompts")
            return [im for per_prompt in images for im in per_prompt], [len(p) for p in images]
        return images, None

    def _pad(self, rows: list[np.ndarray], side: str, pad_to: int | None, pad_multiple: int | None):
        longest = max((len(r) for r in rows), default=0)
        if pad_to is not None:
            if longest > pad_to:
                culprit = int(np.argmax([len(r) for r in rows]))
                raise ValueError(f"prompt {culprit} has {longest} tokens (images expanded), more than pad_to={pad_to}")
            length = pad_to
        elif pad_multiple:
            length = -(-longest // pad_multiple) * pad_multiple
        else:
            length = longest
        input_ids = np.full((len(rows), length), self.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), length), dtype=np.int32)
        for b, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            input_ids[b, span] = row
            attention_mask[b, span] = 1
        return input_ids, attention_mask
