"""A tiny Qwen3-VL under the Thinking template (`data.chat_template = "thinking"`, the paper's checkpoints'
template) goes through one supervised step and one GRPO iteration of the real trainer.

What it checks besides "it runs": the run's prompts end in the opened block `<think>\\n`, its warm-up
targets start by closing it (`\\n</think>\\n\\n` + JSON), and the reward the trainer builds reads answers
after `</think>` (a completion that never closes the block scores 0).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from dig_jax.rl import rewards
from dig_jax.training import setup as training_setup
from dig_jax.training import state as training_state
from dig_jax.training import train
from tests.integration.conftest import read_metrics, single_device


def thinking_config(config):
    c = single_device(config)
    c.data.chat_template = "thinking"
    c.sft.steps = 1
    c.grpo.steps = 1
    c.grpo.kl_coef = 0.0  # no reference model: the template does not touch the KL term, and it saves a compile
    c.curriculum.phases = [{"name": "one", "selection": [[[1], 1.0]], "max_steps": None, "reward_threshold": None,
                            "window": 1, "min_steps": 0}]
    return c


@pytest.mark.slow
def test_thinking_template_trains_one_sft_step_and_one_grpo_iteration(config, tmp_path):
    c = thinking_config(config)
    workdir = str(tmp_path / "run")
    run = training_setup.setup(c, workdir)
    tok = run.tokenizer
    think, end_think, newline = (tok.token_to_id(t) for t in ("<think>", "</think>", "Ċ"))

    batch = next(training_state.data_iterator(run, "sft", run.curriculum.initial_state()))
    for prompt, prompt_mask, answer, answer_mask in zip(batch["prompt_ids"], batch["prompt_mask"],
                                                        batch["answer_ids"], batch["answer_mask"]):
        assert prompt[prompt_mask == 1][-2:].tolist() == [think, newline]
        target = tok.decode(answer[answer_mask == 1].tolist(), skip_special_tokens=False)
        assert target.startswith("\n</think>\n\n[{\"bbox_2d\": ") and target.endswith("]<|im_end|>")
        json.loads(target[len("\n</think>\n\n"):-len("<|im_end|>")])
        assert answer[answer_mask == 1][:2].tolist() == [newline, end_think]

    # The reward the trainer scores GRPO samples with: the answer is what follows </think>.
    grpo_batch = next(training_state.data_iterator(run, "grpo", run.curriculum.initial_state()))
    first = grpo_batch["gt_boxes"][0][grpo_batch["gt_mask"][0]]
    answer = run.builder.answer_text(first, ["add"] * len(first))
    texts = ["it moved\n</think>\n\n" + answer, answer]  # the second is still reasoning
    scores = run.grpo.reward_fn(texts, grpo_batch, 2)
    np.testing.assert_array_equal(scores["format_ok"], [1.0, 0.0])
    assert scores["f1"][0] == 1.0 and scores["reward"][1] == 0.0
    same = rewards.reward_fn_from_config(c.reward, run.model_cfg.family, "thinking")(texts, grpo_batch, 2)
    np.testing.assert_array_equal(same["reward"], scores["reward"])

    train.train(c, workdir)
    metrics = read_metrics(workdir)
    assert [m["phase"] for m in metrics] == ["sft", "one"]
    assert np.isfinite(metrics[0]["sft/loss"]) and metrics[0]["sft/loss"] > 0
    assert np.isfinite(metrics[1]["grpo/loss"]) and 0.0 <= metrics[1]["reward/mean"] <= 1.0
