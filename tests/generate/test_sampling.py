"""The batched KV-cache sampler and the teacher-forced scorer, against HF transformers.

Oracles: HF `generate()` (greedy, left padding, per-row EOS) and HF's own forward + log-softmax for
log-probs and entropies, on random tiny models of both families saved with `save_pretrained` and loaded
with `hf_io`; HF's `get_rope_index` for positions; brute-force frequencies / numpy for the token filters.
The models are UNTIED: a tied random tiny model just repeats its last input token (logits = e_t . E), so
greedy output would not depend on positions; untied ones produce varied sequences.
"""
import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dig_jax.generate import batch as prompting
from dig_jax.generate import sampler as S
from dig_jax.generate import scoring
from dig_jax.models import hf_io
from dig_jax.models.vlm import QwenVL

_ORACLE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "models", "hf_oracle.py")
_spec = importlib.util.spec_from_file_location("hf_oracle", _ORACLE)
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

# Row 0: two images of different sizes; row 1: one larger image. The rows get different rope deltas.
GRIDS = [[(1, 4, 8), (1, 4, 4)], [(1, 8, 8)]]
T = 12


@dataclasses.dataclass
class Setup:
    cfg: object
    hf: object
    model: QwenVL
    raw: object  # oracle.Batch: HF-style left-padded host arrays
    batch: prompting.PromptBatch


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def setup(request, tmp_path_factory) -> Setup:
    cfg = oracle.tiny_cfg(request.param, tie=False)
    hf = oracle.hf_model(cfg)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model = hf_io.load_hf_checkpoint(str(path))
    raw = oracle.make_batch(cfg, GRIDS)
    batch = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                         length_multiple=32)
    return Setup(cfg, hf, model, raw, batch)


def hf_generate(s: Setup, eos: int) -> np.ndarray:
    ids = torch.tensor(s.raw.input_ids)
    with torch.no_grad():
        out = s.hf.generate(input_ids=ids, attention_mask=torch.tensor(s.raw.attention_mask),
                            pixel_values=torch.tensor(s.raw.pixel_values), image_grid_thw=torch.tensor(s.raw.grids),
                            mm_token_type_ids=(ids == s.cfg.image_token_id).int(), max_new_tokens=T,
                            do_sample=False, eos_token_id=eos, pad_token_id=s.cfg.pad_token_id)
    return out[:, ids.shape[1]:].numpy()


def hf_completion_logprobs(s: Setup, completions: np.ndarray, mask: np.ndarray):
    """HF teacher forcing: its own positions (get_rope_index over the concatenation) and full logits."""
    ids = torch.tensor(np.concatenate([s.raw.input_ids, completions], axis=1))
    attn = torch.tensor(np.concatenate([s.raw.attention_mask, mask], axis=1))
    with torch.no_grad():
        logits = s.hf(input_ids=ids, attention_mask=attn, pixel_values=torch.tensor(s.raw.pixel_values),
                      image_grid_thw=torch.tensor(s.raw.grids),
                      mm_token_type_ids=(ids == s.cfg.image_token_id).int()).logits.double()
    lp_all = torch.log_softmax(logits[:, s.raw.input_ids.shape[1] - 1:-1], dim=-1)
    lp = torch.gather(lp_all, -1, torch.tensor(completions, dtype=torch.long)[..., None])[..., 0]
    ent = -(lp_all.exp() * lp_all).sum(-1)
    return lp.numpy() * mask, ent.numpy() * mask


def greedy(max_new=T, **kw) -> S.SamplingConfig:
    return S.SamplingConfig(max_new_tokens=max_new, temperature=0.0, **kw)


