"""Uncertainty of held-out metrics (`dig_jax.eval.stats`), against computations made another way:
standard errors by hand on five pairs, the bootstrap against the exact bootstrap distribution (every one
of the n^n resamples of 7 pairs enumerated), per-pair metrics against the evaluator's own accumulator.
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from dig_jax.eval import dig, stats


# ------------------------------------------------------------------------------------- standard errors
def test_mean_and_se_by_hand():
    # [1, 0, 1, 1, 0]: mean 0.6; squared deviations 3 x 0.16 + 2 x 0.36 = 1.2; s^2 = 1.2 / 4 = 0.3;
    # SE = sqrt(0.3 / 5) = sqrt(0.06)
    mean, se = stats.mean_and_se([1, 0, 1, 1, 0])
    assert mean == pytest.approx(0.6) and se == pytest.approx(math.sqrt(0.06), rel=1e-12)
    # [0.2, 0.5, 0.9, 0.4, 0.5]: mean 0.5; deviations -0.3, 0, 0.4, -0.1, 0 -> squares sum 0.26;
    # s^2 = 0.065; SE = sqrt(0.065 / 5) = sqrt(0.013)
    mean, se = stats.mean_and_se([0.2, 0.5, 0.9, 0.4, 0.5])
    assert mean == pytest.approx(0.5) and se == pytest.approx(math.sqrt(0.013), rel=1e-12)


def test_mean_and_se_edge_cases():
    assert math.isnan(stats.mean_and_se([0.7])[1]) and stats.mean_and_se([0.7])[0] == 0.7
    with pytest.raises(ValueError, match="no values"):
        stats.mean_and_se([])


def test_ratio_and_se_by_hand_and_as_a_mean():
    # num = 2 TP, den = P + G on five pairs: R = 5 / 11; e = num - R den = [12, -15, 7, 1, -5] / 11,
    # sum e^2 = 444 / 121; SE = sqrt(444 / 121 / (5 * 4)) / mean(den), mean(den) = 11 / 5
    ratio, se = stats.ratio_and_se([2, 0, 2, 1, 0], [2, 3, 3, 2, 1])
    assert ratio == pytest.approx(5 / 11)
    assert se == pytest.approx(math.sqrt(444 / 121 / 20) / (11 / 5), rel=1e-12)
    values = [0.2, 0.5, 0.9, 0.4, 0.5]
    assert stats.ratio_and_se(values, np.ones(5)) == pytest.approx(stats.mean_and_se(values), rel=1e-12)
    with pytest.raises(ValueError, match="undefined"):
        stats.ratio_and_se([0, 0], [0, 0])


def test_ratio_se_agrees_with_the_bootstrap_at_many_pairs():
    """The linearised SE of a micro-averaged F1 is what resampling 400 pairs gives (within 5 %)."""
    rng = np.random.default_rng(3)
    num_pred = rng.integers(0, 4, 400)
    num_gt = rng.integers(1, 3, 400)
    tp = np.minimum(rng.binomial(np.minimum(num_pred, num_gt), 0.6), num_gt)
    num, den = 2.0 * tp, (num_pred + num_gt).astype(float)
    _, se = stats.ratio_and_se(num, den)
    # before = a constant 0 (den 1): the bootstrap spread of the difference is that of `after` alone
    boot = stats.paired_bootstrap(np.zeros(400), num, after_den=den, seed=1, num_resamples=20000)
    assert boot.se == pytest.approx(se, rel=0.05)


# ------------------------------------------------------------------------------------- paired bootstrap
def _exact_bootstrap(a, b, da, db) -> np.ndarray:
    """metric(after) - metric(before) on every one of the n^n equally likely resamples."""
    n = len(a)
    idx = np.stack(np.unravel_index(np.arange(n ** n), (n,) * n), axis=1)  # int64[n^n, n]
    return b[idx].sum(1) / db[idx].sum(1) - a[idx].sum(1) / da[idx].sum(1)


@pytest.mark.parametrize("ratio", [False, True], ids=["mean", "ratio"])
def test_bootstrap_matches_the_exact_enumeration(ratio):
    rng = np.random.default_rng(0)
    n = 7
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    da, db = (rng.integers(1, 4, n).astype(float), rng.integers(1, 4, n).astype(float)) if ratio else (np.ones(n),) * 2
    exact = _exact_bootstrap(a, b, da, db)  # float64[7^7]
    if not ratio:  # the enumeration itself: the bootstrap variance of a mean is var(d, ddof=0) / n
        assert exact.var() == pytest.approx(np.var(b - a) / n, rel=1e-9)
    res = stats.paired_bootstrap(a, b, before_den=da, after_den=db, seed=11, num_resamples=20000)
    assert res.difference == pytest.approx(b.sum() / db.sum() - a.sum() / da.sum(), abs=1e-12)
    assert res.se == pytest.approx(exact.std(), rel=0.03)  # Monte-Carlo error at 20k resamples: ~0.5 %
    # the interval cuts 2.5 % of the exact distribution on each side (Monte-Carlo error ~0.1 %)
    assert 0.015 < np.mean(exact < res.low) < 0.035 and 0.015 < np.mean(exact > res.high) < 0.035
    assert res.n == n and res.num_resamples == 20000 and res.confidence == 0.95


def test_interval_contains_the_observed_difference_and_says_whether_it_excludes_zero():
    rng = np.random.default_rng(5)
    before = rng.uniform(0, 1, 200)
    improved = stats.paired_bootstrap(before, before + 0.05 + rng.normal(0, 0.05, 200), seed=0)
    assert improved.low <= improved.difference <= improved.high
    assert improved.excludes_zero and improved.z > 5
    d = rng.normal(0, 0.2, 100)
    unchanged = stats.paired_bootstrap(before[:200], before + np.concatenate([d, -d]), seed=0)  # mean change 0
    assert unchanged.difference == pytest.approx(0, abs=1e-12)
    assert unchanged.low < 0 < unchanged.high and not unchanged.excludes_zero and abs(unchanged.z) < 1e-9
    narrow = stats.paired_bootstrap(before, before + 0.01, seed=0, confidence=0.5)
    assert narrow.confidence == 0.5 and narrow.se < 1e-12 and narrow.excludes_zero and narrow.z == math.inf  # the same change on every pair


def test_bootstrap_keeps_the_pairing():
    """Correlated evaluations: the paired SE is far below the two independent SEs combined."""
    rng = np.random.default_rng(2)
    hard = rng.uniform(0, 1, 300)  # how hard each pair is, shared by both evaluations
    before = hard + rng.normal(0, 0.05, 300)
    after = hard + 0.02 + rng.normal(0, 0.05, 300)
    paired = stats.paired_bootstrap(before, after, seed=4)
    unpaired = math.hypot(stats.mean_and_se(before)[1], stats.mean_and_se(after)[1])
    assert paired.se < 0.4 * unpaired
    assert paired.se == pytest.approx(stats.mean_and_se(after - before)[1], rel=0.1)


def test_bootstrap_is_reproducible_by_seed_and_checks_its_arguments():
    rng = np.random.default_rng(9)
    a, b = rng.uniform(0, 1, 50), rng.uniform(0, 1, 50)
    assert stats.paired_bootstrap(a, b, seed=3) == stats.paired_bootstrap(a, b, seed=3)
    assert stats.paired_bootstrap(a, b, seed=3).se != stats.paired_bootstrap(a, b, seed=4).se
    assert stats.paired_bootstrap(a, b, seed=3).num_resamples == 2000
    with pytest.raises(ValueError, match="the pairs must be the same"):
        stats.paired_bootstrap(a, b[:49], seed=0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        stats.paired_bootstrap(a[:1], b[:1], seed=0)
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_bootstrap(a, b, seed=0, confidence=1.0)


# ------------------------------------------------------------------------------------- predictions.jsonl
# (num_pred, num_gt, matched IoUs, format_ok, reward) of hand-made pairs; IoUs with 4 decimals, as written
PAIRS = [(1, 1, [0.81], True, 0.85), (1, 1, [0.32], True, 0.4), (2, 1, [0.7], True, 0.6),
         (0, 1, [], False, 0.0), (1, 2, [0.66], True, 0.5), (2, 2, [0.9, 0.45], True, 0.7),
         (2, 2, [0.55, 0.6], True, 0.9), (3, 2, [0.2, 0.75], True, 0.45), (2, 1, [0.1], False, 0.05)]


def _lines(pairs=PAIRS, seed0=100) -> tuple[list[dict], dict]:
    """predictions.jsonl lines as `DigEvaluator.score` writes them, and the accumulator's metrics."""
    acc = dig.MetricAccumulator()
    lines = []
    for i, (p, g, ious, fmt, reward) in enumerate(pairs):
        ious = np.array(ious, np.float64)
        row = acc.add(num_pred=p, num_gt=g, ious=ious, format_ok=fmt, gt_kinds=["color"] * g,
                      gt_found=np.zeros(g, bool), reward=reward)
        lines.append({"seed": seed0 + i, "gt_kinds": ["color"] * g, "matched_iou": ious.round(4).tolist(),
                      **{k: row[k] for k in dig.ROW_KEYS}})
    return lines, acc.result()


