"""Evaluation on held-out DiG pairs: greedy answers, box metrics, predictions JSONL, an image grid.

Metrics (boxes matched one-to-one by the reward's Hungarian matching; a match counts at IoU >= 0.5):
  precision, recall, f1     micro-averaged over all boxes of all pairs (TP / predicted, TP / true)
  pair_f1                   mean over pairs of the per-pair F1 (what the reward uses)
  mean_iou                  mean IoU over matched pairs of boxes (matches below 0.5 included)
  count_accuracy            fraction of pairs whose number of predicted boxes equals the truth
  format_rate               fraction of answers that parse as the expected JSON
  reward                    mean DiG reward of the greedy answers (the training objective)
broken down by number of differences (`by_num_differences/<m>/...`) and by difference kind
(`by_kind/<kind>/recall`: the fraction of true boxes of that kind that were found; predictions carry
no kind, so precision is not defined per kind).
"""
from __future__ import annotations

import collections
import json
import os

import jax
import numpy as np
from PIL import Image, ImageDraw

from configs.datagen import KINDS
from dig_jax import rewards, rollout, sampling, sharding

IOU_THRESHOLD = 0.5


def _process_row_counts(n: int) -> list[int]:
    """Rows each process holds this round (the same list on every process)."""
    if jax.process_count() == 1:
        return [n]
    from jax.experimental import multihost_utils

    return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.int32(n))).reshape(-1)]


def _pad_rows(batch: dict, rows: int, valid: int) -> dict:
    """`batch` padded to `rows` rows (padding repeats row 0), with `valid` = the first `valid` rows."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if len(v) < rows:
            v = np.concatenate([v, np.repeat(v[:1], rows - len(v), axis=0)])
        out[k] = v
    out["valid"] = np.arange(rows) < valid
    return out


def lockstep_global_batches(local_batches, rows_per_process: int, *, gather=None, row_counts=None):
    """The global batches of a finite evaluation pass, with every process in step.

    Each process reads its own share of the held-out pairs, and the shares need not be equal (records
    split unevenly over processes, a short last batch). Collectives with unequal shapes, or one process
    leaving the loop while the others wait inside a collective, would hang a pod. So every round the
    processes exchange their row counts, each local batch is padded to `rows_per_process` rows (a
    process whose share has run out sends padding only), and the boolean row mask `valid` marks the
    real rows. The pass ends in the same round on every process: when no process has rows left.

    `gather` (local batch -> global batch) and `row_counts` (n -> every process's n) default to the
    multi-host collectives; on one process they are the identity and `[n]`.
    """
    if gather is None:
        from dig_jax.train import global_batch as gather
    row_counts = row_counts or _process_row_counts
    iterator, template, first = iter(local_batches), None, True
    while True:
        batch = next(iterator, None)
        n = 0 if batch is None else len(next(iter(batch.values())))
        if n > rows_per_process:
            raise ValueError(f"evaluation batch of {n} rows on process {jax.process_index()}: more than the "
                             f"{rows_per_process} rows per process the pass was set up for")
        counts = row_counts(n)
        if first and min(counts) == 0 and max(counts) > 0:
            empty = [i for i, c in enumerate(counts) if c == 0]
            raise ValueError(f"process(es) {empty} hold no evaluation pairs while others do: give the evaluation "
                             f"files at least as many records as there are processes ({len(counts)})")
        first = False
        if max(counts) == 0:
            return
        if batch is not None:
            template = batch
        yield gather(_pad_rows(batch if batch is not None else template, rows_per_process, n))


def match_boxes(pred_px: np.ndarray, gt_px: np.ndarray, hw: tuple[int, int],
                reward_config: rewards.RewardConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hungarian matching in normalised coordinates; returns (pred index, gt index, IoU) of each match."""
    if len(pred_px) == 0 or len(gt_px) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    h, w = hw
    scale = np.array([w, h, w, h], np.float64)
    pred, gt = pred_px / scale, gt_px / scale
    rows, cols = rewards.hungarian_match(rewards.matching_cost(pred, gt, reward_config))
    iou, _ = rewards.pairwise_iou_giou(pred, gt)
    return rows, cols, iou[rows, cols]


def predicted_pixel_boxes(text: str, family: str, hw, resized_hw) -> tuple[np.ndarray, bool]:
    """The valid boxes of an answer, in pixels on the rendered image, clipped to it."""
    parsed = rewards.parse_answer(text)
    boxes = rewards.answer_to_pixels(parsed.boxes, family, hw, resized_hw).reshape(-1, 4)
    h, w = hw
    boxes = np.clip(boxes, 0, [w, h, w, h])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], bool(parsed.format_ok)


