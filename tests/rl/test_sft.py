"""SFT loss: masking, the hand-computed value, and the scorer path against the logits path.

The chunked scorer itself (value, gradient, entropy against full logits) is tested with the model in
tests/generate/test_sampling.py.
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.generate.scoring import chunked_token_logprobs
from dig_jax.rl import sft


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


# -------------------------------------------------------------------------------------------- loss
def _teacher_forcing(prompts, answers, max_len, pad_id):
    """Right-padded prompt + answer rows: targets = the row shifted left by one, loss_mask = 1 where the
    target is an answer token (logits at t predict token t + 1)."""
    targets = np.full((len(prompts), max_len), pad_id, np.int32)
    loss_mask = np.zeros((len(prompts), max_len), np.float32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p, a = len(prompt), len(answer)
        targets[i, :p + a - 1] = (list(prompt) + list(answer))[1:]
        loss_mask[i, p - 1:p + a - 1] = 1.0
    return {"targets": targets, "loss_mask": loss_mask}


def _loss_setup():
    prompt = [[5, 6, 7, 8, 9], [5, 6, 7]]
    answer = [[1, 2], [3, 4, 1]]
    batch = _teacher_forcing(prompt, answer, max_len=8, pad_id=0)
    logits = _rand(0, (2, 8, 11), 3.0)
    return batch, logits


def test_sft_loss_matches_hand_computation():
    batch, logits = _loss_setup()
    loss, metrics = sft.sft_loss(logits, batch["targets"], batch["loss_mask"])
    logp = np.asarray(jax.nn.log_softmax(logits, -1), np.float64)
    terms = [-logp[b, t, batch["targets"][b, t]]
             for b in range(2) for t in range(8) if batch["loss_mask"][b, t]]
    assert len(terms) == 5 and float(metrics["num_tokens"]) == 5
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-6)
    argmax_hits = [np.argmax(logp[b, t]) == batch["targets"][b, t]
                   for b in range(2) for t in range(8) if batch["loss_mask"][b, t]]
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(argmax_hits))


def test_sft_loss_ignores_masked_positions():
    batch, logits = _loss_setup()
    mask = jnp.asarray(batch["loss_mask"])
    grad_fn = jax.value_and_grad(lambda lg: sft.sft_loss(lg, batch["targets"], mask)[0])
    loss, grad = grad_fn(logits)
    # Scramble prompt / image / pad positions (large values, a -inf logit): nothing may change.
    junk = _rand(1, logits.shape, 50.0).at[0, 0, 3].set(-jnp.inf)
    scrambled = jnp.where(mask[..., None] > 0, logits, junk)
    loss2, grad2 = grad_fn(scrambled)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(np.asarray(grad2), np.asarray(grad), atol=1e-7)
    assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
    # ... while an answer position does change it.
    b, t = np.argwhere(batch["loss_mask"] > 0)[0]
    assert float(grad_fn(logits.at[b, t].add(_rand(2, (11,), 2.0)))[0]) != pytest.approx(float(loss))


def test_sft_loss_with_scorer_equals_logits_path():
    batch, _ = _loss_setup()
    hidden, w = _rand(3, (2, 8, 6)), _rand(4, (6, 11))
    full = sft.sft_loss(jnp.einsum("bld,dv->blv", hidden, w), batch["targets"], batch["loss_mask"])[0]
    head = types.SimpleNamespace(lm_head_matrix=lambda: w, dtype=jnp.float32)  # what the scorer reads
    scored = sft.sft_loss(lambda t: chunked_token_logprobs(head, hidden, t, chunk=4)[0],
                          batch["targets"], batch["loss_mask"])[0]
    np.testing.assert_allclose(float(scored), float(full), rtol=1e-6)


def test_empty_mask_gives_zero_loss_not_nan():
    loss, m = sft.sft_loss(_rand(0, (1, 3, 5)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))
    assert float(loss) == 0.0 and float(m["num_tokens"]) == 0
