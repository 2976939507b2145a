"""The plan's per-chip table: resident state, each program's memory, what is live at once, the verdict.

What is live at once while a program runs = its compiled peak (arguments, outputs and temporaries,
liveness-aware) + the resident state that is not among its arguments (`Program.live_outside`: the
optimiser state and the reference during generation, the whole rollout beside a minibatch update, ...).
The run FITS when every program compiled (the compiler refuses one whose own peak exceeds HBM) and the
largest such sum is within the chip's usable HBM; the margin is what is left of HBM at that moment.
Host-side prefetched batches live in host memory, not HBM, and are not counted.
"""
from __future__ import annotations

import json
import os

from dig_jax.aot import analysis, flops, topologies
from dig_jax.aot.programs import Program, RunParts

GIB = 1024 ** 3


def _program_row(p: Program, topo: topologies.Topology, chips: int, hbm: int) -> dict:
    row = {"name": p.name, "stage": p.stage, "comparison": p.comparison, "fits": p.result.fits,
           "refusal": p.result.refusal,
           "compile_s": round(p.result.seconds, 2), "shapes": p.shapes, "flops": p.flops,
           "arguments": p.arguments, "live_outside": p.live_outside, "notes": list(p.notes)}
    if p.per_token is not None:
        row["kv_cache_bytes_per_chip"] = p.per_token["kv_cache_bytes"]
    if not p.result.fits:
        return row
    mem = p.result.memory
    live = mem.peak + sum(p.live_outside.values())
    coll = analysis.collective_bytes(p.result.compiled.as_text(), num_devices=chips)
    row.update(memory=mem.__dict__, live_at_once=live, live_pct_of_hbm=100.0 * live / hbm,
               collectives=coll.to_dict(), **_traffic(p, coll, topo.generation, chips))
    if p.per_token is None and coll.unknown_loops:
        row["notes"].append(f"{coll.unknown_loops} loop(s) of unknown trip count: their collectives counted once")
    return row


def _traffic(p: Program, coll: analysis.CollectiveBytes, gen: topologies.Generation, chips: int) -> dict:
    """Collective bytes per call and the rooflines of one call (and of one decode step).

    A generation's loop of unknown trip count is its decode loop: counted at its worst, every step.
    Elsewhere such loops (none in today's programs) are counted once, and the row says so."""
    speeds = dict(chips=chips, peak_flops=gen.peak_bf16_flops, hbm_bandwidth=gen.hbm_bandwidth,
                  ici_bandwidth=gen.ici_bandwidth)
    per_iteration = sum(coll.wire_per_unknown_iteration.values())  # received over ICI per chip
    repeats = p.shapes["new_tokens"] - 1 if p.per_token is not None else 1
    out = {"collectives_per_call": {"operand": coll.total + repeats * sum(coll.per_unknown_iteration.values()),
                                    "ici_received": coll.wire_total + repeats * per_iteration}}
    if p.per_token is not None:
        out["per_token"] = {**p.per_token, "ici_bytes": per_iteration,
                            "roofline": flops.roofline(p.per_token["flops"], p.per_token["hbm_bytes"], per_iteration,
                                                       **speeds)}
    out["roofline"] = flops.roofline(p.flops, p.hbm_bytes, out["collectives_per_call"]["ici_received"], **speeds)
    return out


