"""Rewards: hand-computed cases, brute-force matching, tolerant parsing, conversions, fuzz."""
import itertools
import json

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from dig_jax.processing import answers as A
from dig_jax.rl import rewards as R
SQUARE = (1000, 1000)  # Qwen3-VL answer coordinates equal pixels on a 1000x1000 image.
CFG = R.RewardConfig()  # alpha 0.1, lambda1 = lambda2 = 0.5, IoU threshold 0.5


def _answer(*boxes, label="x"):
    return json.dumps([{"bbox_2d": list(b), "label": label} for b in boxes])


# ----------------------------------------------------------------------------------------- exact cases
def test_one_exact_one_low_iou_match():
    gt = [[0, 0, 100, 100], [200, 200, 300, 300]]
    # second prediction overlaps its gt by 50x100: IoU = 5000 / 15000 = 1/3 < 0.5
    m = R.score_answer(_answer([250, 200, 350, 300], [0, 0, 100, 100]), gt, SQUARE, config=CFG)
    assert m["f1"] == pytest.approx(0.5)  # TP 1 of (2 + 2) / 2
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["reward"] == pytest.approx(0.9 * (0.5 * 0.5 + 0.5 * 2 / 3) + 0.1)  # = 0.625
    assert m["reward"] == pytest.approx(0.625)
    assert (m["format_ok"], m["num_pred"], m["num_gt"]) == (1.0, 2.0, 2.0)


def test_over_prediction():
    gt = [[100, 100, 200, 200]]
    text = _answer([600, 600, 700, 700], [100, 100, 200, 200], [0, 0, 10, 10])
    m = R.score_answer(text, gt, SQUARE, config=CFG)
    assert m["f1"] == pytest.approx(2 / 4)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == 1.0
    assert m["mean_iou"] == 1.0  # mean over the single matched pair
    assert m["reward"] == pytest.approx(0.9 * (0.25 + 0.5) + 0.1)


def test_iou_threshold_is_inclusive_and_configurable():
    gt = [[0, 0, 100, 100]]
    pred = [0, 0, 100, 50]  # IoU exactly 0.5
    m = R.score_answer(_answer(pred), gt, SQUARE, config=CFG)
    assert m["mean_iou"] == pytest.approx(0.5) and m["f1"] == 1.0
    strict = R.RewardConfig(iou_threshold=0.75)
    assert R.score_answer(_answer(pred), gt, SQUARE, config=strict)["f1"] == 0.0


def test_reward_weights_follow_config():
    cfg = R.RewardConfig(alpha=0.25, lambda1=0.7, lambda2=0.3)
    gt = [[0, 0, 100, 100], [500, 500, 600, 600]]
    m = R.score_answer(_answer([0, 0, 100, 50]), gt, SQUARE, config=cfg)  # IoU 0.5, one missed
    assert m["f1"] == pytest.approx(2 / 3) and m["mean_iou"] == pytest.approx(0.5)
    assert m["reward"] == pytest.approx(0.75 * (0.7 * 2 / 3 + 0.3 * 0.5) + 0.25)


def test_the_count_term_pays_exactly_the_right_number_of_well_formatted_boxes():
    counting = R.RewardConfig(count_weight=0.2)
    gt = [[0, 0, 100, 100]]
    one = _answer([0, 0, 100, 50])  # IoU 0.5: a hit
    two = _answer([0, 0, 100, 50], [500, 500, 600, 600])
    for text, bonus in ((one, 0.2), (two, 0.0)):
        paper, ours = (R.score_answer(text, gt, SQUARE, config=c)["reward"] for c in (CFG, counting))
        assert ours == pytest.approx(paper + bonus)
    # Without the term, the paper's reward: the two-box answer here earns 0.9 * (0.5 * 2/3 + 0.5 * 0.5) + 0.1.
    assert R.score_answer(two, gt, SQUARE, config=CFG)["reward"] == pytest.approx(0.9 * (1 / 3 + 0.25) + 0.1)
    # An empty, well-formatted answer to a pair without differences counts right; unparseable text never does.
    assert R.score_answer("[]", [], SQUARE, config=counting)["reward"] == pytest.approx(1.2)
    assert R.score_answer("no boxes", [], SQUARE, config=counting)["reward"] == pytest.approx(0.9)
    assert counting.max_reward == pytest.approx(1.2)


