"""The optimiser: frozen vision tower gets exactly zero updates; accumulation equals one big batch."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dig_jax.models import config as C
from dig_jax.models.vlm import QwenVL
from dig_jax.training.optim import learning_rate_schedule, make_optimizer, parameter_labels


def _params():
    model = QwenVL(C.qwen3_vl_tiny(vocab_size=256), rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)[1]


def _opt(params, **kw):
    args = dict(peak_lr=1e-2, total_steps=10, warmup_steps=0, end_fraction=0.1, weight_decay=0.0, b1=0.9,
                b2=0.999, clip_norm=0.0, accum_steps=1, freeze_vision=False)
    args.update(kw)
    return make_optimizer(params, **args)


def test_frozen_vision_tower_does_not_move():
    params = _params()
    labels = parameter_labels(params, freeze_vision=True)
    flat = jax.tree_util.tree_flatten_with_path(labels)[0]
    frozen = [jax.tree_util.keystr(p) for p, label in flat if label == "frozen"]
    assert frozen and all("visual" in name for name in frozen)
    assert any(label == "trainable" for _, label in flat)
    tx = _opt(params, freeze_vision=True)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for (path, old), new_leaf in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new)):
        moved = not np.array_equal(np.asarray(old), np.asarray(new_leaf))
        assert moved != ("visual" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)


def test_accumulation_equals_the_mean_gradient():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    g1, g2 = {"w": jnp.array([0.5, 0.1, -0.3])}, {"w": jnp.array([-0.1, 0.4, 0.2])}
    tx2 = _opt(params, accum_steps=2)
    state = tx2.init(params)
    u1, state = tx2.update(g1, state, params)
    assert np.all(np.asarray(u1["w"]) == 0)  # no update until the second micro-batch
    u2, _ = tx2.update(g2, state, params)
    tx1 = _opt(params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = tx1.update(mean, tx1.init(params), params)
    np.testing.assert_allclose(u2["w"], ref["w"], rtol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    sched = learning_rate_schedule(1.0, total_steps=100, warmup_steps=10, end_fraction=0.1)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 0.1, rtol=1e-6)
    assert float(sched(50)) < 1.0
