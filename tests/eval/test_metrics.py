"""The DiG metrics, without a model: designed answers to hand-made batches.

`DigEvaluator` parses and matches each answer once, with the reward (`rewards.match_answer`). The
reference here is the evaluation as it was before that: every answer parsed a second time, its boxes
taken to pixels, clipped and matched again (`_reference_pair`), and the metrics computed from those
per-pair numbers directly (`_reference_metrics`), not through `MetricAccumulator`.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data_pipeline.differences import KINDS
from dig_jax.eval import dig
from dig_jax.processing.answers import answer_to_pixels, format_answer
from dig_jax.rl import rewards

GT = [  # per pair: pixel boxes on a 64 x 64 image and their kinds
    ([[4, 4, 20, 20]], ["add"]),
    ([[4, 4, 20, 20], [30, 30, 60, 50]], ["color", "move"]),
    ([[10, 12, 26, 40], [40, 2, 62, 20]], ["remove", "add"]),
    ([], []),
    ([], []),
    ([[0, 0, 32, 64]], ["size"]),
    ([[8, 8, 24, 24], [40, 40, 56, 56]], ["shape", "rotate"]),
]


def _answers(family: str, hw, resized) -> list[str]:
    """One answer per pair of GT: exact, shifted, missing or extra boxes, broken JSON, boxes off the image."""
    def fmt(boxes):
        return format_answer(np.array(boxes, np.float64).reshape(-1, 4), None, family, hw, resized)

    h, w = hw
    return [
        fmt([[5, 4, 21, 19]]),  # close to the truth
        fmt([[4, 4, 20, 20]]),  # one of two found, one missed
        fmt([[10, 12, 26, 40], [44, 6, 64, 22], [0, 50, 10, 60]])[:-12],  # truncated: salvaged objects
        "[]",  # a pair without differences answered right
        fmt([[1, 1, 9, 9]]),  # a box where nothing changed
        '[{"bbox_2d": [-40, -10, %d, %d]}, {"bbox_2d": [3000, 3000, 4000, 4000]}]' % (500, 2000),  # clipped, dropped
        "I see no differences at all",  # no JSON
    ]


def _batch(hw, resized, rows: slice) -> dict:
    gt, kinds = GT[rows], [k for _, k in GT[rows]]
    m = 3
    boxes = np.zeros((len(gt), m, 4), np.float32)  # float32[B, M, 4] pixels, as the loader pads them
    mask, kind_ids = np.zeros((len(gt), m), bool), np.zeros((len(gt), m), np.int32)  # [B, M] each
    for i, (b, k) in enumerate(gt):
        boxes[i, :len(b)] = np.array(b, np.float32).reshape(-1, 4)
        mask[i, :len(b)] = True
        kind_ids[i, :len(k)] = [KINDS.index(name) for name in k]
    n = len(gt)
    return {"gt_boxes": boxes, "gt_mask": mask, "kind_ids": kind_ids, "seed": np.arange(rows.start, rows.start + n),
            "original_hw": np.tile(np.array(hw, np.int32), (n, 1)),
            "resized_hw": np.tile(np.array(resized or hw, np.int32), (n, 1))}


def _reference_pair(text, gt, hw, resized, family, config) -> dict:
    """The evaluation's own parse and match: answer -> pixels -> clip -> normalised -> Hungarian."""
    parsed = rewards.parse_answer(text)
    h, w = hw
    boxes = np.clip(answer_to_pixels(parsed.boxes, family, hw, resized).reshape(-1, 4), 0, [w, h, w, h])
    pred = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    ious, cols = np.zeros(0), np.zeros(0, int)
    if len(pred) and len(gt):
        scale = np.array([w, h, w, h], np.float64)
        rows, cols = rewards.hungarian_match(rewards.matching_cost(pred / scale, gt / scale, config))
        ious = rewards.pairwise_iou_giou(pred / scale, gt / scale)[0][rows, cols]
    found = np.zeros(len(gt), bool)
    found[cols[ious >= 0.5]] = True
    return {"pred": pred, "ious": ious, "found": found, "format_ok": bool(parsed.format_ok),
            "reward": rewards.score_answer(text, gt, hw, resized, config)["reward"]}


