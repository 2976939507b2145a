"""Smoke tests of the model benchmarks: each script's main() on the tiny preset, plus the helpers.

Timings are never asserted (they depend on the machine); what is checked is that the scripts run the
code paths they claim (same logits as HF, same greedy tokens, the trainer's steps, the GPU section's
FLOP accounting) and that the helpers compute what they say, against hand counts.
"""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _common  # noqa: E402


def _finite_positive(row, keys):
    for k in keys:
        assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0, (k, row[k])


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------

def test_markdown_table_cells_and_missing_values():
    table = _common.markdown_table([{"a": "x", "b": 0.123456}, {"a": "y"}], ["a", "b"], {"b": ".2f"})
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x | 0.12 |", "| y | - |"]


def test_median_seconds_calls_warmup_then_repeats():
    calls = []
    median, times = _common.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and median == sorted(times)[1]


def test_matmul_params_and_flops_match_a_hand_count():
    from flax import nnx

    from dig_jax.models import config as C
    from dig_jax.models.vlm import QwenVL

    cfg = C.qwen2_5_vl_tiny(vocab_size=1000)
    model = nnx.eval_shape(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)))
    counts = _common.matmul_params(model)
    t, v = cfg.text, cfg.vision
    d, f, h = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * h, t.num_key_value_heads * h
    layer = d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * f + 2 * d  # q/k/v (+bias), o, MLP, 2 norms
    assert counts["text_layers"] == t.num_hidden_layers * layer + d  # + the final norm
    assert counts["lm_head"] == t.vocab_size * d  # tied: the embedding table, counted once as the head
    w, vf = v.hidden_size, v.intermediate_size
    block = 2 * w + 3 * w * w + 3 * w + w * w + w + 2 * (w * vf + vf) + vf * w + w  # norms, qkv, proj, SwiGLU
    assert counts["vision_patch"] == v.depth * block + v.patch_dim * w  # patch embedding has no bias
    m = w * v.spatial_merge_size**2
    assert counts["vision_merged"] == w + m * m + m + m * d + d  # ln_q, two linears with biases
    flops = _common.train_flops(counts, tokens=10, scored_tokens=3, patches=16, merge=2)
    want = 6 * (counts["text_layers"] * 10 + counts["lm_head"] * 3 + counts["vision_patch"] * 16
                + counts["vision_merged"] * 4)
    assert flops == want


def test_peak_flops_known_unknown_and_override():
    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert _common.peak_flops(Dev("NVIDIA H100 80GB HBM3"))[0] == 989e12
    assert _common.peak_flops(Dev("cpu"))[0] is None
    assert _common.peak_flops(Dev("cpu"), 2.0)[0] == 2e12


def test_memory_bandwidth_probe_returns_rates():
    bw = _common.memory_bandwidth_gbs(8 << 20, repeats=1)
    assert all(np.isfinite(x) and x > 0 for x in bw.values()) and bw["best"] == max(bw["read"], bw["copy"])


# ----------------------------------------------------------------------------------------------------
# scripts
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_model_vs_hf_quick_matches_hf_and_reports(capsys):
    import model_vs_hf

    out = model_vs_hf.main(["--quick"])
    (row,) = out["cpu"]
    assert row["preset"] == "qwen2_5_vl_tiny"
    assert row["logits_max_diff"] < 1e-4  # same weights, same inputs: the same computation is timed
    assert row["tokens_agree"] == "4/4"  # greedy generation agrees with HF generate()
    assert row["prompt_len"] == 64 + 2 * (2 + 64)  # 64 text tokens + 2 x (vision start, 8x8 pads, vision end)
    _finite_positive(row, ["fwd_ours_s", "fwd_hf_s", "gen_ours_s", "gen_hf_s", "weight_MB", "GBps_machine"])
    assert abs(row["fwd_ratio"] - row["fwd_ours_s"] / row["fwd_hf_s"]) < 1e-12
    assert "| qwen2_5_vl_tiny |" in capsys.readouterr().out


@pytest.mark.slow
def test_model_vs_hf_gpu_smoke_accounts_flops():
    import model_vs_hf

    (row,) = model_vs_hf.main(["--gpu-smoke", "--peak-tflops=1"])["gpu"]
    assert row["dtype"] == "bfloat16" and row["rows"] == 2 and row["patches"] == 2 * 2 * 16  # 64px: 4x4 patches
    _finite_positive(row, ["step_s", "tokens_per_s", "TFLOP/s"])
    assert abs(row["MFU"] - row["TFLOP/s"] / 1.0) < 1e-9  # against the 1 TFLOP/s peak given


