"""Evaluation of a model: evaluators by name (`registry`), the DiG box metrics (`dig`), their drawings
(`visualize`), and the `--mode=eval` / `--mode=export` entry points (`run`).

Kept apart from `dig_jax.training` (it never imports it) so that a checkpoint can be evaluated without
the trainer, and the trainer can call the same evaluators every `eval.every` steps.
"""
