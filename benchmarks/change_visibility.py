"""Which changes a trained model sees: recall by kind against how visible each change is, and how much the
vision tower's tokens move where it happened.

    python benchmarks/change_visibility.py --workdir=demo_out [--step=N] [--token-pairs=200] [--json=out.json]

Why it exists: the demo's model finds removed objects and not recoloured ones (README, "What the model
sees"), and the count of a pair it cannot fully see is a guess whatever the reward pays. Two questions
decide what to do about that, and this script answers both from a finished demo workdir (its held-out
pairs in `data/eval`, the DiG evaluation of checkpoint `--step` in `run/eval/step_N`, the checkpoint;
by default the earliest evaluated step, the warm-up):

1. Is the miss a matter of how visible the change is? Every true box of the evaluation gets its
   *changed fraction*: the share of its pixels whose largest channel difference between the two images
   exceeds the generator's `visible_threshold` (24 of 255, the bar every difference already had to clear
   to be kept). Recall (a predicted box at IoU >= 0.5) is tabulated per kind within quartiles of that
   fraction. A recall that stays flat across quartiles says that the model misses the kind of change,
   not the faint instances of it.
2. Does the change reach the language model? The vision tower encodes image A and image B of the first
   `--token-pairs` pairs; at each merged token (one per `patch_size * spatial_merge_size` pixels square)
   the relative change is |e_A - e_B| / sqrt(|e_A| |e_B|). Each true box takes the largest change over
   the tokens it overlaps; the tokens no box overlaps give the baseline (their change is not 0: the ViT
   attends over the whole image, so a change anywhere moves every token a little). A kind whose tokens
   move well above that baseline is in the tower's output: the decoder receives it, and what is missing
   is the comparison of A with B.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

from data_pipeline.validate import changed_pixels  # noqa: E402
from dig_jax.eval.dig import IOU_THRESHOLD  # noqa: E402
from dig_jax.rl.rewards import pairwise_iou_giou  # noqa: E402


def changed_fraction(image_a: np.ndarray, image_b: np.ndarray, box, threshold: int) -> float:
    """Share of the pixels of pixel box (x1, y1, x2, y2) whose largest |A - B| over channels exceeds
    `threshold`; uint8[H, W, 3] images. The box is cut to whole pixels (floor / ceil) inside the image."""
    h, w = image_a.shape[:2]
    x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
    x2, y2 = min(int(np.ceil(box[2])), w), min(int(np.ceil(box[3])), h)
    if x2 <= x1 or y2 <= y1:
        return 0.0
    return float(np.mean(changed_pixels(image_a[y1:y2, x1:x2], image_b[y1:y2, x1:x2], threshold)))


def best_iou(box, predicted: np.ndarray) -> float:
    """Largest IoU of pixel box `box` with any row of float[K, 4] `predicted` (0 when K = 0)."""
    predicted = np.asarray(predicted, np.float64).reshape(-1, 4)
    return float(pairwise_iou_giou(np.asarray(box), predicted)[0].max()) if len(predicted) else 0.0


def true_boxes(predictions: Iterable[dict], records: dict[int, dict], threshold: int) -> list[dict]:
    """One entry per true box of the evaluation: kind, changed fraction, found. `records` maps a pair's
    seed to its decoded record (image_a, image_b); a prediction line whose seed is missing is an error."""
    out = []
    for row in predictions:
        record = records.get(int(row["seed"]))
        if record is None:
            raise KeyError(f"predictions name pair seed {row['seed']}, which the held-out records do not hold")
        for kind, box in zip(row["gt_kinds"], row["gt_boxes"]):
            out.append({"kind": kind,
                        "changed fraction": changed_fraction(record["image_a"], record["image_b"], box, threshold),
                        "found": best_iou(box, np.asarray(row["pred_boxes"])) >= IOU_THRESHOLD})
    return out


def recall_by_visibility(boxes: list[dict], bins: int = 4) -> list[dict]:
    """Per kind and per quantile bin of the changed fraction (edges from that kind's own boxes; a box on
    an inner edge goes to the upper bin): boxes, recall, and the bin's range."""
    rows = []
    for kind in sorted({b["kind"] for b in boxes}):
        frac = np.array([b["changed fraction"] for b in boxes if b["kind"] == kind])
        found = np.array([b["found"] for b in boxes if b["kind"] == kind], np.float64)
        edges = np.quantile(frac, np.linspace(0, 1, bins + 1))
        which = np.clip(np.searchsorted(edges, frac, side="right") - 1, 0, bins - 1)
        for k in range(bins):
            sel = which == k
            if sel.any():
                rows.append({"kind": kind, "changed fraction": f"{edges[k]:.2f}-{edges[k + 1]:.2f}",
                             "boxes": int(sel.sum()), "recall": float(found[sel].mean())})
        rows.append({"kind": kind, "changed fraction": "all", "boxes": len(frac), "recall": float(found.mean())})
    return rows


