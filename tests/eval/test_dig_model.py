"""The DiG evaluator with a (random, tiny) model: generation, re-runs, and `run_eval` from a checkpoint.

The metric arithmetic is tested on designed answers (test_metrics); here the answers come from the
model, so what is checked is the plumbing: the data pass, greedy decoding, where the outputs go, and that
`--mode=eval` on a saved checkpoint returns what evaluating the same parameters in memory returns.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from flax import nnx

from dig_jax import assemble, checkpointing
from dig_jax.eval import dig, run
from dig_jax.rl import rewards
from tests.eval.conftest import NUM_PAIRS, eval_context
from tests.integration import tiny_config


def test_evaluate_twice_then_run_eval_on_the_checkpoint(eval_config, tmp_path, capsys):
    c, workdir = eval_config, str(tmp_path / "workdir")
    ctx = eval_context(c, workdir)
    evaluator = dig.DigEvaluator.from_context(ctx)
    patches = dig.held_out_builder(c, ctx.model_cfg, ctx.tok_path).patches_per_image
    model = assemble.create_model(c, ctx.model_cfg, ctx.mesh, patches_per_image=patches)

    first = evaluator.evaluate(model, step=0, out_dir=str(tmp_path / "first"))
    again = evaluator.evaluate(model, step=0, out_dir=str(tmp_path / "again"))  # a fresh pass, same result
    assert first == again and first["pairs"] == NUM_PAIRS
    with open(tmp_path / "first" / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == NUM_PAIRS and len({line["seed"] for line in lines}) == NUM_PAIRS
    assert os.path.exists(tmp_path / "first" / "predictions.png")
    config = rewards.RewardConfig.from_config(c.reward, ctx.model_cfg.family)
    for line in lines:  # each line's reward is the reward of its answer
        gt = np.array(line["gt_boxes"], np.float64).reshape(-1, 4)
        hw = (tiny_config.RESOLUTION,) * 2  # min/max pixels pin the resized image to the rendered size
        assert line["reward"] == rewards.score_answer(line["answer"], gt, hw, hw, config)["reward"]

    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1, use_async=False)
    ckpt.save(5, {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}, {"step": 5}, force=True)
    ckpt.close()
    capsys.readouterr()
    assert run.run_eval(c, workdir) == first  # the dig metrics, unprefixed, as callers read them
    eval_dir = os.path.join(workdir, "eval", "step_5")
    assert f"evaluation of step 5 on {NUM_PAIRS} pairs -> {eval_dir}" in capsys.readouterr().out
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        assert json.load(f) == first
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        assert [json.loads(line) for line in f] == lines


def test_the_held_out_reward_is_the_papers_whatever_count_terms_training_used(eval_config, tmp_path):
    c = eval_config
    c.reward.count_weight, c.reward.extra_box_penalty = 0.3, 0.17  # trained with our count terms ...
    evaluator = dig.DigEvaluator.from_context(eval_context(c, str(tmp_path)))
    c.reward.count_weight, c.reward.extra_box_penalty = 0.0, 0.0  # ... evaluated with the paper's reward
    assert evaluator.reward_config == rewards.RewardConfig.from_config(c.reward, "qwen3_vl", c.data.chat_template)


def test_held_out_images_must_match_the_models_vision_block(eval_config, tmp_path):
    c = eval_config
    ctx = eval_context(c, str(tmp_path), patches_per_image=1)
    with pytest.raises(ValueError, match=r"^config\.data\.eval_files: images of \d+ patches, but the model attends "
                                         r"per image of 1 patches"):
        dig.DigEvaluator.from_context(ctx)
