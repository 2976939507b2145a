"""Test-wide setup: 8 fake CPU devices for sharding tests, offscreen EGL for MuJoCo, float32 matmuls.

The environment variables must be set before jax or mujoco is first imported, which is why they live
at the top of conftest (pytest imports it before any test module).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
