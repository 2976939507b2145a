"""benchmarks/curriculum_ablation.py: the arms' phases, the three-difference claim of its docstring, and
every arm at toy size (a 2-step warm-up, 2 GRPO iterations per arm, one seed, 64 px pairs).

What is checked against something the script does not compute itself: the numbers of differences of the
prompts each arm's GRPO batches held (recorded from the reward function's batches, cross-checked with the
phase the trainer logs per step), and every cell of the report's table, recomputed here from the
metrics.json / predictions.jsonl / metrics.jsonl files its rows name.
"""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import curriculum_ablation as ablation  # noqa: E402

from dig_jax.eval import stats  # noqa: E402
from dig_jax.rl.curriculum import Curriculum  # noqa: E402


def _counts_per_step(arm: str, grpo_steps: int) -> list[tuple]:
    """The selection each GRPO iteration of `arm` reads, by driving the product's Curriculum."""
    cur = Curriculum(ablation.arm_phases(arm, grpo_steps))
    state, out = cur.initial_state(), []
    for _ in range(grpo_steps):
        out.append(cur.phase(state).mixture())
        state, _ = cur.update(state, 0.99)  # a high reward: fixed-length phases must not end early
    return out


def test_arm_phases_change_at_half_whatever_the_reward():
    one, two, both = (((1,), 1.0),), (((2,), 1.0),), (((1,), 0.5), ((2,), 0.5))
    assert _counts_per_step("curriculum", 6) == [one] * 3 + [both] * 3
    assert _counts_per_step("mixture", 6) == [both] * 6
    assert _counts_per_step("reverse", 6) == [two] * 3 + [both] * 3
    assert _counts_per_step("curriculum", 5) == [one] * 2 + [both] * 3
    with pytest.raises(ValueError, match="unknown arm"):
        ablation.arm_phases("shuffled", 4)
    with pytest.raises(ValueError, match="grpo-steps"):
        ablation.arm_phases("curriculum", 1)


def test_the_command_line_refuses_unknown_arms_and_short_runs_before_running(tmp_path):
    with pytest.raises(ValueError, match="unknown arm 'bogus'"):
        ablation.main(["--arms=curriculum,bogus", f"--workdir={tmp_path / 'w'}"])
    with pytest.raises(ValueError, match="grpo-steps"):
        ablation.main(["--grpo-steps=1", f"--workdir={tmp_path / 'w'}"])
    assert not (tmp_path / "w").exists()  # nothing rendered or trained


def test_the_demo_scenes_cannot_hold_three_differences():
    """The docstring's reason for stopping at two differences: the generator refuses three in the demo's
    two-object scenes, the demo caps answers at two boxes, and drawn past the generator's check, an added
    object almost never fits beside the two objects: a third difference needs a removal to make room."""
    import numpy as np

    from configs import demo_cpu
    from data_pipeline import differences, scene, settings

    c = demo_cpu.get_config()
    g = settings.demo_settings(c.demo)
    settings.validate(g)  # the demo's own settings pass
    assert c.data.max_boxes == 2 and c.demo.max_objects == 2
    g.num_differences_max = 3
    with pytest.raises(ValueError, match="num_differences_max.*min_objects"):
        settings.validate(g)

    scene_settings = scene.SceneSettings.from_config(g)
    three = differences.DifferenceSettings(num_differences_min=3, num_differences_max=3, kinds=tuple(g.kinds),
                                           placement_radius=g.placement_radius, min_gap=g.min_gap,
                                           num_slots=g.max_objects + 3)
    scenes, realisable, adds = 0, [], 0
    for seed in range(400):
        try:
            spec = scene.sample_scene(np.random.default_rng([seed, 0, 0]), scene_settings)
        except scene.PlacementError:
            continue
        scenes += 1
        attrs = scene.random_attributes(np.random.default_rng([seed, 1]))
        adds += scene.place(np.random.default_rng([seed, 2]), attrs, spec["objects"], scene_settings) is not None
        try:
            _, records = differences.sample_differences(spec, np.random.default_rng([seed, 0, 1]), three)
        except differences.DifferenceError:
            continue
        realisable.append(sorted(r["kind"] for r in records))
    assert scenes > 150 and adds <= scenes // 100  # a third object next to the two: at most 1 % of scenes
    assert len(realisable) > 50
    assert all("add" in kinds for kinds in realisable)  # two objects take two changes; the third is an add
    assert sum("remove" not in kinds for kinds in realisable) <= len(realisable) // 100  # made room for


