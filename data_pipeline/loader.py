"""Grain input pipeline for DiG pairs: shards -> per-process slice -> curriculum selection -> batches.

    ds = make_pair_dataset("/data/dig/*.array_record", batch_size=8, seed=0, max_boxes=4,
                           selection=[({1}, 0.5), ({1, 2, 3}, 0.5)], transform=tokenize)
    it = iter(ds); batch = next(it)           # dict of numpy arrays with a leading batch axis
    state = it.get_state(); ...; it.set_state(state)   # or grain.checkpoint.CheckpointSave via orbax

Pipeline, and why in this order:
1. Index: the number of differences of every record comes from the shard's `.meta.json` sidecar written
   by `data_pipeline.generate` (no record is read), or, for shards without one, from the record headers
   (`schema.read_header`, no PNG decode). The index decides selections before any image is decoded;
   every decoded record is checked against it, so a stale sidecar is an error, not a wrong selection.
2. Per-process slice: the records (in sorted-shard order) are split into `shard_count` contiguous,
   disjoint slices whose sizes differ by at most one; this process keeps slice `shard_index`
   (default: `jax.process_index()` of `jax.process_count()`), so no two hosts ever see the same record.
3. Selection: each `(allowed num_differences, weight)` component keeps the matching records of the slice;
   each is shuffled (reshuffled every epoch) and repeated, then `MapDataset.mix` interleaves them in
   proportion to the weights (a curriculum phase "only 1-difference pairs" is `[({1}, 1.0)]`).
4. Decode + pad in `num_threads` Grain read threads (Pillow releases the GIL while decoding): boxes are padded to
   `max_boxes` with a mask, then the optional per-example `transform` (e.g. tokenisation) runs.
5. Batch (fixed size, remainder dropped by default: static shapes for jit).

Corrupt data: with `on_corrupt="error"` a record that fails to read or decode raises `CorruptDataError`
naming the shard file and the record's index in it; with `"skip"` it is logged, counted in the optional
`CorruptRecords` tally (each time it is met, so once per epoch) and dropped. A shard that cannot even be
opened (e.g. truncated) is likewise an error, or skipped whole.

Example dict (before batching; a batch adds a leading B axis):
    image_a, image_b  uint8[H, W, 3]
    boxes             float32[max_boxes, 4]  pixel xyxy, zero rows past num_differences
    box_mask          bool[max_boxes]        True for real boxes
    kind_ids          int32[max_boxes]       index into data_pipeline.differences.KINDS, -1 for padding
    num_differences   int32[]
    seed              int64[]                the pair's render seed (reproduces it)
    record_id         int64[]                global index of the record in the sorted shard list
"""
from __future__ import annotations

import glob
import json
import logging
import os
import threading
from typing import Any, Callable, Iterable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline.differences import KINDS
from data_pipeline import schema
from data_pipeline.shards import meta_path

_KIND_ID = {k: i for i, k in enumerate(KINDS)}


class CorruptDataError(RuntimeError):
    """A shard or record that cannot be read or decoded; the message names the file and record."""


class CorruptRecords:
    """Thread-safe tally of what `on_corrupt="skip"` dropped: (shard path, record index or None, reason)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.items: list[tuple[str, int | None, str]] = []

    def add(self, shard: str, index: int | None, reason: str) -> None:
        with self._lock:
            self.items.append((shard, index, reason))

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.items)


def list_shards(patterns: str | Sequence[str]) -> list[str]:
    """Expands globs (or plain paths) to the sorted list of shard files; an empty match is an error."""
    patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    paths = []
    for pattern in patterns:
        found = sorted(glob.glob(os.fspath(pattern)))
        if not found:
            raise FileNotFoundError(f"no shard matches {os.fspath(pattern)!r}")
        paths += found
    return sorted(set(paths))


def open_reader(path: str) -> ArrayRecordReader:
    """An ArrayRecordReader that raises RuntimeError for a damaged file (the constructor does not:
    it returns a reader with `ok() == False` and zero records, e.g. for a truncated shard)."""
    reader = ArrayRecordReader(path)
    if reader.ok():
        return reader
    try:
        reader.close()  # raises with riegeli's description of the damage
    except RuntimeError as e:
        raise RuntimeError(str(e) or "array_record reader is not ok (damaged file)") from None
    raise RuntimeError("array_record reader is not ok (damaged file)")


def _num_differences_from_headers(path: str, reader: ArrayRecordReader, n: int, on_corrupt: str,
                                  tally: CorruptRecords | None) -> np.ndarray:
    """Reads every record's header (no PNG decode); -1 marks a record skipped as corrupt."""
    out = np.full(n, -1, np.int32)
    for i in range(n):
        try:
            out[i] = schema.read_header(reader.read([i])[0])["num_differences"]
        except (RuntimeError, schema.SchemaError) as e:
            _corrupt(path, i, f"{type(e).__name__}: {e}", on_corrupt, tally)
    return out


