"""The AOT tests compile for TPU topologies on this CPU, which needs libtpu (the `tpu` extra).

`requires_libtpu` skips a test, saying why, when libtpu is not installed. The environment is set here,
before any test loads libtpu: another process may hold libtpu at the same time (a plan, another test
session), and libtpu stays quiet about the missing TPU when told what it stands in for.
"""
import importlib.util
import os

import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

requires_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed: `pip install -e '.[tpu]'` (jax[tpu] pinned to the project's "
                           "jax) compiles for TPU topologies on this CPU")

