"""The evaluator registry: names are checked against it, each evaluator is built from the context and
run, its metrics come back under its name, and its outputs go where the module docstring says."""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import pytest

from dig_jax.eval import registry


def _context(*names) -> registry.EvalContext:
    c = ml_collections.ConfigDict({"eval": {"evaluators": names, "every": 2}})
    return registry.EvalContext(c=c, model_cfg=None, tokenizer=None, tok_path="tokenizer.json")


@dataclasses.dataclass
class _Counting:
    """An evaluator without a model: counts its calls and writes what it saw."""
    ctx: registry.EvalContext
    name: str = "counting"
    calls: int = 0

    def evaluate(self, model, *, step: int, out_dir: str) -> dict[str, float]:
        self.calls += 1
        with open(os.path.join(out_dir, "seen.json"), "w") as f:
            json.dump({"model": model, "step": step}, f)
        return {"calls": float(self.calls), "by_group/a": 0.5}


def test_an_unknown_name_fails_naming_the_field():
    with pytest.raises(ValueError, match=r"^config\.eval\.evaluators: 'refcoco' is not one of \['dig', 'perception', 'rec'\]"):
        registry.build_evaluators(_context("dig", "refcoco"))
    with pytest.raises(ValueError, match=r"^config\.eval\.evaluators: \['dig'\] listed more than once"):
        registry.evaluator_names(_context("dig", "dig").c)


def test_the_default_is_dig_alone():
    assert registry.evaluator_names(ml_collections.ConfigDict({"eval": {}})) == ("dig",)


def test_a_registered_evaluator_is_built_run_and_prefixed(monkeypatch, tmp_path):
    monkeypatch.setitem(registry.EVALUATORS, "counting", _Counting)
    ctx = _context("counting")
    (evaluator,) = registry.build_evaluators(ctx)
    assert evaluator.ctx is ctx
    workdir = str(tmp_path)
    for step in (2, 4):  # built once, run at every evaluation
        metrics = registry.run_evaluators([evaluator], "the model", step, workdir)
        assert metrics == {"counting/calls": step / 2, "counting/by_group/a": 0.5}
        with open(tmp_path / "eval" / f"step_{step}" / "counting" / "seen.json") as f:
            assert json.load(f) == {"model": "the model", "step": step}


def test_dig_writes_at_the_top_of_the_step_directory():
    assert registry.output_dir("/w", 7, "dig") == os.path.join("/w", "eval", "step_7")
    assert registry.output_dir("/w", 7, "refcoco") == os.path.join("/w", "eval", "step_7", "refcoco")


def test_training_builds_no_evaluator_when_eval_every_is_0(monkeypatch):
    from dig_jax.eval import run

    monkeypatch.setitem(registry.EVALUATORS, "counting", _Counting)
    c = _context("counting").c
    (built,) = run.in_training_evaluators(c, None, None, "tokenizer.json", None, 12)
    assert built.ctx.patches_per_image == 12
    c.eval.every = 0
    assert run.in_training_evaluators(c, None, None, "tokenizer.json", None, 12) == []
