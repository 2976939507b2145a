"""Evaluation and export of a training workdir (the `--mode=eval` / `--mode=export` of dig_jax.main), and the
evaluators training runs every `eval.every` steps.

Both modes restore the parameters alone from the workdir's checkpoints onto the mesh the config describes
(any shape), with the tokenizer and model config the run used; `--mode=eval` on a workdir without
checkpoints evaluates the HF checkpoint `model.init_checkpoint` itself (a released model, before DiG).
"""
from __future__ import annotations

import json
import os
import shutil

from dig_jax import assemble
from dig_jax.config_validation import validate_evaluators
from dig_jax.eval import registry
from dig_jax.eval.registry import EvalContext, Evaluator
from dig_jax.models import hf_io


def _run_parts(c, workdir: str):
    """(tokenizer path, tokenizer, model config) of the run in `workdir`."""
    tok_path = assemble.tokenizer_path(c, workdir, assemble.model_family(c))
    tokenizer = assemble.load_run_tokenizer(c, tok_path)
    return tok_path, tokenizer, assemble.model_config_from(c, tokenizer)


def in_training_evaluators(c, model_cfg, tokenizer, tok_path: str, mesh,
                           patches_per_image: int | None) -> list[Evaluator]:
    """The evaluators training runs every `eval.every` steps (none when it is 0), built once.

    `patches_per_image`: the trained model's per-image vision attention block; the held-out images must
    have as many patches (they fail here, at start-up, otherwise).
    """
    if not c.eval.get("every", 0):
        return []
    return registry.build_evaluators(EvalContext(c, model_cfg, tokenizer, tok_path, mesh, patches_per_image))


def run_eval(c, workdir: str) -> dict:
    """Evaluates checkpoint `eval.checkpoint_step` (-1: the newest) with every evaluator of `eval.evaluators`;
    with no checkpoint in `workdir` and an HF `model.init_checkpoint`, evaluates that released model (as
    step 0), so the "before training" row comes from the same code as the "after" one.

    Returns the "dig" evaluator's metrics without prefix (callers read `["f1"]`), and those of any other
    evaluator as "<name>/<key>".
    """
    validate_evaluators(c)
    tok_path, tokenizer, model_cfg = _run_parts(c, workdir)
    mesh = assemble.make_mesh(c)
    evaluators = registry.build_evaluators(EvalContext(c, model_cfg, tokenizer, tok_path, mesh))
    # The model attends per image when every evaluator's images have one patch count (cheaper than
    # whole-batch vision attention).
    patches = registry.common_patches_per_image(evaluators)
    model, step = evaluated_model(c, workdir, model_cfg, mesh, patches)
    flat = registry.run_evaluators(evaluators, model, step, workdir)
    out = {}
    for evaluator in evaluators:
        prefix = evaluator.name + "/"
        metrics = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        _report(evaluator.name, step, metrics, registry.output_dir(workdir, step, evaluator.name))
        out.update(metrics if evaluator.name == registry.TOP_LEVEL else {prefix + k: v for k, v in metrics.items()})
    return out


def evaluated_model(c, workdir: str, model_cfg, mesh, patches_per_image: int | None):
    """(model, step): the workdir's checkpoint `eval.checkpoint_step`, or, when the workdir has no
    checkpoint, the HF checkpoint `model.init_checkpoint` loaded onto `mesh` (step 0)."""
    if not assemble.checkpoint_steps(workdir) and c.model.init_checkpoint:
        print(f"no checkpoint in {workdir}: evaluating {c.model.init_checkpoint} as step 0")
        return assemble.create_model(c, model_cfg, mesh, patches_per_image), 0
    return assemble.restore_model(c, workdir, model_cfg, mesh, c.eval.checkpoint_step,
                                  patches_per_image=patches_per_image)


def _report(name: str, step: int, metrics: dict, out_dir: str) -> None:
    """The headline metrics (those without a breakdown) of one evaluator, on stdout."""
    if name == "dig":
        print(f"evaluation of step {step} on {metrics['pairs']} pairs -> {out_dir}")
    else:
        print(f"{name} evaluation of step {step} -> {out_dir}")
    print(json.dumps({k: round(v, 4) for k, v in metrics.items() if "/" not in k}, indent=1))


def run_export(c, workdir: str, export_dir: str | None) -> str:
    tok_path, _, model_cfg = _run_parts(c, workdir)
    model, step = assemble.restore_model(c, workdir, model_cfg, assemble.make_mesh(c), c.eval.checkpoint_step)
    out = export_dir or os.path.join(workdir, "export", f"step_{step}")
    hf_io.save_hf_checkpoint(model, model_cfg, out)
    shutil.copy(tok_path, os.path.join(out, "tokenizer.json"))
    print(f"exported step {step} to {out}")
    return out
