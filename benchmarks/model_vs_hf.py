"""Our JAX model against HF PyTorch on this CPU (issue 3), and bf16 training throughput on a GPU.

    python benchmarks/model_vs_hf.py                       # tiny + 0.5B-shaped Qwen2.5-VL, float32, CPU
    python benchmarks/model_vs_hf.py --presets=qwen2_5_vl_tiny --repeats=3
    python benchmarks/model_vs_hf.py                       # on a GPU: only bf16 fwd+bwd of Qwen3-VL-2B + MFU
    python benchmarks/model_vs_hf.py --gpu-smoke           # the GPU code path on a tiny model, any device

CPU comparison, per preset: HF's model is built from `hf_config.to_hf_config(cfg)` with a fixed torch seed,
saved with `save_pretrained` and loaded into ours with `hf_io.load_hf_checkpoint`, so both hold the same
weights. Both get the same input: batch 1, two random 224x224 images through `dig_jax.processing` and
`text_tokens` random text ids around them (ids built by hand: text, vision_start, image pads, vision_end,
twice, text). Before any timing the logits of the two models are compared (max abs difference).

  forward   median wall time of one full forward (vision tower + decoder + logits at every position);
            ours is one jitted call (compile excluded), HF runs under torch.inference_mode with
            torch.set_num_threads(os.cpu_count()).
  generate  median wall time of greedy generation of `new_tokens` tokens (prefill included): ours is
            `sampler.generate`, HF's `generate()`. EOS is set to an id outside the vocabulary for both,
            so every run produces exactly `new_tokens` tokens.
  decode    per-token time of the decode loop: (generate of new_tokens - generate of 1 token) /
            (new_tokens - 1), so that prefill (vision tower + prompt) cancels out.
  GB/s      weight bytes read per decode token / decode time: at batch 1 each step reads every decoder
            weight once (the tied embedding once, as the LM head), which bounds decode speed. It is
            printed next to this machine's streaming bandwidth (numpy, `_common.memory_bandwidth_gbs`).
Ratios are ours / HF for times (lower is better) and ours / HF for tokens/s (higher is better).
Bars from the issue: forward ratio <= 0.8; decode tokens/s ratio >= 1.

GPU section: forward + backward (the SFT loss of `sft.sft_objective`: log-probs of the answer tokens after a
prompt with two images) of a randomly initialised model in bfloat16 (`sharding.create_sharded` on a
one-device mesh); tokens/s and model FLOPs utilisation. Model FLOPs = 6 x (matmul parameters x the
tokens they process): decoder layers over every prompt+answer token, the LM head over answer tokens,
vision blocks over patches and patch mergers over merged tokens; attention-score FLOPs are left out
(the usual convention). The peak is a printed assumption (H100/H200 SXM dense bf16: 989 TFLOP/s).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the benchmarks folder is not a package: scripts run by path)

from dig_jax import sharding  # noqa: E402
from dig_jax.generate import sampler  # noqa: E402
from dig_jax.generate.batch import Completions, build_prompt_batch  # noqa: E402
from dig_jax.models import config as C  # noqa: E402
from dig_jax.models import hf_config, hf_io  # noqa: E402
from dig_jax.models.vlm import QwenVL, prepare_inputs  # noqa: E402
from dig_jax.processing import ImageProcessorConfig, preprocess_images  # noqa: E402
from dig_jax.rl import sft  # noqa: E402


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray     # int64[1, L]
    pixel_values: np.ndarray  # float32[N, patch_dim]
    grids: np.ndarray         # int64[2, 3]


def build_inputs(cfg: C.ModelConfig, *, text_tokens: int = 64, image_size: int = 224, num_images: int = 2,
                 rows: int = 1, seed: int = 0) -> Inputs:
    """`rows` prompts of `text_tokens` random text ids (half before, half after) and `num_images` random
    images of image_size^2 px each. The processor's minimum area is lowered to image_size^2 so that the
    images keep their size (Qwen3-VL's default minimum would upscale 224 to 256)."""
    rng = np.random.default_rng(seed)
    proc = ImageProcessorConfig.for_family(cfg.family, min_pixels=image_size * image_size)
    images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(num_images * rows)]
    pixels, grids = preprocess_images(images, proc)
    per_image = int(grids[0].prod()) // cfg.vision.spatial_merge_size**2
    vision = [cfg.vision_start_token_id] + [cfg.image_token_id] * per_image + [cfg.vision_end_token_id]
    ids = []
    for _ in range(rows):
        text = rng.integers(0, min(cfg.text.vocab_size, C.ENDOFTEXT_ID), text_tokens).tolist()
        ids.append(text[: text_tokens // 2] + vision * num_images + text[text_tokens // 2:])
    return Inputs(np.asarray(ids, np.int64), pixels.astype(np.float32), grids.astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# The two models
# ----------------------------------------------------------------------------------------------------

def hf_model(cfg: C.ModelConfig, seed: int = 0):
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config.to_hf_config(cfg))
    cls = (transformers.Qwen2_5_VLForConditionalGeneration if cfg.family == "qwen2_5_vl"
           else transformers.Qwen3VLForConditionalGeneration)
    torch.manual_seed(seed)
    return cls(config).eval()


def hf_kwargs(x: Inputs, cfg: C.ModelConfig) -> dict:
    import torch

    ids = torch.tensor(x.input_ids)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(x.pixel_values),
                image_grid_thw=torch.tensor(x.grids), mm_token_type_ids=(ids == cfg.image_token_id).int())


def decode_weight_bytes(model: QwenVL, cfg: C.ModelConfig) -> int:
    """Bytes of the decoder weights one batch-1 decode step reads: every layer, the final norm and the LM
    head (for a tied model that is the embedding table; an untied one reads only one embedding row)."""
    total = _common.tree_bytes(nnx.state(model.language_model, nnx.Param))
    if not cfg.tie_word_embeddings:
        total -= _common.tree_bytes(nnx.state(model.language_model.embed_tokens, nnx.Param))
    return total


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids, mask, position_ids, pixel_values, vision):
    """Logits float32[B, L, V] of one full forward (vision tower + decoder), as one compiled call."""
    return nnx.merge(graphdef, state).forward(input_ids, mask, position_ids, pixel_values, vision)[0]