def _corrupt(path: str, index: int | None, reason: str, on_corrupt: str, tally: CorruptRecords | None):
    where = f"record {index} of shard {path}" if index is not None else f"shard {path}"
    if on_corrupt == "error":
        raise CorruptDataError(f"corrupt {where}: {reason}")
    logging.warning("skipping corrupt %s: %s", where, reason)
    if tally is not None:
        tally.add(path, index, reason)


def read_index(paths: Sequence[str], *, on_corrupt: str = "error",
               tally: CorruptRecords | None = None) -> tuple[list[str], list[np.ndarray]]:
    """Number of differences of every record, per shard: (readable shards, int32[records] per shard).

    Uses the `.meta.json` sidecar when present, else the record headers. Shards that cannot be opened or
    whose sidecar disagrees with their record count are errors, or dropped in skip mode.
    """
    kept, counts = [], []
    for path in paths:
        try:
            reader = open_reader(path)
        except RuntimeError as e:
            _corrupt(path, None, f"cannot open: {e}", on_corrupt, tally)
            continue
        try:
            n = reader.num_records()
            sidecar = meta_path(path)
            if os.path.exists(sidecar):
                with open(sidecar) as f:
                    nd = np.asarray(json.load(f)["num_differences"], np.int32)
                if len(nd) != n:
                    _corrupt(path, None, f"holds {n} records but {sidecar} lists {len(nd)}", on_corrupt, tally)
                    continue
            else:
                nd = _num_differences_from_headers(path, reader, n, on_corrupt, tally)
        finally:
            reader.close()
        kept.append(path)
        counts.append(nd)
    return kept, counts


class _Records:
    """Random-access source over a subset of the global records: item i -> (global id, bytes | error)."""

    def __init__(self, source: grain.sources.ArrayRecordDataSource, ids: np.ndarray):
        self._source, self._ids = source, ids

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int):
        gid = int(self._ids[i])
        try:
            return gid, self._source[gid]
        except Exception as e:  # noqa: BLE001 - riegeli reports hash mismatches as RuntimeError
            return gid, e


class _DecodePad:
    """Record -> padded example dict (then the user transform); corrupt records raise or become None."""

    def __init__(self, paths, offsets, num_differences, max_boxes, on_corrupt, tally, transform):
        self.paths, self.offsets, self.num_differences = paths, offsets, num_differences
        self.max_boxes = max_boxes
        self.on_corrupt, self.tally, self.transform = on_corrupt, tally, transform

    def _where(self, gid: int) -> tuple[str, int]:
        shard = int(np.searchsorted(self.offsets, gid, side="right")) - 1
        return self.paths[shard], gid - int(self.offsets[shard])

    def __call__(self, item):
        gid, data = item
        try:
            if isinstance(data, Exception):
                raise data
            record = schema.decode(data)
        except (RuntimeError, schema.SchemaError) as e:
            path, index = self._where(gid)
            _corrupt(path, index, f"{type(e).__name__}: {e}", self.on_corrupt, self.tally)
            return None
        m = record["num_differences"]
        if m != self.num_differences[gid]:  # selection and the max_boxes check trusted the index
            path, index = self._where(gid)
            raise CorruptDataError(f"record {index} of shard {path} has {m} differences but the shard's "
                                   f"sidecar {meta_path(path)} says {self.num_differences[gid]}")
        boxes = np.zeros((self.max_boxes, 4), np.float32)
        boxes[:m] = record["boxes"]
        kind_ids = np.full(self.max_boxes, -1, np.int32)
        kind_ids[:m] = [_KIND_ID.get(k, -1) for k in record["kinds"]]
        example = {
            "image_a": record["image_a"], "image_b": record["image_b"], "boxes": boxes,
            "box_mask": np.arange(self.max_boxes) < m, "kind_ids": kind_ids,
            "num_differences": np.int32(m), "seed": np.int64(record["seed"]), "record_id": np.int64(gid),
        }
        return example if self.transform is None else self.transform(example)


