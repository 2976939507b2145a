"""Shared helpers of the model benchmarks: timing, machine facts, parameter sizes, markdown tables.

Timing is a median over repeated calls after warm-up (the first call of a jitted function compiles),
and every callable is expected to block until its result exists (`jax.block_until_ready` / `.numpy()`),
otherwise asynchronous dispatch would time only the launch.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all timings) of `repeats` calls of `fn` after `warmup` untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def memory_bandwidth_gbs(nbytes: int = 1 << 30, repeats: int = 3) -> dict[str, float]:
    """This machine's streaming memory bandwidth in GB/s (1e9 bytes/s), measured with numpy.

    `read`: a float32 sum over an `nbytes` array (bytes read / time), the access pattern of a
    weight-bound decode step; `copy`: np.copyto between two such arrays, counting read + written bytes.
    Best of `repeats` runs each (bandwidth is a capacity: the fastest run is the least disturbed one).
    Both are single-threaded numpy loops, so on a multi-channel server they may understate what all
    cores together can pull; the decode figure from XLA (multi-threaded) is compared against the larger.
    """
    n = nbytes // 4
    src = np.ones(n, np.float32)
    dst = np.empty_like(src)
    read, copy = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        float(src.sum())
        read.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    del src, dst
    return {"read": max(read), "copy": max(copy), "best": max(max(read), max(copy))}


def machine_line() -> str:
    """CPU count and load average: other work on a shared machine moves every number of a benchmark."""
    load = os.getloadavg()
    return f"cpus={os.cpu_count()} load_avg(1/5/15 min)={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of a pytree (parameters, optimiser state...)."""
    import jax

    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype") and hasattr(x, "shape")))


def tree_size(tree) -> int:
    """Number of scalars in the array leaves of a pytree."""
    import jax

    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


def markdown_table(rows: Sequence[dict], columns: Sequence[str], formats: dict[str, str] | None = None) -> str:
    """A markdown table of `rows` (dicts) restricted to `columns`; missing cells print as '-'."""
    formats = formats or {}

    def cell(row, col):
        value = row.get(col)
        if value is None:
            return "-"
        if isinstance(value, float):
            return format(value, formats.get(col, ".3g"))
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Model FLOPs (for utilisation figures)
# ----------------------------------------------------------------------------------------------------

PEAK_BF16_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}  # dense bf16, SXM, per device


def matmul_params(model) -> dict[str, int]:
    """Parameter counts of a `QwenVL` by what they multiply: decoder layers (every token), LM head (scored
    tokens), vision blocks + patch embedding (every patch), mergers (every merged token). Lookups (the
    input embedding, Qwen3's learned vision position table) do no matmul and are left out; a tied LM
    head counts the embedding table once, as the head."""
    from flax import nnx

    out = {"text_layers": 0, "lm_head": 0, "vision_patch": 0, "vision_merged": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(var.get_value().shape))
        keys = [str(k) for k in path]
        if keys[0] == "language_model":
            if keys[1] in ("layers", "norm"):
                out["text_layers"] += n
            elif keys[1] == "lm_head":
                out["lm_head"] += n
        elif keys[1] in ("blocks", "patch_embed"):
            out["vision_patch"] += n
        elif keys[1] in ("merger", "deepstack_merger_list"):
            out["vision_merged"] += n
    if model.cfg.tie_word_embeddings:
        out["lm_head"] = model.cfg.text.vocab_size * model.cfg.text.hidden_size
    return out


def train_flops(counts: dict[str, int], *, tokens: int, scored_tokens: int, patches: int, merge: int = 2) -> float:
    """Model FLOPs of one forward + backward: 6 x parameters x the inputs each matmul sees (the usual
    6ND rule applied per part; attention-score FLOPs are not counted)."""
    return 6.0 * (counts["text_layers"] * tokens + counts["lm_head"] * scored_tokens
                  + counts["vision_patch"] * patches + counts["vision_merged"] * (patches // merge**2))


def peak_flops(device, override_tflops: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, a sentence saying where the number comes from) for `device`."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops, f"{flops / 1e12:g} TFLOP/s dense bf16 ({name.upper()} SXM datasheet) for '{device.device_kind}'"
    return None, f"unknown for '{device.device_kind}' (pass --peak-tflops)"


def write_json(path: str | None, obj) -> None:
    """Writes the benchmark's rows to `path` (the --json flag) when one is given."""
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
