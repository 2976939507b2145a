"""Grain loader: contents, determinism, per-process sharding, curriculum selection, save/restore, corruption.

Shards are written here from synthetic pairs (tests/data_pipeline/test_schema.fake_pair look-alikes) so
the loader is tested without the renderer; each example is checked against the pair regenerated from
its seed, an oracle independent of the loader.
"""
import json
import os

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipeline.differences import KINDS
from data_pipeline import loader, schema
from data_pipeline.generate import meta_path

_KINDS = ("color", "move", "add")


def fake_pair(seed: int, num_differences: int):
    """Deterministic 16x20 pair whose pixels and boxes follow from the seed."""
    rng = np.random.default_rng(seed)
    image_a = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    image_b = image_a.copy()
    boxes = []
    for j in range(num_differences):
        x0, y0 = int(rng.integers(0, 10)), int(rng.integers(0, 8))
        boxes.append([x0, y0, x0 + 1 + j, y0 + 2])
        image_b[y0:y0 + 2, x0:x0 + 1 + j] ^= 0xFF

    class Pair:
        pass

    p = Pair()
    p.seed, p.image_a, p.image_b = seed, image_a, image_b
    p.boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    p.kinds = [_KINDS[(seed + j) % 3] for j in range(num_differences)]
    p.differences, p.spec_a, p.spec_b, p.attempts, p.rejections = [], {}, {}, 1, {}
    return p


def nd_of(seed: int) -> int:
    return 1 + seed % 3  # 1, 2, 3, 1, 2, 3 ...


def write_shards(directory, sizes, sidecar=True, start_seed=1000):
    """Shards of consecutive seeds; returns the paths and the seed of every record in global order."""
    paths, seeds, seed = [], [], start_seed
    for k, n in enumerate(sizes):
        path = os.path.join(directory, f"pairs-{k:05d}-of-{len(sizes):05d}.array_record")
        writer = ArrayRecordWriter(path, "group_size:1")
        nds = []
        for _ in range(n):
            writer.write(schema.encode(fake_pair(seed, nd_of(seed))))
            nds.append(nd_of(seed))
            seeds.append(seed)
            seed += 1
        writer.close()
        if sidecar:
            with open(meta_path(path), "w") as f:
                json.dump({"num_records": n, "num_differences": nds}, f)
        paths.append(path)
    return paths, seeds


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def same_batches(xs, ys):
    return len(xs) == len(ys) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    paths, seeds = write_shards(str(d), [13, 17, 10])
    return str(d), paths, seeds


def make(directory, **kw):
    args = dict(batch_size=4, seed=0, max_boxes=3, shard_index=0, shard_count=1, num_threads=2)
    args.update(kw)
    return loader.make_pair_dataset(os.path.join(directory, "*.array_record"), **args)


def test_examples_match_the_pairs_they_came_from(shards):
    directory, _, seeds = shards
    batches = take(make(directory, max_boxes=4), 5)
    assert batches[0]["image_a"].shape == (4, 16, 20, 3) and batches[0]["image_a"].dtype == np.uint8
    assert batches[0]["boxes"].shape == (4, 4, 4) and batches[0]["box_mask"].dtype == bool
    for batch in batches:
        for b in range(4):
            seed = int(batch["seed"][b])
            assert seeds[int(batch["record_id"][b])] == seed
            pair = fake_pair(seed, nd_of(seed))
            m = nd_of(seed)
            np.testing.assert_array_equal(batch["image_a"][b], pair.image_a)
            np.testing.assert_array_equal(batch["image_b"][b], pair.image_b)
            np.testing.assert_array_equal(batch["boxes"][b, :m], pair.boxes)
            assert not batch["boxes"][b, m:].any()
            assert batch["box_mask"][b].tolist() == [True] * m + [False] * (4 - m)
            assert batch["num_differences"][b] == m
            assert [KINDS[i] for i in batch["kind_ids"][b, :m]] == pair.kinds
            assert (batch["kind_ids"][b, m:] == -1).all()


