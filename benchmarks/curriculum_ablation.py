"""Does the curriculum help at toy scale? GRPO from one warm-up checkpoint: curriculum, mixture, reverse.

    python benchmarks/curriculum_ablation.py [--demo-dir=demo_out] [--workdir=curriculum_ablation_out] \
        [--grpo-steps=300] [--seeds=2] [--arms=curriculum,mixture,reverse] [--num-eval-pairs=1000]

The DiG paper trains GRPO through a curriculum, one difference first and then more, "enabling stable
optimization". This script tests that claim on the CPU demo (configs/demo_cpu.py) with the product's own
trainer (`dig_jax.training.train.train`) and evaluator (`dig_jax.eval.run.run_eval`). Every arm starts
from ONE shared warm-up checkpoint and runs the same number of GRPO iterations with the same config; only
the order in which the curriculum phases select pairs differs:

  curriculum  one difference for the first half, then one or two (half each) for the second half;
  mixture     one or two (half each) from the first iteration to the last;
  reverse     two differences for the first half, then one or two (half each).

Why only one and two differences, when the paper's curriculum goes on to three: the demo's scenes hold
two objects, and `data_pipeline.settings.validate` refuses `num_differences_max` above `min_objects`
(each difference needs its own object). The only way to a third difference in a two-object scene is an
"add", and an added object almost never has room in the demo's close-up frame unless another was removed
first: drawn past the generator's check on the scenes of seeds 0-1999 (1,175 placeable; the procedure of
tests/test_curriculum_ablation.py, which draws seeds 0-399), an added object fitted beside the two
objects in 1 scene, and of the 712 realisable three-difference draws all but one were remove + add + one
more (before pixel validation). Rendering
three differences would therefore need three-object scenes (not what the shared warm-up saw) and a
generator check relaxed for one degenerate kind mix, and the demo's answers are capped for two boxes
(`data.max_boxes = 2`, `grpo.max_new_tokens = 80`: a two-box answer takes 75 tokens). So the arms use the
levels the demo's data has (1 -> 1..2, 1..2 throughout, 2 -> 1..2) on the demo's own pairs.

The warm-up: `--demo-dir=DIR` names a finished demo workdir (`make demo`'s demo_out): its checkpoint at
step `sft.steps`, its rendered training and held-out pairs and its tokenizer. Without it the script
renders the demo's data (same settings and seeds as `python -m dig_jax.demo`) and runs the demo's warm-up
once into WORKDIR/warmup, and every arm reuses that.

Each arm runs for `--seeds` GRPO seeds: `grpo.seed` = 0, 1, ..., which folds into the key GRPO starts
from and reseeds GRPO's data stream, so the seeds of an arm sample and read independently although they
start from the same warm-up checkpoint (and seed s of every arm starts alike). Each arm-seed run
copies the warm-up checkpoint into its own workdir (WORKDIR/ARM/seed_S), where the trainer resumes from
it (the newest checkpoint) into GRPO, and then evaluates its final checkpoint on the first
`--num-eval-pairs` held-out pairs (the same pairs for every run). A wrapper around the run's reward
function records the numbers of differences of each GRPO batch (grpo_batches.jsonl), so the report shows
what each arm actually read.

The report (printed, and WORKDIR/ablation.md; the plot WORKDIR/ablation.png): per arm-seed and per arm
(the seeds pooled pair by pair) the held-out reward, F1@0.5 on one- and two-difference pairs and count
accuracy, each +- its standard error over pairs (`dig_jax.eval.stats`), the training reward of the last
iterations and the share of two-difference prompts in each half of GRPO; then, for each arm against the
curriculum, the paired bootstrap of the held-out reward difference on the same pairs (matched by seed),
per GRPO seed and with the seeds pooled. The bootstrap resamples pairs only: the spread between two GRPO
seeds of one arm is training noise that its interval leaves out, so compare a difference with that spread.

Resumable: an arm-seed whose final evaluation (metrics.json and predictions.jsonl) exists is skipped, a
partly trained one continues from its newest checkpoint, and the warm-up and rendering finish only what is
missing.

Time on the 2-core development machine, measured on a fresh clone's `make demo` output: 29 min 6 s for
the default 3 arms x 2 seeds x 300 iterations with --demo-dir, 274-299 s per arm-seed (2026-12-02, idle,
the former 1,800-step warm-up; GRPO at ~0.75 s per iteration, evaluation of 1,000 held-out pairs,
start-up and compilation); 36 min 37 s with the 3,600-step warm-up while other jobs shared the cores
(2026-12-06; 187-264 s a run once alone). Without
--demo-dir, rendering 13,000 pairs (~2.5 min) and the demo's 3,600-step warm-up (~15 min) come first.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # this checkout's packages, whatever is installed
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

ARMS = ("curriculum", "mixture", "reverse")
ONE, TWO, ONE_OR_TWO = [[[1], 1.0]], [[[2], 1.0]], [[[1], 0.5], [[2], 0.5]]  # the demo's second phase
# The demo renders its data with these seeds (dig_jax.demo.render); the warm-up run here does the same.
TRAIN_SEED, EVAL_SEED = 1, 2
BOOTSTRAP_SEED, BOOTSTRAP_RESAMPLES = 0, 2000
TRAIN_REWARD_WINDOW = 10  # the "training reward" column: mean of the last this many GRPO iterations
# Table columns: label -> (metrics.json key, stats metric, number of true boxes or None for all pairs).
HELD_OUT = {"reward": ("reward", "reward", None), "F1 1-diff": ("by_num_differences/1/f1", "f1", 1),
            "F1 2-diff": ("by_num_differences/2/f1", "f1", 2),
            "count acc": ("count_accuracy", "count_correct", None)}


# ----------------------------------------------------------------------------------------------------
# The arms
# ----------------------------------------------------------------------------------------------------

def arm_phases(arm: str, grpo_steps: int) -> list[dict]:
    """The curriculum phases of `arm` for `grpo_steps` iterations (`curriculum.phases` entries).

    Fixed lengths (no reward threshold), so every arm's phases change at the same iteration whatever the
    rewards; a last phase never ends, so it runs the remaining grpo_steps - grpo_steps // 2 iterations.
    """
    if grpo_steps < 2:
        raise ValueError(f"--grpo-steps must be >= 2 (two phases of at least one iteration), got {grpo_steps}")
    half = grpo_steps // 2

    def phase(name, selection, max_steps):
        return {"name": name, "selection": selection, "max_steps": max_steps, "reward_threshold": None,
                "window": 5, "min_steps": 0}

    if arm == "curriculum":
        return [phase("one_difference", ONE, half), phase("one_or_two", ONE_OR_TWO, None)]
    if arm == "mixture":
        return [phase("one_or_two", ONE_OR_TWO, None)]
    if arm == "reverse":
        return [phase("two_differences", TWO, half), phase("one_or_two", ONE_OR_TWO, None)]
    raise ValueError(f"unknown arm {arm!r}; one of {ARMS}")


def arm_config(c, arm: str, seed: int, grpo_steps: int, warmup: dict, num_eval_pairs: int):
    """The demo config `c` for one arm-seed: its phases and GRPO seed, the warm-up's data and tokenizer."""
    c = copy.deepcopy(c)
    c.grpo.seed = seed
    c.grpo.steps = grpo_steps
    c.curriculum.phases = arm_phases(arm, grpo_steps)
    c.data.train_files, c.data.eval_files = warmup["train_files"], warmup["eval_files"]
    c.model.tokenizer_path = warmup["tokenizer"]  # the ids the warm-up was trained with
    c.eval.num_pairs = num_eval_pairs
    c.eval.evaluators = ("dig",)
    c.eval.checkpoint_step = c.sft.steps + grpo_steps
    return c


