"""Renders a dataset of DiG pairs into ArrayRecord shards: parallel, deterministic, resumable.

    python -m data_pipeline.generate --output_dir=/tmp/dig --num_pairs=10000 --seed=0 --workers=2 \
        --resolution=448 --config.shadows=True --config.num_differences_max=1

Every field of the generator settings (`data_pipeline/settings.py`, the default `--config`) can be
overridden with `--config.<field>=value` (difference-count range `--config.num_differences_min/max`,
`--config.kinds="('color','move')"`, `--config.shadows`, ...); `--resolution=R` picks that file's
resolution preset, so the pixel thresholds scale with it. To split one dataset over several machines,
give each the same flags plus its own `--shard_range=a:b` (shards a..b-1); they may share one output
directory.

Guarantees, and how they are kept:
- Determinism: pair i is rendered from `pair_seed(seed, i)`, and shard k always holds pairs
  [k*N//S, (k+1)*N//S) in order, so the bytes of every shard depend on (flags, config) only, never on the
  number of workers. Workers render and encode; the parent alone writes, in pair order.
- Atomicity and resume (the files' side is `data_pipeline.shards`): a shard is written to
  `<name>.tmp-<host>-<pid>`, fsynced, its sidecar `<name-without-.array_record>.meta.json` (per-record
  num_differences, counts, rejections) is written likewise, and only then is the shard renamed to its
  final name. A rerun keeps final shards whose sidecar
  matches this run's settings and record count, deletes any temporary files of its range, and renders
  only the missing shards. A final shard made with other settings is an error, never silently mixed in,
  and so are shards of another dataset (another shard count) in the same directory.
- Processes: workers use the 'spawn' start method (a process forked after an EGL context was created
  hangs); each creates its own `PairGenerator` in `_init_worker`. With --workers=1 everything runs in
  this process. llvmpipe is itself multi-threaded, so each of W workers gets LP_NUM_THREADS=cores/W.
  A worker that dies ends the run with an error (finished shards are kept) instead of hanging it.

Beside the shards, `summary.json` (or `summary-a-b.json` for a partial --shard_range) records the flags,
the config, counts per kind and per number of differences, rejection reasons and pairs/s.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time
import traceback
from typing import Iterator

# Naming, the seed / shard arithmetic and the files' protocol live in data_pipeline.shards (re-exported here).
from data_pipeline.shards import (META_SUFFIX, SHARD_SUFFIX, ShardWriter, finished_shards, meta_path, pair_seed,
                                  run_fingerprint, shard_bounds, shard_filename, summarize, write_json_atomic)

__all__ = ["META_SUFFIX", "SHARD_SUFFIX", "generate_dataset", "meta_path", "pair_seed", "shard_bounds",
           "shard_filename"]

DEFAULT_PAIRS_PER_SHARD = 500  # ~140 MB at 448 px; the unit of resume (about a minute of rendering)


# ---------------------------------------------------------------------------------------------------
# Worker side: one PairGenerator per process, created in that process.
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Result:
    index: int
    seed: int
    record: bytes | None  # None when make_pair failed
    num_differences: int = 0
    kinds: tuple[str, ...] = ()
    attempts: int = 0
    rejections: dict | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, llvmpipe's render threads included
    error: str | None = None


_GENERATOR = None  # the worker's PairGenerator


def _init_worker(config, llvmpipe_threads: int) -> None:
    """Pool initializer (also used in-process for --workers=1): env first, then the GL context."""
    global _GENERATOR
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    if llvmpipe_threads > 0:
        os.environ["LP_NUM_THREADS"] = str(llvmpipe_threads)
    from data_pipeline import pairs  # imports mujoco: only after MUJOCO_GL is set

    _GENERATOR = pairs.PairGenerator(config)


def _close_worker() -> None:
    global _GENERATOR
    if _GENERATOR is not None:
        _GENERATOR.close()
        _GENERATOR = None


def _render(task: tuple[int, int]) -> _Result:
    """Renders and encodes pair `index`; failures come back as data so the parent decides."""
    from data_pipeline import schema

    index, seed = task
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        pair = _GENERATOR.make_pair(seed)
        record = schema.encode(pair)
    except Exception:  # noqa: BLE001 - reported per pair and bounded by max_failed_fraction
        return _Result(index, seed, None, seconds=time.perf_counter() - start,
                       cpu_seconds=time.process_time() - cpu_start, error=traceback.format_exc(limit=6))
    return _Result(index, seed, record, len(pair.kinds), tuple(pair.kinds), int(pair.attempts),
                   {str(k): int(v) for k, v in dict(pair.rejections).items()}, time.perf_counter() - start,
                   time.process_time() - cpu_start)


# ---------------------------------------------------------------------------------------------------
# Parent side.
# ---------------------------------------------------------------------------------------------------
class _Progress:
    """One status line on stderr with rate and ETA (redrawn in place on a terminal, else every 10 s)."""

    def __init__(self, total: int, enabled: bool, stream=None):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.stream = sys.stderr if stream is None else stream
        self.start = self.last = time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.5 if self.tty else 10.0) and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        line = (f"{self.done}/{self.total} pairs {100 * self.done / self.total:5.1f}%  {rate:6.2f} pairs/s  "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s  {note}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        if self.tty and self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def _results(tasks: Iterator[tuple[int, int]], num_tasks: int, config, workers: int,
             llvmpipe_threads: int) -> Iterator[_Result]:
    """Results in task order, rendered in this process (workers == 1) or by a spawn pool."""
    if not num_tasks:
        return
    if workers == 1:
        _init_worker(config, llvmpipe_threads)
        try:
            yield from map(_render, tasks)
        finally:
            _close_worker()
        return
    # ProcessPoolExecutor rather than Pool: a worker that dies (a crash in the GL driver) raises
    # BrokenProcessPool here instead of hanging the run. A bounded window of tasks is in flight.
    executor = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
        initargs=(config, llvmpipe_threads))
    try:
        remaining = iter(tasks)
        in_flight = collections.deque(executor.submit(_render, t) for t in itertools.islice(remaining, 4 * workers))
        while in_flight:
            try:
                result = in_flight.popleft().result()
            except concurrent.futures.process.BrokenProcessPool as e:
                raise RuntimeError(f"a rendering worker died ({e}); finished shards are kept: run the same "
                                   "command again to resume") from e
            for t in itertools.islice(remaining, 1):
                in_flight.append(executor.submit(_render, t))
            yield result
        executor.shutdown(wait=True)
    finally:  # after an error: do not wait for renders whose results nobody will read
        executor.shutdown(wait=False, cancel_futures=True)


def _render_shards(todo: list[int], paths: list[str], num_pairs: int, seed: int, fingerprint: dict, config,
                   workers: int, llvmpipe_threads: int, max_failed_fraction: float, progress: bool,
                   metas: dict[int, dict]) -> dict:
    """Renders the shards in `todo` (adding their sidecars to `metas`); returns this run's timings."""
    num_shards = len(paths)
    bounds = [shard_bounds(num_pairs, num_shards, k) for k in todo]
    n = sum(stop - start for start, stop in bounds)
    tasks = ((i, pair_seed(seed, i)) for start, stop in bounds for i in range(start, stop))  # lazily
    bar = _Progress(n, progress)
    start = time.perf_counter()
    first_result_at, failed, writer, cpu_seconds, current = None, 0, None, 0.0, 0
    results = _results(tasks, n, config, workers, llvmpipe_threads)
    try:
        for r in results:  # in pair order, whatever the number of workers
            first_result_at = first_result_at or time.perf_counter()
            cpu_seconds += r.cpu_seconds
            k = todo[current]
            if writer is None:
                writer = ShardWriter(paths[k], k, *bounds[current], fingerprint)
            writer.add(r)
            if r.record is None:
                failed += 1
                if failed > max_failed_fraction * n:
                    raise RuntimeError(f"{failed} of {n} pairs failed, more than "
                                       f"max_failed_fraction={max_failed_fraction}; pair {r.index} "
                                       f"(seed {r.seed}) raised:\n{r.error}")
            if r.index == bounds[current][1] - 1:
                metas[k] = writer.commit()
                writer, current = None, current + 1
            bar.update(1, f"shard {k}")
    finally:
        results.close()  # stops the pool now, not when a traceback holding this frame is freed
        if writer is not None:
            writer.abort()
    end = time.perf_counter()
    return {
        "pairs_rendered": n, "shards_rendered": len(todo), "seconds": end - start,
        "pairs_per_s": n / (end - start) if n else None,
        # Start-up is spawning workers, importing, creating GL contexts; the steady rate excludes it.
        "startup_s": (first_result_at - start) if first_result_at else None,
        "steady_pairs_per_s": (n - 1) / (end - first_result_at) if first_result_at and n > 1 else None,
        # CPU seconds per pair inside the workers (render threads included): a load-independent cost.
        "cpu_s_per_pair": cpu_seconds / n if n else None,
    }