# ----------------------------------------------------------------------------------------------------
# Generation against HF generate()
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_greedy_matches_hf_generate_and_uses_per_row_rope_deltas(setup):
    s = setup
    want = hf_generate(s, eos=s.cfg.eos_token_id)
    assert want.shape == (2, T) and len(set(want[0].tolist())) > 3, "degenerate oracle: pick another seed"
    out = S.generate(s.model, s.batch, jax.random.key(0), greedy(eos_token_ids=(s.cfg.eos_token_id,)))
    np.testing.assert_array_equal(np.asarray(out.tokens), want)
    np.testing.assert_array_equal(np.asarray(out.lengths), [T, T])
    assert np.asarray(out.completion_mask).all()
    assert not np.asarray(out.sampling_logprobs).any()  # greedy: a point mass

    # The two rows carry different rope deltas, and they are HF's.
    ids = torch.tensor(s.raw.input_ids)
    _, hf_deltas = s.hf.model.get_rope_index(ids, (ids == s.cfg.image_token_id).int(), torch.tensor(s.raw.grids),
                                             attention_mask=torch.tensor(s.raw.attention_mask))
    np.testing.assert_array_equal(s.batch.rope_deltas, hf_deltas.numpy())
    assert s.batch.rope_deltas[0, 0] != s.batch.rope_deltas[1, 0]

    # Negative control: the deltas are really used (the same call with zero deltas decodes differently).
    zeroed = dataclasses.replace(s.batch, rope_deltas=np.zeros_like(s.batch.rope_deltas))
    wrong = S.generate(s.model, zeroed, jax.random.key(0), greedy(eos_token_ids=(s.cfg.eos_token_id,)))
    assert np.abs(np.asarray(wrong.logprobs)[:, 1:] - np.asarray(out.logprobs)[:, 1:]).max() > 1e-3


@pytest.mark.slow
def test_per_row_eos_stop_matches_hf(setup):
    s = setup
    free = hf_generate(s, eos=s.cfg.eos_token_id)
    # An EOS that row 0 emits mid-way and row 1 never emits: row 0 stops, row 1 runs to T.
    candidates = [(k, t) for k, t in enumerate(free[0]) if k > 0 and t not in free[1] and t not in free[0][:k]]
    assert candidates, "no usable forced-EOS token in this oracle's output"
    k_stop, eos = candidates[0]
    want = hf_generate(s, eos=int(eos))
    out = S.generate(s.model, s.batch, jax.random.key(0), greedy(eos_token_ids=(int(eos),)))
    tokens, lps = np.asarray(out.tokens), np.asarray(out.logprobs)
    np.testing.assert_array_equal(tokens, want)
    np.testing.assert_array_equal(np.asarray(out.lengths), [k_stop + 1, T])
    np.testing.assert_array_equal(np.asarray(out.completion_mask)[0], np.arange(T) <= k_stop)
    assert (tokens[0, k_stop + 1:] == s.cfg.pad_token_id).all() and tokens[0, k_stop] == eos
    assert (lps[0, k_stop + 1:] == 0).all() and (lps[0, :k_stop + 1] < 0).all()
    assert int(out.steps) == T  # row 1 kept the decode loop going to the cap


@pytest.mark.slow
def test_decode_loop_stops_once_every_row_has_ended(setup):
    """With EOS ids that both rows emit early, the loop runs only as many steps as the longest row."""
    s = setup
    free = hf_generate(s, eos=s.cfg.eos_token_id)
    eos = (int(free[0][2]), int(free[1][3]))
    ends = [next(k for k, t in enumerate(row) if t in eos) + 1 for row in free]  # HF's trajectories until EOS
    out = S.generate(s.model, s.batch, jax.random.key(0), greedy(eos_token_ids=eos))
    np.testing.assert_array_equal(np.asarray(out.lengths), ends)
    assert int(out.steps) == max(ends) < T
    np.testing.assert_array_equal(np.asarray(out.tokens)[np.asarray(out.completion_mask) == 1],
                                  free[np.arange(T)[None] < np.array(ends)[:, None]])