def _reference_metrics(pairs: list[dict]) -> dict:
    """The headline metrics of the module docstring, from the per-pair numbers directly."""
    tp = [int(np.sum(p["ious"] >= 0.5)) for p in pairs]
    num_pred, num_gt = [len(p["pred"]) for p in pairs], [len(p["gt"]) for p in pairs]
    precision = sum(tp) / sum(num_pred) if sum(num_pred) else float(sum(num_gt) == 0)
    recall = sum(tp) / sum(num_gt)
    iou = np.concatenate([p["ious"] for p in pairs])
    out = {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall),
           "pair_f1": np.mean([1.0 if n == g == 0 else 2 * t / (n + g) for t, n, g in zip(tp, num_pred, num_gt)]),
           "mean_iou": iou.sum() / len(iou), "count_accuracy": np.mean([n == g for n, g in zip(num_pred, num_gt)]),
           "format_rate": np.mean([p["format_ok"] for p in pairs]), "pairs": len(pairs),
           "reward": np.mean([p["reward"] for p in pairs])}
    for kind in sorted({k for p in pairs for k in p["kinds"]}):
        found = [f for p in pairs for k, f in zip(p["kinds"], p["found"]) if k == kind]
        out[f"by_kind/{kind}/recall"] = sum(found) / len(found)
    return out