# ----------------------------------------------------------------------------------------------------
# The shared warm-up
# ----------------------------------------------------------------------------------------------------

def prepare_warmup(c, workdir: str, demo_dir: str | None, num_train_pairs: int, num_eval_pairs: int,
                   workers: int = 2) -> dict:
    """The shared warm-up: {"checkpoint": step dir, "train_files", "eval_files", "tokenizer"}.

    From `demo_dir` when given (a finished demo's workdir); otherwise renders the demo's data and runs
    its warm-up (`grpo.steps = 0`) into WORKDIR/warmup, both resumable.
    """
    from dig_jax import assemble

    if demo_dir:
        root, run_dir = os.path.abspath(demo_dir), os.path.join(os.path.abspath(demo_dir), "run")
    else:
        from data_pipeline import settings
        from data_pipeline.generate import generate_dataset
        from dig_jax.training.train import train

        root = os.path.join(workdir, "warmup")
        run_dir = os.path.join(root, "run")
        g = settings.demo_settings(c.demo)
        generate_dataset(os.path.join(root, "data", "train"), num_train_pairs, seed=TRAIN_SEED, workers=workers,
                         config=g)
        generate_dataset(os.path.join(root, "data", "eval"), num_eval_pairs, seed=EVAL_SEED, workers=workers,
                         config=g)
    train_files = os.path.join(root, "data", "train", "*.array_record")
    eval_files = os.path.join(root, "data", "eval", "*.array_record")
    if not demo_dir and c.sft.steps not in assemble.checkpoint_steps(run_dir):
        w = copy.deepcopy(c)
        w.grpo.steps = 0  # the warm-up alone: its last step is the checkpoint every arm starts from
        w.data.train_files, w.data.eval_files = train_files, eval_files
        t = time.time()
        print(f"warm-up: {c.sft.steps} supervised steps into {run_dir}", flush=True)
        train(w, run_dir)
        print(f"warm-up done in {time.time() - t:.0f} s", flush=True)
        add_seconds(root, time.time() - t)
    checkpoint = os.path.join(run_dir, "checkpoints", str(c.sft.steps))
    if c.sft.steps not in assemble.checkpoint_steps(run_dir):
        raise FileNotFoundError(f"no warm-up checkpoint {checkpoint} (sft.steps = {c.sft.steps}); "
                                "--demo-dir must name a finished `python -m dig_jax.demo` workdir")
    tokenizer = os.path.join(run_dir, "tokenizer_compact" if c.model.compact_tokenizer else "tokenizer",
                             "tokenizer.json")
    for path in (tokenizer, os.path.dirname(train_files), os.path.dirname(eval_files)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"the warm-up at {root} has no {path}")
    return {"checkpoint": checkpoint, "train_files": train_files, "eval_files": eval_files,
            "tokenizer": tokenizer, "seconds": None if demo_dir else recorded_seconds(root)}