@pytest.mark.slow
def test_train_step_quick_runs_the_trainer_steps():
    import train_step

    (row,) = train_step.main(["--quick"])
    assert (row["config"], row["rows"], row["G"], row["new_tokens"]) == ("qwen3_vl_tiny", 2, 2, 4)
    assert 1 <= row["mean_len"] <= 4
    _finite_positive(row, ["sft_s", "grpo_rollout_s", "grpo_scoring_s", "grpo_update_s", "grpo_total_s",
                           "sft_TFLOPs", "update_TFLOPs"])


@pytest.mark.slow
def test_demo_learnability_trains_and_scores_every_checkpoint(tmp_path):
    """The learnability table: one view, two warm-up steps, a checkpoint scored after each."""
    import json
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(repo, "benchmarks", "demo_learnability.py"), "--views=12:0.12:2:2",
           "--steps=2", "--eval_every=1", "--train_pairs=24", "--eval_pairs=4", f"--workdir={tmp_path / 'w'}",
           f"--json={out}"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["view"] == "12:0.12:2:2" for r in rows)
    assert 20 < rows[0]["box_side_px"] < 80  # a close-up: objects tens of pixels across at 128 px
    assert all(0.0 <= r["f1_one_difference"] <= 1.0 for r in rows)
    assert "| 12:0.12:2:2 |" in result.stdout


def test_reward_by_count_against_hand_computed_rewards(capsys, tmp_path):
    """The expected reward of 1-3 boxes, computed here by hand from the reward's formula
    r = 0.9 (0.5 F1 + 0.5 mean IoU) + 0.1 (default RewardConfig, well-formatted answers)."""
    import json

    import reward_by_count

    out = reward_by_count.main(["--q=0.25,0.5", f"--json={tmp_path / 'r.json'}"])
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == out["rows"]

    def r(f1, iou):
        return 0.9 * (0.5 * f1 + 0.5 * iou) + 0.1

    for row in out["rows"]:
        q = row["q"]
        any2, any3 = 1 - (1 - q) ** 2, 1 - (1 - q) ** 3  # at least one of 2 / 3 boxes hits
        # one difference: the matcher keeps the best box, IoU 0.7 if any hits, else 0.2
        assert row["1diff_1box"] == pytest.approx(r(q, 0.2 + 0.5 * q), abs=1e-12)
        assert row["1diff_2box"] == pytest.approx(r(2 / 3 * any2, 0.2 + 0.5 * any2), abs=1e-12)
        assert row["1diff_3box"] == pytest.approx(r(0.5 * any3, 0.2 + 0.5 * any3), abs=1e-12)
        # two differences: box 2 on true box 2; boxes 1 and 3 on true box 1, the better one matched
        assert row["2diff_1box"] == pytest.approx(r(2 / 3 * q, 0.2 + 0.5 * q), abs=1e-12)
        assert row["2diff_2box"] == pytest.approx(r(q, 0.2 + 0.5 * q), abs=1e-12)
        assert row["2diff_3box"] == pytest.approx(r(0.4 * (q + any2), ((0.2 + 0.5 * q) + (0.2 + 0.5 * any2)) / 2),
                                                  abs=1e-12)
    assert out["rows"][1]["2diff_3box"] == pytest.approx(0.555625)  # the same by hand at q = 1/2
    # 2 boxes beat 1 on a one-difference pair below q* = 2 - (0.5 + 0.5 d) / (0.5 * 2/3 + 0.5 d), d = 0.5
    assert out["q_star"] == pytest.approx(5 / 7, abs=1e-6) and out["q_star_f1"] == pytest.approx(0.5, abs=1e-6)
    assert "| 0.5 | 0.527 | 0.584 |" in capsys.readouterr().out
    wider = reward_by_count.main(["--q=0.5", "--hit-iou=0.9", "--miss-iou=0.1"])
    assert wider["q_star"] == pytest.approx(2 - 0.9 / (1 / 3 + 0.4), abs=1e-6)

    # The count decision, from the same expectations by hand: over- and under-counting costs, and the
    # belief in two differences above which two boxes pay (a count term adds w to both costs, the
    # extra-box penalty v to the over-counting one).
    for row, d in zip(out["rows"], out["decisions"]):
        over, under = row["1diff_1box"] - row["1diff_2box"], row["2diff_2box"] - row["2diff_1box"]
        assert d["over-count cost"] == pytest.approx(over) and d["under-count cost"] == pytest.approx(under)
        assert d["balancing penalty"] == pytest.approx(under - over)
        assert d["p* paper"] == (0.0 if over <= 0 else pytest.approx(over / (over + under)))
        assert d["p* count_weight 0.1"] == pytest.approx((over + 0.1) / (over + under + 0.2))
        assert d["p* extra_box_penalty 0.125"] == pytest.approx((over + 0.125) / (over + 0.125 + under))
    assert out["decisions"][1]["p* paper"] == 0.0  # q = 1/2: a second box on a one-difference pair pays


