"""Chat templates of Qwen2.5-VL and Qwen3-VL, and the expansion of image placeholders.

Two renderings of the same format live here on purpose:
  * `render_messages` / `chat_prompt`: plain Python, what the trainer and the evaluator call;
  * `CHAT_TEMPLATES` (Instruct, per family) and `THINKING_CHAT_TEMPLATE` (`jinja_template` picks): Jinja
    sources in the Hugging Face convention (rendered with trim_blocks and lstrip_blocks), saved beside a
    tokenizer so HF's `apply_chat_template` produces the same text. The tests render them through HF and
    compare with the Python rendering (the Thinking one also with the released template itself).

The formats (those of the released Hugging Face chat templates): ChatML turns `<|im_start|>{role}\\n...<|im_end|>\\n`;
each image is `<|vision_start|><|image_pad|><|vision_end|>`, optionally preceded by `Picture N: `;
Qwen2.5-VL inserts the default system turn "You are a helpful assistant." when the conversation does not
start with one, Qwen3-VL does not. Tools of the released templates are not supported.

Two template styles (`chat_template`, the config's `data.chat_template`):
  * "instruct": the Instruct checkpoints' template (both families), as above;
  * "thinking": the template of Qwen3-VL-4B/8B-Thinking (Qwen3-VL only). Its generation prompt opens a
    reasoning block, `<|im_start|>assistant\\n<think>\\n`, so a completion is
    `reasoning\\n</think>\\n\\nanswer`. An assistant turn after the last user turn is rendered
    `<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (the reasoning taken from `reasoning_content`, or split
    off the content at its `</think>`); one with no reasoning still gets the empty block
    `<think>\\n\\n</think>\\n\\n` when it is the last message; earlier assistant turns are rendered without
    any block (their reasoning is dropped). `<think>` / `</think>` are ordinary added tokens (ids 151667 /
    151668, not special: decoding keeps them).
    The released template also renders tool calls and drops turns of other roles; this renderer refuses
    those, and images in system turns (which the released template numbers inconsistently), with an
    error naming the message.
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
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
CHAT_TEMPLATE_STYLES = ("instruct", "thinking")
# What the Thinking template writes between its generation prompt (ending "<think>\n") and the answer of an
# assistant turn without reasoning: the rest of its empty block "<think>\n\n</think>\n\n".
EMPTY_REASONING_CLOSE = "\n" + THINK_CLOSE + "\n\n"

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


def _counted_only_if_asked(macro: str) -> str:
    """The content macro with a second argument `count` (default true); false renders without numbering
    the images and videos, as the search for the last user turn must not advance the counters."""
    out = macro.replace("render_content(content)", "render_content(content, count=true)")
    for counter in ("image_count", "video_count"):
        step = f"{{%- set {counter}.value = {counter}.value + 1 -%}}"
        out = out.replace(step, "{%- if count -%}" + step + "{%- endif -%}")
    return out


_JINJA_CONTENT_COUNTED = _counted_only_if_asked(_JINJA_CONTENT)

# The last user turn that is not a tool response (the released template's `last_query_index`).
_JINJA_LAST_QUERY = """
{%- set ns = namespace(last_query=messages|length - 1, searching=true) -%}
{%- for message in messages[::-1] -%}
{%- if ns.searching and message['role'] == 'user' -%}
{%- set text = render_content(message['content'], false) -%}
{%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
{%- set ns.searching = false -%}
{%- set ns.last_query = messages|length - 1 - loop.index0 -%}
{%- endif -%}
{%- endif -%}
{%- endfor -%}
"""

_JINJA_THINKING_LOOP = """
{%- for message in messages -%}
{%- set content = render_content(message['content']) -%}
{%- if message['role'] == 'assistant' -%}
{%- if message['reasoning_content'] is string -%}
{%- set reasoning = message['reasoning_content'] -%}
{%- elif '</think>' in content -%}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
{%- else -%}
{%- set reasoning = '' -%}
{%- endif -%}
{%- if loop.index0 > ns.last_query and (loop.last or reasoning) -%}
{{- '<|im_start|>assistant\\n<think>\\n' ~ reasoning.strip('\\n') ~ '\\n</think>\\n\\n' ~ content.lstrip('\\n') -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' ~ content -}}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{%- else -%}
{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ content ~ '<|im_end|>\\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n<think>\\n' -}}
{%- endif -%}
"""

# Qwen3-VL Thinking (see the module docstring), for the inputs `render_messages` accepts.
THINKING_CHAT_TEMPLATE = (_JINJA_COUNTERS + _JINJA_CONTENT_COUNTED + _JINJA_LAST_QUERY + _JINJA_THINKING_LOOP).strip()


def check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {list(FAMILIES)}")


def check_chat_template(family: str, chat_template: str) -> None:
    """Raises ValueError naming `chat_template` when `family` has no template of that style."""
    check_family(family)
    if chat_template not in CHAT_TEMPLATE_STYLES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_STYLES}, got {chat_template!r}")
    if chat_template == "thinking" and family != "qwen3_vl":
        raise ValueError(f"chat_template 'thinking' is the Qwen3-VL Thinking checkpoints' template; family "
                         f"{family!r} has none (use 'instruct')")


def jinja_template(family: str, chat_template: str = "instruct") -> str:
    """The Jinja source of a family's template of that style (what HF's `apply_chat_template` renders)."""
    check_chat_template(family, chat_template)
    return THINKING_CHAT_TEMPLATE if chat_template == "thinking" else CHAT_TEMPLATES[family]


def answer_prefix(chat_template: str) -> str:
    """What an answer without reasoning starts with after the generation prompt: nothing for "instruct";
    the close of the empty reasoning block for "thinking" (the template's own rendering of such a turn)."""
    if chat_template not in CHAT_TEMPLATE_STYLES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_STYLES}, got {chat_template!r}")
    return EMPTY_REASONING_CLOSE if chat_template == "thinking" else ""


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
                    add_vision_id: bool = False, chat_template: str = "instruct") -> str:
    """The chat-template text of `messages` (HF message dicts), as `apply_chat_template(tokenize=False)`.

    Each message is `{"role": ..., "content": str | [{"type": "image"} | {"type": "text", "text": ...}]}`;
    with `chat_template="thinking"` an assistant turn may also carry `reasoning_content` (module docstring).
    """
    check_chat_template(family, chat_template)
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] needs 'role' and 'content' keys, got {sorted(message)}")
    if chat_template == "thinking":
        return _render_thinking(messages, add_generation_prompt, add_vision_id)
    counters = {"image": 0, "video": 0}
    out = []
    if family == "qwen2_5_vl" and messages and messages[0].get("role") != "system":
        out.append(f"{IM_START}system\n{DEFAULT_SYSTEM_QWEN2_5}{IM_END}\n")
    for i, message in enumerate(messages):
        body = _render_content(message["content"], counters, add_vision_id, f"messages[{i}]")
        out.append(f"{IM_START}{message['role']}\n{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n")
    return "".join(out)


