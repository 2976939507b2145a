"""Chat templates of Qwen2.5-VL and Qwen3-VL, and the expansion of image placeholders.

Two renderings of the same format live here on purpose:
  * `render_messages` / `chat_prompt`: plain Python, what the trainer and the evaluator call;
  * `CHAT_TEMPLATES`: Jinja sources in the Hugging Face convention (rendered with trim_blocks and
    lstrip_blocks), saved beside a tokenizer so HF's `apply_chat_template` produces the same text. The
    tests render them through HF and compare with the Python rendering.

The formats (those of the released Hugging Face chat templates): ChatML turns `<|im_start|>{role}\\n...<|im_end|>\\n`;
each image is `<|vision_start|><|image_pad|><|vision_end|>`, optionally preceded by `Picture N: `;
Qwen2.5-VL inserts the default system turn "You are a helpful assistant." when the conversation does not
start with one, Qwen3-VL does not. Tools and reasoning traces of the released templates are not supported.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dig_jax.models.config import FAMILIES  # noqa: F401  (re-exported: processing.FAMILIES)

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
DEFAULT_SYSTEM_QWEN2_5 = "You are a helpful assistant."

# Shared part of both Jinja templates: one message's content (a string, or a list of typed parts).
_JINJA_CONTENT = """
{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content -}}
{%- else -%}
{%- for part in content -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
{%- set image_count.value = image_count.value + 1 -%}
{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] == 'video' or 'video' in part -%}
{%- set video_count.value = video_count.value + 1 -%}
{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in part -%}
{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
"""

_JINJA_LOOP = """
{%- for message in messages -%}
{{- '<|im_start|>' ~ message['role'] ~ '\\n' -}}
{{- render_content(message['content']) -}}
{{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

_JINJA_COUNTERS = """
{%- set image_count = namespace(value=0) -%}
{%- set video_count = namespace(value=0) -%}
"""

CHAT_TEMPLATES: dict[str, str] = {
    "qwen2_5_vl": (_JINJA_COUNTERS + _JINJA_CONTENT
                   + "{%- if messages and messages[0]['role'] != 'system' -%}"
                   + "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
                   + "{%- endif -%}" + _JINJA_LOOP).strip(),
    "qwen3_vl": (_JINJA_COUNTERS + _JINJA_CONTENT + _JINJA_LOOP).strip(),
}


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def _render_content(content, counters: dict[str, int], add_vision_id: bool, where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise TypeError(f"{where}.content[{j}] must be a dict like {{'type': 'text', 'text': ...}}, got {part!r}")
        kind = part.get("type")
        if kind == "image" or "image" in part or "image_url" in part:
            counters["image"] += 1
            out.append((f"Picture {counters['image']}: " if add_vision_id else "")
                       + VISION_START + IMAGE_PAD + VISION_END)
        elif kind == "video" or "video" in part:
            counters["video"] += 1
            out.append((f"Video {counters['video']}: " if add_vision_id else "")
                       + VISION_START + VIDEO_PAD + VISION_END)
        elif "text" in part:
            out.append(part["text"])
        else:
            raise ValueError(f"{where}.content[{j}] has neither an image, a video nor text: {part!r}")
    return "".join(out)


def render_messages(family: str, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                    add_vision_id: bool = False) -> str:
    """The chat-template text of `messages` (HF message dicts), as `apply_chat_template(tokenize=False)`.

    Each message is `{"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}`.
    """
    check_family(family)
    counters = {"image": 0, "video": 0}
    out = []
    if family == "qwen2_5_vl" and messages and messages[0].get("role") != "system":
        out.append(f"{IM_START}system\n{DEFAULT_SYSTEM_QWEN2_5}{IM_END}\n")
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] needs 'role' and 'content' keys, got {sorted(message)}")
        body = _render_content(message["content"], counters, add_vision_id, f"messages[{i}]")
        out.append(f"{IM_START}{message['role']}\n{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def chat_messages(text: str, num_images: int, system: str | None = None) -> list[dict]:
    """One user turn holding `num_images` images followed by `text` (plus an optional system turn)."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": content}]


def chat_prompt(family: str, text: str, num_images: int, add_vision_id: bool = False,
                system: str | None = None) -> str:
    """The prompt for one user turn with `num_images` images before `text`, ending with the assistant header.

    For DiG, `num_images=2` and `add_vision_id=True` gives `Picture 1: <image> Picture 2: <image> text`.
    `system=None` means the family default (Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL: none).
    Image placeholders are single `<|image_pad|>` tokens; `expand_image_tokens` sizes them.
    """
    return render_messages(family, chat_messages(text, num_images, system), add_generation_prompt=True,
                           add_vision_id=add_vision_id)


def expand_image_tokens(tokens: str | Sequence[int] | np.ndarray, image_grid_thw: np.ndarray, merge_size: int,
                        image_token_id: int = 151655) -> str | np.ndarray:
    """Replace the i-th image placeholder by `t * h * w / merge_size^2` copies, for every image i.

    Works on the prompt text (`<|image_pad|>` substrings) or on token ids (`image_token_id` entries); the
    number of placeholders must equal the number of images. Returns the same kind it was given (ids as
    int32[L']).
    """
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    counts = [int(c) for c in grid.prod(axis=-1) // (merge_size * merge_size)]
    if isinstance(tokens, str):
        pieces = tokens.split(IMAGE_PAD)
        if len(pieces) - 1 != len(counts):
            raise ValueError(f"the text has {len(pieces) - 1} {IMAGE_PAD} placeholders but {len(counts)} images "
                             "were given")
        out = [pieces[0]]
        for count, piece in zip(counts, pieces[1:]):
            out += [IMAGE_PAD * count, piece]
        return "".join(out)
    ids = np.asarray(tokens)
    positions = np.flatnonzero(ids == image_token_id)
    if len(positions) != len(counts):
        raise ValueError(f"the token ids hold {len(positions)} image placeholders (id {image_token_id}) but "
                         f"{len(counts)} images were given")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    return np.repeat(ids, repeats).astype(np.int32)
