"""Every size preset has exactly HF's parameter count for the same config.

Ours are counted on `nnx.eval_shape` (no memory); HF's models are built on torch's 'meta' device and
their unique parameters summed (tied lm_head counted once, as in HF).
"""
import importlib.util
import os

import numpy as np
import pytest
import torch
from flax import nnx

from dig_jax.models import config as C
from dig_jax.models.vlm import QwenVL

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(os.path.dirname(__file__), "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)


def our_count(cfg: C.ModelConfig) -> int:
    abstract = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def hf_count(cfg: C.ModelConfig) -> int:
    if cfg.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
    else:
        from transformers import Qwen3VLForConditionalGeneration as Model
    with torch.device("meta"):
        model = Model(oracle.hf_config(cfg))
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# Sizes in billions as published for the released checkpoints (a check on the preset names themselves).
PUBLISHED_BILLIONS = {"qwen2_5_vl_3b": (3.5, 4.0), "qwen2_5_vl_7b": (8.0, 8.5), "qwen3_vl_2b": (2.0, 2.5),
                      "qwen3_vl_4b": (4.0, 5.0), "qwen3_vl_8b": (8.5, 9.0)}


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if "tiny" in n else [pytest.mark.slow])
                                  for n in sorted(C.PRESETS)])
def test_parameter_count_equals_hf(name):
    cfg = C.preset(name)
    ours = our_count(cfg)
    assert ours == hf_count(cfg)
    if name in PUBLISHED_BILLIONS:
        low, high = PUBLISHED_BILLIONS[name]
        assert low < ours / 1e9 < high, ours