def test_reward_by_count_groups_an_evaluation_by_true_and_answered_boxes(tmp_path, capsys):
    import json

    import reward_by_count

    rows = [(1, 1, 1, 0.9), (1, 1, 0, 0.1), (1, 2, 1, 0.7), (2, 2, 2, 1.0), (2, 2, 1, 0.6)]  # gt, pred, tp, reward
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"seed": i, "num_gt": g, "num_pred": k, "tp": tp, "reward": r}) + "\n"
                            for i, (g, k, tp, r) in enumerate(rows)))
    out = reward_by_count.main(["--q=0.5", f"--predictions={path}"])
    assert out["answer_counts"] == [
        {"true boxes": 1, "answered boxes": 1, "pairs": 2, "mean TP": 0.5, "mean reward": pytest.approx(0.5)},
        {"true boxes": 1, "answered boxes": 2, "pairs": 1, "mean TP": 1.0, "mean reward": pytest.approx(0.7)},
        {"true boxes": 2, "answered boxes": 2, "pairs": 2, "mean TP": 1.5, "mean reward": pytest.approx(0.8)}]
    assert "| 1 | 2 | 1 | 1.000 | 0.700 |" in capsys.readouterr().out


def test_reward_by_count_groups_an_evaluation_by_the_kinds_of_its_pairs(tmp_path, capsys):
    import json

    import reward_by_count

    rows = [(["color"], 1, 0, 0.4), (["color"], 2, 1, 0.6), (["remove"], 1, 1, 0.9),
            (["remove", "color"], 1, 1, 0.7), (["color", "remove"], 2, 2, 1.0)]  # kinds, pred, tp, reward
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"seed": i, "num_gt": len(k), "num_pred": n, "tp": tp, "reward": r,
                                        "gt_kinds": k}) + "\n" for i, (k, n, tp, r) in enumerate(rows)))
    out = reward_by_count.main(["--q=0.5", f"--predictions={path}"])
    nan = pytest.approx(float("nan"), nan_ok=True)
    assert out["pair_kinds"] == [
        {"differences": "color", "pairs": 2, "answered 1": 0.5, "answered 2": 0.5, "count accuracy": 0.5,
         "mean TP": 0.5, "mean reward": pytest.approx(0.5), "reward, 1 box": 0.4, "reward, 2 boxes": 0.6},
        {"differences": "remove", "pairs": 1, "answered 1": 1.0, "answered 2": 0.0, "count accuracy": 1.0,
         "mean TP": 1.0, "mean reward": pytest.approx(0.9), "reward, 1 box": 0.9, "reward, 2 boxes": nan},
        {"differences": "color+remove", "pairs": 2, "answered 1": 0.5, "answered 2": 0.5, "count accuracy": 0.5,
         "mean TP": 1.5, "mean reward": pytest.approx(0.85), "reward, 1 box": 0.7, "reward, 2 boxes": 1.0}]
    assert "| color+remove | 2 | 0.500 | 0.500 | 0.500 | 1.500 | 0.850 | 0.700 | 1.000 |" in capsys.readouterr().out


def test_aot_plan_matrix_and_unknown_variants(capsys):
    import aot_plan

    default = aot_plan.jobs("", "")
    assert len(default) == 4 * 3 + 1 and ("4b@1024", "v5p-32") in default
    assert aot_plan.jobs("8b", "v5e-64,v6e-32") == [("8b", "v5e-64"), ("8b", "v6e-32")]
    assert aot_plan.main(["--models=no_such_variant", "--topologies=v5e-4"]) == []  # skipped, nothing compiled
    assert "skipping no_such_variant: configs/dig_qwen3vl.py: unknown variant" in capsys.readouterr().out


@pytest.mark.slow
def test_aot_plan_smoke_plans_the_demo_on_v5e_4(capsys):
    pytest.importorskip("libtpu", reason="libtpu is not installed: `pip install -e '.[tpu]'` compiles for TPU "
                                         "topologies on this CPU")
    import aot_plan

    (row,) = aot_plan.main(["--config=configs/demo_cpu.py", "--models=demo@128", "--topologies=v5e-4",
                            "--programs=eval_generation"])
    assert (row["model"], row["topology"], row["verdict"], row["worst"]) == ("demo@128", "v5e-4", "FITS",
                                                                           "eval_generation")
    _finite_positive(row, ["live_GiB", "hbm_GiB", "token_GFLOPs", "decode_step_ms", "eval_coll_GiB"])
    assert row["live_GiB"] < row["hbm_GiB"] == 15.75
    assert f"| demo@128 | v5e-4 | {row['mesh']} | FITS |" in capsys.readouterr().out


