"""Why GRPO learns to answer two boxes for every pair: the expected DiG reward of answering 1, 2 or 3
boxes, as a function of how accurate one box is.

    python benchmarks/reward_by_count.py [--q=0.1,0.2,...,0.9] [--hit-iou=0.7] [--miss-iou=0.2] [--json=out.json]
    python benchmarks/reward_by_count.py --predictions=demo_out/run/eval/step_2100/predictions.jsonl

Why it exists: the demo run warmed up on one- and two-difference pairs learnt to count, and GRPO then
taught it to answer two boxes for every pair (README, "Pricing the count"). This script
shows that the reward itself pays for that bet while boxes are uncertain, with the product's reward
(`dig_jax.rl.rewards.score_boxes`, default `RewardConfig`: alpha 0.1, lambda1 = lambda2 = 0.5, IoU 0.5),
not a re-derivation of it.

Model of a policy whose boxes are right with probability q: each predicted box independently is a
"hit" (IoU `hit_iou` with the true box it aims at) with probability q, else a "miss" (IoU `miss_iou`
with it). On a one-difference pair every box aims at the one true box; on a two-difference pair box k
aims at true box k (a third box aims at true box 1 again). The boxes are real boxes: a copy of the
target shifted right, left or down by the amount that gives exactly that IoU (for a box of side w
shifted by s along one axis, IoU = (w - s) / (w + s)), and the two true boxes are far apart, so a box
overlaps only its target. The reward's Hungarian matcher then decides what is matched. Expectations
enumerate the 2^k hit patterns of k boxes exactly, weighted by their probabilities: no sampling noise.

The F1 part has a closed form the script checks its enumeration against (it stops if they differ):
  one difference:  1 box  E[F1] = q;  2 boxes (2/3)(1 - (1-q)^2);  3 boxes (1/2)(1 - (1-q)^3)
  two differences: 1 box  (2/3) q;    2 boxes q;                   3 boxes (2/5)(q + 1 - (1-q)^2)
(F1 = 2 TP / (P + G); on a one-difference pair TP = 1 if any box hits). So a second box on a
one-difference pair pays more F1 than one box when (2/3)(2q - q^2) > q, i.e. q < 1/2. The IoU part
favours the second box further: the matcher keeps the better of the two, so the matched IoU is
hit_iou when either hits. With both parts, 2 boxes beat 1 on a one-difference pair for
  q < q* = 2 - (lambda1 + lambda2 d) / ((2/3) lambda1 + lambda2 d),  d = hit_iou - miss_iou
(5/7 = 0.714 with the defaults), which the script also finds by bisection on its enumeration.

The second table is the count decision. A model that cannot always see both differences is unsure of
the count: say it believes a pair holds two differences with probability p (and one with 1 - p). Two
boxes then pay more than one when p > p* = over / (over + under), where over = E[r | 1 diff, 1 box] -
E[r | 1 diff, 2 boxes] is the cost of over-counting and under = E[r | 2 diffs, 2 boxes] - E[r | 2 diffs,
1 box] the cost of under-counting (p* = 0 when over <= 0: two boxes always pay). A reward that counts
well has p* = 1/2: answer the count you believe more likely. The paper's reward has p* well below 1/2
(it is 0 for q < 5/7), so GRPO drifts to two boxes on every pair the model is unsure of; the count term
(`reward.count_weight` w, ours) adds w to both costs, which moves p* toward 1/2 but never onto it; the
extra-box penalty (`reward.extra_box_penalty` v, ours) adds v to the cost of over-counting only, and
p* = 1/2 exactly when v = under - over, the "balancing penalty" column. The script checks that the
product's reward with that penalty gives p* = 1/2.

`--predictions=FILE` (a DiG evaluation's predictions.jsonl, one line per held-out pair) adds what a
trained model actually does: for each true and answered number of boxes, the pairs, their mean true
positives and mean reward (the paper's, as the evaluator scored it). This is where the model above
is too simple for the demo: its scenes hold two objects, so a second box on a one-difference pair lands
on the other object, and the two boxes together hit the changed one whenever the model is unsure which
object changed, not only when a second try at the same object succeeds. A second table groups the same
pairs by the kinds of their differences ("color", "remove", "color+remove", ...): the share answered
with one and with two boxes, count accuracy, mean TP, mean reward, and the mean reward of the pairs
answered with one box and of those answered with two. It shows which changes the model
sees: a model that finds removals but not colour changes cannot tell a removal alone from a removal
plus a recoloured partner, and its count on those pairs is a guess whatever the reward.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

from dig_jax.rl import rewards  # noqa: E402

TRUE_BOXES = np.array([[0.20, 0.20, 0.40, 0.40], [0.60, 0.60, 0.80, 0.80]])  # float64[2, 4] normalised
SHIFTS = ((1, 0), (-1, 0), (0, 1))  # box k of an answer moves its target right, left, down
COUNTS = (1, 2, 3)  # boxes per answer
COLUMNS = ["q"] + [f"{g}diff_{k}box" for g in (1, 2) for k in COUNTS]


def shifted(box: np.ndarray, iou: float, direction: tuple[int, int]) -> np.ndarray:
    """`box` (a square, float64[4]) moved along one axis so that its IoU with the original is `iou`:
    IoU = (w - s) / (w + s) for a shift s of a side w, so s = w (1 - iou) / (1 + iou)."""
    w = box[2] - box[0]
    s = w * (1 - iou) / (1 + iou)
    dx, dy = direction[0] * s, direction[1] * s
    return box + np.array([dx, dy, dx, dy])


def answer(num_gt: int, hits: tuple[bool, ...], hit_iou: float, miss_iou: float) -> np.ndarray:
    """float64[k, 4]: box k aims at true box k mod num_gt, a hit or a miss as `hits` says."""
    boxes = []
    for k, hit in enumerate(hits):
        target = TRUE_BOXES[k % num_gt]
        boxes.append(shifted(target, hit_iou if hit else miss_iou, SHIFTS[k]))
    return np.array(boxes)


def expected(num_gt: int, num_boxes: int, q: float, hit_iou: float, miss_iou: float,
             config: rewards.RewardConfig) -> dict[str, float]:
    """E[reward], E[F1] and E[mean IoU] of a well-formatted answer of `num_boxes` boxes, over the 2^k hit
    patterns, each scored by the product's reward and weighted by q^hits (1 - q)^misses."""
    gt = TRUE_BOXES[:num_gt]
    out = {"reward": 0.0, "f1": 0.0, "mean_iou": 0.0}
    for hits in itertools.product((True, False), repeat=num_boxes):
        pred = answer(num_gt, hits, hit_iou, miss_iou)
        # the boxes are what the model says: each has the designed IoU with its target, none with another
        iou, _ = rewards.pairwise_iou_giou(pred, gt)  # float64[k, G]
        for k, hit in enumerate(hits):
            np.testing.assert_allclose(iou[k, k % num_gt], hit_iou if hit else miss_iou, atol=1e-12)
            if np.any(np.delete(iou[k], k % num_gt) > 0):
                raise AssertionError(f"box {k} of {hits} overlaps a true box it does not aim at")
        m = rewards.score_boxes(pred, gt, True, config)
        p = q ** sum(hits) * (1 - q) ** (num_boxes - sum(hits))
        for key in out:
            out[key] += p * m[key]
    return out