def _write_run(run_dir, final_step: int, rng, num_pairs: int, grpo_steps: int, two_share: float):
    """The files of one evaluated arm-seed, with random per-pair outcomes: predictions.jsonl, the
    metrics.json its evaluator would write, metrics.jsonl and grpo_batches.jsonl."""
    eval_dir = run_dir / "eval" / f"step_{final_step}"
    eval_dir.mkdir(parents=True)
    rows = []
    for i in range(num_pairs):
        num_gt, num_pred = 1 + i % 2, int(rng.integers(1, 3))
        tp = int(rng.integers(0, min(num_gt, num_pred) + 1))
        rows.append({"seed": 100 + i, "num_gt": num_gt, "num_pred": num_pred, "tp": tp,
                     "pair_f1": 2 * tp / (num_gt + num_pred), "format_ok": 1.0,
                     "reward": float(rng.uniform()), "matched_iou": [float(rng.uniform())] * min(num_gt, num_pred)})
    (eval_dir / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))
    metrics = {key: stats.per_pair(rows, metric, num_gt).value
               for key, metric, num_gt in ablation.HELD_OUT.values()}
    (eval_dir / "metrics.json").write_text(json.dumps({**metrics, "pairs": num_pairs}))
    first = final_step - grpo_steps
    rewards = rng.uniform(size=grpo_steps)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": first + k + 1, "phase": "p", "reward/mean": float(r)}) + "\n"
        for k, r in enumerate(rewards)))
    twos = int(round(4 * two_share))
    (run_dir / "grpo_batches.jsonl").write_text("".join(
        json.dumps({"step": first + k + 1, "num_differences": [2] * twos + [1] * (4 - twos)}) + "\n"
        for k in range(grpo_steps)))
    return rows, rewards