# ----------------------------------------------------------------------------------------------------
# One arm-seed
# ----------------------------------------------------------------------------------------------------

class BatchRecorder:
    """The run's reward function, appending the numbers of differences of each GRPO batch to a JSONL file.

    Why here and not from the trainer's metrics: the trainer logs rewards, not what its batches held, and
    the reward function is the one place that sees every rollout's (global) batch. The trainer calls it
    once per iteration, so the k-th call after a restore from step s is step s + k (a resumed run rewrites
    the steps after its checkpoint; readers keep the last line of each step).
    """

    def __init__(self, reward_fn, path: str, first_step: int):
        self.reward_fn, self.path, self.step = reward_fn, path, first_step

    def __call__(self, texts, batch, group_size):
        import numpy as np

        scores = self.reward_fn(texts, batch, group_size)
        self.step += 1
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": self.step,
                                "num_differences": np.asarray(batch["num_differences"]).astype(int).tolist()}) + "\n")
        return scores


def read_last_per_step(path: str) -> dict[int, dict]:
    """step -> the last JSONL line of that step (metrics.jsonl, grpo_batches.jsonl: a resume appends)."""
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[int(row["step"])] = row
    return dict(sorted(out.items()))


def eval_files_of(run_dir: str, step: int) -> dict:
    d = os.path.join(run_dir, "eval", f"step_{step}")
    return {"metrics_path": os.path.join(d, "metrics.json"), "predictions": os.path.join(d, "predictions.jsonl")}


