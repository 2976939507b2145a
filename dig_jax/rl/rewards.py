"""DiG rewards: match an answer's boxes to the ground truth and score the match.

Why this module exists: GRPO learns only from the scalar this module returns, so every edge case
(unparseable text, truncated JSON, NaN, inverted corners, empty sets) has a defined score and no
string can make it raise. Host-side numpy: it runs on decoded text, outside `jit`. Parsing and the
coordinate conventions live in `processing.answers`; matching happens in normalised [0, 1]
coordinates, because IoU and GIoU do not change under per-axis scaling and the L1 term then has the
same unit (a fraction of the image) for both families.

Reward (the paper's form; weights in `RewardConfig`):
    r = (1 - alpha) * (lambda1 * F1 + lambda2 * mean_iou) + alpha * format_ok
        [+ count_weight * count_ok] [- extra_box_penalty * extra_boxes]
The bracketed terms are ours, not the paper's, and off by default (both weights 0): count_ok = 1 when a
well-formatted answer has exactly as many boxes as there are differences; extra_boxes = max(0, P - G),
the boxes a well-formatted answer gives beyond the number of differences. Why they exist: with uncertain
boxes a second box on a one-difference pair raises the expected F1 + IoU (the matcher keeps the better
box), while a missing box on a two-difference pair costs a lot, so the paper's reward makes over-counting
cheap and under-counting dear, and GRPO trades counting for box coverage (README "Pricing the count").
The count term pays both kinds of right count alike, which leaves that asymmetry in place; the extra-box
penalty removes it: at box accuracy q, a second box on a one-difference pair gains
E[r(2 boxes)] - E[r(1 box)] and a missing box on a two-difference pair loses E[r(2)] - E[r(1)] there,
and a penalty equal to the difference of the two makes both mistakes cost the same, so that the reward's
best answer is the count the model finds more likely: about 0.125 for q in 0.4-0.6 under the default
weights when every box aims at a true box (`benchmarks/reward_by_count.py`), more where a second box can
cover a second guess (the demo's two-object scenes: it uses 0.17).
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
- format_ok as `processing.answers.parse_answer` defines it. Valid boxes are clipped to the image; one
  that is empty after clipping (entirely outside) is dropped without touching format_ok.
- Answers are scored after the reasoning block: the text after the last `</think>`. Under the Qwen3-VL
  Thinking template (`RewardConfig.chat_template = "thinking"`) the prompt opened the block, so a
  completion that never closes it (still reasoning when it hit the token cap) has no answer: no boxes and
  format_ok 0, i.e. reward 0 on a pair with differences (and (1 - alpha) on one without, by the
  both-sets-empty rule above, as for any answer without a JSON list).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from scipy.optimize import linear_sum_assignment

from dig_jax.processing.answers import Hw, answer_extent, check_family, parse_answer, pixels_to_normalized
from dig_jax.processing.template import CHAT_TEMPLATE_STYLES, check_chat_template


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
      count_weight: weight of the count term (ours; 0 = the paper's reward), see the module docstring.
      extra_box_penalty: subtracted per box beyond the number of differences (ours; 0 = the paper's).
      iou_threshold: a matched pair counts as a true positive at IoU >= this.
      l1_cost_weight: matching cost weight of the mean absolute corner difference (normalised coords).
      giou_cost_weight: matching cost weight of (1 - generalised IoU).
      family: answer coordinate convention, "qwen3_vl" (0..1000) or "qwen2_5_vl" (resized pixels).
      chat_template: the prompts' template style, "instruct" or "thinking" (the prompt opened a reasoning
        block: the answer follows `</think>`, and a completion without one has none).
    """
    alpha: float = 0.1
    lambda1: float = 0.5
    lambda2: float = 0.5
    count_weight: float = 0.0
    extra_box_penalty: float = 0.0
    iou_threshold: float = 0.5
    l1_cost_weight: float = 1.0
    giou_cost_weight: float = 1.0
    family: str = "qwen3_vl"
    chat_template: str = "instruct"

    def __post_init__(self):
        for name in ("alpha", "lambda1", "lambda2", "count_weight", "extra_box_penalty", "iou_threshold",
                     "l1_cost_weight", "giou_cost_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"RewardConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.alpha > 1:
            raise ValueError(f"RewardConfig.alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.iou_threshold <= 1:
            raise ValueError(f"RewardConfig.iou_threshold must be in (0, 1], got {self.iou_threshold}")
        if self.l1_cost_weight == 0 and self.giou_cost_weight == 0:
            raise ValueError("RewardConfig.l1_cost_weight and giou_cost_weight cannot both be 0")
        check_family(self.family, "RewardConfig.family")
        if self.chat_template not in CHAT_TEMPLATE_STYLES:
            raise ValueError(f"RewardConfig.chat_template must be one of {CHAT_TEMPLATE_STYLES}, "
                             f"got {self.chat_template!r}")
        check_chat_template(self.family, self.chat_template)

    @classmethod
    def from_config(cls, reward: ml_collections.ConfigDict, family: str,
                    chat_template: str = "instruct") -> "RewardConfig":
        """From the config's `reward` section; the family (answer coordinates) comes from the model, the
        template style from `data.chat_template`."""
        return cls(alpha=reward.alpha, lambda1=reward.lambda1, lambda2=reward.lambda2,
                   count_weight=reward.get("count_weight", 0.0),  # a section without them: the paper's
                   extra_box_penalty=reward.get("extra_box_penalty", 0.0),
                   iou_threshold=reward.iou_threshold, family=family,
                   chat_template=chat_template)

    @property
    def max_reward(self) -> float:
        """The reward of a perfect, well-formatted answer."""
        return (1 - self.alpha) * (self.lambda1 + self.lambda2) + self.alpha + self.count_weight


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


@dataclasses.dataclass(frozen=True)
class ScoredAnswer:
    """An answer's reward metrics and the match they came from (evaluation reports both).

    metrics       {reward, f1, precision, recall, mean_iou, format_ok, num_pred, num_gt} as floats
    pred          float64[P, 4] the valid predicted boxes, normalised and clipped to the image
    pred_index    int64[K] / gt_index int64[K]: the matched pairs (K = min(P, G), 0 if either is empty)
    matched_iou   float64[K] their IoU
    """
    metrics: dict
    pred: np.ndarray
    pred_index: np.ndarray
    gt_index: np.ndarray
    matched_iou: np.ndarray


def match_boxes(pred: np.ndarray, gt: np.ndarray, config: RewardConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching of normalised boxes: (pred index, gt index, IoU) of each of the min(P, G) pairs."""
    if len(pred) == 0 or len(gt) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    rows, cols = hungarian_match(matching_cost(pred, gt, config))
    iou, _ = pairwise_iou_giou(pred, gt)
    return rows, cols, iou[rows, cols]


def _metrics(num_pred: int, num_gt: int, matched_iou: np.ndarray, format_ok: bool, config: RewardConfig) -> dict:
    if num_pred == 0 and num_gt == 0:
        f1 = precision = recall = mean_iou = 1.0
    elif num_pred == 0 or num_gt == 0:
        f1 = mean_iou = 0.0
        precision = 1.0 if num_pred == 0 else 0.0
        recall = 1.0 if num_gt == 0 else 0.0
    else:
        tp = float(np.sum(matched_iou >= config.iou_threshold))
        f1 = 2.0 * tp / (num_pred + num_gt)
        precision, recall = tp / num_pred, tp / num_gt
        mean_iou = float(matched_iou.mean())
    fmt = 1.0 if format_ok else 0.0
    accuracy = config.lambda1 * f1 + config.lambda2 * mean_iou
    count_ok = fmt * float(num_pred == num_gt)
    extra_boxes = fmt * max(0, num_pred - num_gt)
    reward = ((1.0 - config.alpha) * accuracy + config.alpha * fmt + config.count_weight * count_ok
              - config.extra_box_penalty * extra_boxes)
    return {"reward": float(reward), "f1": float(f1), "precision": float(precision),
            "recall": float(recall), "mean_iou": float(mean_iou), "format_ok": fmt,
            "num_pred": float(num_pred), "num_gt": float(num_gt)}


def score_boxes(pred: np.ndarray, gt: np.ndarray, format_ok: bool, config: RewardConfig) -> dict:
    """Metrics for predicted vs ground-truth boxes, both float[*, 4] in normalised [0, 1] coordinates."""
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    _, _, matched_iou = match_boxes(pred, gt, config)
    return _metrics(len(pred), len(gt), matched_iou, format_ok, config)


def match_answer(text: Any, gt_boxes_px, original_hw: Hw, resized_hw: Hw | None = None,
                 config: RewardConfig = RewardConfig()) -> ScoredAnswer:
    """Parse, match and score one answer (see `score_answer`), keeping the match."""
    gt = pixels_to_normalized(gt_boxes_px, original_hw)
    ext_w, ext_h = answer_extent(config.family, original_hw, resized_hw)
    parsed = parse_answer(text, thinking=config.chat_template == "thinking")
    pred, _ = _clip_valid(parsed.boxes / np.array([ext_w, ext_h, ext_w, ext_h]))
    rows, cols, matched_iou = match_boxes(pred, gt, config)
    return ScoredAnswer(_metrics(len(pred), len(gt), matched_iou, parsed.format_ok, config), pred, rows, cols,
                        matched_iou)


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
    return match_answer(text, gt_boxes_px, original_hw, resized_hw, config).metrics


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


# ---------------------------------------------------------------------------------------------------
# Reward functions for GRPO, by name
# ---------------------------------------------------------------------------------------------------
# texts (N = prompts x G decoded samples, sample i answers prompt i // G), the host batch of the prompts,
# G -> per-sample metrics, float32[N] each; "reward" is required, the rest are logged when present.
RewardFn = Callable[[Sequence[str], dict, int], dict[str, np.ndarray]]


def dig_reward(config: RewardConfig) -> RewardFn:
    """The paper's hybrid reward (module docstring) against the batch's `gt_boxes` / `gt_mask`."""
    def score(texts: Sequence[str], batch: dict, group_size: int) -> dict[str, np.ndarray]:
        rows = np.arange(len(texts)) // group_size
        gt = [batch["gt_boxes"][r][batch["gt_mask"][r]] for r in rows]
        original = [tuple(int(v) for v in batch["original_hw"][r]) for r in rows]
        resized = [tuple(int(v) for v in batch["resized_hw"][r]) for r in rows]
        return score_batch(texts, gt, original, resized, config)

    return score


# name -> (RewardConfig -> RewardFn). A new reward is a function here and an entry in this table.
REWARD_FNS: dict[str, Callable[[RewardConfig], RewardFn]] = {"dig": dig_reward}


def reward_fn_from_config(reward: ml_collections.ConfigDict, family: str,
                          chat_template: str = "instruct") -> RewardFn:
    """The reward function `reward.fn` names (default "dig"), with the section's weights; `chat_template`
    is the run's `data.chat_template` (where a completion's answer starts)."""
    name = reward.get("fn", "dig")
    if name not in REWARD_FNS:
        raise ValueError(f"config.reward.fn: {name!r} is not one of {sorted(REWARD_FNS)}")
    return REWARD_FNS[name](RewardConfig.from_config(reward, family, chat_template))