@pytest.mark.slow
def test_sampled_logprobs_equal_scorer_and_hf_teacher_forcing(setup):
    s = setup
    sampling = S.SamplingConfig(max_new_tokens=T, temperature=1.0, top_k=64, top_p=0.9,
                                eos_token_ids=(s.cfg.eos_token_id,))
    out = S.generate(s.model, s.batch, jax.random.key(3), sampling)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.completion_mask)
    lp, ent = scoring.score_completions_jit(s.model, s.batch, tokens, mask, chunk=5, with_entropy=True)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(lp), atol=1e-5)
    want_lp, want_ent = hf_completion_logprobs(s, tokens, mask)
    np.testing.assert_allclose(np.asarray(lp), want_lp, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ent), want_ent, atol=2e-5)
    # Renormalising over a truncated candidate set only raises a token's probability (temperature 1).
    assert (np.asarray(out.sampling_logprobs) >= np.asarray(out.logprobs) - 1e-6).all()


# ----------------------------------------------------------------------------------------------------
# Group repetition, top-k = 1, compile-once
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_group_sampling_equals_explicitly_repeated_prompts():
    """G copies via feature_index (vision tower once per image) == prompts and pixels repeated by hand."""
    cfg = oracle.tiny_cfg("qwen3_vl", tie=False)  # Qwen3: DeepStack features must be gathered too
    model = QwenVL(cfg, rngs=nnx.Rngs(1))
    raw = oracle.make_batch(cfg, GRIDS, seed=1)
    g = 2
    grouped = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                           group_size=g, length_multiple=32)
    # By hand: every row and its images repeated, then built with group_size=1.
    rows = np.repeat(np.arange(2), g)
    per_row = [[0, 1], [2]]
    offsets = np.concatenate([[0], np.cumsum(np.prod(raw.grids, axis=1))])
    imgs = [i for r in rows for i in per_row[r]]
    manual = prompting.build_prompt_batch(cfg, raw.input_ids[rows], raw.attention_mask[rows], raw.grids[imgs],
                                          np.concatenate([raw.pixel_values[offsets[i]:offsets[i + 1]] for i in imgs]),
                                          length_multiple=32)
    assert grouped.pixel_values.shape[0] < manual.pixel_values.shape[0]  # fewer patches through the tower
    np.testing.assert_array_equal(grouped.position_ids, manual.position_ids)
    sampling = greedy(max_new=4)
    a = S.generate(model, grouped, jax.random.key(0), sampling)
    b = S.generate(model, manual, jax.random.key(0), sampling)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.tokens)[0], np.asarray(a.tokens)[1])  # copies of one prompt


