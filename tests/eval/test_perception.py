"""Perception benchmarks: answer extraction, the POPE / MCQ / MMVP scorers on hand-made cases, the JSONL
reader's errors, and the evaluator on a tiny benchmark of rendered images."""
from __future__ import annotations

import glob
import json
import os

import pytest

from dig_jax import assemble
from dig_jax.config_validation import ConfigError, validate
from dig_jax.eval import perception as P
from tests.eval.conftest import eval_context


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("no.", "no"), ("Yes, there is a cat.", "yes"), ("I think the answer is No", "no"),
    ("NO!", "no"), ("There is a dog", None), ("yesterday nothing", None), ("", None)])
def test_yes_no_extraction(text, want):
    assert P.extract_yes_no(text) == want


@pytest.mark.parametrize("text, want", [
    ("B", "B"), ("(b)", "B"), ("C.", "C"), ("The answer is A.", "A"), ("Answer: (C)", "C"),
    ("I pick (B) because it is red", "B"), ("A. a red cube", "A"), ("It is the blue sphere", "B"),
    ("A cat", None),  # the article is not a choice, and no option is named
    ("E", None),  # not one of the three letters
    ("red cube or blue sphere", None),  # two options named: ambiguous
    ("", None)])
def test_choice_extraction(text, want):
    assert P.extract_choice(text, ["red cube", "blue sphere", "green cone"]) == want


def test_thinking_answers_are_read_after_the_block():
    assert P.final_answer("<think>maybe yes</think>\n\nNo", thinking=False) == "\n\nNo"
    assert P.final_answer("still thinking, yes", thinking=True) == ""
    assert P.final_answer("Yes", thinking=False) == "Yes"


def test_pope_metrics_by_hand():
    truths = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["yes", "yes", None, "yes", "no", "no"]  # TP 2, FN 1 (invalid), FP 1, TN 2
    m = P.yes_no_metrics(truths, preds)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6) and m["invalid_rate"] == pytest.approx(1 / 6)
    assert P.yes_no_metrics(["no"], ["no"])["f1"] == 0.0  # no positive anywhere: F1 defined as 0


