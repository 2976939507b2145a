"""GRPO against a plain-loop numpy reference: advantages, loss, gradient signs, clipping, KL, config errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax.rl import grpo

def _reference_advantages(rewards, g, eps=1e-6):
    out = []
    for start in range(0, len(rewards), g):
        group = [float(r) for r in rewards[start:start + g]]
        mean = sum(group) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (g - 1))  # sample std
        out += [(r - mean) / (std + eps) for r in group]
    return out


def _reference_loss(logp, old, ref, adv, mask, eps_low, eps_high, kl_coef):
    total_pg = total_kl = 0.0
    count = 0
    n_low = n_high = 0
    for i in range(len(logp)):
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
            total_pg += -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][t] - logp[i][t]
            total_kl += math.exp(d) - d - 1
            n_low += ratio < 1 - eps_low and adv[i] < 0
            n_high += ratio > 1 + eps_high and adv[i] > 0
            count += 1
    return {"pg_loss": total_pg / count, "kl": total_kl / count,
            "loss": total_pg / count + kl_coef * total_kl / count,
            "clip_frac_low": n_low / count, "clip_frac_high": n_high / count}


def _batch(seed=0, n=6, t=5):
    rng = np.random.default_rng(seed)
    logp = rng.uniform(-3, -0.1, (n, t))
    old = logp + rng.normal(0, 0.3, (n, t))  # ratios spread across both clip edges
    ref = logp + rng.normal(0, 0.5, (n, t))
    mask = np.zeros((n, t), np.float32)
    for i, length in enumerate(rng.integers(1, t + 1, n)):
        mask[i, :length] = 1
    rewards = rng.uniform(0, 1, n)
    return logp, old, ref, mask, rewards


def test_advantages_equal_loop_reference():
    rewards = np.array([0.1, 0.5, 0.9, 0.2, 1.0, 1.0, 1.0, 1.0, 0.0, 0.3, 0.3, 0.7])
    got = grpo.group_advantages(rewards, 4)
    np.testing.assert_allclose(np.asarray(got), _reference_advantages(rewards, 4), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[4:8] == 0)  # equal rewards: no signal, no blow-up
    # ddof=1 matters: population std would give a larger magnitude.
    pop = (rewards[:4] - rewards[:4].mean()) / (rewards[:4].std() + 1e-6)
    assert not np.allclose(np.asarray(got)[:4], pop)
    mean_only = grpo.group_advantages(rewards, 4, scale_by_std=False)
    np.testing.assert_allclose(np.asarray(mean_only)[:4], rewards[:4] - rewards[:4].mean(), atol=1e-6)


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        grpo.group_advantages(np.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        grpo.group_advantages(np.zeros(6), 1)


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_loss_equals_loop_reference(kl_coef):
    logp, old, ref, mask, rewards = _batch()
    adv = np.asarray(grpo.group_advantages(rewards, 3))
    cfg = grpo.GRPOConfig(eps_low=0.2, eps_high=0.28, kl_coef=kl_coef)
    loss, m = grpo.grpo_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                             cfg, ref_logp=jnp.asarray(ref) if kl_coef else None)
    want = _reference_loss(logp, old, ref, adv, mask, 0.2, 0.28, kl_coef)
    assert 0 < want["clip_frac_low"] + want["clip_frac_high"] < 1  # the batch exercises clipping
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5)
    np.testing.assert_allclose(float(m["pg_loss"]), want["pg_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(m["kl"]), want["kl"] if kl_coef else 0.0, rtol=1e-5)
    np.testing.assert_allclose(float(m["clip_frac_low"]), want["clip_frac_low"])
    np.testing.assert_allclose(float(m["clip_frac_high"]), want["clip_frac_high"])
    assert float(m["num_tokens"]) == mask.sum()
    ratios = [math.exp(logp[i, t] - old[i, t]) for i in range(6) for t in range(5) if mask[i, t]]
    np.testing.assert_allclose(float(m["ratio_mean"]), np.mean(ratios), rtol=1e-5)
    np.testing.assert_allclose(float(m["adv_mean"]), adv.mean(), atol=1e-6)
    np.testing.assert_allclose(float(m["adv_max"]), adv.max(), rtol=1e-6)


def test_token_level_averaging_weights_long_answers_per_token():
    # Two completions, same advantage sign, lengths 1 and 3: each token counts once (sum / 4).
    logp = jnp.zeros((2, 3))
    mask = jnp.array([[1.0, 0, 0], [1, 1, 1]])
    loss, _ = grpo.grpo_loss(logp, logp, jnp.array([1.0, 2.0]), mask)
    np.testing.assert_allclose(float(loss), -(1 * 1 + 2 * 3) / 4)


def test_gradient_signs():
    logp = jnp.log(jnp.full((2, 3), 0.5))
    mask = jnp.ones((2, 3))
    adv = jnp.array([1.0, -1.0])
    grad = jax.grad(lambda lp: grpo.grpo_loss(lp, logp, adv, mask)[0])(logp)
    # Descending the loss raises log-probs of a positive-advantage completion, lowers the other.
    assert np.all(np.asarray(grad[0]) < 0) and np.all(np.asarray(grad[1]) > 0)
    # A step of gradient descent increases the surrogate objective.
    stepped = logp - 0.1 * grad
    before = float(grpo.grpo_loss(logp, logp, adv, mask)[0])
    assert float(grpo.grpo_loss(stepped, logp, adv, mask)[0]) < before


def test_clipped_tokens_get_no_gradient_and_masked_tokens_none():
    old = jnp.zeros((1, 4))
    # ratios e^0.5 (above 1.28, A>0: clipped), e^-0.5 (below 0.8 but A>0: not clipped), 1, masked junk.
    logp = jnp.array([[0.5, -0.5, 0.0, 123.0]])
    mask = jnp.array([[1.0, 1, 1, 0]])
    loss, m = grpo.grpo_loss(logp, old, jnp.array([1.0]), mask)
    grad = np.asarray(jax.grad(lambda lp: grpo.grpo_loss(lp, old, jnp.array([1.0]), mask)[0])(logp))
    assert grad[0, 0] == 0 and grad[0, 1] < 0 and grad[0, 2] < 0 and grad[0, 3] == 0
    assert float(m["clip_frac_high"]) == pytest.approx(1 / 3) and float(m["clip_frac_low"]) == 0
    assert np.isfinite(float(loss))


def test_kl_pulls_towards_reference():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    cfg = grpo.GRPOConfig(kl_coef=1.0)
    grad = jax.grad(lambda lp: grpo.grpo_loss(lp, lp, jnp.zeros(1), jnp.ones((1, 2)), cfg, ref)[0])(logp)
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent moves logp towards ref
    _, m = grpo.grpo_loss(ref, ref, jnp.zeros(1), jnp.ones((1, 2)), cfg, ref)
    assert float(m["kl"]) == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, logp, jnp.zeros(1), jnp.ones((1, 2)), cfg)


def test_entropy_metric_and_jit():
    logp, old, ref, mask, rewards = _batch(1)
    adv = grpo.group_advantages(rewards, 2)
    ent = np.random.default_rng(3).uniform(0, 2, logp.shape)
    fn = jax.jit(lambda *a: grpo.grpo_loss(*a, grpo.GRPOConfig(kl_coef=0.01), ref, ent))
    _, m = fn(logp, old, adv, mask)
    np.testing.assert_allclose(float(m["entropy"]), ent[mask > 0].mean(), rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="GRPOConfig.eps_high"):
        grpo.GRPOConfig(eps_high=-0.1)
    with pytest.raises(ValueError, match="GRPOConfig.kl_coef"):
        grpo.GRPOConfig(kl_coef=float("nan"))
