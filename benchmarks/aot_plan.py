"""AOT plans of the paper's runs on TPU slices, compiled on this CPU: does each run fit, and how fast could it be.

    python benchmarks/aot_plan.py                                   # the README table (long: every program)
    python benchmarks/aot_plan.py --models=4b,8b --topologies=v5p-32
    python benchmarks/aot_plan.py --models=4b@1024 --topologies=v5p-32 --programs=grpo_update

Each row is `dig_jax.aot.plan.plan` of a variant of `--config` (default configs/dig_qwen3vl.py) on a slice:
every program the run keeps resident compiled by libtpu for that topology (the `tpu` extra; no TPU
needed). `MODEL@SIDE` plans the variant on SIDE x SIDE images with data.max_pixels = SIDE^2 (the default
table adds 4b@1024 on v5p-32). Variants the config file does not define are skipped with a message.

Columns: the verdict and the program whose live memory is largest (`live` per chip, against `hbm`, the
chip's usable HBM), the summed compile seconds, the analytic FLOPs of one GRPO minibatch update and of
one generated token of one row, the roofline time of an update and of a decode step (the slowest of
compute, HBM and ICI; `dig_jax.aot.flops` states the figures), and the collective operand bytes per
chip of one call of each program (the decode loop counted at every one of its steps; the plan's JSON
also has the bytes each chip receives over ICI, which the rooflines use).

A second table, the rollout per GRPO iteration (`report.rollout_estimate`): the sampling layout the run
decodes on (`grpo.sampling_mesh`), the ICI bytes each chip receives per decode step there and on the
training mesh, the one-off bytes of copying the policy into the layout, the KV cache per chip, and the
rollout's roofline time on each (the layout's including the copy) with their ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("4b", "8b", "4b_thinking", "8b_thinking")
TOPOLOGIES = ("v5p-32", "v5e-64", "v6e-32")
EXTRA = (("4b@1024", "v5p-32"),)  # the high-resolution variant, on the slice the paper's runs use
GIB = 1024 ** 3
SHORT = {"sft_step": "sft", "policy_reshard": "reshard", "grpo_generation": "gen", "reference_logprobs": "ref", "grpo_update": "update",
         "eval_generation": "eval"}
COLUMNS = ["model", "topology", "mesh", "verdict", "worst", "live_GiB", "hbm_GiB", "live_pct", "compile_s", "update_TFLOPs",
           "token_GFLOPs", "update_roofline_s", "update_bound", "decode_step_ms", "decode_bound"] + \
          [f"{short}_coll_GiB" for short in SHORT.values()]
ROLLOUT_COLUMNS = ["model", "topology", "sampling", "decode_ICI_MiB_training", "decode_ICI_MiB_sampling", "reshard_GiB",
                   "kv_cache_GiB", "rollout_s_training", "rollout_s_sampling", "speedup"]
MIB = 1024 ** 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/dig_qwen3vl.py", help="the config file whose variants are planned")
    p.add_argument("--models", default="", help=f"variants, MODEL or MODEL@SIDE (default: {','.join(MODELS)})")
    p.add_argument("--topologies", default="", help=f"slices (default: {','.join(TOPOLOGIES)})")
    p.add_argument("--programs", default="", help="compile only these programs (default: all of each run)")
    p.add_argument("--num-slices", type=int, default=1)
    p.add_argument("--workdir", default="", help="where the plans and the tiny tokenizer go (default: a temp dir)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def jobs(models: str, topologies: str) -> list[tuple[str, str]]:
    """(model, topology) pairs: the README matrix, or the cross product of what the flags name."""
    if not models and not topologies:
        return [(m, t) for m in MODELS for t in TOPOLOGIES] + list(EXTRA)
    chosen_models = [m for m in models.split(",") if m] or list(MODELS)
    chosen_topologies = [t for t in topologies.split(",") if t] or list(TOPOLOGIES)
    return [(m, t) for m in chosen_models for t in chosen_topologies]


def load_config(path: str, spec: str):
    """The config of variant `spec` ("4b" or "4b@1024") of the config file at `path`, and its image side;
    None when the file does not define the variant."""
    variant, _, side = spec.partition("@")
    module_spec = importlib.util.spec_from_file_location("aot_plan_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        c = module.get_config(variant)
    except ValueError as e:
        if "unknown variant" not in str(e):
            raise
        print(f"skipping {spec}: {e}", flush=True)
        return None, None
    if side:
        c.data.max_pixels = int(side) ** 2
    return c, int(side) if side else None


def fit_mesh_to_slice(c, topology: str, num_slices: int) -> None:
    """On a slice with more chips than rollout prompts (v5e-64: 64 chips, 32 prompts) the batch cannot
    cover every chip, so tensor parallelism takes the rest: mesh.tensor = chips / gcd(chips, prompts),
    FSDP over the remainder. The paper configs' own mesh (FSDP over every chip) is kept where it divides."""
    from dig_jax.aot import topologies

    chips = topologies.get(topology).chips * num_slices
    tensor = chips // math.gcd(chips, int(c.grpo.prompts_per_batch))
    if tensor > 1:
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, tensor