def build(topo: topologies.Topology, num_slices: int, parts: RunParts, programs: list[Program],
          resident: dict[str, int], hbm: int, *, hbm_source: str, notes: list[str]) -> dict:
    """The plan as a JSON-able dict (see the module docstring for the verdict)."""
    chips = topo.chips * num_slices
    rows = [_program_row(p, topo, chips, hbm) for p in programs]
    run_rows = [r for r in rows if not r["comparison"]]  # what the run executes decides the verdict
    refused = [r["name"] for r in run_rows if not r["fits"]]
    fitting = [r for r in run_rows if r["fits"]]
    worst = max(fitting, key=lambda r: r["live_at_once"]) if fitting else None
    over = [r["name"] for r in fitting if r["live_at_once"] > hbm]
    if refused or over:
        verdict = "DOES NOT FIT"
        why = ([f"{name}: refused by the compiler" for name in refused]
               + [f"{name}: live at once exceeds HBM" for name in over])
    else:
        verdict, why = "FITS", []
    return {
        "topology": topo.name, "topology_name": topo.topology_name, "num_slices": num_slices, "chips": chips,
        "hosts": topo.hosts * num_slices, "mesh": {k: int(v) for k, v in parts.mesh.shape.items()},
        "model": parts.config.model.preset, "parameters": analysis.total_elements(parts.params),
        "hbm_per_chip": hbm, "hbm_source": hbm_source,
        "published_hbm_per_chip": topo.generation.published_hbm,
        "peak_bf16_flops_per_chip": topo.generation.peak_bf16_flops,
        "hbm_bandwidth_per_chip": topo.generation.hbm_bandwidth, "ici_bandwidth_per_chip": topo.generation.ici_bandwidth,
        "resident": resident, "programs": rows, "verdict": verdict, "why": why,
        "worst_program": worst["name"] if worst else None,
        "live_at_once": worst["live_at_once"] if worst else None,
        "margin_bytes": hbm - worst["live_at_once"] if worst and not refused else None,
        "peak_pct_of_hbm": worst["live_pct_of_hbm"] if worst else None,
        "sampling_layout": None if parts.layout is None else {k: int(v) for k, v in parts.layout.mesh.shape.items()},
        "rollout": rollout_estimate(rows),
        "notes": notes,
    }


def rollout_estimate(rows: list[dict]) -> dict | None:
    """The rollout's roofline per GRPO iteration: the copy into the sampling layout (when there is one)
    plus the generation at its longest; beside it, the generation on the training mesh. Each with its
    decode step's collective bytes (received per chip, `analysis.wire_bytes`) and KV cache per chip.
    None when the generation was not compiled."""
    by_name = {r["name"]: r for r in rows if r["fits"]}
    if "grpo_generation" not in by_name:
        return None

    def decode(r: dict) -> dict:
        return {"ici_bytes_per_step": r["per_token"]["ici_bytes"], "kv_cache_bytes_per_chip": r["kv_cache_bytes_per_chip"],
                "step_s": r["per_token"]["roofline"]["bound_s"], "generation_s": r["roofline"]["bound_s"]}

    out = {"sampling": decode(by_name["grpo_generation"]), "rows": by_name["grpo_generation"]["shapes"]["rows"],
           "new_tokens": by_name["grpo_generation"]["shapes"]["new_tokens"]}
    reshard = by_name.get("policy_reshard")
    out["reshard_bytes"] = reshard["collectives_per_call"]["ici_received"] if reshard else 0
    out["reshard_s"] = reshard["roofline"]["bound_s"] if reshard else 0.0
    out["total_s"] = out["reshard_s"] + out["sampling"]["generation_s"]
    if "grpo_generation_training_mesh" in by_name:
        out["training_mesh"] = decode(by_name["grpo_generation_training_mesh"])
        out["speedup"] = out["training_mesh"]["generation_s"] / out["total_s"]
    return out


def _bytes(x) -> str:
    """Bytes in the largest binary unit that leaves a number >= 1 (GiB at most)."""
    if x is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(x)} B"


def _seconds(x) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.2f} ms" if x < 1 else f"{x:.2f} s"