# ----------------------------------------------------------------------------------------------------
# CPU comparison
# ----------------------------------------------------------------------------------------------------

def compare_preset(name: str, *, repeats: int, gen_repeats: int, new_tokens: int, text_tokens: int,
                   image_size: int, bandwidth: dict, seed: int = 0) -> dict:
    import torch

    cfg = C.preset(name)
    x = build_inputs(cfg, text_tokens=text_tokens, image_size=image_size, seed=seed)
    t0 = time.perf_counter()
    hf = hf_model(cfg, seed)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = hf_io.load_hf_checkpoint(tmp)
    print(f"[{name}] built and loaded both models in {time.perf_counter() - t0:.1f} s", flush=True)
    if ours.cfg != cfg:
        raise RuntimeError(f"[{name}] the checkpoint's config.json read back differs from the preset")

    # ---- identical logits first ------------------------------------------------------------------
    mask = np.ones_like(x.input_ids)
    position_ids, _, vision = prepare_inputs(cfg, x.input_ids, mask, x.grids)
    graphdef, state = nnx.split(ours)
    args = (jnp.asarray(x.input_ids, jnp.int32), jnp.asarray(mask, jnp.int32), jnp.asarray(position_ids),
            jnp.asarray(x.pixel_values), jax.tree.map(jnp.asarray, vision))
    run_ours = lambda: jax.block_until_ready(_forward(graphdef, state, *args))
    kw = hf_kwargs(x, cfg)
    with torch.inference_mode():
        run_hf = lambda: hf(**kw).logits
        want = run_hf().float().numpy()
    got = np.asarray(run_ours())
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    print(f"[{name}] logits [1, {x.input_ids.shape[1]}, {cfg.text.vocab_size}]: max |ours - HF| = {diff:.2e} "
          f"(max |HF| = {scale:.2e})", flush=True)
    if not diff <= 1e-3 * max(scale, 1.0):
        raise RuntimeError(f"[{name}] logits disagree with HF (max abs diff {diff:.3e}): timings would not "
                           "compare the same computation")

    # ---- forward ---------------------------------------------------------------------------------
    ours_fwd, _ = _common.median_seconds(run_ours, repeats)
    with torch.inference_mode():
        hf_fwd, _ = _common.median_seconds(run_hf, repeats)
    print(f"[{name}] forward: ours {ours_fwd:.4f} s, HF {hf_fwd:.4f} s", flush=True)

    # ---- greedy generation, exactly new_tokens tokens ----------------------------------------------
    never = cfg.text.vocab_size  # an id the argmax can never return: no early stop
    batch = build_prompt_batch(cfg, x.input_ids, mask, x.grids, x.pixel_values,
                               length_multiple=x.input_ids.shape[1],  # no prompt padding
                               pad_patches_to=x.pixel_values.shape[0])
    batch = jax.tree.map(jnp.asarray, batch)
    key = jax.random.key(0)

    def gen_ours(n):
        scfg = sampler.SamplingConfig(max_new_tokens=n, temperature=0.0, eos_token_ids=(never,),
                                      pad_token_id=cfg.pad_token_id)
        return lambda: jax.block_until_ready(sampler.generate(ours, batch, key, scfg))

    def gen_hf(n):
        return lambda: hf.generate(**kw, max_new_tokens=n, do_sample=False, eos_token_id=never,
                                   pad_token_id=cfg.pad_token_id)

    # Decode speed = the extra time of new_tokens - 1 more tokens over a 1-token generate (same prefill).
    ours_gen, _ = _common.median_seconds(gen_ours(new_tokens), gen_repeats)
    ours_one, _ = _common.median_seconds(gen_ours(1), gen_repeats)
    ours_tokens = np.asarray(gen_ours(new_tokens)().tokens)[0]
    with torch.inference_mode():
        hf_gen, _ = _common.median_seconds(gen_hf(new_tokens), gen_repeats)
        hf_one, _ = _common.median_seconds(gen_hf(1), gen_repeats)
        hf_tokens = gen_hf(new_tokens)()[0, x.input_ids.shape[1]:].numpy()
    if len(hf_tokens) != new_tokens:
        raise RuntimeError(f"[{name}] HF generated {len(hf_tokens)} tokens instead of {new_tokens}")
    same = int(np.argmin(np.append(ours_tokens == hf_tokens, False)))  # length of the agreeing prefix
    print(f"[{name}] generate {new_tokens} (1): ours {ours_gen:.3f} s ({ours_one:.3f} s), HF {hf_gen:.3f} s "
          f"({hf_one:.3f} s); greedy tokens agree on the first {same}/{new_tokens}", flush=True)

    weight_bytes = decode_weight_bytes(ours, cfg)
    ours_dec = max(ours_gen - ours_one, 1e-9) / (new_tokens - 1)
    hf_dec = max(hf_gen - hf_one, 1e-9) / (new_tokens - 1)
    row = {
        "preset": name, "prompt_len": int(x.input_ids.shape[1]), "logits_max_diff": diff,
        "tokens_agree": f"{same}/{new_tokens}",
        "fwd_ours_s": ours_fwd, "fwd_hf_s": hf_fwd, "fwd_ratio": ours_fwd / hf_fwd,
        "gen_ours_s": ours_gen, "gen_hf_s": hf_gen,
        "gen_tok_s_ours": new_tokens / ours_gen, "gen_tok_s_hf": new_tokens / hf_gen,
        "gen_speed_ratio": hf_gen / ours_gen,
        "dec_tok_s_ours": 1 / ours_dec, "dec_tok_s_hf": 1 / hf_dec, "dec_speed_ratio": hf_dec / ours_dec,
        "weight_MB": weight_bytes / 1e6,
        "GBps_ours": weight_bytes / ours_dec / 1e9, "GBps_hf": weight_bytes / hf_dec / 1e9,
        "GBps_machine": bandwidth["best"],
    }
    row["bw_fraction_ours"] = row["GBps_ours"] / bandwidth["best"]
    return row