class MetricAccumulator:
    """Counts over pairs; `result()` turns them into the metrics of the module docstring."""

    def __init__(self):
        self.groups = collections.defaultdict(lambda: collections.Counter())
        self.kind_found = collections.Counter()
        self.kind_total = collections.Counter()

    def add(self, *, num_pred: int, num_gt: int, ious: np.ndarray, format_ok: bool, gt_kinds: list[str],
            gt_found: np.ndarray, reward: float) -> dict:
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


def draw_prediction(image_a: np.ndarray, image_b: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                    scale: int = 2) -> Image.Image:
    """Image A | image B, ground truth in green and predictions in red on both."""
    h, w = image_a.shape[:2]
    canvas = Image.new("RGB", (2 * w * scale + 4, h * scale), (255, 255, 255))
    for i, img in enumerate((image_a, image_b)):
        panel = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(panel)
        for boxes, color in ((gt, (0, 255, 0)), (pred, (255, 0, 0))):
            for x0, y0, x1, y1 in boxes:
                draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=color, width=2)
        canvas.paste(panel, (i * (w * scale + 4), 0))
    return canvas


def image_grid(panels: list[Image.Image], columns: int = 2) -> Image.Image:
    if not panels:
        return Image.new("RGB", (1, 1))
    w, h = panels[0].size
    rows = -(-len(panels) // columns)
    grid = Image.new("RGB", (columns * w + (columns - 1) * 6, rows * h + (rows - 1) * 6), (255, 255, 255))
    for i, p in enumerate(panels):
        grid.paste(p, ((i % columns) * (w + 6), (i // columns) * (h + 6)))
    return grid


def evaluate(model, batches, *, cfg, tokenizer, family: str, max_new_tokens: int, out_dir: str,
             num_visualise: int, prompt_bucket: int, mesh=None, reward_config: rewards.RewardConfig,
             max_pairs: int | None = None) -> dict:
    """Greedy answers for every pair of `batches`; writes predictions.jsonl, predictions.png, metrics.json."""
    os.makedirs(out_dir, exist_ok=True)
    greedy = sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                     eos_token_ids=(cfg.eos_token_id,), pad_token_id=cfg.pad_token_id)
    acc = MetricAccumulator()
    panels, seen = [], 0
    lines = []
    for batch in batches:
        prompts = rollout.prompt_batch(cfg, batch, mesh=mesh, prompt_bucket=prompt_bucket)
        gen = sampling.generate(model, prompts, jax.random.key(0), greedy)
        tokens, mask = sharding.to_host(gen.tokens), sharding.to_host(gen.completion_mask)
        texts = rollout.decode_texts(tokenizer, tokens, mask)
        for i, text in enumerate(texts):
            if "valid" in batch and not batch["valid"][i]:
                continue  # padding of a process whose share of the pairs ran out
            if max_pairs is not None and seen >= max_pairs:
                break
            hw = tuple(int(v) for v in batch["original_hw"][i])
            resized = tuple(int(v) for v in batch["resized_hw"][i])
            gt = batch["gt_boxes"][i][batch["gt_mask"][i]].astype(np.float64)
            gt_kinds = [KINDS[int(k)] for k in batch["kind_ids"][i][batch["gt_mask"][i]]]
            pred, format_ok = predicted_pixel_boxes(text, family, hw, resized)
            rows, cols, ious = match_boxes(pred, gt, hw, reward_config)
            found = np.zeros(len(gt), bool)
            found[cols[ious >= IOU_THRESHOLD]] = True
            reward = rewards.score_answer(text, gt, hw, resized, reward_config)["reward"]
            row = acc.add(num_pred=len(pred), num_gt=len(gt), ious=ious, format_ok=format_ok, gt_kinds=gt_kinds,
                          gt_found=found, reward=reward)
            lines.append({"seed": int(batch["seed"][i]), "answer": text, "pred_boxes": pred.round(1).tolist(),
                          "gt_boxes": gt.tolist(), "gt_kinds": gt_kinds, "matched_iou": ious.round(4).tolist(),
                          **{k: row[k] for k in ("tp", "num_pred", "num_gt", "pair_f1", "format_ok", "reward")}})
            if len(panels) < num_visualise and "image_a" in batch:
                panels.append(draw_prediction(batch["image_a"][i], batch["image_b"][i], gt, pred))
            seen += 1
        if max_pairs is not None and seen >= max_pairs:
            break
    metrics = acc.result()
    if jax.process_index() == 0:
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
        if panels:
            image_grid(panels).save(os.path.join(out_dir, "predictions.png"))
    return metrics
