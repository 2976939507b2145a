"""Evaluators by name: `config.eval.evaluators` lists those a run uses, in `--mode=eval` and during training.

Why a registry: benchmarks differ in data and metrics but not in how they are run, so adding one is a
file with a class that has `name` and `evaluate(model, *, step, out_dir)` (the `Evaluator` protocol) and
a `from_context(EvalContext)` constructor, plus one entry in `EVALUATORS`.

Outputs of step N: the "dig" evaluator writes into WORKDIR/eval/step_N/ (where `--mode=eval` always put
metrics.json, predictions.jsonl and predictions.png, which the demo and the tests read); every other
evaluator into WORKDIR/eval/step_N/<name>/.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import ml_collections

from dig_jax.config_validation import ConfigError
from dig_jax.eval.dig import DigEvaluator
from dig_jax.eval.perception import PerceptionEvaluator
from dig_jax.eval.rec import RecEvaluator
from dig_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """The run's config and the parts that the trainer (or `run_eval`) has already built, so that an
    evaluator builds only its own data.

    c: the whole run config (an evaluator reads its own section, e.g. `eval`, `data`, `reward`).
    model_cfg: the model's config (family, special-token ids).
    tokenizer: the run's loaded tokenizer; tok_path: its tokenizer.json (example builders load it).
    mesh: where the model lives (None: one device, unsharded).
    patches_per_image: the model's per-image vision attention block (`assemble.model_constructor`); an
      evaluator whose images have another patch count cannot use this model (None: any).
    """
    c: ml_collections.ConfigDict
    model_cfg: ModelConfig
    tokenizer: Any
    tok_path: str
    mesh: jax.sharding.Mesh | None = None
    patches_per_image: int | None = None


class Evaluator(Protocol):
    """An evaluation of a model that can run many times (every `eval.every` steps of training).

    `evaluate` makes a full pass over the evaluator's data, writes whatever it wants to keep into
    `out_dir` (only process 0 writes on a pod) and returns scalar metrics, the same on every process.
    """
    name: str
    patches_per_image: int | None  # of every image it feeds the model (None: images of several sizes)

    def evaluate(self, model, *, step: int, out_dir: str) -> dict[str, float]:
        ...

# name -> (EvalContext -> Evaluator). A new evaluator is a module of this package and an entry here.
EVALUATORS: dict[str, Callable[[EvalContext], Evaluator]] = {
    "dig": DigEvaluator.from_context,  # held-out DiG pairs
    "rec": RecEvaluator.from_context,  # RefCOCO / RefCOCO+ / RefCOCOg (eval.rec)
    "perception": PerceptionEvaluator.from_context,  # POPE / multiple choice / MMVP JSONL (eval.perception)
}

DEFAULT_EVALUATORS = ("dig",)
TOP_LEVEL = "dig"  # the evaluator whose outputs stay directly in eval/step_N/


def evaluator_names(c) -> tuple[str, ...]:
    """The names `config.eval.evaluators` lists (default: dig alone), each registered and listed once."""
    names = tuple(c.eval.get("evaluators", DEFAULT_EVALUATORS))
    for name in names:
        if name not in EVALUATORS:
            raise ConfigError(f"config.eval.evaluators: {name!r} is not one of {sorted(EVALUATORS)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"config.eval.evaluators: {duplicates} listed more than once (each writes one directory)")
    return names


def build_evaluators(ctx: EvalContext) -> list[Evaluator]:
    """The evaluators `ctx.c.eval.evaluators` names, in that order, each built once (its data pipeline
    included) so that it can run many times."""
    return [EVALUATORS[name](ctx) for name in evaluator_names(ctx.c)]


def common_patches_per_image(evaluators: Sequence[Evaluator]) -> int | None:
    """The patch count every evaluator's images share, so the model can attend per image; None when
    they differ (the model then attends over the whole batch of images, masked: same result, slower)."""
    counts = {getattr(e, "patches_per_image", None) for e in evaluators}
    return counts.pop() if len(counts) == 1 else None


def output_dir(workdir: str, step: int, name: str) -> str:
    """Where evaluator `name` writes its outputs for checkpoint `step` (see the module docstring)."""
    base = os.path.join(workdir, "eval", f"step_{step}")
    return base if name == TOP_LEVEL else os.path.join(base, name)


def run_evaluators(evaluators: Sequence[Evaluator], model, step: int, workdir: str) -> dict[str, float]:
    """Runs every evaluator on `model` (the parameters of `step`); returns their metrics as "<name>/<key>"."""
    out = {}
    for evaluator in evaluators:
        directory = output_dir(workdir, step, evaluator.name)
        os.makedirs(directory, exist_ok=True)
        metrics = evaluator.evaluate(model, step=step, out_dir=directory)
        out.update({f"{evaluator.name}/{k}": v for k, v in metrics.items()})
    return out
