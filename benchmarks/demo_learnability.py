"""How fast the demo's tiny model learns to box one difference, as a function of how large objects look.

    python benchmarks/demo_learnability.py [--views=18:0.16:2:3,12:0.12:2:2] [--steps=1500] \
        [--eval_every=500] [--train_pairs=12000] [--workdir=/tmp/dig_learnability] [--json=out.json]

Each view is `fovy:placement_radius:min_objects:max_objects` of the generator (configs/datagen.py at the
demo's 128 px, the demo's kinds). For every view the script renders a dataset with `generate_dataset`,
runs only the supervised warm-up of `configs/demo_cpu.py` on it with the trainer (`train.train`, SFT
steps only, one checkpoint every `eval_every` steps), and scores every checkpoint with `--mode=eval`'s
code on the view's held-out pairs (greedy decoding). The table shows the held-out one-difference F1 at
IoU 0.5 and mean IoU per step, beside the view's mean box side in pixels, so the effect of object size
on sample efficiency is measured with the product's own trainer and evaluator, in one run.

Why it exists: the demo's warm-up sees about 35k examples from a random init. With ~30 px objects
(two 16 px patches) the model stays near one constant box; with ~45 px it localises. This script is the
evidence behind `configs/demo_cpu.py`'s choice of view (README, "The CPU demo").

Everything is resumable: rendering finishes missing shards and training continues from its newest
checkpoint, so rerunning with the same --workdir only evaluates what is missing.
"""
from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

_VIEWS = flags.DEFINE_string("views", "18:0.16:2:3,12:0.12:2:2",
                             "Comma-separated fovy:placement_radius:min_objects:max_objects.")
_STEPS = flags.DEFINE_integer("steps", 1500, "Supervised warm-up steps per view.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 500, "Checkpoint and evaluate every this many steps.")
_TRAIN_PAIRS = flags.DEFINE_integer("train_pairs", 12000, "Rendered training pairs per view (1 or 2 differences).")
_EVAL_PAIRS = flags.DEFINE_integer("eval_pairs", 200, "Rendered held-out pairs per view (other seeds).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/dig_learnability", "Data, checkpoints and evaluations.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows as JSON here.")


def parse_view(text: str) -> dict:
    """'12:0.12:2:2' -> {'fovy': 12.0, 'radius': 0.12, 'min_objects': 2, 'max_objects': 2}."""
    parts = text.split(":")
    if len(parts) != 4:
        raise ValueError(f"--views entry {text!r}: expected fovy:placement_radius:min_objects:max_objects")
    return {"fovy": float(parts[0]), "radius": float(parts[1]), "min_objects": int(parts[2]),
            "max_objects": int(parts[3])}


def view_config(view: dict, steps: int, eval_every: int):
    """The demo config with this view's scene and the warm-up only."""
    from configs import demo_cpu

    c = demo_cpu.get_config()
    c.demo.camera_fovy, c.demo.placement_radius = view["fovy"], view["radius"]
    c.demo.min_objects, c.demo.max_objects = view["min_objects"], view["max_objects"]
    c.sft.steps = steps
    c.grpo.steps = 0
    c.checkpoint.every = eval_every
    c.checkpoint.keep = steps // eval_every + 1  # keep every checkpoint: each is evaluated
    return c


def mean_box_side(pattern: str) -> float:
    """Mean of (width + height) / 2 over the boxes of the shards matching `pattern`, in pixels.

    Reads the records' JSON headers only: the boxes are there, the PNGs need not be decoded.
    """
    import numpy as np

    from data_pipeline import loader, schema

    sides = []
    for path in loader.list_shards(pattern):
        reader = loader.open_reader(path)
        try:
            for i in range(reader.num_records()):
                boxes = np.asarray(schema.read_header(reader.read([i])[0])["boxes"], np.float32).reshape(-1, 4)
                sides.extend(((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1])) / 2)
        finally:
            reader.close()
    return float(np.mean(sides))


def measure_view(view: dict, workdir: str) -> list[dict]:
    from configs import demo_cpu
    from data_pipeline.generate import generate_dataset
    from dig_jax.eval.run import run_eval
    from dig_jax.training.train import train

    c = view_config(view, _STEPS.value, _EVAL_EVERY.value)
    g = demo_cpu.datagen_config(c)
    train_dir, eval_dir = os.path.join(workdir, "data", "train"), os.path.join(workdir, "data", "eval")
    t = time.time()
    generate_dataset(train_dir, _TRAIN_PAIRS.value, seed=1, workers=2, config=g)
    generate_dataset(eval_dir, _EVAL_PAIRS.value, seed=2, workers=2, config=g, progress=False)
    render_s = time.time() - t
    c.data.train_files = os.path.join(train_dir, "*.array_record")
    c.data.eval_files = os.path.join(eval_dir, "*.array_record")
    c.eval.num_pairs = _EVAL_PAIRS.value
    side = mean_box_side(c.data.eval_files)

    run_dir = os.path.join(workdir, "run")
    t = time.time()
    train(c, run_dir)
    train_s = time.time() - t
    rows = []
    for step in range(_EVAL_EVERY.value, _STEPS.value + 1, _EVAL_EVERY.value):
        c.eval.checkpoint_step = step
        metrics = run_eval(c, run_dir)
        rows.append({"view": f"{view['fovy']:g}:{view['radius']:g}:{view['min_objects']}:{view['max_objects']}",
                     "box_side_px": side, "step": step,
                     "f1_one_difference": metrics.get("by_num_differences/1/f1", float("nan")),
                     "iou_one_difference": metrics.get("by_num_differences/1/mean_iou", float("nan")),
                     "f1_all": metrics["f1"], "render_s": render_s, "train_s": train_s})
    return rows


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    views = [parse_view(v) for v in _VIEWS.value.split(",") if v]
    if _EVAL_EVERY.value < 1 or _STEPS.value % _EVAL_EVERY.value:
        raise ValueError(f"--steps ({_STEPS.value}) must be a positive multiple of --eval_every ({_EVAL_EVERY.value})")
    rows = []
    for i, view in enumerate(views):
        rows += measure_view(view, os.path.join(_WORKDIR.value, f"view_{i}"))
    print()
    print(f"Supervised warm-up of configs/demo_cpu.py, batch 16, held-out {_EVAL_PAIRS.value} pairs per view")
    columns = ["view", "box_side_px", "step", "f1_one_difference", "iou_one_difference", "f1_all", "train_s"]
    formats = {"box_side_px": ".1f", "f1_one_difference": ".3f", "iou_one_difference": ".3f", "f1_all": ".3f",
               "train_s": ".0f"}
    print(_common.markdown_table(rows, columns, formats))
    _common.write_json(_JSON.value, rows)


if __name__ == "__main__":
    app.run(main)
