"""Training step times (issue 4): the supervised step, and a GRPO iteration split into its parts.

    python benchmarks/train_step.py                                  # tiny presets + 0.5B shape, this CPU
    python benchmarks/train_step.py --presets=qwen2_5_vl_0_5b_shape --repeats=2
    python benchmarks/train_step.py --gpu                            # (on a GPU) Qwen3-VL-2B shape, bf16, MFU
    python benchmarks/train_step.py --gpu-smoke                      # the GPU code path on a tiny model

Everything runs through the trainer's own code on synthetic data (no dataset): random 224x224 image
pairs with one random box go through `processing.examples.ExampleBuilder` (the project's tiny tokenizer with the real
special ids, the family's image processor, the chat template), are stacked into a batch, and then
  SFT step    `prompt_batch` + `sft.sft_step` (AdamW from `training.state.optimizer_for`), as the
              trainer's supervised branch times it ("time/step");
  GRPO        the work of `grpo.grpo_iteration` (one minibatch), each part blocked on before its clock
              stops: rollout = `grpo.rollout`'s sampling of G answers per prompt (`sampler.generate`,
              temperature 1, up to `new_tokens`); scoring = decoding the texts + DiG reward + advantages
              + the frozen reference's log-probs (`grpo.reference_logprobs`, KL 0.01); update =
              `grpo.grpo_step`.
Times are medians over `repeats` iterations after one warm-up iteration (which compiles; its extra
time is printed as `compile_s`). A randomly initialised policy rarely samples EOS, so rollouts run to
`new_tokens`: these are worst-case rollout lengths.

With `--demo-dir=DIR` (the workdir of a finished `python -m dig_jax.demo` run, e.g. `make demo`'s demo_out)
it measures instead the demo's own GRPO iterations, through `grpo.grpo_iteration` itself: the policy
restored from the demo's warm-up checkpoint (step sft.steps), real batches of its first curriculum phase,
and for each batch one iteration with response-length buckets (`grpo.response_bucket`, 64) and one
without (every iteration scores all grpo.max_new_tokens = 80 positions), from the same parameters and
key, so both sample the same answers and differ only in the positions the reference scoring and the
update run over. Trained answers end early (~35 tokens), which a random policy's never do.

On a GPU (`--gpu`, or automatically when the default device is one) the same measurement runs on the
Qwen3-VL-2B shape in bfloat16 (float32 parameters by default) and reports the model FLOPs utilisation
of the SFT step and of the GRPO update (6 x parameters x tokens, see `_common.train_flops`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

from configs import base as base_config  # noqa: E402
from data_pipeline.differences import KINDS  # noqa: E402
from dig_jax import sharding  # noqa: E402
from dig_jax.generate import sampler  # noqa: E402
from dig_jax.generate.batch import answers, prompt_batch  # noqa: E402
from dig_jax.models import config as C  # noqa: E402
from dig_jax.models.vlm import QwenVL  # noqa: E402
from dig_jax.processing.examples import ExampleBuilder, InputSpec, max_answer_tokens  # noqa: E402
from dig_jax.rl import grpo, rewards, sft  # noqa: E402
from dig_jax.training import state as training_state  # noqa: E402
from dig_jax.processing import ImageProcessorConfig, build_tiny_tokenizer, load_tokenizer  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ----------------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------------

def example_builder(family: str, workdir: str, image_size: int, max_boxes: int = 4) -> ExampleBuilder:
    """The trainer's per-example transform with the project's tiny tokenizer (built in `workdir`)."""
    tok_dir = os.path.join(workdir, f"tokenizer_{family}")
    build_tiny_tokenizer(tok_dir, family=family)
    tok_path = os.path.join(tok_dir, "tokenizer.json")
    c = base_config.get_config()
    image_cfg = ImageProcessorConfig.for_family(family, min_pixels=image_size * image_size)
    spec = InputSpec(family=family, image_cfg=image_cfg, prompt_text=c.data.prompt, add_vision_id=True,
                     label_mode="kind", max_boxes=max_boxes, prompt_bucket=64, answer_len=1)
    probe = ExampleBuilder(spec, tok_path, (image_size, image_size))
    spec = InputSpec(**{**spec.__dict__, "answer_len": max_answer_tokens(probe, max_boxes) + 2})
    return ExampleBuilder(spec, tok_path, (image_size, image_size))


def synthetic_batch(builder: ExampleBuilder, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` examples: a random image, its copy with one recoloured rectangle, that rectangle as the box."""
    rng = np.random.default_rng(seed)
    h, w = builder.image_hw
    examples = []
    for i in range(n):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        b = a.copy()
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        x1, y1 = x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2))
        b[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
        record = {"image_a": a, "image_b": b, "boxes": np.asarray([[x0, y0, x1, y1]], np.float32),
                  "kinds": [KINDS[int(rng.integers(len(KINDS)))]], "num_differences": 1, "seed": seed * 1000 + i}
        examples.append(builder(record))
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def grpo_iteration_timed(graphdef, tx, params, opt_state, reference, batch, key, *, cfg, tokenizer, mesh, group,
                         prompt_bucket, chunk, sampling_config, reward_config, loss_config):
    """The work of `grpo.grpo_iteration` with one minibatch, each part blocked on before its clock stops.

    (The scoring clock includes the reference log-probs, as in `grpo.grpo_iteration`.)
    Returns (params, opt_state, {"rollout", "scoring", "update"} seconds, mean completion length).
    """
    model = nnx.merge(graphdef, params)
    ro = grpo.rollout(model, batch, cfg=cfg, tokenizer=tokenizer, sampling_config=sampling_config,
                      group_size=group, reward_fn=rewards.dig_reward(reward_config), rng=key, mesh=mesh,
                      prompt_bucket=prompt_bucket, loss_config=loss_config)
    t0 = time.perf_counter()
    ref_logp = jax.block_until_ready(grpo.reference_logprobs(graphdef, reference, ro.prompts, ro.completions,
                                                             chunk=chunk))
    seconds = {"rollout": ro.seconds["rollout"], "scoring": ro.seconds["scoring"] + time.perf_counter() - t0}
    t0 = time.perf_counter()
    params, opt_state, out = grpo.grpo_step(graphdef, tx, params, opt_state, ro.prompts, ro.completions,
                                            ro.old_logp, ref_logp, jnp.asarray(ro.advantages), loss_config,
                                            chunk=chunk)
    out = jax.device_get(out)
    seconds["update"] = time.perf_counter() - t0
    if not np.isfinite(float(out["loss"])):
        raise RuntimeError(f"GRPO loss is {float(out['loss'])}")
    length = float(np.asarray(jax.device_get(ro.completions.mask)).sum(axis=1).mean())
    return params, opt_state, seconds, length


# ----------------------------------------------------------------------------------------------------
# The demo's GRPO iterations, with and without response-length buckets
# ----------------------------------------------------------------------------------------------------

DEMO_COLUMNS = ["variant", "scored_positions", "response_length", "rollout_s", "scoring_s", "update_s", "iteration_s",
                "vs_cap"]


def demo_bucket_split(demo_dir: str, iterations: int) -> list[dict]:
    """Median seconds of the demo's GRPO iteration parts with buckets and at the cap (module docstring)."""
    from configs import demo_cpu
    from dig_jax import assemble
    from dig_jax.training import setup as training_setup

    c = demo_cpu.get_config()
    c.data.train_files = os.path.join(demo_dir, "data", "train", "*.array_record")
    c.data.eval_files = os.path.join(demo_dir, "data", "eval", "*.array_record")
    run_dir = os.path.join(demo_dir, "run")
    if not os.path.isdir(os.path.join(run_dir, "checkpoints", str(c.sft.steps))):
        raise FileNotFoundError(f"--demo-dir: no warm-up checkpoint {run_dir}/checkpoints/{c.sft.steps} "
                                "(run `python -m dig_jax.demo --workdir=DIR` first)")
    run = training_setup.setup(c, run_dir)
    model, _ = assemble.restore_model(c, run_dir, run.model_cfg, run.mesh, step=c.sft.steps,
                                      patches_per_image=run.builder.patches_per_image)
    params = nnx.state(model, nnx.Param)
    tx = training_state.optimizer_for(c, "grpo", params)
    data = training_state.data_iterator(run, "grpo", run.curriculum.initial_state())
    cap = int(c.grpo.max_new_tokens)
    variants = {"buckets": run.grpo, "cap": dataclasses.replace(run.grpo, response_buckets=(cap,))}
    times = {name: [] for name in variants}
    for i in range(iterations + 1):  # the first iteration of each variant compiles: not timed
        batch, key = next(data), jax.random.key(i)
        for name, setup in variants.items():
            state = jax.tree.map(lambda x: x.copy(), params)  # the update donates its state
            opt_state = training_state.init_optimizer_state(tx, state, run.mesh)
            reference = training_state.fresh_reference(c, "grpo", state)
            with sharding.activate(run.mesh):
                _, _, metrics = grpo.grpo_iteration(setup, tx, state, opt_state, reference, batch, key)
            if i:
                times[name].append(metrics)
        print(f"demo GRPO iteration {i}/{iterations}: longest answer scored over "
              f"{times['buckets'][-1]['grpo/scored_length'] if i else '-'} positions", flush=True)
    rows = []
    for name, runs in times.items():
        median = lambda key: statistics.median(m[key] for m in runs)  # noqa: E731
        parts = {part: median(f"time/{part}") for part in ("rollout", "scoring", "update")}
        rows.append({"variant": name, "scored_positions": median("grpo/scored_length"),
                     "response_length": median("grpo/response_length"),
                     **{f"{part}_s": v for part, v in parts.items()},
                     "iteration_s": statistics.median(sum(m[f"time/{p}"] for p in parts) for m in runs)})
    for row in rows:
        row["vs_cap"] = row["iteration_s"] / rows[-1]["iteration_s"]
    return rows


# ----------------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------------

def run_config(preset: str, *, prompts: int, group: int, new_tokens: int, repeats: int, workdir: str,
               image_size: int = 224, dtype: str = "float32", param_dtype: str = "float32",
               peak_tflops: float | None = None, seed: int = 0) -> dict:
    """SFT step and GRPO iteration times of `preset`; SFT uses prompts x group rows (the GRPO update's)."""
    cfg = C.preset(preset)
    c = base_config.get_config()
    c.model.preset = preset
    c.model.dtype, c.model.param_dtype = dtype, param_dtype
    c.sft.batch_size = prompts * group
    c.grpo.prompts_per_batch, c.grpo.group_size, c.grpo.max_new_tokens = prompts, group, new_tokens
    c.grpo.num_minibatches, c.grpo.kl_coef, c.grpo.scoring_chunk = 1, 0.01, 64
    c.data.prompt_bucket = 64

    builder = example_builder(cfg.family, workdir, image_size)
    tokenizer = load_tokenizer(builder.tokenizer_path)
    sft_batch = synthetic_batch(builder, prompts * group, seed)
    grpo_batches = [synthetic_batch(builder, prompts, seed + 1 + i) for i in range(repeats + 1)]

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    with sharding.activate(mesh):
        model = sharding.create_sharded(
            lambda: QwenVL(cfg, rngs=nnx.Rngs(seed), dtype=DTYPES[dtype], param_dtype=DTYPES[param_dtype]), mesh)
    counts = _common.matmul_params(model)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    n_params = _common.tree_size(params)
    row = {"config": preset, "dtype": dtype, "rows": prompts * group, "prompts": prompts, "G": group,
           "new_tokens": new_tokens, "params_M": n_params / 1e6}

    # ---- supervised step ---------------------------------------------------------------------------
    tx = training_state.optimizer_for(c, "sft", params)
    opt_state = training_state.init_optimizer_state(tx, params, mesh)
    chunk = int(c.grpo.scoring_chunk)
    sft_times = []
    with sharding.activate(mesh):
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            pb = prompt_batch(cfg, sft_batch, mesh=mesh, prompt_bucket=c.data.prompt_bucket)
            params, opt_state, out = sft.sft_step(graphdef, tx, params, opt_state, pb,
                                                  answers(sft_batch, mesh), chunk=chunk)
            loss = float(jax.device_get(out["loss"]))
            sft_times.append(time.perf_counter() - t0)
    if not np.isfinite(loss):
        raise RuntimeError(f"[{preset}] SFT loss is {loss}")
    row["sft_s"] = statistics.median(sft_times[1:])
    row["sft_compile_s"] = sft_times[0] - row["sft_s"]
    sft_tokens = pb.input_ids.shape[0] * (pb.input_ids.shape[1] + sft_batch["answer_ids"].shape[1])
    sft_patches = int(pb.pixel_values.shape[0])
    sft_flops = _common.train_flops(counts, tokens=sft_tokens, scored_tokens=int(sft_batch["answer_ids"].size),
                                    patches=sft_patches, merge=cfg.vision.spatial_merge_size)
    del opt_state, tx
    print(f"[{preset}] sft step: {row['sft_s']:.3f} s (first call {sft_times[0]:.1f} s), loss {loss:.3f}", flush=True)

    # ---- GRPO iteration ----------------------------------------------------------------------------
    tx = training_state.optimizer_for(c, "grpo", params)
    opt_state = training_state.init_optimizer_state(tx, params, mesh)
    reference = jax.tree.map(jnp.copy, params)
    loss_config = grpo.GRPOConfig.from_config(c.grpo)
    reward_config = rewards.RewardConfig(family=cfg.family)
    sampling_config = sampler.SamplingConfig(max_new_tokens=new_tokens, temperature=1.0,
                                             eos_token_ids=(cfg.eos_token_id,), pad_token_id=cfg.pad_token_id)
    parts: dict[str, list[float]] = {"rollout": [], "scoring": [], "update": [], "total": [], "length": []}
    key = jax.random.key(seed)
    with sharding.activate(mesh):
        for batch in grpo_batches:
            key, sub = jax.random.split(key)
            t0 = time.perf_counter()
            params, opt_state, seconds, length = grpo_iteration_timed(
                graphdef, tx, params, opt_state, reference, batch, sub, cfg=cfg, tokenizer=tokenizer, mesh=mesh,
                group=group, prompt_bucket=c.data.prompt_bucket, chunk=chunk, sampling_config=sampling_config,
                reward_config=reward_config, loss_config=loss_config)
            parts["total"].append(time.perf_counter() - t0)
            for k, v in seconds.items():
                parts[k].append(v)
            parts["length"].append(length)
    for k in ("rollout", "scoring", "update", "total"):
        row[f"grpo_{k}_s"] = statistics.median(parts[k][1:])
    row["grpo_compile_s"] = parts["total"][0] - row["grpo_total_s"]
    row["mean_len"] = float(np.mean(parts["length"][1:]))
    print(f"[{preset}] grpo iteration: {row['grpo_total_s']:.3f} s (rollout {row['grpo_rollout_s']:.3f}, scoring "
          f"{row['grpo_scoring_s']:.3f}, update {row['grpo_update_s']:.3f}); first {parts['total'][0]:.1f} s",
          flush=True)

    # ---- utilisation (meaningful on an accelerator with a known peak) ------------------------------
    peak, note = _common.peak_flops(jax.devices()[0], peak_tflops)
    rows = prompts * group
    pb = prompt_batch(cfg, grpo_batches[-1], group_size=group, prompt_bucket=c.data.prompt_bucket)
    # The update encodes each distinct image once (G rows share it) and scores every row's completion.
    update_flops = _common.train_flops(counts, tokens=rows * (pb.input_ids.shape[1] + new_tokens),
                                       scored_tokens=rows * new_tokens, patches=int(pb.pixel_values.shape[0]),
                                       merge=cfg.vision.spatial_merge_size)
    row["sft_TFLOPs"] = sft_flops / row["sft_s"] / 1e12
    row["update_TFLOPs"] = update_flops / row["grpo_update_s"] / 1e12
    if peak is not None:
        row["sft_MFU"] = sft_flops / row["sft_s"] / peak
        row["update_MFU"] = update_flops / row["grpo_update_s"] / peak
    row["peak"] = note
    return row


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

SIZES = {  # (prompts, G, new tokens) per preset unless given on the command line
    "qwen2_5_vl_tiny": (2, 4, 32), "qwen3_vl_tiny": (2, 4, 32),
    "qwen2_5_vl_0_5b_shape": (1, 2, 16), "qwen3_vl_2b": (4, 8, 128),
}
COLUMNS = ["config", "dtype", "params_M", "rows", "G", "new_tokens", "mean_len", "sft_s", "grpo_rollout_s",
           "grpo_scoring_s", "grpo_update_s", "grpo_total_s", "sft_compile_s", "grpo_compile_s"]
MFU_COLUMNS = ["config", "sft_TFLOPs", "sft_MFU", "update_TFLOPs", "update_MFU"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="qwen2_5_vl_tiny,qwen3_vl_tiny,qwen2_5_vl_0_5b_shape")
    p.add_argument("--prompts", type=int, default=None, help="prompts per GRPO batch (default: per preset)")
    p.add_argument("--group", type=int, default=None, help="GRPO group size G (default: per preset)")
    p.add_argument("--new-tokens", type=int, default=None, help="max new tokens per rollout (default: per preset)")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations after the warm-up (median)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--quick", action="store_true", help="qwen3_vl_tiny only, 1 prompt, G=2, 4 tokens, 1 repeat")
    p.add_argument("--gpu", action="store_true", help="the Qwen3-VL-2B bf16 run (default when on a GPU)")
    p.add_argument("--gpu-smoke", action="store_true", help="the GPU code path (bf16 + MFU) on qwen3_vl_tiny")
    p.add_argument("--gpu-param-dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--demo-dir", default="", help="a finished demo's workdir: time its GRPO iterations with and "
                                                  "without response-length buckets instead")
    p.add_argument("--json", default="")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    a = parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    print(f"# train_step  jax {jax.__version__} on {jax.devices()[0].device_kind}; {_common.machine_line()}",
          flush=True)
    if a.demo_dir:
        rows = demo_bucket_split(a.demo_dir, a.repeats)
        print(f"\n## the demo's GRPO iteration (s, median of {a.repeats} after a warm-up), with and without "
              f"response-length buckets; {_common.machine_line()}")
        print(_common.markdown_table(rows, DEMO_COLUMNS, {"vs_cap": ".2f"}))
        _common.write_json(a.json, rows)
        return rows
    if a.quick:
        jobs = [("qwen3_vl_tiny", (1, 2, 4), "float32", "float32", 1, 64)]
    elif a.gpu_smoke:
        jobs = [("qwen3_vl_tiny", (1, 2, 4), "bfloat16", a.gpu_param_dtype, 1, 64)]
    elif a.gpu or on_gpu:
        jobs = [("qwen3_vl_2b", SIZES["qwen3_vl_2b"], "bfloat16", a.gpu_param_dtype, a.repeats, a.image_size)]
    else:
        jobs = [(p, SIZES.get(p, (1, 2, 16)), "float32", "float32", a.repeats, a.image_size)
                for p in a.presets.split(",") if p]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for preset, (prompts, group, new_tokens), dtype, param_dtype, repeats, image_size in jobs:
            rows.append(run_config(preset, prompts=a.prompts or prompts, group=a.group or group,
                                   new_tokens=a.new_tokens or new_tokens, repeats=repeats, workdir=workdir,
                                   image_size=image_size, dtype=dtype, param_dtype=param_dtype,
                                   peak_tflops=a.peak_tflops))
    print(f"\n## training step times (s, median of {jobs[0][4]} after a warm-up), 2 images of "
          f"{jobs[0][5]}px per prompt; {_common.machine_line()}")
    print(_common.markdown_table(rows, COLUMNS))
    print(f"\nachieved model TFLOP/s (6 x matmul parameters x tokens) and utilisation; peak: {rows[0]['peak']}")
    print(_common.markdown_table(rows, MFU_COLUMNS, {"sft_MFU": ".1%", "update_MFU": ".1%"}))
    _common.write_json(a.json, rows)
    return rows


if __name__ == "__main__":
    main()
