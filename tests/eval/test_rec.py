"""The REC evaluator: scoring on hand-made answers (both families' coordinates, letterboxing, invalid
answers), then the whole evaluator on the rendered REC set prepared through tensorflow-datasets."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from dig_jax import assemble
from dig_jax.config_validation import ConfigError, validate
from dig_jax.eval import rec
from dig_jax.eval.run import run_eval
from dig_jax.processing import ImageProcessorConfig, build_tiny_tokenizer
from dig_jax.processing.answers import format_answer, pixels_to_answer
from dig_jax.processing.questions import QuestionBuilder, QuestionSpec, letterbox
from tests.eval.conftest import eval_context
from tests.eval.test_refcoco_data import SPLITS


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def builder(request, tmp_path_factory):
    family = request.param
    tok = tmp_path_factory.mktemp(f"tok_{family}")
    build_tiny_tokenizer(str(tok), family=family)
    spec = QuestionSpec(family=family, image_cfg=ImageProcessorConfig.for_family(family, min_pixels=64 * 64,
                                                                               max_pixels=96 * 96),
                        canvas_hw=(64, 64), prompt_bucket=16)
    return QuestionBuilder(spec, os.path.join(tok, "tokenizer.json"))


def _row(builder, image_hw):
    """One example's batch fields (a batch of 1) for an image of `image_hw` on the builder's canvas."""
    example = builder([np.zeros(image_hw + (3,), np.uint8)], rec.rec_prompt(builder.spec.family, "", "the cube"))
    return {k: v[None] for k, v in example.items()}


def _answer_for(builder, box_original, scale):
    """The family's answer text for a box given in original pixels (the letterbox maps it by `scale`)."""
    return format_answer(np.asarray(box_original) * scale, ["x"], builder.spec.family, builder.spec.canvas_hw,
                         builder.resized_hw)


def test_letterbox_keeps_the_aspect_ratio_at_the_origin():
    image = np.full((50, 100, 3), 7, np.uint8)
    canvas, s = letterbox(image, (64, 64))
    assert s == 0.64 and canvas.shape == (64, 64, 3)
    assert (canvas[:32, :64] == 7).all() and (canvas[32:] == 128).all()


def test_perfect_shifted_and_invalid_answers(builder):
    batch = _row(builder, (50, 100))  # s = 0.64: the image covers the canvas's top 32 rows
    scale = float(batch["scale"][0][0])
    gt = np.array([20.0, 10.0, 60.0, 40.0])
    family = builder.spec.family
    perfect = rec.predicted_box(_answer_for(builder, gt, scale), family, batch, 0, thinking=False)
    assert rec.box_iou(perfect, gt) > 0.95  # only the answer's integer rounding is lost
    shifted = rec.predicted_box(_answer_for(builder, gt + [25, 0, 25, 0], scale), family, batch, 0, False)
    assert rec.box_iou(shifted, gt) < 0.5
    for text in ('[{"bbox_2d": [1, 2', "no box here", "", '[{"bbox_2d": [30, 30, 10, 10]}]', "<think>[1,2"):
        assert rec.predicted_box(text, family, batch, 0, thinking=False).shape == (0,), text
    ious = [rec.box_iou(perfect, gt), rec.box_iou(shifted, gt), 0.0]
    metrics = rec.split_metrics(ious, [False, False, True])
    assert metrics["acc@0.5"] == pytest.approx(1 / 3) and metrics["invalid_rate"] == pytest.approx(1 / 3)
    assert metrics["sentences"] == 3
    assert rec.split_metrics([ious[0]], [False])["acc@0.5"] == 1.0