def test_the_report_is_built_from_the_files_its_rows_name(tmp_path):
    """Two seeds per arm with different random outcomes: every cell of the held-out table and of the
    bootstrap table, recomputed here from the files (the arms' rows pooled pair by pair)."""
    import ml_collections
    import numpy as np

    c = ml_collections.ConfigDict({"sft": {"steps": 10}, "grpo": {"group_size": 2, "prompts_per_batch": 4}})
    grpo_steps, final, rng = 4, 14, np.random.default_rng(0)
    files, runs = {}, []
    for arm, share in (("curriculum", 0.5), ("mixture", 0.5), ("reverse", 1.0)):
        for seed in range(2):
            run_dir = tmp_path / arm / f"seed_{seed}"
            rows, rewards = _write_run(run_dir, final, rng, 12, grpo_steps, share)
            files[arm, seed] = (rows, rewards)
            runs.append(ablation.run_summary(c, arm, seed, str(run_dir), grpo_steps))
    report = ablation.write_report(c, runs, str(tmp_path), grpo_steps, {"curriculum": 1.0})
    table = _table_rows(report)

    def pooled(arm, metric, num_gt, seeds=(0, 1)):
        per_seed = [stats.per_pair(sorted(files[arm, s][0], key=lambda r: r["seed"]), metric, num_gt)
                    for s in seeds]
        return sum(p.num for p in per_seed), sum(p.den for p in per_seed)

    for arm in ("curriculum", "mixture", "reverse"):
        for seed in range(2):
            cells = table[(arm, str(seed))]
            assert tmp_path / cells[-1] == tmp_path / arm / f"seed_{seed}" / "eval" / f"step_{final}"
            for i, (key, metric, num_gt) in enumerate(ablation.HELD_OUT.values()):
                value, se = stats.ratio_and_se(*pooled(arm, metric, num_gt, seeds=(seed,)))
                assert cells[2 + i] == f"{value:.3f} +- {se:.3f}", (arm, seed, key)
            assert cells[6] == f"{files[arm, seed][1].mean():.3f}"  # 4 iterations, all within the window
            assert cells[7] == ("1.00 / 1.00" if arm == "reverse" else "0.50 / 0.50")
        cells = table[(f"**{arm}**", "pooled")]
        for i, (key, metric, num_gt) in enumerate(ablation.HELD_OUT.values()):
            value, se = stats.ratio_and_se(*pooled(arm, metric, num_gt))
            assert cells[2 + i] == f"{value:.3f} +- {se:.3f}", (arm, key)
        means = [np.mean([r["reward"] for r in files[arm, seed][0]]) for seed in range(2)]
        spread = abs(means[0] - means[1])
        assert cells[7] == f"reward spread between seeds {spread:.3f}"

    bootstrap = report.split("(paired bootstrap)")[1]
    for arm in ("mixture", "reverse"):
        for label, seeds in (("0", (0,)), ("1", (1,)), ("pooled", (0, 1))):
            (na, da), (nb, db) = pooled("curriculum", "reward", None, seeds), pooled(arm, "reward", None, seeds)
            res = stats.paired_bootstrap(na, nb, before_den=da, after_den=db, seed=ablation.BOOTSTRAP_SEED,
                                         num_resamples=ablation.BOOTSTRAP_RESAMPLES)
            line = bootstrap.split(f"| {arm} | {label} |")[1].split("\n")[0]
            assert line.startswith(f" {na.sum() / da.sum():.3f} | {nb.sum() / db.sum():.3f} | {res.difference:+.3f} | "
                                   f"[{res.low:+.3f}, {res.high:+.3f}] |"), (arm, label)
    assert (tmp_path / "ablation.png").stat().st_size > 0


def _toy_config():
    """The demo config at test_demo.py's toy size (64 px, 2 warm-up steps, 2 prompts x group 2)."""
    from configs import demo_cpu

    c = demo_cpu.get_config()
    c.demo.resolution = 64
    c.data.min_pixels = c.data.max_pixels = 64 * 64
    c.sft.steps, c.sft.batch_size = 2, 4
    c.grpo.prompts_per_batch, c.grpo.group_size, c.grpo.max_new_tokens = 2, 2, 8
    c.eval.batch_size, c.eval.max_new_tokens = 4, 8
    c.mesh.num_devices = 1
    c.data.allow_truncated_answers = True
    c.checkpoint.use_async = False
    return c


def _table_rows(report: str) -> dict[tuple[str, str], list[str]]:
    """(arm, seed) -> the cells of the held-out table's rows."""
    table = report.split("| arm | seed |")[1].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for line in table:
        cells = [x.strip() for x in line.strip().strip("|").split("|")]
        rows[(cells[0], cells[1])] = cells
    return rows


def _cell(path: str, metric: str, num_gt, value: float) -> str:
    p = stats.per_pair(stats.read_predictions(path), metric, num_gt)
    if len(p.num) < 2:
        return f"{value:.3f}"
    _, se = stats.ratio_and_se(p.num, p.den)
    return f"{value:.3f}" if math.isnan(se) else f"{value:.3f} +- {se:.3f}"


