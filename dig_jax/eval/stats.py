"""Uncertainty of held-out metrics: standard errors, and the paired bootstrap of a before/after change.

Why this module exists: a held-out metric measured on a few hundred rendered pairs moves by several
points between two runs that differ only in rounding (README, "The CPU demo"), so "GRPO raised F1 from
0.660 to 0.670" says nothing until it comes with its uncertainty. The pairs are the independent units:
every number here treats one held-out pair as one draw, never one box.

Every metric of `dig_jax.eval.dig` is a ratio of per-pair sums, metric = sum_i num_i / sum_i den_i:
a mean over pairs has den_i = 1 (reward, pair_f1, count accuracy, format rate); the micro-averaged ones
do not (F1 = sum 2 TP / sum (P + G), precision = sum TP / sum P, recall = sum TP / sum G, mean IoU =
sum of matched IoUs / number of matches). `PerPair` holds such a metric as its per-pair numerators and
denominators, read from the evaluator's predictions.jsonl (`per_pair`, `read_aligned`).

- `mean_and_se`: the mean of per-pair values and its standard error, std(ddof=1) / sqrt(n).
- `ratio_and_se`: a ratio of per-pair sums and its linearised (delta-method) standard error; with every
  den_i = 1 it is exactly `mean_and_se`.
- `paired_bootstrap`: after minus before on the same pairs. The two evaluations score the same pairs, so
  their errors are correlated (a pair that is hard stays hard); resampling pairs, not the two runs apart,
  keeps that correlation, and the interval of the difference is then much narrower than the two
  standard errors side by side suggest.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

import numpy as np

# name -> (numerator, denominator) of one predictions.jsonl line (dig.ROW_KEYS, seed, matched_iou); each
# equals the `MetricAccumulator` metric of the same name as sum(num) / sum(den) over the pairs.
_METRICS: dict[str, tuple[Callable[[dict], float], Callable[[dict], float]]] = {
    "reward": (lambda r: r["reward"], lambda r: 1.0),
    "pair_f1": (lambda r: r["pair_f1"], lambda r: 1.0),
    "count_correct": (lambda r: float(r["num_pred"] == r["num_gt"]), lambda r: 1.0),
    "format_ok": (lambda r: r["format_ok"], lambda r: 1.0),
    "f1": (lambda r: 2.0 * r["tp"], lambda r: r["num_pred"] + r["num_gt"]),
    "precision": (lambda r: r["tp"], lambda r: r["num_pred"]),
    "recall": (lambda r: r["tp"], lambda r: r["num_gt"]),
    "mean_iou": (lambda r: float(sum(r["matched_iou"])), lambda r: len(r["matched_iou"])),
}
METRICS = tuple(_METRICS)
_FIELDS = {"reward": ("reward",), "pair_f1": ("pair_f1",), "count_correct": ("num_pred", "num_gt"),
           "format_ok": ("format_ok",), "f1": ("tp", "num_pred", "num_gt"), "precision": ("tp", "num_pred"),
           "recall": ("tp", "num_gt"), "mean_iou": ("matched_iou",)}


@dataclasses.dataclass(frozen=True)
class PerPair:
    """A held-out metric on n pairs as sum(num) / sum(den); the arrays are aligned (pair i is seeds[i])."""
    seeds: np.ndarray  # int64[n]
    num: np.ndarray  # float64[n]
    den: np.ndarray  # float64[n]; all ones for a mean over pairs

    @property
    def value(self) -> float:
        """The metric itself: what the evaluator's metrics.json reports for these pairs."""
        return float(self.num.sum() / self.den.sum())


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """The paired bootstrap of after minus before (see `paired_bootstrap`)."""
    difference: float  # observed: metric after - metric before, on all n pairs
    se: float  # standard deviation of the resampled differences
    low: float  # percentile interval of the resampled differences
    high: float
    confidence: float
    num_resamples: int
    n: int  # pairs

    @property
    def excludes_zero(self) -> bool:
        """Whether 0 lies outside the interval: the change is not explained by which pairs were drawn."""
        return self.low > 0 or self.high < 0

    @property
    def z(self) -> float:
        """difference / se: how many standard errors the change is. When every pair changed by the same
        amount the resampled differences agree up to rounding: se below 1e-12 counts as 0 (inf, or nan
        when the difference is 0 too)."""
        if self.se > 1e-12:
            return self.difference / self.se
        return math.nan if self.difference == 0 else math.copysign(math.inf, self.difference)