def test_each_family_convention_maps_back_to_the_original_pixels(builder):
    """An answer box covering the right half of the canvas is the right half of the 50 x 100 image."""
    batch = _row(builder, (50, 100))
    rh, rw = builder.resized_hw
    if builder.spec.family == "qwen3_vl":
        answer = [500, 0, 1000, 1000]  # 0..1000 relative to the canvas
    else:
        answer = [rw / 2, 0, rw, rh]  # pixels of the resized canvas
    text = json.dumps([{"bbox_2d": answer, "label": "x"}, {"bbox_2d": [0, 0, 1, 1]}])  # the first box counts
    np.testing.assert_allclose(rec.predicted_box(text, builder.spec.family, batch, 0, False), [50, 0, 100, 50])
    # and the inverse: the answer of a pixel box, through both scalings, is what the family writes
    on_canvas = np.array([[32.0, 0.0, 64.0, 32.0]])
    np.testing.assert_allclose(pixels_to_answer(on_canvas, builder.spec.family, (64, 64), builder.resized_hw)[0],
                               [500, 0, 1000, 500] if builder.spec.family == "qwen3_vl" else [rw / 2, 0, rw, rh / 2])


def test_prompts_are_the_published_ones_or_the_configured_template():
    assert rec.rec_prompt("qwen3_vl", "", "the red cube") == (
        'Locate every object that matches the description "the red cube" in the image. '
        "Report bbox coordinates in JSON format.")
    assert rec.rec_prompt("qwen2_5_vl", "", "the red cube") == (
        "Locate the red cube in this image and output the bbox coordinates in JSON format.")
    assert rec.rec_prompt("qwen3_vl", "Find {expr}.", "it") == "Find it."


def test_macro_average_is_the_unweighted_mean_over_splits():
    out = rec.macro_average({"a/val": rec.split_metrics([1.0, 1.0, 1.0], [False] * 3),
                             "b/test": rec.split_metrics([0.0], [True])})
    assert out["acc@0.5"] == 0.5 and out["invalid_rate"] == 0.5 and out["a/val/sentences"] == 3
    assert out["b/test/acc@0.75"] == 0.0
    assert out["acc@0.5_stderr"] == 0.0  # every split all right or all wrong