def f1_closed_form(num_gt: int, num_boxes: int, q: float) -> float:
    """E[F1] of the module docstring's table."""
    any_hit = 1 - (1 - q) ** num_boxes
    if num_gt == 1:
        return 2 / (num_boxes + 1) * any_hit
    if num_boxes == 3:  # box 2 finds true box 2; boxes 1 and 3 both aim at true box 1
        return 2 / 5 * (q + 1 - (1 - q) ** 2)
    return 2 / (num_boxes + 2) * num_boxes * q  # 1 or 2 boxes, each on its own true box


def crossing(fn, lo: float = 1e-9, hi: float = 1 - 1e-9, tol: float = 1e-10) -> float | None:
    """The q in (lo, hi) where fn changes sign (bisection; fn(lo) > 0 > fn(hi)), None if it does not."""
    if not fn(lo) > 0 > fn(hi):
        return None
    while hi - lo > tol:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def count_threshold(reward_of) -> float:
    """p*: the belief in two differences above which two boxes pay more than one (module docstring).
    `reward_of(num_gt, num_boxes)` is the expected reward."""
    over = reward_of(1, 1) - reward_of(1, 2)
    under = reward_of(2, 2) - reward_of(2, 1)
    return max(over, 0.0) / (max(over, 0.0) + under)