def _process_slice(num_differences: np.ndarray, shard_index: int, shard_count: int) -> np.ndarray:
    """Global ids of this process's contiguous slice of the records, less unreadable ones (-1)."""
    total = len(num_differences)
    mine = np.arange(total * shard_index // shard_count, total * (shard_index + 1) // shard_count)
    return mine[num_differences[mine] >= 0]


def _selected(mine: np.ndarray, num_differences: np.ndarray, allowed, max_boxes: int, name: str,
              where: str) -> np.ndarray:
    """The ids among `mine` whose number of differences is in `allowed` (None = any); checks max_boxes."""
    nd = num_differences[mine]
    ids = mine if allowed is None else mine[np.isin(nd, sorted({int(a) for a in allowed}))]
    if len(ids) == 0:
        values, counts = np.unique(nd, return_counts=True)
        raise ValueError(f"{name} allows num_differences {sorted(allowed)[:10]} but {where} has no such "
                         f"record (it has {dict(zip(values.tolist(), counts.tolist()))})")
    most = int(num_differences[ids].max())
    if most > max_boxes:
        raise ValueError(f"{name} includes pairs with {most} differences but max_boxes={max_boxes}; "
                         "raise max_boxes or narrow the selection")
    return ids


def _component_seed(seed: int, component: int) -> int:
    return int(np.random.SeedSequence([seed, component]).generate_state(1)[0])


def make_pair_dataset(shards: str | Sequence[str], *, batch_size: int, seed: int, max_boxes: int,
                      selection: Iterable[tuple[Iterable[int], float]] | None = None,
                      shard_index: int | None = None, shard_count: int | None = None,
                      num_threads: int = 2, prefetch_buffer_size: int | None = None,
                      on_corrupt: str = "error", corrupt_records: CorruptRecords | None = None,
                      transform: Callable[[dict], Any] | None = None, shuffle: bool = True,
                      num_epochs: int | None = None, drop_remainder: bool = True) -> grain.IterDataset:
    """Builds the batched, checkpointable pair pipeline (see the module docstring for each stage).

    Args:
      shards: glob(s) or path(s) of `.array_record` shards.
      batch_size: examples per batch (per JAX process).
      seed: shuffling and mixing seed; the same arguments give the same batches.
      max_boxes: boxes are padded to this many; a selected record with more differences is an error.
      selection: `[(allowed num_differences, weight), ...]`; None = every record, weight 1.
      shard_index, shard_count: this process's slice of the records; None = jax.process_index/count.
      num_threads, prefetch_buffer_size: Grain read threads and the elements they prefetch
        (default 2 * batch_size: decoded 448 px pairs are 1.2 MB each).
      on_corrupt: "error" (raise CorruptDataError) or "skip" (log, count in `corrupt_records`, drop).
      transform: per-example function applied after padding, in the read threads, before batching.
      shuffle, num_epochs, drop_remainder: False / 1 / False for an ordered single evaluation pass
        (with several selection components the mix ends when the first component runs out).
    """
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(max_boxes, int) or max_boxes < 1:
        raise ValueError(f"max_boxes must be an int >= 1, got {max_boxes!r}")
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")

    paths, per_shard = read_index(list_shards(shards), on_corrupt=on_corrupt, tally=corrupt_records)
    if not paths:
        raise CorruptDataError(f"no readable shard among {shards!r}")
    offsets = np.cumsum([0] + [len(nd) for nd in per_shard])
    num_differences = np.concatenate(per_shard)
    mine = _process_slice(num_differences, shard_index, shard_count)
    components = [(None, 1.0)] if selection is None else list(selection)
    if not components:
        raise ValueError("selection must name at least one (num_differences set, weight) component")
    source = grain.sources.ArrayRecordDataSource(paths)
    datasets, weights = [], []
    for c, (allowed, weight) in enumerate(components):
        if not weight > 0:
            raise ValueError(f"selection[{c}] weight must be > 0, got {weight!r}")
        ids = _selected(mine, num_differences, allowed, max_boxes, f"selection[{c}]",
                        f"process {shard_index}/{shard_count}")
        ds = grain.MapDataset.source(_Records(source, ids))
        if shuffle:
            ds = ds.shuffle(seed=_component_seed(seed, c))
        datasets.append(ds.repeat(num_epochs))  # reshuffled every epoch
        weights.append(float(weight))
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = ds.map(_DecodePad(paths, offsets, num_differences, max_boxes, on_corrupt, corrupt_records, transform))
    read_options = grain.ReadOptions(num_threads=num_threads,
                                     prefetch_buffer_size=prefetch_buffer_size or 2 * batch_size)
    return ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=drop_remainder)