@pytest.mark.slow
def test_every_arm_reads_its_selections_and_the_table_is_its_files(tmp_path, capsys):
    c = _toy_config()
    workdir = tmp_path / "ablation"
    report = ablation.run_ablation(c, str(workdir), seeds=1, grpo_steps=2, num_train_pairs=24, num_eval_pairs=8,
                                   workers=1)
    first, second = c.sft.steps + 1, c.sft.steps + 2  # global steps of the two GRPO iterations
    want = {"curriculum": ([1, 1], [1, 2]), "mixture": ([1, 2], [1, 2]), "reverse": ([2, 2], [1, 2])}
    phases = {"curriculum": ("one_difference", "one_or_two"), "mixture": ("one_or_two", "one_or_two"),
              "reverse": ("two_differences", "one_or_two")}
    for arm, (at_first, at_second) in want.items():
        run_dir = workdir / arm / "seed_0"
        batches = ablation.read_last_per_step(str(run_dir / "grpo_batches.jsonl"))
        assert list(batches) == [first, second], arm
        assert sorted(batches[first]["num_differences"]) == at_first, arm  # the first half's selection
        assert sorted(batches[second]["num_differences"]) == at_second, arm  # half and half
        logged = ablation.read_last_per_step(str(run_dir / "metrics.jsonl"))
        assert [logged[s]["phase"] for s in (first, second)] == list(phases[arm]), arm
        # GRPO started from the shared warm-up: the copied checkpoint, never a warm-up of its own.
        assert not any("sft/loss" in r for r in logged.values()), arm
        assert sorted(os.listdir(run_dir / "checkpoints")) == [str(c.sft.steps), str(second)], arm

    # Every cell of an arm-seed row, from the files that row names.
    rows = _table_rows(report)
    for arm in want:
        cells = rows[(arm, "0")]
        source = workdir / cells[-1]
        assert source == workdir / arm / "seed_0" / "eval" / f"step_{second}"
        metrics = json.loads((source / "metrics.json").read_text())
        predictions = str(source / "predictions.jsonl")
        assert metrics["pairs"] == 8
        for i, (key, metric, num_gt) in enumerate(ablation.HELD_OUT.values()):
            expected = _cell(predictions, metric, num_gt, metrics[key]) if key in metrics else "-"
            assert cells[2 + i] == expected, (arm, key)
        logged = ablation.read_last_per_step(str(workdir / arm / "seed_0" / "metrics.jsonl"))
        train_reward = sum(r["reward/mean"] for r in logged.values() if "reward/mean" in r) / 2
        assert cells[6] == f"{train_reward:.3f}"
        assert cells[7] == {"curriculum": "0.00 / 0.50", "mixture": "0.50 / 0.50", "reverse": "1.00 / 0.50"}[arm]
    # The bootstrap rows: each arm's reward minus the curriculum's on the same pairs.
    bootstrap = report.split("(paired bootstrap)")[1]
    for arm in ("mixture", "reverse"):
        res = stats.bootstrap_files(str(workdir / "curriculum" / "seed_0" / "eval" / f"step_{second}" /
                                        "predictions.jsonl"),
                                    str(workdir / arm / "seed_0" / "eval" / f"step_{second}" / "predictions.jsonl"),
                                    "reward", seed=ablation.BOOTSTRAP_SEED, num_resamples=ablation.BOOTSTRAP_RESAMPLES)
        line = bootstrap.split(f"| {arm} | 0 |")[1].split("\n")[0]
        assert f"| {res.difference:+.3f} | [{res.low:+.3f}, {res.high:+.3f}] |" in line, arm
    assert (workdir / "ablation.md").read_text() == report
    assert (workdir / "ablation.png").stat().st_size > 0

    # A rerun resumes: every arm-seed is evaluated, so nothing trains again, and the report is the same
    # (its times are those the runs recorded) up to the machine's load line.
    capsys.readouterr()
    again = ablation.run_ablation(c, str(workdir), seeds=1, grpo_steps=2, num_train_pairs=24, num_eval_pairs=8,
                                  workers=1)
    assert capsys.readouterr().out.count("already evaluated, skipped") == 3
    assert again.split("cpus=")[0] == report.split("cpus=")[0]
    assert "| curriculum | 0 |" not in again.split("## Time")[1]  # the recorded seconds, not a rerun's 0
