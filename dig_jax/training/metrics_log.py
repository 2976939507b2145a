"""Training metrics: TensorBoard event files, a JSONL file, and a progress line with rate and ETA.

Only process 0 writes files (every host computes the same global metrics). The JSONL file is appended
to, so a resumed run continues the same log; each line carries the step and the phase.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax
import numpy as np


def _to_float(value) -> float | None:
    try:
        f = float(np.asarray(value))
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else f  # keep NaN/inf visible in the log: they are a symptom


class MetricsLogger:
    def __init__(self, workdir: str, *, total_steps: int, enabled: bool | None = None, stream=sys.stdout):
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self.total_steps = max(total_steps, 1)
        self.stream = stream
        self._start_time = time.time()
        self._start_step: int | None = None
        self._writer = None
        self._jsonl = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
            self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, object], *, phase: str = "") -> None:
        if not self.enabled:
            return
        scalars = {k: f for k, v in metrics.items() if (f := _to_float(v)) is not None}
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        record = {"step": int(step), "phase": phase, "time": round(time.time(), 3), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")

    def progress(self, step: int, metrics: Mapping[str, object], *, phase: str = "", keys: tuple[str, ...] = ()) -> str:
        """Prints `phase step/total  rate  ETA  key=value ...` and returns the line."""
        now = time.time()
        if self._start_step is None:
            self._start_step, self._start_time = step, now
        done = step - self._start_step
        rate = done / max(now - self._start_time, 1e-9) if done > 0 else 0.0
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        shown = " ".join(f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics)
        line = (f"[{phase or 'train'}] step {step}/{self.total_steps} {rate:.2f} steps/s "
                f"ETA {_fmt_time(eta)} {shown}").rstrip()
        if self.enabled:
            print(line, file=self.stream, flush=True)
        return line

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _fmt(v) -> str:
    f = _to_float(v)
    return "?" if f is None else f"{f:.4g}"


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
