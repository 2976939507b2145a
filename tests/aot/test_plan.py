"""Plans compiled for real TPU topologies on this CPU (libtpu): a small run that fits on v5e:2x2, with
its argument bytes checked against a hand count, and the 4B run on one v5e chip, which does not fit."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.aot.conftest import requires_libtpu
from tests.integration import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GIB = 1024 ** 3

pytestmark = requires_libtpu


def _small_run():
    """The tiny run with one text layer 512 wide and one vision block: weights large enough that the
    TPU's tile padding of the small arrays (norm scales, the step count) stays far below 0.1%."""
    c = tiny_config.get_config()
    c.model.overrides = {
        "vision": {"depth": 1, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "out_hidden_size": 512,
                   "deepstack_visual_indexes": (0,)},
        "text": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 1, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "head_dim": 128, "mrope_section": (24, 20, 20)},
    }
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over the 4 chips
    c.grpo.num_minibatches = 2  # 2 minibatches of 2 prompts x 2 samples
    return c


@pytest.fixture(scope="module")
def small_plan(tmp_path_factory):
    from dig_jax.aot import plan

    plan.configure_environment()
    workdir = str(tmp_path_factory.mktemp("aot_small"))
    out = plan.plan(_small_run(), "v5e-4", workdir, image_size=tiny_config.RESOLUTION,
                    only=("policy_reshard", "grpo_generation", "grpo_generation_training_mesh", "grpo_update"))
    return out, workdir


