"""Text decoder and M-RoPE position ids against HF transformers (the oracle), plus KV-cache consistency.

The decoder is compared with HF's text models on 3D positions where T, H and W differ (text-only
positions cannot tell chunked from interleaved M-RoPE), with left padding, and for Qwen3 with DeepStack
features injected at "visual" positions.
"""
import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx

from dig_jax.models import config as C
from dig_jax.models.rope_index import get_rope_index
from dig_jax.models.text import (TextDecoder, init_text_cache, mrope_axis_of_frequency, text_param_mapping)

VOCAB = 512


def hf_text_config(cfg: C.ModelConfig):
    t = cfg.text
    if cfg.family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLTextConfig as Config
    else:
        from transformers import Qwen3VLTextConfig as Config
    kw = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
              num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
              num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                               "mrope_section": list(t.mrope_section)})
    if cfg.family == "qwen3_vl":
        kw.update(head_dim=t.head_dim, attention_bias=False)
    return Config(**kw)


def hf_text_model(cfg: C.ModelConfig, seed=0):
    if cfg.family == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel as Model
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel as Model
    torch.manual_seed(seed)
    model = Model(hf_text_config(cfg)).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zero: randomise them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from_hf(cfg: C.ModelConfig, hf_model) -> TextDecoder:
    ours = TextDecoder(cfg.text, tie_word_embeddings=True, rngs=nnx.Rngs(0))
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    state = nnx.state(ours, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    for entry in text_param_mapping(cfg.text):  # a stacked parameter holds one HF tensor per layer
        ws = [sd.pop(name) for name in entry.hf_names]
        ws = [w.T if entry.transform == "linear" else w for w in ws]
        flat[entry.path].set_value(jnp.asarray(np.stack(ws) if entry.stacked else ws[0]))
    assert not [k for k in sd if "rotary" not in k], f"unmapped HF tensors: {sorted(sd)}"
    nnx.update(ours, state)
    return ours


def random_positions(rng, b, l, mask):
    """3D positions with T != H != W, increasing along the sequence (as real M-RoPE positions are)."""
    base = np.cumsum(rng.integers(0, 3, size=(b, l)), axis=1)
    pos = np.stack([base, base + rng.integers(0, 5, (b, l)), base + rng.integers(0, 7, (b, l))])
    return np.where(mask[None] > 0, pos, 0).astype(np.int64)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_decoder_matches_hf_with_3d_positions_padding_and_deepstack(family):
    cfg = C.qwen2_5_vl_tiny(VOCAB) if family == "qwen2_5_vl" else C.qwen3_vl_tiny(VOCAB)
    hf = hf_text_model(cfg)
    ours = ours_from_hf(cfg, hf)
    rng = np.random.default_rng(0)
    b, l = 2, 24
    ids = rng.integers(0, VOCAB, (b, l))
    mask = np.ones((b, l), np.int64)
    mask[1, :5] = 0  # left padding
    pos = random_positions(rng, b, l, mask)
    hf_kw = {}
    deepstack = ()
    if family == "qwen3_vl":
        visual = np.zeros((b, l), bool)
        visual[0, 3:9] = True
        visual[1, 10:14] = True
        levels = [rng.normal(size=(int(visual.sum()), cfg.text.hidden_size)).astype(np.float32) for _ in range(2)]
        hf_kw = dict(visual_pos_masks=torch.tensor(visual),
                     deepstack_visual_embeds=[torch.tensor(f) for f in levels])
        dense = []
        for f in levels:
            full = np.zeros((b, l, cfg.text.hidden_size), np.float32)
            full[visual] = f  # row-major order, as HF's boolean-mask assignment
            dense.append(jnp.asarray(full))
        deepstack = tuple(dense)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(pos), **hf_kw).last_hidden_state.numpy()
    got, _ = ours(ours.embed(jnp.asarray(ids)), jnp.asarray(pos), jnp.asarray(mask), deepstack=deepstack)
    got = np.asarray(got)
    valid = mask > 0
    np.testing.assert_allclose(got[valid], want[valid], rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(got))  # padded rows are garbage but never NaN