@pytest.mark.slow
def test_scorer_equals_cached_decoding_even_for_sampled_image_pad_tokens():
    """A completion may contain the image-pad id (a policy can sample it). While decoding, it is an
    ordinary token; the teacher-forced scorer must treat it the same. Reference: the model's own
    prefill (pixel path, no feature_index) + `decode` steps at `next_position_ids`."""
    from dig_jax.models.vlm import init_cache, next_position_ids

    cfg = oracle.tiny_cfg("qwen3_vl", tie=False)
    model = QwenVL(cfg, rngs=nnx.Rngs(4))
    raw = oracle.make_batch(cfg, GRIDS, seed=2)
    batch = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                         length_multiple=32)
    comp = np.array([[17, cfg.image_token_id, 23, 5], [cfg.image_token_id, 9, cfg.image_token_id, 2]], np.int32)
    got, _ = scoring.score_completions_jit(model, batch, comp, np.ones_like(comp))

    @nnx.jit
    def cached(model, comp):
        lp = batch.input_ids.shape[1]
        cache = init_cache(cfg, 2, lp + comp.shape[1], jnp.float32)
        logits, cache = model.forward(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                                      jnp.asarray(batch.position_ids), jnp.asarray(batch.pixel_values),
                                      batch.vision, cache=cache, cache_index=0)
        out = [jax.nn.log_softmax(logits[:, -1])]
        for k in range(comp.shape[1] - 1):
            pos = next_position_ids(cache, jnp.asarray(batch.rope_deltas))
            logits, cache = model.decode(comp[:, k:k + 1], pos, cache, lp + k)
            out.append(jax.nn.log_softmax(logits[:, 0]))
        lp_all = jnp.stack(out, axis=1)  # [B, T, V]
        return jnp.take_along_axis(lp_all, comp[..., None], axis=-1)[..., 0]

    want = cached(model, jnp.asarray(comp))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def text_prompts(cfg, lengths, seed=0):
    """Right-padded text-only prompts of the given lengths (build_prompt_batch re-packs them)."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), cfg.pad_token_id)
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n], mask[r, :n] = rng.integers(0, 1000, n), 1
    return ids, mask


@pytest.mark.slow
def test_top_k_one_equals_greedy_and_compiles_once_per_bucket():
    cfg = oracle.tiny_cfg("qwen2_5_vl", tie=False)
    model = QwenVL(cfg, rngs=nnx.Rngs(2))
    sampling = S.SamplingConfig(max_new_tokens=5, temperature=0.7, top_k=1)
    short, longer, other_bucket = (prompting.build_prompt_batch(cfg, *text_prompts(cfg, n), length_multiple=32)
                                   for n in ([3, 7], [20, 31], [5, 40]))
    assert short.input_ids.shape == longer.input_ids.shape != other_bucket.input_ids.shape
    before = S.TRACE_COUNTS["generate"]
    outs = [S.generate(model, b, jax.random.key(i), sampling) for i, b in enumerate([short, longer])]
    assert S.TRACE_COUNTS["generate"] - before == 1  # two prompt lengths, one bucket, one trace
    S.generate(model, other_bucket, jax.random.key(0), sampling)
    assert S.TRACE_COUNTS["generate"] - before == 2

    # top-k = 1 at any temperature is greedy decoding.
    greedy_out = S.generate(model, longer, jax.random.key(9), greedy(max_new=5))
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(greedy_out.tokens))
    np.testing.assert_allclose(np.asarray(outs[1].logprobs), np.asarray(greedy_out.logprobs), atol=1e-6)


@pytest.mark.slow
def test_chunked_scorer_value_and_gradient_equal_full_logits():
    """The GRPO path (chunked, rematerialised log-softmax at completion positions only) against a plain
    log_softmax over the model's full logits with host get_rope_index positions over the concatenation."""
    from dig_jax.models.vlm import prepare_inputs

    cfg = oracle.tiny_cfg("qwen3_vl", tie=True)
    model = QwenVL(cfg, rngs=nnx.Rngs(3))
    batch = prompting.build_prompt_batch(cfg, *text_prompts(cfg, [4, 9]), length_multiple=16)
    comp = np.random.default_rng(1).integers(0, 1000, (2, 6)).astype(np.int32)
    comp_mask = np.array([[1] * 6, [1] * 3 + [0] * 3], np.int32)

    def ours(m):
        lp, _ = scoring.score_completions(m, batch, comp, comp_mask, chunk=4)
        return lp.sum(), lp

    ids = np.concatenate([batch.input_ids, comp], axis=1)
    attn = np.concatenate([batch.attention_mask, comp_mask], axis=1)
    pos, _, _ = prepare_inputs(cfg, ids, attn, None)
    lp_len = batch.input_ids.shape[1]

    def reference(m):
        logits, _ = m.forward(jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(pos))
        lp_all = jax.nn.log_softmax(logits[:, lp_len - 1:-1], axis=-1)
        lp = jnp.take_along_axis(lp_all, jnp.asarray(comp)[..., None], axis=-1)[..., 0] * comp_mask
        return lp.sum(), lp

    (_, lp1), g1 = nnx.jit(nnx.value_and_grad(ours, has_aux=True))(model)
    (_, lp2), g2 = nnx.jit(nnx.value_and_grad(reference, has_aux=True))(model)
    np.testing.assert_allclose(np.asarray(lp1), np.asarray(lp2), atol=1e-5)
    assert (np.asarray(lp1)[1, 3:] == 0).all()
    flat1, flat2 = jax.tree.leaves(g1), jax.tree.leaves(g2)
    assert len(flat1) == len(flat2) > 0
    for a, b in zip(flat1, flat2):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Positions, host-side batch building
# ----------------------------------------------------------------------------------------------------

