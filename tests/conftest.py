"""Test-wide setup: 8 fake CPU devices for sharding tests, offscreen EGL for MuJoCo, float32 matmuls; the
rendered referring-expression set that the evaluation and training tests share.

The environment variables must be set before jax or mujoco is first imported, which is why they live
at the top of conftest (pytest imports it before any test module).
"""
import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

@pytest.fixture(scope="session")
def rec_set(tmp_path_factory):
    """(REFER manual_dir, prepared tensorflow-datasets data_dir, expected flat examples per split) of the
    tiny rendered REC set, prepared once through the builder."""
    from dig_jax.eval import refcoco_builder
    from tests.eval.rec_data import write_rec_set

    manual = str(tmp_path_factory.mktemp("refer"))
    expected = write_rec_set(manual)
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    refcoco_builder.prepare(manual, data_dir)
    return manual, data_dir, expected