def mean_and_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of per-pair values: sample std with ddof=1 over sqrt(n).

    The standard error is the spread a second draw of n held-out pairs would give the mean; it is nan
    for a single pair (no spread can be estimated from one).
    """
    x = np.asarray(values, np.float64).reshape(-1)  # float64[n]
    if x.size == 0:
        raise ValueError("mean_and_se: no values")
    if x.size == 1:
        return float(x[0]), math.nan
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def ratio_and_se(num, den) -> tuple[float, float]:
    """(sum(num) / sum(den), its standard error) for a micro-averaged metric over pairs.

    The pairs, not the boxes, are the independent draws (the boxes of one pair share its images and
    the model's one answer), so the error is that of a ratio of two per-pair means, linearised
    (delta method): with R the ratio and e_i = num_i - R den_i,
        SE = sqrt(sum e_i^2 / (n (n - 1))) / mean(den).
    With every den_i = 1 this is exactly `mean_and_se`. nan for a single pair.
    """
    num = np.asarray(num, np.float64).reshape(-1)  # float64[n]
    den = np.asarray(den, np.float64).reshape(-1)  # float64[n]
    if num.shape != den.shape:
        raise ValueError(f"ratio_and_se: {num.size} numerators but {den.size} denominators")
    if num.size == 0:
        raise ValueError("ratio_and_se: no values")
    if den.sum() <= 0:
        raise ValueError("ratio_and_se: the metric is undefined on these pairs (every denominator is 0)")
    n = num.size
    ratio = num.sum() / den.sum()
    if n == 1:
        return float(ratio), math.nan
    residual = num - ratio * den  # float64[n]
    return float(ratio), float(math.sqrt((residual ** 2).sum() / (n * (n - 1))) / den.mean())


def paired_bootstrap(before, after, *, seed: int, num_resamples: int = 2000, confidence: float = 0.95,
                     before_den=None, after_den=None) -> BootstrapResult:
    """The paired bootstrap of metric(after) - metric(before) on the same n pairs.

    before, after: float[n] per-pair values of the two evaluations, pair i the same pair in both (align
    them by seed first: `read_aligned`). For a micro-averaged metric pass its denominators too
    (before_den, after_den float[n]; default ones, i.e. a mean). Each resample draws n pair indices with
    replacement and recomputes both metrics on those same pairs; the result holds the observed
    difference, the standard deviation of the resampled differences (its standard error) and their
    percentile interval at `confidence`. `seed` seeds a numpy Generator, so the interval is reproducible.
    """
    a = np.asarray(before, np.float64).reshape(-1)  # float64[n]
    b = np.asarray(after, np.float64).reshape(-1)  # float64[n]
    n = a.size
    da = np.ones(n) if before_den is None else np.asarray(before_den, np.float64).reshape(-1)  # float64[n]
    db = np.ones(n) if after_den is None else np.asarray(after_den, np.float64).reshape(-1)  # float64[n]
    if not (b.size == da.size == db.size == n):
        raise ValueError(f"paired_bootstrap: before has {n} pairs, after {b.size}, denominators "
                         f"{da.size} and {db.size}; the pairs must be the same")
    if n < 2:
        raise ValueError(f"paired_bootstrap: needs at least 2 pairs, got {n}")
    if num_resamples < 2:
        raise ValueError(f"paired_bootstrap: num_resamples must be >= 2, got {num_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: confidence must be in (0, 1), got {confidence}")
    if da.sum() <= 0 or db.sum() <= 0:
        raise ValueError("paired_bootstrap: the metric is undefined on these pairs (every denominator is 0)")
    rng = np.random.default_rng(seed)
    diffs = np.empty(num_resamples)  # float64[B]
    chunk = max(1, (1 << 22) // n)  # resamples per chunk: a few million indices in memory at a time
    for start in range(0, num_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, num_resamples - start), n))  # int64[b, n]
        sa, sb = da[idx].sum(1), db[idx].sum(1)  # float64[b]
        if np.any(sa <= 0) or np.any(sb <= 0):
            raise ValueError("paired_bootstrap: a resample drew only pairs whose denominator is 0; the "
                             "metric is undefined there (too few pairs that define it)")
        diffs[start:start + len(idx)] = b[idx].sum(1) / sb - a[idx].sum(1) / sa
    low, high = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return BootstrapResult(difference=float(b.sum() / db.sum() - a.sum() / da.sum()), se=float(diffs.std(ddof=1)),
                           low=float(low), high=float(high), confidence=confidence, num_resamples=num_resamples, n=n)


# -----------------------------------------------------------------------------------------------------
# predictions.jsonl
# -----------------------------------------------------------------------------------------------------
def read_predictions(path: str) -> list[dict]:
    """The per-pair lines the DiG evaluator wrote (`DigEvaluator.score`), in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def per_pair(rows: list[dict], metric: str, num_gt: int | None = None, *, source: str = "predictions") -> PerPair:
    """`metric` (one of METRICS) of each line of `rows`, restricted to pairs with `num_gt` true boxes when
    given. Fails naming `source` (the file) and the line when a field the metric needs is missing."""
    if metric not in _METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {METRICS}")
    num_fn, den_fn = _METRICS[metric]
    needed = ("seed", "num_gt") + _FIELDS[metric]
    seeds, num, den = [], [], []
    for i, row in enumerate(rows):
        missing = [k for k in needed if k not in row]
        if missing:
            raise ValueError(f"{source}: line {i + 1} has no field {', '.join(missing)} (needed for {metric!r})")
        if num_gt is not None and row["num_gt"] != num_gt:
            continue
        seeds.append(int(row["seed"]))
        num.append(float(num_fn(row)))
        den.append(float(den_fn(row)))
    return PerPair(np.array(seeds, np.int64), np.array(num, np.float64), np.array(den, np.float64))


def _by_seed(rows: list[dict], source: str) -> dict[int, dict]:
    out = {}
    for i, row in enumerate(rows):
        missing = [k for k in ("seed", "num_gt") if k not in row]
        if missing:
            raise ValueError(f"{source}: line {i + 1} has no field {', '.join(missing)}")
        seed = int(row["seed"])
        if seed in out:
            raise ValueError(f"{source}: seed {seed} appears twice (line {i + 1}); pairs are matched by seed")
        out[seed] = row
    return out


def read_aligned(before_path: str, after_path: str, metric: str,
                 num_gt: int | None = None) -> tuple[PerPair, PerPair]:
    """`metric` per pair in two predictions.jsonl files, aligned by seed (pair i is the same in both).

    The two evaluations must have scored the same pairs: a seed in one file and not the other, or a pair
    whose number of true boxes differs between them, fails naming the file. `num_gt` keeps the pairs with
    that many true boxes. Returns (before, after), both in increasing seed order.
    """
    rows_a = _by_seed(read_predictions(before_path), before_path)
    rows_b = _by_seed(read_predictions(after_path), after_path)
    only_a, only_b = sorted(set(rows_a) - set(rows_b)), sorted(set(rows_b) - set(rows_a))
    if only_a or only_b:
        where = [f"{len(s)} seed(s) only in {p} (first {s[0]})" for s, p in ((only_a, before_path), (only_b, after_path)) if s]
        raise ValueError("the two evaluations scored different pairs: " + "; ".join(where))
    seeds = sorted(rows_a)
    for s in seeds:
        if rows_a[s]["num_gt"] != rows_b[s]["num_gt"]:
            raise ValueError(f"seed {s}: {rows_a[s]['num_gt']} true boxes in {before_path} but "
                             f"{rows_b[s]['num_gt']} in {after_path}; not the same pair")
    before = per_pair([rows_a[s] for s in seeds], metric, num_gt, source=before_path)
    after = per_pair([rows_b[s] for s in seeds], metric, num_gt, source=after_path)
    return before, after


def bootstrap_files(before_path: str, after_path: str, metric: str, num_gt: int | None = None, *,
                    seed: int = 0, num_resamples: int = 2000, confidence: float = 0.95) -> BootstrapResult:
    """`paired_bootstrap` of `metric` between two predictions.jsonl files (pairs matched by seed)."""
    before, after = read_aligned(before_path, after_path, metric, num_gt)
    return paired_bootstrap(before.num, after.num, before_den=before.den, after_den=after.den, seed=seed,
                            num_resamples=num_resamples, confidence=confidence)