# (label, RewardConfig overrides) of the decision table's reward variants
VARIANTS = (("paper", {}), ("count_weight 0.1", {"count_weight": 0.1}), ("count_weight 0.2", {"count_weight": 0.2}),
            ("extra_box_penalty 0.125", {"extra_box_penalty": 0.125}))


def decision_rows(qs, hit_iou: float, miss_iou: float) -> list[dict]:
    """Per q: the costs of over- and under-counting under the paper's reward, the balancing penalty, and
    p* under each of VARIANTS (each scored by the product's reward with those weights)."""
    configs = {label: rewards.RewardConfig(**kw) for label, kw in VARIANTS}
    rows = []
    for q in qs:
        def reward_under(cfg):
            return lambda g, k: expected(g, k, q, hit_iou, miss_iou, cfg)["reward"]

        paper = reward_under(configs["paper"])
        over, under = paper(1, 1) - paper(1, 2), paper(2, 2) - paper(2, 1)
        row = {"q": q, "over-count cost": over, "under-count cost": under, "balancing penalty": under - over}
        row.update({f"p* {label}": count_threshold(reward_under(cfg)) for label, cfg in configs.items()})
        if under - over >= 0:  # the penalty must be a valid weight; then it balances the decision exactly
            p_star = count_threshold(reward_under(rewards.RewardConfig(extra_box_penalty=under - over)))
            if abs(p_star - 0.5) > 1e-9:
                raise SystemExit(f"q = {q}: the balancing penalty {under - over:.4f} gives p* = {p_star}, not 1/2")
        rows.append(row)
    return rows


def answer_counts(predictions: list[dict]) -> list[dict]:
    """Per (true boxes, answered boxes) of a DiG evaluation's predictions.jsonl lines: pairs, mean TP, mean
    reward."""
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in predictions:
        groups.setdefault((int(row["num_gt"]), int(row["num_pred"])), []).append(row)
    return [{"true boxes": g, "answered boxes": k, "pairs": len(rows),
             "mean TP": float(np.mean([r["tp"] for r in rows])),
             "mean reward": float(np.mean([r["reward"] for r in rows]))}
            for (g, k), rows in sorted(groups.items())]