def test_change_visibility_measures_against_hand_made_images_and_embeddings():
    import change_visibility as cv

    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0:2, 0:4, 1] = 30  # 8 pixels changed by 30 > 24
    b[2:4, 0:4, 2] = 20  # 8 pixels changed by 20: below the threshold
    assert cv.changed_fraction(a, b, (0, 0, 4, 4), threshold=24) == pytest.approx(8 / 16)
    assert cv.changed_fraction(a, b, (0.5, 0.5, 3.2, 1.0), threshold=24) == pytest.approx(1.0)  # cut to [0,4)x[0,1)
    assert cv.changed_fraction(a, b, (6, 6, 6, 9), threshold=24) == 0.0  # empty inside the image
    assert cv.best_iou((0, 0, 4, 4), np.array([[0, 0, 4, 2], [2, 0, 6, 4]])) == pytest.approx(0.5)
    assert cv.best_iou((0, 0, 4, 4), np.zeros((0, 4))) == 0.0

    boxes = ([{"kind": "color", "changed fraction": f, "found": hit} for f, hit in
              ((0.1, False), (0.2, False), (0.8, True), (0.9, True))]
             + [{"kind": "remove", "changed fraction": 0.5, "found": True}])
    rows = cv.recall_by_visibility(boxes, bins=2)
    assert rows == [{"kind": "color", "changed fraction": "0.10-0.50", "boxes": 2, "recall": 0.0},
                    {"kind": "color", "changed fraction": "0.50-0.90", "boxes": 2, "recall": 1.0},
                    {"kind": "color", "changed fraction": "all", "boxes": 4, "recall": 0.5},
                    {"kind": "remove", "changed fraction": "0.50-0.50", "boxes": 1, "recall": 1.0},
                    {"kind": "remove", "changed fraction": "all", "boxes": 1, "recall": 1.0}]

    e_a = np.ones((2, 2, 3))  # a 2 x 2 token grid, one token per 32 px
    e_b = e_a.copy()
    e_b[0, 1] = [1.0, 1.0, 4.0]  # |diff| = 3, |a| = sqrt(3), |b| = sqrt(18)
    e_b[1, 0] = [1.0, 1.0, 2.0]  # |diff| = 1, |b| = sqrt(6)
    out = cv.token_changes(e_a, e_b, [("color", (40, 0, 60, 30))], token_px=32)
    assert out["color"] == [pytest.approx(3 / np.sqrt(np.sqrt(3) * np.sqrt(18)))]
    assert out["no difference"] == [pytest.approx(1 / np.sqrt(np.sqrt(3) * np.sqrt(6)))]
    assert "no difference" not in cv.token_changes(e_a, e_b, [("remove", (0, 0, 64, 64))], token_px=32)


def test_change_visibility_recall_on_rendered_pairs_equals_the_direct_count(tmp_path, capsys):
    """The script's recall per kind, on rendered pairs with hand-made predictions (every first true box
    answered exactly, the others answered off target), equals the count of first boxes per kind."""
    import collections
    import json

    import change_visibility as cv
    from tests.tiny_data import render_tiny_dataset

    pattern = render_tiny_dataset(str(tmp_path / "data" / "eval"), 6, seed=3, differences=(1, 2), num_shards=1)
    records = cv.read_records(pattern)
    lines, found, total = [], collections.Counter(), collections.Counter()
    for seed, record in records.items():
        boxes = [d["box"] for d in record["differences"]]
        kinds = [d["kind"] for d in record["differences"]]
        lines.append({"seed": seed, "gt_boxes": boxes, "gt_kinds": kinds,
                      "pred_boxes": [boxes[0], [0.0, 0.0, 1.0, 1.0]]})
        found[kinds[0]] += 1
        total.update(kinds)
    step_dir = tmp_path / "run" / "eval" / "step_7"
    step_dir.mkdir(parents=True)
    (step_dir / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = cv.main([f"--workdir={tmp_path}", "--step=7", "--token-pairs=0"])
    overall = {r["kind"]: (r["boxes"], r["recall"])
               for r in out["recall_by_visibility"] if r["changed fraction"] == "all"}
    assert overall == {k: (total[k], pytest.approx(found[k] / total[k])) for k in total}
    assert "| all |" in capsys.readouterr().out
    assert cv.main([f"--workdir={tmp_path}", "--token-pairs=0"]) == out  # the earliest evaluated step
    with pytest.raises(FileNotFoundError, match="step_8/predictions.jsonl"):
        cv.main([f"--workdir={tmp_path}", "--step=8", "--token-pairs=0"])
