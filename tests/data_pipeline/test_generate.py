"""The generator: worker-count independence, seeds, summary, kill-and-resume, settings guard, flag errors.

Uses the real renderer at 128 px and a handful of pairs; the oracles are a single in-process run
(for the 2-worker and the resumed runs), `PairGenerator.make_pair(pair_seed(S, i))` called directly
(for what record i holds), and the decoded records themselves (for the summary's counts).
"""
import collections
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from array_record.python.array_record_module import ArrayRecordReader

from data_pipeline import settings as datagen
from data_pipeline import generate, schema

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RES = 128


def config():
    return datagen.get_config(str(RES))


def read_dir(directory):
    """{shard file name: [record bytes]} for the final shards of a directory."""
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.array_record"))):
        reader = ArrayRecordReader(path)
        out[os.path.basename(path)] = [reader.read([i])[0] for i in range(reader.num_records())]
        reader.close()
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted single-process run every other run is compared with: 15 pairs in 3 shards."""
    d = str(tmp_path_factory.mktemp("reference"))
    summary = generate.generate_dataset(d, 15, seed=5, workers=1, config=config(), num_shards=3, progress=False)
    return d, summary, read_dir(d)


def cli(*args, timeout=240, **kw):
    env = {**os.environ, "MUJOCO_GL": "egl", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "data_pipeline.generate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def test_records_hold_pair_i_rendered_from_pair_seed(reference):
    _, summary, shards = reference
    records = [r for name in sorted(shards) for r in shards[name]]
    assert len(records) == 15 and summary["num_records"] == 15
    headers = [schema.read_header(r) for r in records]
    assert [h["seed"] for h in headers] == [generate.pair_seed(5, i) for i in range(15)]
    assert len(set(h["seed"] for h in headers)) == 15
    from data_pipeline.pairs import PairGenerator

    with PairGenerator(config()) as gen:  # pair 4 rendered directly, outside the pipeline
        assert schema.encode(gen.make_pair(generate.pair_seed(5, 4))) == records[4]
    # Shard k holds pairs [k*N//S, (k+1)*N//S).
    assert [len(shards[n]) for n in sorted(shards)] == [5, 5, 5]
    assert [s["first_pair"] for s in summary["shards"]] == [0, 5, 10]


def test_summary_counts_match_the_records(reference):
    directory, summary, shards = reference
    decoded = [schema.decode(r) for name in sorted(shards) for r in shards[name]]
    kinds = collections.Counter(k for d in decoded for k in d["kinds"])
    per_nd = collections.Counter(str(d["num_differences"]) for d in decoded)
    rejections = collections.Counter()
    for d in decoded:
        rejections.update(d["rejections"])
    on_disk = json.load(open(os.path.join(directory, "summary.json")))
    for s in (summary, on_disk):
        assert s["counts_per_kind"] == dict(kinds) and s["counts_per_num_differences"] == dict(per_nd)
        assert s["rejections"] == dict(rejections)
        assert s["flags"]["resolution"] == RES and s["flags"]["seed"] == 5 and s["config"]["resolution"] == RES
        assert s["this_run"]["pairs_per_s"] > 0
    assert all(d["image_a"].shape == (RES, RES, 3) for d in decoded)
    meta = json.load(open(generate.meta_path(os.path.join(directory, "pairs-00001-of-00003.array_record"))))
    assert meta["num_differences"] == [d["num_differences"] for d in decoded[5:10]]
    assert not glob.glob(os.path.join(directory, "*.tmp*"))


def test_two_workers_and_shard_ranges_give_identical_bytes(reference, tmp_path):
    _, _, expected = reference
    generate.generate_dataset(str(tmp_path / "w2"), 15, seed=5, workers=2, config=config(), num_shards=3,
                              progress=False)
    assert read_dir(str(tmp_path / "w2")) == expected
    # Two "machines" producing their own shard ranges into one directory.
    split = str(tmp_path / "split")
    a = generate.generate_dataset(split, 15, seed=5, config=config(), num_shards=3, shard_range=(0, 1),
                                  progress=False)
    b = generate.generate_dataset(split, 15, seed=5, config=config(), num_shards=3, shard_range=(1, 3),
                                  progress=False)
    assert read_dir(split) == expected
    assert os.path.exists(os.path.join(split, "summary-00000-00001.json")) and a["num_records"] == 5
    assert b["num_records"] == 10 and [s["file"] for s in b["shards"]] == sorted(expected)[1:]


def test_killed_run_resumes_to_the_uninterrupted_bytes(reference, tmp_path):
    _, _, expected = reference
    out = str(tmp_path / "killed")
    env = {**os.environ, "MUJOCO_GL": "egl"}
    args = [sys.executable, "-m", "data_pipeline.generate", f"--output_dir={out}", "--num_pairs=15",
            "--seed=5", "--num_shards=3", f"--resolution={RES}", "--workers=2"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

    def final_shards():
        return sorted(glob.glob(os.path.join(out, "pairs-*-of-00003.array_record")))

    deadline = time.monotonic() + 180
    try:  # kill once some shard is final and another is being written (two workers race, so which varies)
        while not (final_shards() and glob.glob(os.path.join(out, "pairs-*.tmp*"))):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its spawned workers
        proc.wait()
    finals = final_shards()
    assert 1 <= len(finals) < 3
    partial = glob.glob(os.path.join(out, "pairs-*.tmp*"))
    assert partial  # a partial shard was left behind: it must not be trusted
    with open(partial[0], "ab") as f:
        f.write(b"garbage")
    mtimes = {path: os.path.getmtime(path) for path in finals}

    resumed = cli(f"--output_dir={out}", "--num_pairs=15", "--seed=5", "--num_shards=3", f"--resolution={RES}")
    assert resumed.returncode == 0, resumed.stderr
    assert read_dir(out) == expected
    assert {path: os.path.getmtime(path) for path in finals} == mtimes  # complete shards kept, not redone
    assert not glob.glob(os.path.join(out, "*.tmp*"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["this_run"]["shards_resumed"] == len(finals)
    assert summary["this_run"]["shards_rendered"] == 3 - len(finals)
    assert summary["num_records"] == 15
    assert "pairs/s" in resumed.stderr and "ETA" in resumed.stderr  # the progress line


def test_rerun_with_other_settings_is_refused_and_complete_run_is_a_no_op(reference, tmp_path):
    directory, _, expected = reference
    with pytest.raises(RuntimeError, match="seed: this run 6, on disk 5"):
        generate.generate_dataset(directory, 15, seed=6, config=config(), num_shards=3, progress=False)
    other = config()
    other.shadows = True
    with pytest.raises(RuntimeError, match="config.shadows: this run True, on disk False"):
        generate.generate_dataset(directory, 15, seed=5, config=other, num_shards=3, progress=False)
    with pytest.raises(RuntimeError, match="already holds shards of another dataset"):
        generate.generate_dataset(directory, 15, seed=5, config=config(), num_shards=5, progress=False)
    result = cli(f"--output_dir={directory}", "--num_pairs=15", "--seed=7", "--num_shards=3", f"--resolution={RES}")
    assert result.returncode == 1 and "seed: this run 7, on disk 5" in result.stderr, result.stderr[-2000:]
    again = generate.generate_dataset(directory, 15, seed=5, config=config(), num_shards=3, progress=False)
    assert again["this_run"]["pairs_rendered"] == 0 and again["num_records"] == 15
    assert read_dir(directory) == expected


def test_damaged_final_shard_is_reported_not_trusted(reference, tmp_path):
    directory, _, _ = reference
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    for path in glob.glob(os.path.join(directory, "pairs-*")):
        with open(path, "rb") as src, open(os.path.join(copy, os.path.basename(path)), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(copy, "pairs-00002-of-00003.array_record"), "r+b") as f:
        f.truncate(70000)
    with pytest.raises(RuntimeError, match="pairs-00002-of-00003.array_record holds -1 records"):
        generate.generate_dataset(copy, 15, seed=5, config=config(), num_shards=3, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--num_pairs=5"], "--output_dir"),
    (["--output_dir={d}", "--num_pairs=0"], "--num_pairs=0"),
    (["--output_dir={d}", "--num_pairs=five"], "--num_pairs=five"),
    (["--output_dir={d}", "--num_pairs=5", "--workers=0"], "--workers=0"),
    (["--output_dir={d}", "--num_pairs=5", "--shard_range=3-4"], "--shard_range"),
    (["--output_dir={d}", "--num_pairs=5", "--num_shards=2", "--shard_range=1:3"], "--shard_range"),
    (["--output_dir={d}", "--num_pairs=5", "--num_shards=6"], "--num_shards"),
    (["--output_dir={d}", "--num_pairs=5", "--resolution=8"], "--resolution=8"),
    (["--output_dir={d}", "--num_pairs=5", "--config.num_differences_max=9"], "num_differences_max"),
    (["--output_dir={d}", "--num_pairs=5", "--resolution=160", "--config.resolution=128"], "--resolution=160"),
    (["--output_dir={d}", "--num_pairs=5", "--shadows"], "shadows"),
])
def test_bad_flags_are_named(tmp_path, args, message):
    result = cli(*[a.format(d=tmp_path / "out") for a in args], timeout=60)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")  # nothing was written


def test_python_api_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_pairs"):
        generate.generate_dataset(str(tmp_path), 0, config=config())
    with pytest.raises(ValueError, match="shard_range"):
        generate.generate_dataset(str(tmp_path), 4, config=config(), num_shards=2, shard_range=(1, 1))
    bad = config()
    bad.kinds = ("color", "teleport")
    with pytest.raises(ValueError, match="'kinds'"):
        generate.generate_dataset(str(tmp_path), 4, config=bad)


def test_loader_and_preview_read_the_generated_dataset(reference, tmp_path):
    """The generator's sidecars agree with its records, and the loader's selection follows them."""
    import numpy as np

    from data_pipeline import loader, preview

    directory, _, shards = reference
    records = [r for name in sorted(shards) for r in shards[name]]
    nd = [schema.read_header(r)["num_differences"] for r in records]
    _, per_shard = loader.read_index(loader.list_shards(os.path.join(directory, "*.array_record")))
    assert np.concatenate(per_shard).tolist() == nd
    wanted = {nd[0]}
    ds = loader.make_pair_dataset(os.path.join(directory, "*.array_record"), batch_size=2, seed=0, max_boxes=3,
                                  selection=[(wanted, 1.0)], shard_index=0, shard_count=1, shuffle=False,
                                  num_epochs=1, drop_remainder=False)
    ids = []
    for batch in ds:
        for b, gid in enumerate(batch["record_id"].tolist()):
            ids.append(gid)
            d = schema.decode(records[gid])
            np.testing.assert_array_equal(batch["image_b"][b], d["image_b"])
            np.testing.assert_array_equal(batch["boxes"][b, :d["num_differences"]], d["boxes"])
    assert ids == [i for i, n in enumerate(nd) if n in wanted]
    out = preview.preview_shards(os.path.join(directory, "*.array_record"), str(tmp_path / "sheet.png"),
                                 num_pairs=4)
    assert os.path.getsize(out) > 0