def pair_kind_counts(predictions: list[dict]) -> list[dict]:
    """Per kind of pair (its differences' kinds, sorted and joined by '+', e.g. "color+remove") of a DiG
    evaluation's predictions.jsonl lines: pairs, the share answered with 1 and 2 boxes, count accuracy, mean
    TP, mean reward, and the mean reward of the pairs answered with 1 and with 2 boxes (NaN when none
    was): what a second box earned on that kind of pair. Lines without `gt_kinds` are skipped (an empty
    list when none has them)."""
    groups: dict[str, list[dict]] = {}
    for row in predictions:
        if "gt_kinds" in row:
            groups.setdefault("+".join(sorted(row["gt_kinds"])), []).append(row)
    out = []
    for kinds, rows in sorted(groups.items(), key=lambda item: (item[0].count("+"), item[0])):
        answered = np.array([int(r["num_pred"]) for r in rows])
        reward = np.array([r["reward"] for r in rows], np.float64)
        out.append({"differences": kinds, "pairs": len(rows), "answered 1": float(np.mean(answered == 1)),
                    "answered 2": float(np.mean(answered == 2)),
                    "count accuracy": float(np.mean(answered == np.array([int(r["num_gt"]) for r in rows]))),
                    "mean TP": float(np.mean([r["tp"] for r in rows])), "mean reward": float(reward.mean()),
                    "reward, 1 box": float(reward[answered == 1].mean()) if (answered == 1).any() else float("nan"),
                    "reward, 2 boxes": float(reward[answered == 2].mean()) if (answered == 2).any() else float("nan")})
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--q", default=",".join(f"{q / 10:g}" for q in range(1, 10)),
                   help="box accuracies: the probability that one box reaches IoU >= 0.5 with its target")
    p.add_argument("--hit-iou", type=float, default=0.7, help="IoU of a hit with its target (>= the threshold)")
    p.add_argument("--miss-iou", type=float, default=0.2, help="IoU of a miss with its target (< the threshold)")
    p.add_argument("--predictions", default="", help="a DiG evaluation's predictions.jsonl: what a model answers")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    config = rewards.RewardConfig()
    if not (a.miss_iou < config.iou_threshold <= a.hit_iou < 1 and a.miss_iou > 0):
        raise SystemExit(f"need 0 < --miss-iou < {config.iou_threshold} <= --hit-iou < 1")
    qs = [float(q) for q in a.q.split(",") if q]

    def e(num_gt, num_boxes, q):
        return expected(num_gt, num_boxes, q, a.hit_iou, a.miss_iou, config)

    rows, worst = [], 0.0
    for q in qs:
        row = {"q": q}
        for g in (1, 2):
            for k in COUNTS:
                m = e(g, k, q)
                row[f"{g}diff_{k}box"] = m["reward"]
                worst = max(worst, abs(m["f1"] - f1_closed_form(g, k, q)))
        rows.append(row)
    if worst > 1e-12:
        raise SystemExit(f"the enumeration's E[F1] differs from the closed form by {worst:.3g}")
    gain = lambda q: e(1, 2, q)["reward"] - e(1, 1, q)["reward"]  # noqa: E731
    gain_f1 = lambda q: e(1, 2, q)["f1"] - e(1, 1, q)["f1"]  # noqa: E731
    q_star, q_star_f1 = crossing(gain), crossing(gain_f1)
    d = a.hit_iou - a.miss_iou
    q_closed = 2 - (config.lambda1 + config.lambda2 * d) / (2 / 3 * config.lambda1 + config.lambda2 * d)
    if q_star is None or abs(q_star - q_closed) > 1e-6 or q_star_f1 is None or abs(q_star_f1 - 0.5) > 1e-6:
        raise SystemExit(f"crossings {q_star}, {q_star_f1} differ from the closed forms {q_closed:.6f}, 0.5")

    print(f"## Expected DiG reward by number of boxes (default RewardConfig; hit IoU {a.hit_iou:g}, "
          f"miss IoU {a.miss_iou:g}; exact over hit patterns)")
    print(_common.markdown_table(rows, COLUMNS, {c: ".3f" for c in COLUMNS[1:]} | {"q": ".1f"}))
    print(f"\nOn a one-difference pair 2 boxes beat 1 for q < {q_star:.3f} (closed form {q_closed:.3f}); "
          f"the F1 part alone for q < {q_star_f1:.3f} (closed form 1/2).")
    print(f"E[F1] of the enumeration equals the closed form (max |difference| {worst:.1e}).")
    decisions = decision_rows(qs, a.hit_iou, a.miss_iou)
    decision_columns = list(decisions[0])
    print("\n## The count decision: two boxes pay more than one when the belief in two differences exceeds p*")
    print(_common.markdown_table(decisions, decision_columns,
                                 {c: ".3f" for c in decision_columns[1:]} | {"q": ".1f"}))
    out = {"rows": rows, "q_star": q_star, "q_star_f1": q_star_f1, "q_star_closed_form": q_closed,
           "f1_max_abs_difference": worst, "decisions": decisions}
    if a.predictions:
        from dig_jax.eval import stats

        predictions = stats.read_predictions(a.predictions)
        counts = answer_counts(predictions)
        print(f"\n## What the model answers: {a.predictions}")
        print(_common.markdown_table(counts, list(counts[0]), {"mean TP": ".3f", "mean reward": ".3f"}))
        out["answer_counts"] = counts
        out["pair_kinds"] = pair_kind_counts(predictions)
        if out["pair_kinds"]:
            columns = list(out["pair_kinds"][0])
            print("\n## By the kinds of the pair's differences")
            print(_common.markdown_table(out["pair_kinds"], columns, {c: ".3f" for c in columns[2:]}))
    _common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