def test_scorer_positions_equal_hf_rope_index_over_prompt_plus_completion(setup):
    s = setup
    comp = np.random.default_rng(0).integers(0, 1000, (2, 7))
    comp_mask = np.ones_like(comp)
    comp_mask[1, 4:] = 0  # a row that stopped early
    ids = np.concatenate([s.batch.input_ids, comp], axis=1)
    attn = np.concatenate([s.batch.attention_mask, comp_mask], axis=1)
    t_ids = torch.tensor(ids)
    want, _ = s.hf.model.get_rope_index(t_ids, (t_ids == s.cfg.image_token_id).int(), torch.tensor(s.raw.grids),
                                        attention_mask=torch.tensor(attn))
    want = want.numpy()[-3:]  # HF 5.24 may prepend a text-position row; the last three are T, H, W
    got = np.concatenate([s.batch.position_ids,
                          np.asarray(S.decode_positions(jnp.asarray(s.batch.attention_mask),
                                                        jnp.asarray(s.batch.rope_deltas), comp.shape[1]))], axis=2)
    valid = attn.astype(bool)
    np.testing.assert_array_equal(got[:, valid], want[:, valid])


def test_build_prompt_batch_repacks_right_padding_and_names_bad_rows():
    cfg = oracle.tiny_cfg("qwen2_5_vl")
    raw = oracle.make_batch(cfg, GRIDS)
    left = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                        length_multiple=16)
    # The same prompts right-padded give the identical (left-padded) batch.
    right_ids = np.full_like(raw.input_ids, cfg.pad_token_id)
    right_mask = np.zeros_like(raw.attention_mask)
    for r in range(2):
        valid = raw.input_ids[r][raw.attention_mask[r] == 1]
        right_ids[r, :len(valid)], right_mask[r, :len(valid)] = valid, 1
    right = prompting.build_prompt_batch(cfg, right_ids, right_mask, raw.grids, raw.pixel_values, length_multiple=16)
    for f in ("input_ids", "attention_mask", "position_ids", "rope_deltas", "pixel_values", "feature_index"):
        np.testing.assert_array_equal(getattr(left, f), getattr(right, f), err_msg=f)
    assert left.input_ids.shape[1] % 16 == 0 and (left.attention_mask[:, -1] == 1).all()

    with pytest.raises(ValueError, match=r"row 0, image 1: 4 image-pad tokens but image_grid_thw\[1\]"):
        bad = raw.grids.copy()
        bad[1] = (1, 4, 8)  # row 0's second image holds 4 tokens; this grid would give 8
        prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, bad, np.zeros((int(bad.prod(1).sum()), 1176)))
    with pytest.raises(ValueError, match="3 image-pad runs .* image_grid_thw has 2 images"):
        prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids[:2], raw.pixel_values)


# ----------------------------------------------------------------------------------------------------
# Token filters on controlled distributions
# ----------------------------------------------------------------------------------------------------

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


def _draw(sampling, n=4000, probs=PROBS):
    logits = jnp.log(jnp.asarray(np.tile(probs, (n, 1)), jnp.float32))
    tok, slp = S.sample_tokens(logits, jax.random.key(0), sampling)
    return np.asarray(tok), np.asarray(slp)


def _check_frequencies(tok, expected):
    freq = np.bincount(tok, minlength=len(expected)) / len(tok)
    np.testing.assert_allclose(freq, expected, atol=4 * np.sqrt(0.25 / len(tok)))


def test_top_p_never_leaves_the_nucleus_and_renormalises():
    # Mass before each token: 0, .4, .65, .8, .9, .96 -> top_p 0.7 keeps tokens 0, 1, 2.
    tok, slp = _draw(S.SamplingConfig(1, temperature=1.0, top_p=0.7))
    assert set(np.unique(tok)) == {0, 1, 2}
    nucleus = PROBS[:3] / PROBS[:3].sum()
    _check_frequencies(tok, np.r_[nucleus, 0, 0, 0])
    np.testing.assert_allclose(slp, np.log(nucleus)[tok], atol=1e-5)
    # The same nucleus through the top-k candidate path.
    tok_k, slp_k = _draw(S.SamplingConfig(1, temperature=1.0, top_k=5, top_p=0.7))
    assert set(np.unique(tok_k)) <= {0, 1, 2}
    np.testing.assert_allclose(slp_k, np.log(nucleus)[tok_k], atol=1e-5)
    # The most likely token survives any top_p.
    assert set(np.unique(_draw(S.SamplingConfig(1, top_p=0.01))[0])) == {0}