# ----------------------------------------------------------------------------------------------------
# GPU: bf16 forward + backward throughput and MFU
# ----------------------------------------------------------------------------------------------------

def train_throughput(name: str, *, rows: int, text_tokens: int, answer_tokens: int, image_size: int,
                     repeats: int, dtype=jnp.bfloat16, param_dtype=jnp.float32, peak_tflops: float | None = None,
                     cfg: C.ModelConfig | None = None) -> dict:
    """Forward + backward of the SFT loss on `rows` prompts (two images each) + answers, computing in
    `dtype` with parameters stored in `param_dtype` (the trainer's model.dtype / model.param_dtype)."""
    cfg = cfg or C.preset(name)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = sharding.create_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype), mesh)
    counts = _common.matmul_params(model)
    graphdef, params = nnx.split(model, nnx.Param)
    x = build_inputs(cfg, text_tokens=text_tokens, image_size=image_size, rows=rows)
    mask = np.ones_like(x.input_ids)
    prompts = build_prompt_batch(cfg, x.input_ids, mask, x.grids, x.pixel_values.astype(np.float32),
                                 length_multiple=64)
    prompts = jax.tree.map(jnp.asarray, prompts)
    rng = np.random.default_rng(1)
    answers = Completions(jnp.asarray(rng.integers(0, 1000, (rows, answer_tokens)), jnp.int32),
                          jnp.ones((rows, answer_tokens), jnp.int32))
    grad_fn = jax.jit(jax.value_and_grad(sft.sft_objective, argnums=1, has_aux=True), static_argnums=(0, 4))
    run = lambda: jax.block_until_ready(grad_fn(graphdef, params, prompts, answers, 64))
    t0 = time.perf_counter()
    (loss, _), _ = run()
    compile_s = time.perf_counter() - t0
    if not np.isfinite(float(loss)):
        raise RuntimeError(f"[{name}] non-finite loss {float(loss)} in the throughput step")
    seconds, _ = _common.median_seconds(run, repeats, warmup=0)

    lp = prompts.input_ids.shape[1]
    tokens = rows * (lp + answer_tokens)
    patches = int(x.pixel_values.shape[0])
    flops = _common.train_flops(counts, tokens=tokens, scored_tokens=rows * answer_tokens, patches=patches,
                                merge=cfg.vision.spatial_merge_size)
    peak, peak_note = _common.peak_flops(jax.devices()[0], peak_tflops)
    row = {"model": name, "device": jax.devices()[0].device_kind, "dtype": jnp.dtype(dtype).name,
           "param_dtype": jnp.dtype(param_dtype).name, "rows": rows,
           "tokens": tokens, "patches": patches, "compile_s": compile_s, "step_s": seconds,
           "tokens_per_s": tokens / seconds, "TFLOP/s": flops / seconds / 1e12,
           "MFU": None if peak is None else flops / seconds / peak, "params_B": _common.tree_size(params) / 1e9}
    print(f"[{name}] fwd+bwd {row['dtype']}: {seconds:.4f} s/step, {tokens} tokens + {patches} patches; "
          f"model FLOPs {flops:.3e}/step; peak assumed {peak_note}", flush=True)
    return row


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

