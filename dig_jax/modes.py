"""Evaluation and export of a training workdir (the `--mode=eval` / `--mode=export` of dig_jax.main).

Both restore the parameters alone from the workdir's checkpoints onto the mesh the config describes
(any shape), with the tokenizer and model config the run used.
"""
from __future__ import annotations

import json
import os
import shutil

import jax

from dig_jax import builders, evaluate, hf_io, rewards
from dig_jax.train import global_batch


def run_eval(c, workdir: str) -> dict:
    tok_path = builders.tokenizer_path(c, workdir, builders.model_family(c))
    tokenizer = builders.load_run_tokenizer(c, tok_path)
    model_cfg = builders.model_config_from(c, tokenizer)
    mesh = builders.make_mesh(c)
    files = c.data.eval_files or c.data.train_files
    builder = builders.example_builder(c, model_cfg, tok_path, builders.dataset_image_hw(files),
                                       keep_images=True)
    builders.check_room_for_answers(c, builder, "eval.max_new_tokens", c.eval.max_new_tokens)
    model, step = builders.restore_model(c, workdir, model_cfg, mesh, c.eval.checkpoint_step,
                                         patches_per_image=builder.patches_per_image)
    local = builders.pair_dataset(c, files, builder, batch_size=c.eval.batch_size, selection=None, seed=c.seed,
                                  shuffle=False, num_epochs=1)
    # Every host scores the global batch; hosts stay in step even when their shares differ in size.
    batches = evaluate.lockstep_global_batches(local, c.eval.batch_size // jax.process_count(), gather=global_batch)
    reward_config = rewards.RewardConfig(alpha=c.reward.alpha, lambda1=c.reward.lambda1, lambda2=c.reward.lambda2,
                                         iou_threshold=c.reward.iou_threshold, family=model_cfg.family)
    out_dir = os.path.join(workdir, "eval", f"step_{step}")
    metrics = evaluate.evaluate(model, batches, cfg=model_cfg, tokenizer=tokenizer, family=model_cfg.family,
                                max_new_tokens=c.eval.max_new_tokens, out_dir=out_dir,
                                num_visualise=c.eval.num_visualise, prompt_bucket=c.data.prompt_bucket,
                                mesh=mesh, reward_config=reward_config, max_pairs=c.eval.num_pairs)
    print(f"evaluation of step {step} on {metrics['pairs']} pairs -> {out_dir}")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if "/" not in k}, indent=1))
    return metrics


def run_export(c, workdir: str, export_dir: str | None) -> str:
    tok_path = builders.tokenizer_path(c, workdir, builders.model_family(c))
    tokenizer = builders.load_run_tokenizer(c, tok_path)
    model_cfg = builders.model_config_from(c, tokenizer)
    model, step = builders.restore_model(c, workdir, model_cfg, builders.make_mesh(c), c.eval.checkpoint_step)
    out = export_dir or os.path.join(workdir, "export", f"step_{step}")
    hf_io.save_hf_checkpoint(model, model_cfg, out)
    shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))
    print(f"exported step {step} to {out}")
    return out