def test_same_seed_same_batches_other_seed_other_order(shards):
    directory, _, _ = shards
    a, b = take(make(directory, seed=5), 12), take(make(directory, seed=5, num_threads=1), 12)
    assert same_batches(a, b)
    c = take(make(directory, seed=6), 12)
    assert not same_batches(a, c)
    # Shuffled, and repeated past one epoch (40 records) with every record seen in the first epoch.
    ids = np.concatenate([x["record_id"] for x in a])
    assert sorted(ids[:40].tolist()) == list(range(40)) and ids[:40].tolist() != list(range(40))


def test_two_processes_see_disjoint_slices_covering_everything(shards):
    directory, _, _ = shards
    seen = []
    for index in (0, 1):
        ds = make(directory, shard_index=index, shard_count=2, num_epochs=1, drop_remainder=False,
                  batch_size=3)
        seen.append(np.concatenate([b["record_id"] for b in ds]).tolist())
    assert len(seen[0]) == len(set(seen[0])) == 20 and len(seen[1]) == len(set(seen[1])) == 20
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(40))


def test_unshuffled_single_pass_reads_in_order(shards):
    directory, _, seeds = shards
    ds = make(directory, shuffle=False, num_epochs=1, drop_remainder=False, batch_size=7)
    batches = list(ds)
    assert [len(b["seed"]) for b in batches] == [7] * 5 + [5]
    assert np.concatenate([b["seed"] for b in batches]).tolist() == seeds


def test_selection_by_number_of_differences_and_weighted_mixing(shards):
    directory, _, _ = shards
    only_one = np.concatenate([b["num_differences"] for b in take(make(directory, selection=[({1}, 1.0)]), 10)])
    assert (only_one == 1).all()
    mixed = make(directory, selection=[({1}, 3.0), ({2, 3}, 1.0)], batch_size=8)
    nds = np.concatenate([b["num_differences"] for b in take(mixed, 50)])
    assert set(nds.tolist()) == {1, 2, 3}
    assert abs((nds == 1).mean() - 0.75) < 0.05
    with pytest.raises(ValueError, match=r"selection\[0\] allows num_differences \[7\]"):
        make(directory, selection=[({7}, 1.0)])
    with pytest.raises(ValueError, match="max_boxes=2"):
        make(directory, max_boxes=2)
    make(directory, max_boxes=2, selection=[({1, 2}, 1.0)])  # fine: no selected pair has 3


def test_state_restore_gives_the_same_next_batches(shards):
    directory, _, _ = shards
    ds = make(directory, selection=[({1}, 1.0), ({2, 3}, 2.0)], transform=lambda e: {**e, "extra": e["seed"] * 2})
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    after = [next(it) for _ in range(4)]
    it2 = iter(make(directory, selection=[({1}, 1.0), ({2, 3}, 2.0)],
                    transform=lambda e: {**e, "extra": e["seed"] * 2}))
    it2.set_state(state)
    assert same_batches(after, [next(it2) for _ in range(4)])
    np.testing.assert_array_equal(after[0]["extra"], after[0]["seed"] * 2)  # the transform ran per example


def test_state_restore_through_orbax(shards, tmp_path):
    import orbax.checkpoint as ocp

    directory, _, _ = shards
    it = iter(make(directory))
    next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    it2 = iter(make(directory))
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert same_batches(expected, [next(it2) for _ in range(3)])


def test_index_from_headers_when_there_is_no_sidecar(tmp_path, shards):
    directory, _, _ = shards
    write_shards(str(tmp_path), [13, 17, 10], sidecar=False)
    assert same_batches(take(make(directory, selection=[({2}, 1.0)]), 4),
                        take(make(str(tmp_path), selection=[({2}, 1.0)]), 4))


def _records_that_fail(path):
    """Brute-force oracle: reads every record on its own; None if the file no longer opens."""
    try:
        reader = ArrayRecordReader(path)
    except RuntimeError:
        return None
    bad = []
    for i in range(reader.num_records()):
        try:
            reader.read([i])
        except RuntimeError:
            bad.append(i)
    return bad


