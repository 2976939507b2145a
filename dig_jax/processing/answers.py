"""The answer format of both families: boxes to answer text, answer text back to boxes.

Coordinates. Three spaces appear:
- **pixels**: the rendered image as stored in the dataset, (H, W) = `original_hw`. Ground truth lives here.
- **answer**: what the model writes in `bbox_2d`. Qwen3-VL writes 0..1000 relative coordinates
  (x * 1000 / W; the resize does not enter). Qwen2.5-VL writes absolute pixels on the processor-resized
  image, (H', W') = `resized_hw` (x * W' / W), as in the families' grounding cookbooks.
- **normalised**: [0, 1] on both axes, where the reward matches boxes (`rl.rewards`).

Parsing never raises on any string (GRPO scores whatever a policy samples):
- format_ok = 1 when a complete JSON list was found (after removing a thinking block and an optional
  ```json fence; prose around it is allowed) and every element is an object with a valid `bbox_2d`.
  Otherwise 0, but valid boxes that could be recovered are still returned.
- Thinking block: the answer is what follows the last `</think>`. A `<think>` the completion opens and
  never closes hides everything after it. With `thinking=True` (the Qwen3-VL Thinking template, whose
  generation prompt already opened the block) a completion without `</think>` is still reasoning: it has
  no answer, so no boxes and format_ok 0 (like any answer without a JSON list; on a pair without
  differences the reward's both-sets-empty rule then still pays its accuracy part).
- A box is valid when it is 4 finite real numbers (not bools, not strings) with x1 < x2 and y1 < y2;
  anything else is dropped and makes format_ok 0 (inverted corners are dropped, not repaired: the
  answer format is (top-left, bottom-right)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dig_jax.models.config import FAMILIES

QWEN3_SCALE = 1000.0  # Qwen3-VL relative coordinate range: x_answer = x / W * 1000.

Hw = tuple[int, int]


def check_family(family: str, where: str = "family") -> None:
    if family not in FAMILIES:
        raise ValueError(f"{where} must be one of {FAMILIES}, got {family!r}")


# ---------------------------------------------------------------------------------------------------
# Coordinate conversions. Boxes are float[N, 4] as (x1, y1, x2, y2).
# ---------------------------------------------------------------------------------------------------
def _answer_scale(family: str, original_hw: Hw, resized_hw: Hw | None) -> np.ndarray:
    """float[4]: answer units per pixel of the original image, for (x1, y1, x2, y2)."""
    check_family(family)
    h, w = _check_hw(original_hw, "original_hw")
    if family == "qwen3_vl":
        sx, sy = QWEN3_SCALE / w, QWEN3_SCALE / h
    else:
        if resized_hw is None:
            raise ValueError("family 'qwen2_5_vl' answers in resized-image pixels: resized_hw is required")
        rh, rw = _check_hw(resized_hw, "resized_hw")
        sx, sy = rw / w, rh / h
    return np.array([sx, sy, sx, sy], np.float64)


def _check_hw(hw: Any, name: str) -> tuple[float, float]:
    try:
        h, w = (float(v) for v in hw)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (height, width), got {hw!r}") from None
    if not (h > 0 and w > 0 and math.isfinite(h) and math.isfinite(w)):
        raise ValueError(f"{name} must be positive and finite, got {hw!r}")
    return h, w


def answer_extent(family: str, original_hw: Hw, resized_hw: Hw | None = None) -> tuple[float, float]:
    """(width, height) of the image in answer coordinates: (1000, 1000) for Qwen3-VL, (W', H') for 2.5."""
    _answer_scale(family, original_hw, resized_hw)  # validates the arguments
    if family == "qwen3_vl":
        return QWEN3_SCALE, QWEN3_SCALE
    rh, rw = _check_hw(resized_hw, "resized_hw")
    return rw, rh


def pixels_to_answer(boxes_px, family: str, original_hw: Hw, resized_hw: Hw | None = None) -> np.ndarray:
    """float[N, 4] pixel boxes on the rendered (original_hw) image -> the family's answer coordinates."""
    boxes = np.asarray(boxes_px, np.float64).reshape(-1, 4)
    return boxes * _answer_scale(family, original_hw, resized_hw)


def answer_to_pixels(boxes_ans, family: str, original_hw: Hw, resized_hw: Hw | None = None) -> np.ndarray:
    """float[N, 4] boxes in the family's answer coordinates -> pixel boxes on the rendered image."""
    boxes = np.asarray(boxes_ans, np.float64).reshape(-1, 4)
    return boxes / _answer_scale(family, original_hw, resized_hw)


def pixels_to_normalized(boxes_px, original_hw: Hw) -> np.ndarray:
    """float[N, 4] pixel boxes -> [0, 1] coordinates (x / W, y / H)."""
    h, w = _check_hw(original_hw, "original_hw")
    return np.asarray(boxes_px, np.float64).reshape(-1, 4) / np.array([w, h, w, h])