def token_changes(embeds_a: np.ndarray, embeds_b: np.ndarray, boxes_by_kind: list[tuple[str, tuple]],
                  token_px: float) -> dict[str, list[float]]:
    """Relative change of the merged tokens of one pair, float[gh, gw, D] per image (row-major token grid,
    one token per `token_px` pixels square): for each (kind, pixel box) the largest change over the
    tokens the box overlaps, and under "no difference" the largest over the tokens no box overlaps."""
    norm_a, norm_b = np.linalg.norm(embeds_a, axis=-1), np.linalg.norm(embeds_b, axis=-1)
    change = np.linalg.norm(embeds_a - embeds_b, axis=-1) / np.sqrt(np.maximum(norm_a * norm_b, 1e-30))  # [gh, gw]
    covered = np.zeros(change.shape, bool)
    out: dict[str, list[float]] = {}
    for kind, box in boxes_by_kind:
        r1, c1 = int(box[1] // token_px), int(box[0] // token_px)
        r2, c2 = int(np.ceil(box[3] / token_px)), int(np.ceil(box[2] / token_px))
        covered[r1:r2, c1:c2] = True
        out.setdefault(kind, []).append(float(change[r1:r2, c1:c2].max()))
    if not covered.all():
        out.setdefault("no difference", []).append(float(change[~covered].max()))
    return out


def summarise_token_changes(changes: dict[str, list[float]]) -> list[dict]:
    """Median, 10th and 90th percentile of each kind's changes ("boxes": how many; for "no difference",
    the pairs with a token outside every box)."""
    return [{"tokens of": kind, "boxes": len(v), "median": float(np.median(v)), "p10": float(np.quantile(v, 0.1)),
             "p90": float(np.quantile(v, 0.9))} for kind, v in sorted(changes.items())]


def read_records(pattern: str) -> dict[int, dict]:
    """Every decoded record of the shards matching `pattern`, by seed."""
    import grain

    from data_pipeline import loader, schema

    source = grain.sources.ArrayRecordDataSource(loader.list_shards(pattern))
    records = (schema.decode(source[i]) for i in range(len(source)))
    return {int(record["seed"]): record for record in records}


def vision_token_changes(workdir: str, step: int, records: list[dict]) -> dict[str, list[float]]:
    """`token_changes` of every pair in `records`, with checkpoint `step` of the demo run in `workdir`."""
    import jax.numpy as jnp
    from flax import nnx

    from configs import demo_cpu
    from dig_jax import assemble
    from dig_jax.models.vision_inputs import build_vision_inputs
    from dig_jax.processing.image import preprocess_images

    c = demo_cpu.get_config()
    c.data.train_files = c.data.eval_files = os.path.join(workdir, "data", "eval", "*.array_record")
    run_dir = os.path.join(workdir, "run")
    tok_path = assemble.tokenizer_path(c, run_dir, assemble.model_family(c))
    model_cfg = assemble.model_config_from(c, assemble.load_run_tokenizer(c, tok_path))
    model, _ = assemble.restore_model(c, run_dir, model_cfg, assemble.make_mesh(c), step)
    encode = nnx.jit(lambda m, pixels, vision: m.encode_images(pixels, vision)[0])  # one compile: same shapes
    image_hw = records[0]["image_a"].shape[:2]
    builder = assemble.example_builder(c, model_cfg, tok_path, image_hw)
    merge = model_cfg.vision.spatial_merge_size
    token_px = model_cfg.vision.patch_size * merge * image_hw[1] / builder.resized_hw[1]
    changes: dict[str, list[float]] = {}
    for record in records:
        pixels, grid = preprocess_images([record["image_a"], record["image_b"]], builder.spec.image_cfg)
        vision = build_vision_inputs(grid, model_cfg.vision, model_cfg.family)._replace(num_valid_tokens=0)
        embeds = encode(model, jnp.asarray(pixels), vision)
        gh, gw = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
        embeds = np.asarray(embeds).reshape(2, gh, gw, -1)  # [image, gh, gw, D]: Qwen3-VL keeps row-major order
        boxes = [(d["kind"], d["box"]) for d in record["differences"]]
        for kind, values in token_changes(embeds[0], embeds[1], boxes, token_px).items():
            changes.setdefault(kind, []).extend(values)
    return changes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a finished demo workdir (data/eval, run/)")
    p.add_argument("--step", type=int, default=None,
                   help="the evaluated checkpoint (run/eval/step_N); default: the earliest evaluated one, which "
                        "in a demo workdir is the warm-up")
    p.add_argument("--token-pairs", type=int, default=200, help="pairs whose vision tokens are compared (0: skip)")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    from dig_jax.eval import stats

    if a.step is None:
        evaluated = sorted(int(d[len("step_"):]) for d in os.listdir(os.path.join(a.workdir, "run", "eval"))
                           if d.startswith("step_") and d[len("step_"):].isdigit())
        if not evaluated:
            raise FileNotFoundError(f"{a.workdir}/run/eval holds no step_N evaluation")
        a.step = evaluated[0]
    predictions_path = os.path.join(a.workdir, "run", "eval", f"step_{a.step}", "predictions.jsonl")
    if not os.path.exists(predictions_path):
        raise FileNotFoundError(f"{predictions_path} does not exist: evaluate checkpoint {a.step} first "
                                "(python -m dig_jax.main --mode=eval --config.eval.checkpoint_step=N ...)")
    with open(os.path.join(a.workdir, "data", "eval", "summary.json")) as f:
        threshold = int(json.load(f)["config"]["visible_threshold"])
    records = read_records(os.path.join(a.workdir, "data", "eval", "*.array_record"))
    boxes = true_boxes(stats.read_predictions(predictions_path), records, threshold)
    recall = recall_by_visibility(boxes)
    print(f"## Recall by kind and by changed fraction (pixels with max |A - B| > {threshold}): {predictions_path}")
    print(_common.markdown_table(recall, ["kind", "changed fraction", "boxes", "recall"], {"recall": ".3f"}))
    out = {"recall_by_visibility": recall, "visible_threshold": threshold, "token_changes": []}
    if a.token_pairs > 0:
        chosen = [records[s] for s in sorted(records)[: a.token_pairs]]
        out["token_changes"] = summarise_token_changes(vision_token_changes(a.workdir, a.step, chosen))
        print(f"\n## Relative change of the merged vision tokens between A and B ({len(chosen)} pairs, "
              f"checkpoint {a.step}): largest over the tokens of each true box, and over the tokens of no box")
        print(_common.markdown_table(out["token_changes"], ["tokens of", "boxes", "median", "p10", "p90"],
                                     {"median": ".3f", "p10": ".3f", "p90": ".3f"}))
    _common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
