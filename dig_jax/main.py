"""DiG-JAX entry point: train, evaluate, export or plan, from an ml_collections config file.

    python -m dig_jax.main --config=configs/demo_cpu.py --workdir=/tmp/dig \
        [--mode=train|eval|export] [--config.path.to.field=value ...]
    python -m dig_jax.main --mode=aot --config=configs/dig_qwen3vl.py:4b --topology=v5p-32 \
        [--num_slices=1] [--image_size=448] [--aot_programs=grpo_update,...] --workdir=DIR

`--mode=aot` compiles every program the run keeps resident for the named TPU slice on this machine's
CPU (libtpu, the `tpu` extra, must be installed; no TPU is needed) and writes the per-chip memory plan
into the workdir (`dig_jax.aot`).

On a TPU pod the same command runs on every host; `jax.distributed.initialize()` connects them (it is
called when the environment says we are one of several processes, or with --distributed=true). Elsewhere
(GPU hosts without a cluster manager, or several CPU processes standing in for a pod) set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
"""
from __future__ import annotations

import importlib.util

from absl import app, flags
from ml_collections import config_flags

from dig_jax import multihost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, evaluation output.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "export", "aot"], "What to run.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: where to write the HF directory "
                                  "(default WORKDIR/export/step_N).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                                 "Call jax.distributed.initialize(): auto = when on a multi-host TPU slice.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=aot: the TPU slice to plan for, e.g. v5p-32, v5e-64, "
                                "v6e-32 (an unknown name lists the known ones).")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "--mode=aot: how many such slices (multi-slice).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "--mode=aot: the run's image side in pixels (default: "
                                   "the training shards' when they are on this machine, else the data "
                                   "generator's default).")
_AOT_PROGRAMS = flags.DEFINE_list("aot_programs", None, "--mode=aot: compile only these programs (default: all "
                                  "the run keeps resident).")
flags.mark_flags_as_required(["config", "workdir"])

DOES_NOT_FIT_STATUS = 3  # --mode=aot's exit status when the planned run does not fit


def main(argv):
    del argv
    if _MODE.value == "aot":
        return plan_main()
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


def plan_main() -> int:
    """`--mode=aot`: one process on this machine, the CPU as JAX's backend, libtpu as the compiler.
    Exit status 0 when the run fits, 3 when it does not (so that scripts can stop before creating a slice)."""
    from dig_jax.aot import plan, report, topologies
    from dig_jax.config_validation import ConfigError

    if not _TOPOLOGY.value:
        raise app.UsageError("--mode=aot needs --topology (e.g. --topology=v5p-32)")
    try:
        topologies.get(_TOPOLOGY.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    if importlib.util.find_spec("libtpu") is None:
        raise app.UsageError("--mode=aot compiles with libtpu, which is not installed: pip install -e '.[tpu]'")
    plan.configure_environment()
    try:
        out = plan.plan(_CONFIG.value, _TOPOLOGY.value, _WORKDIR.value, num_slices=_NUM_SLICES.value,
                        image_size=_IMAGE_SIZE.value, only=tuple(_AOT_PROGRAMS.value) if _AOT_PROGRAMS.value else None)
    except ConfigError as e:  # the run cannot work on this slice (a batch that does not divide, ...)
        raise app.UsageError(f"{e} (on {_NUM_SLICES.value} x {_TOPOLOGY.value})") from None
    print(report.markdown(out), flush=True)
    print(f"written to {_WORKDIR.value}/aot_plan.json and aot_plan.md", flush=True)
    return 0 if out["verdict"] == "FITS" else DOES_NOT_FIT_STATUS


if __name__ == "__main__":
    app.run(main)
