"""`--mode=aot`: compile every resident program of a run for a named TPU slice, on this CPU.

    python -m dig_jax.main --mode=aot --config=configs/dig_qwen3vl.py:4b --topology=v5p-32 --workdir=DIR

What it needs from the machine: libtpu (the `tpu` extra), which compiles for any TPU topology without
a TPU attached. JAX itself runs on the CPU backend (`configure_environment`). Nothing is downloaded and
no weights are read: the model is built abstractly from its preset (or the checkpoint's config.json when
it is on this machine), the tokenizer is the configured one when it is on this machine and the
project's tiny tokenizer (same special ids) otherwise, and batches come from a blank pair of the run's
image size (that of the first training record when the shards are on this machine, else `image_size`,
else the data generator's default resolution).
"""
from __future__ import annotations

import os

import jax
import ml_collections

from dig_jax import assemble, config_validation, sharding
from dig_jax.aot import analysis, programs, report, topologies
from dig_jax.generate import sampling_layout

# libtpu warns for a second when it finds no TPU unless told what it is standing in for; the value does
# not limit which topology can be compiled for.
_QUIET_LIBTPU = {"TPU_ACCELERATOR_TYPE": "v5litepod-4", "TPU_WORKER_HOSTNAMES": "localhost"}


def configure_environment() -> None:
    """Before JAX picks a backend: the host backend is the CPU, and libtpu may be loaded by this process
    while another holds it (two plans at once, or a test beside a plan: libtpu's lockfile otherwise
    refuses the second with "libtpu multi-process lockfile")."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    for key, value in _QUIET_LIBTPU.items():
        os.environ.setdefault(key, value)


def planning_config(c: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """A copy of `c` whose files are on this machine, and a note for each one that is not.

    An HF checkpoint that is not here (a gs:// path, another machine's disk) is replaced by its preset
    (the released checkpoints' shapes), a tokenizer that is not here by the tiny tokenizer, which counts
    the prompt text in more tokens than Qwen's (a longer prompt bucket: a conservative plan).
    """
    c = ml_collections.ConfigDict(c.to_dict())
    notes = []
    ckpt = c.model.init_checkpoint
    if ckpt and not os.path.exists(os.path.join(ckpt, "config.json")):
        notes.append(f"model.init_checkpoint {ckpt} is not on this machine: the shapes of preset {c.model.preset!r}")
        c.model.init_checkpoint = ""
    tok = c.model.tokenizer_path
    tok_file = os.path.join(tok, "tokenizer.json") if tok and os.path.isdir(tok) else tok
    if tok and not os.path.exists(tok_file):
        notes.append(f"model.tokenizer_path {tok} is not on this machine: token counts of the tiny tokenizer")
        c.model.tokenizer_path = ""
    elif not tok and not (c.model.init_checkpoint and os.path.exists(os.path.join(ckpt, "tokenizer.json"))) \
            and not c.model.preset.endswith("_tiny"):
        notes.append("no tokenizer on this machine: token counts of the tiny tokenizer")
    return c, notes


def _validation_view(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` with the inputs a plan does not read filled in, so `validate` checks everything else (mesh,
    batch divisibility over the slice's chips and hosts, optimisation, curriculum, caps)."""
    c = ml_collections.ConfigDict(c.to_dict())
    c.model.init_checkpoint = c.model.init_checkpoint or "(not read by a plan)"
    c.data.train_files = c.data.train_files or "(not read by a plan)"
    return c


def image_hw(files: str, image_size: int | None) -> tuple[tuple[int, int], str]:
    """The run's image size and where it comes from (see the module docstring)."""
    if image_size:
        return (int(image_size), int(image_size)), "--image_size"
    if files:
        from data_pipeline import loader

        if loader.list_shards(files):
            return assemble.dataset_image_hw(files), f"the first record of {files}"
    from data_pipeline import settings

    size = int(settings.get_config().resolution)
    return (size, size), "the data generator's default resolution"


def run_parts(c: ml_collections.ConfigDict, workdir: str, devices, num_processes: int,
              image_size: int | None = None, hbm_bytes: int | None = None) -> tuple[programs.RunParts, list[str]]:
    """The run's model, mesh, sampling layout and example builders, built as `training.setup` builds
    them (notes: what the plan assumed); `hbm_bytes` per chip sizes an "auto" sampling layout."""
    c, notes = planning_config(c)
    n = int(c.mesh.get("num_devices", 0) or 0)
    devices = list(devices)[:n] if n else list(devices)
    config_validation.validate(_validation_view(c), len(devices), num_processes)
    tok_path = assemble.tokenizer_path(c, workdir, assemble.model_family(c))
    tokenizer = assemble.load_run_tokenizer(c, tok_path)
    model_cfg = assemble.model_config_from(c, tokenizer)
    train_hw, source = image_hw(c.data.train_files, image_size)
    eval_hw, eval_source = image_hw(c.data.eval_files or c.data.train_files, image_size)
    notes.append(f"training images {train_hw[0]}x{train_hw[1]} px ({source}); "
                 f"held-out {eval_hw[0]}x{eval_hw[1]} px ({eval_source})")
    builder = assemble.example_builder(c, model_cfg, tok_path, train_hw)
    sft_builder = assemble.example_builder(c, model_cfg, tok_path, train_hw, answer_boxes=max(c.sft.num_differences))
    eval_builder = assemble.example_builder(c, model_cfg, tok_path, eval_hw)
    if c.grpo.steps:
        assemble.check_room_for_answers(c, builder, "grpo.max_new_tokens", c.grpo.max_new_tokens)
    assemble.check_room_for_answers(c, eval_builder, "eval.max_new_tokens", c.eval.max_new_tokens)
    mesh = sharding.make_mesh(config_validation.mesh_shape(c, len(devices)), devices)
    graphdef, params = programs.abstract_params(c, model_cfg, mesh, builder.patches_per_image)
    layout = None
    if c.grpo.steps:
        layout = sampling_layout.for_run(
            c.grpo.sampling_mesh, training_mesh=mesh, num_processes=num_processes,
            rows=int(c.grpo.prompts_per_batch) * int(c.grpo.group_size), model_cfg=model_cfg, params=params,
            dtype=assemble.DTYPES[c.model.dtype], hbm_bytes=hbm_bytes)
        notes.append("the rollout decodes on the training mesh" if layout is None else
                     f"the rollout decodes on the sampling layout {layout.describe()} (grpo.sampling_mesh="
                     f"{c.grpo.sampling_mesh!r})")
    return programs.RunParts(c, model_cfg, mesh, graphdef, params, builder, sft_builder, eval_builder, layout), notes


def plan(c: ml_collections.ConfigDict, topology: str, workdir: str, *, num_slices: int = 1,
         image_size: int | None = None, only: tuple[str, ...] | None = None) -> dict:
    """Compiles every resident program of the run `c` (or those named in `only`, see
    `programs.PROGRAMS`) for `num_slices` slices of `topology`; returns the report (see `report.build`)
    and writes it into `workdir` as aot_plan.json / aot_plan.md."""
    topo = topologies.get(topology)
    devices = topo.describe(num_slices).devices
    measured = analysis.usable_hbm_bytes(devices[0])
    hbm = measured or topo.generation.usable_hbm_bytes
    parts, notes = run_parts(c, workdir, devices, topo.hosts * num_slices, image_size, hbm_bytes=hbm)
    if measured is None:
        notes.append("the compiler did not state its HBM limit: the table's usable HBM is used")
    elif abs(measured - topo.generation.usable_hbm_bytes) > 0.01 * topologies.GIB:
        notes.append(f"this libtpu allows {measured / topologies.GIB:.2f} GiB per chip, not the table's "
                     f"{topo.generation.usable_hbm_bytes / topologies.GIB:.2f} GiB: the compiler's figure is used")
    if num_slices > 1:
        notes.append(f"{num_slices} slices: collectives between slices cross the data-centre network, which is "
                     "much slower than ICI; the rooflines count all collective bytes at ICI speed")
    # The trainer never sets the global matmul precision, so a TPU run compiles at JAX's default; a
    # caller's "high"/"highest" (the test suite's, for CPU parity) would make Mosaic refuse the splash
    # kernels' bfloat16 backward matmuls, which the real run never meets.
    with jax.default_matmul_precision("default"):
        compiled, resident = programs.build_all(parts, only)
    out = report.build(topo, num_slices, parts, compiled, resident, hbm, hbm_source="compiler" if measured else "table",
                       notes=notes)
    report.write(out, workdir)
    return out
