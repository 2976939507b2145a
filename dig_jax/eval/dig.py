"""Evaluation on held-out DiG pairs: greedy answers, box metrics, predictions JSONL, an image grid.

Metrics (boxes matched one-to-one by the reward's Hungarian matching; a match counts at IoU >= 0.5):
  precision, recall, f1     micro-averaged over all boxes of all pairs (TP / predicted, TP / true)
  pair_f1                   mean over pairs of the per-pair F1 (what the reward uses)
  mean_iou                  mean IoU over matched pairs of boxes (matches below 0.5 included)
  count_accuracy            fraction of pairs whose number of predicted boxes equals the truth
  format_rate               fraction of answers that parse as the expected JSON
  reward                    mean DiG reward of the greedy answers (the training objective; always the
                            paper's, without our optional count terms reward.count_weight and
                            reward.extra_box_penalty)
broken down by number of differences (`by_num_differences/<m>/...`) and by difference kind
(`by_kind/<kind>/recall`: the fraction of true boxes of that kind that were found; predictions carry
no kind, so precision is not defined per kind).

Each answer is parsed and matched once, by the reward (`rewards.match_answer`): the metrics above and
the reward then come from the same predicted boxes and the same matching. Under the Thinking template
(`data.chat_template`) the answer is the text after `</think>`; a greedy answer still reasoning at
`eval.max_new_tokens` has none (no boxes, format_ok 0).
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import jax
import numpy as np

from data_pipeline.differences import KINDS
from dig_jax import assemble, multihost
from dig_jax.config_validation import ConfigError
from dig_jax.eval.greedy import GreedyAnswers
from dig_jax.eval.outputs import write_outputs
from dig_jax.eval.visualize import draw_prediction
from dig_jax.models.config import ModelConfig
from dig_jax.processing.examples import ExampleBuilder
from dig_jax.rl import rewards

if TYPE_CHECKING:  # the registry imports this module for its entry
    from dig_jax.eval.registry import EvalContext

IOU_THRESHOLD = 0.5
ROW_KEYS = ("tp", "num_pred", "num_gt", "pair_f1", "format_ok", "reward")  # per-pair fields of predictions.jsonl


class MetricAccumulator:
    """Counts over pairs; `result()` turns them into the metrics of the module docstring."""

    def __init__(self):
        self.groups = collections.defaultdict(lambda: collections.Counter())
        self.kind_found = collections.Counter()
        self.kind_total = collections.Counter()

    def add(self, *, num_pred: int, num_gt: int, ious: np.ndarray, format_ok: bool, gt_kinds: list[str],
            gt_found: np.ndarray, reward: float) -> dict:
        """One pair: ious float[K] of its matched boxes, gt_found bool[G] per true box. Returns its counts."""
        tp = int(np.sum(ious >= IOU_THRESHOLD))
        pair_f1 = 1.0 if num_pred == num_gt == 0 else 2 * tp / (num_pred + num_gt)
        row = {"tp": tp, "num_pred": num_pred, "num_gt": num_gt, "pair_f1": pair_f1,
               "iou_sum": float(ious.sum()), "matches": len(ious), "count_ok": int(num_pred == num_gt),
               "format_ok": int(format_ok), "pairs": 1, "reward": reward}
        for key in ("all", f"by_num_differences/{num_gt}"):
            self.groups[key].update(row)
        for kind, found in zip(gt_kinds, gt_found):
            self.kind_total[kind] += 1
            self.kind_found[kind] += int(found)
        return row

    def result(self) -> dict[str, float]:
        out = {}
        for key, g in sorted(self.groups.items()):
            prefix = "" if key == "all" else key + "/"
            p = g["tp"] / g["num_pred"] if g["num_pred"] else float(g["num_gt"] == 0)
            r = g["tp"] / g["num_gt"] if g["num_gt"] else 1.0
            out.update({
                f"{prefix}precision": p, f"{prefix}recall": r, f"{prefix}f1": 2 * p * r / (p + r) if p + r else 0.0,
                f"{prefix}pair_f1": g["pair_f1"] / g["pairs"],
                f"{prefix}mean_iou": g["iou_sum"] / g["matches"] if g["matches"] else 0.0,
                f"{prefix}count_accuracy": g["count_ok"] / g["pairs"],
                f"{prefix}format_rate": g["format_ok"] / g["pairs"], f"{prefix}pairs": g["pairs"],
                f"{prefix}reward": g["reward"] / g["pairs"],
            })
        for kind in sorted(self.kind_total):
            out[f"by_kind/{kind}/recall"] = self.kind_found[kind] / self.kind_total[kind]
            out[f"by_kind/{kind}/boxes"] = self.kind_total[kind]
        return out


def held_out_files(c) -> str:
    """The DiG pairs evaluation reads: `data.eval_files`, else the training files."""
    return c.data.eval_files or c.data.train_files


def held_out_builder(c, model_cfg: ModelConfig, tok_path: str) -> ExampleBuilder:
    """The example transform of the held-out pairs (images kept for the drawings). Fails naming
    `eval.max_new_tokens` when that cap cannot hold an answer of `data.max_boxes` boxes."""
    files = held_out_files(c)
    builder = assemble.example_builder(c, model_cfg, tok_path, assemble.dataset_image_hw(files), keep_images=True)
    assemble.check_room_for_answers(c, builder, "eval.max_new_tokens", c.eval.max_new_tokens)
    return builder


class DigEvaluator:
    """Greedy answers to the held-out DiG pairs, scored by the metrics of the module docstring.

    Built once (dataset, sampling config); every `evaluate` makes a fresh one-epoch pass, so training can
    call it every `eval.every` steps. Every process scores the global batch, in lockstep with the others
    (`multihost.lockstep_global_batches`), so the metrics are the same on every process.

    dataset: this process's share of the pairs as local batches; re-iterable (each `iter` starts over).
    rows_per_process: the local batch size the lockstep pass pads every round to.
    max_pairs: score at most this many pairs (None: all).
    patches_per_image: of every held-out image (the model can attend per image of that many patches).
    """
    name = "dig"

    def __init__(self, *, model_cfg: ModelConfig, tokenizer, dataset: Iterable[dict], rows_per_process: int,
                 reward_config: rewards.RewardConfig, max_new_tokens: int, num_visualise: int,
                 prompt_bucket: int, mesh=None, max_pairs: int | None = None, patches_per_image: int | None = None):
        self.model_cfg, self.tokenizer, self.mesh = model_cfg, tokenizer, mesh
        self.dataset, self.rows_per_process = dataset, rows_per_process
        self.reward_config, self.max_pairs = reward_config, max_pairs
        self.num_visualise, self.prompt_bucket = num_visualise, prompt_bucket
        self.patches_per_image = patches_per_image  # of the held-out images
        self.greedy = GreedyAnswers(model_cfg, tokenizer, max_new_tokens=max_new_tokens,
                                    prompt_bucket=prompt_bucket, mesh=mesh)

    @classmethod
    def from_context(cls, ctx: EvalContext) -> "DigEvaluator":
        """From the config's `eval`, `data` and `reward` sections (what `--mode=eval` always read)."""
        c = ctx.c
        builder = held_out_builder(c, ctx.model_cfg, ctx.tok_path)
        if ctx.patches_per_image is not None and builder.patches_per_image != ctx.patches_per_image:
            raise ConfigError(
                f"config.data.eval_files: images of {builder.patches_per_image} patches, but the model attends "
                f"per image of {ctx.patches_per_image} patches (the training images); render the held-out "
                f"pairs at the training resolution")
        dataset = assemble.pair_dataset(c, held_out_files(c), builder, batch_size=c.eval.batch_size,
                                        selection=None, seed=c.seed, shuffle=False, num_epochs=1)
        return cls(model_cfg=ctx.model_cfg, tokenizer=ctx.tokenizer, dataset=dataset,
                   rows_per_process=c.eval.batch_size // jax.process_count(),
                   # The paper's reward, without our optional count terms: held-out rewards of runs
                   # trained with and without them stay comparable (count accuracy is its own metric).
                   reward_config=dataclasses.replace(
                       rewards.RewardConfig.from_config(c.reward, ctx.model_cfg.family, c.data.chat_template),
                       count_weight=0.0, extra_box_penalty=0.0),
                   max_new_tokens=c.eval.max_new_tokens, num_visualise=c.eval.num_visualise,
                   prompt_bucket=c.data.prompt_bucket, mesh=ctx.mesh, max_pairs=c.eval.num_pairs,
                   patches_per_image=builder.patches_per_image)

    def batches(self):
        """A fresh pass: the global batches, padded rows marked by `valid` (hosts stay in step even when
        their shares differ in size)."""
        return multihost.lockstep_global_batches(self.dataset, self.rows_per_process, gather=multihost.global_batch)

    def answers(self, model, batch: dict) -> list[str]:
        """The greedy answer to every row of the global `batch` (padding rows included)."""
        return self.greedy.answer(model, batch)

    def evaluate(self, model, *, step: int, out_dir: str) -> dict[str, float]:
        """Writes predictions.jsonl, predictions.png and metrics.json into `out_dir`; returns the metrics."""
        del step  # the caller's out_dir already names it
        return self.score(self.batches(), lambda batch: self.answers(model, batch), out_dir)

    def score(self, batches: Iterable[dict], answer_fn: Callable[[dict], list[str]], out_dir: str) -> dict:
        """Scores `answer_fn(batch)` (one text per row) on the real rows of `batches`, up to max_pairs."""
        os.makedirs(out_dir, exist_ok=True)
        acc = MetricAccumulator()
        panels, lines, seen = [], [], 0
        for batch in batches:
            texts = answer_fn(batch)
            for i, text in enumerate(texts):
                if "valid" in batch and not batch["valid"][i]:
                    continue  # padding of a process whose share of the pairs ran out
                if self.max_pairs is not None and seen >= self.max_pairs:
                    break
                pair = score_pair(text, batch, i, self.reward_config)
                row = acc.add(num_pred=len(pair["pred"]), num_gt=len(pair["gt"]), ious=pair["ious"],
                              format_ok=pair["format_ok"], gt_kinds=pair["gt_kinds"], gt_found=pair["found"],
                              reward=pair["reward"])
                lines.append({"seed": int(batch["seed"][i]), "answer": text,
                              "pred_boxes": pair["pred"].round(1).tolist(), "gt_boxes": pair["gt"].tolist(),
                              "gt_kinds": pair["gt_kinds"],
                              "matched_iou": pair["ious"].round(4).tolist(), **{k: row[k] for k in ROW_KEYS}})
                if len(panels) < self.num_visualise and "image_a" in batch:
                    panels.append(draw_prediction(batch["image_a"][i], batch["image_b"][i], pair["gt"], pair["pred"]))
                seen += 1
            if self.max_pairs is not None and seen >= self.max_pairs:
                break
        metrics = acc.result()
        if jax.process_index() == 0:
            write_outputs(out_dir, lines, metrics, panels)
        return metrics


