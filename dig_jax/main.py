"""DiG-JAX entry point: train, evaluate or export, from an ml_collections config file.

    python -m dig_jax.main --config=configs/demo_cpu.py --workdir=/tmp/dig \
        [--mode=train|eval|export] [--config.path.to.field=value ...]

On a TPU pod the same command runs on every host; `jax.distributed.initialize()` connects them (it is
called when the environment says we are one of several processes, or with --distributed=true).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, evaluation output.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: where to write the HF directory "
                                  "(default WORKDIR/export/step_N).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                                 "Call jax.distributed.initialize(): auto = when on a multi-host TPU slice.")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed(mode: str) -> None:
    import jax

    multi_host_tpu = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
    coordinator = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if mode == "true" or (mode == "auto" and (multi_host_tpu or coordinator)):
        jax.distributed.initialize()


def run_eval(c, workdir: str) -> dict:
    from dig_jax import builders, evaluate, rewards

    tok_path = builders.tokenizer_path(c, workdir, builders.model_family(c))
    tokenizer = builders.load_run_tokenizer(c, tok_path)
    model_cfg = builders.model_config_from(c, tokenizer)
    mesh = builders.make_mesh(c)
    model, step = builders.restore_model(c, workdir, model_cfg, mesh, c.eval.checkpoint_step)
    files = c.data.eval_files or c.data.train_files
    builder = builders.example_builder(c, model_cfg.family, tok_path, builders.dataset_image_hw(files),
                                       keep_images=True)
    batches = builders.pair_dataset(c, files, builder, batch_size=c.eval.batch_size, selection=None, seed=c.seed,
                                    shuffle=False, num_epochs=1)
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
    from dig_jax import builders, hf_io

    tok_path = builders.tokenizer_path(c, workdir, builders.model_family(c))
    tokenizer = builders.load_run_tokenizer(c, tok_path)
    model_cfg = builders.model_config_from(c, tokenizer)
    model, step = builders.restore_model(c, workdir, model_cfg, builders.make_mesh(c), c.eval.checkpoint_step)
    out = export_dir or os.path.join(workdir, "export", f"step_{step}")
    hf_io.save_hf_checkpoint(model, model_cfg, out)
    import shutil

    shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))
    print(f"exported step {step} to {out}")
    return out


def main(argv):
    del argv
    _maybe_initialize_distributed(_DISTRIBUTED.value)
    from dig_jax import train

    c, workdir = _CONFIG.value, _WORKDIR.value
    if _MODE.value == "train":
        train.train(c, workdir)
    elif _MODE.value == "eval":
        run_eval(c, workdir)
    else:
        run_export(c, workdir, _EXPORT_DIR.value)


if __name__ == "__main__":
    app.run(main)