def test_the_macro_accuracy_standard_error_is_that_of_a_mean_of_binomial_proportions():
    # Split a: 1 of 4 right (p = 0.25), split b: 2 of 2 right; mean of the two proportions.
    out = rec.macro_average({"a": rec.split_metrics([0.9, 0.1, 0.2, 0.0], [False] * 4),
                             "b": rec.split_metrics([0.7, 0.6], [False] * 2)})
    assert out["acc@0.5"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["acc@0.5_stderr"] == pytest.approx(np.sqrt(0.25 * 0.75 / 4 + 0.0) / 2)
    assert out["acc@0.75_stderr"] == pytest.approx(np.sqrt(0.25 * 0.75 / 4) / 2)  # 1 of 4, 0 of 2


# ------------------------------------------------------------------------------------------------------
# The evaluator on the rendered set
# ------------------------------------------------------------------------------------------------------
@pytest.fixture
def rec_config(eval_config, rec_set):
    c = eval_config
    c.eval.evaluators = ("rec",)
    c.eval.rec.data_dir = rec_set[1]
    c.eval.rec.image_size = 64
    c.eval.rec.max_new_tokens = 12
    return c


def _oracle(evaluator, shift=0.0):
    """Answers every row with its true box (shifted right by `shift` box widths), in the family's format."""
    def answer(batch):
        texts = []
        for i in range(len(batch["gt_box"])):
            box = batch["gt_box"][i].astype(np.float64)
            box = box + shift * (box[2] - box[0]) * np.array([1, 0, 1, 0])
            texts.append(format_answer(box * batch["scale"][i][0], None, evaluator.family,
                                       tuple(batch["canvas_hw"][i]), tuple(batch["resized_hw"][i])))
        return texts
    return answer


def test_the_evaluator_reads_every_split_and_scores_true_boxes_as_hits(rec_config, rec_set, tmp_path):
    evaluator = rec.RecEvaluator.from_context(eval_context(rec_config, str(tmp_path)))
    _, _, expected = rec_set
    metrics = evaluator.score(_oracle(evaluator), str(tmp_path / "oracle"))
    for split in SPLITS:
        assert metrics[f"{split}/sentences"] == len(expected[split])
        assert metrics[f"{split}/acc@0.5"] == 1.0 and metrics[f"{split}/invalid_rate"] == 0.0
    assert metrics["acc@0.5"] == 1.0 and metrics["mean_iou"] > 0.9
    with open(tmp_path / "oracle" / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == sum(len(v) for v in expected.values())
    assert sorted(line["expression"] for line in lines if line["split"] == SPLITS[0]) == sorted(
        e["expression"] for e in expected[SPLITS[0]])
    assert os.path.exists(tmp_path / "oracle" / "predictions.png")
    # Shifted off the true box (a box pushed past the image's edge keeps a sliver there: format_answer clips)
    missed = evaluator.score(_oracle(evaluator, shift=1.5), str(tmp_path / "shifted"))
    assert missed["acc@0.5"] == 0.0 and missed["mean_iou"] < 0.01 and missed["invalid_rate"] == 0.0
    junk = evaluator.score(lambda batch: ["not json"] * len(batch["gt_box"]), str(tmp_path / "junk"))
    assert junk["invalid_rate"] == 1.0 and junk["acc@0.5"] == 0.0


def test_a_model_answers_every_sentence(rec_config, rec_set, tmp_path):
    rec_config.eval.rec.splits = ("refcocog_umd/val",)
    ctx = eval_context(rec_config, str(tmp_path))
    evaluator = rec.RecEvaluator.from_context(ctx)
    model = assemble.create_model(rec_config, ctx.model_cfg, ctx.mesh, evaluator.patches_per_image)
    first = evaluator.evaluate(model, step=0, out_dir=str(tmp_path / "a"))
    assert first == evaluator.evaluate(model, step=0, out_dir=str(tmp_path / "b"))
    assert first["refcocog_umd/val/sentences"] == len(rec_set[2]["refcocog_umd/val"])
    with open(tmp_path / "a" / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == first["refcocog_umd/val/sentences"]
    for line in lines:  # each line's IoU is that of its (rounded) predicted box; invalid lines have none
        assert line["invalid"] == (line["pred_box"] == [])
        assert line["iou"] == pytest.approx(rec.box_iou(np.array(line["pred_box"]), np.array(line["gt_box"])),
                                            abs=0.02)
    assert first["refcocog_umd/val/invalid_rate"] == np.mean([line["invalid"] for line in lines])


def test_config_errors_name_the_field(rec_config):
    c = rec_config
    c.eval.rec.splits = ("refcoco_unc/validation",)
    with pytest.raises(ConfigError, match=r"config\.eval\.rec\.splits: 'refcoco_unc/validation' is not one of"):
        validate(c, num_devices=1)
    c.eval.rec.splits = ("refcoco_unc/val",)
    c.eval.rec.prompt = "Find the thing"
    with pytest.raises(ConfigError, match=r"config\.eval\.rec\.prompt: must be empty .* contain \{expr\}"):
        validate(c, num_devices=1)
    c.eval.rec.prompt, c.eval.rec.data_dir = "", ""
    with pytest.raises(ConfigError, match=r"config\.eval\.rec\.data_dir: .*prepare_refcoco"):
        validate(c, num_devices=1)


def test_mode_eval_checks_the_evaluators_sections_before_loading_anything(rec_config, tmp_path):
    rec_config.eval.rec.splits = ("refcoco_unc/validation",)
    with pytest.raises(ConfigError, match=r"config\.eval\.rec\.splits: 'refcoco_unc/validation' is not one of"):
        run_eval(rec_config, str(tmp_path))  # an empty workdir: the config is refused first
    assert os.listdir(tmp_path) == []


def test_a_canvas_of_another_patch_count_is_refused_in_training(rec_config, tmp_path):
    ctx = eval_context(rec_config, str(tmp_path))
    with pytest.raises(ConfigError, match=r"config\.eval\.rec\.image_size: images of 16 patches, but the model "
                                          r"attends per image of 64"):
        rec.RecEvaluator.from_context(dataclasses.replace(ctx, patches_per_image=64))