def add_seconds(directory: str, seconds: float) -> float:
    """Adds `seconds` to the time recorded in DIRECTORY/seconds.json and returns the total: the report
    shows the time a run took over all its invocations, also after a rerun that skipped it."""
    path = os.path.join(directory, "seconds.json")
    total = recorded_seconds(directory) + seconds
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"seconds": total}, f)
    return total


def recorded_seconds(directory: str) -> float:
    path = os.path.join(directory, "seconds.json")
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        return float(json.load(f)["seconds"])


def run_arm_seed(c, arm: str, seed: int, run_dir: str, warmup: dict, grpo_steps: int, num_eval_pairs: int) -> bool:
    """Trains and evaluates one arm-seed in `run_dir`; False when its final evaluation already existed."""
    from dig_jax import assemble
    from dig_jax.eval.run import run_eval
    from dig_jax.rl import rewards
    from dig_jax.training.train import train

    a = arm_config(c, arm, seed, grpo_steps, warmup, num_eval_pairs)
    final = a.sft.steps + grpo_steps
    files = eval_files_of(run_dir, final)
    if all(os.path.exists(p) for p in files.values()):
        return False
    steps = assemble.checkpoint_steps(run_dir)
    if not steps:  # start from the shared warm-up: the trainer resumes from the newest checkpoint
        shutil.copytree(warmup["checkpoint"], os.path.join(run_dir, "checkpoints", str(a.sft.steps)))
        steps = [a.sft.steps]
    reward_fn = rewards.reward_fn_from_config(a.reward, assemble.model_family(a), a.data.chat_template)
    t = time.time()
    train(a, run_dir, reward_fn=BatchRecorder(reward_fn, os.path.join(run_dir, "grpo_batches.jsonl"), steps[-1]))
    run_eval(a, run_dir)
    add_seconds(run_dir, time.time() - t)
    return True


# ----------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------

def _pooled(prediction_files: list[str], metric: str, num_gt):
    """(pair seeds, num, den) of `metric` summed over the evaluations pair by pair (pairs matched by
    seed): the metric of several GRPO seeds pooled, the held-out pair still the unit."""
    import numpy as np

    from dig_jax.eval import stats

    seeds, num, den = None, 0.0, 0.0
    for path in prediction_files:
        p = stats.per_pair(stats.read_predictions(path), metric, num_gt, source=path)
        order = np.argsort(p.seeds)
        if seeds is not None and not np.array_equal(seeds, p.seeds[order]):
            raise ValueError(f"{path} scored other held-out pairs than {prediction_files[0]}")
        seeds, num, den = p.seeds[order], num + p.num[order], den + p.den[order]
    return seeds, num, den


def value_and_se(prediction_files: list[str], metric: str, num_gt) -> tuple[float, float]:
    """The metric over the pairs of `prediction_files` (several: pooled pair by pair) and its standard
    error over pairs; nan where the pairs do not define it (no pair with num_gt boxes)."""
    from dig_jax.eval import stats

    _, num, den = _pooled(prediction_files, metric, num_gt)
    if len(num) == 0 or den.sum() <= 0:
        return math.nan, math.nan
    return stats.ratio_and_se(num, den)


def _cell(value: float, se: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3f}" if math.isnan(se) else f"{value:.3f} +- {se:.3f}"


