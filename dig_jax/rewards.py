"""DiG rewards: parse a model's answer into boxes, match them to the ground truth, score the match.

Why this module exists: GRPO learns only from the scalar this module returns, so every edge case
(unparseable text, truncated JSON, NaN, inverted corners, empty sets) has a defined score and no
string can make it raise. Host-side numpy: it runs on decoded text, outside `jit`.

Coordinates. Three spaces appear:
- **pixels**: the rendered image as stored in the dataset, (H, W) = `original_hw`. Ground truth lives here.
- **answer**: what the model writes in `bbox_2d`. Qwen3-VL writes 0..1000 relative coordinates
  (x * 1000 / W; the resize does not enter). Qwen2.5-VL writes absolute pixels on the processor-resized
  image, (H', W') = `resized_hw` (x * W' / W). See reference/qwen_vl_spec.md section 6.
- **normalised**: [0, 1] on both axes. Matching happens here, because IoU and GIoU do not change under
  per-axis scaling and the L1 term then has the same unit (a fraction of the image) for both families.

Reward (the paper's form; weights in `RewardConfig`):
    r = (1 - alpha) * (lambda1 * F1 + lambda2 * mean_iou) + alpha * format_ok
Definitions, precisely:
- Matching: one-to-one Hungarian assignment on cost = l1_weight * mean|p - g| (normalised corners)
  + giou_weight * (1 - GIoU(p, g)); min(P, G) pairs are matched.
- A matched pair is a true positive when its IoU >= iou_threshold. F1 = 2 TP / (P + G).
- mean_iou = mean IoU over all matched pairs (including those under the threshold, so that moving a box
  closer always pays); 0 when nothing is matched because exactly one side is empty.
- Both sets empty (a pair without differences answered with no box): F1 = precision = recall =
  mean_iou = 1, i.e. an empty answer to a 0-difference pair is fully correct.
- A non-empty answer to a 0-difference pair: F1 = precision = mean_iou = 0, recall = 1 (nothing was
  missed); the reward is then alpha * format_ok.
- format_ok = 1 when a complete JSON list was found (after removing a thinking block and an optional
  ```json fence; prose around it is allowed) and every element is an object with a valid `bbox_2d`.
  Otherwise 0, but valid boxes that could be recovered still count for F1 / IoU.
- A box is valid when it is 4 finite real numbers (not bools, not strings) with x1 < x2 and y1 < y2;
  anything else is dropped and makes format_ok 0 (inverted corners are dropped, not repaired: the
  answer format is (top-left, bottom-right)). Valid boxes are then clipped to the image; one that is
  empty after clipping (entirely outside) is dropped without touching format_ok.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

FAMILIES = ("qwen3_vl", "qwen2_5_vl")
QWEN3_SCALE = 1000.0  # Qwen3-VL relative coordinate range: x_answer = x / W * 1000.

Hw = tuple[int, int]


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Weights of the DiG reward. The defaults keep r in [0, 1].

    Attributes:
      alpha: weight of the format reward; the accuracy part gets (1 - alpha).
      lambda1: weight of F1 in the accuracy part.
      lambda2: weight of the mean IoU of matched pairs in the accuracy part.
      iou_threshold: a matched pair counts as a true positive at IoU >= this.
      l1_cost_weight: matching cost weight of the mean absolute corner difference (normalised coords).
      giou_cost_weight: matching cost weight of (1 - generalised IoU).
      family: answer coordinate convention, "qwen3_vl" (0..1000) or "qwen2_5_vl" (resized pixels).
    """
    alpha: float = 0.1
    lambda1: float = 0.5
    lambda2: float = 0.5
    iou_threshold: float = 0.5
    l1_cost_weight: float = 1.0
    giou_cost_weight: float = 1.0
    family: str = "qwen3_vl"

    def __post_init__(self):
        for name in ("alpha", "lambda1", "lambda2", "iou_threshold", "l1_cost_weight", "giou_cost_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RewardConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.alpha > 1:
            raise ValueError(f"RewardConfig.alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"RewardConfig.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.l1_cost_weight == 0 and self.giou_cost_weight == 0:
            raise ValueError("RewardConfig.l1_cost_weight and giou_cost_weight cannot both be 0")
        _check_family(self.family, "RewardConfig.family")

    @property
    def max_reward(self) -> float:
        """The reward of a perfect, well-formatted answer."""
        return (1 - self.alpha) * (self.lambda1 + self.lambda2) + self.alpha


def _check_family(family: str, where: str = "family") -> None:
    if family not in FAMILIES:
        raise ValueError(f"{where} must be one of {FAMILIES}, got {family!r}")


# ---------------------------------------------------------------------------------------------------
# Coordinate conversions. Boxes are float[N, 4] as (x1, y1, x2, y2).
# ---------------------------------------------------------------------------------------------------
def _answer_scale(family: str, original_hw: Hw, resized_hw: Hw | None) -> np.ndarray:
    """float[4]: answer units per pixel of the original image, for (x1, y1, x2, y2)."""
    _check_family(family)
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


def _strip_thinking(text: str) -> str:
    """Keep what follows the last </think>; an unclosed <think> means no answer was given yet."""
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        return text[closes[-1].end():]
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


def parse_answer(text: Any) -> ParsedAnswer:
    """Tolerant parse of a model answer into boxes (answer coordinates). Never raises.

    Order: drop the thinking block; prefer the last ```json fence if any; take the first JSON list of
    objects; failing that, salvage complete objects that have a bbox_2d (format_ok is then False).
    """
    if not isinstance(text, str):
        return ParsedAnswer(_EMPTY, False, 0)
    # No catch-all: every step is total (regexes; JSON errors are caught in _decode_at), which the
    # hypothesis fuzz test checks.
    body = _strip_thinking(text)
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


# ---------------------------------------------------------------------------------------------------
# Box geometry and matching (vectorised numpy; boxes float[N, 4] / float[M, 4], normalised coords)
# ---------------------------------------------------------------------------------------------------
def _area(b: np.ndarray) -> np.ndarray:
    return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def pairwise_iou_giou(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU and generalised IoU, each float64[N, M], for valid boxes (x1 < x2, y1 < y2)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(b, np.float64).reshape(-1, 4)[None, :, :]
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    union = _area(a) + _area(b) - inter
    iou = inter / union
    hull = np.prod(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), axis=-1)
    giou = iou - (hull - union) / hull
    return iou, giou


def matching_cost(pred: np.ndarray, gt: np.ndarray, config: RewardConfig) -> np.ndarray:
    """float64[P, G]: l1_weight * mean |corner difference| + giou_weight * (1 - GIoU)."""
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    l1 = np.abs(pred[:, None, :] - gt[None, :, :]).mean(-1)
    _, giou = pairwise_iou_giou(pred, gt)
    return config.l1_cost_weight * l1 + config.giou_cost_weight * (1.0 - giou)


def hungarian_match(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost one-to-one matching of rows to columns; min(P, G) pairs (row idx, col idx)."""
    cost = np.asarray(cost, np.float64)
    if cost.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def _clip_valid(boxes: np.ndarray) -> tuple[np.ndarray, int]:
    """Clip normalised boxes to [0, 1]; drop those that become empty. Returns (boxes, num_dropped)."""
    boxes = np.clip(boxes, 0.0, 1.0)
    keep = (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 1] < boxes[:, 3])
    return boxes[keep], int((~keep).sum())


# ---------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------
METRIC_KEYS = ("reward", "f1", "precision", "recall", "mean_iou", "format_ok", "num_pred", "num_gt")


def score_boxes(pred: np.ndarray, gt: np.ndarray, format_ok: bool, config: RewardConfig) -> dict:
    """Metrics for predicted vs ground-truth boxes, both float[*, 4] in normalised [0, 1] coordinates."""
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    num_pred, num_gt = len(pred), len(gt)
    if num_pred == 0 and num_gt == 0:
        f1 = precision = recall = mean_iou = 1.0
    elif num_pred == 0 or num_gt == 0:
        f1 = mean_iou = 0.0
        precision = 1.0 if num_pred == 0 else 0.0
        recall = 1.0 if num_gt == 0 else 0.0
    else:
        rows, cols = hungarian_match(matching_cost(pred, gt, config))
        iou, _ = pairwise_iou_giou(pred, gt)
        matched_iou = iou[rows, cols]
        tp = float(np.sum(matched_iou >= config.iou_threshold))
        f1 = 2.0 * tp / (num_pred + num_gt)
        precision, recall = tp / num_pred, tp / num_gt
        mean_iou = float(matched_iou.mean())
    fmt = 1.0 if format_ok else 0.0
    accuracy = config.lambda1 * f1 + config.lambda2 * mean_iou
    reward = (1.0 - config.alpha) * accuracy + config.alpha * fmt
    return {"reward": float(reward), "f1": float(f1), "precision": float(precision),
            "recall": float(recall), "mean_iou": float(mean_iou), "format_ok": fmt,
            "num_pred": float(num_pred), "num_gt": float(num_gt)}


def score_answer(text: Any, gt_boxes_px, original_hw: Hw, resized_hw: Hw | None = None,
                 config: RewardConfig = RewardConfig()) -> dict:
    """Score one answer against the ground truth. Never raises on `text`.

    Args:
      text: the decoded completion.
      gt_boxes_px: float[G, 4] ground-truth pixel boxes on the rendered image (G may be 0).
      original_hw: (H, W) of the rendered image.
      resized_hw: (H', W') of the processor-resized image; required for qwen2_5_vl.
      config: weights and the coordinate convention.
    Returns:
      {reward, f1, precision, recall, mean_iou, format_ok, num_pred, num_gt} as floats. num_pred counts
      the valid predicted boxes (after clipping to the image).
    """
    gt = pixels_to_normalized(gt_boxes_px, original_hw)
    ext_w, ext_h = answer_extent(config.family, original_hw, resized_hw)
    parsed = parse_answer(text)
    pred, _ = _clip_valid(parsed.boxes / np.array([ext_w, ext_h, ext_w, ext_h]))
    return score_boxes(pred, gt, parsed.format_ok, config)


def score_batch(texts: Sequence[Any], gt_boxes_px: Sequence, original_hw: Sequence[Hw],
                resized_hw: Sequence[Hw] | None = None,
                config: RewardConfig = RewardConfig()) -> dict[str, np.ndarray]:
    """score_answer over a batch; each metric becomes float32[B]. Per-sample arguments are sequences."""
    n = len(texts)
    if len(gt_boxes_px) != n or len(original_hw) != n or (resized_hw is not None and len(resized_hw) != n):
        raise ValueError(f"score_batch: {n} texts but {len(gt_boxes_px)} gt box sets, "
                         f"{len(original_hw)} original_hw, "
                         f"{'no' if resized_hw is None else len(resized_hw)} resized_hw")
    rows = [score_answer(texts[i], gt_boxes_px[i], original_hw[i],
                         None if resized_hw is None else resized_hw[i], config) for i in range(n)]
    return {k: np.array([r[k] for r in rows], np.float32) for k in METRIC_KEYS}
