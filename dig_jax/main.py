"""DiG-JAX entry point: train, evaluate or export, from an ml_collections config file.

    python -m dig_jax.main --config=configs/demo_cpu.py --workdir=/tmp/dig \
        [--mode=train|eval|export] [--config.path.to.field=value ...]

On a TPU pod the same command runs on every host; `jax.distributed.initialize()` connects them (it is
called when the environment says we are one of several processes, or with --distributed=true). Elsewhere
(GPU hosts without a cluster manager, or several CPU processes standing in for a pod) set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from dig_jax import multihost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, evaluation output.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export"], "What to run.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: where to write the HF directory "
                                  "(default WORKDIR/export/step_N).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                                 "Call jax.distributed.initialize(): auto = when on a multi-host TPU slice.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    multihost.maybe_initialize_distributed(_DISTRIBUTED.value)
    from dig_jax.eval.run import run_eval, run_export
    from dig_jax.training.train import train

    c, workdir = _CONFIG.value, _WORKDIR.value
    if _MODE.value == "train":
        train(c, workdir)
    elif _MODE.value == "eval":
        run_eval(c, workdir)
    else:
        run_export(c, workdir, _EXPORT_DIR.value)


if __name__ == "__main__":
    app.run(main)