_NAMES = {"reward": "reward", "pair_f1": "pair_f1", "count_correct": "count_accuracy", "format_ok": "format_rate",
          "f1": "f1", "precision": "precision", "recall": "recall", "mean_iou": "mean_iou"}


@pytest.mark.parametrize("metric", stats.METRICS)
@pytest.mark.parametrize("num_gt", [None, 1, 2])
def test_per_pair_metric_is_the_evaluators(metric, num_gt):
    lines, metrics = _lines()
    prefix = "" if num_gt is None else f"by_num_differences/{num_gt}/"
    values = stats.per_pair(lines, metric, num_gt)
    assert values.value == pytest.approx(metrics[prefix + _NAMES[metric]], abs=1e-12)
    assert len(values.seeds) == metrics[prefix + "pairs"]


def _write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_read_aligned_matches_pairs_by_seed_whatever_the_order(tmp_path):
    before, _ = _lines()
    after = [dict(line, reward=line["reward"] + 0.01 * line["seed"]) for line in before]  # a seed-specific change
    random.Random(0).shuffle(after)
    a, b = stats.read_aligned(_write(tmp_path / "a.jsonl", before), _write(tmp_path / "b.jsonl", after), "reward")
    np.testing.assert_array_equal(a.seeds, b.seeds)
    np.testing.assert_allclose(b.num - a.num, 0.01 * a.seeds, atol=1e-12)
    a1, b1 = stats.read_aligned(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "count_correct", num_gt=1)
    assert list(a1.seeds) == [100, 101, 102, 103, 108] and list(b1.num) == list(a1.num) == [1, 1, 0, 0, 0]
    res = stats.bootstrap_files(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "reward", seed=7)
    assert res == stats.paired_bootstrap(a.num, b.num, seed=7)
    assert res.difference == pytest.approx(0.01 * np.mean(a.seeds))