def _hand_count(tree) -> int:
    """Bytes per chip: each array's bytes divided by the product of the mesh axes its spec names."""
    import jax

    total = 0
    for x in jax.tree.leaves(tree):
        mesh_shape = x.sharding.mesh.shape
        axes = [a for entry in x.sharding.spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
        total += math.prod(x.shape) * x.dtype.itemsize // math.prod(mesh_shape[a] for a in axes)
    return total


def test_the_small_run_fits_and_reports_its_programs(small_plan):
    out, workdir = small_plan
    assert out["verdict"] == "FITS" and out["why"] == []
    assert (out["chips"], out["hosts"], out["mesh"]) == (4, 1, {"data": 1, "fsdp": 4, "tensor": 1})
    assert out["hbm_per_chip"] == int(15.75 * GIB) and out["hbm_source"] == "compiler"
    programs = {p["name"]: p for p in out["programs"]}
    assert list(programs) == ["policy_reshard", "grpo_generation", "grpo_generation_training_mesh", "grpo_update"]
    update, gen, reshard = programs["grpo_update"], programs["grpo_generation"], programs["policy_reshard"]
    assert update["shapes"]["rows"] == 4 and gen["shapes"]["rows"] == 8 and gen["shapes"]["new_tokens"] == 12
    # "auto" on one host of 4 chips with 2 KV heads: tensor groups of 2, the 8 rows over a data axis of 2
    assert out["sampling_layout"] == {"data": 2, "fsdp": 1, "tensor": 2}
    # live at once = the compiled peak + the resident state that is not an argument (the generation reads
    # the sampling copy: the training parameters stay live beside it)
    resident = out["resident"]
    assert gen["live_at_once"] == gen["memory"]["peak"] + resident["params"] + resident["opt_state"] + resident[
        "reference"]
    assert reshard["live_at_once"] == reshard["memory"]["peak"] + resident["opt_state"] + resident["reference"]
    rollout = sum(v for k, v in update["live_outside"].items() if k.startswith("rollout."))
    assert rollout > 0 and update["live_at_once"] == update["memory"]["peak"] + out["resident"]["reference"] + rollout
    compared = programs["grpo_generation_training_mesh"]
    assert compared["comparison"] and not gen["comparison"]  # compiled to compare, outside the verdict
    assert out["live_at_once"] == max(p["live_at_once"] for p in (reshard, gen, update))
    # The copy moves the policy once (float32 -> the tiny run's float32 compute dtype, half a copy per
    # chip on tensor=2); a decode step on the sampling layout moves far less than on the FSDP mesh.
    ro = out["rollout"]
    assert ro["reshard_bytes"] == reshard["collectives_per_call"]["ici_received"] > 0
    assert ro["sampling"]["ici_bytes_per_step"] < ro["training_mesh"]["ici_bytes_per_step"] / 4
    assert gen["collectives"]["per_unknown_iteration"].get("all-gather", 0) < 1024  # no weights (KiBs at least)
    assert compared["collectives"]["per_unknown_iteration"]["all-gather"] > 100 * 1024
    assert ro["sampling"]["kv_cache_bytes_per_chip"] == ro["training_mesh"]["kv_cache_bytes_per_chip"]
    assert ro["total_s"] == ro["reshard_s"] + ro["sampling"]["generation_s"] and ro["speedup"] > 1
    assert out["margin_bytes"] == out["hbm_per_chip"] - out["live_at_once"] > 0
    # FSDP: weights are gathered for the forward, gradients reduced back to their shards
    assert update["collectives"]["counted"].get("all-gather", 0) > 0
    assert update["collectives"]["counted"].get("reduce-scatter", 0) + update["collectives"]["counted"].get(
        "all-reduce", 0) > 0
    # every loop of the update has a trip count the parser finds; the generation's one open loop is the
    # decode loop, counted at every one of its 11 steps after the first token
    assert update["collectives"]["unknown_loops"] == 0 and gen["collectives"]["unknown_loops"] == 1
    per_step = gen["collectives"]["per_unknown_iteration"]
    assert sum(per_step.values()) > 0
    assert gen["collectives_per_call"]["operand"] == gen["collectives"]["total"] + 11 * sum(per_step.values())
    assert gen["per_token"]["ici_bytes"] == sum(gen["collectives"]["wire_per_unknown_iteration"].values())
    assert gen["per_token"]["flops"] > 0 and update["roofline"]["bound_s"] > 0
    with open(os.path.join(workdir, "aot_plan.json")) as f:
        assert json.load(f)["verdict"] == "FITS"
    with open(os.path.join(workdir, "aot_plan.md")) as f:
        md = f.read()
    assert "**FITS**" in md and "| grpo_update | 4 |" in md and "| grpo_generation_training_mesh (not run) | 8 |" in md
    assert "| sampling layout data=2 x fsdp=1 x tensor=2 |" in md


def test_the_updates_arguments_are_the_parameters_and_optimiser_state_per_chip(small_plan, tmp_path):
    """The compiler's argument bytes of the update against a hand count of each shard: parameters +
    AdamW state (+ the minibatch, ~6% of it). The TPU lays arrays out in tiles of 128 lanes (an
    int32[4, 12] minibatch of tokens occupies a 4 x 128 tile), so the compiler's count may exceed the
    logical one by that padding, here about 0.3%, all from the small batch arrays."""
    import jax

    from dig_jax.aot import plan, programs, topologies

    out, _ = small_plan
    update = next(p for p in out["programs"] if p["name"] == "grpo_update")
    parts, _ = plan.run_parts(_small_run(), str(tmp_path), topologies.get("v5e-4").describe().devices, 1,
                              image_size=tiny_config.RESOLUTION)
    _, opt_state = programs.abstract_opt_state(parts.config, "grpo", parts.params, parts.mesh)
    params_bytes = _hand_count(parts.params)
    assert params_bytes == out["resident"]["params"]
    assert params_bytes * 4 == pytest.approx(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(parts.params)),
                                             rel=0.01)  # nearly every weight is split over the 4 chips
    hand = params_bytes + _hand_count(opt_state) + update["arguments"]["batch"]
    assert update["arguments"]["batch"] < 0.1 * hand
    assert hand <= update["memory"]["arguments"] <= 1.005 * hand


def test_the_4b_run_on_one_v5e_chip_does_not_fit(tmp_path):
    """The CLI: the compiler refuses the update (4.4B float32 weights + AdamW on 15.75 GiB) within
    seconds; the plan names it, exits with status 3, and prints no traceback."""
    cmd = [sys.executable, "-m", "dig_jax.main", "--mode=aot", "--config=configs/dig_qwen3vl.py:4b",
           "--topology=v5e-1", "--aot_programs=grpo_update", f"--workdir={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "**DOES NOT FIT**" in result.stdout and "- grpo_update: refused by the compiler" in result.stdout
    with open(tmp_path / "aot_plan.json") as f:
        out = json.load(f)
    (update,) = out["programs"]
    assert not update["fits"] and "RESOURCE_EXHAUSTED" in update["refusal"] and "15.75G" in update["refusal"]
    assert out["resident"]["params"] == 4 * out["parameters"]  # float32 master weights, all on the one chip