def generate_dataset(output_dir: str, num_pairs: int, seed: int = 0, workers: int = 1, config=None, *,
                     num_shards: int | None = None, shard_range: tuple[int, int] | None = None,
                     max_failed_fraction: float = 0.01, llvmpipe_threads: int | None = None,
                     progress: bool = True) -> dict:
    """Renders (or finishes rendering) a dataset; returns the summary that is also written as JSON.

    Args:
      output_dir: created if missing; shards, sidecars and the summary go here.
      num_pairs: pairs in the whole dataset (all shards, not just `shard_range`).
      seed: dataset seed; pair i uses `pair_seed(seed, i)`.
      workers: rendering processes (1 = in this process).
      config: a `data_pipeline.settings` ConfigDict (validated here); None = `get_config()` (448 px).
      num_shards: None = ceil(num_pairs / 500).
      shard_range: (a, b) renders only shards a..b-1 (several machines, one dataset).
      max_failed_fraction: pairs whose `make_pair` raised are skipped and listed in the summary; more
        than this fraction of the pairs rendered in this run aborts the run with the first traceback.
      llvmpipe_threads: LP_NUM_THREADS per worker; None = cores // workers when workers > 1, else unset.
      progress: print the progress line on stderr.

    Raises:
      ValueError naming the argument that is wrong; RuntimeError for a final shard on disk that does
      not belong to this dataset or is damaged, or when too many pairs fail.
    """
    from data_pipeline import settings

    config = settings.get_config() if config is None else config
    settings.validate(config)
    if not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"num_pairs must be an int >= 1, got {num_pairs!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    num_shards = -(-num_pairs // DEFAULT_PAIRS_PER_SHARD) if not num_shards else num_shards
    if not isinstance(num_shards, int) or not 1 <= num_shards <= num_pairs:
        raise ValueError(f"num_shards must be an int in [1, num_pairs={num_pairs}], got {num_shards!r}")
    lo, hi = (0, num_shards) if shard_range is None else tuple(shard_range)
    if not 0 <= lo < hi <= num_shards:
        raise ValueError(f"shard_range must be a:b with 0 <= a < b <= num_shards={num_shards}, got {lo}:{hi}")
    if not 0 <= max_failed_fraction <= 1:
        raise ValueError(f"max_failed_fraction must be in [0, 1], got {max_failed_fraction!r}")
    if llvmpipe_threads is None:
        llvmpipe_threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0

    os.makedirs(output_dir, exist_ok=True)
    fingerprint = run_fingerprint(num_pairs, seed, num_shards, config)
    paths = [os.path.join(output_dir, shard_filename(k, num_shards)) for k in range(num_shards)]
    metas = finished_shards(paths, lo, hi, fingerprint)
    todo = [k for k in range(lo, hi) if k not in metas]
    run = _render_shards(todo, paths, num_pairs, seed, fingerprint, config, workers, llvmpipe_threads,
                         max_failed_fraction, progress, metas)
    run["shards_resumed"] = hi - lo - len(todo)
    keys = sorted(metas)
    summary = {
        "flags": {"output_dir": output_dir, "num_pairs": num_pairs, "seed": seed, "workers": workers,
                  "num_shards": num_shards, "shard_range": [lo, hi], "resolution": config.resolution,
                  "max_failed_fraction": max_failed_fraction, "llvmpipe_threads": llvmpipe_threads},
        "config": fingerprint["config"],
        "format_version": fingerprint["format_version"],
        **summarize([metas[k] for k in keys], [paths[k] for k in keys]),
        "this_run": run,
    }
    name = "summary.json" if (lo, hi) == (0, num_shards) else f"summary-{lo:05d}-{hi:05d}.json"
    write_json_atomic(os.path.join(output_dir, name), summary)
    return summary