def format_answer(boxes_px, labels: Sequence[str] | None, family: str, original_hw: Hw,
                  resized_hw: Hw | None = None, fenced: bool = False) -> str:
    """The exact answer text for supervised targets: `[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`.

    Args:
      boxes_px: float[N, 4] ground-truth pixel boxes on the rendered image.
      labels: N strings, or None for "difference".
      family: "qwen3_vl" or "qwen2_5_vl" (sets the coordinate convention).
      original_hw, resized_hw: see module docstring; resized_hw only matters for qwen2_5_vl.
      fenced: wrap in a ```json fence, the form Qwen cookbooks show.
    Coordinates are rounded to integers and clipped to the image; a box that rounding would make
    empty is widened to 1 unit so that it stays a valid box for the parser.
    """
    boxes = pixels_to_answer(boxes_px, family, original_hw, resized_hw)
    if labels is None:
        labels = ["difference"] * len(boxes)
    if len(labels) != len(boxes):
        raise ValueError(f"format_answer: {len(boxes)} boxes but {len(labels)} labels")
    ext_w, ext_h = answer_extent(family, original_hw, resized_hw)
    limits = (int(round(ext_w)), int(round(ext_h)))
    items = []
    for box, label in zip(boxes, labels):
        if not np.all(np.isfinite(box)):
            raise ValueError(f"format_answer: non-finite box {box.tolist()}")
        corners = [int(v) for v in np.rint(box)]
        for lo, hi, limit in ((0, 2, limits[0]), (1, 3, limits[1])):
            corners[lo] = min(max(corners[lo], 0), limit)
            corners[hi] = min(max(corners[hi], 0), limit)
            if corners[hi] <= corners[lo]:
                if corners[lo] < limit:
                    corners[hi] = corners[lo] + 1
                else:
                    corners[lo] = corners[hi] - 1
        items.append({"bbox_2d": corners, "label": str(label)})
    text = json.dumps(items, ensure_ascii=False)
    return f"```json\n{text}\n```" if fenced else text


# ---------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """boxes: float64[P, 4] in answer coordinates (unchecked against the image); see module docstring."""
    boxes: np.ndarray
    format_ok: bool
    num_dropped: int


_THINK_CLOSE = re.compile(r"</think\s*>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think\s*>", re.IGNORECASE)
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\r?\n?(.*?)```", re.DOTALL)
_EMPTY = np.zeros((0, 4), np.float64)


def _strip_thinking(text: str, thinking: bool) -> str:
    """Keep what follows the last </think>; an unclosed <think> (or, with `thinking`, the block the prompt
    opened) means no answer was given yet."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():]
    if thinking:
        return ""
    opened = _THINK_OPEN.search(text)
    return text[:opened.start()] if opened else text


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        out = float(value)
    except OverflowError:
        return None
    return out if math.isfinite(out) else None


def _box_of(item: Any) -> np.ndarray | None:
    """float[4] from one answer object, or None when it is not a valid box."""
    if not isinstance(item, dict):
        return None
    coords = item.get("bbox_2d")
    if not isinstance(coords, list) or len(coords) != 4:
        return None
    values = [_number(v) for v in coords]
    if any(v is None for v in values):
        return None
    x1, y1, x2, y2 = values
    if not (x1 < x2 and y1 < y2):
        return None
    return np.array(values, np.float64)


def _decode_at(decoder: json.JSONDecoder, text: str, start: int):
    try:
        return decoder.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None


def _find_list(text: str):
    """The first JSON list of objects in `text` (or an empty list), else None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", text):
        decoded = _decode_at(decoder, text, match.start())
        if decoded is None:
            continue
        value = decoded[0]
        if isinstance(value, list) and all(isinstance(v, dict) for v in value):
            return value
    return None


def _salvage_objects(text: str) -> list:
    """Complete `{...}` objects with a bbox_2d key, e.g. from a truncated list; non-overlapping."""
    decoder = json.JSONDecoder()
    found, pos = [], 0
    for match in re.finditer(r"\{", text):
        if match.start() < pos:
            continue
        decoded = _decode_at(decoder, text, match.start())
        if decoded is None:
            continue
        value, end = decoded
        if isinstance(value, dict) and "bbox_2d" in value:
            found.append(value)
            pos = end
    return found


def parse_answer(text: Any, thinking: bool = False) -> ParsedAnswer:
    """Tolerant parse of a model answer into boxes (answer coordinates). Never raises.

    Order: drop the thinking block; prefer the last ```json fence if any; take the first JSON list of
    objects; failing that, salvage complete objects that have a bbox_2d (format_ok is then False).
    `thinking`: the completion continues a prompt that opened a `<think>` block (module docstring).
    """
    if not isinstance(text, str):
        return ParsedAnswer(_EMPTY, False, 0)
    # No catch-all: every step is total (regexes; JSON errors are caught in _decode_at), which the
    # hypothesis fuzz test checks.
    body = _strip_thinking(text, thinking)
    fences = _FENCE.findall(body)
    candidates = [fences[-1], body] if fences else [body]
    items = None
    for candidate in candidates:
        items = _find_list(candidate)
        if items is not None:
            break
    list_ok = items is not None
    if items is None:
        items = _salvage_objects(body)
    boxes = [_box_of(item) for item in items]
    kept = [b for b in boxes if b is not None]
    dropped = len(boxes) - len(kept)
    arr = np.stack(kept) if kept else _EMPTY
    return ParsedAnswer(arr, bool(list_ok and dropped == 0), dropped)