def _render_thinking(messages: Sequence[Mapping], add_generation_prompt: bool, add_vision_id: bool) -> str:
    """The Qwen3-VL Thinking template (module docstring); messages already have role and content."""
    _check_thinking_roles(messages)
    last_query = _last_query_index(messages)
    counters = {"image": 0, "video": 0}
    out = []
    for i, message in enumerate(messages):
        body = _render_content(message["content"], counters, add_vision_id, f"messages[{i}]")
        if message["role"] == "assistant":
            out.append(_thinking_assistant_turn(body, message.get("reasoning_content"),
                                                opens_block=i > last_query, last=i == len(messages) - 1))
        else:
            out.append(f"{IM_START}{message['role']}\n{body}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}assistant\n{THINK_OPEN}\n")
    return "".join(out)


def _check_thinking_roles(messages: Sequence[Mapping]) -> None:
    """System, user and assistant turns without tool calls; no images in system turns."""
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ("system", "user", "assistant") or "tool_calls" in message:
            raise ValueError(f"messages[{i}]: the thinking template renderer takes system, user and assistant "
                             f"turns without tool calls, got role {role!r} with keys {sorted(message)}")
        content = message["content"]
        if role == "system" and not isinstance(content, str) and any(
                isinstance(part, Mapping) and "text" not in part for part in content):
            raise ValueError(f"messages[{i}]: images or videos in a system turn are not supported by the thinking "
                             "template renderer")


def _last_query_index(messages: Sequence[Mapping]) -> int:
    """The last user turn that is not a wrapped tool response; the last message when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] != "user":
            continue
        text = _render_content(messages[i]["content"], {"image": 0, "video": 0}, False, f"messages[{i}]")
        if not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
            return i
    return len(messages) - 1


def _thinking_assistant_turn(body: str, reasoning, opens_block: bool, last: bool) -> str:
    """One assistant turn: its reasoning from `reasoning_content`, or split off `body` at `</think>`."""
    if not isinstance(reasoning, str):
        reasoning = ""
        if THINK_CLOSE in body:
            reasoning = body.split(THINK_CLOSE)[0].rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n")
            body = body.split(THINK_CLOSE)[-1].lstrip("\n")
    if opens_block and (last or reasoning):
        reasoning, body = reasoning.strip("\n"), body.lstrip("\n")
        body = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{body}"
    return f"{IM_START}assistant\n{body}{IM_END}\n"


def chat_messages(text: str, num_images: int, system: str | None = None) -> list[dict]:
    """One user turn holding `num_images` images followed by `text` (plus an optional system turn)."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": content}]


def chat_prompt(family: str, text: str, num_images: int, add_vision_id: bool = False,
                system: str | None = None, chat_template: str = "instruct") -> str:
    """The prompt for one user turn with `num_images` images before `text`, ending with the assistant header.

    For DiG, `num_images=2` and `add_vision_id=True` gives `Picture 1: <image> Picture 2: <image> text`.
    `system=None` means the family default (Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL: none).
    Image placeholders are single `<|image_pad|>` tokens; `expand_image_tokens` sizes them.
    With `chat_template="thinking"` the header is followed by the opened block `<think>\\n`.
    """
    return render_messages(family, chat_messages(text, num_images, system), add_generation_prompt=True,
                           add_vision_id=add_vision_id, chat_template=chat_template)


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