def test_top_k_and_temperature_follow_the_scaled_distribution():
    tok, slp = _draw(S.SamplingConfig(1, temperature=1.0, top_k=2))
    _check_frequencies(tok, np.r_[PROBS[:2] / PROBS[:2].sum(), 0, 0, 0, 0])
    hot = PROBS ** 0.5 / (PROBS ** 0.5).sum()  # temperature 2 on log-probs
    tok, slp = _draw(S.SamplingConfig(1, temperature=2.0))
    _check_frequencies(tok, hot)
    np.testing.assert_allclose(slp, np.log(hot)[tok], atol=1e-5)


def test_top_k_one_and_greedy_pick_the_argmax():
    logits = jax.random.normal(jax.random.key(1), (64, 1000))
    want = np.asarray(jnp.argmax(logits, -1))
    for sampling in (S.SamplingConfig(1, temperature=0.0), S.SamplingConfig(1, temperature=1.3, top_k=1)):
        tok, slp = S.sample_tokens(logits, jax.random.key(2), sampling)
        np.testing.assert_array_equal(np.asarray(tok), want)
        np.testing.assert_allclose(np.asarray(slp), 0.0, atol=1e-6)


def test_sampling_config_names_the_bad_field():
    with pytest.raises(ValueError, match="SamplingConfig.top_p"):
        S.SamplingConfig(4, top_p=0.0)
    with pytest.raises(ValueError, match="SamplingConfig.eos_token_ids"):
        S.SamplingConfig(4, eos_token_ids=151645)


@pytest.mark.slow
def test_sharded_scoring_places_image_features_per_row():
    """On 8 devices (fsdp=4 x tensor=2) the scorer, whose image features reach the decoder gathered per
    token slot and sharded over the batch (`PlacedImageFeatures`), equals the single-device scorer."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from dig_jax import sharding as shd

    cfg = oracle.tiny_cfg("qwen3_vl", tie=False)  # DeepStack levels are placed too
    raw = oracle.make_batch(cfg, GRIDS, seed=3)
    batch = prompting.build_prompt_batch(cfg, raw.input_ids, raw.attention_mask, raw.grids, raw.pixel_values,
                                         group_size=4, length_multiple=32)  # 8 rows: 2 per batch shard
    comp = np.random.default_rng(0).integers(0, 1000, (8, 16)).astype(np.int32)
    comp[1, 3] = cfg.image_token_id  # a sampled image-pad id stays text
    mask = np.ones_like(comp)
    model = QwenVL(cfg, rngs=nnx.Rngs(5))
    want, _ = scoring.score_completions_jit(model, batch, comp, mask)

    mesh = shd.make_mesh((1, 4, 2))
    sharded_model = shd.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(5)), mesh)
    graphdef, state = nnx.split(sharded_model)
    rows = shd.data_sharding(mesh, 2)
    placed = dataclasses.replace(
        batch, input_ids=jax.device_put(batch.input_ids, rows), attention_mask=jax.device_put(batch.attention_mask, rows),
        position_ids=jax.device_put(batch.position_ids, NamedSharding(mesh, P(None, ("data", "fsdp")))),
        rope_deltas=jax.device_put(batch.rope_deltas, rows), feature_index=jax.device_put(batch.feature_index, rows))

    def score(state, batch, comp, mask):
        return scoring.score_completions(nnx.merge(graphdef, state), batch, comp, mask)[0]

    with shd.activate(mesh):
        compiled = jax.jit(score).lower(state, placed, jax.device_put(comp, rows), jax.device_put(mask, rows)).compile()
    got = compiled(state, placed, jax.device_put(comp, rows), jax.device_put(mask, rows))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