def markdown(plan: dict) -> str:
    """The report as markdown: the slice, the resident state, one row per program, the verdict."""
    lines = [f"# AOT plan: {plan['model']} on {plan['num_slices']} x {plan['topology']} ({plan['topology_name']})",
             "",
             f"{plan['chips']} chips, {plan['hosts']} hosts, mesh {plan['mesh']}; usable HBM per chip "
             f"{_bytes(plan['hbm_per_chip'])} ({plan['hbm_source']}; published {plan['published_hbm_per_chip']}); "
             f"{plan['parameters'] / 1e6:,.1f} M parameters.", "",
             "| resident per chip | bytes |", "|---|---|"]
    lines += [f"| {name} | {_bytes(size)} |" for name, size in plan["resident"].items()]
    kv = [r for r in plan["programs"] if "kv_cache_bytes_per_chip" in r]
    lines += [f"| KV cache of {r['name']} (inside its temporaries) | {_bytes(r['kv_cache_bytes_per_chip'])} |" for r in kv]
    lines += ["", "| program | rows | arguments | temporaries | outputs | peak | live beside it | live at once | "
              "% HBM | compile | FLOPs/call | roofline/call | collectives/call (operand; ICI in) |",
              "|" + "---|" * 13]
    for r in plan["programs"]:
        name = f"{r['name']} (not run)" if r.get("comparison") else r["name"]
        if not r["fits"]:
            lines.append(f"| {name} | {r['shapes']['rows']} | DOES NOT FIT: {r['refusal']} |" + " |" * 10)
            continue
        m, roof = r["memory"], r["roofline"]
        lines.append(
            f"| {name} | {r['shapes']['rows']} | {_bytes(m['arguments'])} | {_bytes(m['temporaries'])} | "
            f"{_bytes(m['outputs'])} | {_bytes(m['peak'])} | {_bytes(sum(r['live_outside'].values()))} | "
            f"{_bytes(r['live_at_once'])} | {r['live_pct_of_hbm']:.1f} | {r['compile_s']:.1f} s | {r['flops']:.3g} | "
            f"{_seconds(roof['bound_s'])} ({roof['bound']}) | {_bytes(r['collectives_per_call']['operand'])}; "
            f"{_bytes(r['collectives_per_call']['ici_received'])} |")
    tokens = [r for r in plan["programs"] if r.get("per_token")]
    if tokens:
        lines += ["", "| per decode step | FLOPs | HBM bytes | ICI bytes in | roofline |", "|---|---|---|---|---|"]
        for r in tokens:
            t = r["per_token"]
            lines.append(f"| {r['name']} | {t['flops']:.3g} | {_bytes(t['hbm_bytes'])} | {_bytes(t['ici_bytes'])} | "
                         f"{_seconds(t['roofline']['bound_s'])} ({t['roofline']['bound']}) |")
    lines += _rollout_lines(plan)
    margin = "" if plan["margin_bytes"] is None else (
        f": {_bytes(plan['live_at_once'])} live at most ({plan['worst_program']}), "
        f"{plan['peak_pct_of_hbm']:.1f}% of HBM, margin {_bytes(plan['margin_bytes'])}")
    lines += ["", f"**{plan['verdict']}**{margin}"]
    lines += [f"- {why}" for why in plan["why"]]
    notes = plan["notes"] + [f"{r['name']}: {n}" for r in plan["programs"] for n in r["notes"]]
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _rollout_lines(plan: dict) -> list[str]:
    ro = plan.get("rollout")
    if not ro:
        return []
    where = ("training mesh" if plan["sampling_layout"] is None else
             "sampling layout " + " x ".join(f"{k}={v}" for k, v in plan["sampling_layout"].items()))
    lines = ["", f"Rollout per iteration ({ro['rows']} rows x {ro['new_tokens']} new tokens at most), roofline:", "",
             "| decoding on | reshard bytes in / chip | ICI bytes in / chip / decode step | KV cache / chip | "
             "decode step | rollout |", "|---|---|---|---|---|---|"]

    def line(name, d, reshard, total):
        return (f"| {name} | {reshard} | {_bytes(d['ici_bytes_per_step'])} | {_bytes(d['kv_cache_bytes_per_chip'])} | "
                f"{_seconds(d['step_s'])} | {_seconds(total)} |")

    lines.append(line(where, ro["sampling"], _bytes(ro["reshard_bytes"]) if ro["reshard_bytes"] else "-", ro["total_s"]))
    if "training_mesh" in ro:
        t = ro["training_mesh"]
        lines.append(line("training mesh (not run)", t, "-", t["generation_s"]))
        lines += ["", f"Sampling layout: {ro['speedup']:.1f}x faster rollout by the roofline."]
    return lines


def write(plan: dict, workdir: str) -> tuple[str, str]:
    """Writes aot_plan.json and aot_plan.md into `workdir`; returns their paths."""
    os.makedirs(workdir, exist_ok=True)
    paths = os.path.join(workdir, "aot_plan.json"), os.path.join(workdir, "aot_plan.md")
    with open(paths[0], "w") as f:
        json.dump(plan, f, indent=2, default=float)
    with open(paths[1], "w") as f:
        f.write(markdown(plan))
    return paths
