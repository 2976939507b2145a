"""SFT loss masking, host target building, and the chunked scorer against full log_softmax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dig_jax import sft


def _rand(key, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)


# ------------------------------------------------------------------------------------- host targets
def test_build_sft_targets_shift_and_mask():
    out = sft.build_sft_targets([[1, 2, 3], [7]], [[10, 11], [20, 21, 22]], max_len=6, pad_id=0)
    np.testing.assert_array_equal(out["input_ids"], [[1, 2, 3, 10, 11, 0], [7, 20, 21, 22, 0, 0]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[2, 3, 10, 11, 0, 0], [20, 21, 22, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    # Exactly the answer tokens are supervised, each once.
    for i, answer in enumerate([[10, 11], [20, 21, 22]]):
        assert out["targets"][i][out["loss_mask"][i] > 0].tolist() == answer


def test_build_sft_targets_errors_name_the_sample():
    with pytest.raises(ValueError, match="sample 1 .* max_len 4"):
        sft.build_sft_targets([[1], [1, 2, 3]], [[2], [4, 5]], max_len=4, pad_id=0)
    with pytest.raises(ValueError, match="sample 0 has an empty answer"):
        sft.build_sft_targets([[1]], [[]], max_len=4, pad_id=0)


# -------------------------------------------------------------------------------------------- loss
def _loss_setup():
    prompt = [[5, 6, 7, 8, 9], [5, 6, 7]]
    answer = [[1, 2], [3, 4, 1]]
    batch = sft.build_sft_targets(prompt, answer, max_len=8, pad_id=0)
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
    scored = sft.sft_loss(lambda t: sft.token_logprobs(hidden, w, t, chunk_size=4),
                          batch["targets"], batch["loss_mask"])[0]
    np.testing.assert_allclose(float(scored), float(full), rtol=1e-6)


def test_empty_mask_gives_zero_loss_not_nan():
    loss, m = sft.sft_loss(_rand(0, (1, 3, 5)), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3)))
    assert float(loss) == 0.0 and float(m["num_tokens"]) == 0


# ---------------------------------------------------------------------------------- chunked scorer
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_chunked_logprobs_and_entropy_equal_full(chunk_size, layout):
    b, l, d, v = 2, 5, 8, 50
    hidden = _rand(5, (b, l, d), 2.0)
    w = _rand(6, (d, v), 2.0)
    targets = jax.random.randint(jax.random.key(7), (b, l), 0, v).at[0, 0].set(v - 1).at[0, 1].set(0)
    head = w if layout == "dv" else w.T
    logits = jnp.einsum("bld,dv->blv", hidden, w)
    want_lp = jax.nn.log_softmax(logits, -1)
    want = jnp.take_along_axis(want_lp, targets[..., None], -1)[..., 0]
    want_ent = -jnp.sum(jnp.exp(want_lp) * want_lp, -1)
    got = sft.token_logprobs(hidden, head, targets, chunk_size=chunk_size)
    got_ent = sft.entropy(hidden, head, chunk_size=chunk_size)
    both = sft.token_logprobs_and_entropy(hidden, head, targets, chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_ent), np.asarray(want_ent), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(both[1]), np.asarray(want_ent), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(sft.logits_entropy(logits)), np.asarray(want_ent), rtol=1e-5)


def test_chunked_gradients_equal_full():
    b, l, d, v = 2, 4, 6, 37
    hidden, w = _rand(8, (b, l, d)), _rand(9, (v, d))  # tied-embedding layout
    targets = jax.random.randint(jax.random.key(10), (b, l), 0, v)
    coef = _rand(11, (b, l))

    def full(h, e):
        lp = sft.logits_token_logprobs(jnp.einsum("bld,vd->blv", h, e), targets)
        ent = sft.logits_entropy(jnp.einsum("bld,vd->blv", h, e))
        return jnp.sum(coef * lp) + 0.3 * jnp.sum(ent)

    def chunked(h, e):
        lp, ent = sft.token_logprobs_and_entropy(h, e, targets, chunk_size=8)
        return jnp.sum(coef * lp) + 0.3 * jnp.sum(ent)

    g_full = jax.grad(full, argnums=(0, 1))(hidden, w)
    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    for a, b_ in zip(g_chunk, g_full):
        assert np.all(np.isfinite(np.asarray(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    hidden = _rand(12, (1, 3, 16)).astype(jnp.bfloat16)
    w = _rand(13, (16, 40)).astype(jnp.bfloat16)
    targets = jnp.array([[0, 5, 39]])
    got = sft.token_logprobs(hidden, w, targets, chunk_size=16)
    assert got.dtype == jnp.float32
    ref = sft.logits_token_logprobs(
        jnp.einsum("bld,dv->blv", hidden.astype(jnp.float32), w.astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_ambiguous_square_head_needs_layout():
    hidden, w = _rand(14, (1, 2, 4)), _rand(15, (4, 4))
    with pytest.raises(ValueError, match="ambiguous"):
        sft.token_logprobs(hidden, w, jnp.zeros((1, 2), jnp.int32))
    a = sft.token_logprobs(hidden, w, jnp.zeros((1, 2), jnp.int32), layout="dv")
    b = sft.token_logprobs(hidden, w.T, jnp.zeros((1, 2), jnp.int32), layout="vd")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
