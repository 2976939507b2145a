"""The files of a dataset: shard names, the seed / shard arithmetic, sidecars, atomic commits, resume checks.

Pair i is rendered from `pair_seed(seed, i)`, and shard k of S holds pairs [k*N//S, (k+1)*N//S) in order,
so the bytes of every shard depend on (flags, config) only, never on the number of workers. A shard is
written to `<name>.tmp-<host>-<pid>` (`ShardWriter`), fsynced, its sidecar `<name>.meta.json` (per-record
num_differences, counts, rejections, and the run's `run_fingerprint`) is written atomically, and only
then is the shard renamed to its final name. `finished_shards` keeps the final shards of a range whose sidecar
matches this run and deletes every temporary file of the range; anything else on disk is an error.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import socket
from typing import Any

import numpy as np

SHARD_SUFFIX = ".array_record"
META_SUFFIX = ".meta.json"


def pair_seed(seed: int, index: int) -> int:
    """The seed of pair `index` of a dataset with seed `seed`: a 63-bit hash, unrelated for nearby i."""
    state = np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def shard_bounds(num_pairs: int, num_shards: int, shard: int) -> tuple[int, int]:
    """Pair indices [start, stop) held by `shard`; sizes differ by at most one."""
    return shard * num_pairs // num_shards, (shard + 1) * num_pairs // num_shards


def shard_filename(shard: int, num_shards: int, prefix: str = "pairs") -> str:
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


def meta_path(shard_path: str) -> str:
    """The sidecar JSON of a shard (per-record num_differences, counts); the loader reads it too."""
    base = shard_path[: -len(SHARD_SUFFIX)] if shard_path.endswith(SHARD_SUFFIX) else shard_path
    return base + META_SUFFIX


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_fingerprint(num_pairs: int, seed: int, num_shards: int, config) -> dict:
    """Everything that determines the bytes of a shard; a resume must match it exactly."""
    from data_pipeline import schema

    config_dict = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=list))
    return {"format_version": schema.VERSION, "num_pairs": num_pairs, "seed": seed,
            "num_shards": num_shards, "config": config_dict}


def diff(expected: dict, found: dict, path: str = "") -> list[str]:
    out = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key), found.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff(a, b, f"{path}{key}.")
        elif a != b:
            out.append(f"{path}{key}: this run {a!r}, on disk {b!r}")
    return out


def num_records(path: str) -> int:
    """Records in a shard, or -1 when array_record cannot read the file."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    ok = reader.ok()
    n = reader.num_records() if ok else -1
    try:
        reader.close()
    except RuntimeError:
        return -1
    return n


def check_complete_shard(path: str, fingerprint: dict) -> dict:
    """Returns the sidecar of a finished shard after checking it belongs to this run."""
    mpath = meta_path(path)
    if not os.path.exists(mpath):
        raise RuntimeError(f"{path} exists but its sidecar {mpath} does not; it was not written by this "
                           "generator's atomic protocol. Delete the shard to have it rendered again.")
    with open(mpath) as f:
        meta = json.load(f)
    differences = diff(fingerprint, meta.get("fingerprint", {}))
    if differences:
        raise RuntimeError(f"{path} was generated with other settings, so it cannot be resumed into this "
                           f"dataset; use a new --output_dir. Differences: {'; '.join(differences[:5])}")
    found = num_records(path)
    if found != meta["num_records"]:
        raise RuntimeError(f"{path} holds {found} records but its sidecar says {meta['num_records']}: "
                           "the shard is damaged. Delete it (and its .meta.json) to render it again.")
    return meta


class ShardWriter:
    """Writes one shard to a temporary name; `commit` makes it final (sidecar first, then rename)."""

    def __init__(self, path: str, shard: int, start: int, stop: int, fingerprint: dict):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.path, self.tmp = path, f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        self.writer = ArrayRecordWriter(self.tmp, "group_size:1")  # Grain warns on larger groups
        self.meta = {"fingerprint": fingerprint, "shard": shard, "first_pair": start, "num_pairs": stop - start,
                     "num_records": 0, "num_differences": [], "seeds": [], "kinds": collections.Counter(),
                     "rejections": collections.Counter(), "attempts": 0, "failed": [], "render_seconds": 0.0,
                     "render_cpu_seconds": 0.0}

    def add(self, r) -> None:
        """Adds one rendered result (generate's `_Result`: record None when its pair failed)."""
        self.meta["render_seconds"] += r.seconds
        self.meta["render_cpu_seconds"] += r.cpu_seconds
        if r.record is None:
            self.meta["failed"].append({"index": r.index, "seed": r.seed, "error": r.error})
            return
        self.writer.write(r.record)
        self.meta["num_records"] += 1
        self.meta["num_differences"].append(r.num_differences)
        self.meta["seeds"].append(r.seed)
        self.meta["kinds"].update(r.kinds)
        self.meta["rejections"].update(r.rejections)
        self.meta["attempts"] += r.attempts

    def commit(self) -> dict:
        self.writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        meta = {**self.meta, "kinds": dict(self.meta["kinds"]), "rejections": dict(self.meta["rejections"])}
        write_json_atomic(meta_path(self.path), meta)
        os.replace(self.tmp, self.path)
        return meta

    def abort(self) -> None:
        try:
            self.writer.close()
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def summarize(metas: list[dict], paths: list[str]) -> dict:
    kinds, rejections, per_nd = collections.Counter(), collections.Counter(), collections.Counter()
    failed, attempts = [], 0
    for meta in metas:
        kinds.update(meta["kinds"])
        rejections.update(meta["rejections"])
        per_nd.update(str(n) for n in meta["num_differences"])
        failed += meta["failed"]
        attempts += meta["attempts"]
    records = sum(m["num_records"] for m in metas)
    return {
        "shards": [{"file": os.path.basename(p), "first_pair": m["first_pair"], "num_pairs": m["num_pairs"],
                    "num_records": m["num_records"]} for p, m in zip(paths, metas)],
        "num_records": records,
        "num_failed": len(failed),
        "failed": [{k: f[k] for k in ("index", "seed")} for f in failed],
        "counts_per_kind": dict(sorted(kinds.items())),
        "counts_per_num_differences": dict(sorted(per_nd.items(), key=lambda kv: int(kv[0]))),
        "rejections": dict(sorted(rejections.items())),
        "mean_attempts_per_pair": attempts / records if records else None,
    }


def finished_shards(paths: list[str], lo: int, hi: int, fingerprint: dict) -> dict[int, dict]:
    """Deletes temporary files of shards lo..hi-1 and returns the sidecars of those already final."""
    directory, expected = os.path.dirname(paths[0]), {os.path.basename(p) for p in paths}
    foreign = sorted(os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), "*" + SHARD_SUFFIX))
                     if os.path.basename(p) not in expected)
    if foreign:  # a reader globbing *.array_record would mix them into this dataset
        raise RuntimeError(f"{directory} already holds shards of another dataset ({', '.join(foreign[:3])}"
                           f"{', ...' if len(foreign) > 3 else ''}); this run would write {len(paths)} shards "
                           f"named like {os.path.basename(paths[0])}. Use a new --output_dir.")
    metas = {}
    for k in range(lo, hi):
        stale = glob.glob(glob.escape(paths[k]) + ".tmp*") + glob.glob(glob.escape(meta_path(paths[k])) + ".tmp*")
        for path in stale:
            os.remove(path)  # left by a killed run: never trusted, never appended to
        if os.path.exists(paths[k]):
            metas[k] = check_complete_shard(paths[k], fingerprint)
    return metas