def test_mmvp_pair_accuracy_needs_both_questions():
    records = [{"truth": t, "pair": i // 2, "task": "all"} for i, t in enumerate("ABABBA")]
    preds = ["A", "B", "A", "A", "B", None]  # pair 0 both right, pair 1 one wrong, pair 2 one invalid
    m = P.benchmark_metrics("mmvp", records, preds)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["pair_accuracy"] == pytest.approx(1 / 3)
    assert m["invalid_rate"] == pytest.approx(1 / 6)


def test_per_task_breakdown_for_pope_subsets():
    records = [{"truth": "yes", "task": "random"}, {"truth": "no", "task": "random"},
               {"truth": "yes", "task": "adversarial"}]
    m = P.benchmark_metrics("yesno", records, ["yes", "yes", "no"])
    assert m["random/accuracy"] == 0.5 and m["adversarial/accuracy"] == 0.0 and m["random/yes_ratio"] == 1.0
    assert m["accuracy"] == pytest.approx(1 / 3)


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def test_records_are_normalised_and_bad_ones_named(tmp_path):
    path = _write(tmp_path / "mmvp.jsonl", [
        {"id": 1, "image": "a.jpg", "question": "Is the door open?", "options": "(a) Open (b) Closed",
         "answer": "(b)"},
        {"id": 2, "image": "b.jpg", "question": "Q?", "options": {"A": "x", "B": "y"}, "answer": "y"}])
    a, b = P.load_benchmark(path, "mmvp")
    assert a["options"] == ["Open", "Closed"] and a["truth"] == "B" and a["pair"] == 0 and b["pair"] == 0
    assert b["truth"] == "B" and a["images"] == [str(tmp_path / "a.jpg")]
    assert a["prompt"] == "Is the door open?\nA. Open\nB. Closed\n" + P.MCQ_SUFFIX
    bad = _write(tmp_path / "bad.jsonl", [{"id": 1, "image": "a.jpg", "question": "Q", "answer": "maybe"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: a yes/no answer must be 'yes' or 'no', got 'maybe'"):
        P.load_benchmark(bad, "yesno")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: record lacks \['options'\]"):
        P.load_benchmark(bad, "mcq")
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: record lacks \['question', 'answer', 'image'\]"):
        P.load_benchmark(str(tmp_path / "broken.jsonl"), "yesno")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        P.load_benchmark(str(tmp_path / "none.jsonl"), "yesno")
    with pytest.raises(ValueError, match="answer 'z' is neither an option letter nor an option"):
        P.load_benchmark(_write(tmp_path / "z.jsonl", [{"id": 1, "image": "a", "question": "q",
                                                         "options": ["x", "y"], "answer": "z"}]), "mcq")


@pytest.fixture
def benchmark_config(eval_config, rec_set, tmp_path):
    """Two tiny benchmarks over the rendered REC images: a POPE-style yes/no file and an MMVP-style one."""
    images = sorted(glob.glob(os.path.join(rec_set[0], "coco_train2014", "*.jpg")))
    pope = _write(tmp_path / "pope.jsonl", [
        {"id": i, "image": images[i % len(images)], "question": f"Is there a {c} object in the image?",
         "answer": "yes" if i % 2 else "no", "category": "random" if i < 3 else "popular"}
        for i, c in enumerate(["red", "blue", "gray", "cyan", "green"])])
    mmvp = _write(tmp_path / "mmvp.jsonl", [
        {"id": i + 1, "image": images[i % len(images)], "question": "Which shape is largest?",
         "options": "(a) cube (b) sphere", "answer": "(a)" if i % 2 else "(b)"} for i in range(4)])
    c = eval_config
    c.eval.evaluators = ("perception",)
    c.eval.perception.benchmarks = (f"yesno:{pope}", f"mmvp:{mmvp}")
    c.eval.perception.image_size = 64
    c.eval.perception.max_new_tokens = 6
    return c


def _evaluator(c, workdir):
    ctx = eval_context(c, workdir)
    return ctx, P.PerceptionEvaluator.from_context(ctx)


def test_the_evaluator_scores_designed_answers(benchmark_config, tmp_path):
    ctx, evaluator = _evaluator(benchmark_config, str(tmp_path))
    _, mmvp, _ = evaluator.benchmarks["mmvp"]

    def answer_fn(batch):
        """"Yes" to every POPE question (told apart by its prompt); MMVP: the truth, but nothing readable
        for its first question."""
        texts = []
        for ids, mask, k in zip(batch["prompt_ids"], batch["prompt_mask"], batch["index"]):
            prompt = ctx.tokenizer.decode([int(t) for t, m in zip(ids, mask) if m])
            if P.YES_NO_SUFFIX in prompt:
                texts.append("Yes, I see it.")
            else:
                texts.append(f"The answer is ({mmvp[int(k)]['truth']})" if int(k) else "I cannot tell")
        return texts

    metrics = evaluator.score(answer_fn, str(tmp_path / "out"))
    assert metrics["pope/yes_ratio"] == 1.0 and metrics["pope/recall"] == 1.0
    assert metrics["pope/accuracy"] == pytest.approx(2 / 5) and metrics["pope/random/accuracy"] == pytest.approx(1 / 3)
    assert metrics["mmvp/accuracy"] == 0.75 and metrics["mmvp/pair_accuracy"] == 0.5
    assert metrics["mmvp/invalid_rate"] == 0.25
    assert metrics["mean_accuracy"] == pytest.approx((0.4 + 0.75) / 2)
    with open(tmp_path / "out" / "predictions.jsonl") as f:
        assert len(f.readlines()) == 9


def test_a_model_answers_every_question(benchmark_config, tmp_path):
    ctx, evaluator = _evaluator(benchmark_config, str(tmp_path))
    model = assemble.create_model(benchmark_config, ctx.model_cfg, ctx.mesh, evaluator.patches_per_image)
    metrics = evaluator.evaluate(model, step=0, out_dir=str(tmp_path / "out"))
    assert metrics["pope/questions"] == 5 and metrics["mmvp/questions"] == 4
    assert 0 <= metrics["mean_accuracy"] <= 1


def test_config_errors_name_the_field(benchmark_config):
    benchmark_config.eval.perception.benchmarks = ("pope.jsonl",)
    with pytest.raises(ConfigError, match=r"config\.eval\.perception\.benchmarks: 'pope\.jsonl' is not 'kind:path'"):
        validate(benchmark_config, num_devices=1)
