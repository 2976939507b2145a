"""Data throughput: rendering pairs end to end, and loading them, on this machine's CPU.

    python benchmarks/render_throughput.py [--pairs_224=32] [--pairs_448=24] [--loader_pairs=600]

Rendering rows run `generate_dataset` (render both images + segmentation, validate with retries, encode
PNGs, write one ArrayRecord shard) at 224 and 448 px, shadows off and on, with 1 and 2 worker processes.
`pairs/s` is the whole run; `steady pairs/s` leaves out start-up (spawning workers, creating GL contexts),
which a long run amortises. `attempts` is the mean number of scene draws per accepted pair, `failed` the
pairs that no draw within max_attempts satisfied (skipped, as the generator does). The 2-worker rows
also report their speed-up over 1 worker in the same run.

`cpu ms/pair` is CPU time per pair (all threads of the process doing the work, llvmpipe's included):
unlike pairs/s it barely moves with the machine's load, so 1000 * cores / (cpu ms/pair) estimates the
rate of an idle machine when the work scales over cores.

The loader row reads a 448 px dataset through `make_pair_dataset` (PNG decode, padding, batching of 8,
Grain read threads), against a baseline of plain `schema.decode` in one thread in the same run.

Reference bar on a 2-core machine (measured with a prototype, Mesa llvmpipe): 448 px with 2 processes about
12 pairs/s with shadows and 22 without; the loader about 300 pairs/s. The load average is printed because
other work on the machine changes every number here.
"""
from __future__ import annotations

import json
import os
import tempfile
import time


def render_rows(pairs_by_res: dict[int, int], workers_list=(1, 2)) -> list[dict]:
    from configs import datagen
    from data_pipeline.generate import generate_dataset

    rows = []
    for res, n in pairs_by_res.items():
        for shadows in (False, True):
            base = None
            for workers in workers_list:
                cfg = datagen.get_config(str(res))
                cfg.shadows = shadows
                with tempfile.TemporaryDirectory() as d:
                    s = generate_dataset(d, n, seed=0, workers=workers, config=cfg, num_shards=1, progress=False,
                                         max_failed_fraction=1.0)  # failures are reported, not fatal
                run = s["this_run"]
                row = {"what": "render", "res": res, "shadows": shadows, "workers": workers, "pairs": n,
                       "pairs_per_s": run["pairs_per_s"], "steady_pairs_per_s": run["steady_pairs_per_s"],
                       "startup_s": run["startup_s"], "cpu_ms_per_pair": 1e3 * run["cpu_s_per_pair"],
                       "failed": s["num_failed"], "attempts": s["mean_attempts_per_pair"]}
                base = base or row["steady_pairs_per_s"]
                row["speedup"] = row["steady_pairs_per_s"] / base
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows


def loader_rows(num_pairs_on_disk: int, pairs_to_read: int, num_threads: int = 2) -> list[dict]:
    import grain

    from configs import datagen
    from data_pipeline import loader, schema
    from data_pipeline.generate import generate_dataset

    rows = []
    with tempfile.TemporaryDirectory() as d:
        generate_dataset(d, num_pairs_on_disk, seed=1, workers=2, config=datagen.get_config("448"),
                         num_shards=2, progress=False)
        source = grain.sources.ArrayRecordDataSource(loader.list_shards(f"{d}/*.array_record"))
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(num_pairs_on_disk):
            schema.decode(source[i])
        base = num_pairs_on_disk / (time.perf_counter() - start)
        rows.append({"what": "decode 1 thread", "res": 448, "pairs": num_pairs_on_disk, "pairs_per_s": base,
                     "speedup": 1.0, "cpu_ms_per_pair": 1e3 * (time.process_time() - cpu) / num_pairs_on_disk})
        print(_fmt(rows[-1]), flush=True)
        batch = 8
        it = iter(loader.make_pair_dataset(f"{d}/*.array_record", batch_size=batch, seed=0, max_boxes=4,
                                           shard_index=0, shard_count=1, num_threads=num_threads))
        next(it)  # thread start-up and first prefetch
        steps = max(1, pairs_to_read // batch)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(it)
        rate = steps * batch / (time.perf_counter() - start)
        rows.append({"what": f"loader {num_threads} threads", "res": 448, "pairs": steps * batch,
                     "pairs_per_s": rate, "speedup": rate / base,
                     "cpu_ms_per_pair": 1e3 * (time.process_time() - cpu) / (steps * batch)})
        print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(row: dict) -> str:
    def num(key, spec):
        v = row.get(key)
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    shadows = {True: "on", False: "off", None: "-"}[row.get("shadows")]
    return (f"| {row['what']:<16} | {row['res']:>4} | {shadows:>7} | {row.get('workers', '-')!s:>7} | "
            f"{row['pairs']:>5} | {num('pairs_per_s', '8.2f')} | {num('steady_pairs_per_s', '12.2f')} | "
            f"{num('startup_s', '9.1f')} | {num('speedup', '7.2f')} | {num('cpu_ms_per_pair', '11.1f')} | "
            f"{num('attempts', '8.1f')} | {num('failed', '6d')} |")


HEADER = ("| what             |  res | shadows | workers | pairs | pairs/s  | steady pairs/s | startup s | "
          "speedup | cpu ms/pair | attempts | failed |\n|" + "---|" * 12)


def main(argv):
    from absl import flags

    f = flags.FLAGS
    load_before = os.getloadavg()
    print(f"cpus: {os.cpu_count()}  load average before: {load_before[0]:.2f} {load_before[1]:.2f}")
    print(HEADER, flush=True)
    rows = render_rows({224: f.pairs_224, 448: f.pairs_448})
    rows += loader_rows(f.loader_dataset_pairs, f.loader_pairs)
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} (1 and 5 min)")
    if f.json_output:
        with open(f.json_output, "w") as out:
            json.dump({"rows": rows, "load_before": load_before, "load_after": load_after,
                       "cpus": os.cpu_count()}, out, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    from absl import app, flags

    flags.DEFINE_integer("pairs_224", 40, "Pairs per 224 px rendering row.", lower_bound=2)
    flags.DEFINE_integer("pairs_448", 24, "Pairs per 448 px rendering row.", lower_bound=2)
    flags.DEFINE_integer("loader_dataset_pairs", 48, "448 px pairs written for the loader rows.", lower_bound=8)
    flags.DEFINE_integer("loader_pairs", 800, "Pairs read (repeating the dataset) for the loader row.",
                         lower_bound=8)
    flags.DEFINE_string("json_output", "", "Also write the rows to this JSON file.")
    app.run(main)