def test_the_extra_box_penalty_charges_each_box_beyond_the_truth_in_well_formatted_answers():
    priced = R.RewardConfig(extra_box_penalty=0.125)
    gt = [[0, 0, 100, 100]]
    boxes = ([0, 0, 100, 50], [500, 500, 600, 600], [700, 700, 800, 800])
    for n, extra in ((1, 0), (2, 1), (3, 2)):
        text = _answer(*boxes[:n])
        paper, ours = (R.score_answer(text, gt, SQUARE, config=c)["reward"] for c in (CFG, priced))
        assert ours == pytest.approx(paper - 0.125 * extra), n
    # Too few boxes cost nothing extra; text that does not parse has no boxes to charge.
    assert R.score_answer(_answer(boxes[0]), [gt[0], [500, 500, 600, 600]], SQUARE, config=priced)["reward"] == \
        pytest.approx(R.score_answer(_answer(boxes[0]), [gt[0], [500, 500, 600, 600]], SQUARE, config=CFG)["reward"])
    assert R.score_answer("no boxes", gt, SQUARE, config=priced)["reward"] == 0.0
    assert priced.max_reward == pytest.approx(1.0)


def test_zero_difference_pairs():
    empty = R.score_answer("[]", [], SQUARE, config=CFG)
    assert empty["reward"] == 1.0 and empty["f1"] == 1.0 and empty["mean_iou"] == 1.0
    no_json = R.score_answer("There are no differences.", np.zeros((0, 4)), SQUARE, config=CFG)
    assert no_json["f1"] == 1.0 and no_json["format_ok"] == 0.0 and no_json["reward"] == pytest.approx(0.9)
    spurious = R.score_answer(_answer([1, 2, 30, 40]), [], SQUARE, config=CFG)
    assert spurious["f1"] == 0.0 and spurious["mean_iou"] == 0.0 and spurious["precision"] == 0.0
    assert spurious["recall"] == 1.0 and spurious["reward"] == pytest.approx(0.1)


def test_missed_everything():
    m = R.score_answer("[]", [[0, 0, 10, 10]], SQUARE, config=CFG)
    assert (m["f1"], m["mean_iou"], m["recall"], m["precision"]) == (0.0, 0.0, 0.0, 1.0)
    assert m["reward"] == pytest.approx(0.1)


def test_hungarian_beats_greedy_order():
    gt = [[0, 0, 100, 100], [90, 0, 190, 100]]
    # Greedy by prediction order would give the first prediction to gt 0 (IoU 0.82) and leave the
    # second one with IoU 0.05; the optimal assignment swaps them.
    preds = [[80, 0, 180, 100], [0, 0, 100, 100]]
    m = R.score_answer(_answer(*preds), gt, SQUARE, config=CFG)
    assert m["f1"] == 1.0
    assert m["mean_iou"] == pytest.approx((1.0 + 90 / 110) / 2)


def test_qwen25_answers_in_resized_pixels():
    cfg = R.RewardConfig(family="qwen2_5_vl")
    original, resized = (100, 200), (112, 224)
    gt = [[10, 20, 50, 60]]
    exact = [10 * 224 / 200, 20 * 112 / 100, 50 * 224 / 200, 60 * 112 / 100]
    m = R.score_answer(_answer(exact), gt, original, resized, config=cfg)
    assert m["mean_iou"] == pytest.approx(1.0) and m["reward"] == pytest.approx(1.0)
    # The same numbers read as Qwen3-VL (0..1000) coordinates are a different box.
    assert R.score_answer(_answer(exact), gt, original, config=CFG)["f1"] == 0.0
    with pytest.raises(ValueError, match="resized_hw"):
        R.score_answer("[]", gt, original, None, config=cfg)