def row_of(model: str, topology: str, plan: dict) -> dict:
    """The table's row of one plan (see the module docstring for the columns)."""
    programs = {p["name"]: p for p in plan["programs"]}
    mesh = "/".join(f"{axis}{size}" for axis, size in plan["mesh"].items() if size > 1)
    row = {"model": model, "topology": topology, "mesh": mesh, "verdict": plan["verdict"],
           "worst": plan["worst_program"],
           "live_GiB": None if plan["live_at_once"] is None else plan["live_at_once"] / GIB,
           "hbm_GiB": plan["hbm_per_chip"] / GIB, "live_pct": plan["peak_pct_of_hbm"],
           "compile_s": sum(p["compile_s"] for p in plan["programs"])}
    update = programs.get("grpo_update")
    if update is not None:
        row["update_TFLOPs"] = update["flops"] / 1e12
        if update["fits"]:
            row["update_roofline_s"], row["update_bound"] = update["roofline"]["bound_s"], update["roofline"]["bound"]
    gen = programs.get("grpo_generation") or programs.get("eval_generation")
    if gen is not None and gen["fits"]:
        row["token_GFLOPs"] = gen["per_token"]["flops"] / gen["shapes"]["rows"] / 1e9
        step = gen["per_token"]["roofline"]
        row["decode_step_ms"], row["decode_bound"] = step["bound_s"] * 1e3, step["bound"]
    for name, short in SHORT.items():
        program = programs.get(name)
        if program is not None and program["fits"]:
            row[f"{short}_coll_GiB"] = program["collectives_per_call"]["operand"] / GIB
    return row


def rollout_row_of(model: str, topology: str, plan: dict) -> dict | None:
    """The rollout table's row of one plan (module docstring), None without a compiled generation."""
    ro = plan.get("rollout")
    if not ro:
        return None
    layout = plan["sampling_layout"]
    row = {"model": model, "topology": topology,
           "sampling": "training mesh" if layout is None else f"data{layout['data']}/tensor{layout['tensor']}",
           "decode_ICI_MiB_sampling": ro["sampling"]["ici_bytes_per_step"] / MIB, "reshard_GiB": ro["reshard_bytes"] / GIB,
           "kv_cache_GiB": ro["sampling"]["kv_cache_bytes_per_chip"] / GIB, "rollout_s_sampling": ro["total_s"]}
    if "training_mesh" in ro:
        row.update(decode_ICI_MiB_training=ro["training_mesh"]["ici_bytes_per_step"] / MIB,
                   rollout_s_training=ro["training_mesh"]["generation_s"], speedup=ro["speedup"])
    return row


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    from dig_jax.aot import plan as aot_plan

    aot_plan.configure_environment()
    import jax

    print(f"# aot_plan  jax {jax.__version__}; {_common.machine_line()}", flush=True)
    only = tuple(p for p in a.programs.split(",") if p) or None
    rows, rollout_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = a.workdir or tmp
        for model, topology in jobs(a.models, a.topologies):
            c, side = load_config(a.config, model)
            if c is None:
                continue
            fit_mesh_to_slice(c, topology, a.num_slices)
            workdir = os.path.join(root, f"{model.replace('@', '_')}_{topology}")
            t0 = time.perf_counter()
            try:
                plan = aot_plan.plan(c, topology, workdir, num_slices=a.num_slices, image_size=side, only=only)
            except Exception as e:  # noqa: BLE001 - one failing plan must not hide the others' rows
                traceback.print_exc()
                rows.append({"model": model, "topology": topology, "verdict": f"ERROR: {type(e).__name__}: {e}"})
                continue
            rows.append(row_of(model, topology, plan))
            rollout_rows += [r for r in [rollout_row_of(model, topology, plan)] if r]
            print(f"{model} on {topology}: {plan['verdict']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"\n## AOT plans ({a.num_slices} slice(s)); per chip; {_common.machine_line()}")
    print(_common.markdown_table(rows, COLUMNS, {"live_pct": ".1f", "compile_s": ".0f"}))
    if rollout_rows:
        print("\n## Rollout per GRPO iteration (roofline; per chip)")
        print(_common.markdown_table(rollout_rows, ROLLOUT_COLUMNS, {"speedup": ".1f"}))
    _common.write_json(a.json, rows + rollout_rows)
    return rows


if __name__ == "__main__":
    main()