# ---------------------------------------------------------------------------------------------------
# CLI. Flags are defined only when run as a program, so importing this module (as the spawn workers
# and the tests do) defines nothing global.
# ---------------------------------------------------------------------------------------------------
def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    from data_pipeline import settings

    flags.DEFINE_string("output_dir", None, "Directory for the shards, sidecars and summary.json.", required=True)
    flags.DEFINE_integer("num_pairs", None, "Pairs in the whole dataset.", required=True, lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Dataset seed; pair i uses pair_seed(seed, i).", lower_bound=0)
    flags.DEFINE_integer("workers", 1, "Rendering processes (spawned; 1 = in the main process).", lower_bound=1)
    flags.DEFINE_integer("resolution", None, "Image side in pixels: picks data_pipeline/settings.py's preset "
                         "(pixel thresholds scale with it). Default: the --config's resolution.",
                         lower_bound=32, upper_bound=2048)
    flags.DEFINE_integer("num_shards", 0, "Shards of the whole dataset; 0 = ceil(num_pairs/500).", lower_bound=0)
    flags.DEFINE_string("shard_range", "", "a:b renders only shards a..b-1 (for several machines); "
                        "empty = all.")
    flags.DEFINE_float("max_failed_fraction", 0.01, "Abort when more pairs than this fraction fail.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("llvmpipe_threads", -1, "LP_NUM_THREADS per worker; -1 = cores/workers when "
                         "workers > 1 (else unset), 0 = leave the environment alone.")
    flags.DEFINE_bool("progress", True, "Show the progress line on stderr.")
    config_flags.DEFINE_config_file("config", settings.__file__,
                                    "Generator config file (default data_pipeline/settings.py).", lock_config=True)

    def parse_range(value: str) -> bool:
        if not value:
            return True
        parts = value.split(":")
        return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and int(parts[0]) < int(parts[1])

    flags.register_validator("shard_range", parse_range,
                             message="--shard_range must look like a:b with integers 0 <= a < b")
    flags.register_validator("output_dir", lambda v: v is None or (bool(v.strip()) and not os.path.isfile(v)),
                             message="--output_dir must name a directory (it is a file or empty)")
    return flags.FLAGS


def main(argv: list[str]) -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    from data_pipeline import settings
    from data_pipeline.generate import generate_dataset  # by its import name, so spawn can pickle workers

    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    config = FLAGS.config
    if FLAGS.resolution is not None and FLAGS.resolution != config.resolution:
        overrides = config_flags.get_override_values(FLAGS["config"])
        if "resolution" in overrides:
            raise app.UsageError(f"--resolution={FLAGS.resolution} contradicts "
                                 f"--config.resolution={overrides['resolution']}; give one of them")
        config = settings.get_config(str(FLAGS.resolution))
        for path, value in overrides.items():
            target = config
            *parents, leaf = path.split(".")
            for p in parents:
                target = target[p]
            target[leaf] = value
    try:
        settings.validate(config)
    except ValueError as e:
        raise app.UsageError(f"--config: {e}") from None
    shard_range = tuple(int(p) for p in FLAGS.shard_range.split(":")) if FLAGS.shard_range else None
    try:
        summary = generate_dataset(
            FLAGS.output_dir, FLAGS.num_pairs, FLAGS.seed, FLAGS.workers, config,
            num_shards=FLAGS.num_shards or None, shard_range=shard_range,
            max_failed_fraction=FLAGS.max_failed_fraction,
            llvmpipe_threads=None if FLAGS.llvmpipe_threads < 0 else FLAGS.llvmpipe_threads,
            progress=FLAGS.progress)
    except ValueError as e:  # argument errors: the message names the argument, i.e. the flag
        raise app.UsageError(f"--{e}") from None
    except RuntimeError as e:  # a shard on disk that this run may not resume, or too many failed pairs
        sys.exit(f"error: {e}")
    run = summary["this_run"]
    logging.info("%d records in %d shards (%d rendered now, %d resumed); %.2f pairs/s; summary in %s",
                 summary["num_records"], len(summary["shards"]), run["shards_rendered"],
                 run["shards_resumed"], run["pairs_per_s"] or 0.0, FLAGS.output_dir)


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