def test_mrope_frequency_layouts_match_hf_recomposition():
    """Our static axis table reproduces HF's recomposition for both layouts (full-size sections)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    for emb_cls, section, interleaved in [(Qwen2_5_VLRotaryEmbedding, [16, 24, 24], False),
                                          (Qwen3VLTextRotaryEmbedding, [24, 20, 20], True)]:
        emb = emb_cls.__new__(emb_cls)
        emb.mrope_section = section
        # Tag each axis's frequencies with its axis number and let HF recompose them.
        freq = torch.stack([torch.full((1, 1, 64), float(a)) for a in range(3)])
        want = emb.recomposition_frequencies(freq)[0, 0, :64].numpy().astype(int)
        np.testing.assert_array_equal(mrope_axis_of_frequency(section, interleaved), want)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_prefill_then_decode_matches_full_forward(family):
    """Left-padded prefill into a static cache + N single-token steps == one forward over everything."""
    cfg = C.qwen2_5_vl_tiny(VOCAB) if family == "qwen2_5_vl" else C.qwen3_vl_tiny(VOCAB)
    model = TextDecoder(cfg.text, tie_word_embeddings=False, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    b, lp, steps = 2, 10, 5
    total = lp + steps
    ids = rng.integers(0, VOCAB, (b, total))
    mask = np.ones((b, total), np.int64)
    mask[0, :3] = 0
    pos = random_positions(rng, b, total, mask)
    full, _ = model(model.embed(jnp.asarray(ids)), jnp.asarray(pos), jnp.asarray(mask))
    full_logits = np.asarray(model.logits(full))

    @jax.jit
    def step(graphdef, state, tokens, position_ids, attention_mask, cache, index):
        m = nnx.merge(graphdef, state)
        h, cache = m(m.embed(tokens), position_ids, attention_mask, cache, index)
        return m.logits(h), cache

    graphdef, state = nnx.split(model)
    cache = init_text_cache(cfg.text, b, total + 3)  # spare slots stay invalid and must not matter
    logits, cache = step(graphdef, state, jnp.asarray(ids[:, :lp]), jnp.asarray(pos[:, :, :lp]),
                         jnp.asarray(mask[:, :lp]), cache, jnp.int32(0))
    got = [np.asarray(logits)]
    for k in range(lp, total):
        logits, cache = step(graphdef, state, jnp.asarray(ids[:, k:k + 1]), jnp.asarray(pos[:, :, k:k + 1]),
                             jnp.asarray(mask[:, k:k + 1]), cache, jnp.int32(k))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    valid = mask > 0
    np.testing.assert_allclose(got[valid], full_logits[valid], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, :total], mask)
    assert not np.asarray(cache.valid)[:, total:].any()


# ----------------------------------------------------------------------------------------------------
# get_rope_index
# ----------------------------------------------------------------------------------------------------

IMG, VS, VE = C.IMAGE_TOKEN_ID, C.VISION_START_ID, C.VISION_END_ID


def spec_example_ids():
    """[t,t,t,VS] + 64 img (8x8 merged) + [VE,t,t,VS] + 176 img (11x16) + [VE,t,t,t]: 252 tokens."""
    return np.array([1, 2, 3, VS] + [IMG] * 64 + [VE, 4, 5, VS] + [IMG] * 176 + [VE, 6, 7, 8])


def hf_rope_index(family, ids, mask, grids):
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as Model
    else:
        from transformers import Qwen3VLConfig as Config
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as Model
    holder = Model.__new__(Model)  # get_rope_index only reads self.config
    holder.__dict__["config"] = Config()
    ids_t = torch.tensor(ids)
    pos, delta = Model.get_rope_index(holder, ids_t, mm_token_type_ids=(ids_t == IMG).int(),
                                      image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    return pos.numpy(), delta.numpy()


def test_rope_index_spec_worked_example():
    ids = spec_example_ids()[None]
    pos, delta = get_rope_index(ids, None, np.array([[1, 16, 16], [1, 22, 32]]), image_token_id=IMG)
    assert ids.shape[1] == 252 and delta.tolist() == [[-216]]
    img1 = slice(4, 68)
    assert (pos[0, 0, img1] == 4).all() and pos[1, 0, img1].min() == 4 and pos[1, 0, img1].max() == 11
    assert pos[2, 0, img1].min() == 4 and pos[2, 0, img1].max() == 11
    assert (pos[:, 0, 68] == 12).all()  # VE after the first image
    img2 = slice(72, 248)
    assert (pos[0, 0, img2] == 16).all() and (pos[1, 0, img2].min(), pos[1, 0, img2].max()) == (16, 26)
    assert (pos[2, 0, img2].min(), pos[2, 0, img2].max()) == (16, 31)
    assert pos[:, 0, 248:].tolist() == [[32, 33, 34, 35]] * 3


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_rope_index_matches_hf_with_left_padding(family):
    a = spec_example_ids()
    b = np.array([9, VS] + [IMG] * 6 + [VE, 10, VS] + [IMG] * 4 + [VE, 11])  # grids (1,4,6) and (1,2,8)
    length = len(a) + 3
    ids = np.full((2, length), C.ENDOFTEXT_ID)
    mask = np.zeros((2, length), np.int64)
    ids[0, 3:], mask[0, 3:] = a, 1
    ids[1, length - len(b):], mask[1, length - len(b):] = b, 1
    grids = np.array([[1, 16, 16], [1, 22, 32], [1, 4, 6], [1, 2, 8]])
    want_pos, want_delta = hf_rope_index(family, ids, mask, grids)
    pos, delta = get_rope_index(ids, mask, grids, image_token_id=IMG)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_array_equal(delta, want_delta)


def test_rope_index_rejects_grid_token_mismatch():
    ids = spec_example_ids()[None]
    with pytest.raises(ValueError, match="image 1 with grid"):
        get_rope_index(ids, None, np.array([[1, 16, 16], [1, 22, 30]]), image_token_id=IMG)
    with pytest.raises(ValueError, match="has 3 images"):
        get_rope_index(ids, None, np.array([[1, 16, 16], [1, 22, 32], [1, 2, 2]]), image_token_id=IMG)
