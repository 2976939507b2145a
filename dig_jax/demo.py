"""The CPU demo (`make demo`): render a small dataset, train a tiny model through the curriculum,
evaluate it, and write a report.

    python -m dig_jax.demo --workdir=demo_out [--config=configs/demo_cpu.py] [--config.sft.steps=...]
    python -m dig_jax.demo --workdir=demo_seed1 --warmup_from=demo_out --config.grpo.seed=1  # GRPO seed 1

Every stage resumes: the generator finishes only missing shards, training continues from the newest
checkpoint, so rerunning after an interruption picks up where it stopped. The report
(WORKDIR/report.md) holds the training curves, the held-out metrics after the warm-up and after GRPO,
visualised predictions (every held-out metric with its standard error over pairs, and the paired bootstrap of
"after GRPO minus after warm-up": `dig_jax.eval.stats` on the two evaluations' predictions.jsonl), and the
transfer check at toy scale: referring-expression accuracy on rendered
scenes of the same kind ("the large red metal cube", `data_pipeline.refer_scenes`), scored by the REC
evaluator through the RefCOCO data path, before and after GRPO.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo_cpu.py", "Training configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where data, checkpoints and the report go.")
_TRAIN_PAIRS = flags.DEFINE_integer("num_train_pairs", 12000, "Rendered training pairs.")
_EVAL_PAIRS = flags.DEFINE_integer("num_eval_pairs", 1000, "Rendered held-out pairs (other seeds).")
_WORKERS = flags.DEFINE_integer("workers", 2, "Rendering processes.")
_REC_SCENES = flags.DEFINE_integer("num_rec_scenes", 60, "Rendered scenes of the referring-expression set.")
_WARMUP_FROM = flags.DEFINE_string(
    "warmup_from", None, "A demo workdir whose rendered data and warm-up checkpoint (step sft.steps) this run "
    "reuses, so that it runs only GRPO and the evaluations: another GRPO seed with --config.grpo.seed=N.")


def adopt_warmup(source: str, workdir: str, sft_steps: int) -> None:
    """Starts WORKDIR from SOURCE's warm-up: links its rendered data, copies its checkpoint at `sft_steps`,
    tokenizer and warm-up metrics. The trainer then resumes from that checkpoint into GRPO (with
    `grpo.seed` set, an independent GRPO stage). A workdir that already has checkpoints keeps them (the
    demo resumes); SOURCE is only read."""
    import shutil

    source = os.path.abspath(source)
    checkpoint = os.path.join(source, "run", "checkpoints", str(sft_steps))
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--warmup_from={source}: no warm-up checkpoint {checkpoint} (a finished demo "
                                f"workdir with sft.steps = {sft_steps} holds one)")
    os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
    for name in ("train", "eval", "rec_tfds"):
        link = os.path.join(workdir, "data", name)
        if not os.path.lexists(link):
            os.symlink(os.path.join(source, "data", name), link)
    run_dir = os.path.join(workdir, "run")
    checkpoints = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
        return
    shutil.copytree(checkpoint, os.path.join(checkpoints, str(sft_steps)))
    for entry in os.listdir(os.path.join(source, "run")):
        if entry.startswith("tokenizer"):  # the ids the warm-up was trained with
            shutil.copytree(os.path.join(source, "run", entry), os.path.join(run_dir, entry))
    with open(os.path.join(source, "run", "metrics.jsonl")) as f, \
            open(os.path.join(run_dir, "metrics.jsonl"), "w") as out:
        out.writelines(line for line in f if line.strip() and json.loads(line)["step"] <= sft_steps)


def render(c, workdir: str) -> tuple[str, str]:
    from data_pipeline import settings
    from data_pipeline.generate import generate_dataset
    from data_pipeline.preview import preview_shards

    g = settings.demo_settings(c.demo)
    train_dir, eval_dir = os.path.join(workdir, "data", "train"), os.path.join(workdir, "data", "eval")
    generate_dataset(train_dir, _TRAIN_PAIRS.value, seed=1, workers=_WORKERS.value, config=g)
    generate_dataset(eval_dir, _EVAL_PAIRS.value, seed=2, workers=_WORKERS.value, config=g)
    preview_shards(os.path.join(train_dir, "*.array_record"), os.path.join(workdir, "data_preview.png"), num_pairs=6)
    return os.path.join(train_dir, "*.array_record"), os.path.join(eval_dir, "*.array_record")


def render_rec_set(c, workdir: str) -> str:
    """The rendered referring-expression set, prepared as the RefCOCO splits (tensorflow-datasets
    `ref_coco_flat`); returns its data_dir. Skipped when already prepared (the demo resumes)."""
    from data_pipeline import refer_scenes, scene
    from dig_jax.eval import refcoco_builder

    data_dir = os.path.join(workdir, "data", "rec_tfds")
    if not refcoco_builder.is_prepared(data_dir):
        manual_dir = os.path.join(workdir, "data", "refer")
        settings = scene.SceneSettings(min_objects=c.demo.min_objects, max_objects=c.demo.max_objects,
                                       placement_radius=c.demo.placement_radius, camera_fovy=c.demo.camera_fovy)
        refer_scenes.write_refer_set(manual_dir, num_scenes=_REC_SCENES.value, seed=3,
                                     resolution=c.demo.resolution, settings=settings)
        refcoco_builder.prepare(manual_dir, data_dir)
    return data_dir


def plot_curves(metrics_file: str, out_png: str, sft_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in open(metrics_file)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    sft = [(r["step"], r["sft/loss"]) for r in rows if "sft/loss" in r]
    if sft:
        axes[0].plot(*zip(*sft), lw=1)
        axes[0].set(title="supervised warm-up", xlabel="step", ylabel="answer-token NLL", yscale="log")
    grpo = [r for r in rows if "reward/mean" in r]
    if grpo:
        steps = np.array([r["step"] for r in grpo])
        for key, label in (("reward/mean", "reward"), ("reward/f1", "F1@0.5"), ("reward/iou", "mean IoU")):
            values = np.array([r[key] for r in grpo])
            k = max(1, len(values) // 15)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            axes[1].plot(steps[k - 1:], smooth, label=label)
        phase_changes = [r["step"] for a, r in zip(grpo, grpo[1:]) if r["phase"] != a["phase"]]
        for s in phase_changes:
            axes[1].axvline(s, color="grey", ls="--", lw=0.8)
        axes[1].set(title="GRPO (moving average; dashed: phase change)", xlabel="step", ylim=(0, 1))
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# The held-out table's rows: metrics.json key -> (stats metric, number of true boxes or None for all pairs).
HELD_OUT_ROWS = {
    "reward": ("reward", None), "f1": ("f1", None), "precision": ("precision", None), "recall": ("recall", None),
    "mean_iou": ("mean_iou", None), "count_accuracy": ("count_correct", None), "format_rate": ("format_ok", None),
    "by_num_differences/1/f1": ("f1", 1), "by_num_differences/1/mean_iou": ("mean_iou", 1),
    "by_num_differences/2/f1": ("f1", 2), "by_num_differences/1/count_accuracy": ("count_correct", 1),
    "by_num_differences/2/count_accuracy": ("count_correct", 2),
}
# The bootstrap table's rows: label -> (stats metric, number of true boxes or None).
CHANGE_ROWS = {"reward": ("reward", None), "f1": ("f1", None), "by_num_differences/1/f1": ("f1", 1),
               "count_accuracy": ("count_correct", None)}
BOOTSTRAP_SEED, BOOTSTRAP_RESAMPLES = 0, 2000


def _value_and_se(results: dict, key: str, rows: list[dict] | None) -> str:
    """'0.660 +- 0.049': the evaluator's metric and its standard error over the pairs of its
    predictions.jsonl lines (`rows`); the metric alone when the lines cannot give one (fewer than two
    pairs, or none where the metric is defined)."""
    from dig_jax.eval import stats

    if key not in results:
        return "-"
    cell = f"{results[key]:.3f}"
    if rows is None:
        return cell
    metric, num_gt = HELD_OUT_ROWS[key]
    values = stats.per_pair(rows, metric, num_gt)
    if len(values.num) < 2 or values.den.sum() <= 0:
        return cell
    _, se = stats.ratio_and_se(values.num, values.den)
    return f"{cell} +- {se:.3f}"


def _held_out_table(results: dict[str, dict], predictions: dict[str, str] | None) -> str:
    """The held-out metrics of every evaluation, each +- its standard error over pairs."""
    from dig_jax.eval import stats

    names = list(results)
    rows = {n: stats.read_predictions(predictions[n]) if predictions else None for n in names}
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in HELD_OUT_ROWS:
        lines.append(f"| {key} | " + " | ".join(_value_and_se(results[n], key, rows[n]) for n in names) + " |")
    return "\n".join(lines)


def _change_table(names: tuple[str, str], before_path: str, after_path: str) -> list[str]:
    """The paired bootstrap of after minus before (`names`: the two evaluations) for the CHANGE_ROWS
    metrics, pairs matched by seed."""
    import math

    from dig_jax.eval import stats

    lines = [f"| metric | {names[0]} | {names[1]} | difference | 95 % interval | excludes 0 | difference / SE "
             "| pairs |", "|---|---|---|---|---|---|---|---|"]
    for label, (metric, num_gt) in CHANGE_ROWS.items():
        before, after = stats.read_aligned(before_path, after_path, metric, num_gt)
        try:
            res = stats.paired_bootstrap(before.num, after.num, before_den=before.den, after_den=after.den,
                                         seed=BOOTSTRAP_SEED, num_resamples=BOOTSTRAP_RESAMPLES)
        except ValueError as e:  # too few pairs of this kind in a toy run
            lines.append(f"| {label} | - | - | - | - | - | - | {len(before.num)} ({e}) |")
            continue
        lines.append(f"| {label} | {before.value:.3f} | {after.value:.3f} | {res.difference:+.3f} | "
                     f"[{res.low:+.3f}, {res.high:+.3f}] | {'yes' if res.excludes_zero else 'no'} | "
                     f"{'-' if math.isnan(res.z) else format(res.z, '+.1f')} | {res.n} |")
    return lines


def _table(results: dict[str, dict], keys: list[str]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in keys:
        cells = [f"{results[n].get(key, float('nan')):.3f}" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grpo_reward_trend(metrics_file: str, window: int = 10) -> tuple[float, float] | None:
    """Mean training reward of the first and of the last `window` GRPO iterations."""
    rewards = [r["reward/mean"] for r in map(json.loads, open(metrics_file)) if "reward/mean" in r]
    if len(rewards) < 2:
        return None
    k = max(1, min(window, len(rewards) // 2))
    return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def _rec_table(results: dict[str, dict]) -> list[str]:
    """The REC rows of the report: macro-averaged accuracy with its standard error, IoU, invalid rate."""
    names = list(results)
    sentences = int(sum(v for k, v in results[names[0]].items() if k.startswith("rec/") and k.endswith("/sentences")))
    lines = [f"Referring expressions on {sentences} sentences of rendered scenes (eight RefCOCO-style splits, "
             "macro average +- standard error). The model never saw a one-image question; at this scale "
             "this measures whether anything transfers, not the paper's gain.", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in ("acc@0.5", "acc@0.75"):
        lines.append(f"| {key} | " + " | ".join(
            f"{results[n][f'rec/{key}']:.3f} +- {results[n][f'rec/{key}_stderr']:.3f}" for n in names) + " |")
    for key in ("mean_iou", "invalid_rate"):
        lines.append(f"| {key} | " + " | ".join(f"{results[n][f'rec/{key}']:.3f}" for n in names) + " |")
    return lines


def write_report(workdir: str, c, results: dict[str, dict], seconds: dict[str, float],
                 trend: tuple[float, float] | None = None, predictions: dict[str, str] | None = None) -> str:
    """WORKDIR/report.md. `predictions`: the predictions.jsonl of each evaluation (same names as
    `results`, the first "before", the last "after"), for the standard errors and the paired bootstrap."""
    kinds = sorted({k.split("/")[1] for r in results.values() for k in r if k.startswith("by_kind/")})
    names = list(results)
    final = results[names[-1]]
    final_rows = None
    if predictions:
        from dig_jax.eval import stats

        final_rows = stats.read_predictions(predictions[names[-1]])
    one_diff_f1 = _value_and_se(final, "by_num_differences/1/f1", final_rows) \
        if "by_num_differences/1/f1" in final else "0.000"
    change = (["## After GRPO minus after the warm-up (paired bootstrap)", "",
               f"Both checkpoints answered the same held-out pairs (matched by seed). Each of "
               f"{BOOTSTRAP_RESAMPLES} resamples draws the pairs with replacement and scores both checkpoints on "
               f"that same draw (numpy seed {BOOTSTRAP_SEED}); the interval holds the middle 95 % of the "
               "resampled differences, and the SE is their standard deviation. A change whose interval "
               "contains 0 is within what the choice of held-out pairs explains.", "",
               *_change_table((names[0], names[-1]), predictions[names[0]], predictions[names[-1]]), ""]
              if predictions and len(names) > 1 else [])
    lines = [
        "# DiG-JAX CPU demo report", "",
        f"A tiny Qwen3-VL-shaped model (random init, compact tokenizer) trained on {_TRAIN_PAIRS.value} rendered "
        f"pairs at {c.demo.resolution} px: {c.sft.steps} supervised warm-up steps, then {c.grpo.steps} GRPO "
        f"iterations (group size {c.grpo.group_size}) through {len(c.curriculum.phases)} curriculum phases. "
        f"Held-out: the first {min(c.eval.num_pairs, _EVAL_PAIRS.value)} of {_EVAL_PAIRS.value} pairs rendered "
        f"from other seeds.", "",
        f"**Held-out F1@0.5 on one-difference pairs: {one_diff_f1}** (bar: 0.5).", "",
        *([f"GRPO training reward, mean of the first vs the last iterations: {trend[0]:.3f} -> {trend[1]:.3f}.", ""]
          if trend else []),
        "## Training curves", "", "![curves](curves.png)", "",
        "## Held-out metrics (greedy decoding)", "",
        "Each metric +- its standard error over the held-out pairs (the pairs are the independent draws: "
        "std / sqrt(n) for means over pairs, the linearised error of a ratio for the micro-averaged F1, "
        "precision, recall and mean IoU; `dig_jax.eval.stats`).", "",
        _held_out_table(results, predictions), "",
        "Recall by difference kind:", "", _table(results, [f"by_kind/{k}/recall" for k in kinds]), "", *change,
        *(["## Transfer: referring expressions (toy scale)", "", *_rec_table(results), ""]
          if "rec/acc@0.5" in final else []),
        "## Predictions after GRPO (green: truth, red: prediction)", "", "![predictions](predictions.png)", "",
        "## Data", "", "![data](data_preview.png)", "",
        "## Time", "", "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.0f} |" for k, v in seconds.items()], "",
    ]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def main(argv):
    del argv
    import shutil

    from dig_jax.eval.run import run_eval
    from dig_jax.training.train import train

    # Orbax logs every save at INFO; the demo's own progress lines (print) are what a reader wants.
    logging.set_verbosity(logging.WARNING)
    c = _CONFIG.value
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)
    seconds = {}
    t = time.time()
    if _WARMUP_FROM.value:
        adopt_warmup(_WARMUP_FROM.value, workdir, c.sft.steps)
    c.data.train_files, c.data.eval_files = render(c, workdir)
    rec_data_dir = render_rec_set(c, workdir)
    seconds["render"] = time.time() - t

    run_dir = os.path.join(workdir, "run")
    t = time.time()
    train(c, run_dir)
    seconds["train"] = time.time() - t

    t = time.time()
    c.eval.evaluators = ("dig", "rec")
    c.eval.rec.data_dir = rec_data_dir
    c.eval.rec.image_size = c.demo.resolution  # the rendered set's images, as many patches as the pairs'
    results = {}
    steps = (("after warm-up", c.sft.steps), ("after GRPO", c.sft.steps + c.grpo.steps))
    for name, step in steps:
        c.eval.checkpoint_step = step
        results[name] = run_eval(c, run_dir)
    seconds["evaluate"] = time.time() - t
    shutil.copy(os.path.join(run_dir, "eval", f"step_{c.sft.steps + c.grpo.steps}", "predictions.png"),
                os.path.join(workdir, "predictions.png"))
    plot_curves(os.path.join(run_dir, "metrics.jsonl"), os.path.join(workdir, "curves.png"), c.sft.steps)
    trend = grpo_reward_trend(os.path.join(run_dir, "metrics.jsonl"))
    predictions = {name: os.path.join(run_dir, "eval", f"step_{step}", "predictions.jsonl") for name, step in steps}
    path = write_report(workdir, c, results, seconds, trend, predictions)
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