def test_read_aligned_names_the_file_when_pairs_do_not_match(tmp_path):
    lines, _ = _lines()
    good = _write(tmp_path / "good.jsonl", lines)
    other = _write(tmp_path / "other.jsonl", lines[:-1] + [dict(lines[-1], seed=999)])
    with pytest.raises(ValueError, match=r"1 seed\(s\) only in .*good.jsonl \(first 108\); 1 seed\(s\) only in "
                                         r".*other.jsonl \(first 999\)"):
        stats.read_aligned(good, other, "reward")
    fewer = _write(tmp_path / "fewer.jsonl", lines[:-2])
    with pytest.raises(ValueError, match=r"2 seed\(s\) only in .*good.jsonl"):
        stats.read_aligned(good, fewer, "f1")
    no_reward = _write(tmp_path / "no_reward.jsonl", [{k: v for k, v in line.items() if k != "reward"} for line in lines])
    with pytest.raises(ValueError, match=r"no_reward.jsonl: line 1 has no field reward"):
        stats.read_aligned(good, no_reward, "reward")
    no_seed = _write(tmp_path / "no_seed.jsonl", [{k: v for k, v in lines[0].items() if k != "seed"}] + lines[1:])
    with pytest.raises(ValueError, match=r"no_seed.jsonl: line 1 has no field seed"):
        stats.read_aligned(no_seed, good, "reward")
    twice = _write(tmp_path / "twice.jsonl", lines + lines[:1])
    with pytest.raises(ValueError, match=r"twice.jsonl: seed 100 appears twice"):
        stats.read_aligned(good, twice, "reward")
    recount = _write(tmp_path / "recount.jsonl", [dict(lines[0], num_gt=2)] + lines[1:])
    with pytest.raises(ValueError, match=r"seed 100: 1 true boxes in .*good.jsonl but 2 in .*recount.jsonl"):
        stats.read_aligned(good, recount, "reward")
    with pytest.raises(ValueError, match="unknown metric"):
        stats.per_pair(lines, "accuracy")
