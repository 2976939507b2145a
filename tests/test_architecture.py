"""The import rules of ARCHITECTURE.md, checked on the source (every import, lazy ones inside functions too).

  * dig_jax.models and dig_jax.processing import nothing of dig_jax.generate / rl / training / eval;
  * dig_jax.generate imports, of the project, only itself, models, processing, sharding and multihost;
  * dig_jax.eval does not import dig_jax.training;
  * nothing under dig_jax/ or data_pipeline/ imports configs/ (configs import the code, never the reverse);
  * only dig_jax.main imports dig_jax.aot (the plans sit on top of everything and nothing depends on them).

Every violation is collected and printed together, as `file:line: importer -> imported (rule)`.
"""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dig_jax", "data_pipeline")
FIRST_PARTY = ("dig_jax", "data_pipeline", "configs")

LOW_LEVEL = ("dig_jax.models", "dig_jax.processing")
HIGHER = ("dig_jax.generate", "dig_jax.rl", "dig_jax.training", "dig_jax.eval")
GENERATE_MAY_IMPORT = ("dig_jax.generate", "dig_jax.models", "dig_jax.processing", "dig_jax.sharding",
                       "dig_jax.multihost")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The dotted modules (or module.attribute candidates) an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:  # relative: resolve against this module's package
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    # `from x.y import f` names x.y; `from dig_jax import generate` also names the module dig_jax.generate.
    return [base] + [f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")]


def _is_module(dotted: str) -> bool:
    path = os.path.join(REPO, *dotted.split("."))
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def _rules(importer: str, target: str) -> list[str]:
    broken = []
    if _within(importer, LOW_LEVEL) and _within(target, HIGHER):
        broken.append("models/processing import nothing of generate, rl, training or eval")
    if _within(importer, ("dig_jax.generate",)) and _within(target, ("dig_jax",)) and target != "dig_jax" \
            and not _within(target, GENERATE_MAY_IMPORT):
        broken.append("generate imports only models, processing, sharding and multihost")
    if _within(importer, ("dig_jax.generate",)) and _within(target, ("data_pipeline", "configs")):
        broken.append("generate imports only models, processing, sharding and multihost")
    if _within(importer, ("dig_jax.eval",)) and _within(target, ("dig_jax.training",)):
        broken.append("eval does not import training")
    if _within(target, ("configs",)):
        broken.append("nothing under dig_jax/ or data_pipeline/ imports configs/")
    if _within(target, ("dig_jax.aot",)) and not _within(importer, ("dig_jax.aot", "dig_jax.main")):
        broken.append("only dig_jax.main imports dig_jax.aot")
    return broken


def _violations() -> list[str]:
    out = []
    for package in PACKAGES:
        for root, dirs, files in os.walk(os.path.join(REPO, package)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(root, name)
                importer = _module_name(path)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), filename=path)
                for node in ast.walk(tree):
                    seen = set()
                    targets = sorted(_imported(node, importer, name == "__init__.py"), key=len, reverse=True)
                    for target in targets:  # the most specific module first, which the message names
                        if not _within(target, FIRST_PARTY):
                            continue
                        for rule in _rules(importer, target):
                            if rule in seen:  # one line per (statement, rule)
                                continue
                            seen.add(rule)
                            out.append(f"{os.path.relpath(path, REPO)}:{node.lineno}: {importer} -> {target} "
                                       f"({rule})")
    return out


def test_import_rules_hold():
    violations = _violations()
    assert not violations, "import rules broken:\n" + "\n".join(violations)


def test_the_checker_sees_a_violation():
    """The rules themselves, on made-up module names (a checker that finds nothing must not pass silently)."""
    assert _rules("dig_jax.models.vlm", "dig_jax.generate.batch")
    assert _rules("dig_jax.processing.examples", "dig_jax.rl.rewards")
    assert _rules("dig_jax.generate.sampler", "dig_jax.rl.grpo")
    assert _rules("dig_jax.generate.batch", "dig_jax.assemble")
    assert _rules("dig_jax.eval.run", "dig_jax.training.train")
    assert _rules("data_pipeline.pairs", "configs.datagen")
    assert not _rules("dig_jax.generate.batch", "dig_jax.sharding")
    assert not _rules("dig_jax.processing.template", "dig_jax.models.config")
    assert not _rules("dig_jax.eval.run", "dig_jax.assemble")
    assert _rules("dig_jax.training.train", "dig_jax.aot.plan")
    assert not _rules("dig_jax.main", "dig_jax.aot.plan")
    assert not _rules("dig_jax.aot.programs", "dig_jax.training.state")
    tree = ast.parse("from . import sampler\nfrom ..rl import grpo\n")
    got = [t for node in tree.body for t in _imported(node, "dig_jax.generate.batch", False)]
    assert "dig_jax.generate.sampler" in got and "dig_jax.rl.grpo" in got