def run_summary(c, arm: str, seed: int, run_dir: str, grpo_steps: int) -> dict:
    """One arm-seed's numbers, read from its files: metrics.json, predictions.jsonl, metrics.jsonl and
    grpo_batches.jsonl (their paths are in the result, for the report's sources)."""
    final = c.sft.steps + grpo_steps
    files = eval_files_of(run_dir, final)
    with open(files["metrics_path"]) as f:
        metrics = json.load(f)
    training = read_last_per_step(os.path.join(run_dir, "metrics.jsonl"))
    curve = [(s, r["reward/mean"]) for s, r in training.items() if "reward/mean" in r]
    batches = read_last_per_step(os.path.join(run_dir, "grpo_batches.jsonl"))
    half = c.sft.steps + grpo_steps // 2

    def two_share(rows):
        counts = [n for r in rows for n in r["num_differences"]]
        return sum(n == 2 for n in counts) / len(counts) if counts else math.nan

    return {"arm": arm, "seed": seed, "run_dir": run_dir, "metrics": metrics, **files,
            "pairs": int(metrics["pairs"]), "curve": curve,
            "train_reward": (sum(r for _, r in curve[-TRAIN_REWARD_WINDOW:]) / len(curve[-TRAIN_REWARD_WINDOW:])
                             if curve else math.nan),
            "batches": batches,
            "two_share": (two_share([r for s, r in batches.items() if s <= half]),
                          two_share([r for s, r in batches.items() if s > half]))}