# --------------------------------------------------------------------------------------- brute force
def _brute_force_min_cost(cost):
    p, g = cost.shape
    if min(p, g) == 0:
        return 0.0, set()
    best, best_pairs = np.inf, None
    if p <= g:
        for cols in itertools.permutations(range(g), p):
            total = sum(cost[i, c] for i, c in enumerate(cols))
            if total < best:
                best, best_pairs = total, {(i, c) for i, c in enumerate(cols)}
    else:
        for rows in itertools.permutations(range(p), g):
            total = sum(cost[r, j] for j, r in enumerate(rows))
            if total < best:
                best, best_pairs = total, {(r, j) for j, r in enumerate(rows)}
    return best, best_pairs


def _random_boxes(rng, n):
    xy = rng.uniform(0, 0.8, (n, 2))
    wh = rng.uniform(0.02, 0.4, (n, 2))
    return np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=1)


def test_hungarian_equals_brute_force():
    rng = np.random.default_rng(0)
    for p in range(6):
        for g in range(6):
            for _ in range(3):
                pred, gt = _random_boxes(rng, p), _random_boxes(rng, g)
                cost = R.matching_cost(pred, gt, CFG)
                rows, cols = R.hungarian_match(cost)
                best, pairs = _brute_force_min_cost(cost)
                assert len(rows) == min(p, g)
                assert cost[rows, cols].sum() == pytest.approx(best, abs=1e-12)
                assert set(zip(rows.tolist(), cols.tolist())) == pairs
                # The metrics then follow from the brute-force pairs.
                m = R.score_boxes(pred, gt, True, CFG)
                if p and g:
                    iou, _ = R.pairwise_iou_giou(pred, gt)
                    ious = np.array([iou[i, j] for i, j in sorted(pairs)])
                    assert m["mean_iou"] == pytest.approx(ious.mean())
                    assert m["f1"] == pytest.approx(2 * np.sum(ious >= 0.5) / (p + g))


def test_iou_giou_against_pixel_counting():
    rng = np.random.default_rng(1)
    a = np.floor(_random_boxes(rng, 4) * 50)
    b = np.floor(_random_boxes(rng, 5) * 50)
    a[:, 2:] += 1
    b[:, 2:] += 1
    iou, giou = R.pairwise_iou_giou(a, b)
    for i in range(len(a)):
        for j in range(len(b)):
            ma, mb = np.zeros((60, 60), bool), np.zeros((60, 60), bool)
            ma[int(a[i, 1]):int(a[i, 3]), int(a[i, 0]):int(a[i, 2])] = True
            mb[int(b[j, 1]):int(b[j, 3]), int(b[j, 0]):int(b[j, 2])] = True
            union = (ma | mb).sum()
            hull = ((max(a[i, 2], b[j, 2]) - min(a[i, 0], b[j, 0]))
                    * (max(a[i, 3], b[j, 3]) - min(a[i, 1], b[j, 1])))
            assert iou[i, j] == pytest.approx((ma & mb).sum() / union)
            assert giou[i, j] == pytest.approx((ma & mb).sum() / union - (hull - union) / hull)


# ---------------------------------------------------------------------------------------------- parsing
BOX = [10, 20, 30, 40]
GOOD = _answer(BOX)


@pytest.mark.parametrize("text", [
    GOOD,
    f"```json\n{GOOD}\n```",
    f"```\n{GOOD}\n```",
    f"Sure! Here are the differences:\n```json\n{GOOD}\n```\nHope this helps.",
    f"<think>The cup moved, maybe [1, 2]? {{\"bbox_2d\": [0, 0, 1, 1]}}</think>\n{GOOD}",
    f"<think>first</think><think>second [] </think>```json\n{GOOD}```",
    f"I see [1] difference: {GOOD} (done)",
    f"```json\n[]\n``` ignore that, final:\n```json\n{GOOD}\n```",
])
def test_tolerant_parsing(text):
    parsed = A.parse_answer(text)
    assert parsed.format_ok
    np.testing.assert_array_equal(parsed.boxes, [BOX])