def score_pair(text: str, batch: dict, i: int, reward_config: rewards.RewardConfig) -> dict:
    """Row `i` of `batch` answered by `text`, parsed and matched once by the reward.

    Returns gt float64[G, 4] and pred float64[P, 4] (the valid predicted boxes, clipped to the image) in
    pixels on the rendered image, ious float64[K] of the K = min(P, G) matched pairs, found bool[G] (true
    box matched at IoU >= 0.5), gt_kinds (G names), format_ok and the answer's reward.
    """
    hw = tuple(int(v) for v in batch["original_hw"][i])
    resized = tuple(int(v) for v in batch["resized_hw"][i])
    gt = batch["gt_boxes"][i][batch["gt_mask"][i]].astype(np.float64)  # float64[G, 4] pixels
    gt_kinds = [KINDS[int(k)] for k in batch["kind_ids"][i][batch["gt_mask"][i]]]
    scored = rewards.match_answer(text, gt, hw, resized, reward_config)
    h, w = hw
    pred = scored.pred * np.array([w, h, w, h], np.float64)  # float64[P, 4] pixels
    ious = scored.matched_iou  # float64[K]
    found = np.zeros(len(gt), bool)
    found[scored.gt_index[ious >= IOU_THRESHOLD]] = True
    return {"gt": gt, "pred": pred, "ious": ious, "found": found, "gt_kinds": gt_kinds,
            "format_ok": bool(scored.metrics["format_ok"]), "reward": scored.metrics["reward"]}
