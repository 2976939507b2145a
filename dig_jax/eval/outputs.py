"""What every evaluator leaves in its output directory: predictions.jsonl, metrics.json, predictions.png."""
from __future__ import annotations

import json
import os

from dig_jax.eval.visualize import image_grid


def write_outputs(out_dir: str, lines: list[dict], metrics: dict, panels: list, columns: int = 2) -> None:
    """One JSON line per scored example, the metrics, and the drawn panels as a grid (when any)."""
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    if panels:
        image_grid(panels, columns).save(os.path.join(out_dir, "predictions.png"))