def held_out_table(runs: list[dict], workdir: str) -> list[str]:
    """Per arm-seed and per arm (seeds pooled): held-out metrics +- SE, training reward, batch make-up.

    An arm-seed's value is its evaluator's metrics.json, its SE from its predictions.jsonl; an arm's row
    pools its seeds' predictions pair by pair."""
    head = ["arm", "seed", *HELD_OUT, f"train reward (last {TRAIN_REWARD_WINDOW})",
            "2-diff prompts (1st / 2nd half)", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        for r in mine:
            cells = []
            for key, metric, num_gt in HELD_OUT.values():
                _, se = value_and_se([r["predictions"]], metric, num_gt)
                cells.append(_cell(r["metrics"][key], se) if key in r["metrics"] else "-")
            lines.append(f"| {arm} | {r['seed']} | " + " | ".join(cells) + f" | {r['train_reward']:.3f} | "
                         f"{r['two_share'][0]:.2f} / {r['two_share'][1]:.2f} | "
                         f"{os.path.relpath(os.path.dirname(r['metrics_path']), workdir)} |")
        if len(mine) > 1:
            pooled = [_cell(*value_and_se([r["predictions"] for r in mine], metric, num_gt))
                      for _, metric, num_gt in HELD_OUT.values()]
            spread = max(r["metrics"]["reward"] for r in mine) - min(r["metrics"]["reward"] for r in mine)
            train_reward = sum(r["train_reward"] for r in mine) / len(mine)
            lines.append(f"| **{arm}** | pooled | " + " | ".join(pooled) + f" | {train_reward:.3f} | "
                         f"reward spread between seeds {spread:.3f} | |")
    return lines


def bootstrap_table(runs: list[dict]) -> list[str]:
    """Each arm's held-out reward minus the curriculum's, paired bootstrap over the same pairs: per GRPO
    seed (arm seed s against curriculum seed s) and with the seeds pooled pair by pair."""
    from dig_jax.eval import stats

    base = {r["seed"]: r for r in runs if r["arm"] == "curriculum"}
    if not base:
        return ["(the curriculum arm was not run: nothing to compare with)"]
    lines = ["| arm - curriculum | seed | curriculum | arm | difference | 95 % interval | excludes 0 | pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in runs if r["arm"] != "curriculum"):
        mine = [r for r in runs if r["arm"] == arm and r["seed"] in base]
        comparisons = [(str(r["seed"]), [base[r["seed"]]["predictions"]], [r["predictions"]]) for r in mine]
        if len(mine) > 1:
            comparisons.append(("pooled", [base[r["seed"]]["predictions"] for r in mine],
                                [r["predictions"] for r in mine]))
        for label, before_files, after_files in comparisons:
            seeds_a, num_a, den_a = _pooled(before_files, "reward", None)
            seeds_b, num_b, den_b = _pooled(after_files, "reward", None)
            if list(seeds_a) != list(seeds_b):
                raise ValueError(f"{arm} and curriculum scored different held-out pairs")
            try:
                res = stats.paired_bootstrap(num_a, num_b, before_den=den_a, after_den=den_b, seed=BOOTSTRAP_SEED,
                                             num_resamples=BOOTSTRAP_RESAMPLES)
            except ValueError as e:  # too few pairs in a toy run
                lines.append(f"| {arm} | {label} | - | - | - | - | - | {len(num_a)} ({e}) |")
                continue
            lines.append(f"| {arm} | {label} | {num_a.sum() / den_a.sum():.3f} | {num_b.sum() / den_b.sum():.3f} | "
                         f"{res.difference:+.3f} | [{res.low:+.3f}, {res.high:+.3f}] | "
                         f"{'yes' if res.excludes_zero else 'no'} | {res.n} |")
    return lines


def plot(runs: list[dict], out_png: str, first_step: int, phase_change: float | None) -> None:
    """Training reward per arm-seed (moving average, by GRPO iteration: global step - `first_step`) and
    the final held-out reward +- SE per arm-seed and per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(dict.fromkeys(r["arm"] for r in runs))
    colours = {arm: f"C{i}" for i, arm in enumerate(arms)}
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4))
    for r in runs:
        if not r["curve"]:
            continue
        steps, values = (np.array(v, float) for v in zip(*r["curve"]))
        steps -= first_step
        k = max(1, len(values) // 15)
        ax_train.plot(steps[k - 1:], np.convolve(values, np.ones(k) / k, mode="valid"), color=colours[r["arm"]],
                      ls=("-", "--", ":", "-.")[r["seed"] % 4], label=f"{r['arm']} seed {r['seed']}")
    if phase_change is not None:
        ax_train.axvline(phase_change, color="grey", lw=0.8, ls="--")
    ax_train.set(title="GRPO training reward (moving average; dashed: phase change)", xlabel="GRPO iteration",
                 ylabel="batch-mean reward")
    ax_train.legend(fontsize=7)
    for i, arm in enumerate(arms):
        mine = [r for r in runs if r["arm"] == arm]
        for j, r in enumerate(mine):
            value, se = value_and_se([r["predictions"]], "reward", None)
            ax_eval.errorbar(i + 0.12 * (j - (len(mine) - 1) / 2), value, yerr=0 if math.isnan(se) else se, fmt="o",
                             color=colours[arm], capsize=3)
        if len(mine) > 1:
            value, se = value_and_se([r["predictions"] for r in mine], "reward", None)
            ax_eval.errorbar(i + 0.35, value, yerr=0 if math.isnan(se) else se, fmt="s", color="black", capsize=4)
    ax_eval.set_xticks(range(len(arms)), arms)
    ax_eval.set(title="held-out reward +- SE (dots: seeds, square: pooled)", ylabel="reward")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def write_report(c, runs: list[dict], workdir: str, grpo_steps: int, seconds: dict[str, float]) -> str:
    """WORKDIR/ablation.md (and ablation.png); returns the markdown."""
    pairs = sorted({r["pairs"] for r in runs})
    lines = [
        "# Curriculum ablation (CPU demo)", "",
        f"One warm-up checkpoint (step {c.sft.steps}), then {grpo_steps} GRPO iterations per run (group "
        f"{c.grpo.group_size}, {c.grpo.prompts_per_batch} prompts), {len(pairs) and pairs[0]} held-out pairs "
        f"(greedy), the same for every run. Arms: curriculum = 1 -> 1..2, mixture = 1..2 throughout, "
        f"reverse = 2 -> 1..2 (phases change at iteration {grpo_steps // 2}; 1..2 draws half of its prompts "
        "from each). The demo's two-object scenes hold at most two differences, so the paper's third level "
        "is absent (benchmarks/curriculum_ablation.py says why).", "",
        "Held-out metrics +- their standard error over pairs (`dig_jax.eval.stats`); an arm's bold row pools "
        "its GRPO seeds pair by pair. '2-diff prompts' is the share of two-difference prompts GRPO read in each "
        "half, recorded from its batches. 'source' is the evaluation directory of the row (metrics.json, "
        "predictions.jsonl).", "",
        *held_out_table(runs, workdir), "",
        "## Held-out reward: arm minus curriculum (paired bootstrap)", "",
        f"Both evaluations answered the same pairs (matched by seed); each of {BOOTSTRAP_RESAMPLES} resamples "
        f"draws pairs with replacement (numpy seed {BOOTSTRAP_SEED}). The interval covers the choice of pairs "
        "only, not training noise: compare the difference with the reward spread between seeds above.", "",
        *bootstrap_table(runs), "",
        "![ablation](ablation.png)", "",
        "## Time", "", "Training and evaluation, all seeds of an arm, as recorded by the runs (rendering not counted).",
        "", "| stage | seconds |", "|---|---|", *[f"| {k} | {v:.0f} |" for k, v in seconds.items()], "",
        _common.machine_line(), "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(workdir, "ablation.md"), "w") as f:
        f.write(text)
    plot(runs, os.path.join(workdir, "ablation.png"), c.sft.steps, grpo_steps // 2 + 0.5)
    return text


# ----------------------------------------------------------------------------------------------------

def run_ablation(c, workdir: str, *, demo_dir: str | None = None, arms=ARMS, seeds: int = 2,
                 grpo_steps: int | None = None, num_train_pairs: int = 12000, num_eval_pairs: int = 1000,
                 workers: int = 2) -> str:
    """Every arm-seed of `arms` x range(seeds) from one warm-up of the demo config `c`; returns the report."""
    for arm in arms:
        arm_phases(arm, 2)  # an unknown arm fails before anything runs
    grpo_steps = int(c.grpo.steps if grpo_steps is None else grpo_steps)
    arm_phases(arms[0], grpo_steps)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    warmup = prepare_warmup(c, workdir, demo_dir, num_train_pairs, num_eval_pairs, workers)
    # The report's times are those recorded with each run (seconds.json), so a rerun that skips finished
    # runs still reports what they took; rendering is not counted.
    seconds = {} if warmup["seconds"] is None else {"warm-up": warmup["seconds"]}
    runs = []
    for arm in arms:
        t_arm = time.time()
        seconds[arm] = 0.0
        for seed in range(seeds):
            run_dir = os.path.join(workdir, arm, f"seed_{seed}")
            t = time.time()
            print(f"== {arm} seed {seed}: {grpo_steps} GRPO iterations in {run_dir}", flush=True)
            ran = run_arm_seed(c, arm, seed, run_dir, warmup, grpo_steps, num_eval_pairs)
            print(f"== {arm} seed {seed}: {'done' if ran else 'already evaluated, skipped'} "
                  f"in {time.time() - t:.0f} s", flush=True)
            runs.append(run_summary(c, arm, seed, run_dir, grpo_steps))
            seconds[arm] += recorded_seconds(run_dir)
        print(f"== {arm}: {time.time() - t_arm:.0f} s for {seeds} seed(s)", flush=True)
    return write_report(c, runs, workdir, grpo_steps, seconds)


def main(argv=None) -> str:
    from absl import logging

    from configs import demo_cpu

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-dir", default="", help="a finished demo workdir whose warm-up checkpoint, data and "
                   "tokenizer every arm starts from (default: run the demo's warm-up into WORKDIR/warmup)")
    p.add_argument("--workdir", default="curriculum_ablation_out", help="runs, report and plot")
    p.add_argument("--grpo-steps", type=int, default=None, help="GRPO iterations per run (default: the demo "
                   "config's grpo.steps)")
    p.add_argument("--seeds", type=int, default=2, help="GRPO seeds per arm (0, 1, ...)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--num-eval-pairs", type=int, default=1000, help="held-out pairs each run is scored on")
    p.add_argument("--num-train-pairs", type=int, default=12000, help="training pairs rendered (without --demo-dir)")
    a = p.parse_args(argv)
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    arms = tuple(x for x in a.arms.split(",") if x)
    report = run_ablation(demo_cpu.get_config(), a.workdir, demo_dir=a.demo_dir or None, arms=arms, seeds=a.seeds,
                          grpo_steps=a.grpo_steps, num_train_pairs=a.num_train_pairs,
                          num_eval_pairs=a.num_eval_pairs)
    print(report)
    return report


if __name__ == "__main__":
    main()