CPU_COLUMNS = ["preset", "prompt_len", "logits_max_diff", "tokens_agree", "fwd_ours_s", "fwd_hf_s", "fwd_ratio",
               "gen_ours_s", "gen_hf_s", "gen_speed_ratio", "dec_tok_s_ours", "dec_tok_s_hf", "dec_speed_ratio",
               "weight_MB", "GBps_ours", "GBps_hf", "GBps_machine", "bw_fraction_ours"]
GPU_COLUMNS = ["model", "device", "dtype", "param_dtype", "params_B", "rows", "tokens", "patches", "compile_s", "step_s",
               "tokens_per_s", "TFLOP/s", "MFU"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", default="qwen2_5_vl_tiny,qwen2_5_vl_0_5b_shape",
                   help="comma-separated model presets for the CPU comparison")
    p.add_argument("--repeats", type=int, default=5, help="timed forward runs per model (median)")
    p.add_argument("--gen-repeats", type=int, default=3, help="timed generate runs per model (median)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--bandwidth-mib", type=int, default=1024, help="array size of the memory-bandwidth probe")
    p.add_argument("--quick", action="store_true", help="tiny preset, 1 repeat, 4 new tokens (smoke test)")
    p.add_argument("--gpu", action="store_true", help="run the bf16 throughput section (default: when on a GPU)")
    p.add_argument("--gpu-smoke", action="store_true", help="the GPU section on qwen3_vl_tiny, on any device")
    p.add_argument("--gpu-model", default="qwen3_vl_2b")
    p.add_argument("--gpu-rows", type=int, default=8)
    p.add_argument("--gpu-image-size", type=int, default=448)
    p.add_argument("--gpu-answer-tokens", type=int, default=128)
    p.add_argument("--gpu-param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="parameter storage in the GPU section (computation is bfloat16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the assumed peak (TFLOP/s)")
    p.add_argument("--skip-cpu", action="store_true", help="only the GPU section")
    p.add_argument("--json", default="", help="also write the rows to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, list[dict]]:
    a = parse_args(argv)
    on_gpu = jax.devices()[0].platform == "gpu"
    out: dict[str, list[dict]] = {"cpu": [], "gpu": []}
    print(f"# model_vs_hf  jax {jax.__version__} on {jax.devices()[0].device_kind}; {_common.machine_line()}",
          flush=True)
    if on_gpu and not a.skip_cpu:
        print("on a GPU the HF comparison is skipped: HF would run on the CPU and ours on the GPU", flush=True)
    elif not a.skip_cpu and not a.gpu_smoke:
        import torch

        torch.set_num_threads(os.cpu_count())
        presets = ["qwen2_5_vl_tiny"] if a.quick else [p for p in a.presets.split(",") if p]
        repeats, gen_repeats = (1, 1) if a.quick else (a.repeats, a.gen_repeats)
        new_tokens = 4 if a.quick else a.new_tokens
        bandwidth = _common.memory_bandwidth_gbs((64 if a.quick else a.bandwidth_mib) << 20)
        print(f"memory bandwidth (numpy, 1 thread): read {bandwidth['read']:.1f} GB/s, copy {bandwidth['copy']:.1f} "
              f"GB/s (read + write)", flush=True)
        for name in presets:
            out["cpu"].append(compare_preset(name, repeats=repeats, gen_repeats=gen_repeats, new_tokens=new_tokens,
                                             text_tokens=a.text_tokens, image_size=a.image_size, bandwidth=bandwidth))
        print(f"\n## float32, batch 1, 2 images of {a.image_size}px + {a.text_tokens} text tokens, {new_tokens} "
              f"greedy tokens; torch threads {torch.get_num_threads()}; {_common.machine_line()}")
        print(_common.markdown_table(out["cpu"], CPU_COLUMNS, {"logits_max_diff": ".1e"}))
        print("fwd_ratio = ours/HF time (bar <= 0.8); gen/dec_speed_ratio = ours/HF tokens per s (bar >= 1); "
              "GBps = decoder weight bytes / decode s per token; bw_fraction_ours = GBps_ours / GBps_machine")
    if a.gpu or a.gpu_smoke or on_gpu:
        if a.gpu_smoke:
            row = train_throughput("qwen3_vl_tiny", rows=2, text_tokens=16, answer_tokens=8, image_size=64,
                                   repeats=1, param_dtype=jnp.dtype(a.gpu_param_dtype), peak_tflops=a.peak_tflops)
        else:
            row = train_throughput(a.gpu_model, rows=a.gpu_rows, text_tokens=a.text_tokens,
                                   answer_tokens=a.gpu_answer_tokens, image_size=a.gpu_image_size,
                                   repeats=a.repeats, param_dtype=jnp.dtype(a.gpu_param_dtype),
                                   peak_tflops=a.peak_tflops)
        out["gpu"].append(row)
        print(f"\n## bfloat16 forward + backward (SFT loss), {_common.machine_line()}")
        print(_common.markdown_table(out["gpu"], GPU_COLUMNS, {"MFU": ".1%"}))
    _common.write_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
