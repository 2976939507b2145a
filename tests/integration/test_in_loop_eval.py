"""Evaluators in the training loop: every `eval.every` steps the configured evaluators run on the current
parameters and their metrics land in metrics.jsonl, equal to `--mode=eval` on that step's checkpoint."""
from __future__ import annotations

import os

import numpy as np
import pytest

from dig_jax.eval.run import run_eval
from dig_jax.training import train
from tests.integration import tiny_config
from tests.integration.conftest import read_metrics, single_device


@pytest.mark.slow
def test_eval_every_logs_the_evaluators_metrics_of_that_step(train_files, tmp_path):
    c = single_device(tiny_config.get_config(train_files))
    c.eval.every = 2
    workdir = str(tmp_path)
    train.train(c, workdir)

    lines = read_metrics(workdir)
    evaluated = [m["step"] for m in lines if "eval/dig/f1" in m]
    assert evaluated == [2, 4]  # the end of the warm-up and the end of the run
    assert os.path.exists(os.path.join(workdir, "eval", "step_2", "metrics.json"))
    logged = next(m for m in lines if m["step"] == 2)

    c.eval.checkpoint_step = 2
    restored = run_eval(c, workdir)
    for key in ("f1", "precision", "recall", "mean_iou", "count_accuracy", "format_rate", "reward", "pairs"):
        np.testing.assert_allclose(logged[f"eval/dig/{key}"], restored[key], rtol=1e-6, err_msg=key)
    assert logged["eval/dig/pairs"] == c.eval.num_pairs


@pytest.mark.slow
def test_eval_every_logs_the_rec_metrics_of_the_rendered_set(train_files, rec_set, tmp_path):
    c = single_device(tiny_config.get_config(train_files))
    c.eval.every = 2
    c.eval.evaluators = ("dig", "rec")
    c.eval.rec.data_dir = rec_set[1]
    c.eval.rec.image_size = tiny_config.RESOLUTION  # the training images' patch count
    c.eval.rec.splits = ("refcoco_unc/val", "refcocog_umd/test")
    c.eval.rec.max_new_tokens = 12
    workdir = str(tmp_path)
    train.train(c, workdir)

    lines = read_metrics(workdir)
    assert [m["step"] for m in lines if "eval/rec/acc@0.5" in m] == [2, 4]
    logged = next(m for m in lines if m["step"] == 2)
    for split in c.eval.rec.splits:
        assert logged[f"eval/rec/{split}/sentences"] == len(rec_set[2][split])
    assert os.path.exists(os.path.join(workdir, "eval", "step_2", "rec", "predictions.jsonl"))

    c.eval.checkpoint_step = 2
    restored = run_eval(c, workdir)
    for key in ("acc@0.5", "acc@0.75", "mean_iou", "invalid_rate", "refcoco_unc/val/mean_iou"):
        np.testing.assert_allclose(logged[f"eval/rec/{key}"], restored[f"rec/{key}"], rtol=1e-6, err_msg=key)
