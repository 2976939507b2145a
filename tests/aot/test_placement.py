"""The plan's abstract inputs carry exactly the shardings the trainer gives the real ones.

On the test session's 8 CPU devices (no libtpu needed), for several mesh shapes: the trainer's own
`prompt_batch` / `answers` (both its process-local path and the global one), `init_optimizer_state` and
`fresh_reference` run on real arrays, and every leaf's sharding and dtype is compared with the plan's.
"""
import jax
import numpy as np
import pytest
from flax import nnx

from dig_jax import assemble, sharding
from dig_jax.aot import inputs, placement, plan, programs
from dig_jax.generate.batch import answers, prompt_batch
from dig_jax.training import state as training_state
from tests.integration import tiny_config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("aot_placement"))


_PARTS = {}


def _parts(workdir, mesh_shape):
    """The plan's parts of the tiny run on `mesh_shape` (built once per shape)."""
    if mesh_shape in _PARTS:
        return _PARTS[mesh_shape]
    c = tiny_config.get_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh_shape
    c.sft.batch_size = c.grpo.prompts_per_batch = c.eval.batch_size = 8  # valid on every mesh tried here
    parts, _ = plan.run_parts(c, workdir, jax.devices(), 1, image_size=tiny_config.RESOLUTION)
    _PARTS[mesh_shape] = parts
    return parts


def _assert_same_placement(real, planned):
    real_leaves, planned_leaves = jax.tree.leaves(real), jax.tree.leaves(planned)
    assert jax.tree.structure(real) == jax.tree.structure(planned)
    for i, (r, p) in enumerate(zip(real_leaves, planned_leaves)):
        assert (r.shape, r.dtype) == (p.shape, p.dtype), i
        assert r.sharding.is_equivalent_to(p.sharding, r.ndim), (i, r.shape, r.sharding, p.sharding)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)])
@pytest.mark.parametrize("rows, group_size", [(4, 2), (3, 1)])  # 8 rows divide over the batch shards, 3 do not
def test_prompts_and_answers_are_placed_as_the_trainer_places_them(workdir, mesh_shape, rows, group_size):
    parts = _parts(workdir, mesh_shape)
    c, mesh = parts.config, parts.mesh
    batch = inputs.host_batch(parts.builder, rows)
    bucket = int(c.data.prompt_bucket)
    planned = placement.prompts(inputs.prompt_shapes(parts.model_cfg, batch, group_size=group_size,
                                                     prompt_bucket=bucket), mesh)
    for local in (True, False):
        real = prompt_batch(parts.model_cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=bucket,
                            process_local=local)
        _assert_same_placement(real, planned)
    _assert_same_placement(answers(batch, mesh, process_local=True), placement.rows(inputs.answer_shapes(batch), mesh))


def test_state_is_sharded_as_the_trainer_shards_it(workdir):
    parts = _parts(workdir, (2, 2, 2))  # every axis of the mesh used
    c, mesh = parts.config, parts.mesh
    with sharding.activate(mesh):
        model = assemble.create_model(c, parts.model_cfg, mesh, patches_per_image=parts.builder.patches_per_image)
    _, real_params = nnx.split(model, nnx.Param)
    _assert_same_placement(real_params, parts.params)
    for stage in ("sft", "grpo"):
        tx, planned_opt = programs.abstract_opt_state(c, stage, parts.params, mesh)
        _assert_same_placement(training_state.init_optimizer_state(tx, real_params, mesh), planned_opt)
    for dtype in ("float32", "bfloat16"):
        c.grpo.reference_dtype = dtype
        _assert_same_placement(training_state.fresh_reference(c, "grpo", real_params),
                               programs.abstract_reference(c, parts.params))


def test_the_batch_rule():
    mesh = sharding.make_mesh((2, 2, 2), jax.devices())
    assert sharding.batch_sharding(mesh, (8, 5)).spec == sharding.logical_to_spec(("batch", None), mesh=mesh)
    assert sharding.batch_sharding(mesh, (3, 8, 5), axis=1).spec[1] == ("data", "fsdp")
    for shape in [(6, 5), (2, 5), ()]:  # rows that do not divide over 4 batch shards, and a scalar
        assert sharding.batch_sharding(mesh, shape).spec == jax.sharding.PartitionSpec()
    assert placement.abstract(np.int64(3)).dtype == np.int32  # what device_put makes of it (no x64)
