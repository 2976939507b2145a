"""Referring-expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): does DiG training transfer?

Protocol (pinned, since published numbers move by points with the prompt, the resize and the mapping):
  * one greedy answer per referring sentence, to the family's own grounding prompt (`REC_PROMPTS`, the
    ones the Qwen team publishes; `eval.rec.prompt` replaces it, with `{expr}` for the expression);
  * the image letterboxed onto an `eval.rec.image_size` square canvas (`processing.questions`), then the
    family's processor;
  * the FIRST box of the answer is scored (top-1; never the best of several boxes or scalings), mapped
    back to the original image by the family's convention: Qwen3-VL 0..1000 relative to the canvas,
    Qwen2.5-VL absolute pixels on the resized canvas (`processing.answers.answer_to_pixels`), then divided
    by the letterbox factor;
  * an answer with no readable box (no JSON, no valid `bbox_2d`, still thinking at the cap) is invalid: it
    counts as a miss with IoU 0, and in `invalid_rate`; it is never an error.
Metrics per split ("<config>/<split>/..."): acc@0.5 (IoU >= 0.5: Precision@1, the published figure),
acc@0.75, mean_iou, invalid_rate, sentences; without prefix, their macro average over the splits, and
the binomial standard error of the averaged accuracies (acc@0.5_stderr, acc@0.75_stderr).
Outputs: predictions.jsonl (one line per sentence), metrics.json, predictions.png (the first
`eval.num_visualise` sentences of each split: expression, true box green, predicted red).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import grain
import jax
import numpy as np

from dig_jax import multihost
from dig_jax.config_validation import ConfigError
from dig_jax.eval.greedy import GreedyAnswers
from dig_jax.eval.outputs import write_outputs
from dig_jax.eval.visualize import draw_grounding
from dig_jax.processing.answers import answer_to_pixels, parse_answer
from dig_jax.processing.questions import QuestionBuilder, QuestionSpec, canvas_to_original, decode_image
from dig_jax.rl.rewards import pairwise_iou_giou

if TYPE_CHECKING:
    from dig_jax.eval.registry import EvalContext

REC_PROMPTS = {
    "qwen3_vl": 'Locate every object that matches the description "{expr}" in the image. '
                "Report bbox coordinates in JSON format.",
    "qwen2_5_vl": "Locate {expr} in this image and output the bbox coordinates in JSON format.",
}
THRESHOLDS = (0.5, 0.75)
ID_FIELDS = ("image_id", "ref_id", "ann_id", "sent_id")


def rec_prompt(family: str, template: str, expression: str) -> str:
    """The question of one sentence: `template` (or the family's published one when empty) with {expr}."""
    return (template or REC_PROMPTS[family]).replace("{expr}", expression)


def predicted_box(text: str, family: str, example: dict, i: int, thinking: bool) -> np.ndarray:
    """float64[4] pixel xyxy on the original image of row `i`: the answer's first valid box; float64[0]
    when the answer has none (invalid)."""
    parsed = parse_answer(text, thinking=thinking)
    if not len(parsed.boxes):
        return np.zeros((0,), np.float64)
    canvas_hw = tuple(int(v) for v in example["canvas_hw"][i])
    resized_hw = tuple(int(v) for v in example["resized_hw"][i])
    on_canvas = answer_to_pixels(parsed.boxes[:1], family, canvas_hw, resized_hw)  # float64[1, 4]
    original_hw = tuple(int(v) for v in example["original_hw"][i][0])
    return canvas_to_original(on_canvas, float(example["scale"][i][0]), original_hw)[0]


def box_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two pixel xyxy boxes float[4]; 0 for a missing (float[0]) or empty prediction."""
    if not len(pred) or not (pred[0] < pred[2] and pred[1] < pred[3]):
        return 0.0
    iou, _ = pairwise_iou_giou(pred[None], np.asarray(gt, np.float64)[None])
    return float(iou[0, 0])


def split_metrics(ious: list[float], invalid: list[bool]) -> dict[str, float]:
    """The metrics of one split from each sentence's IoU (0 when invalid) and invalid flag."""
    iou = np.asarray(ious, np.float64)
    out = {f"acc@{t}": float(np.mean(iou >= t)) if len(iou) else 0.0 for t in THRESHOLDS}
    out.update(mean_iou=float(iou.mean()) if len(iou) else 0.0,
               invalid_rate=float(np.mean(invalid)) if len(iou) else 0.0, sentences=float(len(iou)))
    return out


def macro_average(per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each split's metrics under "<split>/", and the unweighted mean over splits without prefix.

    Also `acc@T_stderr`: the binomial standard error of the macro-averaged accuracy, sqrt(sum_s
    p_s (1 - p_s) / n_s) / S over the S splits (each split's sentences independent); small sets (the
    demo's rendered one) need it to read a before/after difference.
    """
    out = {}
    for split, metrics in per_split.items():
        out.update({f"{split}/{k}": v for k, v in metrics.items()})
    for key in (*(f"acc@{t}" for t in THRESHOLDS), "mean_iou", "invalid_rate"):
        out[key] = float(np.mean([m[key] for m in per_split.values()]))
    for t in THRESHOLDS:
        variance = sum(m[f"acc@{t}"] * (1 - m[f"acc@{t}"]) / m["sentences"]
                       for m in per_split.values() if m["sentences"])
        out[f"acc@{t}_stderr"] = float(np.sqrt(variance) / len(per_split))
    return out


class RecTransform:
    """A flat REC example (`eval.refer`) -> model inputs plus the fields scoring reads (numbers only, so
    that batches gather across hosts): gt_box float32[4] pixels on the original image, `index` in the
    split, and the REFER ids."""

    def __init__(self, builder: QuestionBuilder, prompt: str):
        self.builder, self.prompt = builder, prompt

    def __call__(self, indexed) -> dict[str, np.ndarray]:
        index, example = indexed
        expression = _text(example["expression"])
        out = self.builder([example["image"]], rec_prompt(self.builder.spec.family, self.prompt, expression))
        out.update(gt_box=np.asarray(example["box"], np.float32), index=np.int64(index),
                   **{k: np.int64(example[k]) for k in ID_FIELDS})
        return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def split_dataset(source, transform: RecTransform, rows_per_process: int, max_examples: int):
    """This process's share (every `process_count`-th sentence) of the first `max_examples` (0: all) of
    `source`, transformed and batched; re-iterable, one pass per `iter`."""
    n = len(source) if not max_examples else min(max_examples, len(source))
    ds = grain.MapDataset.range(n)[jax.process_index()::jax.process_count()]
    ds = ds.map(lambda i: (int(i), source[int(i)])).map(transform)
    return ds.batch(rows_per_process, drop_remainder=False)


class RecEvaluator:
    """Greedy grounding answers to every sentence of `eval.rec.splits`, scored as the module docstring says.

    splits: split name -> (its random-access source of flat examples, its batched dataset of this process).
    """
    name = "rec"

    def __init__(self, *, family: str, answerer: GreedyAnswers, splits: dict, rows_per_process: int,
                 num_visualise: int, thinking: bool, patches_per_image: int | None = None):
        self.family, self.answerer, self.splits = family, answerer, splits
        self.patches_per_image = patches_per_image  # of every image it feeds the model
        self.rows_per_process, self.num_visualise, self.thinking = rows_per_process, num_visualise, thinking

    @classmethod
    def from_context(cls, ctx: EvalContext) -> "RecEvaluator":
        from dig_jax import assemble
        from dig_jax.eval import refcoco_builder

        c, r = ctx.c, ctx.c.eval.rec
        if not r.data_dir:
            raise ConfigError("config.eval.rec.data_dir: the REC evaluator needs the prepared dataset "
                              "(python -m dig_jax.eval.prepare_refcoco --manual_dir=... --data_dir=...)")
        spec = QuestionSpec(family=ctx.model_cfg.family, image_cfg=assemble.image_processor_config(c, ctx.model_cfg),
                            canvas_hw=(int(r.image_size), int(r.image_size)), num_images=1,
                            max_text_tokens=int(r.max_text_tokens), prompt_bucket=int(c.data.prompt_bucket),
                            chat_template=c.data.chat_template)
        builder = QuestionBuilder(spec, ctx.tok_path, require_real_ids=not c.model.compact_tokenizer)
        check_patches(builder, ctx.patches_per_image, "config.eval.rec.image_size")
        rows = c.eval.batch_size // jax.process_count()
        transform = RecTransform(builder, r.prompt)
        splits = {}
        for name in r.splits:
            source = refcoco_builder.rec_source(r.data_dir, name)
            splits[name] = (source, split_dataset(source, transform, rows, int(r.max_examples)))
        answerer = GreedyAnswers(ctx.model_cfg, ctx.tokenizer, max_new_tokens=int(r.max_new_tokens),
                                 prompt_bucket=int(c.data.prompt_bucket), mesh=ctx.mesh)
        return cls(family=ctx.model_cfg.family, answerer=answerer, splits=splits, rows_per_process=rows,
                   num_visualise=int(c.eval.num_visualise), thinking=c.data.chat_template == "thinking",
                   patches_per_image=builder.patches_per_image)

    def evaluate(self, model, *, step: int, out_dir: str) -> dict[str, float]:
        del step
        return self.score(lambda batch: self.answerer.answer(model, batch), out_dir)

    def score(self, answer_fn, out_dir: str) -> dict[str, float]:
        """Scores `answer_fn(global batch)` (one text per row) on every split; writes the outputs."""
        os.makedirs(out_dir, exist_ok=True)
        per_split, lines, panels = {}, [], []
        for name, (source, dataset) in self.splits.items():
            ious, invalid, drawn = [], [], 0
            for batch in multihost.lockstep_global_batches(dataset, self.rows_per_process,
                                                           gather=multihost.global_batch):
                for i, text in enumerate(answer_fn(batch)):
                    if not batch["valid"][i]:
                        continue
                    pred = predicted_box(text, self.family, batch, i, self.thinking)
                    iou = box_iou(pred, batch["gt_box"][i])
                    ious.append(iou)
                    invalid.append(not len(pred))
                    if jax.process_index() == 0:
                        example = source[int(batch["index"][i])]
                        lines.append({"split": name, "index": int(batch["index"][i]),
                                      **{k: int(batch[k][i]) for k in ID_FIELDS},
                                      "expression": _text(example["expression"]), "answer": text,
                                      "pred_box": pred.round(2).tolist(), "gt_box": batch["gt_box"][i].tolist(),
                                      "iou": round(iou, 4), "invalid": not len(pred)})
                        if drawn < self.num_visualise:
                            panels.append(draw_grounding(decode_image(example["image"]), batch["gt_box"][i], pred,
                                                         f"{_text(example['expression'])} | IoU {iou:.2f}"))
                            drawn += 1
            per_split[name] = split_metrics(ious, invalid)
        metrics = macro_average(per_split)
        if jax.process_index() == 0:
            write_outputs(out_dir, lines, metrics, panels, columns=4)
        return metrics


def check_patches(builder: QuestionBuilder, patches_per_image: int | None, field: str) -> None:
    """Fails naming `field` when the model attends per image of another patch count than `builder`'s."""
    if patches_per_image is not None and builder.patches_per_image != patches_per_image:
        raise ConfigError(f"{field}: images of {builder.patches_per_image} patches, but the model attends per image "
                          f"of {patches_per_image} patches (the training images); choose a canvas of as many "
                          f"patches, or evaluate in --mode=eval")
