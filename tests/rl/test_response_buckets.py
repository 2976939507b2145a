"""Response-length buckets: the reference scoring and the GRPO update run over the longest answer rounded
up to a bucket, not over the whole `grpo.max_new_tokens`, with the same numbers and one trace per bucket.

Oracle: the same jitted update and reference scoring over the full cap (positions past every answer are
masked out of the loss and invisible to attention, so dropping them must change nothing).
"""
import importlib.util
import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from dig_jax.generate import batch as prompting
from dig_jax.generate import scoring
from dig_jax.generate.batch import Completions
from dig_jax.models.vlm import QwenVL
from dig_jax.rl import grpo
from dig_jax.rl.update import TRACE_COUNTS

_ORACLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "hf_oracle.py")
_spec = importlib.util.spec_from_file_location("hf_oracle", _ORACLE)
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

CAP = 16
TX = optax.adamw(1e-3)  # one object: the optimiser is a static argument of the jitted update
BUCKETS = grpo.response_buckets(CAP, 4)  # (4, 8, 16)


def test_buckets_are_powers_of_two_below_the_cap_then_the_cap():
    assert BUCKETS == (4, 8, 16)
    assert grpo.response_buckets(512, 64) == (64, 128, 256, 512)
    assert grpo.response_buckets(80, 64) == (64, 80)
    assert grpo.response_buckets(2048, 64)[-2:] == (1024, 2048)
    assert grpo.response_buckets(12, 64) == grpo.response_buckets(12, 0) == (12,)
    assert [grpo.bucket_for(n, BUCKETS) for n in (1, 4, 5, 8, 9, 16)] == [4, 4, 8, 8, 16, 16]


@pytest.fixture(scope="module")
def rollout():
    """4 rows (2 prompts x G=2) of a tiny Qwen3-VL and random answers of 3, 7, 5 and 2 tokens."""
    cfg = oracle.tiny_cfg("qwen3_vl", tie=False)
    model = QwenVL(cfg, rngs=nnx.Rngs(7))
    raw = oracle.make_batch(cfg, [[(1, 4, 8), (1, 4, 4)], [(1, 8, 8)]], seed=4)
    prompts = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                           group_size=2, length_multiple=32)
    rng = np.random.default_rng(0)
    lengths = np.array([3, 7, 5, 2])
    tokens = rng.integers(0, 1000, (4, CAP)).astype(np.int32)
    mask = (np.arange(CAP)[None] < lengths[:, None]).astype(np.int32)
    tokens[mask == 0] = cfg.pad_token_id
    old_logp, _ = scoring.score_completions_jit(model, prompts, tokens, mask)
    old_logp = np.asarray(old_logp) + rng.normal(0, 0.1, old_logp.shape) * mask  # ratios away from 1
    ro = grpo.Rollout(prompts, Completions(tokens, mask), old_logp, texts=[""] * 4, scores={},
                      advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32), lengths=lengths, seconds={})
    return model, ro


def _update(model, ro: grpo.Rollout, ref_logp, chunk=4):
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda x: x.copy(), params)  # grpo_step donates its state
    loss = grpo.GRPOConfig(kl_coef=0.05)
    new, _, metrics = grpo.grpo_step(graphdef, TX, params, TX.init(params), ro.prompts, ro.completions, ro.old_logp,
                                     ref_logp, ro.advantages, loss, chunk=chunk)
    return jax.device_get(new), jax.device_get(metrics)


@pytest.mark.slow
def test_bucketed_reference_and_update_equal_the_full_cap(rollout):
    model, ro = rollout
    graphdef, params = nnx.split(model, nnx.Param)
    cut = grpo.truncated(ro, grpo.bucket_for(int(ro.lengths.max()), BUCKETS))
    assert cut.completions.tokens.shape == (4, 8) and cut.old_logp.shape == (4, 8)

    ref_full = grpo.reference_logprobs(graphdef, params, ro.prompts, ro.completions, chunk=4)
    ref_cut = grpo.reference_logprobs(graphdef, params, cut.prompts, cut.completions, chunk=4)
    np.testing.assert_allclose(np.asarray(ref_cut), np.asarray(ref_full)[:, :8], atol=1e-5)
    assert not np.asarray(ref_full)[:, 8:].any()  # nothing was dropped but masked zeros

    params_full, metrics_full = _update(model, ro, ref_full)
    params_cut, metrics_cut = _update(model, cut, ref_cut)
    for key in ("loss", "pg_loss", "kl", "num_tokens", "grad_norm"):
        np.testing.assert_allclose(metrics_cut[key], metrics_full[key], rtol=1e-5, err_msg=key)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(params_cut),
                                 jax.tree_util.tree_leaves_with_path(params_full)):
        np.testing.assert_allclose(a, b, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_the_update_traces_once_per_bucket_as_lengths_vary(rollout):
    model, ro = rollout
    before = TRACE_COUNTS["grpo_step"]
    for longest in (3, 7, 5, 16, 2, 8, 12, 1):
        lengths = np.minimum(ro.lengths, longest)
        lengths[0] = longest
        mask = (np.arange(CAP)[None] < lengths[:, None]).astype(np.int32)
        varied = grpo.Rollout(ro.prompts, Completions(ro.completions.tokens, mask), ro.old_logp * mask, ro.texts,
                              ro.scores, ro.advantages, lengths, ro.seconds)
        cut = grpo.truncated(varied, grpo.bucket_for(longest, BUCKETS))
        _update(model, cut, cut.old_logp, chunk=2)  # a chunk no other test uses: its own compilations
    assert TRACE_COUNTS["grpo_step"] - before == len(BUCKETS)


def test_truncating_below_an_answer_is_refused(rollout):
    _, ro = rollout
    with pytest.raises(ValueError, match="7 tokens, more than the bucket's 4"):
        grpo.truncated(ro, 4)
