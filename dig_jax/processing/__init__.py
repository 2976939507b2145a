"""Model-input processing for both Qwen-VL families: images, chat template, tokenizer, batching.

  image.py      smart_resize, normalisation, patch flattening (HF PIL-backend parity)
  template.py   chat templates (Python and Jinja; Instruct and Qwen3-VL Thinking) and image-placeholder expansion
  tokenizer.py  loading a Qwen2 tokenizer.json; building the tiny one with the real special-token ids
  processor.py  `Processor`: prompts + images -> padded ids, mask, pixel values, grids

3D (M-RoPE) position ids are computed by dig_jax/models/rope_index.py from the arrays made here.
"""
from dig_jax.processing.image import (ImageProcessorConfig, num_image_tokens, patchify, preprocess_images,
                                      resize_and_normalize, smart_resize, to_rgb_uint8)
from dig_jax.processing.processor import Processor
from dig_jax.processing.template import (CHAT_TEMPLATE_STYLES, CHAT_TEMPLATES, FAMILIES, IMAGE_PAD, answer_prefix,
                                         chat_messages, chat_prompt, check_chat_template, expand_image_tokens,
                                         jinja_template, render_messages)
from dig_jax.processing.tokenizer import (NON_SPECIAL_ADDED_TOKENS, PINNED_IDS, SPECIAL_TOKENS,
                                          build_tiny_tokenizer, load_tokenizer, special_token_ids)

__all__ = [
    "CHAT_TEMPLATES", "CHAT_TEMPLATE_STYLES", "FAMILIES", "IMAGE_PAD", "ImageProcessorConfig",
    "NON_SPECIAL_ADDED_TOKENS", "PINNED_IDS", "Processor", "SPECIAL_TOKENS", "answer_prefix", "build_tiny_tokenizer",
    "chat_messages", "chat_prompt", "check_chat_template", "expand_image_tokens", "jinja_template", "load_tokenizer",
    "num_image_tokens", "patchify", "preprocess_images", "render_messages", "resize_and_normalize", "smart_resize",
    "special_token_ids", "to_rgb_uint8",
]
