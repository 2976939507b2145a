#!/usr/bin/env bash
# Create, set up, run on all workers, tail logs, and delete a TPU VM slice for DiG-JAX.
#
#   ./launch_tpu.sh plan    NAME CONFIG [FLAGS...]         # here, before create: does the run fit ACCELERATOR?
#   ./launch_tpu.sh create  NAME [ACCELERATOR] [ZONE]      # default v5p-32 in us-east5-a
#   ./launch_tpu.sh setup   NAME                           # copy this checkout, install jax[tpu] + package
#   ./launch_tpu.sh run     NAME CONFIG WORKDIR [FLAGS...] # same command on every worker (jax.distributed)
#   ./launch_tpu.sh logs    NAME                           # tail worker 0's log
#   ./launch_tpu.sh delete  NAME
#   ./launch_tpu.sh all     NAME CONFIG WORKDIR [FLAGS...] # plan + create + setup + run + logs (delete stays manual)
#
# `plan` runs on this machine (no TPU, no gcloud): `python -m dig_jax.main --mode=aot` compiles every program
# the run keeps resident for ACCELERATOR with libtpu on the CPU (this checkout's .venv with the tpu extra:
# `make venv`), prints the per-chip memory table and writes it to PLAN_DIR; it exits 3 when the run does
# not fit, which stops `all` before anything is created.
#
# WORKDIR should be a gs:// path (orbax writes checkpoints there from every host); the data shards and the
# HF checkpoint are read from paths given in the config (local on each worker, or gs://).
# Environment: PROJECT (gcloud project), ZONE, ACCELERATOR, RUNTIME (TPU software version), PLAN_DIR (default
# /tmp/dig_jax_plan_NAME), PLAN=0 (`all` without the plan).
set -euo pipefail

cmd=${1:?usage: $0 plan|create|setup|run|logs|delete|all NAME ...}
name=${2:?give the TPU VM name}
shift 2 || true
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-32}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=dig-jax
LOG=/tmp/dig_jax_run.log
PLAN_DIR=${PLAN_DIR:-/tmp/dig_jax_plan_$name}

gc() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { gc ssh "$name" --worker=all --command="$1"; }

plan() {
  local config=${1:?give a config, e.g. configs/dig_qwen3vl.py:4b}
  shift
  (cd "$(dirname "$0")" && .venv/bin/python -m dig_jax.main --mode=aot --config="$config" \
      --topology="$ACCELERATOR" --workdir="$PLAN_DIR" "$@")
}

create() {
  local acc=${1:-$ACCELERATOR}
  gc create "$name" --accelerator-type="$acc" --version="$RUNTIME"
}

setup() {
  local tarball
  tarball=$(mktemp /tmp/dig-jax.XXXXXX.tar.gz)
  git -C "$(dirname "$0")" archive --format=tar.gz -o "$tarball" HEAD
  gc scp "$tarball" "$name":/tmp/dig-jax.tar.gz --worker=all
  on_all "set -e; sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv libegl1 libgl1-mesa-dri >/dev/null;
          rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf /tmp/dig-jax.tar.gz -C $REMOTE_DIR;
          cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip &&
          .venv/bin/pip install -q -e '.[tpu]'"
  rm -f "$tarball"
}

run() {
  local config=${1:?give a config, e.g. configs/dig_qwen3vl.py:4b} workdir=${2:?give a workdir (gs://...)}
  shift 2
  # Every worker runs the same command; dig_jax.main calls jax.distributed.initialize() on a pod.
  on_all "cd $REMOTE_DIR && nohup .venv/bin/python -m dig_jax.main --config=$config --workdir=$workdir $* \
          > $LOG 2>&1 &"
}

logs() { gc ssh "$name" --worker=0 --command="tail -n 200 -f $LOG"; }
delete() { gc delete "$name" --quiet; }

case "$cmd" in
  plan) plan "$@" ;;
  create) create "$@" ;;
  setup) setup ;;
  run) run "$@" ;;
  logs) logs ;;
  delete) delete ;;
  all) if [ "${PLAN:-1}" != 0 ]; then plan "${1:?give a config}" "${@:3}"; fi; create; setup; run "$@"; logs ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