@pytest.mark.parametrize("text, boxes, format_ok", [
    ('[{"bbox_2d": [NaN, 20, 30, 40]}, {"bbox_2d": [10, 20, 30, 40]}]', [BOX], False),
    ('[{"bbox_2d": [10, 20, Infinity, 40]}]', [], False),
    ('[{"bbox_2d": [10, 20, 1e400, 40]}]', [], False),
    ('[{"bbox_2d": [10, 20, 3' + "0" * 400 + ', 40]}]', [], False),
    ('[{"bbox_2d": [10, 20, 3' + "0" * 5000 + ', 40]}]', [], False),  # over int()'s digit limit
    ('[{"bbox_2d": [30, 20, 10, 40]}]', [], False),  # inverted x
    ('[{"bbox_2d": [10, 40, 30, 40]}]', [], False),  # zero height
    ('[{"bbox_2d": ["10", 20, 30, 40]}]', [], False),
    ('[{"bbox_2d": [true, 20, 30, 40]}]', [], False),
    ('[{"bbox_2d": [10, 20, 30]}]', [], False),
    ('[{"bbox_2d": [10, 20, 30, 40, 50]}]', [], False),
    ('[{"label": "no box"}]', [], False),
    ('[{"bbox_2d": [10, 20, 30, 40]}, {"bbox_2d": [1, 2,', [BOX], False),  # truncated generation
    ('{"bbox_2d": [10, 20, 30, 40], "label": "a"}', [BOX], False),  # object without the list
    ('[{"bbox_2d": [10.5, 20, 30, 40.25]}]', [[10.5, 20, 30, 40.25]], True),
    ("<think>[{\"bbox_2d\": [10, 20, 30, 40]}]", [], False),  # unclosed thinking: no answer yet
    ("", [], False),
    ("[[[[[[", [], False),
    ("[" * 5000, [], False),
    ("```json\n[{\"bbox_2d\": [10, 20, 30, 40]}", [BOX], False),  # unclosed fence, truncated list
])
def test_malformed(text, boxes, format_ok):
    parsed = A.parse_answer(text)
    assert parsed.format_ok == format_ok
    np.testing.assert_array_equal(parsed.boxes.reshape(-1, 4), np.array(boxes, float).reshape(-1, 4))


def test_non_string_input_scores_zero_format():
    for junk in (None, 3, b"[]", ["[]"]):
        m = R.score_answer(junk, [[0, 0, 5, 5]], SQUARE, config=CFG)
        assert m["format_ok"] == 0.0 and m["reward"] == 0.0


def test_out_of_image_boxes_are_clipped():
    gt = [[900, 900, 1000, 1000]]
    m = R.score_answer(_answer([900, 900, 1300, 1200]), gt, SQUARE, config=CFG)
    assert m["mean_iou"] == pytest.approx(1.0) and m["format_ok"] == 1.0
    outside = R.score_answer(_answer([1100, 0, 1200, 50]), gt, SQUARE, config=CFG)
    assert outside["num_pred"] == 0.0 and outside["format_ok"] == 1.0


# ------------------------------------------------------------------------------------------------- fuzz
_FRAGMENTS = ['[', ']', '{', '}', '"bbox_2d"', ':', ',', '"label"', '"a"', '```json\n', '```',
              '<think>', '</think>', 'NaN', '-Infinity', '1e999', '0', '5', '-3', '999', '1000', '0.5',
              'true', 'null', ' ', '\n']


@hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
@hypothesis.given(st.one_of(st.text(max_size=300),
                            st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map("".join)),
                  st.integers(0, 3), st.sampled_from(A.FAMILIES))
def test_fuzz_never_raises_reward_in_unit_interval(text, num_gt, family):
    gt = [[10 * i, 10 * i, 10 * i + 40, 10 * i + 30] for i in range(num_gt)]
    cfg = R.RewardConfig(family=family)
    m = R.score_answer(text, gt, (480, 640), (476, 644), config=cfg)
    assert set(m) == set(R.METRIC_KEYS)
    assert all(np.isfinite(v) for v in m.values())
    assert 0.0 <= m["reward"] <= 1.0
    for key in ("f1", "precision", "recall", "mean_iou", "format_ok"):
        assert 0.0 <= m[key] <= 1.0


