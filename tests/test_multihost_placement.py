"""Each host places only its own share of a batch; only the small reward fields cross hosts.

On one process (8 fake CPU devices) the process-local path must give exactly today's arrays and
shardings. On two CPU processes (a two-host pod) every device must hold the same shard it gets when the
global batch is gathered on every host and placed from there (the path the trainer used so far).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dig_jax import multihost, sharding
from dig_jax.generate import batch as prompting
from dig_jax.models import config as C

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dig_batch(cfg, prompts: int, seed: int = 0) -> dict:
    """A host batch as processing.examples builds it: two 1x4x8 images per prompt, left-padded prompts."""
    rng = np.random.default_rng(seed)
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * 8 + [cfg.vision_end_token_id]
    row = [11, 12, 13] + image + [14, 15] + image + [16]
    ids = np.full((prompts, 32), cfg.pad_token_id, np.int32)
    mask = np.zeros((prompts, 32), np.int32)
    ids[:, 32 - len(row):], mask[:, 32 - len(row):] = row, 1
    return {"pixel_values": rng.normal(size=(prompts, 64, cfg.vision.patch_dim)).astype(np.float32),
            "image_grid_thw": np.tile(np.array([[[1, 4, 8]]], np.int32), (prompts, 2, 1)),
            "prompt_ids": ids, "prompt_mask": mask,
            "answer_ids": rng.integers(0, 1000, (prompts, 6)).astype(np.int32),
            "answer_mask": (np.arange(6)[None] < rng.integers(1, 7, (prompts, 1))).astype(np.int32),
            "gt_boxes": rng.uniform(0, 100, (prompts, 3, 4)).astype(np.float32),
            "gt_mask": np.ones((prompts, 3), bool), "num_differences": np.full((prompts,), 3, np.int32),
            "original_hw": np.tile([[64, 128]], (prompts, 1)).astype(np.int32),
            "resized_hw": np.tile([[56, 112]], (prompts, 1)).astype(np.int32),
            "seed": np.arange(prompts, dtype=np.int64) + 2**40}


def assert_same_placement(a, b):
    """Equal pytrees of jax.Arrays: values, shardings and every addressable shard."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype and x.sharding == y.sharding, (x.sharding, y.sharding)
        for sx, sy in zip(x.addressable_shards, y.addressable_shards):
            assert sx.device == sy.device and sx.index == sy.index
            np.testing.assert_array_equal(np.asarray(sx.data), np.asarray(sy.data))


@pytest.mark.parametrize("mesh_shape, prompts, group_size", [
    ((2, 2, 2), 4, 2), ((1, 4, 2), 4, 1), ((8, 1, 1), 8, 1), ((2, 2, 2), 3, 1)])  # the last does not divide
def test_process_local_prompt_batch_is_todays_on_one_process(mesh_shape, prompts, group_size):
    cfg = C.qwen2_5_vl_tiny()
    mesh = sharding.make_mesh(mesh_shape)
    batch = dig_batch(cfg, prompts)
    want = prompting.prompt_batch(cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=16)
    got = prompting.prompt_batch(cfg, batch, group_size=group_size, mesh=mesh, prompt_bucket=16, process_local=True)
    assert_same_placement(got, want)
    assert_same_placement(prompting.answers(batch, mesh, process_local=True), prompting.answers(batch, mesh))
    tree = {k: batch[k] for k in ("prompt_ids", "gt_boxes", "num_differences")}
    assert_same_placement(sharding.place_local_batch(tree, mesh), sharding.place_batch(tree, mesh))


def test_reward_fields_leave_the_pixels_behind():
    batch = dig_batch(C.qwen2_5_vl_tiny(), 2)
    fields = multihost.reward_fields(batch)
    assert set(fields) == set(multihost.REWARD_FIELDS) & set(batch)
    assert "pixel_values" not in fields and "prompt_ids" not in fields
    for k, v in fields.items():
        np.testing.assert_array_equal(v, batch[k])


_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from dig_jax import multihost, sharding
    multihost.maybe_initialize_distributed("auto")
    from dig_jax.generate import batch as prompting
    from dig_jax.models import config as C
    from tests.test_multihost_placement import assert_same_placement, dig_batch

    cfg, me = C.qwen2_5_vl_tiny(), jax.process_index()
    full = dig_batch(cfg, 8, seed=3)  # the global batch; process p reads rows 4p .. 4p+3
    local = {k: v[4 * me:4 * me + 4] for k, v in full.items()}
    for shape in ((4, 1, 1), (2, 2, 1), (1, 2, 2)):
        mesh = sharding.make_mesh(shape)
        gathered = multihost.global_batch(local)
        want = prompting.prompt_batch(cfg, gathered, group_size=2, mesh=mesh, prompt_bucket=16)
        got = prompting.prompt_batch(cfg, local, group_size=2, mesh=mesh, prompt_bucket=16, process_local=True)
        assert_same_placement(got, want)
        assert_same_placement(prompting.answers(local, mesh, process_local=True), prompting.answers(gathered, mesh))
    fields = multihost.reward_fields(local)
    for k in fields:
        np.testing.assert_array_equal(fields[k], full[k], err_msg=k)
    print("placement ok", me, flush=True)
""")


def test_two_processes_place_their_own_shares(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = []
    for i in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        for i, p in enumerate(procs):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, f"process {i} failed:\n{err[-4000:]}"
            assert f"placement ok {i}" in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
