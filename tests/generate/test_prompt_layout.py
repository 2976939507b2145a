"""The prompt layout is computed once per distinct batch layout and served from a small cache.

Every DiG batch has the same layout (one prompt template, one image size), so recomputing positions and
vision metadata each step is wasted host time. These tests count the calls of the two host builders
(get_rope_index, build_vision_inputs) to show that a repeated layout is served from the cache, that any
change of what determines it is not, and that prompts already left-padded to the bucket are taken as
they are with exactly the arrays the general re-packing gives.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from dig_jax.generate import batch as prompting
from dig_jax.models import config as C
from dig_jax.models import rope_index, vision_inputs, vlm

GRID = (1, 4, 8)  # 32 patches, 8 merged tokens per image


def _cfg():
    return C.qwen2_5_vl_tiny()


def _prompts(cfg, n_rows=2, length=48, text=(5, 3, 4), seed=0):
    """n_rows DiG-like prompts (text, two images, text), left-padded to `length`: int32[B, L] twice,
    grids int[2B, 3] and pixel_values float[2B * 32, patch_dim]."""
    rng = np.random.default_rng(seed)
    tokens = GRID[0] * GRID[1] * GRID[2] // cfg.vision.spatial_merge_size ** 2
    image = [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [cfg.vision_end_token_id]
    row = list(rng.integers(0, 1000, text[0])) + image + list(rng.integers(0, 1000, text[1])) + image \
        + list(rng.integers(0, 1000, text[2]))
    ids = np.full((n_rows, length), cfg.pad_token_id, np.int32)
    mask = np.zeros((n_rows, length), np.int32)
    ids[:, length - len(row):], mask[:, length - len(row):] = row, 1
    grids = np.array([GRID] * 2 * n_rows)
    pixels = rng.normal(size=(int(grids.prod(1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, mask, grids, pixels


@pytest.fixture
def calls(monkeypatch):
    """Counts of get_rope_index / build_vision_inputs calls, starting from an empty cache."""
    prompting._LAYOUT_CACHE.clear()
    counts = {"rope": 0, "vision": 0}
    real_rope, real_vision = rope_index.get_rope_index, vision_inputs.build_vision_inputs

    def rope(*a, **k):
        counts["rope"] += 1
        return real_rope(*a, **k)

    def vision(*a, **k):
        counts["vision"] += 1
        return real_vision(*a, **k)

    monkeypatch.setattr(vlm, "get_rope_index", rope)
    monkeypatch.setattr(vision_inputs, "build_vision_inputs", vision)
    yield counts
    prompting._LAYOUT_CACHE.clear()


def _assert_same(a, b, skip=()):
    for f in dataclasses.fields(prompting.PromptBatch):
        if f.name in skip:
            continue
        for x, y in zip(jax.tree.leaves(getattr(a, f.name)), jax.tree.leaves(getattr(b, f.name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f.name)


def test_a_repeated_layout_is_served_from_the_cache(calls):
    cfg = _cfg()
    ids, mask, grids, pixels = _prompts(cfg)
    first = prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, group_size=2, length_multiple=16)
    assert calls == {"rope": 1, "vision": 1}
    other_pixels = pixels + 1.0  # new images of the same size: the same layout
    second = prompting.build_prompt_batch(cfg, ids.copy(), mask.copy(), grids.copy(), other_pixels, group_size=2,
                                          length_multiple=16)
    assert calls == {"rope": 1, "vision": 1}, "the second call recomputed the layout"
    _assert_same(first, second, skip=("pixel_values",))
    np.testing.assert_array_equal(second.pixel_values, other_pixels)  # the pixels are never cached
    # ... and the cached layout is exactly a fresh computation's.
    prompting._LAYOUT_CACHE.clear()
    fresh = prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, group_size=2, length_multiple=16)
    _assert_same(first, fresh)
    with pytest.raises(ValueError):  # callers cannot corrupt the cached arrays
        second.input_ids[0, 0] = 7


@pytest.mark.parametrize("change", ["token", "padding", "group_size", "bucket", "grids", "config"])
def test_a_different_layout_is_not_served_from_the_cache(calls, change):
    cfg = _cfg()
    ids, mask, grids, pixels = _prompts(cfg)
    kw = dict(group_size=2, length_multiple=16)
    prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, **kw)
    if change == "token":
        ids = ids.copy()
        ids[1, -1] += 1
    elif change == "padding":
        ids, mask, grids, pixels = _prompts(cfg, text=(6, 3, 4))
    elif change == "group_size":
        kw["group_size"] = 3
    elif change == "bucket":
        kw["length_multiple"] = 32
    elif change == "grids":  # same token rows, other image sizes (1 x 8 x 4 also gives 8 merged tokens)
        grids = np.array([(1, 8, 4)] * len(grids))
    else:
        cfg = dataclasses.replace(cfg, pad_token_id=cfg.pad_token_id + 1)
    got = prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, **kw)
    assert calls == {"rope": 2, "vision": 2}, f"a changed {change} was served the old layout"
    prompting._LAYOUT_CACHE.clear()
    _assert_same(got, prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, **kw))


def test_the_cache_is_bounded(calls):
    cfg = _cfg()
    ids, mask, grids, pixels = _prompts(cfg)
    for g in range(1, prompting.LAYOUT_CACHE_SIZE + 4):
        prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, group_size=g, length_multiple=16)
    assert len(prompting._LAYOUT_CACHE) == prompting.LAYOUT_CACHE_SIZE
    prompting.build_prompt_batch(cfg, ids, mask, grids, pixels, group_size=1, length_multiple=16)  # evicted
    assert calls["rope"] == prompting.LAYOUT_CACHE_SIZE + 4


@pytest.mark.parametrize("length, multiple", [(48, 16), (40, 16), (48, 64)])
def test_left_padded_prompts_are_padded_once(length, multiple):
    """Rows already left-packed at the bucket length come back as they are (a copy); any other padding
    is re-packed, and both give the arrays of the per-row reference re-packing."""
    cfg = _cfg()
    ids, mask, _, _ = _prompts(cfg, length=length)
    right_ids, right_mask = np.full_like(ids, cfg.pad_token_id), np.zeros_like(mask)
    for r in range(len(ids)):
        valid = ids[r][mask[r] == 1]
        right_ids[r, :len(valid)], right_mask[r, :len(valid)] = valid, 1
    lp = prompting.bucket_length(int(mask.sum(1).max()), multiple)
    want_ids, want_mask = np.full((len(ids), lp), cfg.pad_token_id, np.int32), np.zeros((len(ids), lp), np.int32)
    for r in range(len(ids)):
        valid = ids[r][mask[r] == 1]
        want_ids[r, lp - len(valid):], want_mask[r, lp - len(valid):] = valid, 1
    for x, m in ((ids, mask), (right_ids, right_mask)):
        got_ids, got_mask = prompting.left_pack(x, m, lp, cfg.pad_token_id)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_array_equal(got_mask, want_mask)
        assert got_ids.dtype == got_mask.dtype == np.int32 and not np.shares_memory(got_ids, x)