# ------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize("family", A.FAMILIES)
def test_conversion_round_trip(family):
    rng = np.random.default_rng(2)
    original, resized = (480, 640), (476, 644)
    boxes = _random_boxes(rng, 7) * np.array([640, 480, 640, 480])
    ans = A.pixels_to_answer(boxes, family, original, resized)
    np.testing.assert_allclose(A.answer_to_pixels(ans, family, original, resized), boxes, rtol=1e-12)
    extent = A.answer_extent(family, original, resized)
    assert extent == ((1000.0, 1000.0) if family == "qwen3_vl" else (644.0, 476.0))
    np.testing.assert_allclose(A.pixels_to_answer([[0, 0, 640, 480]], family, original, resized),
                               [[0, 0, *extent]])


@pytest.mark.parametrize("family", A.FAMILIES)
def test_format_answer_parses_back(family):
    rng = np.random.default_rng(3)
    original, resized = (480, 640), (476, 644)
    boxes = _random_boxes(rng, 4) * np.array([640, 480, 640, 480])
    labels = ["red cube moved", "new sphere", 'quote "q"', "ü"]
    text = A.format_answer(boxes, labels, family, original, resized)
    items = json.loads(text)
    assert [it["label"] for it in items] == labels
    assert all(isinstance(v, int) for it in items for v in it["bbox_2d"])
    assert text.startswith('[{"bbox_2d": [') and '], "label": "' in text
    parsed = A.parse_answer(text)
    assert parsed.format_ok
    back = A.answer_to_pixels(parsed.boxes, family, original, resized)
    step = np.array(A.answer_to_pixels([[1, 1, 1, 1]], family, original, resized))[0]
    assert np.all(np.abs(back - boxes) <= 0.5 * step + 1e-9)  # rounding to the answer grid only
    cfg = R.RewardConfig(family=family)
    assert R.score_answer(A.format_answer(boxes, labels, family, original, resized, fenced=True),
                          boxes, original, resized, cfg)["f1"] == 1.0


def test_format_answer_keeps_tiny_and_edge_boxes_valid():
    text = A.format_answer([[10.0, 10.0, 10.2, 10.3], [639.9, 0, 640, 480]], None, "qwen3_vl", (480, 640))
    parsed = A.parse_answer(text)
    assert parsed.format_ok and len(parsed.boxes) == 2
    assert json.loads(text)[1]["bbox_2d"] == [999, 0, 1000, 1000]
    assert A.format_answer([], [], "qwen3_vl", (480, 640)) == "[]"


def test_batch_matches_per_sample():
    texts = [_answer([0, 0, 100, 100]), "[]", "garbage"]
    gts = [[[0, 0, 100, 100]], [], [[5, 5, 50, 50]]]
    out = R.score_batch(texts, gts, [SQUARE] * 3, config=CFG)
    for i in range(3):
        single = R.score_answer(texts[i], gts[i], SQUARE, config=CFG)
        for k in R.METRIC_KEYS:
            assert out[k][i] == pytest.approx(single[k])
    with pytest.raises(ValueError, match="gt box sets"):
        R.score_batch(texts, gts[:2], [SQUARE] * 3, config=CFG)