def _evaluate(family, hw, resized, tmp_path, max_pairs=None):
    """DigEvaluator on two batches of the GT pairs (the second short, padded) and the reference pairs."""
    config = rewards.RewardConfig(family=family)
    answers = _answers(family, hw, resized)
    batches = [_batch(hw, resized, slice(0, 4)), _batch(hw, resized, slice(4, 7))]  # the lockstep pass pads the second
    texts = {0: answers[:4], 1: answers[4:] + ["padding must not count"]}
    evaluator = dig.DigEvaluator(model_cfg=_Cfg(), tokenizer=None, dataset=batches, rows_per_process=4,
                                 reward_config=config, max_new_tokens=8, num_visualise=0, prompt_bucket=8,
                                 max_pairs=max_pairs)
    evaluator.answers = lambda model, batch: texts[int(batch["seed"][0]) // 4]
    metrics = evaluator.evaluate(None, step=3, out_dir=str(tmp_path))
    reference = []
    for i, ((boxes, kinds), text) in enumerate(zip(GT, answers)):
        gt = np.array(boxes, np.float64).reshape(-1, 4)
        reference.append({**_reference_pair(text, gt, hw, resized or hw, family, config), "gt": gt, "kinds": kinds,
                          "text": text, "seed": i})
    return metrics, reference[:max_pairs]


class _Cfg:
    eos_token_id, pad_token_id = 1, 0


@pytest.mark.parametrize("family,hw,resized", [("qwen3_vl", (64, 64), None), ("qwen2_5_vl", (64, 64), (56, 56))])
def test_metrics_equal_the_double_parse_path(family, hw, resized, tmp_path):
    metrics, reference = _evaluate(family, hw, resized, tmp_path)
    expected = _reference_metrics(reference)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-15, abs=0), key
    assert 0 < metrics["f1"] < 1 and 0 < metrics["format_rate"] < 1 and metrics["pairs"] == 7
    # Exactly what the old path fed the accumulator, so every metric (breakdowns too) to the last digit.
    acc = dig.MetricAccumulator()
    for p in reference:
        acc.add(num_pred=len(p["pred"]), num_gt=len(p["gt"]), ious=p["ious"], format_ok=p["format_ok"],
                gt_kinds=p["kinds"], gt_found=p["found"], reward=p["reward"])
    assert metrics == acc.result()
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f) == metrics
    with open(tmp_path / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [line["seed"] for line in lines] == [p["seed"] for p in reference]
    for line, p in zip(lines, reference):
        assert line["answer"] == p["text"]
        assert line["pred_boxes"] == p["pred"].round(1).tolist()
        assert line["matched_iou"] == p["ious"].round(4).tolist()
        assert line["gt_boxes"] == p["gt"].tolist() and line["gt_kinds"] == p["kinds"]


@pytest.mark.parametrize("family,resized", [("qwen3_vl", None), ("qwen2_5_vl", (476, 476))])
def test_non_power_of_two_images_agree_to_rounding(family, resized, tmp_path):
    """At 448 px the answer scale (1000 / 448, 476 / 448) is not exact in binary: the old pixel round trip
    and the reward's direct normalisation can differ in the last bit of a coordinate, hence of an IoU.
    Counts (boxes, true positives, found boxes, format) and rewards stay equal; IoUs agree to rounding."""
    metrics, reference = _evaluate(family, (448, 448), resized, tmp_path)
    for key, value in _reference_metrics(reference).items():
        assert math.isclose(metrics[key], value, rel_tol=1e-12), key
    rng, hw, config = np.random.default_rng(0), (448, 448), rewards.RewardConfig(family=family)
    for _ in range(200):
        g = int(rng.integers(1, 4))
        corner, size = rng.integers(0, 400, (g, 2)), rng.integers(8, 48, (g, 2))
        gt = np.concatenate([corner, np.minimum(corner + size, 448)], 1).astype(np.float64)  # float64[G, 4]
        guess = gt + rng.normal(0, 4, gt.shape)
        guess[:, 2:] = np.maximum(guess[:, 2:], guess[:, :2] + 2)
        text = format_answer(guess, None, family, hw, resized)
        batch = {"original_hw": [hw], "resized_hw": [resized or hw], "gt_boxes": [gt], "gt_mask": [np.ones(g, bool)],
                 "kind_ids": [np.zeros(g, int)]}
        new, old = dig.score_pair(text, batch, 0, config), _reference_pair(text, gt, hw, resized or hw, family, config)
        assert len(new["pred"]) == len(old["pred"]) and new["format_ok"] == old["format_ok"]
        assert new["reward"] == old["reward"]
        np.testing.assert_array_equal(new["found"], old["found"])
        np.testing.assert_allclose(new["ious"], old["ious"], rtol=1e-12)
        np.testing.assert_allclose(new["pred"], old["pred"], rtol=1e-12)


def test_max_pairs_stops_early(tmp_path):
    metrics, reference = _evaluate("qwen3_vl", (64, 64), None, tmp_path, max_pairs=5)
    assert metrics["pairs"] == 5
    for key, value in _reference_metrics(reference).items():
        assert metrics[key] == pytest.approx(value, rel=1e-15, abs=0), key


def test_accumulator_by_hand():
    acc = dig.MetricAccumulator()
    # 2 predicted, 3 true, matches at IoU 0.9 and 0.3: TP 1.
    acc.add(num_pred=2, num_gt=3, ious=np.array([0.9, 0.3]), format_ok=True, gt_kinds=["add", "add", "color"],
            gt_found=np.array([True, False, False]), reward=0.5)
    acc.add(num_pred=0, num_gt=0, ious=np.zeros(0), format_ok=False, gt_kinds=[], gt_found=np.zeros(0, bool),
            reward=0.25)
    m = acc.result()
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx(0.4) and m["pair_f1"] == pytest.approx((0.4 + 1.0) / 2)
    assert m["mean_iou"] == pytest.approx(0.6) and m["count_accuracy"] == 0.5 and m["format_rate"] == 0.5
    assert m["reward"] == 0.375 and m["pairs"] == 2
    assert m["by_num_differences/3/recall"] == pytest.approx(1 / 3) and m["by_num_differences/0/f1"] == 1.0
    assert m["by_kind/add/recall"] == 0.5 and m["by_kind/color/recall"] == 0.0 and m["by_kind/add/boxes"] == 2
