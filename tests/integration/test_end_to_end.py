"""A few-step end-to-end run through the CLI: train (SFT + GRPO, sharded over 8 devices), evaluate on
one device (the checkpoint restores onto another mesh), export to Hugging Face, reload in transformers.

Oracles: the rendered records for the ground truth in predictions.jsonl, the predictions themselves for
the aggregate metrics, and transformers' Qwen3-VL for the exported weights (its logits on a real DiG
batch must equal ours).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline import loader, schema
from dig_jax import assemble
from tests.integration import tiny_config
from tests.integration.conftest import REPO, read_metrics, single_device

_spec = importlib.util.spec_from_file_location("hf_oracle", os.path.join(REPO, "tests", "models", "hf_oracle.py"))
oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(oracle)

SUMMARY_KEYS = {"precision", "recall", "f1", "pair_f1", "mean_iou", "count_accuracy", "format_rate", "reward", "pairs"}
LINE_KEYS = {"seed", "answer", "pred_boxes", "gt_boxes", "gt_kinds", "matched_iou", "tp", "num_pred", "num_gt",
             "pair_f1", "format_ok", "reward"}
ONE_DEVICE = ["--config.mesh.num_devices=1", "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1"]


def cli(train_files, workdir, *args):
    cmd = [sys.executable, "-m", "dig_jax.main", f"--config={REPO}/tests/integration/tiny_config.py:{train_files}",
           f"--workdir={workdir}", "--config.grpo.steps=1", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def records_by_seed(pattern):
    out = {}
    for path in loader.list_shards(pattern):
        reader = loader.open_reader(path)
        try:
            for i in range(reader.num_records()):
                record = schema.decode(reader.read([i])[0])
                out[int(record["seed"])] = record
        finally:
            reader.close()
    return out


@pytest.mark.slow
def test_train_eval_export_reload_in_hf(train_files, tmp_path):
    workdir = str(tmp_path / "run")
    # ---- train: 2 SFT + 1 GRPO steps on the 2x2x2 mesh ---------------------------------------------
    cli(train_files, workdir)
    assert [m["phase"] for m in read_metrics(workdir)] == ["sft", "sft", "one"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))

    # ---- eval on one device --------------------------------------------------------------------------
    out = cli(train_files, workdir, "--mode=eval", *ONE_DEVICE)
    eval_dir = os.path.join(workdir, "eval", "step_3")
    assert f"evaluation of step 3 on 4 pairs -> {eval_dir}" in out
    with open(os.path.join(eval_dir, "metrics.json")) as f:
        metrics = json.load(f)
    with open(os.path.join(eval_dir, "predictions.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert SUMMARY_KEYS <= metrics.keys()
    assert len(lines) == metrics["pairs"] == 4 and all(LINE_KEYS <= line.keys() for line in lines)
    # Ground truth straight from the rendered records; counts per difference number add up.
    records = records_by_seed(train_files)
    for line in lines:
        record = records[line["seed"]]
        np.testing.assert_allclose(line["gt_boxes"], record["boxes"][:record["num_differences"]])
        assert line["num_gt"] == record["num_differences"]
    for m in {line["num_gt"] for line in lines}:
        assert metrics[f"by_num_differences/{m}/pairs"] == sum(line["num_gt"] == m for line in lines)
    assert sum(v for k, v in metrics.items() if k.startswith("by_kind/") and k.endswith("/boxes")) == \
        sum(line["num_gt"] for line in lines)
    # The aggregates are what the per-pair lines say.
    tp, n_pred, n_gt = (sum(line[k] for line in lines) for k in ("tp", "num_pred", "num_gt"))
    assert metrics["recall"] == pytest.approx(tp / n_gt)
    assert metrics["precision"] == pytest.approx(tp / n_pred if n_pred else float(n_gt == 0))
    assert metrics["pair_f1"] == pytest.approx(np.mean([line["pair_f1"] for line in lines]))
    assert metrics["format_rate"] == pytest.approx(np.mean([line["format_ok"] for line in lines]))
    assert metrics["reward"] == pytest.approx(np.mean([line["reward"] for line in lines]))
    with Image.open(os.path.join(eval_dir, "predictions.png")) as png:
        assert png.size[0] > 2 * tiny_config.RESOLUTION and png.size[1] >= tiny_config.RESOLUTION

    # ---- export and reload in transformers -----------------------------------------------------------
    export_dir = str(tmp_path / "hf")
    out = cli(train_files, workdir, "--mode=export", f"--export_dir={export_dir}")
    assert f"exported step 3 to {export_dir}" in out
    assert {"config.json", "tokenizer.json"} <= set(os.listdir(export_dir))
    assert glob.glob(os.path.join(export_dir, "*.safetensors"))

    c = single_device(tiny_config.get_config(train_files))
    tok = assemble.load_run_tokenizer(c, assemble.tokenizer_path(c, workdir, assemble.model_family(c)))
    cfg = assemble.model_config_from(c, tok)
    with open(os.path.join(export_dir, "config.json")) as f:
        hf_json = json.load(f)
    assert hf_json["image_token_id"] == cfg.image_token_id < cfg.text.vocab_size  # the compact ids travel
    ours, step = assemble.restore_model(c, workdir, cfg, assemble.make_mesh(c))
    assert step == 3

    import torch
    from transformers import Qwen3VLForConditionalGeneration

    hf = Qwen3VLForConditionalGeneration.from_pretrained(export_dir, dtype=torch.float32).eval()
    # One real DiG batch (two images per prompt), as the trainer builds it.
    builder = assemble.example_builder(c, cfg, assemble.tokenizer_path(c, workdir, cfg.family),
                                       assemble.dataset_image_hw(train_files))
    batch = next(iter(assemble.pair_dataset(c, train_files, builder, batch_size=2, selection=None, seed=0,
                                            shuffle=False, num_epochs=1)))
    grids = batch["image_grid_thw"].reshape(-1, 3).astype(np.int64)
    pixels = batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1]).astype(np.float32)
    assert pixels.shape[0] == np.prod(grids, axis=1).sum()
    hf_batch = oracle.Batch(batch["prompt_ids"].astype(np.int64), batch["prompt_mask"].astype(np.int64), grids, pixels)
    want = oracle.hf_logits(hf, hf_batch, cfg.image_token_id)
    got = np.asarray(ours(hf_batch.input_ids, pixels, grids, hf_batch.attention_mask))
    valid = hf_batch.attention_mask > 0
    assert (hf_batch.input_ids == cfg.image_token_id).sum() == np.prod(grids, axis=1).sum() // 4
    np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4 * np.abs(want[valid]).max())