def _corrupt_one_record(directory):
    """Flips one byte inside one record of shard 1; returns (path, the index that no longer reads)."""
    paths, _ = write_shards(directory, [6, 6])
    path = paths[1]
    original = open(path, "rb").read()
    for pos in range(2500, len(original), 331):  # the first flip that breaks exactly one record
        damaged = bytearray(original)
        damaged[pos] ^= 0x5A
        with open(path, "wb") as f:
            f.write(damaged)
        bad = _records_that_fail(path)
        if bad is not None and len(bad) == 1:
            return path, bad[0]
    raise AssertionError("no single-record corruption found")


def test_corrupt_record_error_names_shard_and_index_or_is_skipped_and_counted(tmp_path):
    path, bad = _corrupt_one_record(str(tmp_path))
    ds = make(str(tmp_path), shuffle=False, num_epochs=1, drop_remainder=False)
    with pytest.raises(loader.CorruptDataError, match=f"corrupt record {bad} of shard {path}"):
        list(ds)
    tally = loader.CorruptRecords()
    ds = make(str(tmp_path), shuffle=False, num_epochs=1, drop_remainder=False, on_corrupt="skip",
              corrupt_records=tally)
    ids = np.concatenate([b["record_id"] for b in ds]).tolist()
    assert ids == [i for i in range(12) if i != 6 + bad]
    assert tally.count == 1 and tally.items[0][:2] == (path, bad)


def test_record_that_is_not_a_pair_is_named(tmp_path):
    paths, _ = write_shards(str(tmp_path), [3])
    writer = ArrayRecordWriter(paths[0], "group_size:1")  # rewrite: record 1 is foreign bytes
    for i, seed in enumerate((1000, 1001, 1002)):
        writer.write(b"not a DiG pair record" if i == 1 else schema.encode(fake_pair(seed, nd_of(seed))))
    writer.close()
    with pytest.raises(loader.CorruptDataError, match=f"corrupt record 1 of shard {paths[0]}: SchemaError: bad magic"):
        list(make(str(tmp_path), shuffle=False, num_epochs=1, drop_remainder=False))
    os.remove(meta_path(paths[0]))  # the header-based index hits it first
    with pytest.raises(loader.CorruptDataError, match=f"corrupt record 1 of shard {paths[0]}"):
        make(str(tmp_path))


@pytest.mark.parametrize("sidecar", [True, False])
@pytest.mark.parametrize("keep", [0.5, 0.6])  # 0.5: a 64 KiB block boundary, which still "opens"
def test_truncated_shard_is_named_or_skipped(tmp_path, keep, sidecar):
    paths, _ = write_shards(str(tmp_path), [5, 5], sidecar=sidecar)
    with open(paths[0], "r+b") as f:
        f.truncate(int(os.path.getsize(paths[0]) * keep))
    with pytest.raises(loader.CorruptDataError, match=f"corrupt shard {paths[0]}: cannot open"):
        make(str(tmp_path))
    tally = loader.CorruptRecords()
    ds = make(str(tmp_path), on_corrupt="skip", corrupt_records=tally, shuffle=False, num_epochs=1,
              drop_remainder=False)
    assert np.concatenate([b["seed"] for b in ds]).tolist() == list(range(1005, 1010))
    assert tally.count == 1 and tally.items[0][:2] == (paths[0], None)


def test_bad_arguments_are_named(tmp_path, shards):
    directory, _, _ = shards
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        make(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="on_corrupt"):
        make(directory, on_corrupt="ignore")
    with pytest.raises(ValueError, match="shard_index"):
        make(directory, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match=r"selection\[1\] weight"):
        make(directory, selection=[({1}, 1.0), ({2}, 0.0)])


def test_sidecar_that_disagrees_with_a_record_is_named(tmp_path):
    paths, _ = write_shards(str(tmp_path), [4])
    with open(meta_path(paths[0])) as f:
        meta = json.load(f)
    meta["num_differences"][2] = 1 if meta["num_differences"][2] != 1 else 2
    with open(meta_path(paths[0]), "w") as f:
        json.dump(meta, f)
    with pytest.raises(loader.CorruptDataError, match=f"record 2 of shard {paths[0]} has .* sidecar"):
        list(make(str(tmp_path), shuffle=False, num_epochs=1, drop_remainder=False))