@pytest.mark.parametrize("kwargs, field", [
    ({"alpha": 1.5}, "alpha"), ({"lambda1": -1}, "lambda1"), ({"iou_threshold": 0}, "iou_threshold"),
    ({"family": "qwen2_vl"}, "family"), ({"l1_cost_weight": float("nan")}, "l1_cost_weight"),
    ({"count_weight": -0.1}, "count_weight"),
    ({"extra_box_penalty": -0.1}, "extra_box_penalty"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"RewardConfig.{field}"):
        R.RewardConfig(**kwargs)


# ------------------------------------------------------------------------------------ thinking template
THINKING = R.RewardConfig(chat_template="thinking")  # the prompt opened <think>: completions start inside it


def test_thinking_answer_is_scored_after_the_block():
    """The text after </think> is parsed as an Instruct answer is; a decoy list in the reasoning is ignored."""
    gt = [[0, 0, 100, 100], [200, 200, 300, 300]]
    answer = _answer([250, 200, 350, 300], [0, 0, 100, 100])
    decoy = _answer([900, 900, 950, 950])
    completion = f"Picture 2 has a box at {decoy}, no: two changes.\n</think>\n\n{answer}"
    thinking = R.score_answer(completion, gt, SQUARE, config=THINKING)
    assert thinking == R.score_answer(answer, gt, SQUARE, config=CFG)
    assert thinking["reward"] == pytest.approx(0.625) and thinking["num_pred"] == 2.0


def test_unclosed_thinking_block_has_no_answer():
    """Cut off while reasoning: no boxes and format 0, even when the reasoning holds a well-formed list that
    the Instruct parser (no block opened by the prompt) takes as the answer."""
    gt = [[0, 0, 100, 100]]
    completion = f"Maybe the answer is {_answer([0, 0, 100, 100])} but let me check the other cube"
    m = R.score_answer(completion, gt, SQUARE, config=THINKING)
    assert (m["reward"], m["format_ok"], m["num_pred"], m["f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert R.score_answer(completion, gt, SQUARE, config=CFG)["reward"] == pytest.approx(1.0)
    parsed = A.parse_answer(completion, thinking=True)
    assert parsed.boxes.shape == (0, 4) and not parsed.format_ok
    # A pair without differences: the both-sets-empty rule pays accuracy, the format part stays 0.
    assert R.score_answer(completion, [], SQUARE, config=THINKING)["reward"] == pytest.approx(0.9)


@pytest.mark.parametrize("text", [
    f"\n</think>\n\n{GOOD}",  # the empty block the supervised warm-up writes
    f"reasoning </think>\n```json\n{GOOD}\n```",
    f"first</think> second [] </think>{GOOD}",  # the last close wins, as for Instruct
])
def test_thinking_parses_what_follows_the_last_close(text):
    parsed = A.parse_answer(text, thinking=True)
    assert parsed.format_ok and A.parse_answer(text).format_ok
    np.testing.assert_array_equal(parsed.boxes, [BOX])
    np.testing.assert_array_equal(A.parse_answer(text).boxes, [BOX])


@hypothesis.settings(max_examples=200, deadline=None, derandomize=True)
@hypothesis.given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map("".join))
def test_thinking_equals_instruct_on_a_completion_that_opened_the_block(text):
    """Prompt-opened block = the Instruct parser reading `<think>` + completion; never raises."""
    thinking, instruct = A.parse_answer(text, thinking=True), A.parse_answer("<think>" + text)
    assert thinking.format_ok == instruct.format_ok and thinking.num_dropped == instruct.num_dropped
    np.testing.assert_array_equal(thinking.boxes, instruct.boxes)
    assert 0.0 <= R.score_answer(text, [[0, 0, 5, 5]], SQUARE, config=THINKING)["reward"] <= 1.0


def test_thinking_reward_fn_from_config():
    import ml_collections

    section = ml_collections.ConfigDict({"fn": "dig", "alpha": 0.1, "lambda1": 0.5, "lambda2": 0.5,
                                         "iou_threshold": 0.5})
    batch = {"gt_boxes": np.array([[[0, 0, 100, 100]]], np.float32), "gt_mask": np.array([[True]]),
             "original_hw": np.array([SQUARE]), "resized_hw": np.array([SQUARE])}
    texts = [f"ok\n</think>\n\n{_answer([0, 0, 100, 100])}", _answer([0, 0, 100, 100])]
    thinking = R.reward_fn_from_config(section, "qwen3_vl", "thinking")(texts, batch, 2)["reward"]
    np.testing.assert_allclose(thinking, [1.0, 0.0])  # the second never closed the block
    instruct = R.reward_fn_from_config(section, "qwen3_vl")(texts, batch, 2)["reward"]
    np.testing.assert_allclose(instruct, [1.0, 1.0])


@pytest.mark.parametrize("kwargs, match", [
    ({"chat_template": "reasoning"}, "RewardConfig.chat_template"),
    ({"chat_template": "thinking", "family": "qwen2_5_vl"}, "family 'qwen2_5_vl' has none"),
])
def test_thinking_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.RewardConfig(**kwargs)
